/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ev_count.h: a count of interrupts that user space reads like an eventfd, for the
 * doorbell helpers (ev_ivshmem: MSI-X of an ivshmem-doorbell device; ev_evtchn: a Xen
 * event channel). The module builder copies this directory beside every module's sources
 * (edgevirt/image/modules.py), so #include "ev_count.h" finds it.
 *
 *   read(8)  blocks until at least one interrupt arrived, returns the count (u64, native
 *            endian) and resets it; O_NONBLOCK gives -EAGAIN;
 *   poll     readable while the count is non-zero.
 */
#ifndef EV_COUNT_H
#define EV_COUNT_H

#include <linux/fs.h>
#include <linux/poll.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

struct ev_count {
	spinlock_t lock;
	u64 pending;	/* since the last read */
	u64 total;	/* since the device was bound */
	wait_queue_head_t wait;
};

static inline void ev_count_init(struct ev_count *c)
{
	spin_lock_init(&c->lock);
	init_waitqueue_head(&c->wait);
}

/* From the interrupt handler: count one and wake the readers. */
static inline void ev_count_add(struct ev_count *c)
{
	unsigned long flags;

	spin_lock_irqsave(&c->lock, flags);
	c->pending++;
	c->total++;
	spin_unlock_irqrestore(&c->lock, flags);
	wake_up_interruptible(&c->wait);
}

static inline ssize_t ev_count_read(struct ev_count *c, struct file *file, char __user *buf,
				    size_t len)
{
	u64 count;
	int ret;

	if (len < sizeof(count))
		return -EINVAL;
	for (;;) {
		spin_lock_irq(&c->lock);
		count = c->pending;
		c->pending = 0;
		spin_unlock_irq(&c->lock);
		if (count)
			break;
		if (file->f_flags & O_NONBLOCK)
			return -EAGAIN;
		ret = wait_event_interruptible(c->wait, READ_ONCE(c->pending));
		if (ret)
			return ret;
	}
	if (copy_to_user(buf, &count, sizeof(count)))
		return -EFAULT;
	return sizeof(count);
}

static inline __poll_t ev_count_poll(struct ev_count *c, struct file *file, poll_table *wait)
{
	poll_wait(file, &c->wait, wait);
	return READ_ONCE(c->pending) ? EPOLLIN | EPOLLRDNORM : 0;
}

#endif /* EV_COUNT_H */
