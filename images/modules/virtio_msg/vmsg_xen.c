// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-msg bus on Xen: message memory and carve-out are passthrough regions Xen maps
 * into this domain (xen,reg in the partial DTB), the doorbell is a static event channel
 * (xen,evtchn in the host DTB) whose local port the bus node names.
 *
 *   /passthrough/virtio-msg@3a000000 {
 *       compatible = "edgevirt,virtio-msg";
 *       edgevirt,doorbell = "xen-evtchn";
 *       edgevirt,evtchn = <10>;            local port, bound to the device side's
 *       reg = <message memory>, <carve-out>;
 *       ...
 *   };
 *
 * Xen already connected the port at domain build; binding it here gives it an IRQ
 * (the device side's notify), and notify_remote_via_evtchn() rings the device side.
 * The carve-out gets the DMA ops of vmsg_dma.c: the domU's tree has no reserved-memory.
 */
#include <linux/io.h>
#include <linux/of.h>
#include <linux/of_address.h>
#include <linux/platform_device.h>
#include <linux/slab.h>

#include "vmsg.h"

#ifdef CONFIG_XEN
#include <xen/events.h>
#include <xen/xen.h>

struct vmsg_xen {
	struct vmsg_bus *bus;
	evtchn_port_t port;
	int irq;
};

static irqreturn_t vmsg_xen_irq(int irq, void *data)
{
	vmsg_bus_rx(data);
	return IRQ_HANDLED;
}

static void vmsg_xen_ring(struct vmsg_bus *bus)
{
	struct vmsg_xen *vx = bus->priv;

	notify_remote_via_evtchn(vx->port);
}

int vmsg_xen_attach(struct platform_device *pdev, struct vmsg_bus **busp,
		    phys_addr_t *pool_base, size_t *pool_size, void **pool_va)
{
	struct device_node *np = pdev->dev.of_node;
	struct resource msg, pool;
	struct vmsg_xen *vx;
	struct vmsg_bus *bus;
	void *mem;
	u32 port;
	int ret;

	if (!xen_domain()) {
		dev_err(&pdev->dev, "virtio-msg: %pOF wants a Xen event channel, but this is no Xen guest\n",
			np);
		return -ENODEV;
	}
	if (of_property_read_u32(np, "edgevirt,evtchn", &port) ||
	    of_address_to_resource(np, 0, &msg) || of_address_to_resource(np, 1, &pool)) {
		dev_err(&pdev->dev, "virtio-msg: %pOF: needs edgevirt,evtchn and reg = <message memory>, <carve-out>\n",
			np);
		return -EINVAL;
	}
	mem = devm_memremap(&pdev->dev, msg.start, resource_size(&msg), MEMREMAP_WB);
	if (IS_ERR(mem))
		return PTR_ERR(mem);
	vx = devm_kzalloc(&pdev->dev, sizeof(*vx), GFP_KERNEL);
	bus = kzalloc(sizeof(*bus), GFP_KERNEL);
	if (!vx || !bus) {
		kfree(bus);
		return -ENOMEM;
	}
	vx->bus = bus;
	vx->port = port;
	bus->priv = vx;
	bus->ring = vmsg_xen_ring;
	/* Both domains boot at once: the service domain may take a while to lay out the
	 * header (its back-end is Python), so the node may allow a longer first wait. */
	of_property_read_u32(np, "edgevirt,header-timeout-ms", &bus->header_ms);
	ret = vmsg_bus_init(bus, &pdev->dev, mem, resource_size(&msg));
	if (ret)
		goto free;
	bus->own_id = port;
	ret = bind_evtchn_to_irqhandler(port, vmsg_xen_irq, 0, "virtio-msg", bus);
	if (ret < 0) {
		dev_err(&pdev->dev, "virtio-msg: binding event channel %u failed: %d\n", port, ret);
		goto free;
	}
	vx->irq = ret;
	ret = vmsg_dma_attach(&pdev->dev, pool.start, resource_size(&pool), pool_va);
	if (ret) {
		unbind_from_irqhandler(vx->irq, bus);
		goto free;
	}
	*pool_base = pool.start;
	*pool_size = resource_size(&pool);
	vmsg_bus_start(bus);
	dev_info(&pdev->dev, "virtio-msg bus: %u slots per direction, Xen event channel %u (irq %d), message memory %pR, epoch %u\n",
		 bus->nslots, port, vx->irq, &msg, bus->epoch);
	*busp = bus;
	return 0;
free:
	kfree(bus);
	return ret;
}

/* After the devices are gone; the caller drops the bus. */
void vmsg_xen_detach(struct platform_device *pdev, struct vmsg_bus *bus)
{
	struct vmsg_xen *vx = bus->priv;

	vmsg_bus_quiesce(bus);
	unbind_from_irqhandler(vx->irq, bus);
	vmsg_dma_detach(&pdev->dev);
}
#else
int vmsg_xen_attach(struct platform_device *pdev, struct vmsg_bus **busp,
		    phys_addr_t *pool_base, size_t *pool_size, void **pool_va)
{
	dev_err(&pdev->dev, "virtio-msg: a Xen event channel bus needs a kernel with CONFIG_XEN\n");
	return -ENODEV;
}

void vmsg_xen_detach(struct platform_device *pdev, struct vmsg_bus *bus)
{
}
#endif
