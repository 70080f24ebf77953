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
    T_IN = BLK_T_IN, T_OUT = BLK_T_OUT, T_FLUSH = BLK_T_FLUSH,
    S_OK = BLK_S_OK, S_IOERR = BLK_S_IOERR,
    SECTOR = BLK_SECTOR, HEADER = 16, MAX_SEG_MAX = BLK_MAX_SEG_MAX,
    INFL_HEADER = 16, INFL_DESC = 16, INFL_VERSION = 1,
};

typedef struct {
    popjob j;
    blkdev d;
    uint8_t *infl; /* NULL, or the queue's inflight region (checked to hold size entries) */
    unsigned long long counter;
    int fd_fallback; /* -1, or the page-cache fd for what O_DIRECT refuses (EINVAL) */
    size_t served;   /* chains served in C, a prefix of the batch */
    int pushed;      /* the whole batch was served and pushed */
    uint32_t *ids;   /* ids[2k] = head, ids[2k+1] = written length, for chain k */
    blkstats st;
    struct iovec iov[MAX_SEG_MAX];
} blkjob;

void blk_note(blkstats *st, uint16_t head, const char *fmt, ...)
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
static int data_ok(const blkdev *d, blkstats *st, uint16_t head, size_t nbufs, uint64_t sector,
                   uint64_t len)
{
    if (nbufs > d->seg_max) {
        blk_note(st, head, "%zu data segments, seg_max is %u", nbufs, d->seg_max);
        return 0;
    }
    if (len % SECTOR || sector > d->capacity || len / SECTOR > d->capacity - sector) {
        blk_note(st, head, "request sector %llu + %llu sectors (+%llu bytes) beyond capacity "
                 "%llu sectors", (unsigned long long)sector, (unsigned long long)(len / SECTOR),
                 (unsigned long long)(len % SECTOR), (unsigned long long)d->capacity);
        return 0;
    }
    return 1;
}

int blk_parse(const popjob *j, size_t k, const blkdev *d, blkstats *st, struct iovec *iov,
              blkreq *r)
{
    const chainrec *c = &j->chains[k];
    const seg *rd = j->segs + c->first, *wr = rd + c->nread;
    uint64_t rlen = 0, wlen = 0, got = 0;
    uint8_t hdr[HEADER];

    if (c->nwrite == 0)
        return 0;
    for (size_t i = 0; i < c->nread; i++)
        rlen += rd[i].len;
    for (size_t i = 0; i < c->nwrite; i++)
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
    r->type = (uint32_t)get_le(hdr, 4);
    r->sector = get_le(hdr + 8, 8);
    if (r->type != T_IN && r->type != T_OUT && r->type != T_FLUSH)
        return 0;
    r->status = wr[c->nwrite - 1].host + (wr[c->nwrite - 1].len - 1);
    uint64_t out_len = rlen - HEADER, in_len = wlen - 1;
    r->cnt = 0;
    r->len = 0;
    if (r->type == T_IN) {
        st->reads++;
        r->cnt = iov_build(wr, c->nwrite, 0, 1, iov, MAX_SEG_MAX);
        r->len = in_len;
        r->ok = out_len == 0 && data_ok(d, st, c->head, r->cnt, r->sector, in_len);
    } else if (r->type == T_OUT) {
        st->writes++;
        r->cnt = iov_build(rd, c->nread, HEADER, 0, iov, MAX_SEG_MAX);
        r->len = out_len;
        r->ok = in_len == 0 && data_ok(d, st, c->head, r->cnt, r->sector, out_len) &&
                !d->readonly;
    } else {
        st->flushes++;
        r->ok = out_len == 0 && in_len == 0;
    }
    return 1;
}

void blk_zero_tail(const struct iovec *iov, size_t cnt, uint64_t n)
{
    uint64_t skip = n;
    for (size_t i = 0; i < cnt; i++) {
        if (skip < iov[i].iov_len)
            memset((uint8_t *)iov[i].iov_base + skip, 0, iov[i].iov_len - (size_t)skip);
        skip = skip > iov[i].iov_len ? skip - iov[i].iov_len : 0;
    }
}

/* Serve chain k: 1 with ids filled in, or 0 if Python must take it (and the rest). */
static int blk_chain(blkjob *b, size_t k)
{
    blkreq r;
    if (!blk_parse(&b->j, k, &b->d, &b->st, b->iov, &r))
        return 0;
    uint16_t head = b->j.chains[k].head;
    uint64_t written = 0;
    int st = S_IOERR;
    ssize_t n;
    if (r.ok && r.type == T_IN) {
        do
            n = preadv(b->d.fd, b->iov, (int)r.cnt, (off_t)(r.sector * SECTOR));
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno == EINVAL && b->fd_fallback >= 0) { /* unaligned for O_DIRECT */
            b->st.bounced++;
            do
                n = preadv(b->fd_fallback, b->iov, (int)r.cnt, (off_t)(r.sector * SECTOR));
            while (n < 0 && errno == EINTR);
        }
        if (n < 0) {
            blk_note(&b->st, head, "read at sector %llu: %s", (unsigned long long)r.sector,
                     strerror(errno));
        } else {
            blk_zero_tail(b->iov, r.cnt, (uint64_t)n);
            b->st.bytes_written += r.len;
            st = S_OK;
            written = r.len;
        }
    } else if (r.ok && r.type == T_OUT) {
        do
            n = pwritev(b->d.fd, b->iov, (int)r.cnt, (off_t)(r.sector * SECTOR));
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno == EINVAL && b->fd_fallback >= 0) {
            b->st.bounced++;
            do
                n = pwritev(b->fd_fallback, b->iov, (int)r.cnt, (off_t)(r.sector * SECTOR));
            while (n < 0 && errno == EINTR);
        }
        if (n < 0)
            blk_note(&b->st, head, "write at sector %llu: %s", (unsigned long long)r.sector,
                     strerror(errno));
        else if ((uint64_t)n == r.len) {
            b->st.bytes_read += r.len;
            st = S_OK;
        }
    } else if (r.ok) {
        int rc = 0;
        if (!b->d.readonly) {
            do
                rc = fdatasync(b->d.fd);
            while (rc < 0 && errno == EINTR);
        }
        if (rc < 0)
            blk_note(&b->st, head, "flush: %s", strerror(errno));
        else
            st = S_OK;
    }
    if (st != S_OK)
        b->st.errors++;
    *r.status = (uint8_t)st;
    b->ids[2 * k] = head;
    b->ids[2 * k + 1] = (uint32_t)(written + 1); /* written <= 2^32 - 2: the walk's bound */
    return 1;
}

/* Taken: marked before any of the chain's I/O starts, as InflightQueue.taken(). */
void infl_taken(uint8_t *infl, const popjob *j, size_t k, unsigned long long *counter)
{
    uint8_t *d = infl + INFL_HEADER + INFL_DESC * (size_t)j->chains[k].head;
    memset(d, 0, INFL_DESC);
    d[0] = 1;
    put_le(d + 8, (*counter)++, 8);
}

void blk_publish(ctx *c, uint8_t *infl, const uint32_t *ids, size_t n)
{
    if (n == 0)
        return;
    if (infl != NULL) { /* InflightQueue.before_push(): the header, used_idx kept */
        put_le(infl, 0, 8);
        put_le(infl + 8, INFL_VERSION, 2);
        put_le(infl + 10, c->size, 2);
        put_le(infl + 12, ids[2 * (n - 1)], 2);
    }
    used_write(c, ids, n);
    if (infl != NULL) { /* InflightQueue.completed(): the chains are the guest's again */
        for (size_t k = 0; k < n; k++)
            infl[INFL_HEADER + INFL_DESC * (size_t)ids[2 * k]] = 0;
        put_le(infl + 14, (uint16_t)(c->used_idx + n), 2);
    }
    c->used_idx = (uint16_t)(c->used_idx + n);
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
    for (size_t k = 0; b->infl != NULL && k < b->j.nchains; k++)
        infl_taken(b->infl, &b->j, k, &b->counter);
    while (b->served < b->j.nchains && blk_chain(b, b->served))
        b->served++;
    if (b->served < b->j.nchains)
        return; /* Python finishes the batch, pushes, and clears the marks */
    blk_publish(c, b->infl, b->ids, b->j.nchains);
    b->pushed = 1;
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
    {"bounced", "requests moved through an aligned bounce buffer (O_DIRECT)"},
    {"notified", "BlkAio: times the driver was signalled on its call eventfd; "
                 "serve_blk(notify=True): 1 if the caller must signal the driver now"},
    {"kicks", "kicks the engine thread took from the driver (BlkAio.take_stats)"},
    {"pending", "serve_blk(notify=True): chains available after the batch (serve again)"},
    {NULL, NULL},
};

static PyStructSequence_Desc result_desc = {
    "edgevirt.backend.virtq._ring.BlkResult", "What SplitQueue.serve_blk() did.",
    result_fields, 15,
};

PyObject *blk_result_type_new(void)
{
    return (PyObject *)PyStructSequence_NewType(&result_desc);
}

PyObject *blk_result(PyTypeObject *tp, size_t pushed, PyObject *done, PyObject *rest,
                     unsigned long long counter, const blkstats *st)
{
    PyObject *res = done != NULL && rest != NULL ? PyStructSequence_New(tp) : NULL;
    if (res == NULL) {
        Py_XDECREF(done);
        Py_XDECREF(rest);
        return NULL;
    }
    const unsigned long long counts[] = {st->reads, st->writes, st->flushes,
                                         st->errors, st->bytes_read, st->bytes_written};
    PyStructSequence_SET_ITEM(res, 0, PyLong_FromSize_t(pushed));
    PyStructSequence_SET_ITEM(res, 1, done);
    PyStructSequence_SET_ITEM(res, 2, rest);
    PyStructSequence_SET_ITEM(res, 3, PyLong_FromUnsignedLongLong(counter));
    for (int i = 0; i < 6; i++)
        PyStructSequence_SET_ITEM(res, 4 + i, PyLong_FromUnsignedLongLong(counts[i]));
    PyStructSequence_SET_ITEM(res, 10, st->error[0] ? PyUnicode_DecodeUTF8(
        st->error, (Py_ssize_t)strlen(st->error), "replace") : Py_NewRef(Py_None));
    PyStructSequence_SET_ITEM(res, 11, PyLong_FromUnsignedLongLong(st->bounced));
    PyStructSequence_SET_ITEM(res, 12, PyLong_FromUnsignedLongLong(st->notified));
    PyStructSequence_SET_ITEM(res, 13, PyLong_FromUnsignedLongLong(st->kicks));
    PyStructSequence_SET_ITEM(res, 14, PyLong_FromUnsignedLongLong(st->pending));
    for (int i = 0; i < 15; i++)
        if (PyStructSequence_GET_ITEM(res, i) == NULL)
            return Py_DECREF(res), NULL;
    return res;
}

static PyObject *build_result(Queue *q, blkjob *b)
{
    ring_state *st = PyType_GetModuleState(Py_TYPE(q));
    PyObject *done = PyList_New(b->pushed ? 0 : (Py_ssize_t)b->served);
    PyObject *rest = PyList_New((Py_ssize_t)(b->j.nchains - b->served));
    int ok = done != NULL && rest != NULL;
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
        Py_XDECREF(done);
        Py_XDECREF(rest);
        return NULL;
    }
    return blk_result((PyTypeObject *)st->blk_result_type, b->pushed ? b->j.nchains : 0, done,
                      rest, b->counter, &b->st);
}

PyObject *Queue_serve_blk(Queue *q, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mem", "fd", "capacity", "seg_max", "readonly", "max_chains",
                             "inflight", "counter", "fd_fallback", "notify", NULL};
    PyObject *mem, *inflight = Py_None, *out = NULL;
    unsigned long long capacity, counter = 0;
    Py_ssize_t max_chains = 0;
    int fd, readonly, fd_fallback = -1, notify = 0;
    unsigned int seg_max;
    Py_buffer ib = {0};
    guestmem m;
    ctx c;
    blkjob *b = NULL;

    memset(&m, 0, sizeof m);
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OiKIp|nOKi$p:serve_blk", kwlist, &mem, &fd,
                                     &capacity, &seg_max, &readonly, &max_chains, &inflight,
                                     &counter, &fd_fallback, &notify))
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
    b->fd_fallback = fd_fallback;
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
        q->used_idx = c.used_idx; /* blk_publish advanced it */
    if (notify && (b->pushed || b->j.nchains == 0)) {
        /* What the caller would ask next (should_notify, then pending after
         * set_notification), in this call: the walk mapped the rings and, with EVENT_IDX,
         * already wrote avail_event for the new last_avail_idx. */
        b->st.notified = b->pushed && should_notify(q, &c);
        /* Full barrier: our used idx / avail_event stores before the avail idx re-read, or
         * a chain the driver adds meanwhile waits for a kick it will not send. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        b->st.pending = (uint16_t)(ld16(c.avail + 2) - q->last_avail_idx);
    }
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
