/* Internals of BlkAio shared by _aio.c (the engine, submit/reap), _aiopool.c (the thread
 * pool engine) and _aiothread.c (the per-queue serving thread). Not an API: every function here has hidden visibility. */
#ifndef EDGEVIRT_AIO_H
#define EDGEVIRT_AIO_H

#include "_ring.h"

#include <pthread.h>
#ifdef HAVE_LIBURING
#include <liburing.h>
#endif

enum { ENG_URING, ENG_THREADS, POOL_THREADS = 8, URING_ENTRIES = 256 };
#define BOUNCE_BUDGET (32ULL << 20) /* bounce buffer bytes in flight, per engine */

/* The serving thread of one queue: it owns the ring state while it runs. */
typedef struct {
    pthread_t th;
    int running, stop, broken;
    int kick, call, ctl; /* ctl: wakes the thread (stop, completions from Python) */
    int pyfd;            /* wakes Python: chains for it, or the queue broke */
    ctx c;               /* ring state: indices advance here while the thread runs */
    uint16_t signalled;  /* used idx the driver was last signalled for */
    Py_buffer infl_buf;
    uint8_t *infl;
    unsigned long long counter;
    pthread_mutex_t mu; /* guards everything below */
    uint32_t *py;       /* completions from Python: (head, len) pairs */
    size_t npy;
    uint64_t *rest;     /* chains for Python: head, nread, nwrite, (addr, len)... */
    size_t nrest, caprest;
    blkstats acc;       /* since the last take_stats() */
    unsigned long long pushed, notified, kicks;
    err_t err;
} srvstate;

typedef struct aioreq {
    uint8_t busy, kind; /* kind: BLK_T_IN / OUT / FLUSH */
    uint16_t head;
    int fd;
    uint64_t off, len;
    uint8_t *status;
    struct iovec *iov; /* what the kernel reads/writes: the guest's, or `one` (bounce) */
    int iovcnt;
    struct iovec one;
    struct iovec *guest; /* a read's guest iovecs, for the bounce copy-out */
    size_t nguest;
    void *bounce;
    long long res; /* bytes moved or -errno */
    struct aioreq *next;
} aioreq;

typedef struct {
    PyObject_HEAD
    blkdev d;
    int fd_buffered, direct;
    uint32_t align, mem_align, depth, nflight; /* DIO offset and buffer alignment */
    unsigned long long bounce_bytes, bounce_budget;
    aioreq *reqs; /* [depth], indexed by chain head */
    int efd, engine;
    const char *why; /* why the engine is what it is */
    PyObject *mem_obj;
    guestmem m;
    unsigned long long total_bounced;
#ifdef HAVE_LIBURING
    struct io_uring ring;
    int ring_up;
#endif
    srvstate srv; /* the serving thread, when started */
    pthread_t th[POOL_THREADS];
    int nthreads, stop, running, barrier;
    pthread_mutex_t mu;
    pthread_cond_t cv, cv_done;
    aioreq *qhead, *qtail, *done;
} BlkAio;

typedef struct {
    popjob j;
    uint8_t *infl;
    unsigned long long counter;
    uint32_t *ids;   /* answered at once: (head, len) pairs */
    size_t nids;
    size_t *rest;    /* indexes of chains for Python */
    size_t nrest;
    blkstats st;
    struct iovec iov[BLK_MAX_SEG_MAX];
} submitjob;

/* Without the GIL. */
HIDDEN void req_free(BlkAio *a, aioreq *r);
/* Status byte and counts of a finished request; its used length into *written. */
HIDDEN int req_finish(aioreq *r, blkstats *st, uint32_t *written);
/* Pop a batch (s->j.c, s->j.max_chains), mark it taken, start its I/O; chains answered at
 * once are published, others listed in s->rest. */
HIDDEN void submit_run(BlkAio *a, submitjob *s);
/* Finished requests in completion order (waiting for one with wait). */
HIDDEN aioreq *harvest(BlkAio *a, int wait);

/* _aiopool.c: the thread pool engine (start: 0 or -1; take: the done list, newest first) */
HIDDEN int pool_start(BlkAio *a);
HIDDEN void pool_queue(BlkAio *a, aioreq *r);
HIDDEN aioreq *pool_take(BlkAio *a, int wait);
HIDDEN void pool_stop(BlkAio *a);

/* _aiothread.c: with the GIL */
HIDDEN PyObject *Aio_start(BlkAio *a, PyObject *args, PyObject *kw);
HIDDEN PyObject *Aio_stop(BlkAio *a, PyObject *qo);
HIDDEN PyObject *Aio_take_rest(BlkAio *a, PyObject *Py_UNUSED(ignored));
HIDDEN PyObject *Aio_complete(BlkAio *a, PyObject *done);
HIDDEN PyObject *Aio_take_stats(BlkAio *a, PyObject *Py_UNUSED(ignored));
/* Stop the thread if it runs (GIL released by the caller); 1 if it was running. */
HIDDEN int srv_join(BlkAio *a);

#endif
