// SPDX-License-Identifier: GPL-2.0
/*
 * ev_evtchn: the doorbell of a Xen static event channel for a user-space back-end.
 *
 * Xen connects static event channels (xen,evtchn in the host DTB) when it builds the
 * domains; the guest learns its local port from the virtio-msg bus node of its partial
 * DTB (/passthrough/virtio-msg@…, edgevirt,role = "backend", edgevirt,evtchn = <port>).
 * Linux 6.1's /dev/xen/evtchn cannot bind an already connected static port, so this
 * helper binds it and gives user space /dev/ev-evtchn with eventfd semantics:
 *
 *   read(8)   blocks until the peer notified at least once, returns the count (u64,
 *             native endian) and resets it; O_NONBLOCK gives -EAGAIN;
 *   poll      readable while the count is non-zero;
 *   write(n)  notifies the peer (any 1..8 bytes).
 *
 * The shared regions themselves are the node's reg entries; user space maps them through
 * /dev/mem (they are no RAM to this domain, so STRICT_DEVMEM allows it).
 */
#include <linux/interrupt.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/of.h>
#include <linux/platform_device.h>
#include <xen/events.h>
#include <xen/xen.h>

#include "ev_count.h"

struct ev_evtchn {
	struct miscdevice misc;
	evtchn_port_t port;
	int irq;
	struct ev_count count;	/* notifications in */
	u64 total_out;		/* under count.lock */
};

static irqreturn_t ev_irq(int irq, void *data)
{
	struct ev_evtchn *ev = data;

	ev_count_add(&ev->count);
	return IRQ_HANDLED;
}

static struct ev_evtchn *ev_of(struct file *file)
{
	return container_of(file->private_data, struct ev_evtchn, misc);
}

static ssize_t ev_read(struct file *file, char __user *buf, size_t len, loff_t *ppos)
{
	return ev_count_read(&ev_of(file)->count, file, buf, len);
}

static ssize_t ev_write(struct file *file, const char __user *buf, size_t len, loff_t *ppos)
{
	struct ev_evtchn *ev = ev_of(file);

	if (!len || len > 8)
		return -EINVAL;
	notify_remote_via_evtchn(ev->port);
	spin_lock_irq(&ev->count.lock);
	ev->total_out++;
	spin_unlock_irq(&ev->count.lock);
	return len;
}

static __poll_t ev_poll(struct file *file, poll_table *wait)
{
	return ev_count_poll(&ev_of(file)->count, file, wait);
}

static const struct file_operations ev_fops = {
	.owner = THIS_MODULE,
	.read = ev_read,
	.write = ev_write,
	.poll = ev_poll,
	.llseek = noop_llseek,
};

static ssize_t counts_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct ev_evtchn *ev = dev_get_drvdata(dev);

	return sysfs_emit(buf, "port=%u in=%llu out=%llu\n", ev->port, ev->count.total,
			  ev->total_out);
}
static DEVICE_ATTR_RO(counts);

static int ev_probe(struct platform_device *pdev)
{
	struct device_node *np = pdev->dev.of_node;
	struct ev_evtchn *ev;
	const char *role;
	u32 port;
	int ret;

	if (of_property_read_string(np, "edgevirt,role", &role) || strcmp(role, "backend"))
		return -ENODEV;	/* the front-end's node: the virtio_msg module's */
	if (!xen_domain())
		return -ENODEV;
	if (of_property_read_u32(np, "edgevirt,evtchn", &port)) {
		dev_err(&pdev->dev, "ev_evtchn: %pOF has no edgevirt,evtchn\n", np);
		return -EINVAL;
	}
	ev = devm_kzalloc(&pdev->dev, sizeof(*ev), GFP_KERNEL);
	if (!ev)
		return -ENOMEM;
	ev->port = port;
	ev_count_init(&ev->count);
	ret = bind_evtchn_to_irqhandler(port, ev_irq, 0, "ev_evtchn", ev);
	if (ret < 0) {
		dev_err(&pdev->dev, "ev_evtchn: binding event channel %u failed: %d\n", port, ret);
		return ret;
	}
	ev->irq = ret;
	ev->misc.minor = MISC_DYNAMIC_MINOR;
	ev->misc.name = "ev-evtchn";
	ev->misc.fops = &ev_fops;
	ev->misc.parent = &pdev->dev;
	ret = misc_register(&ev->misc);
	if (ret) {
		unbind_from_irqhandler(ev->irq, ev);
		return ret;
	}
	platform_set_drvdata(pdev, ev);
	device_create_file(&pdev->dev, &dev_attr_counts);
	dev_info(&pdev->dev, "ev_evtchn: event channel %u bound (irq %d): /dev/ev-evtchn\n",
		 port, ev->irq);
	return 0;
}

static int ev_remove(struct platform_device *pdev)
{
	struct ev_evtchn *ev = platform_get_drvdata(pdev);

	device_remove_file(&pdev->dev, &dev_attr_counts);
	misc_deregister(&ev->misc);
	unbind_from_irqhandler(ev->irq, ev);
	return 0;
}

static const struct of_device_id ev_of_ids[] = {
	{ .compatible = "edgevirt,virtio-msg" },
	{ }
};
MODULE_DEVICE_TABLE(of, ev_of_ids);

static struct platform_driver ev_driver = {
	.driver = { .name = "ev-evtchn", .of_match_table = ev_of_ids },
	.probe = ev_probe,
	.remove = ev_remove,
};
module_platform_driver(ev_driver);
MODULE_DESCRIPTION("Xen static event channel doorbell for a user-space virtio-msg back-end");
MODULE_LICENSE("GPL");
