// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-msg bus over an ivshmem-doorbell PCI device (1af4:1110).
 *
 * BAR0 holds the doorbell registers, BAR2 the message memory the device side (the
 * back-end, which is also the ivshmem server) laid out: a header, then one ring of fixed
 * slots per direction. We produce into "to-device" and ring the device side's peer ID,
 * vector 0; the device side produces into "to-driver" and raises our MSI-X vector 0.
 *
 * The device side is not trusted: its ring index must stay within the ring, each message
 * is copied out of shared memory before it is looked at, and a request without an answer
 * times out (module parameter timeout_ms) instead of hanging the boot.
 */
#include <linux/delay.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/jiffies.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>

#include "vmsg.h"

#define IVSHMEM_IVPOSITION	8
#define IVSHMEM_DOORBELL	12
#define VMSG_VECTOR		0

static unsigned int timeout_ms = 5000;
module_param(timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms, "How long to wait for the device side to answer a request");

static DEFINE_MUTEX(vmsg_bus_lock);
static struct vmsg_bus *vmsg_the_bus;	/* one bus: the first ivshmem device with our header */

static u32 *ring_word(struct vmsg_ring *r, unsigned int off)
{
	return (u32 *)((u8 *)r->base + off);
}

static u8 *ring_slot(struct vmsg_ring *r, u32 pos)
{
	return (u8 *)r->base + VMSG_RING_SLOTS + (pos % r->nslots) * VMSG_SLOT_SIZE;
}

static void vmsg_bus_broken(struct vmsg_bus *bus, const char *ring, u32 peer, u32 ours)
{
	if (!bus->broken)
		dev_err(bus->dev, "virtio-msg: %s ring: device side index %u is %u slots from ours (%u), more than the %u slots; bus stopped\n",
			ring, peer, ours - peer, ours, bus->nslots);
	bus->broken = true;
}

/* Messages in the to-device ring the device side has not consumed yet. tx_lock held. */
static int vmsg_tx_used(struct vmsg_bus *bus, u32 *cons_out)
{
	u32 cons = READ_ONCE(*ring_word(&bus->tx, VMSG_RING_CONS));
	u32 used = bus->tx.shadow - cons;

	if (used > bus->nslots) {
		vmsg_bus_broken(bus, "to-device", cons, bus->tx.shadow);
		return -EIO;
	}
	if (cons_out)
		*cons_out = cons;
	return used;
}

/* Publish one message; returns its ring position. tx_lock held. */
static int vmsg_tx_put(struct vmsg_bus *bus, const void *msg, u16 len, u32 *pos)
{
	int used;
	u8 *slot;

	if (bus->broken || bus->dead)
		return -ENODEV;
	used = vmsg_tx_used(bus, NULL);
	if (used < 0)
		return used;
	if (used == bus->nslots)
		return -EAGAIN;
	slot = ring_slot(&bus->tx, bus->tx.shadow);
	memcpy(slot, msg, len);
	memset(slot + len, 0, VMSG_SLOT_SIZE - len);
	*pos = bus->tx.shadow++;
	/* Release: the slot's bytes are visible before the device side sees the new index. */
	smp_store_release(ring_word(&bus->tx, VMSG_RING_PROD), bus->tx.shadow);
	return 0;
}

static void vmsg_doorbell(struct vmsg_bus *bus)
{
	/* writel orders the index store above before the doorbell (it has a write barrier). */
	writel(bus->device_peer << 16 | VMSG_VECTOR, bus->regs + IVSHMEM_DOORBELL);
}

static struct vmsg_device *vmsg_find(struct vmsg_bus *bus, u16 dev_num)
{
	struct vmsg_device *vmdev;

	list_for_each_entry(vmdev, &bus->devices, node)
		if (vmdev->dev_num == dev_num)
			return vmdev;
	return NULL;
}

/* One message, already copied out of shared memory. rx_lock held. */
static void vmsg_handle(struct vmsg_bus *bus, const u8 *buf)
{
	const struct vmsg_hdr *h = (const void *)buf;
	u16 size = le16_to_cpu(h->msg_size);
	u16 dev_num = le16_to_cpu(h->dev_num);
	struct vmsg_device *vmdev;

	if (size < sizeof(*h) || size > VMSG_SLOT_SIZE) {
		dev_warn_ratelimited(bus->dev, "virtio-msg: message %#x with msg_size %u dropped\n",
				     h->msg_id, size);
		return;
	}
	if (h->type & VMSG_TYPE_RESPONSE) {
		if (bus->waiting && h->msg_id == bus->want_id && dev_num == bus->want_dev &&
		    le16_to_cpu(h->token) == bus->token && !(h->type & VMSG_TYPE_BUS)) {
			memcpy(bus->resp, buf, size);
			bus->resp_len = size;
			bus->waiting = false;
			complete(&bus->done);
		}
		/* else: a late or unknown answer; the draft says discard it silently */
		return;
	}
	if (h->type & VMSG_TYPE_BUS || h->token)
		goto odd;
	if (h->msg_id != VIRTIO_MSG_EVENT_USED && h->msg_id != VIRTIO_MSG_EVENT_CONFIG)
		goto odd;
	spin_lock(&bus->dev_lock);
	vmdev = vmsg_find(bus, dev_num);
	if (vmdev)
		vmsg_device_event(vmdev, h->msg_id, buf + sizeof(*h), size - sizeof(*h));
	spin_unlock(&bus->dev_lock);
	return;
odd:
	dev_warn_ratelimited(bus->dev, "virtio-msg: unexpected message type %#x id %#x for device %u dropped\n",
			     h->type, h->msg_id, dev_num);
}

static void vmsg_drain(struct vmsg_bus *bus)
{
	u8 buf[VMSG_SLOT_SIZE];
	unsigned long flags;
	unsigned int budget;
	u32 prod, ready;

	spin_lock_irqsave(&bus->rx_lock, flags);
	for (budget = 2 * bus->nslots; budget && !bus->broken; budget--) {
		/* Acquire: the slot is read only after the index that published it. */
		prod = smp_load_acquire(ring_word(&bus->rx, VMSG_RING_PROD));
		ready = prod - bus->rx.shadow;
		if (ready > bus->nslots) {
			vmsg_bus_broken(bus, "to-driver", prod, bus->rx.shadow);
			break;
		}
		if (!ready)
			break;
		memcpy(buf, ring_slot(&bus->rx, bus->rx.shadow), sizeof(buf));
		bus->rx.shadow++;
		/* Release: our copy is complete before the slot goes back to the device side. */
		smp_store_release(ring_word(&bus->rx, VMSG_RING_CONS), bus->rx.shadow);
		/* Full barrier: the consumed index is visible before we read used rings, so a
		 * device side that skipped an EVENT_USED (ours still unconsumed) is not missed. */
		smp_mb();
		vmsg_handle(bus, buf);
	}
	spin_unlock_irqrestore(&bus->rx_lock, flags);
}

static irqreturn_t vmsg_irq(int irq, void *data)
{
	vmsg_drain(data);
	return IRQ_HANDLED;
}

static void vmsg_poll(struct timer_list *t)
{
	struct vmsg_bus *bus = from_timer(bus, t, poll_timer);

	vmsg_drain(bus);
	mod_timer(&bus->poll_timer, jiffies + 1);
}

/*
 * Send a request and wait for its answer; copies the answer's payload (ans_min..ans_max
 * bytes) to ans and returns its length, or a negative errno. May sleep.
 */
int vmsg_request(struct vmsg_bus *bus, u16 dev_num, u8 msg_id, const void *req, u16 req_len,
		 void *ans, u16 ans_min, u16 ans_max)
{
	u8 msg[VMSG_SLOT_SIZE];
	struct vmsg_hdr *h = (void *)msg;
	unsigned long deadline;
	int ret, len;
	u32 pos;

	if (req_len > VMSG_MAX_PAYLOAD)
		return -EMSGSIZE;
	mutex_lock(&bus->req_lock);
	if (bus->dead || bus->broken) {
		ret = -ENODEV;
		goto out;
	}
	if (!++bus->token)
		bus->token = 1;	/* 0 is for events */
	h->type = 0;
	h->msg_id = msg_id;
	h->dev_num = cpu_to_le16(dev_num);
	h->token = cpu_to_le16(bus->token);
	h->msg_size = cpu_to_le16(sizeof(*h) + req_len);
	memcpy(msg + sizeof(*h), req, req_len);

	spin_lock_irq(&bus->rx_lock);
	reinit_completion(&bus->done);
	bus->want_id = msg_id;
	bus->want_dev = dev_num;
	bus->waiting = true;
	spin_unlock_irq(&bus->rx_lock);

	deadline = jiffies + msecs_to_jiffies(timeout_ms);
	for (;;) {
		spin_lock_irq(&bus->tx_lock);
		ret = vmsg_tx_put(bus, msg, sizeof(*h) + req_len, &pos);
		spin_unlock_irq(&bus->tx_lock);
		if (ret != -EAGAIN || time_after(jiffies, deadline))
			break;
		usleep_range(100, 1000);	/* ring full: the device side is behind */
	}
	if (!ret) {
		long left = (long)(deadline - jiffies);

		vmsg_doorbell(bus);
		if (!wait_for_completion_timeout(&bus->done, max(left, 1L)))
			ret = -ETIMEDOUT;
	}
	spin_lock_irq(&bus->rx_lock);
	if (bus->waiting && !ret)
		ret = -ETIMEDOUT;
	bus->waiting = false;
	len = bus->resp_len - (int)sizeof(*h);
	spin_unlock_irq(&bus->rx_lock);
	if (ret == -ETIMEDOUT || ret == -EAGAIN) {
		dev_err(bus->dev, "virtio-msg: no answer to message %#x for device %u within %u ms: device side dead? bus disabled\n",
			msg_id, dev_num, timeout_ms);
		bus->dead = true;
		ret = -ETIMEDOUT;
		goto out;
	}
	if (ret)
		goto out;
	if (len < ans_min || len > ans_max) {
		dev_err(bus->dev, "virtio-msg: answer to message %#x for device %u has %d payload bytes, expected %u..%u\n",
			msg_id, dev_num, len, ans_min, ans_max);
		ret = -EPROTO;
		goto out;
	}
	memcpy(ans, bus->resp + sizeof(*h), len);
	ret = len;
out:
	mutex_unlock(&bus->req_lock);
	return ret;
}

/*
 * The driver's notification (virtqueue kick): EVENT_AVAIL, unless the previous one for
 * this queue is still waiting in the ring: the device side reads the avail ring after
 * consuming it, and virtqueue_kick_prepare's full barrier ordered our avail index store
 * before the consumer index load below. Any context; never sleeps.
 */
bool vmsg_event_avail(struct vmsg_bus *bus, struct vmsg_device *vmdev, u32 index)
{
	struct {
		struct vmsg_hdr h;
		__le32 index;
		__le32 next;
	} __packed msg = {
		.h.msg_id = VIRTIO_MSG_EVENT_AVAIL,
		.h.dev_num = cpu_to_le16(vmdev->dev_num),
		.h.msg_size = cpu_to_le16(sizeof(msg)),
		.index = cpu_to_le32(index),
	};
	unsigned long flags;
	int used, ret = 0;
	u32 cons, pos;

	spin_lock_irqsave(&bus->tx_lock, flags);
	used = bus->dead || bus->broken ? -ENODEV : vmsg_tx_used(bus, &cons);
	if (used < 0) {
		ret = used;
	} else if (!vmdev->avail_sent[index] ||
		   vmdev->avail_pos[index] - cons >= (u32)used) {
		ret = vmsg_tx_put(bus, &msg, sizeof(msg), &pos);
		if (!ret) {
			vmdev->avail_pos[index] = pos;
			vmdev->avail_sent[index] = true;
		}
	} else {
		pos = U32_MAX;	/* coalesced: no doorbell needed either */
	}
	spin_unlock_irqrestore(&bus->tx_lock, flags);
	if (ret == -EAGAIN)	/* cannot happen: probe keeps queues + 1 below the slots */
		dev_err_ratelimited(bus->dev, "virtio-msg: to-device ring full, EVENT_AVAIL lost\n");
	else if (!ret && pos != U32_MAX)
		vmsg_doorbell(bus);
	return !ret;
}

struct vmsg_bus *vmsg_bus_get(void)
{
	struct vmsg_bus *bus;

	mutex_lock(&vmsg_bus_lock);
	bus = vmsg_the_bus;
	if (bus)
		kref_get(&bus->ref);
	mutex_unlock(&vmsg_bus_lock);
	return bus;
}

static void vmsg_bus_free(struct kref *ref)
{
	kfree(container_of(ref, struct vmsg_bus, ref));
}

void vmsg_bus_put(struct vmsg_bus *bus)
{
	kref_put(&bus->ref, vmsg_bus_free);
}

static int vmsg_check_header(struct vmsg_bus *bus, size_t len)
{
	const struct vmsg_mem_header *mh = bus->mem;
	u32 nslots = le32_to_cpu(mh->nslots);
	size_t ring = VMSG_RING_SLOTS + (size_t)nslots * VMSG_SLOT_SIZE;
	size_t to_device = VMSG_HEADER_AREA, to_driver;

	if (le32_to_cpu(mh->magic) != VMSG_MAGIC || le16_to_cpu(mh->version) != VMSG_VERSION) {
		dev_err(bus->dev, "virtio-msg: BAR2 holds no message memory (magic %#x version %u): is the back-end the ivshmem server?\n",
			le32_to_cpu(mh->magic), le16_to_cpu(mh->version));
		return -ENODEV;
	}
	if (le16_to_cpu(mh->slot_size) != VMSG_SLOT_SIZE ||
	    le32_to_cpu(mh->max_msg_size) != VMSG_SLOT_SIZE ||
	    le32_to_cpu(mh->revision) != VMSG_REVISION || nslots < VMSG_MIN_SLOTS ||
	    nslots > VMSG_MAX_SLOTS || !is_power_of_2(nslots) ||
	    le32_to_cpu(mh->device_peer) > 0xffff) {
		dev_err(bus->dev, "virtio-msg: unsupported message memory: slot %u, max message %u, revision %u, %u slots, peer %u\n",
			le16_to_cpu(mh->slot_size), le32_to_cpu(mh->max_msg_size),
			le32_to_cpu(mh->revision), nslots, le32_to_cpu(mh->device_peer));
		return -EINVAL;
	}
	to_driver = ALIGN(to_device + ring, 0x100);
	if (le32_to_cpu(mh->to_device) != to_device || le32_to_cpu(mh->to_driver) != to_driver ||
	    to_driver + ring > len) {
		dev_err(bus->dev, "virtio-msg: rings at %#x/%#x (%zu bytes each) do not fit %zu bytes of message memory\n",
			le32_to_cpu(mh->to_device), le32_to_cpu(mh->to_driver), ring, len);
		return -EINVAL;
	}
	bus->nslots = nslots;
	bus->device_peer = le32_to_cpu(mh->device_peer);
	bus->tx.base = (u8 *)bus->mem + to_device;
	bus->rx.base = (u8 *)bus->mem + to_driver;
	bus->tx.nslots = bus->rx.nslots = nslots;
	/* Adopt the indices: after a guest reboot the device side continues from them. */
	bus->tx.shadow = READ_ONCE(*ring_word(&bus->tx, VMSG_RING_PROD));
	bus->rx.shadow = READ_ONCE(*ring_word(&bus->rx, VMSG_RING_CONS));
	return 0;
}

/*
 * The device side may start after us (a service VM that boots late): all-zero memory means
 * "not laid out yet", so wait up to timeout_ms for the magic; anything else is checked now.
 */
static int vmsg_wait_header(struct vmsg_bus *bus, size_t len)
{
	const struct vmsg_mem_header *mh = bus->mem;
	unsigned long deadline = jiffies + msecs_to_jiffies(timeout_ms);

	while (!READ_ONCE(mh->magic)) {
		if (time_after(jiffies, deadline)) {
			dev_err(bus->dev, "virtio-msg: no message memory header within %u ms: device side (back-end or service VM) not running? bus not created\n",
				timeout_ms);
			return -ETIMEDOUT;
		}
		msleep(20);
	}
	/* Acquire: the header's other fields are read after the magic that publishes them. */
	smp_rmb();
	return vmsg_check_header(bus, len);
}

static int vmsg_pci_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	resource_size_t start = pci_resource_start(pdev, 2), len = pci_resource_len(pdev, 2);
	struct vmsg_bus *bus;
	int ret, nvec;

	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	ret = pcim_iomap_regions(pdev, BIT(0), "virtio-msg");
	if (ret)
		return ret;
	if (!len || !devm_request_mem_region(&pdev->dev, start, len, "virtio-msg")) {
		dev_err(&pdev->dev, "virtio-msg: BAR2 (message memory) is missing or busy\n");
		return -EBUSY;
	}
	bus = kzalloc(sizeof(*bus), GFP_KERNEL);
	if (!bus)
		return -ENOMEM;
	kref_init(&bus->ref);
	bus->dev = &pdev->dev;
	bus->regs = pcim_iomap_table(pdev)[0];
	/* Normal cacheable memory: the peer is another CPU, not a device. */
	bus->mem = devm_memremap(&pdev->dev, start, len, MEMREMAP_WB);
	if (IS_ERR(bus->mem)) {
		ret = PTR_ERR(bus->mem);
		goto free;
	}
	spin_lock_init(&bus->tx_lock);
	spin_lock_init(&bus->rx_lock);
	spin_lock_init(&bus->dev_lock);
	mutex_init(&bus->req_lock);
	init_completion(&bus->done);
	INIT_LIST_HEAD(&bus->devices);
	timer_setup(&bus->poll_timer, vmsg_poll, 0);
	ret = vmsg_wait_header(bus, len);
	if (ret)
		goto free;
	bus->own_id = readl(bus->regs + IVSHMEM_IVPOSITION);
	pci_set_master(pdev);	/* MSI-X messages are bus-master writes */
	nvec = pci_alloc_irq_vectors(pdev, 1, 2, PCI_IRQ_MSIX);
	if (nvec > 0)
		ret = request_irq(pci_irq_vector(pdev, VMSG_VECTOR), vmsg_irq, 0, "virtio-msg", bus);
	if (nvec <= 0 || ret) {
		dev_warn(&pdev->dev, "virtio-msg: no MSI-X interrupt (%d): polling the ring\n",
			 nvec <= 0 ? nvec : ret);
		if (nvec > 0)
			pci_free_irq_vectors(pdev);
		bus->polling = true;
		mod_timer(&bus->poll_timer, jiffies + 1);
	}
	pci_set_drvdata(pdev, bus);
	mutex_lock(&vmsg_bus_lock);
	if (!vmsg_the_bus)
		vmsg_the_bus = bus;
	mutex_unlock(&vmsg_bus_lock);
	dev_info(&pdev->dev, "virtio-msg bus: %u slots per direction, we are peer %u, device side peer %u, %s\n",
		 bus->nslots, bus->own_id, bus->device_peer, bus->polling ? "polling" : "MSI-X");
	return 0;
free:
	kfree(bus);
	return ret;
}

static void vmsg_pci_remove(struct pci_dev *pdev)
{
	struct vmsg_bus *bus = pci_get_drvdata(pdev);

	mutex_lock(&vmsg_bus_lock);
	if (vmsg_the_bus == bus)
		vmsg_the_bus = NULL;
	mutex_unlock(&vmsg_bus_lock);
	mutex_lock(&bus->req_lock);
	spin_lock_irq(&bus->tx_lock);
	bus->dead = true;	/* devices still bound fail fast; the mapping goes away below */
	spin_unlock_irq(&bus->tx_lock);
	mutex_unlock(&bus->req_lock);
	if (bus->polling) {
		del_timer_sync(&bus->poll_timer);
	} else {
		free_irq(pci_irq_vector(pdev, VMSG_VECTOR), bus);
		pci_free_irq_vectors(pdev);
	}
	vmsg_bus_put(bus);
}

static const struct pci_device_id vmsg_pci_ids[] = {
	{ PCI_DEVICE(0x1af4, 0x1110) },	/* ivshmem */
	{ }
};
MODULE_DEVICE_TABLE(pci, vmsg_pci_ids);

static struct pci_driver vmsg_pci_driver = {
	.name = "virtio-msg-ivshmem",
	.id_table = vmsg_pci_ids,
	.probe = vmsg_pci_probe,
	.remove = vmsg_pci_remove,
};

int vmsg_pci_register(void)
{
	return pci_register_driver(&vmsg_pci_driver);
}

void vmsg_pci_unregister(void)
{
	pci_unregister_driver(&vmsg_pci_driver);
}
