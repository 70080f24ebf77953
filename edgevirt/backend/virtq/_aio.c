/* Asynchronous virtio-blk request path: BlkAio, one per started queue.
 *
 * submit() pops a batch with the walk of pop() (every rule of DESIGN section 6), marks the
 * chains taken in the vhost-user inflight region, parses each with blk_parse() (the checks of
 * serve_blk) and starts its I/O: one io_uring submission for the whole batch, or a job per
 * request on a small thread pool where io_uring is missing or forbidden. A request that is
 * answered without I/O (IOERR) is published at once; any chain that is not a read, write or
 * flush goes back to Python as a popped chain (BlockDevice.handle serves it, as serve_blk's
 * rest). reap() runs when the engine's eventfd is readable: it writes the status bytes,
 * publishes the used entries in one go and clears the inflight marks (blk_publish). Used
 * entries come out of avail order, which split rings allow.
 *
 * Guest memory stays valid while I/O is in flight: the engine holds the buffers of mem.table
 * from the first submit until nothing is in flight, and the transport drains (reap(wait=True))
 * before it stops the queue or unmaps memory. A flush is a barrier: it starts after every
 * request submitted before it completed (IOSQE_IO_DRAIN, or the pool's barrier) and nothing
 * submitted after it starts before it ends, so it covers every write the guest saw complete.
 * With O_DIRECT a request whose buffers are not aligned to the file's DIO memory alignment
 * goes through an aligned bounce buffer (counted); one whose offset or length is not aligned
 * to its DIO offset alignment goes to the buffered fd.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "_aio.h"

/* ---- the request's completion ---- */

void req_free(BlkAio *a, aioreq *r)
{
    if (r->iov != &r->one)
        PyMem_RawFree(r->iov);
    PyMem_RawFree(r->guest);
    if (r->bounce != NULL)
        a->bounce_bytes -= r->len;
    free(r->bounce);
    r->iov = r->guest = NULL;
    r->bounce = NULL;
    r->busy = 0;
}

/* Status byte and counts of a finished request; written length into *written. */
int req_finish(aioreq *r, blkstats *st, uint32_t *written)
{
    int ok = r->res >= 0;
    *written = 1;
    if (r->kind == BLK_T_IN && ok) {
        uint64_t n = (uint64_t)r->res;
        if (r->bounce != NULL) { /* copy out what was read, zeros past a short read */
            uint64_t pos = 0;
            for (size_t i = 0; i < r->nguest; pos += r->guest[i].iov_len, i++)
                memcpy(r->guest[i].iov_base, (uint8_t *)r->bounce + pos, r->guest[i].iov_len);
            blk_zero_tail(r->guest, r->nguest, n);
        } else {
            blk_zero_tail(r->iov, (size_t)r->iovcnt, n);
        }
        st->bytes_written += r->len;
        *written = (uint32_t)(r->len + 1);
    } else if (r->kind == BLK_T_OUT && ok) {
        ok = (uint64_t)r->res == r->len;
        if (ok)
            st->bytes_read += r->len;
    }
    if (r->res < 0)
        blk_note(st, r->head, "%s at sector %llu: %s",
                 r->kind == BLK_T_IN ? "read" : r->kind == BLK_T_OUT ? "write" : "flush",
                 (unsigned long long)(r->off / BLK_SECTOR), strerror((int)-r->res));
    if (!ok)
        st->errors++;
    *r->status = ok ? BLK_S_OK : BLK_S_IOERR;
    return ok;
}

/* ---- submit ---- */

/* What every kernel with O_DIRECT accepts: each segment's address aligned to the DMA
 * alignment, its length to the logical block size (some kernels accept less, not all). */
static int aligned(const struct iovec *iov, size_t n, uint32_t mem_al, uint32_t len_al)
{
    for (size_t i = 0; i < n; i++)
        if ((uintptr_t)iov[i].iov_base % mem_al || iov[i].iov_len % len_al)
            return 0;
    return 1;
}

/* Fill r for a parsed read/write/flush; -1 on allocation failure. */
static int req_prepare(BlkAio *a, aioreq *r, const blkreq *p, const struct iovec *iov,
                       blkstats *st)
{
    memset(r, 0, sizeof *r);
    r->busy = 1;
    r->kind = (uint8_t)p->type;
    r->status = p->status;
    r->fd = a->d.fd;
    r->off = p->sector * BLK_SECTOR;
    r->len = p->len;
    if (p->type == BLK_T_FLUSH)
        return 0;
    if (a->direct && ((r->off | r->len) % a->align) && a->fd_buffered >= 0)
        r->fd = a->fd_buffered; /* DIO cannot address it: the page cache can */
    else if (a->direct && !aligned(iov, p->cnt, a->mem_align, a->align)) {
        st->bounced++;
        /* Bounce memory in flight is bounded: a guest making every request unaligned and
         * large cannot make us allocate queue size x request size. Past the budget the
         * page cache serves the request, which needs no copy of ours. */
        if (a->bounce_bytes + r->len > a->bounce_budget && a->fd_buffered >= 0) {
            r->fd = a->fd_buffered;
            goto direct_iov;
        }
        if (a->bounce_bytes + r->len > a->bounce_budget ||
            posix_memalign(&r->bounce, a->align > 64 ? a->align : 64, r->len ? r->len : 1))
            return r->bounce = NULL, -1;
        a->bounce_bytes += r->len;
        r->one = (struct iovec){r->bounce, (size_t)r->len};
        r->iov = &r->one;
        r->iovcnt = 1;
        if (p->type == BLK_T_OUT) { /* copied now: the guest cannot change it under the I/O */
            uint64_t pos = 0;
            for (size_t i = 0; i < p->cnt; pos += iov[i].iov_len, i++)
                memcpy((uint8_t *)r->bounce + pos, iov[i].iov_base, iov[i].iov_len);
            return 0;
        }
        if (!(r->guest = PyMem_RawMalloc(p->cnt * sizeof *iov)))
            return -1;
        memcpy(r->guest, iov, p->cnt * sizeof *iov);
        r->nguest = p->cnt;
        return 0;
    }
direct_iov:
    if (!(r->iov = PyMem_RawMalloc((p->cnt ? p->cnt : 1) * sizeof *iov)))
        return -1;
    memcpy(r->iov, iov, p->cnt * sizeof *iov);
    r->iovcnt = (int)p->cnt;
    return 0;
}

#ifdef HAVE_LIBURING
static void uring_queue(BlkAio *a, aioreq *r)
{
    struct io_uring_sqe *sqe;
    while ((sqe = io_uring_get_sqe(&a->ring)) == NULL)
        io_uring_submit(&a->ring);
    if (r->kind == BLK_T_FLUSH) {
        io_uring_prep_fsync(sqe, r->fd, IORING_FSYNC_DATASYNC);
        sqe->flags |= IOSQE_IO_DRAIN;
    } else if (r->kind == BLK_T_IN) {
        io_uring_prep_readv(sqe, r->fd, r->iov, (unsigned)r->iovcnt, r->off);
    } else {
        io_uring_prep_writev(sqe, r->fd, r->iov, (unsigned)r->iovcnt, r->off);
    }
    io_uring_sqe_set_data(sqe, r);
}
#endif

void submit_run(BlkAio *a, submitjob *s)
{
    ctx *c = s->j.c;
    pop_run(&s->j);
    if (c->err.kind != ERR_NONE || s->j.nchains == 0)
        return;
    size_t n = s->j.nchains;
    for (size_t k = 0; k < n; k++) { /* a head in flight twice is the driver's fault */
        uint16_t h = s->j.chains[k].head;
        if (h >= a->depth || a->reqs[h].busy) {
            for (size_t i = 0; i < k; i++)
                a->reqs[s->j.chains[i].head].busy = 0;
            snprintf(c->err.msg, sizeof c->err.msg, "chain head %u made available while it is "
                     "still in flight", h);
            c->err.kind = ERR_RING;
            c->err.rule = "head_in_flight";
            return;
        }
        a->reqs[h].busy = 2; /* this batch */
    }
    s->ids = PyMem_RawMalloc(2 * n * sizeof *s->ids);
    s->rest = PyMem_RawMalloc(n * sizeof *s->rest);
    if (s->ids == NULL || s->rest == NULL) {
        for (size_t k = 0; k < n; k++)
            a->reqs[s->j.chains[k].head].busy = 0;
        c->err.kind = ERR_NOMEM;
        return;
    }
    for (size_t k = 0; s->infl != NULL && k < n; k++)
        infl_taken(s->infl, &s->j, k, &s->counter);
    int queued = 0;
    for (size_t k = 0; k < n; k++) {
        uint16_t h = s->j.chains[k].head;
        aioreq *r = &a->reqs[h];
        blkreq p;
        r->busy = 0;
        if (!blk_parse(&s->j, k, &a->d, &s->st, s->iov, &p)) {
            s->rest[s->nrest++] = k;
            continue;
        }
        if (!p.ok || req_prepare(a, r, &p, s->iov, &s->st) < 0) {
            if (p.ok)
                blk_note(&s->st, h, "no memory for the request (or its bounce buffer)");
            req_free(a, r);
            s->st.errors++;
            *p.status = BLK_S_IOERR;
            s->ids[2 * s->nids] = h;
            s->ids[2 * s->nids++ + 1] = 1;
            continue;
        }
        r->head = h;
        a->nflight++;
#ifdef HAVE_LIBURING
        if (a->engine == ENG_URING) {
            uring_queue(a, r);
            queued++;
            continue;
        }
#endif
        pool_queue(a, r);
    }
#ifdef HAVE_LIBURING
    if (queued)
        io_uring_submit(&a->ring);
#endif
    (void)queued;
    blk_publish(c, s->infl, s->ids, s->nids);
}

/* ---- Python face ---- */

static int get_inflight(PyObject *inflight, Py_buffer *ib, uint32_t size)
{
    if (inflight == Py_None)
        return 0;
    if (PyObject_GetBuffer(inflight, ib, PyBUF_WRITABLE) < 0)
        return -1;
    if ((size_t)ib->len < 16 + (size_t)16 * size) {
        PyErr_Format(PyExc_ValueError, "inflight region of %zd bytes cannot track %u "
                     "descriptors", ib->len, size);
        PyBuffer_Release(ib);
        ib->obj = NULL;
        return -1;
    }
    return 0;
}

/* The ring state for publishing, over the memory held for the requests in flight. */
static int aio_ctx(BlkAio *a, Queue *q, ctx *c)
{
    *c = (ctx){q->desc, q->avail, q->used, q->size, q->last_avail_idx, q->used_idx,
               q->event_idx, &a->m, NULL, NULL, NULL, {0}};
    return rings_map(c);
}

static PyObject *Aio_submit(BlkAio *a, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"queue", "mem", "max_chains", "inflight", "counter", NULL};
    ring_state *rs = PyType_GetModuleState(Py_TYPE(a));
    PyObject *qo, *mem, *inflight = Py_None, *out = NULL;
    Py_ssize_t max_chains = 0;
    unsigned long long counter = 0;
    Py_buffer ib = {0};
    ctx c;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O|nOK:submit", kwlist, rs->queue_type, &qo,
                                     &mem, &max_chains, &inflight, &counter))
        return NULL;
    Queue *q = (Queue *)qo;
    if (a->srv.running)
        return PyErr_Format(PyExc_RuntimeError, "BlkAio.submit: the serving thread owns it");
    if (max_chains < 0)
        return PyErr_Format(PyExc_ValueError, "max_chains %zd < 0", max_chains);
    if (q->size > a->depth)
        return PyErr_Format(PyExc_ValueError, "queue of %u entries, engine depth %u", q->size,
                            a->depth);
    if (a->nflight > 0 && mem != a->mem_obj)
        return PyErr_Format(PyExc_RuntimeError, "BlkAio.submit: new guest memory while %u "
                            "requests are in flight (reap(wait=True) first)", a->nflight);
    if (get_inflight(inflight, &ib, q->size) < 0)
        return NULL;
    if (a->nflight == 0) { /* (re)acquire: the table may have changed since */
        mem_release(&a->m);
        Py_CLEAR(a->mem_obj);
        if (begin(q, mem, &c, &a->m) < 0) {
            mem_release(&a->m);
            goto done;
        }
        a->mem_obj = Py_NewRef(mem);
    }
    submitjob *s = PyMem_RawCalloc(1, sizeof *s);
    if (s == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    c = (ctx){q->desc, q->avail, q->used, q->size, q->last_avail_idx, q->used_idx,
              q->event_idx, &a->m, NULL, NULL, NULL, {0}};
    if (q->broken != NULL) {
        PyErr_Format(rs->ring_error, "queue is broken: %U", q->broken);
        goto free;
    }
    s->j = (popjob){&c, (size_t)max_chains, 0, 0, 0, NULL, NULL};
    s->infl = ib.obj != NULL ? ib.buf : NULL;
    s->counter = counter;
    Py_BEGIN_ALLOW_THREADS
    submit_run(a, s);
    Py_END_ALLOW_THREADS
    if (c.err.kind != ERR_NONE) {
        raise_err(q, &c.err);
        goto free;
    }
    q->last_avail_idx = (uint16_t)(c.last_avail_idx + s->j.nchains);
    q->used_idx = c.used_idx;
    a->total_bounced += s->st.bounced;
    PyObject *rest = PyList_New((Py_ssize_t)s->nrest), *none = PyList_New(0);
    for (size_t i = 0; rest != NULL && i < s->nrest; i++) {
        PyObject *t = chain_tuple(&s->j, s->rest[i]);
        if (t == NULL)
            Py_CLEAR(rest);
        else
            PyList_SET_ITEM(rest, (Py_ssize_t)i, t);
    }
    if (rest == NULL || none == NULL) {
        Py_XDECREF(rest);
        Py_XDECREF(none);
        goto free;
    }
    out = blk_result((PyTypeObject *)rs->blk_result_type, s->nids, none, rest, s->counter,
                     &s->st);
free:
    PyMem_RawFree(s->j.segs);
    PyMem_RawFree(s->j.chains);
    PyMem_RawFree(s->ids);
    PyMem_RawFree(s->rest);
    PyMem_RawFree(s);
done:
    if (ib.obj != NULL)
        PyBuffer_Release(&ib);
    if (a->nflight == 0) {
        mem_release(&a->m);
        Py_CLEAR(a->mem_obj);
    }
    return out;
}

/* Without the GIL: collect finished requests (waiting for one if wait and none is ready). */
aioreq *harvest(BlkAio *a, int wait)
{
    aioreq *list = NULL;
    uint64_t v;
    (void)!read(a->efd, &v, sizeof v); /* first: a completion after this re-arms it */
#ifdef HAVE_LIBURING
    if (a->engine == ENG_URING) {
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        if (wait && !io_uring_cq_ready(&a->ring))
            io_uring_wait_cqe(&a->ring, &cqe);
        io_uring_for_each_cqe(&a->ring, head, cqe) {
            aioreq *r = io_uring_cqe_get_data(cqe);
            r->res = cqe->res;
            r->next = list;
            list = r;
            seen++;
        }
        io_uring_cq_advance(&a->ring, seen);
    } else
#endif
        list = pool_take(a, wait);
    aioreq *fifo = NULL; /* both lists are newest first: publish in completion order */
    while (list != NULL) {
        aioreq *nx = list->next;
        list->next = fifo;
        fifo = list;
        list = nx;
    }
    return fifo;
}

static PyObject *Aio_reap(BlkAio *a, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"queue", "inflight", "wait", "call", NULL};
    ring_state *rs = PyType_GetModuleState(Py_TYPE(a));
    PyObject *qo, *inflight = Py_None;
    int wait = 0, call = -1;
    Py_buffer ib = {0};
    blkstats st;
    ctx c;
    size_t n = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|Opi:reap", kwlist, rs->queue_type, &qo,
                                     &inflight, &wait, &call))
        return NULL;
    Queue *q = (Queue *)qo;
    if (a->srv.running)
        return PyErr_Format(PyExc_RuntimeError, "BlkAio.reap: the serving thread owns it");
    memset(&st, 0, sizeof st);
    if (a->nflight == 0) {
        uint64_t v;
        (void)!read(a->efd, &v, sizeof v);
        return blk_result((PyTypeObject *)rs->blk_result_type, 0, PyList_New(0),
                          PyList_New(0), 0, &st);
    }
    if (get_inflight(inflight, &ib, q->size) < 0)
        return NULL;
    uint32_t *ids = PyMem_RawMalloc(2 * (size_t)a->nflight * sizeof *ids);
    if (ids == NULL) {
        if (ib.obj != NULL)
            PyBuffer_Release(&ib);
        return PyErr_NoMemory();
    }
    /* A broken or different queue: the I/O ends, its chains are no longer ours to publish. */
    int publish = q->broken == NULL && aio_ctx(a, q, &c) == 0;
    Py_BEGIN_ALLOW_THREADS
    do {
        for (aioreq *r = harvest(a, wait), *nx; r != NULL; r = nx) {
            nx = r->next;
            uint32_t len;
            if (publish) {
                req_finish(r, &st, &len);
                ids[2 * n] = r->head;
                ids[2 * n + 1] = len;
                n++;
            }
            req_free(a, r);
            a->nflight--;
        }
    } while (wait && a->nflight > 0);
    if (publish)
        blk_publish(&c, ib.obj != NULL ? ib.buf : NULL, ids, n);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(ids);
    if (ib.obj != NULL)
        PyBuffer_Release(&ib);
    if (publish) {
        q->used_idx = c.used_idx;
        /* The driver's call, here rather than in Python: one wake-up of the loop per batch
         * of completions costs a reap and nothing else. */
        if (n && call >= 0 && should_notify(q, &c)) {
            uint64_t one = 1;
            if (write(call, &one, sizeof one) == sizeof one)
                st.notified = 1;
        }
    }
    if (a->nflight == 0) {
        mem_release(&a->m);
        Py_CLEAR(a->mem_obj);
    }
    return blk_result((PyTypeObject *)rs->blk_result_type, n, PyList_New(0), PyList_New(0), 0,
                      &st);
}

static void aio_shutdown(BlkAio *a)
{
    srv_join(a); /* the thread publishes what it has in flight, then ends */
    /* Wait for every request the kernel or a worker still has: their buffers are ours. */
    while (a->nflight > 0) {
        for (aioreq *r = harvest(a, 1), *nx; r != NULL; r = nx) {
            nx = r->next;
            req_free(a, r);
            a->nflight--;
        }
    }
#ifdef HAVE_LIBURING
    if (a->ring_up) {
        io_uring_queue_exit(&a->ring);
        a->ring_up = 0;
    }
#endif
    pool_stop(a);
    if (a->efd >= 0)
        close(a->efd);
    a->efd = -1;
    if (a->srv.ctl >= 0) {
        close(a->srv.ctl);
        close(a->srv.pyfd);
        pthread_mutex_destroy(&a->srv.mu);
        a->srv.ctl = a->srv.pyfd = -1;
    }
    PyMem_RawFree(a->srv.py);
    PyMem_RawFree(a->srv.rest);
    a->srv.py = NULL;
    a->srv.rest = NULL;
}

/* With the GIL, after aio_shutdown: what the thread held for Python objects. */
static void aio_release(BlkAio *a)
{
    if (a->srv.infl_buf.obj != NULL)
        PyBuffer_Release(&a->srv.infl_buf);
    mem_release(&a->m);
    Py_CLEAR(a->mem_obj);
}

static PyObject *Aio_close(BlkAio *a, PyObject *Py_UNUSED(ignored))
{
    Py_BEGIN_ALLOW_THREADS
    aio_shutdown(a);
    Py_END_ALLOW_THREADS
    aio_release(a);
    Py_RETURN_NONE;
}

static PyObject *Aio_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "capacity", "seg_max", "readonly", "depth", "engine",
                             "direct", "align", "mem_align", "fd_buffered", "bounce_budget",
                             NULL};
    int fd, readonly, direct = 0, fd_buffered = -1;
    unsigned long long capacity, bounce_budget = BOUNCE_BUDGET;
    unsigned int seg_max, depth, align = 512, mem_align = 0;
    const char *engine = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKIpI|spIIiK:BlkAio", kwlist, &fd,
                                     &capacity, &seg_max, &readonly, &depth, &engine, &direct,
                                     &align, &mem_align, &fd_buffered, &bounce_budget))
        return NULL;
    if (fd < 0 || seg_max < 1 || seg_max > BLK_MAX_SEG_MAX || depth < 1 ||
        depth > MAX_QUEUE_SIZE || capacity > (unsigned long long)INT64_MAX / BLK_SECTOR ||
        align < 512 || align > 65536 || (align & (align - 1)) || mem_align > align ||
        (mem_align & (mem_align - 1)))
        return PyErr_Format(PyExc_ValueError, "BlkAio: fd %d, seg_max %u (1..%d), depth %u "
                            "(1..%d), capacity %llu (< 2^54), align %u (power of two "
                            "512..65536) or mem_align %u (power of two <= align) out of range",
                            fd, seg_max, BLK_MAX_SEG_MAX, depth, MAX_QUEUE_SIZE, capacity,
                            align, mem_align);
    int want_uring = !strcmp(engine, "auto") || !strcmp(engine, "io_uring");
    if (!want_uring && strcmp(engine, "threads"))
        return PyErr_Format(PyExc_ValueError, "BlkAio: engine %s, expected auto, io_uring or "
                            "threads", engine);
    BlkAio *a = (BlkAio *)tp->tp_alloc(tp, 0);
    if (a == NULL)
        return NULL;
    a->d = (blkdev){fd, readonly, capacity, seg_max};
    a->fd_buffered = fd_buffered;
    a->direct = direct;
    a->align = align;
    a->mem_align = mem_align ? mem_align : align;
    a->bounce_budget = bounce_budget;
    a->depth = depth;
    a->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    a->srv.ctl = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    a->srv.pyfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    a->srv.kick = a->srv.call = -1;
    pthread_mutex_init(&a->srv.mu, NULL);
    a->reqs = PyMem_RawCalloc(depth, sizeof *a->reqs);
    a->srv.py = PyMem_RawMalloc(2 * (size_t)depth * sizeof *a->srv.py);
    if (a->srv.ctl < 0 || a->srv.pyfd < 0) { /* close() in shutdown needs both or neither */
        if (a->srv.ctl >= 0)
            close(a->srv.ctl);
        if (a->srv.pyfd >= 0)
            close(a->srv.pyfd);
        a->srv.ctl = a->srv.pyfd = -1;
        pthread_mutex_destroy(&a->srv.mu);
    }
    if (a->efd < 0 || a->srv.ctl < 0 || a->reqs == NULL || a->srv.py == NULL) {
        PyErr_SetFromErrno(a->efd < 0 ? PyExc_OSError : PyExc_MemoryError);
        Py_DECREF(a);
        return NULL;
    }
    a->engine = ENG_THREADS;
    a->why = want_uring ? "built without liburing" : "thread pool asked for";
#ifdef HAVE_LIBURING
    if (want_uring) {
        unsigned entries = depth < URING_ENTRIES ? depth : URING_ENTRIES;
        int rc = io_uring_queue_init(entries, &a->ring, 0);
        if (rc == 0 && (rc = io_uring_register_eventfd(&a->ring, a->efd)) < 0)
            io_uring_queue_exit(&a->ring);
        if (rc == 0) {
            a->ring_up = 1;
            a->engine = ENG_URING;
            a->why = "io_uring";
        } else {
            a->why = rc == -EPERM || rc == -EACCES ? "io_uring forbidden (EPERM)"
                     : rc == -ENOSYS             ? "io_uring not in this kernel (ENOSYS)"
                                                 : "io_uring setup failed";
        }
    }
#endif
    if (a->engine == ENG_URING)
        return (PyObject *)a;
    if (!want_uring || strcmp(engine, "io_uring")) {
        if (pool_start(a) == 0)
            return (PyObject *)a;
        PyErr_SetString(PyExc_OSError, "BlkAio: cannot start the I/O threads");
    } else {
        PyErr_Format(PyExc_OSError, "BlkAio: engine io_uring asked for: %s", a->why);
    }
    Py_DECREF(a);
    return NULL;
}

static void Aio_dealloc(BlkAio *a)
{
    PyTypeObject *tp = Py_TYPE(a);
    Py_BEGIN_ALLOW_THREADS
    aio_shutdown(a);
    Py_END_ALLOW_THREADS
    aio_release(a);
    PyMem_RawFree(a->reqs);
    tp->tp_free(a);
    Py_DECREF(tp);
}

static PyObject *Aio_get(BlkAio *a, void *which)
{
    switch ((intptr_t)which) {
    case 0: return PyUnicode_FromString(a->engine == ENG_URING ? "io_uring" : "threads");
    case 1: return PyUnicode_FromString(a->why);
    case 2: return PyLong_FromLong(a->efd);
    case 3: return PyLong_FromUnsignedLong(a->nflight);
    case 5: return PyLong_FromLong(a->srv.pyfd);
    case 6: return PyBool_FromLong(a->srv.running);
    case 7: return PyBool_FromLong(a->srv.broken);
    default: return PyLong_FromUnsignedLongLong(a->total_bounced);
    }
}

static PyGetSetDef Aio_getset[] = {
    {"engine", (getter)Aio_get, NULL, "'io_uring' or 'threads'", (void *)0},
    {"reason", (getter)Aio_get, NULL, "why this engine (io_uring, or why not)", (void *)1},
    {"eventfd", (getter)Aio_get, NULL, "readable when completions wait for reap()", (void *)2},
    {"in_flight", (getter)Aio_get, NULL, "requests submitted and not reaped", (void *)3},
    {"bounced", (getter)Aio_get, NULL, "requests bounced so far (submit path)", (void *)4},
    {"wakeup_fd", (getter)Aio_get, NULL, "readable when the thread has chains for Python or "
     "the queue broke", (void *)5},
    {"running", (getter)Aio_get, NULL, "the serving thread runs", (void *)6},
    {"broken", (getter)Aio_get, NULL, "the serving thread found a ring error (stop() raises "
     "it)", (void *)7},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Aio_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))Aio_submit, METH_VARARGS | METH_KEYWORDS,
     "submit(queue, mem, max_chains=0, inflight=None, counter=0) -> BlkResult: start the "
     "I/O of a batch; pushed = chains answered at once, rest = chains for Python"},
    {"reap", (PyCFunction)(void (*)(void))Aio_reap, METH_VARARGS | METH_KEYWORDS,
     "reap(queue, inflight=None, wait=False, call=-1) -> BlkResult: publish finished "
     "requests (all of them with wait), signal the call eventfd if the driver wants it"},
    {"start", (PyCFunction)(void (*)(void))Aio_start, METH_VARARGS | METH_KEYWORDS,
     "start(queue, mem, kick, call, inflight=None, counter=0): serve the queue on a thread"},
    {"stop", (PyCFunction)Aio_stop, METH_O,
     "stop(queue) -> inflight counter: finish the I/O in flight, give the ring state back "
     "(raises the ring error that stopped the thread, if any)"},
    {"take_rest", (PyCFunction)Aio_take_rest, METH_NOARGS,
     "take_rest() -> chains the thread left to Python, as pop() gives them"},
    {"complete", (PyCFunction)Aio_complete, METH_O,
     "complete([(head, len), ...]): the thread publishes these chains from take_rest()"},
    {"take_stats", (PyCFunction)Aio_take_stats, METH_NOARGS,
     "take_stats() -> BlkResult: what the thread served since the last call"},
    {"close", (PyCFunction)Aio_close, METH_NOARGS, "wait for the I/O in flight, release all"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Aio_slots[] = {
    {Py_tp_doc, "BlkAio(fd, capacity, seg_max, readonly, depth, engine='auto', direct=False, "
                "align=512, mem_align=align, fd_buffered=-1, bounce_budget=32 MiB): the "
                "asynchronous virtio-blk request path of one queue"},
    {Py_tp_new, Aio_new},
    {Py_tp_dealloc, Aio_dealloc},
    {Py_tp_methods, Aio_methods},
    {Py_tp_getset, Aio_getset},
    {0, NULL},
};

static PyType_Spec Aio_spec = {
    "edgevirt.backend.virtq._ring.BlkAio", sizeof(BlkAio), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE, Aio_slots,
};

PyType_Spec *blk_aio_spec(void) { return &Aio_spec; }
