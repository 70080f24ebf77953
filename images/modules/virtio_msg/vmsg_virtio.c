// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-msg transport: one virtio_device per device on the bus, config ops as messages.
 *
 * The "edgevirt,virtio-msg" DT node (devicetree/bindings/edgevirt,virtio-msg.yaml) is the
 * platform device every virtio device of the bus hangs from. Its memory-region is the
 * carve-out's restricted-dma-pool, so the platform core gives this device the pool and
 * every vring and buffer (DMA through the parent, as ACCESS_PLATFORM is negotiated) lands
 * in the carve-out, the only memory the back-end can see.
 *
 * Config reads and writes, status, features and queue setup are requests (they sleep);
 * a kick is an EVENT_AVAIL; the device side's EVENT_USED runs the queue's callback.
 *
 * When the device side is gone, a device's queues become "stale": the buffers on them are
 * completed here with zero length (virtio-blk: status VIRTIO_BLK_S_IOERR written into the
 * request's status byte), so the driver fails them instead of waiting forever. When the
 * device side is back (new epoch), each device is reset and its driver re-probed.
 */
#include <linux/dma-direct.h>
#include <linux/dma-mapping.h>
#include <linux/module.h>
#include <linux/of.h>
#include <linux/of_reserved_mem.h>
#include <linux/platform_device.h>
#include <linux/slab.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ids.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_ring.h>
#include <asm/unaligned.h>

#include "vmsg.h"

#define VMSG_VENDOR_QUEUE_MAX	256
#define VMSG_MAX_DEVICES	64

struct vmsg_platform {
	struct vmsg_bus *bus;
	bool xen;		/* the bus is this node's own (Xen), not the ivshmem device's */
	phys_addr_t pool_base;	/* carve-out without a reserved-memory node (Xen) */
	size_t pool_size;
	void *pool_va;
	unsigned int count;
	struct vmsg_device *devs[VMSG_MAX_DEVICES];
};

static struct vmsg_device *to_vmsg(struct virtio_device *vdev)
{
	return container_of(vdev, struct vmsg_device, vdev);
}

static int vmsg_req(struct vmsg_device *vmdev, u8 msg_id, const void *req, u16 req_len,
		    void *ans, u16 ans_min, u16 ans_max)
{
	return vmsg_request(vmdev->bus, vmdev->dev_num, msg_id, req, req_len, ans, ans_min,
			    ans_max);
}

/* Called by the bus with dev_lock held, from its interrupt or poll timer. */
void vmsg_device_event(struct vmsg_device *vmdev, u8 msg_id, const u8 *payload, u16 len)
{
	u32 index;

	if (msg_id == VIRTIO_MSG_EVENT_USED && len >= 4) {
		index = get_unaligned_le32(payload);
		if (vmdev->vqs && index < vmdev->max_vqs && vmdev->vqs[index])
			vring_interrupt(0, vmdev->vqs[index]);
	} else if (msg_id == VIRTIO_MSG_EVENT_CONFIG && len >= 16) {
		WRITE_ONCE(vmdev->generation, get_unaligned_le32(payload + 4));
		virtio_config_changed(&vmdev->vdev);
	}
}

static u64 vmsg_get_features(struct virtio_device *vdev)
{
	struct vmsg_device *vmdev = to_vmsg(vdev);
	__le32 req[2] = { cpu_to_le32(0), cpu_to_le32(2) };
	__le32 ans[4];

	if (vmsg_req(vmdev, VIRTIO_MSG_GET_DEVICE_FEATURES, req, sizeof(req), ans, sizeof(ans),
		     sizeof(ans)) < 0)
		return 0;
	return le32_to_cpu(ans[2]) | (u64)le32_to_cpu(ans[3]) << 32;
}

static int vmsg_finalize_features(struct virtio_device *vdev)
{
	struct vmsg_device *vmdev = to_vmsg(vdev);
	__le32 req[4];
	int ret;

	vring_transport_features(vdev);
	if (!__virtio_test_bit(vdev, VIRTIO_F_VERSION_1)) {
		dev_err(&vdev->dev, "virtio-msg: device %u does not offer VERSION_1\n",
			vmdev->dev_num);
		return -EINVAL;
	}
	req[0] = cpu_to_le32(0);
	req[1] = cpu_to_le32(2);
	req[2] = cpu_to_le32(lower_32_bits(vdev->features));
	req[3] = cpu_to_le32(upper_32_bits(vdev->features));
	ret = vmsg_req(vmdev, VIRTIO_MSG_SET_DRIVER_FEATURES, req, sizeof(req), NULL, 0, 0);
	return ret < 0 ? ret : 0;
}

static void vmsg_get(struct virtio_device *vdev, unsigned int offset, void *buf,
		     unsigned int len)
{
	struct vmsg_device *vmdev = to_vmsg(vdev);
	__le32 req[2] = { cpu_to_le32(offset), cpu_to_le32(len) };
	u8 ans[VMSG_MAX_PAYLOAD];
	int n;

	memset(buf, 0, len);
	if (len > VMSG_MAX_PAYLOAD - 12)
		return;
	n = vmsg_req(vmdev, VIRTIO_MSG_GET_CONFIG, req, sizeof(req), ans, 12, 12 + len);
	if (n < 0)
		return;
	WRITE_ONCE(vmdev->generation, get_unaligned_le32(ans));
	if (get_unaligned_le32(ans + 8) != len || n != 12 + len) {
		dev_warn_ratelimited(&vdev->dev, "virtio-msg: config read of %u bytes at %u answered with %u\n",
				     len, offset, get_unaligned_le32(ans + 8));
		return;
	}
	memcpy(buf, ans + 12, len);
}

static void vmsg_set(struct virtio_device *vdev, unsigned int offset, const void *buf,
		     unsigned int len)
{
	struct vmsg_device *vmdev = to_vmsg(vdev);
	u8 req[VMSG_MAX_PAYLOAD], ans[VMSG_MAX_PAYLOAD];
	int n;

	if (len > VMSG_MAX_PAYLOAD - 12)
		return;
	put_unaligned_le32(READ_ONCE(vmdev->generation), req);
	put_unaligned_le32(offset, req + 4);
	put_unaligned_le32(len, req + 8);
	memcpy(req + 12, buf, len);
	n = vmsg_req(vmdev, VIRTIO_MSG_SET_CONFIG, req, 12 + len, ans, 12, 12 + len);
	if (n < 0)
		return;
	WRITE_ONCE(vmdev->generation, get_unaligned_le32(ans));
	if (!get_unaligned_le32(ans + 8))
		dev_warn_ratelimited(&vdev->dev, "virtio-msg: config write of %u bytes at %u rejected (generation changed?)\n",
				     len, offset);
}

static u32 vmsg_generation(struct virtio_device *vdev)
{
	/* Refreshed by every config answer: virtio_cread's retry loop converges on it. */
	return READ_ONCE(to_vmsg(vdev)->generation);
}

static u8 vmsg_get_status(struct virtio_device *vdev)
{
	__le32 ans;

	if (vmsg_req(to_vmsg(vdev), VIRTIO_MSG_GET_DEVICE_STATUS, NULL, 0, &ans, 4, 4) < 0)
		return VIRTIO_CONFIG_S_FAILED;
	return le32_to_cpu(ans);
}

static void vmsg_set_status(struct virtio_device *vdev, u8 status)
{
	__le32 req = cpu_to_le32(status), ans;

	vmsg_req(to_vmsg(vdev), VIRTIO_MSG_SET_DEVICE_STATUS, &req, 4, &ans, 4, 4);
}

static void vmsg_reset(struct virtio_device *vdev)
{
	struct vmsg_device *vmdev = to_vmsg(vdev);
	__le32 req = 0, ans;

	if (vmsg_req(vmdev, VIRTIO_MSG_SET_DEVICE_STATUS, &req, 4, &ans, 4, 4) == 4 && ans)
		dev_warn(&vdev->dev, "virtio-msg: device %u status %#x after reset\n",
			 vmdev->dev_num, le32_to_cpu(ans));
}

static bool vmsg_notify(struct virtqueue *vq)
{
	struct vmsg_device *vmdev = to_vmsg(vq->vdev);
	int ret;

	/* Stale or gone: the sweep fails the buffer. Returning false would break the queue
	 * and strand the buffer (a broken queue hands nothing back), so say "notified". */
	if (READ_ONCE(vmdev->stale)) {
		vmsg_bus_sweep_now(vmdev->bus);
		return true;
	}
	ret = vmsg_event_avail(vmdev->bus, vmdev, vq->index);
	if (ret == -ENODEV)
		vmsg_bus_sweep_now(vmdev->bus);
	return ret != -EAGAIN;
}

/* ---- the device side is gone: fail buffers, detect stalls, re-probe ---------------- */

/* CPU address of driver-owned memory the device side may also see: the pool only. */
static void *vmsg_guest_ptr(struct vmsg_device *vmdev, u64 dma, u32 len)
{
	phys_addr_t pa = dma_to_phys(vmdev->vdev.dev.parent, dma);

	if (!len || pa + len < pa)
		return NULL;
	if (vmdev->pool_size) {
		if (pa < vmdev->pool_base || pa + len > vmdev->pool_base + vmdev->pool_size)
			return NULL;
		if (vmdev->pool_va)	/* a passthrough region: not in the linear map */
			return vmdev->pool_va + (pa - vmdev->pool_base);
	} else if (!pfn_valid(PHYS_PFN(pa)) || !pfn_valid(PHYS_PFN(pa + len - 1))) {
		return NULL;
	}
	return phys_to_virt(pa);
}

/*
 * virtio-blk: the status byte is the last byte of the chain's last device-writable
 * buffer; make it VIRTIO_BLK_S_IOERR. The descriptors sit in shared memory: every index,
 * length and address is checked, and the walk is bounded.
 */
static void vmsg_fail_blk_chain(struct vmsg_device *vmdev, const struct vring *vr, u16 head)
{
	const struct vring_desc *tbl = vr->desc;
	u32 n = vr->num, i = head, steps;
	u64 addr = 0;
	u32 len = 0;
	u8 *status;

	for (steps = 0; steps < vr->num + 1024 && i < n; steps++) {
		u16 flags = le16_to_cpu(READ_ONCE(tbl[i].flags));
		u64 a = le64_to_cpu(READ_ONCE(tbl[i].addr));
		u32 l = le32_to_cpu(READ_ONCE(tbl[i].len));

		if (flags & VRING_DESC_F_INDIRECT) {
			if (tbl != vr->desc || !l || l % sizeof(*tbl) || l / sizeof(*tbl) > 1024)
				return;
			tbl = vmsg_guest_ptr(vmdev, a, l);
			if (!tbl)
				return;
			n = l / sizeof(*tbl);
			i = 0;
			continue;
		}
		if (flags & VRING_DESC_F_WRITE) {
			addr = a;
			len = l;
		}
		if (!(flags & VRING_DESC_F_NEXT))
			break;
		i = le16_to_cpu(READ_ONCE(tbl[i].next));
	}
	status = len ? vmsg_guest_ptr(vmdev, addr + len - 1, 1) : NULL;
	if (status)
		WRITE_ONCE(*status, VIRTIO_BLK_S_IOERR);
}

/* The device side is gone: from now on this device's buffers fail. dev_lock held. */
void vmsg_device_gone(struct vmsg_device *vmdev)
{
	vmdev->stale = true;
	dev_err(&vmdev->vdev.dev, "virtio-msg: device %u (%s, virtio id %u): device side gone: its requests fail with I/O errors until the device side restarts\n",
		vmdev->dev_num, dev_name(&vmdev->vdev.dev), vmdev->vdev.id.device);
}

/*
 * Complete every buffer the driver made available and the device side never used, with
 * length 0, as the device would: used entries for avail[used.idx .. avail.idx) (the
 * device side completes in order), then the used index, then the driver's callback.
 * dev_lock held (EVENT_USED delivery holds it too; del_vqs clears vqs[] under it first).
 */
unsigned int vmsg_device_sweep(struct vmsg_device *vmdev)
{
	unsigned int q, k, total = 0;

	if (!vmdev->vqs)
		return 0;
	for (q = 0; q < vmdev->max_vqs; q++) {
		struct virtqueue *vq = vmdev->vqs[q];
		const struct vring *vr;
		u16 avail, used, pending, head;

		if (!vq)
			continue;
		vr = virtqueue_get_vring(vq);
		avail = le16_to_cpu(READ_ONCE(vr->avail->idx));
		used = le16_to_cpu(READ_ONCE(vr->used->idx));
		smp_rmb();	/* avail ring entries after the index that published them */
		pending = avail - used;
		if (pending > vr->num) {
			dev_err_ratelimited(&vmdev->vdev.dev, "virtio-msg: device %u queue %u: avail %u, used %u: more than %u in flight, cannot fail them\n",
					    vmdev->dev_num, q, avail, used, vr->num);
			continue;
		}
		for (k = 0; k < pending; k++) {
			u16 at = (u16)(used + k) % vr->num;

			head = le16_to_cpu(READ_ONCE(vr->avail->ring[at]));
			if (head >= vr->num)
				break;
			if (vmdev->vdev.id.device == VIRTIO_ID_BLOCK)
				vmsg_fail_blk_chain(vmdev, vr, head);
			vr->used->ring[at].id = cpu_to_le32(head);
			vr->used->ring[at].len = 0;
		}
		/* Ask for a kick at every new buffer (EVENT_IDX), and interrupts stay on. */
		WRITE_ONCE(vring_avail_event(vr), cpu_to_le16(avail));
		WRITE_ONCE(vr->used->flags, 0);
		if (!k) {
			/* Nothing to fail, but the device side may have published used entries
			 * and died before its EVENT_USED: without this call their requests wait
			 * forever (and a driver's remove waits for them). No-op when none. */
			vring_interrupt(0, vq);
			continue;
		}
		/* Release: entries (and status bytes) before the index that hands them back. */
		smp_wmb();
		WRITE_ONCE(vr->used->idx, cpu_to_le16(used + k));
		vmdev->failed += k;
		total += k;
		dev_warn_ratelimited(&vmdev->vdev.dev, "virtio-msg: device %u (%s) queue %u: %u in-flight buffers failed (device side gone)\n",
				     vmdev->dev_num, dev_name(&vmdev->vdev.dev), q, k);
		vring_interrupt(0, vq);
	}
	return total;
}

/*
 * Queues holding buffers whose used index did not move since the last tick: the device
 * side may be dead without a request to time out. dev_lock held.
 */
bool vmsg_device_stalled(struct vmsg_device *vmdev)
{
	bool stalled = false;
	unsigned int q;

	if (!vmdev->vqs)
		return false;
	for (q = 0; q < vmdev->max_vqs; q++) {
		const struct vring *vr;
		u16 avail, used;
		u32 now;

		if (!vmdev->vqs[q])
			continue;
		vr = virtqueue_get_vring(vmdev->vqs[q]);
		avail = le16_to_cpu(READ_ONCE(vr->avail->idx));
		used = le16_to_cpu(READ_ONCE(vr->used->idx));
		now = used | (avail != used ? BIT(16) : 0);
		if (avail != used && vmdev->watch[q] == now)
			stalled = true;
		vmdev->watch[q] = now;
	}
	return stalled;
}

/* A new device side: reset the device and run its driver's probe again. No locks held. */
void vmsg_device_reprobe(struct vmsg_device *vmdev)
{
	struct virtio_device *vdev = &vmdev->vdev;
	int ret;

	dev_info(&vdev->dev, "virtio-msg: device %u (%s): reset, re-probing its driver\n",
		 vmdev->dev_num, dev_name(&vdev->dev));
	ret = device_reprobe(&vdev->dev);
	if (ret || !vdev->dev.driver)
		dev_err(&vdev->dev, "virtio-msg: device %u (%s): re-probe failed (%d): device not reconnected\n",
			vmdev->dev_num, dev_name(&vdev->dev), ret);
	else
		dev_info(&vdev->dev, "virtio-msg: device %u (%s): reconnected, driver %s\n",
			 vmdev->dev_num, dev_name(&vdev->dev), vdev->dev.driver->name);
}

static void vmsg_del_vqs(struct virtio_device *vdev)
{
	struct vmsg_device *vmdev = to_vmsg(vdev);
	struct vmsg_bus *bus = vmdev->bus;
	struct virtqueue *vq, *n;
	unsigned long flags;

	spin_lock_irqsave(&bus->dev_lock, flags);	/* no EVENT_USED reaches them after this */
	if (vmdev->vqs)
		memset(vmdev->vqs, 0, vmdev->max_vqs * sizeof(*vmdev->vqs));
	spin_unlock_irqrestore(&bus->dev_lock, flags);
	list_for_each_entry_safe(vq, n, &vdev->vqs, list)
		vring_del_virtqueue(vq);
}

static struct virtqueue *vmsg_setup_vq(struct vmsg_device *vmdev, unsigned int index,
				       vq_callback_t *callback, const char *name, bool ctx)
{
	__le32 req = cpu_to_le32(index);
	struct {
		__le32 index, max_size, size, reserved;
		__le64 desc, driver, device;
	} __packed vq_info;
	struct vmsg_bus *bus = vmdev->bus;
	struct virtqueue *vq;
	unsigned long flags;
	u32 max;
	int ret;

	if (index >= vmdev->max_vqs)
		return ERR_PTR(-ENOENT);
	ret = vmsg_req(vmdev, VIRTIO_MSG_GET_VQUEUE, &req, 4, &vq_info, sizeof(vq_info),
		       sizeof(vq_info));
	if (ret < 0)
		return ERR_PTR(ret);
	max = le32_to_cpu(vq_info.max_size);
	if (!max)
		return ERR_PTR(-ENOENT);
	vq = vring_create_virtqueue(index, min_t(u32, max, VMSG_VENDOR_QUEUE_MAX), PAGE_SIZE,
				    &vmdev->vdev, true, true, ctx, vmsg_notify, callback, name);
	if (!vq)
		return ERR_PTR(-ENOMEM);
	memset(&vq_info, 0, sizeof(vq_info));
	vq_info.index = cpu_to_le32(index);
	vq_info.size = cpu_to_le32(virtqueue_get_vring_size(vq));
	vq_info.desc = cpu_to_le64(virtqueue_get_desc_addr(vq));
	vq_info.driver = cpu_to_le64(virtqueue_get_avail_addr(vq));
	vq_info.device = cpu_to_le64(virtqueue_get_used_addr(vq));
	ret = vmsg_req(vmdev, VIRTIO_MSG_SET_VQUEUE, &vq_info, sizeof(vq_info), NULL, 0, 0);
	if (ret < 0) {
		vring_del_virtqueue(vq);
		return ERR_PTR(ret);
	}
	spin_lock_irqsave(&bus->dev_lock, flags);
	vmdev->vqs[index] = vq;
	vmdev->avail_sent[index] = false;
	vmdev->watch[index] = 0;
	spin_unlock_irqrestore(&bus->dev_lock, flags);
	return vq;
}

static int vmsg_find_vqs(struct virtio_device *vdev, unsigned int nvqs, struct virtqueue *vqs[],
			 vq_callback_t *callbacks[], const char * const names[], const bool *ctx,
			 struct irq_affinity *desc)
{
	struct vmsg_device *vmdev = to_vmsg(vdev);
	struct vmsg_bus *bus = vmdev->bus;
	unsigned int i, index = 0;
	unsigned long flags;

	/* Queues created now belong to the device side that answers now. */
	spin_lock_irqsave(&bus->dev_lock, flags);
	if (vmdev->stale && !bus->dead && !bus->broken) {
		vmdev->stale = false;
		if (vmdev->failed)
			dev_info(&vdev->dev, "virtio-msg: device %u (%s): fresh queues; %lu buffers were failed while the device side was gone\n",
				 vmdev->dev_num, dev_name(&vdev->dev), vmdev->failed);
	}
	spin_unlock_irqrestore(&bus->dev_lock, flags);
	for (i = 0; i < nvqs; i++) {
		if (!names[i]) {
			vqs[i] = NULL;
			continue;
		}
		vqs[i] = vmsg_setup_vq(vmdev, index++, callbacks[i], names[i], ctx && ctx[i]);
		if (IS_ERR(vqs[i])) {
			int ret = PTR_ERR(vqs[i]);

			dev_err(&vdev->dev, "virtio-msg: device %u queue %u setup failed: %d\n",
				vmdev->dev_num, index - 1, ret);
			vmsg_del_vqs(vdev);
			return ret;
		}
	}
	return 0;
}

static const char *vmsg_bus_name(struct virtio_device *vdev)
{
	return "virtio-msg";
}

static const struct virtio_config_ops vmsg_config_ops = {
	.get = vmsg_get,
	.set = vmsg_set,
	.generation = vmsg_generation,
	.get_status = vmsg_get_status,
	.set_status = vmsg_set_status,
	.reset = vmsg_reset,
	.find_vqs = vmsg_find_vqs,
	.del_vqs = vmsg_del_vqs,
	.get_features = vmsg_get_features,
	.finalize_features = vmsg_finalize_features,
	.bus_name = vmsg_bus_name,
};

static void vmsg_release(struct device *dev)
{
	struct vmsg_device *vmdev = to_vmsg(dev_to_virtio(dev));

	kfree(vmdev->vqs);
	kfree(vmdev->avail_pos);
	kfree(vmdev->avail_sent);
	kfree(vmdev->watch);
	kfree(vmdev);
}

static void vmsg_unlink(struct vmsg_device *vmdev)
{
	unsigned long flags;

	spin_lock_irqsave(&vmdev->bus->dev_lock, flags);
	list_del(&vmdev->node);
	vmdev->bus->total_vqs -= vmdev->max_vqs;
	spin_unlock_irqrestore(&vmdev->bus->dev_lock, flags);
}

/* The carve-out pool (memory-region) of the bus node: where a sweep may write. */
static void vmsg_pool_bounds(struct platform_device *pdev, phys_addr_t *base, size_t *size)
{
	struct device_node *mr = of_parse_phandle(pdev->dev.of_node, "memory-region", 0);
	struct reserved_mem *rmem = mr ? of_reserved_mem_lookup(mr) : NULL;

	of_node_put(mr);
	*base = rmem ? rmem->base : 0;
	*size = rmem ? rmem->size : 0;
}

/* Ask the device side what dev_num is, and register it as a virtio device. */
static struct vmsg_device *vmsg_add(struct platform_device *pdev, struct vmsg_platform *vp,
				    u16 dev_num, u32 dt_id)
{
	struct vmsg_bus *bus = vp->bus;
	struct {
		__le32 device_id, vendor_id, feature_bits, config_size, max_vqs;
		__le16 admin_start, admin_count;
	} __packed info;
	struct vmsg_device *vmdev;
	unsigned long flags;
	u32 nvqs;
	int ret;

	ret = vmsg_request(bus, dev_num, VIRTIO_MSG_GET_DEVICE_INFO, NULL, 0, &info,
			   sizeof(info), sizeof(info));
	if (ret < 0)
		return ERR_PTR(ret);
	if (!info.device_id) {
		dev_warn(&pdev->dev, "virtio-msg: device %u is not present on the device side\n",
			 dev_num);
		return NULL;
	}
	if (le32_to_cpu(info.device_id) != dt_id)
		dev_warn(&pdev->dev, "virtio-msg: device %u is virtio id %u, the device tree says %u\n",
			 dev_num, le32_to_cpu(info.device_id), dt_id);
	nvqs = le32_to_cpu(info.max_vqs);
	/* Each queue may hold one EVENT_AVAIL in the ring; one slot stays for a request. */
	if (!nvqs || bus->total_vqs + nvqs > bus->nslots - 1) {
		dev_err(&pdev->dev, "virtio-msg: device %u has %u queues; the bus has room for %u more\n",
			dev_num, nvqs, bus->nslots - 1 - bus->total_vqs);
		return ERR_PTR(-ENOSPC);
	}
	vmdev = kzalloc(sizeof(*vmdev), GFP_KERNEL);
	if (!vmdev)
		return ERR_PTR(-ENOMEM);
	vmdev->vqs = kcalloc(nvqs, sizeof(*vmdev->vqs), GFP_KERNEL);
	vmdev->avail_pos = kcalloc(nvqs, sizeof(*vmdev->avail_pos), GFP_KERNEL);
	vmdev->avail_sent = kcalloc(nvqs, sizeof(*vmdev->avail_sent), GFP_KERNEL);
	vmdev->watch = kcalloc(nvqs, sizeof(*vmdev->watch), GFP_KERNEL);
	if (!vmdev->vqs || !vmdev->avail_pos || !vmdev->avail_sent || !vmdev->watch) {
		kfree(vmdev->vqs);
		kfree(vmdev->avail_pos);
		kfree(vmdev->avail_sent);
		kfree(vmdev->watch);
		kfree(vmdev);
		return ERR_PTR(-ENOMEM);
	}
	vmdev->bus = bus;
	vmdev->dev_num = dev_num;
	if (vp->xen) {
		vmdev->pool_base = vp->pool_base;
		vmdev->pool_size = vp->pool_size;
		vmdev->pool_va = vp->pool_va;
	} else {
		vmsg_pool_bounds(pdev, &vmdev->pool_base, &vmdev->pool_size);
	}
	vmdev->max_vqs = nvqs;
	vmdev->vdev.id.device = le32_to_cpu(info.device_id);
	vmdev->vdev.id.vendor = le32_to_cpu(info.vendor_id);
	vmdev->vdev.config = &vmsg_config_ops;
	vmdev->vdev.dev.parent = &pdev->dev;	/* DMA goes through the pool-backed parent */
	vmdev->vdev.dev.release = vmsg_release;
	spin_lock_irqsave(&bus->dev_lock, flags);
	list_add_tail(&vmdev->node, &bus->devices);
	bus->total_vqs += nvqs;
	spin_unlock_irqrestore(&bus->dev_lock, flags);
	ret = register_virtio_device(&vmdev->vdev);
	if (ret) {
		dev_err(&pdev->dev, "virtio-msg: registering device %u failed: %d\n", dev_num, ret);
		vmsg_unlink(vmdev);
		put_device(&vmdev->vdev.dev);
		return ERR_PTR(ret);
	}
	dev_info(&pdev->dev, "virtio-msg: device %u: virtio id %u, %u queues, %s\n", dev_num,
		 vmdev->vdev.id.device, nvqs, dev_name(&vmdev->vdev.dev));
	return vmdev;
}

static int vmsg_platform_probe(struct platform_device *pdev)
{
	struct device_node *np = pdev->dev.of_node;
	struct vmsg_platform *vp;
	struct vmsg_device *vmdev;
	u32 count, slots, slot_size, id;
	const char *role, *doorbell = NULL;
	unsigned int i;
	int ret;

	if (of_property_read_string(np, "edgevirt,role", &role) || strcmp(role, "frontend"))
		return -ENODEV;	/* the back-end side's node: not ours */
	if (of_property_read_u32(np, "edgevirt,device-count", &count) || !count ||
	    count > VMSG_MAX_DEVICES ||
	    of_property_count_u32_elems(np, "edgevirt,device-ids") != count ||
	    of_property_read_u32(np, "edgevirt,ring-slots", &slots) ||
	    of_property_read_u32(np, "edgevirt,slot-size", &slot_size)) {
		dev_err(&pdev->dev, "virtio-msg: %pOF: needs edgevirt,device-count (1..%u) with as many edgevirt,device-ids, edgevirt,ring-slots and edgevirt,slot-size\n",
			np, VMSG_MAX_DEVICES);
		return -EINVAL;
	}
	vp = devm_kzalloc(&pdev->dev, sizeof(*vp), GFP_KERNEL);
	if (!vp)
		return -ENOMEM;
	of_property_read_string(np, "edgevirt,doorbell", &doorbell);
	if (doorbell && !strcmp(doorbell, "xen-evtchn")) {
		vp->xen = true;
		ret = vmsg_xen_attach(pdev, &vp->bus, &vp->pool_base, &vp->pool_size,
				      &vp->pool_va);
		if (ret)
			return ret;
	} else {
		vp->bus = vmsg_bus_get();
		if (!vp->bus)
			return -EPROBE_DEFER;	/* the ivshmem device has not been probed yet */
	}
	if (slots != vp->bus->nslots || slot_size != VMSG_SLOT_SIZE) {
		dev_err(&pdev->dev, "virtio-msg: device tree says %u slots of %u bytes, the message memory has %u of %u\n",
			slots, slot_size, vp->bus->nslots, VMSG_SLOT_SIZE);
		ret = -EINVAL;
		goto put;
	}
	ret = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (ret)
		goto put;
	platform_set_drvdata(pdev, vp);
	for (i = 0; i < count; i++) {
		of_property_read_u32_index(np, "edgevirt,device-ids", i, &id);
		vmdev = vmsg_add(pdev, vp, i, id);
		if (IS_ERR(vmdev)) {
			ret = PTR_ERR(vmdev);
			if (ret == -ETIMEDOUT || ret == -ENODEV)
				break;	/* the device side is gone: do not wait for each device */
			continue;
		}
		if (vmdev)
			vp->devs[vp->count++] = vmdev;
	}
	if (!vp->count) {
		dev_err(&pdev->dev, "virtio-msg: no device came up (%d)\n", ret);
		ret = ret ? ret : -ENODEV;
		goto put;
	}
	return 0;
put:
	if (vp->xen)
		vmsg_xen_detach(pdev, vp->bus);
	vmsg_bus_put(vp->bus);
	return ret;
}

static int vmsg_platform_remove(struct platform_device *pdev)
{
	struct vmsg_platform *vp = platform_get_drvdata(pdev);
	struct vmsg_device *vmdev;
	unsigned int i;

	vmsg_bus_quiesce(vp->bus);	/* no restart re-probes a device going away */
	for (i = vp->count; i-- > 0;) {
		vmdev = vp->devs[i];
		/* Still on the bus while its driver goes: a stale queue must still be swept. */
		get_device(&vmdev->vdev.dev);
		unregister_virtio_device(&vmdev->vdev);
		vmsg_unlink(vmdev);
		put_device(&vmdev->vdev.dev);
	}
	if (vp->xen)
		vmsg_xen_detach(pdev, vp->bus);
	vmsg_bus_put(vp->bus);
	return 0;
}

static const struct of_device_id vmsg_of_ids[] = {
	{ .compatible = "edgevirt,virtio-msg" },
	{ }
};
MODULE_DEVICE_TABLE(of, vmsg_of_ids);

static struct platform_driver vmsg_platform_driver = {
	.driver = {
		.name = "edgevirt-virtio-msg",
		.of_match_table = vmsg_of_ids,
	},
	.probe = vmsg_platform_probe,
	.remove = vmsg_platform_remove,
};

static int __init vmsg_init(void)
{
	int ret = vmsg_pci_register();

	if (ret)
		return ret;
	ret = platform_driver_register(&vmsg_platform_driver);
	if (ret)
		vmsg_pci_unregister();
	return ret;
}

static void __exit vmsg_exit(void)
{
	platform_driver_unregister(&vmsg_platform_driver);
	vmsg_pci_unregister();
}

module_init(vmsg_init);
module_exit(vmsg_exit);
MODULE_DESCRIPTION("virtio-msg transport over ivshmem (edgevirt front-end)");
MODULE_LICENSE("GPL");
