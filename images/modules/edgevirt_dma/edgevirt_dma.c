// SPDX-License-Identifier: GPL-2.0
/*
 * edgevirt_dma: report, from inside the guest, where each virtio device does its DMA.
 *
 * /proc/edgevirt-dma has one line per virtio device and one per virtqueue:
 *
 *   dev virtio0 parent=a003e00.virtio_mmio id=2 version_1=1 access_platform=1
 *       pool=restricted start=0x5c000000 end=0x60000000
 *   vq virtio0 0 name=requests size=128 desc=0x5c000000 avail=0x5c000800 used=0x5c000a00
 *       in_pool=1
 *
 * The host's smoke suite reads it to prove that every ring lies inside the carve-out,
 * without trusting the kernel log. The virtio bus is not exported, so devices are found as
 * children of platform devices (virtio-mmio) whose bus is named "virtio".
 */
#include <linux/device.h>
#include <linux/dma-map-ops.h>
#include <linux/module.h>
#include <linux/of.h>
#include <linux/of_address.h>
#include <linux/platform_device.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/swiotlb.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>

#define EV_PROC_NAME "edgevirt-dma"

/* The DMA window of a device: a restricted pool, or (Xen) the carve-out the virtio-msg
 * module confines DMA to with its own ops, reg[1] of its bus node. */
struct ev_window {
	u64 start, end;
	const char *kind;
};

static bool ev_in_pool(const struct ev_window *w, u64 addr, u64 len)
{
	return w->kind && addr >= w->start && len <= w->end - w->start &&
	       addr - w->start <= w->end - w->start - len;
}

static void ev_carveout_window(struct device *parent, struct ev_window *w)
{
	struct resource res;

	if (parent->of_node &&
	    of_device_is_compatible(parent->of_node, "edgevirt,virtio-msg") &&
	    of_property_match_string(parent->of_node, "edgevirt,doorbell", "xen-evtchn") >= 0 &&
	    !of_address_to_resource(parent->of_node, 1, &res) && get_dma_ops(parent)) {
		w->start = res.start;
		w->end = res.end + 1;
		w->kind = "carveout-ops";
	}
}

static void ev_show_vq(struct seq_file *m, struct virtio_device *vdev,
		       struct virtqueue *vq, const struct ev_window *mem)
{
	unsigned int size = virtqueue_get_vring_size(vq);
	dma_addr_t desc = virtqueue_get_desc_addr(vq);
	dma_addr_t avail = virtqueue_get_avail_addr(vq);
	dma_addr_t used = virtqueue_get_used_addr(vq);
	/* Split ring sizes (virtio 1.x 2.7): 16 B per desc, avail 6 + 2n, used 6 + 8n. */
	bool in = ev_in_pool(mem, desc, 16ULL * size) &&
		  ev_in_pool(mem, avail, 6ULL + 2ULL * size) &&
		  ev_in_pool(mem, used, 6ULL + 8ULL * size);

	seq_printf(m, "vq %s %u name=%s size=%u desc=%#llx avail=%#llx used=%#llx in_pool=%d\n",
		   dev_name(&vdev->dev), vq->index, vq->name, size, (u64)desc, (u64)avail,
		   (u64)used, in);
}

static int ev_show_child(struct device *child, void *data)
{
	struct seq_file *m = data;
	struct virtio_device *vdev;
	struct device *parent = child->parent;
	struct io_tlb_mem *mem = NULL;
	struct ev_window w = { 0 };
	struct virtqueue *vq;

	if (!child->bus || strcmp(child->bus->name, "virtio"))
		return 0;
	vdev = dev_to_virtio(child);
#ifdef CONFIG_DMA_RESTRICTED_POOL
	/* "Not for driver use": read-only here, to say which pool the rings came from. */
	mem = parent->dma_io_tlb_mem;
	if (mem && !mem->for_alloc)
		mem = NULL; /* the global bounce buffer, not a restricted pool */
#endif
	if (mem) {
		w.start = mem->start;
		w.end = mem->end;
		w.kind = "restricted";
	} else {
		ev_carveout_window(parent, &w);
	}
	seq_printf(m, "dev %s parent=%s id=%u version_1=%d access_platform=%d pool=%s",
		   dev_name(child), dev_name(parent), vdev->id.device,
		   virtio_has_feature(vdev, VIRTIO_F_VERSION_1),
		   virtio_has_feature(vdev, VIRTIO_F_ACCESS_PLATFORM),
		   w.kind ?: "none");
	if (w.kind)
		seq_printf(m, " start=%#llx end=%#llx", w.start, w.end);
	seq_putc(m, '\n');
	list_for_each_entry(vq, &vdev->vqs, list)
		ev_show_vq(m, vdev, vq, &w);
	return 0;
}

static int ev_show_platform(struct device *dev, void *data)
{
	return device_for_each_child(dev, data, ev_show_child);
}

static int ev_show(struct seq_file *m, void *v)
{
	return bus_for_each_dev(&platform_bus_type, NULL, m, ev_show_platform);
}

static int __init ev_init(void)
{
	if (!proc_create_single(EV_PROC_NAME, 0444, NULL, ev_show))
		return -ENOMEM;
	pr_info("edgevirt_dma: /proc/" EV_PROC_NAME " ready\n");
	return 0;
}

static void __exit ev_exit(void)
{
	remove_proc_entry(EV_PROC_NAME, NULL);
}

module_init(ev_init);
module_exit(ev_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("edgevirt");
MODULE_DESCRIPTION("Report each virtio device's DMA pool and ring addresses");
