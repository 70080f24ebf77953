/* The serving thread of one blk queue: BlkAio.start() / stop().
 *
 * While it runs, the thread owns the queue: it waits (poll) on the driver's kick eventfd, the
 * engine's completion eventfd and a control eventfd, pops and submits batches (submit_run,
 * every rule of the walk), publishes completions with the inflight region kept (blk_publish)
 * and signals the driver's call eventfd, all without the GIL: Python is not on the path of a
 * read or write. Chains that are not reads, writes or flushes are listed for Python (pyfd
 * becomes readable; take_rest() hands them out, complete() gives their used lengths back to
 * the thread, which publishes them). Statistics accumulate here and are taken as deltas.
 *
 * stop() sets the stop flag and joins: the thread first waits for its I/O in flight and
 * publishes it, then the ring state (indices, signalled idx, inflight counter) goes back
 * to the SplitQueue object. A ring error (the walk's rules) stops the popping, keeps reaping,
 * and wakes Python, whose stop() raises it as the other paths do (the queue is broken).
 */
#include "_aio.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* Chains popped per submission, with the completions reaped after each: the driver sees the
 * first used entries while the rest are still being popped and refills on its own CPU (the
 * value and the measurements: SERVE_BATCH in edgevirt/backend/virtq/__init__.py). */
enum { SRV_BATCH = 8 };

static void kick_fd(int fd)
{
    uint64_t one = 1;
    (void)!write(fd, &one, sizeof one);
}

static void drain_fd(int fd)
{
    uint64_t v;
    (void)!read(fd, &v, sizeof v);
}

/* Publish n completions; signal the driver if it wants it. */
static void srv_publish(BlkAio *a, const uint32_t *ids, size_t n)
{
    srvstate *v = &a->srv;
    if (n == 0 || v->broken)
        return;
    blk_publish(&v->c, v->infl, ids, n);
    int sig = v->call >= 0 && need_notify(&v->signalled, v->c.used_idx, &v->c);
    if (sig)
        kick_fd(v->call);
    pthread_mutex_lock(&v->mu);
    v->pushed += n;
    v->notified += (unsigned long long)sig;
    pthread_mutex_unlock(&v->mu);
}

static void stats_add(blkstats *to, const blkstats *st)
{
    to->reads += st->reads;
    to->writes += st->writes;
    to->flushes += st->flushes;
    to->errors += st->errors;
    to->bytes_read += st->bytes_read;
    to->bytes_written += st->bytes_written;
    to->bounced += st->bounced;
    if (!to->error[0] && st->error[0])
        memcpy(to->error, st->error, sizeof to->error);
}

/* Append the chains of s->rest for Python (0, or -1 when out of memory). */
static int rest_add(srvstate *v, const submitjob *s)
{
    for (size_t i = 0; i < s->nrest; i++) {
        const chainrec *r = &s->j.chains[s->rest[i]];
        size_t need = 3 + 2 * (r->nread + r->nwrite);
        if (v->nrest + need > v->caprest) {
            size_t cap = (v->nrest + need) * 2;
            uint64_t *p = PyMem_RawRealloc(v->rest, cap * sizeof *p);
            if (p == NULL)
                return -1;
            v->rest = p;
            v->caprest = cap;
        }
        uint64_t *o = v->rest + v->nrest;
        *o++ = r->head;
        *o++ = r->nread;
        *o++ = r->nwrite;
        for (size_t k = 0; k < r->nread + r->nwrite; k++) {
            *o++ = s->j.segs[r->first + k].addr;
            *o++ = s->j.segs[r->first + k].len;
        }
        v->nrest += need;
    }
    return 0;
}

static void srv_reap(BlkAio *a, uint32_t *ids)
{
    srvstate *v = &a->srv;
    blkstats st;
    size_t n = 0;
    memset(&st, 0, sizeof st);
    for (aioreq *r = harvest(a, 0), *nx; r != NULL; r = nx) {
        uint32_t len;
        nx = r->next;
        req_finish(r, &st, &len);
        ids[2 * n] = r->head;
        ids[2 * n++ + 1] = len;
        req_free(a, r);
        a->nflight--;
    }
    if (n == 0)
        return;
    pthread_mutex_lock(&v->mu);
    stats_add(&v->acc, &st);
    pthread_mutex_unlock(&v->mu);
    srv_publish(a, ids, n);
}

/* Pop and submit until nothing is available; 0, or -1 when the queue broke. */
static int srv_submit(BlkAio *a, submitjob *s, uint32_t *ids)
{
    srvstate *v = &a->srv;
    size_t n = 0;
    do {
        if (n && ids != NULL) /* what completed meanwhile: the driver refills while we pop on */
            srv_reap(a, ids); /* (after the last batch srv_main reaps: not here too) */
        memset(s, 0, offsetof(submitjob, iov));
        s->j = (popjob){&v->c, SRV_BATCH, 0, 0, 0, NULL, NULL};
        s->infl = v->infl;
        s->counter = v->counter;
        submit_run(a, s);
        n = s->j.nchains;
        int failed = v->c.err.kind != ERR_NONE;
        if (!failed) {
            v->c.last_avail_idx = (uint16_t)(v->c.last_avail_idx + n);
            v->counter = s->counter;
        }
        pthread_mutex_lock(&v->mu);
        stats_add(&v->acc, &s->st);
        if (failed) {
            v->err = v->c.err;
            v->broken = 1;
        } else if (s->nrest && rest_add(v, s) < 0) {
            v->err.kind = ERR_NOMEM;
            v->broken = failed = 1;
        }
        int wake = failed || s->nrest;
        pthread_mutex_unlock(&v->mu);
        if (s->nids && !failed) { /* answered at once: published by submit_run */
            pthread_mutex_lock(&v->mu);
            v->pushed += s->nids;
            pthread_mutex_unlock(&v->mu);
            if (v->call >= 0 && need_notify(&v->signalled, v->c.used_idx, &v->c))
                kick_fd(v->call);
        }
        PyMem_RawFree(s->j.segs);
        PyMem_RawFree(s->j.chains);
        PyMem_RawFree(s->ids);
        PyMem_RawFree(s->rest);
        if (wake)
            kick_fd(v->pyfd);
        if (failed)
            return -1;
        /* A short batch took all there was. With EVENT_IDX the driver may have published
         * after our read of avail->idx and before our avail_event store, and skipped its
         * kick: look again after a full barrier. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    } while (n == SRV_BATCH || ld16(v->c.avail + 2) != v->c.last_avail_idx);
    return 0;
}

static void *srv_main(void *arg)
{
    BlkAio *a = arg;
    srvstate *v = &a->srv;
    submitjob *s = PyMem_RawMalloc(sizeof *s);
    uint32_t *ids = PyMem_RawMalloc(2 * (size_t)a->depth * sizeof *ids);
    uint32_t *py = PyMem_RawMalloc(2 * (size_t)a->depth * sizeof *py);
    struct pollfd pf[3] = {{v->kick, POLLIN, 0}, {a->efd, POLLIN, 0}, {v->ctl, POLLIN, 0}};
    int kicked = 1, stopping = 0; /* serve what the driver queued before we started */
    if (s == NULL || ids == NULL || py == NULL) {
        pthread_mutex_lock(&v->mu);
        v->err.kind = ERR_NOMEM;
        v->broken = 1;
        pthread_mutex_unlock(&v->mu);
        kick_fd(v->pyfd);
    }
    for (;;) {
        size_t np = 0;
        pthread_mutex_lock(&v->mu);
        if (py != NULL) {
            np = v->npy;
            memcpy(py, v->py, 2 * np * sizeof *py);
        }
        v->npy = 0;
        stopping = v->stop;
        pthread_mutex_unlock(&v->mu);
        if (np)
            srv_publish(a, py, np);
        if (kicked && !stopping && !v->broken && s != NULL)
            srv_submit(a, s, ids);
        kicked = 0;
        if (ids != NULL)
            srv_reap(a, ids);
        if (stopping && a->nflight == 0)
            break;
        if (poll(pf, 3, -1) < 0 && errno != EINTR)
            break; /* EFAULT/EINVAL/ENOMEM: cannot wait; stop() still joins us */
        if (pf[0].revents & POLLIN) {
            drain_fd(v->kick);
            kicked = 1;
            pthread_mutex_lock(&v->mu);
            v->kicks++;
            pthread_mutex_unlock(&v->mu);
        }
        if (pf[2].revents & POLLIN)
            drain_fd(v->ctl);
    }
    PyMem_RawFree(s);
    PyMem_RawFree(ids);
    PyMem_RawFree(py);
    return NULL;
}

/* ---- the Python face ---- */

PyObject *Aio_start(BlkAio *a, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"queue", "mem", "kick", "call", "inflight", "counter", NULL};
    ring_state *rs = PyType_GetModuleState(Py_TYPE(a));
    srvstate *v = &a->srv;
    PyObject *qo, *mem, *inflight = Py_None;
    int kick, call;
    unsigned long long counter = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!Oii|OK:start", kwlist, rs->queue_type, &qo,
                                     &mem, &kick, &call, &inflight, &counter))
        return NULL;
    Queue *q = (Queue *)qo;
    if (v->running)
        return PyErr_Format(PyExc_RuntimeError, "BlkAio.start: the thread already runs");
    if (a->nflight > 0 || kick < 0)
        return PyErr_Format(PyExc_RuntimeError, "BlkAio.start: %u requests in flight or no "
                            "kick fd (%d)", a->nflight, kick);
    if (q->size > a->depth)
        return PyErr_Format(PyExc_ValueError, "queue of %u entries, engine depth %u", q->size,
                            a->depth);
    mem_release(&a->m);
    Py_CLEAR(a->mem_obj);
    memset(&v->infl_buf, 0, sizeof v->infl_buf);
    if (begin(q, mem, &v->c, &a->m) < 0)
        goto fail;
    if (rings_map(&v->c) < 0) {
        raise_err(q, &v->c.err);
        goto fail;
    }
    if (inflight != Py_None) {
        if (PyObject_GetBuffer(inflight, &v->infl_buf, PyBUF_WRITABLE) < 0)
            goto fail;
        if ((size_t)v->infl_buf.len < 16 + (size_t)16 * q->size) {
            PyErr_Format(PyExc_ValueError, "inflight region of %zd bytes cannot track %u "
                         "descriptors", v->infl_buf.len, q->size);
            goto fail;
        }
    }
    a->mem_obj = Py_NewRef(mem);
    v->infl = v->infl_buf.obj != NULL ? v->infl_buf.buf : NULL;
    v->counter = counter;
    v->signalled = q->signalled_used;
    v->kick = kick;
    v->call = call;
    v->stop = v->broken = 0;
    v->npy = v->nrest = 0;
    memset(&v->acc, 0, sizeof v->acc);
    v->pushed = v->notified = v->kicks = 0;
    v->c.err.kind = ERR_NONE;
    if (pthread_create(&v->th, NULL, srv_main, a) != 0) {
        PyErr_SetString(PyExc_OSError, "BlkAio.start: cannot start the thread");
        goto fail;
    }
    v->running = 1;
    Py_RETURN_NONE;
fail:
    if (v->infl_buf.obj != NULL)
        PyBuffer_Release(&v->infl_buf);
    mem_release(&a->m);
    Py_CLEAR(a->mem_obj);
    return NULL;
}

int srv_join(BlkAio *a)
{
    srvstate *v = &a->srv;
    if (!v->running)
        return 0;
    pthread_mutex_lock(&v->mu);
    v->stop = 1;
    pthread_mutex_unlock(&v->mu);
    kick_fd(v->ctl);
    pthread_join(v->th, NULL);
    v->running = 0;
    return 1;
}

PyObject *Aio_stop(BlkAio *a, PyObject *qo)
{
    ring_state *rs = PyType_GetModuleState(Py_TYPE(a));
    srvstate *v = &a->srv;
    if (!PyObject_TypeCheck(qo, (PyTypeObject *)rs->queue_type))
        return PyErr_Format(PyExc_TypeError, "BlkAio.stop: expected a SplitQueue");
    if (!v->running)
        return PyErr_Format(PyExc_RuntimeError, "BlkAio.stop: the thread does not run");
    Queue *q = (Queue *)qo;
    Py_BEGIN_ALLOW_THREADS
    srv_join(a);
    Py_END_ALLOW_THREADS
    /* The ring state goes back to the queue: Python serves it from here on. */
    q->last_avail_idx = v->c.last_avail_idx;
    q->used_idx = v->c.used_idx;
    q->signalled_used = v->signalled;
    if (v->infl_buf.obj != NULL)
        PyBuffer_Release(&v->infl_buf);
    v->infl = NULL;
    mem_release(&a->m);
    Py_CLEAR(a->mem_obj);
    if (v->broken && v->err.kind != ERR_NONE) {
        err_t e = v->err;
        v->err.kind = ERR_NONE;
        return raise_err(q, &e);
    }
    return PyLong_FromUnsignedLongLong(v->counter);
}

static PyObject *segs_list(const uint64_t *p, size_t n)
{
    PyObject *l = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; l != NULL && i < n; i++) {
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)p[2 * i],
                                    (unsigned long long)p[2 * i + 1]);
        if (t == NULL)
            Py_CLEAR(l);
        else
            PyList_SET_ITEM(l, (Py_ssize_t)i, t);
    }
    return l;
}

PyObject *Aio_take_rest(BlkAio *a, PyObject *Py_UNUSED(ignored))
{
    srvstate *v = &a->srv;
    drain_fd(v->pyfd);
    pthread_mutex_lock(&v->mu);
    uint64_t *rest = v->rest;
    size_t n = v->nrest;
    v->rest = NULL;
    v->nrest = v->caprest = 0;
    pthread_mutex_unlock(&v->mu);
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out != NULL && i < n;) {
        size_t nr = (size_t)rest[i + 1], nw = (size_t)rest[i + 2];
        PyObject *t = Py_BuildValue("(KNN)", (unsigned long long)rest[i],
                                    segs_list(rest + i + 3, nr),
                                    segs_list(rest + i + 3 + 2 * nr, nw));
        if (t == NULL || PyList_Append(out, t) < 0)
            Py_CLEAR(out);
        Py_XDECREF(t);
        i += 3 + 2 * (nr + nw);
    }
    PyMem_RawFree(rest);
    return out;
}

PyObject *Aio_complete(BlkAio *a, PyObject *done)
{
    srvstate *v = &a->srv;
    PyObject *seq = PySequence_Fast(done, "BlkAio.complete: expected (head, len) pairs");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint32_t *ids = PyMem_Malloc(2 * (size_t)(n ? n : 1) * sizeof *ids);
    if (ids == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        unsigned int head, len;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "II", &head, &len))
            goto bad;
        if (head >= a->depth) {
            PyErr_Format(PyExc_ValueError, "BlkAio.complete: head %u >= %u", head, a->depth);
            goto bad;
        }
        ids[2 * k] = head;
        ids[2 * k + 1] = len;
    }
    Py_DECREF(seq);
    if (!v->running) {
        PyMem_Free(ids);
        return PyErr_Format(PyExc_RuntimeError, "BlkAio.complete: the thread does not run");
    }
    pthread_mutex_lock(&v->mu);
    /* Each chain is completed once and was popped by the thread: at most depth pending. */
    if (v->npy + (size_t)n > a->depth) {
        pthread_mutex_unlock(&v->mu);
        PyMem_Free(ids);
        return PyErr_Format(PyExc_ValueError, "BlkAio.complete: more completions than the "
                            "queue holds");
    }
    memcpy(v->py + 2 * v->npy, ids, 2 * (size_t)n * sizeof *ids);
    v->npy += (size_t)n;
    pthread_mutex_unlock(&v->mu);
    PyMem_Free(ids);
    kick_fd(v->ctl);
    Py_RETURN_NONE;
bad:
    Py_DECREF(seq);
    PyMem_Free(ids);
    return NULL;
}

PyObject *Aio_take_stats(BlkAio *a, PyObject *Py_UNUSED(ignored))
{
    ring_state *rs = PyType_GetModuleState(Py_TYPE(a));
    srvstate *v = &a->srv;
    blkstats st;
    pthread_mutex_lock(&v->mu);
    st = v->acc;
    st.notified = v->notified;
    st.kicks = v->kicks;
    size_t pushed = (size_t)v->pushed;
    memset(&v->acc, 0, sizeof v->acc);
    v->pushed = v->notified = v->kicks = 0;
    pthread_mutex_unlock(&v->mu);
    return blk_result((PyTypeObject *)rs->blk_result_type, pushed, PyList_New(0),
                      PyList_New(0), v->counter, &st);
}
