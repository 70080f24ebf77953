// SPDX-License-Identifier: GPL-2.0
/*
 * DMA ops that confine a device's DMA to the carve-out, for guests whose device tree cannot
 * declare a restricted-dma-pool (a Xen dom0less domU: Xen builds its tree and takes only
 * /passthrough nodes from the partial DTB, never /reserved-memory).
 *
 * The carve-out is a passthrough region, not RAM: it is mapped here and handed to a
 * gen_pool. Coherent allocations (the vrings) come straight from it; streaming mappings
 * (every buffer a driver maps) are bounced through it: copied in at map time for
 * TO_DEVICE, copied back at unmap/sync for FROM_DEVICE, like swiotlb does for a restricted
 * pool. So the DMA address of every ring and buffer lies inside the carve-out, the only
 * memory the back-end's domain can see, and the driver's own pages never leave the guest.
 *
 * The back-end may scribble over a bounce slot at any time; we only ever copy bytes out
 * of it, never follow anything it holds. Copies use the _io variants: Xen 4.17 maps
 * passthrough regions as device memory in stage 2, where unaligned accesses fault.
 */
#include <linux/dma-map-ops.h>
#include <linux/genalloc.h>
#include <linux/io.h>
#include <linux/mm.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>

#include "vmsg.h"

#define VD_SHIFT	9	/* bounce slots are 512-byte blocks */
#define VD_MAX_MAP	(128 * 1024)

/* One carve-out per guest: the bus node's. */
static struct vmsg_dma {
	struct gen_pool *pool;
	phys_addr_t base;
	size_t size;
	void *va;
	phys_addr_t *orig;	/* per block: the driver's address the block bounces */
	atomic64_t maps, bytes_in, bytes_out, failures;
} *vd;

static bool vd_inside(dma_addr_t dma, size_t size)
{
	return dma >= vd->base && size <= vd->size && dma - vd->base <= vd->size - size;
}

static void *vd_alloc(struct device *dev, size_t size, dma_addr_t *dma, gfp_t gfp,
		      unsigned long attrs)
{
	void *va = gen_pool_dma_alloc_align(vd->pool, PAGE_ALIGN(size), dma, PAGE_SIZE);

	if (!va) {
		atomic64_inc(&vd->failures);
		dev_err_ratelimited(dev, "virtio-msg: carve-out full: no %zu bytes for a coherent buffer\n",
				    size);
		return NULL;
	}
	memset_io((void __iomem *)va, 0, PAGE_ALIGN(size));
	return va;
}

static void vd_free(struct device *dev, size_t size, void *va, dma_addr_t dma,
		    unsigned long attrs)
{
	if (vd_inside(dma, PAGE_ALIGN(size)))
		gen_pool_free(vd->pool, (unsigned long)va, PAGE_ALIGN(size));
}

static void vd_copy(dma_addr_t dma, size_t size, enum dma_data_direction dir, bool to_dev)
{
	size_t off = dma - vd->base;
	phys_addr_t orig = vd->orig[off >> VD_SHIFT] + (off & ((1 << VD_SHIFT) - 1));
	void __iomem *bounce = (void __iomem *)(vd->va + off);

	if (to_dev && (dir == DMA_TO_DEVICE || dir == DMA_BIDIRECTIONAL)) {
		memcpy_toio(bounce, phys_to_virt(orig), size);
		atomic64_add(size, &vd->bytes_out);
	} else if (!to_dev && (dir == DMA_FROM_DEVICE || dir == DMA_BIDIRECTIONAL)) {
		memcpy_fromio(phys_to_virt(orig), bounce, size);
		atomic64_add(size, &vd->bytes_in);
	}
}

static dma_addr_t vd_map_page(struct device *dev, struct page *page, unsigned long offset,
			      size_t size, enum dma_data_direction dir, unsigned long attrs)
{
	phys_addr_t orig = page_to_phys(page) + offset;
	dma_addr_t dma;
	size_t first, i;

	if (!size || size > VD_MAX_MAP || !gen_pool_dma_alloc(vd->pool, size, &dma)) {
		atomic64_inc(&vd->failures);
		dev_err_ratelimited(dev, "virtio-msg: no %zu-byte bounce buffer in the carve-out\n",
				    size);
		return DMA_MAPPING_ERROR;
	}
	first = (dma - vd->base) >> VD_SHIFT;
	for (i = 0; i < DIV_ROUND_UP(size, 1 << VD_SHIFT); i++)
		vd->orig[first + i] = orig + (i << VD_SHIFT);
	if (!(attrs & DMA_ATTR_SKIP_CPU_SYNC))
		vd_copy(dma, size, dir, true);
	atomic64_inc(&vd->maps);
	return dma;
}

static void vd_unmap_page(struct device *dev, dma_addr_t dma, size_t size,
			  enum dma_data_direction dir, unsigned long attrs)
{
	if (!vd_inside(dma, size)) {
		dev_err_ratelimited(dev, "virtio-msg: unmap of %pad (+%zu) outside the carve-out\n",
				    &dma, size);
		return;
	}
	if (!(attrs & DMA_ATTR_SKIP_CPU_SYNC))
		vd_copy(dma, size, dir, false);
	gen_pool_free(vd->pool, (unsigned long)(vd->va + (dma - vd->base)), size);
}

static void vd_unmap_sg(struct device *dev, struct scatterlist *sgl, int nents,
			enum dma_data_direction dir, unsigned long attrs)
{
	struct scatterlist *sg;
	int i;

	for_each_sg(sgl, sg, nents, i)
		vd_unmap_page(dev, sg_dma_address(sg), sg_dma_len(sg), dir, attrs);
}

static int vd_map_sg(struct device *dev, struct scatterlist *sgl, int nents,
		     enum dma_data_direction dir, unsigned long attrs)
{
	struct scatterlist *sg;
	int i;

	for_each_sg(sgl, sg, nents, i) {
		sg->dma_address = vd_map_page(dev, sg_page(sg), sg->offset, sg->length, dir, attrs);
		if (sg->dma_address == DMA_MAPPING_ERROR) {
			vd_unmap_sg(dev, sgl, i, dir, attrs | DMA_ATTR_SKIP_CPU_SYNC);
			return -ENOMEM;
		}
		sg_dma_len(sg) = sg->length;
	}
	return nents;
}

static void vd_sync_for_cpu(struct device *dev, dma_addr_t dma, size_t size,
			    enum dma_data_direction dir)
{
	if (vd_inside(dma, size))
		vd_copy(dma, size, dir, false);
}

static void vd_sync_for_device(struct device *dev, dma_addr_t dma, size_t size,
			       enum dma_data_direction dir)
{
	if (vd_inside(dma, size))
		vd_copy(dma, size, dir, true);
}

static size_t vd_max_mapping_size(struct device *dev)
{
	return VD_MAX_MAP;
}

static const struct dma_map_ops vmsg_dma_ops = {
	.alloc = vd_alloc,
	.free = vd_free,
	.map_page = vd_map_page,
	.unmap_page = vd_unmap_page,
	.map_sg = vd_map_sg,
	.unmap_sg = vd_unmap_sg,
	.sync_single_for_cpu = vd_sync_for_cpu,
	.sync_single_for_device = vd_sync_for_device,
	.max_mapping_size = vd_max_mapping_size,
};

/* Map the carve-out [base, base + size) and make it dev's only DMA memory. */
int vmsg_dma_attach(struct device *dev, phys_addr_t base, size_t size, void **va)
{
	int ret = -ENOMEM;

	if (vd)
		return -EBUSY;
	vd = kzalloc(sizeof(*vd), GFP_KERNEL);
	if (!vd)
		return -ENOMEM;
	vd->base = base;
	vd->size = size;
	vd->va = memremap(base, size, MEMREMAP_WB);
	if (!vd->va)
		goto free;
	vd->orig = vzalloc((size >> VD_SHIFT) * sizeof(*vd->orig));
	vd->pool = gen_pool_create(VD_SHIFT, -1);
	if (!vd->orig || !vd->pool)
		goto unmap;
	ret = gen_pool_add_virt(vd->pool, (unsigned long)vd->va, base, size, -1);
	if (ret)
		goto unmap;
	set_dma_ops(dev, &vmsg_dma_ops);
	*va = vd->va;
	dev_info(dev, "virtio-msg: DMA confined to the carve-out [%pa, +%#zx): rings allocated and buffers bounced there\n",
		 &base, size);
	return 0;
unmap:
	if (vd->pool)
		gen_pool_destroy(vd->pool);
	vfree(vd->orig);
	memunmap(vd->va);
free:
	kfree(vd);
	vd = NULL;
	return ret;
}

void vmsg_dma_stats(u64 *maps, u64 *bytes_out, u64 *bytes_in, u64 *failures)
{
	*maps = vd ? atomic64_read(&vd->maps) : 0;
	*bytes_out = vd ? atomic64_read(&vd->bytes_out) : 0;
	*bytes_in = vd ? atomic64_read(&vd->bytes_in) : 0;
	*failures = vd ? atomic64_read(&vd->failures) : 0;
}

void vmsg_dma_detach(struct device *dev)
{
	if (!vd)
		return;
	set_dma_ops(dev, NULL);
	/* Buffers still in the pool belong to devices already gone: destroy would BUG. */
	if (gen_pool_avail(vd->pool) == gen_pool_size(vd->pool))
		gen_pool_destroy(vd->pool);
	vfree(vd->orig);
	memunmap(vd->va);
	kfree(vd);
	vd = NULL;
}
