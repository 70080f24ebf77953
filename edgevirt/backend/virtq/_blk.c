/* The virtio-blk request path of a chain in C (virtio 1.x section 5.2), for file-backed blk.
 *
 * SplitQueue.serve_blk() pops a batch with the same walk as pop() (every rule of DESIGN
 * section 6, same errors), marks the chains taken in the vhost-user inflight region, then
 * serves them in avail order: header parse, preadv/pwritev straight between the file and
 * the carve-out buffers the walk bounds-checked, status byte. When the whole batch was
 * served it pushes the used entries at once and clears the inflight marks; all without the
 * GIL. The first chain it does not serve (no status byte, short header, any type but
 * in/out/flush) ends the batch: that chain and the rest go back to Python as popped chains,
 * and the completions made so far are returned unpushed, so the caller finishes the batch
 * exactly as edgevirt.backend.devices.blk.BlockDevice would have done it alone (same I/O
 * order, same used entries, same errors). That Python path is the reference; the
 * differential tests are in tests/test_blk_fastpath.py.
 *
 * inflight region of one queue (see transport/vhost_user/inflight.py):
 *   le64 features; le16 version; le16 desc_num; le16 last_batch_head; le16 used_idx;
 *   desc[desc_num] = {u8 inflight; u8 padding[5]; le16 next; le64 counter}
 */
#include "_ring.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

enum {
    T_IN = 0, T_OUT = 1, T_FLUSH = 4,
    S_OK = 0, S_IOERR = 1,
    SECTOR = 512, HEADER = 16, MAX_SEG_MAX = 1024, /* UIO_MAXIOV */
    INFL_HEADER = 16, INFL_DESC = 16, INFL_VERSION = 1,
};

typedef struct {
    int fd, readonly;
    uint64_t capacity; /* sectors */
    uint32_t seg_max;
} blkdev;

typedef struct {
    unsigned long long reads, writes, flushes, errors, bytes_read, bytes_written;
    char error[256]; /* the first failure of the batch, for the log */
} blkstats;

typedef struct {
    popjob j;
    blkdev d;
    uint8_t *infl; /* NULL, or the queue's inflight region (checked to hold size entries) */
    unsigned long long counter;
    size_t served;   /* chains served in C, a prefix of the batch */
    int pushed;      /* the whole batch was served and pushed */
    uint32_t *ids;   /* ids[2k] = head, ids[2k+1] = written length, for chain k */
    blkstats st;
    struct iovec iov[MAX_SEG_MAX];
} blkjob;

static void note(blkstats *st, uint16_t head, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void note(blkstats *st, uint16_t head, const char *fmt, ...)
{
    if (st->error[0])
        return;
    int n = snprintf(st->error, sizeof st->error, "chain %u: ", head);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof st->error)
        vsnprintf(st->error + n, sizeof st->error - (size_t)n, fmt, ap);
    va_end(ap);
}

/* The iovecs of s[0..n) minus skip leading and drop trailing bytes, empty pieces left out
 * (as devices.base.views). Returns how many there are; only the first max are stored. */
static size_t iov_build(const seg *s, size_t n, uint64_t skip, uint64_t drop, struct iovec *iov,
                        size_t max)
{
    uint64_t total = 0, pos = 0;
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        total += s[i].len; /* < 2^32: the walk refused longer chains */
    uint64_t end = total >= drop ? total - drop : 0;
    for (size_t i = 0; i < n; pos += s[i].len, i++) {
        uint64_t lo = pos > skip ? pos : skip, hi = pos + s[i].len < end ? pos + s[i].len : end;
        if (lo >= hi)
            continue;
        if (count < max)
            iov[count] = (struct iovec){s[i].host + (lo - pos), (size_t)(hi - lo)};
        count++;
    }
    return count;
}

/* The data of a read or write: within seg_max and the disk; else IOERR, noted. */
static int data_ok(blkjob *b, uint16_t head, size_t nbufs, uint64_t sector, uint64_t len)
{
    if (nbufs > b->d.seg_max) {
        note(&b->st, head, "%zu data segments, seg_max is %u", nbufs, b->d.seg_max);
        return 0;
    }
    if (len % SECTOR || sector > b->d.capacity || len / SECTOR > b->d.capacity - sector) {
        note(&b->st, head, "request sector %llu + %llu sectors (+%llu bytes) beyond capacity "
             "%llu sectors", (unsigned long long)sector, (unsigned long long)(len / SECTOR),
             (unsigned long long)(len % SECTOR), (unsigned long long)b->d.capacity);
        return 0;
    }
    return 1;
}

/* Serve chain k: 1 with ids filled in, or 0 if Python must take it (and the rest). */
static int blk_chain(blkjob *b, size_t k)
{
    const chainrec *r = &b->j.chains[k];
    const seg *rd = b->j.segs + r->first, *wr = rd + r->nread;
    uint64_t rlen = 0, wlen = 0, got = 0;
    uint8_t hdr[HEADER];

    if (r->nwrite == 0)
        return 0;
    for (size_t i = 0; i < r->nread; i++)
        rlen += rd[i].len;
    for (size_t i = 0; i < r->nwrite; i++)
        wlen += wr[i].len;
    if (rlen < HEADER)
        return 0;
    for (size_t i = 0; got < HEADER; i++) { /* the header may span buffers */
        uint64_t take = rd[i].len < HEADER - got ? rd[i].len : HEADER - got;
        memcpy(hdr + got, rd[i].host, (size_t)take);
        got += take;
    }
    /* Compiler barrier: decode only the private copy, the guest may rewrite the original. */
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    uint32_t type = (uint32_t)get_le(hdr, 4);
    uint64_t sector = get_le(hdr + 8, 8);
    if (type != T_IN && type != T_OUT && type != T_FLUSH)
        return 0;

    uint8_t *status = wr[r->nwrite - 1].host + (wr[r->nwrite - 1].len - 1);
    uint64_t out_len = rlen - HEADER, in_len = wlen - 1, written = 0;
    int st = S_IOERR;
    ssize_t n;
    if (type == T_IN) {
        b->st.reads++;
        size_t cnt = iov_build(wr, r->nwrite, 0, 1, b->iov, MAX_SEG_MAX);
        if (out_len == 0 && data_ok(b, r->head, cnt, sector, in_len)) {
            do
                n = preadv(b->d.fd, b->iov, (int)cnt, (off_t)(sector * SECTOR));
            while (n < 0 && errno == EINTR);
            if (n < 0) {
                note(&b->st, r->head, "read at sector %llu: %s", (unsigned long long)sector,
                     strerror(errno));
            } else {
                /* A short read at the end of a shrinking file: never leak stale data. */
                uint64_t skip = (uint64_t)n;
                for (size_t i = 0; i < cnt; i++) {
                    if (skip < b->iov[i].iov_len)
                        memset((uint8_t *)b->iov[i].iov_base + skip, 0,
                               b->iov[i].iov_len - (size_t)skip);
                    skip = skip > b->iov[i].iov_len ? skip - b->iov[i].iov_len : 0;
                }
                b->st.bytes_written += in_len;
                st = S_OK;
                written = in_len;
            }
        }
    } else if (type == T_OUT) {
        b->st.writes++;
        size_t cnt = iov_build(rd, r->nread, HEADER, 0, b->iov, MAX_SEG_MAX);
        if (in_len == 0 && data_ok(b, r->head, cnt, sector, out_len) && !b->d.readonly) {
            do
                n = pwritev(b->d.fd, b->iov, (int)cnt, (off_t)(sector * SECTOR));
            while (n < 0 && errno == EINTR);
            if (n < 0)
                note(&b->st, r->head, "write at sector %llu: %s", (unsigned long long)sector,
                     strerror(errno));
            else if ((uint64_t)n == out_len) {
                b->st.bytes_read += out_len;
                st = S_OK;
            }
        }
    } else {
        b->st.flushes++;
        if (out_len == 0 && in_len == 0) {
            int rc = 0;
            if (!b->d.readonly) {
                do
                    rc = fdatasync(b->d.fd);
                while (rc < 0 && errno == EINTR);
            }
            if (rc < 0)
                note(&b->st, r->head, "flush: %s", strerror(errno));
            else
                st = S_OK;
        }
    }
    if (st != S_OK)
        b->st.errors++;
    *status = (uint8_t)st;
    b->ids[2 * k] = r->head;
    b->ids[2 * k + 1] = (uint32_t)(written + 1); /* written <= 2^32 - 2: the walk's bound */
    return 1;
}

static void blk_run(blkjob *b)
{
    ctx *c = b->j.c;
    pop_run(&b->j);
    if (c->err.kind != ERR_NONE || b->j.nchains == 0)
        return;
    if (!(b->ids = PyMem_RawMalloc(2 * b->j.nchains * sizeof *b->ids))) {
        c->err.kind = ERR_NOMEM;
        return;
    }
    /* Taken: marked before any of the batch's I/O starts, as InflightQueue.taken(). */
    for (size_t k = 0; b->infl != NULL && k < b->j.nchains; k++) {
        uint8_t *d = b->infl + INFL_HEADER + INFL_DESC * (size_t)b->j.chains[k].head;
        memset(d, 0, INFL_DESC);
        d[0] = 1;
        put_le(d + 8, b->counter++, 8);
    }
    while (b->served < b->j.nchains && blk_chain(b, b->served))
        b->served++;
    if (b->served < b->j.nchains)
        return; /* Python finishes the batch, pushes, and clears the marks */
    if (b->infl != NULL) { /* InflightQueue.before_push(): the header, used_idx kept */
        put_le(b->infl, 0, 8);
        put_le(b->infl + 8, INFL_VERSION, 2);
        put_le(b->infl + 10, c->size, 2);
        put_le(b->infl + 12, b->j.chains[b->j.nchains - 1].head, 2);
    }
    used_write(c, b->ids, b->j.nchains);
    b->pushed = 1;
    if (b->infl != NULL) { /* InflightQueue.completed(): the chains are the guest's again */
        for (size_t k = 0; k < b->j.nchains; k++)
            b->infl[INFL_HEADER + INFL_DESC * (size_t)b->j.chains[k].head] = 0;
        put_le(b->infl + 14, (uint16_t)(c->used_idx + b->j.nchains), 2);
    }
}

/* ---- the Python face ---- */

static PyStructSequence_Field result_fields[] = {
    {"pushed", "chains served and pushed to the used ring (0 or the whole batch)"},
    {"done", "(head, written_len) of the chains served but not pushed, in avail order"},
    {"rest", "chains popped but not served, (head, readable, writable) as pop() gives them"},
    {"counter", "the inflight counter after the chains marked taken"},
    {"reads", "read requests served"},
    {"writes", "write requests served"},
    {"flushes", "flush requests served"},
    {"errors", "served requests answered with a status other than OK"},
    {"bytes_read", "bytes written to the disk (guest to device)"},
    {"bytes_written", "bytes read from the disk into the guest (device to guest)"},
    {"error", "None, or what went wrong with the first failed request"},
    {NULL, NULL},
};

static PyStructSequence_Desc result_desc = {
    "edgevirt.backend.virtq._ring.BlkResult", "What SplitQueue.serve_blk() did.",
    result_fields, 11,
};

PyObject *blk_result_type_new(void)
{
    return (PyObject *)PyStructSequence_NewType(&result_desc);
}

static PyObject *build_result(Queue *q, blkjob *b)
{
    ring_state *st = PyType_GetModuleState(Py_TYPE(q));
    PyObject *res = PyStructSequence_New((PyTypeObject *)st->blk_result_type);
    PyObject *done = PyList_New(b->pushed ? 0 : (Py_ssize_t)b->served);
    PyObject *rest = PyList_New((Py_ssize_t)(b->j.nchains - b->served));
    int ok = res != NULL && done != NULL && rest != NULL;
    for (size_t k = 0; ok && !b->pushed && k < b->served; k++) {
        PyObject *t = Py_BuildValue("(II)", b->ids[2 * k], b->ids[2 * k + 1]);
        ok = t != NULL;
        if (ok)
            PyList_SET_ITEM(done, (Py_ssize_t)k, t);
    }
    for (size_t k = b->served; ok && k < b->j.nchains; k++) {
        PyObject *t = chain_tuple(&b->j, k);
        ok = t != NULL;
        if (ok)
            PyList_SET_ITEM(rest, (Py_ssize_t)(k - b->served), t);
    }
    if (!ok) {
        Py_XDECREF(res);
        Py_XDECREF(done);
        Py_XDECREF(rest);
        return NULL;
    }
    const unsigned long long counts[] = {b->st.reads, b->st.writes, b->st.flushes,
                                         b->st.errors, b->st.bytes_read, b->st.bytes_written};
    PyStructSequence_SET_ITEM(res, 0, PyLong_FromSize_t(b->pushed ? b->j.nchains : 0));
    PyStructSequence_SET_ITEM(res, 1, done);
    PyStructSequence_SET_ITEM(res, 2, rest);
    PyStructSequence_SET_ITEM(res, 3, PyLong_FromUnsignedLongLong(b->counter));
    for (int i = 0; i < 6; i++)
        PyStructSequence_SET_ITEM(res, 4 + i, PyLong_FromUnsignedLongLong(counts[i]));
    PyStructSequence_SET_ITEM(res, 10, b->st.error[0] ? PyUnicode_DecodeUTF8(
        b->st.error, (Py_ssize_t)strlen(b->st.error), "replace") : Py_NewRef(Py_None));
    for (int i = 0; i < 11; i++)
        if (PyStructSequence_GET_ITEM(res, i) == NULL)
            return Py_DECREF(res), NULL;
    return res;
}

PyObject *Queue_serve_blk(Queue *q, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mem", "fd", "capacity", "seg_max", "readonly", "max_chains",
                             "inflight", "counter", NULL};
    PyObject *mem, *inflight = Py_None, *out = NULL;
    unsigned long long capacity, counter = 0;
    Py_ssize_t max_chains = 0;
    int fd, readonly;
    unsigned int seg_max;
    Py_buffer ib = {0};
    guestmem m;
    ctx c;
    blkjob *b = NULL;

    memset(&m, 0, sizeof m);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OiKIp|nOK:serve_blk", kwlist, &mem, &fd,
                                     &capacity, &seg_max, &readonly, &max_chains, &inflight,
                                     &counter))
        return NULL;
    /* capacity bound: every byte offset sector * 512 below it fits an off_t */
    if (fd < 0 || seg_max < 1 || seg_max > MAX_SEG_MAX || max_chains < 0 ||
        capacity > (unsigned long long)INT64_MAX / SECTOR)
        return PyErr_Format(PyExc_ValueError, "serve_blk: fd %d, seg_max %u (1..%d), "
                            "capacity %llu (< 2^54) or max_chains %zd (>= 0) out of range", fd,
                            seg_max, MAX_SEG_MAX, capacity, max_chains);
    if (inflight != Py_None) {
        if (PyObject_GetBuffer(inflight, &ib, PyBUF_WRITABLE) < 0)
            return NULL;
        if ((size_t)ib.len < INFL_HEADER + (size_t)INFL_DESC * q->size) {
            PyErr_Format(PyExc_ValueError, "inflight region of %zd bytes cannot track %u "
                         "descriptors", ib.len, q->size);
            goto done;
        }
    }
    if (!(b = PyMem_RawCalloc(1, sizeof *b))) {
        PyErr_NoMemory();
        goto done;
    }
    if (begin(q, mem, &c, &m) < 0)
        goto done;
    b->j = (popjob){&c, (size_t)max_chains, 0, 0, 0, NULL, NULL};
    b->d = (blkdev){fd, readonly, capacity, seg_max};
    b->infl = ib.obj != NULL ? ib.buf : NULL;
    b->counter = counter;
    Py_BEGIN_ALLOW_THREADS
    blk_run(b);
    Py_END_ALLOW_THREADS
    if (c.err.kind != ERR_NONE) {
        raise_err(q, &c.err);
        goto done;
    }
    /* The chains are taken and their I/O done whatever happens to the result below. */
    q->last_avail_idx = (uint16_t)(c.last_avail_idx + b->j.nchains);
    if (b->pushed)
        q->used_idx = (uint16_t)(c.used_idx + b->j.nchains);
    out = build_result(q, b);
done: /* the single exit: guest buffers and the inflight buffer released, scratch freed */
    mem_release(&m);
    if (ib.obj != NULL)
        PyBuffer_Release(&ib);
    if (b != NULL) {
        PyMem_RawFree(b->j.segs);
        PyMem_RawFree(b->j.chains);
        PyMem_RawFree(b->ids);
        PyMem_RawFree(b);
    }
    return out;
}
