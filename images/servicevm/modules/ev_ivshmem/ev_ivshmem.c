// SPDX-License-Identifier: GPL-2.0
/*
 * ev_ivshmem: the doorbells of an ivshmem-doorbell PCI device (1af4:1110 with MSI-X) for a
 * user-space back-end, and nothing else.
 *
 * QEMU's ivshmem-doorbell signals a peer's doorbell only as an MSI-X message (with MSI-X
 * disabled the interrupt is dropped, INTx is never raised), and uio_pci_generic drives
 * INTx only. This helper enables MSI-X and gives each device one character device,
 * /dev/ivshmem-<pci address>, with eventfd semantics:
 *
 *   read(8)   blocks until at least one interrupt arrived (any vector), returns the
 *             count (u64, native endian) and resets it; O_NONBLOCK gives -EAGAIN;
 *   poll      readable while the count is non-zero;
 *   write(4)  a u32 written to the Doorbell register (BAR0 + 12): peer << 16 | vector.
 *
 * and a sysfs attribute "ivposition" on the PCI device (BAR0 + 8: our peer ID). The shared
 * memory itself is mapped by user space through sysfs (resource2_wc); devices without
 * MSI-X (ivshmem-plain) are left alone.
 */
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>

#include "ev_count.h"

#define IVSHMEM_IVPOSITION	8
#define IVSHMEM_DOORBELL	12
#define EV_MAX_VECTORS		8

struct ev_ivshmem {
	struct pci_dev *pdev;
	void __iomem *regs;
	struct miscdevice misc;
	char name[40];
	struct ev_count count;
	int nvec;
};

static irqreturn_t ev_irq(int irq, void *data)
{
	struct ev_ivshmem *ev = data;

	ev_count_add(&ev->count);
	return IRQ_HANDLED;
}

static struct ev_ivshmem *ev_of(struct file *file)
{
	return container_of(file->private_data, struct ev_ivshmem, misc);
}

static ssize_t ev_read(struct file *file, char __user *buf, size_t len, loff_t *ppos)
{
	return ev_count_read(&ev_of(file)->count, file, buf, len);
}

static ssize_t ev_write(struct file *file, const char __user *buf, size_t len, loff_t *ppos)
{
	struct ev_ivshmem *ev = ev_of(file);
	u32 value;

	if (len != sizeof(value))
		return -EINVAL;
	if (copy_from_user(&value, buf, sizeof(value)))
		return -EFAULT;
	writel(value, ev->regs + IVSHMEM_DOORBELL);
	return sizeof(value);
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

static ssize_t ivposition_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct ev_ivshmem *ev = pci_get_drvdata(to_pci_dev(dev));

	return sysfs_emit(buf, "%u\n", readl(ev->regs + IVSHMEM_IVPOSITION));
}
static DEVICE_ATTR_RO(ivposition);

static int ev_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct ev_ivshmem *ev;
	int ret, i;

	if (!pdev->msix_cap)
		return -ENODEV;	/* ivshmem-plain: shared memory only, nothing to drive */
	ev = devm_kzalloc(&pdev->dev, sizeof(*ev), GFP_KERNEL);
	if (!ev)
		return -ENOMEM;
	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	/* BAR0 only: BAR2 stays free for user space's sysfs mapping. */
	ret = pcim_iomap_regions(pdev, BIT(0), "ev_ivshmem");
	if (ret)
		return ret;
	ev->pdev = pdev;
	ev->regs = pcim_iomap_table(pdev)[0];
	ev_count_init(&ev->count);
	pci_set_master(pdev);	/* MSI-X messages are bus-master writes */
	ev->nvec = pci_alloc_irq_vectors(pdev, 1, EV_MAX_VECTORS, PCI_IRQ_MSIX);
	if (ev->nvec < 0) {
		dev_err(&pdev->dev, "ev_ivshmem: no MSI-X vectors (%d)\n", ev->nvec);
		return ev->nvec;
	}
	for (i = 0; i < ev->nvec; i++) {
		ret = devm_request_irq(&pdev->dev, pci_irq_vector(pdev, i), ev_irq, 0,
				       "ev_ivshmem", ev);
		if (ret)
			goto free_vectors;
	}
	pci_set_drvdata(pdev, ev);
	snprintf(ev->name, sizeof(ev->name), "ivshmem-%s", pci_name(pdev));
	ev->misc.minor = MISC_DYNAMIC_MINOR;
	ev->misc.name = ev->name;
	ev->misc.fops = &ev_fops;
	ev->misc.mode = 0600;
	ret = misc_register(&ev->misc);
	if (ret)
		goto free_vectors;
	ret = device_create_file(&pdev->dev, &dev_attr_ivposition);
	if (ret)
		goto deregister;
	dev_info(&pdev->dev, "ev_ivshmem: /dev/%s, %d MSI-X vectors, peer %u\n", ev->name,
		 ev->nvec, readl(ev->regs + IVSHMEM_IVPOSITION));
	return 0;
deregister:
	misc_deregister(&ev->misc);
free_vectors:
	for (i--; i >= 0; i--)
		devm_free_irq(&pdev->dev, pci_irq_vector(pdev, i), ev);
	pci_free_irq_vectors(pdev);
	return ret;
}

static void ev_remove(struct pci_dev *pdev)
{
	struct ev_ivshmem *ev = pci_get_drvdata(pdev);
	int i;

	device_remove_file(&pdev->dev, &dev_attr_ivposition);
	misc_deregister(&ev->misc);
	for (i = 0; i < ev->nvec; i++)
		devm_free_irq(&pdev->dev, pci_irq_vector(pdev, i), ev);
	pci_free_irq_vectors(pdev);
}

static const struct pci_device_id ev_ids[] = {
	{ PCI_DEVICE(0x1af4, 0x1110) },	/* ivshmem */
	{ }
};
MODULE_DEVICE_TABLE(pci, ev_ids);

static struct pci_driver ev_driver = {
	.name = "ev_ivshmem",
	.id_table = ev_ids,
	.probe = ev_probe,
	.remove = ev_remove,
};
module_pci_driver(ev_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("ivshmem-doorbell MSI-X interrupts and doorbell register for user space");
