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
 *
 * Restarts (PROTOCOL.md, "Restart"): the device side bumps the header's epoch every time it
 * (re)starts and rings us. When we see a new epoch (doorbell, watch tick or a timed-out
 * request) the bus re-attaches and every virtio device is reset and re-probed: its driver
 * comes back without a reboot. While the device side is gone (a request timed out, or
 * queues with buffers made no progress and a PING went unanswered), the buffers on its
 * queues are failed here ("swept") so drivers see I/O errors instead of hanging.
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

static unsigned int watch_ms = 1000;
module_param(watch_ms, uint, 0644);
MODULE_PARM_DESC(watch_ms, "Liveness check period: new epoch, queues without progress");

static DEFINE_MUTEX(vmsg_bus_lock);
static struct vmsg_bus *vmsg_the_bus;	/* one bus: the first ivshmem device with our header */

static int vmsg_check_header(struct vmsg_bus *bus, size_t len);

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
		dev_err(bus->dev, "virtio-msg: %s ring: device side index %u is %u slots from ours (%u), more than the %u slots; bus stopped until the device side restarts\n",
			ring, peer, ours - peer, ours, bus->nslots);
	bus->broken = true;
	schedule_work(&bus->sweep_work);	/* its devices' buffers fail from now on */
}

static u32 vmsg_header_epoch(struct vmsg_bus *bus)
{
	const struct vmsg_mem_header *mh = bus->mem;

	return le32_to_cpu(READ_ONCE(mh->epoch));
}

/* Did the device side restart since we attached? Any context. */
static bool vmsg_epoch_changed(struct vmsg_bus *bus)
{
	const struct vmsg_mem_header *mh = bus->mem;

	return READ_ONCE(mh->magic) == cpu_to_le32(VMSG_MAGIC) &&
	       vmsg_header_epoch(bus) != READ_ONCE(bus->epoch);
}

static void vmsg_kick_reset(struct vmsg_bus *bus)
{
	if (!READ_ONCE(bus->closing))
		schedule_work(&bus->reset_work);
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
	if (bus->ring) {
		bus->ring(bus);
		return;
	}
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
		    le16_to_cpu(h->token) == bus->token &&
		    (h->type & VMSG_TYPE_BUS) == bus->want_type) {
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

	if (vmsg_epoch_changed(bus))
		vmsg_kick_reset(bus);	/* its doorbell after a restart lands here */
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

void vmsg_bus_rx(struct vmsg_bus *bus)
{
	vmsg_drain(bus);
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
static int __vmsg_request(struct vmsg_bus *bus, u8 type, u16 dev_num, u8 msg_id,
			  const void *req, u16 req_len, void *ans, u16 ans_min, u16 ans_max)
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
	h->type = type;
	h->msg_id = msg_id;
	h->dev_num = cpu_to_le16(dev_num);
	h->token = cpu_to_le16(bus->token);
	h->msg_size = cpu_to_le16(sizeof(*h) + req_len);
	memcpy(msg + sizeof(*h), req, req_len);

	spin_lock_irq(&bus->rx_lock);
	reinit_completion(&bus->done);
	bus->want_id = msg_id;
	bus->want_dev = dev_num;
	bus->want_type = type;
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
		if (vmsg_epoch_changed(bus)) {
			dev_warn(bus->dev, "virtio-msg: device side restarted while message %#x for device %u was in flight\n",
				 msg_id, dev_num);
			vmsg_kick_reset(bus);
			ret = -ECONNRESET;
			goto out;
		}
		dev_err(bus->dev, "virtio-msg: no answer to message %#x for device %u within %u ms: device side dead? its devices fail I/O until it restarts\n",
			msg_id, dev_num, timeout_ms);
		spin_lock_irq(&bus->tx_lock);
		bus->dead = true;
		spin_unlock_irq(&bus->tx_lock);
		schedule_work(&bus->sweep_work);
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

int vmsg_request(struct vmsg_bus *bus, u16 dev_num, u8 msg_id, const void *req, u16 req_len,
		 void *ans, u16 ans_min, u16 ans_max)
{
	return __vmsg_request(bus, 0, dev_num, msg_id, req, req_len, ans, ans_min, ans_max);
}

/* BUS_MSG_PING: is the device side still there? (times out like any request) */
static int vmsg_ping(struct vmsg_bus *bus)
{
	__le32 data = cpu_to_le32(0x45444745), echo;	/* "EDGE" */
	int ret;

	ret = __vmsg_request(bus, VMSG_TYPE_BUS, 0, VMSG_BUS_PING, &data, 4, &echo, 4, 4);
	if (ret == 4 && echo != data)
		dev_warn(bus->dev, "virtio-msg: PING answered with %#x, sent %#x\n",
			 le32_to_cpu(echo), le32_to_cpu(data));
	return ret < 0 ? ret : 0;
}

/*
 * The driver's notification (virtqueue kick): EVENT_AVAIL, unless the previous one for
 * this queue is still waiting in the ring: the device side reads the avail ring after
 * consuming it, and virtqueue_kick_prepare's full barrier ordered our avail index store
 * before the consumer index load below. Any context; never sleeps.
 */
int vmsg_event_avail(struct vmsg_bus *bus, struct vmsg_device *vmdev, u32 index)
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
	return ret;
}

/* Fail what sits on stale queues; mark every device stale while the device side is gone. */
static void vmsg_sweep(struct work_struct *work)
{
	struct vmsg_bus *bus = container_of(work, struct vmsg_bus, sweep_work);
	struct vmsg_device *vmdev;
	unsigned long flags;
	bool gone;

	spin_lock_irqsave(&bus->tx_lock, flags);
	gone = bus->dead || bus->broken;
	spin_unlock_irqrestore(&bus->tx_lock, flags);
	spin_lock_irqsave(&bus->dev_lock, flags);
	list_for_each_entry(vmdev, &bus->devices, node) {
		if (gone && !vmdev->stale)
			vmsg_device_gone(vmdev);
		if (vmdev->stale)
			vmsg_device_sweep(vmdev);
	}
	spin_unlock_irqrestore(&bus->dev_lock, flags);
}

/* Also while closing: a driver being removed may still queue buffers on stale queues. */
void vmsg_bus_sweep_now(struct vmsg_bus *bus)
{
	schedule_work(&bus->sweep_work);
}

/* The header after a restart: same geometry as before, else the bus stays down. */
static int vmsg_reattach(struct vmsg_bus *bus)
{
	struct vmsg_ring tx = bus->tx, rx = bus->rx;
	u32 nslots = bus->nslots, peer = bus->device_peer;
	int ret;

	spin_lock_irq(&bus->tx_lock);
	spin_lock(&bus->rx_lock);
	ret = vmsg_check_header(bus, bus->mem_len);
	if (!ret && (bus->nslots != nslots || bus->device_peer != peer)) {
		dev_err(bus->dev, "virtio-msg: the restarted device side has %u slots, peer %u; we were attached with %u slots, peer %u\n",
			bus->nslots, bus->device_peer, nslots, peer);
		ret = -EINVAL;
	}
	if (ret) {
		bus->tx = tx;
		bus->rx = rx;
		bus->nslots = nslots;
		bus->device_peer = peer;
		bus->dead = true;
	} else {
		/* Whatever the old device side left for us is stale: skip it. */
		bus->rx.shadow = smp_load_acquire(ring_word(&bus->rx, VMSG_RING_PROD));
		smp_store_release(ring_word(&bus->rx, VMSG_RING_CONS), bus->rx.shadow);
		bus->dead = false;
		bus->broken = false;
	}
	spin_unlock(&bus->rx_lock);
	spin_unlock_irq(&bus->tx_lock);
	return ret;
}

/*
 * A new epoch: the device side restarted and knows none of our devices' state. Re-attach,
 * mark every device's queues stale (their buffers fail), then reset and re-probe each.
 */
static void vmsg_reset_work(struct work_struct *work)
{
	struct vmsg_bus *bus = container_of(work, struct vmsg_bus, reset_work);
	struct vmsg_device *vmdev, **devs;
	unsigned int n = 0, i;
	unsigned long flags;
	u32 old, now;
	int ret;

	mutex_lock(&bus->req_lock);
	old = bus->epoch;
	now = vmsg_header_epoch(bus);
	if (now == old || READ_ONCE(bus->closing) || !vmsg_epoch_changed(bus)) {
		mutex_unlock(&bus->req_lock);
		return;
	}
	smp_rmb();	/* the header fields after the epoch that announced them */
	WRITE_ONCE(bus->epoch, now);
	ret = vmsg_reattach(bus);
	spin_lock_irqsave(&bus->dev_lock, flags);
	list_for_each_entry(vmdev, &bus->devices, node)
		n++;
	devs = kcalloc(max(n, 1U), sizeof(*devs), GFP_ATOMIC);
	n = 0;
	list_for_each_entry(vmdev, &bus->devices, node) {
		if (!vmdev->stale)
			vmsg_device_gone(vmdev);
		if (devs) {
			get_device(&vmdev->vdev.dev);
			devs[n++] = vmdev;
		}
	}
	spin_unlock_irqrestore(&bus->dev_lock, flags);
	mutex_unlock(&bus->req_lock);
	schedule_work(&bus->sweep_work);
	if (ret) {
		dev_err(bus->dev, "virtio-msg: device side restarted (epoch %u -> %u) with an incompatible message memory: bus stays down\n",
			old, now);
	} else if (!devs) {
		dev_err(bus->dev, "virtio-msg: device side restarted (epoch %u -> %u): out of memory, devices not reset\n",
			old, now);
	} else {
		dev_info(bus->dev, "virtio-msg: device side restarted (epoch %u -> %u): resetting and re-probing %u devices\n",
			 old, now, n);
	}
	for (i = 0; i < n; i++) {
		if (!ret && !READ_ONCE(bus->closing))
			vmsg_device_reprobe(devs[i]);
		put_device(&devs[i]->vdev.dev);
	}
	kfree(devs);
}

/* Liveness: a new epoch, queues whose buffers make no progress (PING), stragglers. */
static void vmsg_watch(struct work_struct *work)
{
	struct vmsg_bus *bus = container_of(to_delayed_work(work), struct vmsg_bus, watch);
	struct vmsg_device *vmdev;
	bool stalled = false, gone, stale = false;
	unsigned long flags;

	if (READ_ONCE(bus->closing))
		return;
	spin_lock_irqsave(&bus->tx_lock, flags);
	gone = bus->dead || bus->broken;
	spin_unlock_irqrestore(&bus->tx_lock, flags);
	spin_lock_irqsave(&bus->dev_lock, flags);
	list_for_each_entry(vmdev, &bus->devices, node) {
		stale |= vmdev->stale;
		if (!gone && !vmdev->stale)
			stalled |= vmsg_device_stalled(vmdev);
	}
	spin_unlock_irqrestore(&bus->dev_lock, flags);
	if (vmsg_epoch_changed(bus))
		vmsg_kick_reset(bus);
	else if (gone || stale)
		schedule_work(&bus->sweep_work);
	else if (stalled && vmsg_ping(bus) == -ETIMEDOUT)
		dev_err(bus->dev, "virtio-msg: queues with buffers made no progress for %u ms and PING went unanswered\n",
			watch_ms);
	if (!READ_ONCE(bus->closing))
		schedule_delayed_work(&bus->watch, msecs_to_jiffies(watch_ms));
}

/* No more work after this: teardown (platform remove, then PCI remove). */
void vmsg_bus_quiesce(struct vmsg_bus *bus)
{
	WRITE_ONCE(bus->closing, true);
	cancel_delayed_work_sync(&bus->watch);
	cancel_work_sync(&bus->reset_work);
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
	struct vmsg_bus *bus = container_of(ref, struct vmsg_bus, ref);

	cancel_work_sync(&bus->sweep_work);
	kfree(bus);
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
	bus->mem_len = len;
	return 0;
}

/*
 * The device side may start after us (a service VM that boots late): all-zero memory means
 * "not laid out yet", so wait up to timeout_ms for the magic; anything else is checked now.
 */
static int vmsg_wait_header(struct vmsg_bus *bus, size_t len)
{
	const struct vmsg_mem_header *mh = bus->mem;
	unsigned int wait_ms = bus->header_ms ?: timeout_ms;
	unsigned long deadline = jiffies + msecs_to_jiffies(wait_ms);

	while (!READ_ONCE(mh->magic)) {
		if (time_after(jiffies, deadline)) {
			dev_err(bus->dev, "virtio-msg: no message memory header within %u ms: device side (back-end or service VM) not running? bus not created\n",
				wait_ms);
			return -ETIMEDOUT;
		}
		msleep(20);
	}
	/* Acquire: the header's other fields are read after the magic that publishes them. */
	smp_rmb();
	return vmsg_check_header(bus, len);
}

/* Common set-up of a bus whose message memory is mapped at mem: waits for the header. */
int vmsg_bus_init(struct vmsg_bus *bus, struct device *dev, void *mem, size_t len)
{
	int ret;

	kref_init(&bus->ref);
	bus->dev = dev;
	bus->mem = mem;
	spin_lock_init(&bus->tx_lock);
	spin_lock_init(&bus->rx_lock);
	spin_lock_init(&bus->dev_lock);
	mutex_init(&bus->req_lock);
	init_completion(&bus->done);
	INIT_LIST_HEAD(&bus->devices);
	timer_setup(&bus->poll_timer, vmsg_poll, 0);
	INIT_WORK(&bus->reset_work, vmsg_reset_work);
	INIT_WORK(&bus->sweep_work, vmsg_sweep);
	INIT_DELAYED_WORK(&bus->watch, vmsg_watch);
	ret = vmsg_wait_header(bus, len);
	if (ret)
		return ret;
	bus->epoch = vmsg_header_epoch(bus);
	return 0;
}

/* The bus is wired to its doorbell: start the liveness watch. */
void vmsg_bus_start(struct vmsg_bus *bus)
{
	schedule_delayed_work(&bus->watch, msecs_to_jiffies(watch_ms));
}

static int vmsg_pci_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	resource_size_t start = pci_resource_start(pdev, 2), len = pci_resource_len(pdev, 2);
	struct vmsg_bus *bus;
	void *mem;
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
	bus->regs = pcim_iomap_table(pdev)[0];
	/* Normal cacheable memory: the peer is another CPU, not a device. */
	mem = devm_memremap(&pdev->dev, start, len, MEMREMAP_WB);
	if (IS_ERR(mem)) {
		ret = PTR_ERR(mem);
		goto free;
	}
	ret = vmsg_bus_init(bus, &pdev->dev, mem, len);
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
	vmsg_bus_start(bus);
	dev_info(&pdev->dev, "virtio-msg bus: %u slots per direction, we are peer %u, device side peer %u, epoch %u, %s\n",
		 bus->nslots, bus->own_id, bus->device_peer, bus->epoch,
		 bus->polling ? "polling" : "MSI-X");
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
	vmsg_bus_quiesce(bus);
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
	cancel_work_sync(&bus->reset_work);	/* the IRQ may have queued one meanwhile */
	cancel_work_sync(&bus->sweep_work);
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
