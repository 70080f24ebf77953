/* Internals shared by _ring.c (the split ring, the SplitQueue type, the module) and _blk.c
 * (the virtio-blk request path). Not an API: both files build one extension, and every
 * function declared here has hidden visibility. */
#ifndef EDGEVIRT_RING_H
#define EDGEVIRT_RING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#define HIDDEN __attribute__((visibility("hidden")))

enum {
    DESC_F_NEXT = 1, DESC_F_WRITE = 2, DESC_F_INDIRECT = 4,
    AVAIL_F_NO_INTERRUPT = 1, USED_F_NO_NOTIFY = 1,
    MAX_QUEUE_SIZE = 32768, MAX_INDIRECT = 65535,
    POP_SEGMENT_BUDGET = 65536, /* pop() starts no new chain once it holds this many buffers */
    MAX_WINDOWS_SHOWN = 8,
};

typedef struct {
    PyObject *ring_error, *mem_error; /* edgevirt.errors.RingError, GuestMemoryError */
    PyObject *log;                    /* logging.getLogger("edgevirt.backend.virtq") */
    PyObject *queue_type;
    PyObject *blk_result_type;        /* BlkResult, the struct sequence serve_blk returns */
    PyObject *aio_type;               /* BlkAio */
} ring_state;

typedef struct {
    PyObject_HEAD
    unsigned long long desc, avail, used;
    unsigned int size;
    uint16_t last_avail_idx, used_idx, signalled_used;
    char event_idx;
    PyObject *broken; /* NULL or the str that broke the queue */
} Queue;

/* ---- little-endian access to guest memory, correct on any host byte order ---- */

static inline uint64_t get_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline void put_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE16(v) __builtin_bswap16(v)
#else
#define LE16(v) (v)
#endif

/* Shared 16-bit fields (idx, flags, ring entries, events) are accessed once, single-copy
 * atomically when the host address is aligned, so a concurrently written idx is not torn. */
static inline uint16_t ld16(const uint8_t *p)
{
    if (((uintptr_t)p & 1) == 0)
        return LE16(__atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED));
    return (uint16_t)get_le(p, 2);
}

static inline void st16(uint8_t *p, uint16_t v)
{
    if (((uintptr_t)p & 1) == 0)
        __atomic_store_n((uint16_t *)p, (uint16_t)LE16(v), __ATOMIC_RELAXED);
    else
        put_le(p, v, 2);
}

/* ---- guest memory: the windows of mem.table, buffers held for one call ---- */

typedef struct { uint64_t gpa, size; uint8_t *host; } window;
typedef struct { PyObject *seq; Py_buffer *views; window *win; Py_ssize_t n, held; } guestmem;

HIDDEN void mem_release(guestmem *m);
HIDDEN uint8_t *mem_find(const guestmem *m, uint64_t gpa, uint64_t len);

/* ---- errors found without the GIL: formatted into a buffer, raised afterwards ---- */

enum { ERR_NONE, ERR_RING, ERR_MEM, ERR_NOMEM };
typedef struct { int kind; const char *rule; char msg[1024]; } err_t;

/* A snapshot of the queue, so the GIL-free code never reads the Python object. */
typedef struct {
    unsigned long long desc_gpa, avail_gpa, used_gpa;
    uint32_t size;
    uint16_t last_avail_idx, used_idx;
    int event_idx;
    const guestmem *m;
    uint8_t *desc, *avail, *used; /* host pointers, set by rings_map() */
    err_t err;
} ctx;

/* ---- pop: the chain walk, shared by pop() and serve_blk() ---- */

/* A buffer of a chain; host points into a window and was bounds checked by the walk. */
typedef struct { uint64_t addr; uint8_t *host; uint32_t len; } seg;
typedef struct { uint16_t head; size_t first, nread, nwrite; } chainrec;
typedef struct {
    ctx *c;
    size_t max_chains, nsegs, capsegs, nchains;
    seg *segs;
    chainrec *chains;
} popjob;

/* Without the GIL: walk up to max_chains available chains (every rule of DESIGN section 6),
 * or set c->err. The caller frees j->segs and j->chains with PyMem_RawFree. */
HIDDEN void pop_run(popjob *j);
/* Without the GIL: write n used elements (ids[2k] = id, ids[2k+1] = len) and used->idx. */
HIDDEN void used_write(ctx *c, const uint32_t *ids, size_t n);

/* With the GIL. */
HIDDEN int begin(Queue *q, PyObject *mem, ctx *c, guestmem *m);
HIDDEN PyObject *raise_err(Queue *q, const err_t *e);
HIDDEN PyObject *chain_tuple(const popjob *j, size_t k);

HIDDEN int rings_map(ctx *c);
/* With the GIL, rings mapped: must the driver be signalled for what was pushed since the
 * last call (SplitQueue.should_notify)? Records the used idx as signalled. */
HIDDEN int should_notify(Queue *q, const ctx *c);
/* The same on any ring state: *signalled is the used idx last signalled for. */
HIDDEN int need_notify(uint16_t *signalled, uint16_t used_idx, const ctx *c);

/* ---- _blk.c: the virtio-blk request of a chain, shared by serve_blk and BlkAio ---- */

#include <sys/uio.h>

enum {
    BLK_T_IN = 0, BLK_T_OUT = 1, BLK_T_FLUSH = 4, BLK_S_OK = 0, BLK_S_IOERR = 1,
    BLK_SECTOR = 512, BLK_MAX_SEG_MAX = 1024, /* UIO_MAXIOV */
};

typedef struct {
    int fd, readonly;
    uint64_t capacity; /* sectors */
    uint32_t seg_max;
} blkdev;

typedef struct {
    unsigned long long reads, writes, flushes, errors, bytes_read, bytes_written, bounced;
    unsigned long long notified; /* times the call eventfd was signalled (BlkAio) */
    unsigned long long kicks;    /* kick eventfd wake-ups the engine thread consumed */
    unsigned long long pending;  /* serve_blk(notify=True): chains available after the batch */
    char error[256]; /* the first failure, for the log */
} blkstats;

/* A parsed request: type, sector, data iovecs (iov[0..cnt)), its status byte, and ok = 0 if
 * it must be answered IOERR without I/O (the reason noted in the stats). */
typedef struct {
    uint32_t type;
    uint64_t sector, len; /* len: bytes of data to move */
    uint8_t *status;
    size_t cnt;
    int ok;
} blkreq;

/* Without the GIL: 1 with r filled in (reads/writes/flushes counted), or 0 if the chain is not
 * a read, write or flush Python must serve (or break the queue on). iov holds MAX_SEG_MAX. */
HIDDEN int blk_parse(const popjob *j, size_t k, const blkdev *d, blkstats *st,
                     struct iovec *iov, blkreq *r);
HIDDEN void blk_note(blkstats *st, uint16_t head, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Zero iov past the first n bytes: a short read never leaks stale data to the guest. */
HIDDEN void blk_zero_tail(const struct iovec *iov, size_t cnt, uint64_t n);
/* Inflight region (vhost-user) bookkeeping: see _blk.c. */
HIDDEN void infl_taken(uint8_t *infl, const popjob *j, size_t k, unsigned long long *counter);
/* Publish n used entries (ids as used_write) with the inflight region kept consistent. */
HIDDEN void blk_publish(ctx *c, uint8_t *infl, const uint32_t *ids, size_t n);

HIDDEN PyObject *Queue_serve_blk(Queue *q, PyObject *args, PyObject *kw);
HIDDEN PyObject *blk_result_type_new(void);
HIDDEN PyObject *blk_result(PyTypeObject *tp, size_t pushed, PyObject *done, PyObject *rest,
                            unsigned long long counter, const blkstats *st);

/* ---- _aio.c: asynchronous request path (io_uring or a thread pool) ---- */

HIDDEN PyType_Spec *blk_aio_spec(void);

#endif
