/* SPDX-License-Identifier: GPL-2.0 */
/*
 * virtio-msg front-end: shared definitions of the bus (ivshmem PCI: doorbell + message
 * memory) and the virtio transport on top. The wire format is the virtio-msg draft; the
 * message memory layout is edgevirt's (edgevirt/backend/transport/virtio_msg/PROTOCOL.md).
 */
#ifndef VMSG_H
#define VMSG_H

#include <linux/completion.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/timer.h>
#include <linux/workqueue.h>
#include <linux/types.h>
#include <linux/virtio.h>

/* Message memory header (offset 0 of BAR2). */
#define VMSG_MAGIC		0x47534d56	/* "VMSG" */
#define VMSG_VERSION		1
#define VMSG_SLOT_SIZE		264		/* = the bus's maximum message size */
#define VMSG_REVISION		1
#define VMSG_HEADER_AREA	0x100
#define VMSG_RING_PROD		0
#define VMSG_RING_CONS		64		/* own cache line */
#define VMSG_RING_SLOTS		128
#define VMSG_MIN_SLOTS		4
#define VMSG_MAX_SLOTS		1024

struct vmsg_mem_header {
	__le32 magic;
	__le16 version;
	__le16 slot_size;
	__le32 nslots;
	__le32 device_peer;
	__le32 max_msg_size;
	__le32 to_device;
	__le32 to_driver;
	__le32 revision;
	__le32 epoch;		/* bumped by every (re)start of the device side; 0 = none */
} __packed;

/* virtio-msg header (draft "Common Message Format"). */
struct vmsg_hdr {
	u8 type;
	u8 msg_id;
	__le16 dev_num;
	__le16 token;
	__le16 msg_size;
} __packed;

#define VMSG_TYPE_RESPONSE	BIT(0)
#define VMSG_TYPE_BUS		BIT(1)
#define VMSG_BUS_PING		0x03

enum {
	VIRTIO_MSG_GET_DEVICE_INFO = 0x02,
	VIRTIO_MSG_GET_DEVICE_FEATURES = 0x03,
	VIRTIO_MSG_SET_DRIVER_FEATURES = 0x04,
	VIRTIO_MSG_GET_CONFIG = 0x05,
	VIRTIO_MSG_SET_CONFIG = 0x06,
	VIRTIO_MSG_GET_DEVICE_STATUS = 0x07,
	VIRTIO_MSG_SET_DEVICE_STATUS = 0x08,
	VIRTIO_MSG_GET_VQUEUE = 0x09,
	VIRTIO_MSG_SET_VQUEUE = 0x0a,
	VIRTIO_MSG_RESET_VQUEUE = 0x0b,
	VIRTIO_MSG_GET_SHM = 0x0c,
	VIRTIO_MSG_EVENT_CONFIG = 0x40,
	VIRTIO_MSG_EVENT_AVAIL = 0x41,
	VIRTIO_MSG_EVENT_USED = 0x42,
};

#define VMSG_MAX_PAYLOAD	(VMSG_SLOT_SIZE - sizeof(struct vmsg_hdr))

struct vmsg_ring {
	void *base;		/* ring header in message memory */
	u32 nslots;
	u32 shadow;		/* our own index: never re-read from shared memory */
};

struct vmsg_device;

struct vmsg_bus {
	struct kref ref;
	struct device *dev;	/* the ivshmem PCI device: for log lines */
	void __iomem *regs;	/* BAR0: IVPosition, Doorbell */
	void *mem;		/* BAR2: message memory */
	u32 nslots;
	u32 own_id, device_peer;
	struct vmsg_ring tx;	/* to-device: we produce */
	struct vmsg_ring rx;	/* to-driver: we consume */
	spinlock_t tx_lock;
	spinlock_t rx_lock;	/* also guards the request in flight below */
	struct mutex req_lock;	/* one request in flight; also serialises a restart */
	u16 token;
	bool waiting;
	u8 want_type;		/* VMSG_TYPE_BUS for a bus request, else 0 */
	u8 want_id;
	u16 want_dev;
	u8 resp[VMSG_SLOT_SIZE];
	u16 resp_len;
	struct completion done;
	bool dead;		/* no answer once, or gone: fail fast from then on */
	bool broken;		/* a ring index went out of range */
	bool polling;		/* no MSI-X: a timer drains the ring */
	struct timer_list poll_timer;
	size_t mem_len;
	u32 epoch;		/* the device side's epoch we are attached to */
	bool closing;		/* teardown: schedule no more work */
	struct work_struct reset_work;	/* new epoch: reset and re-probe every device */
	struct work_struct sweep_work;	/* fail the buffers of stale queues */
	struct delayed_work watch;	/* liveness: epoch, stalled queues, stragglers */
	spinlock_t dev_lock;	/* devices, and their vq tables */
	struct list_head devices;
	unsigned int total_vqs;
	void (*ring)(struct vmsg_bus *bus);	/* doorbell to the device side; NULL: ivshmem */
	void *priv;				/* the doorbell's own state */
	unsigned int header_ms;	/* wait for the device side's header; 0: timeout_ms */
};

struct vmsg_device {
	struct virtio_device vdev;
	struct vmsg_bus *bus;
	struct list_head node;	/* in bus->devices */
	u16 dev_num;
	u32 max_vqs;
	u32 generation;		/* config generation, from the latest answer or event */
	struct virtqueue **vqs;	/* by queue index, for EVENT_USED */
	u32 *avail_pos;		/* ring position of each queue's last EVENT_AVAIL */
	bool *avail_sent;
	u32 *watch;		/* per queue: used idx | busy << 16 at the last watch tick */
	bool stale;		/* its queues belong to a device side that is gone */
	unsigned long failed;	/* buffers failed on stale queues */
	phys_addr_t pool_base;	/* the carve-out pool: the only memory a sweep may write */
	size_t pool_size;
	void *pool_va;		/* its mapping, when it is no RAM (a Xen passthrough region) */
};

/* vmsg_bus.c */
int vmsg_pci_register(void);
void vmsg_pci_unregister(void);
struct vmsg_bus *vmsg_bus_get(void);
void vmsg_bus_put(struct vmsg_bus *bus);
int vmsg_request(struct vmsg_bus *bus, u16 dev_num, u8 msg_id, const void *req, u16 req_len,
		 void *ans, u16 ans_min, u16 ans_max);
int vmsg_event_avail(struct vmsg_bus *bus, struct vmsg_device *vmdev, u32 index);
void vmsg_bus_quiesce(struct vmsg_bus *bus);
int vmsg_bus_init(struct vmsg_bus *bus, struct device *dev, void *mem, size_t len);
void vmsg_bus_start(struct vmsg_bus *bus);
void vmsg_bus_rx(struct vmsg_bus *bus);

/* vmsg_xen.c: the bus over Xen passthrough regions and a static event channel */
struct platform_device;
int vmsg_xen_attach(struct platform_device *pdev, struct vmsg_bus **busp,
		    phys_addr_t *pool_base, size_t *pool_size, void **pool_va);
void vmsg_xen_detach(struct platform_device *pdev, struct vmsg_bus *bus);

/* vmsg_dma.c: DMA ops confined to a carve-out that is no reserved-memory node */
int vmsg_dma_attach(struct device *dev, phys_addr_t base, size_t size, void **va);
void vmsg_dma_detach(struct device *dev);
void vmsg_dma_stats(u64 *maps, u64 *bytes_out, u64 *bytes_in, u64 *failures);
void vmsg_bus_sweep_now(struct vmsg_bus *bus);

/* vmsg_virtio.c: event delivery from the bus (called with bus->dev_lock held) */
void vmsg_device_event(struct vmsg_device *vmdev, u8 msg_id, const u8 *payload, u16 len);
/* vmsg_virtio.c: restart support (dev_lock held unless noted) */
void vmsg_device_gone(struct vmsg_device *vmdev);
unsigned int vmsg_device_sweep(struct vmsg_device *vmdev);
bool vmsg_device_stalled(struct vmsg_device *vmdev);
void vmsg_device_reprobe(struct vmsg_device *vmdev);	/* process context, no locks */

#endif
