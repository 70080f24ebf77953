/* Split virtqueue, device side (virtio 1.x section 2.7), hardened per DESIGN section 6.
 *
 * Same API and the same error messages as pyring.py, the pure-Python reference; one test
 * suite runs against both, plus differential property tests. serve_blk(), the virtio-blk
 * request path on top of the same walk, lives in _blk.c. The guest is hostile: every
 * value read from its memory is checked before use, every address is bounds checked against
 * mem.table without forming gpa + len, and the first violation marks the queue broken.
 *
 * desc  = size x {le64 addr, le32 len, le16 flags, le16 next}
 * avail = le16 flags, le16 idx, le16 ring[size], le16 used_event
 * used  = le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event
 */
#include "_ring.h"

#include <structmember.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* ---- guest memory: the windows of mem.table, buffers held for one call ---- */

void mem_release(guestmem *m)
{
    for (Py_ssize_t i = 0; i < m->held; i++)
        PyBuffer_Release(&m->views[i]);
    PyMem_Free(m->views);
    PyMem_Free(m->win);
    Py_CLEAR(m->seq);
    memset(m, 0, sizeof *m);
}

/* 0, or -1 with an exception set; mem_release() is always the caller's to call. */
static int mem_acquire(PyObject *mem, guestmem *m)
{
    PyObject *table = PyObject_GetAttrString(mem, "table");
    if (table == NULL)
        return -1;
    m->seq = PySequence_Tuple(table); /* our own copy: __index__ below cannot resize it */
    Py_DECREF(table);
    if (m->seq == NULL)
        return -1;
    m->n = PyTuple_GET_SIZE(m->seq);
    m->views = PyMem_Calloc((size_t)m->n + 1, sizeof(Py_buffer));
    m->win = PyMem_Calloc((size_t)m->n + 1, sizeof(window));
    if (m->views == NULL || m->win == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < m->n; i++) {
        PyObject *item = PyTuple_GET_ITEM(m->seq, i), *idx;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_Format(PyExc_TypeError, "mem.table[%zd] must be a (gpa, buffer) tuple", i);
            return -1;
        }
        if ((idx = PyNumber_Index(PyTuple_GET_ITEM(item, 0))) == NULL)
            return -1;
        unsigned long long gpa = PyLong_AsUnsignedLongLong(idx);
        Py_DECREF(idx);
        if ((gpa == (unsigned long long)-1 && PyErr_Occurred()) ||
            PyObject_GetBuffer(PyTuple_GET_ITEM(item, 1), &m->views[i], PyBUF_WRITABLE) < 0)
            return -1;
        m->held = i + 1;
        m->win[i] = (window){gpa, (uint64_t)m->views[i].len, m->views[i].buf};
        if (m->win[i].size > UINT64_MAX - gpa) {
            char msg[128];
            snprintf(msg, sizeof msg, "mem.table[%zd]: region at 0x%llx of %zd bytes wraps "
                     "the 64-bit address space", i, gpa, m->views[i].len);
            PyErr_SetString(PyExc_ValueError, msg);
            return -1;
        }
    }
    return 0;
}

/* Host pointer of [gpa, gpa+len) if it lies inside one window; no gpa+len is ever formed. */
uint8_t *mem_find(const guestmem *m, uint64_t gpa, uint64_t len)
{
    for (Py_ssize_t i = 0; i < m->n; i++) {
        const window *w = &m->win[i];
        if (gpa >= w->gpa && gpa - w->gpa <= w->size && len <= w->size - (gpa - w->gpa))
            return w->host + (gpa - w->gpa);
    }
    return NULL;
}

/* ---- errors found without the GIL: formatted into a buffer, raised afterwards ---- */

static int ring_fail(err_t *e, const char *rule, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int ring_fail(err_t *e, const char *rule, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->kind = ERR_RING;
    e->rule = rule;
    return -1;
}

static int mem_fail(err_t *e, const guestmem *m, const char *what, uint64_t gpa, uint64_t len)
{
    size_t n = (size_t)snprintf(e->msg, sizeof e->msg, "%s [0x%llx, +0x%llx) lies outside "
                                "the carve-out (", what, (unsigned long long)gpa,
                                (unsigned long long)len);
    for (Py_ssize_t i = 0; i < m->n && i < MAX_WINDOWS_SHOWN && n < sizeof e->msg; i++)
        n += (size_t)snprintf(e->msg + n, sizeof e->msg - n, "%s[0x%llx, 0x%llx)",
                              i ? ", " : "", (unsigned long long)m->win[i].gpa,
                              (unsigned long long)(m->win[i].gpa + m->win[i].size));
    if (n < sizeof e->msg)
        snprintf(e->msg + n, sizeof e->msg - n, "%s)", m->n == 0 ? "nothing mapped"
                 : m->n > MAX_WINDOWS_SHOWN ? ", ..." : "");
    e->kind = ERR_MEM;
    return -1;
}

int rings_map(ctx *c)
{
    uint64_t n = c->size;
    if (!(c->desc = mem_find(c->m, c->desc_gpa, 16 * n)))
        return mem_fail(&c->err, c->m, "desc table", c->desc_gpa, 16 * n);
    if (!(c->avail = mem_find(c->m, c->avail_gpa, 6 + 2 * n)))
        return mem_fail(&c->err, c->m, "avail ring", c->avail_gpa, 6 + 2 * n);
    if (!(c->used = mem_find(c->m, c->used_gpa, 6 + 8 * n)))
        return mem_fail(&c->err, c->m, "used ring", c->used_gpa, 6 + 8 * n);
    return 0;
}

static int avail_count(ctx *c, uint16_t *n)
{
    uint16_t avail_idx = ld16(c->avail + 2);
    *n = (uint16_t)(avail_idx - c->last_avail_idx);
    if (*n > c->size)
        return ring_fail(&c->err, "avail_idx", "avail idx %u is %u ahead of last_avail_idx "
                         "%u, more than queue size %u", avail_idx, *n, c->last_avail_idx,
                         c->size);
    return 0;
}

/* ---- pop: runs without the GIL ---- */

static int walk_chain(popjob *j, uint16_t head, chainrec *rec)
{
    err_t *e = &j->c->err;
    const uint8_t *table = j->c->desc;
    uint32_t max = j->c->size, count = 0, i = head;
    int indirect = 0;
    uint64_t total = 0;
    char what[96];

    *rec = (chainrec){head, j->nsegs, 0, 0};
    for (;;) {
        const char *kind = indirect ? "indirect descriptor" : "descriptor";
        uint8_t raw[16];
        if (++count > max)
            return ring_fail(e, "loop", "chain %u: more than %u descriptors in the %s table "
                             "(loop)", head, max, indirect ? "indirect" : "desc");
        memcpy(raw, table + 16 * (size_t)i, 16);
        /* Compiler barrier: decode only the private copy, the guest may rewrite the original. */
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        uint64_t addr = get_le(raw, 8);
        uint32_t len = (uint32_t)get_le(raw + 8, 4);
        uint16_t flags = (uint16_t)get_le(raw + 12, 2), next = (uint16_t)get_le(raw + 14, 2);

        if (flags & DESC_F_INDIRECT) {
            if (indirect)
                return ring_fail(e, "indirect_nested", "chain %u: %s %u: indirect table "
                                 "inside an indirect table", head, kind, i);
            if (flags & DESC_F_NEXT)
                return ring_fail(e, "indirect_next", "chain %u: %s %u: INDIRECT combined "
                                 "with NEXT", head, kind, i);
            if (len == 0 || len % 16 || len > 16u * MAX_INDIRECT)
                return ring_fail(e, "indirect_len", "chain %u: %s %u: indirect table length "
                                 "%u is not a non-zero multiple of 16 up to %u", head, kind, i,
                                 len, 16u * MAX_INDIRECT);
            if (!(table = mem_find(j->c->m, addr, len))) {
                snprintf(what, sizeof what, "chain %u: %s %u: indirect table", head, kind, i);
                return mem_fail(e, j->c->m, what, addr, len);
            }
            max = len / 16;
            i = count = 0;
            indirect = 1;
            continue;
        }
        if (len == 0)
            return ring_fail(e, "zero_len", "chain %u: %s %u: length 0", head, kind, i);
        if (!(flags & DESC_F_WRITE) && rec->nwrite)
            return ring_fail(e, "write_before_read", "chain %u: %s %u: device-readable after "
                             "device-writable", head, kind, i);
        uint8_t *host = mem_find(j->c->m, addr, len);
        if (host == NULL) {
            snprintf(what, sizeof what, "chain %u: %s %u: buffer", head, kind, i);
            return mem_fail(e, j->c->m, what, addr, len);
        }
        total += len; /* at most (32768 + 65535) * (2^32 - 1): cannot wrap */
        if (total > UINT32_MAX)
            return ring_fail(e, "chain_len", "chain %u: %s %u: chain length %llu >= 2^32",
                             head, kind, i, (unsigned long long)total);
        if (j->nsegs == j->capsegs) {
            size_t cap = j->capsegs ? 2 * j->capsegs : 64;
            seg *s = PyMem_RawRealloc(j->segs, cap * sizeof *s); /* fine without the GIL */
            if (s == NULL)
                return e->kind = ERR_NOMEM, -1;
            j->segs = s;
            j->capsegs = cap;
        }
        j->segs[j->nsegs++] = (seg){addr, host, len};
        *(flags & DESC_F_WRITE ? &rec->nwrite : &rec->nread) += 1;
        if (!(flags & DESC_F_NEXT))
            return 0;
        if (next >= max)
            return ring_fail(e, "next", "chain %u: %s %u: next %u >= table size %u", head,
                             kind, i, next, max);
        i = next;
    }
}

void pop_run(popjob *j)
{
    ctx *c = j->c;
    uint16_t n;
    if (rings_map(c) < 0 || avail_count(c, &n) < 0)
        return;
    /* Acquire: pairs with the driver's barrier before its idx store, so the ring entries
     * and descriptors read below are at least as new as the idx just read. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (j->max_chains && j->max_chains < n)
        n = (uint16_t)j->max_chains;
    if (!(j->chains = PyMem_RawMalloc(((size_t)n + 1) * sizeof *j->chains))) {
        c->err.kind = ERR_NOMEM;
        return;
    }
    for (uint16_t k = 0; k < n && j->nsegs < POP_SEGMENT_BUDGET; k++) {
        uint16_t slot = (uint16_t)(c->last_avail_idx + k) & (uint16_t)(c->size - 1);
        uint16_t head = ld16(c->avail + 4 + 2 * (size_t)slot);
        if (head >= c->size) {
            ring_fail(&c->err, "head", "avail ring slot %u: head %u >= queue size %u", slot,
                      head, c->size);
            return;
        }
        if (walk_chain(j, head, &j->chains[j->nchains]) < 0)
            return;
        j->nchains++;
    }
    if (c->event_idx) /* avail_event: the driver kicks once it makes entry last+n available */
        st16(c->used + 4 + 8 * (size_t)c->size, (uint16_t)(c->last_avail_idx + j->nchains));
}

/* ---- the SplitQueue type ---- */

static PyObject *raise_ring(ring_state *st, PyObject *msg, const char *rule)
{
    PyObject *exc = msg ? PyObject_CallFunction(st->ring_error, "Os", msg, rule) : NULL;
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    Py_XDECREF(msg);
    return NULL;
}

/* Raise what the C code found; a guest's fault marks the queue broken and is logged. */
PyObject *raise_err(Queue *q, const err_t *e)
{
    ring_state *st = PyType_GetModuleState(Py_TYPE(q));
    if (e->kind == ERR_NOMEM)
        return PyErr_NoMemory();
    PyObject *msg = PyUnicode_FromString(e->msg), *r;
    if (msg == NULL)
        return NULL;
    Py_XSETREF(q->broken, Py_NewRef(msg));
    if ((r = PyObject_CallMethod(st->log, "error", "sO", "virtqueue broken: %s", msg)) == NULL)
        return Py_DECREF(msg), NULL;
    Py_DECREF(r);
    if (e->kind == ERR_RING)
        return raise_ring(st, msg, e->rule);
    PyErr_SetObject(st->mem_error, msg);
    return Py_DECREF(msg), NULL;
}

/* Start of every ring call: refuse a broken queue, snapshot state, acquire guest memory. */
int begin(Queue *q, PyObject *mem, ctx *c, guestmem *m)
{
    memset(m, 0, sizeof *m);
    *c = (ctx){q->desc, q->avail, q->used, q->size, q->last_avail_idx, q->used_idx,
               q->event_idx, m, NULL, NULL, NULL, {0}};
    if (q->broken != NULL)
        return raise_ring(PyType_GetModuleState(Py_TYPE(q)),
                          PyUnicode_FromFormat("queue is broken: %U", q->broken), "broken"),
               -1;
    return mem_acquire(mem, m);
}

/* Tuples built directly: Py_BuildValue's format parsing would dominate a pop. */
static PyObject *pair(PyObject *a, PyObject *b)
{
    PyObject *t = a != NULL && b != NULL ? PyTuple_New(2) : NULL;
    if (t == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, a);
    PyTuple_SET_ITEM(t, 1, b);
    return t;
}

static PyObject *seg_list(const seg *s, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list != NULL && i < n; i++) {
        PyObject *t = pair(PyLong_FromUnsignedLongLong(s[i].addr),
                           PyLong_FromUnsignedLong(s[i].len));
        if (t == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

/* Chain k of a finished pop job as (head, readable, writable). */
PyObject *chain_tuple(const popjob *j, size_t k)
{
    const chainrec *r = &j->chains[k];
    PyObject *rd = seg_list(j->segs + r->first, r->nread);
    PyObject *wr = seg_list(j->segs + r->first + r->nread, r->nwrite);
    PyObject *head = PyLong_FromLong(r->head), *t = PyTuple_New(3);
    if (rd == NULL || wr == NULL || head == NULL || t == NULL) {
        Py_XDECREF(rd);
        Py_XDECREF(wr);
        Py_XDECREF(head);
        Py_XDECREF(t);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, head);
    PyTuple_SET_ITEM(t, 1, rd);
    PyTuple_SET_ITEM(t, 2, wr);
    return t;
}

/* pop(): a list of (head, readable, writable) tuples. */
static PyObject *pop_list(const popjob *j)
{
    PyObject *out = PyList_New((Py_ssize_t)j->nchains);
    for (size_t k = 0; out != NULL && k < j->nchains; k++) {
        PyObject *t = chain_tuple(j, k);
        if (t == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)k, t);
    }
    return out;
}

/* pop_batch(): the same chains as two flat little-endian records, no object per chain:
 * chains = n x {u32 head, u32 readable, u32 writable, u32 first segment},
 * segments = m x {u64 gpa, u64 len}, readable then writable buffers of each chain. */
static PyObject *pop_records(const popjob *j)
{
    PyObject *chains = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(16 * j->nchains));
    PyObject *segs = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(16 * j->nsegs)), *out = NULL;
    if (chains != NULL && segs != NULL) {
        uint8_t *cp = (uint8_t *)PyBytes_AS_STRING(chains);
        uint8_t *sp = (uint8_t *)PyBytes_AS_STRING(segs);
        for (size_t k = 0; k < j->nchains; k++, cp += 16) {
            const chainrec *r = &j->chains[k];
            put_le(cp, r->head, 4);
            put_le(cp + 4, r->nread, 4);
            put_le(cp + 8, r->nwrite, 4);
            put_le(cp + 12, r->first, 4);
        }
        for (size_t i = 0; i < j->nsegs; i++, sp += 16) {
            put_le(sp, j->segs[i].addr, 8);
            put_le(sp + 8, j->segs[i].len, 8);
        }
        out = PyTuple_Pack(2, chains, segs);
    }
    Py_XDECREF(chains);
    Py_XDECREF(segs);
    return out;
}

/* pop() and pop_batch(): the walk without the GIL, then build() makes the result. */
static PyObject *pop_any(Queue *q, PyObject *args, PyObject *kw, const char *fmt,
                         PyObject *(*build)(const popjob *))
{
    static char *kwlist[] = {"mem", "max_chains", NULL};
    PyObject *mem, *out = NULL;
    Py_ssize_t max_chains = 0;
    guestmem m;
    ctx c;
    popjob j = {&c, 0, 0, 0, 0, NULL, NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &mem, &max_chains))
        return NULL;
    if (max_chains < 0)
        return PyErr_Format(PyExc_ValueError, "max_chains must be >= 0, not %zd", max_chains);
    if (begin(q, mem, &c, &m) < 0)
        goto done;
    j.max_chains = (size_t)max_chains;
    Py_BEGIN_ALLOW_THREADS
    pop_run(&j);
    Py_END_ALLOW_THREADS
    if (c.err.kind != ERR_NONE) {
        raise_err(q, &c.err);
        goto done;
    }
    if ((out = build(&j)) != NULL)
        q->last_avail_idx = (uint16_t)(c.last_avail_idx + j.nchains);
done: /* the single exit: guest buffers released, scratch freed */
    mem_release(&m);
    PyMem_RawFree(j.segs);
    PyMem_RawFree(j.chains);
    return out;
}

static PyObject *Queue_pop(Queue *q, PyObject *args, PyObject *kw)
{
    return pop_any(q, args, kw, "O|n:pop", pop_list);
}

static PyObject *Queue_pop_batch(Queue *q, PyObject *args, PyObject *kw)
{
    return pop_any(q, args, kw, "O|n:pop_batch", pop_records);
}

void used_write(ctx *c, const uint32_t *ids, size_t n)
{
    if (n == 0)
        return;
    for (size_t k = 0; k < n; k++) {
        uint8_t el[8];
        put_le(el, ids[2 * k], 4);
        put_le(el + 4, ids[2 * k + 1], 4);
        memcpy(c->used + 4 + 8 * ((c->used_idx + k) & (c->size - 1)), el, 8);
    }
    /* Release: the driver must see the used elements before the idx that publishes them. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    st16(c->used + 2, (uint16_t)(c->used_idx + n));
}

/* One completion field as a C integer in 0..max, or -1 with ValueError/TypeError. */
static int completion_field(PyObject *o, long long max, Py_ssize_t k, const char *name,
                            uint32_t *out)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow || v < 0 || v > max)
        return PyErr_Format(PyExc_ValueError, "completion %zd: %s out of range 0..%lld", k,
                            name, max), -1;
    *out = (uint32_t)v;
    return 0;
}

/* push() and push_batch() check a broken queue before their arguments: RingError("broken"). */
static int refuse_broken(Queue *q, PyObject *mem)
{
    guestmem m;
    ctx c;
    return q->broken != NULL ? begin(q, mem, &c, &m) : 0; /* begin() raises, holds nothing */
}

/* The end of push() and push_batch(): n checked used elements into the ring. */
static PyObject *publish(Queue *q, PyObject *mem, const uint32_t *ids, size_t n)
{
    PyObject *out = NULL;
    guestmem m;
    ctx c;
    if (begin(q, mem, &c, &m) == 0) {
        Py_BEGIN_ALLOW_THREADS
        if (rings_map(&c) == 0)
            used_write(&c, ids, n);
        Py_END_ALLOW_THREADS
        if (c.err.kind != ERR_NONE) {
            raise_err(q, &c.err);
        } else {
            q->used_idx = (uint16_t)(c.used_idx + n);
            out = Py_NewRef(Py_None);
        }
    }
    mem_release(&m);
    return out;
}

static PyObject *Queue_push(Queue *q, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mem", "completions", NULL};
    PyObject *mem, *comps, *seq = NULL, *out = NULL;
    uint32_t *ids = NULL;
    Py_ssize_t n = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:push", kwlist, &mem, &comps) ||
        refuse_broken(q, mem) < 0)
        return NULL;
    if (!(seq = PySequence_Tuple(comps))) /* tuples: __index__ calls cannot resize them */
        goto done;
    if ((n = PyTuple_GET_SIZE(seq)) > (Py_ssize_t)q->size) {
        PyErr_Format(PyExc_ValueError, "push of %zd completions exceeds queue size %u", n,
                     q->size);
        goto done;
    }
    if (!(ids = PyMem_Calloc(2 * (size_t)n + 2, sizeof *ids))) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) { /* ids[2k] = head, ids[2k+1] = written length */
        PyObject *item = PyTuple_GET_ITEM(seq, k), *pair;
        pair = PyTuple_CheckExact(item) ? Py_NewRef(item) : PySequence_Tuple(item);
        int ok = pair != NULL && PyTuple_GET_SIZE(pair) == 2;
        if (pair != NULL && !ok)
            PyErr_SetString(PyExc_TypeError, "a completion must be a (head, len) pair");
        ok = ok && completion_field(PyTuple_GET_ITEM(pair, 0), (long long)q->size - 1, k,
                                    "head", &ids[2 * k]) == 0
                && completion_field(PyTuple_GET_ITEM(pair, 1), UINT32_MAX, k, "written length",
                                    &ids[2 * k + 1]) == 0;
        Py_XDECREF(pair);
        if (!ok)
            goto done;
    }
    out = publish(q, mem, ids, (size_t)n);
done:
    PyMem_Free(ids);
    Py_XDECREF(seq);
    return out;
}

/* push_batch: push() from one buffer of n x {u32 head, u32 written length}, little endian;
 * every entry is checked before the ring is touched, with push()'s messages. */
static PyObject *Queue_push_batch(Queue *q, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mem", "used", NULL};
    PyObject *mem, *usedobj, *out = NULL;
    uint32_t *ids = NULL;
    Py_buffer b = {0};

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:push_batch", kwlist, &mem, &usedobj) ||
        refuse_broken(q, mem) < 0 || PyObject_GetBuffer(usedobj, &b, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    size_t n = (size_t)b.len / 8;
    if (b.len % 8) {
        PyErr_Format(PyExc_ValueError, "push_batch: %zd bytes is not a whole number of 8-byte "
                     "used entries", b.len);
        goto done;
    }
    if (n > q->size) {
        PyErr_Format(PyExc_ValueError, "push of %zu completions exceeds queue size %u", n,
                     q->size);
        goto done;
    }
    if (!(ids = PyMem_Malloc(8 * n + 8))) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t k = 0; k < n; k++) { /* one copy: the caller's buffer may change under us */
        const uint8_t *e = (const uint8_t *)b.buf + 8 * k;
        ids[2 * k] = (uint32_t)get_le(e, 4);
        ids[2 * k + 1] = (uint32_t)get_le(e + 4, 4);
        if (ids[2 * k] >= q->size) {
            PyErr_Format(PyExc_ValueError, "completion %zu: head out of range 0..%u", k,
                         q->size - 1);
            goto done;
        }
    }
    out = publish(q, mem, ids, n);
done:
    PyMem_Free(ids);
    PyBuffer_Release(&b);
    return out;
}

enum { OP_SHOULD_NOTIFY, OP_PENDING, OP_ENABLE, OP_DISABLE };

int need_notify(uint16_t *signalled, uint16_t used_idx, const ctx *c)
{
    uint16_t old = *signalled, new = used_idx;
    /* Full barrier: our used->idx store must be visible before we read the driver's
     * flags/used_event (store->load), or both sides can miss the update. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *signalled = new;
    if (c->event_idx) /* vring_need_event(used_event, new, old) */
        return (uint16_t)(new - ld16(c->avail + 4 + 2 * (size_t)c->size) - 1) <
               (uint16_t)(new - old);
    return new != old && !(ld16(c->avail) & AVAIL_F_NO_INTERRUPT);
}

int should_notify(Queue *q, const ctx *c)
{
    return need_notify(&q->signalled_used, q->used_idx, c);
}

/* The small calls: a few 16-bit accesses, run with the GIL held. */
static PyObject *small_call(Queue *q, PyObject *mem, int op)
{
    PyObject *out = NULL;
    guestmem m;
    ctx c;
    uint16_t n;

    if (begin(q, mem, &c, &m) < 0 || rings_map(&c) < 0)
        goto done;
    if (op == OP_PENDING) {
        if (avail_count(&c, &n) == 0)
            out = PyLong_FromLong(n);
    } else if (op == OP_SHOULD_NOTIFY) {
        out = PyBool_FromLong(should_notify(q, &c));
    } else {
        if (!c.event_idx) {
            uint16_t flags = ld16(c.used);
            st16(c.used, op == OP_ENABLE ? flags & ~USED_F_NO_NOTIFY : flags | USED_F_NO_NOTIFY);
        } else if (op == OP_ENABLE) {
            st16(c.used + 4 + 8 * (size_t)c.size, c.last_avail_idx); /* avail_event */
        }
        if (op == OP_ENABLE) /* Full barrier: publish it before the caller re-reads avail->idx. */
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
        out = Py_NewRef(Py_None);
    }
done:
    if (c.err.kind != ERR_NONE)
        raise_err(q, &c.err);
    mem_release(&m);
    return out;
}

static PyObject *Queue_should_notify(Queue *q, PyObject *mem)
{
    return small_call(q, mem, OP_SHOULD_NOTIFY);
}

static PyObject *Queue_pending(Queue *q, PyObject *mem) { return small_call(q, mem, OP_PENDING); }

static PyObject *Queue_set_notification(Queue *q, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"mem", "enable", NULL};
    PyObject *mem;
    int enable;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Op:set_notification", kwlist, &mem, &enable))
        return NULL;
    return small_call(q, mem, enable ? OP_ENABLE : OP_DISABLE);
}

static PyObject *Queue_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"size", "desc", "avail", "used", "event_idx", NULL};
    static const char *names[4] = {"size", "desc", "avail", "used"};
    static const char *rules[4] = {"size", "desc_align", "avail_align", "used_align"};
    static const unsigned align[4] = {1, 16, 2, 4};
    PyObject *o[4], *idx, *msg = NULL;
    unsigned long long v[4];
    int event_idx = 0, overflow = 0, k;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|$p:SplitQueue", kwlist, &o[0], &o[1],
                                     &o[2], &o[3], &event_idx))
        return NULL;
    long long size = PyLong_AsLongLongAndOverflow(o[0], &overflow);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    for (k = 1; k < 4; k++) {
        if ((idx = PyNumber_Index(o[k])) == NULL)
            return NULL;
        v[k] = PyLong_AsUnsignedLongLong(idx);
        Py_DECREF(idx);
        if (v[k] == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Format(PyExc_OverflowError, "%s must be in 0..2**64-1", names[k]);
            return NULL;
        }
    }
    k = (overflow || size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1))) ? 0 : 4;
    for (int i = 1; i < 4 && k == 4; i++)
        if (v[i] % align[i])
            k = i;
    if (k == 0) {
        msg = PyUnicode_FromFormat("queue size %R is not a power of two in 1..%d", o[0],
                                   MAX_QUEUE_SIZE);
    } else if (k < 4) {
        char buf[96];
        snprintf(buf, sizeof buf, "%s address 0x%llx is not %u-byte aligned", names[k], v[k],
                 align[k]);
        msg = PyUnicode_FromString(buf);
    }
    if (k < 4)
        return raise_ring(PyType_GetModuleState(tp), msg, rules[k]);
    Queue *q = (Queue *)tp->tp_alloc(tp, 0);
    if (q == NULL)
        return NULL;
    q->size = (unsigned)size;
    q->desc = v[1];
    q->avail = v[2];
    q->used = v[3];
    q->event_idx = (char)event_idx;
    return (PyObject *)q;
}

static void Queue_dealloc(Queue *q)
{
    PyTypeObject *tp = Py_TYPE(q);
    Py_XDECREF(q->broken);
    tp->tp_free(q);
    Py_DECREF(tp); /* instances of heap types own a reference to their type */
}

static PyObject *Queue_repr(Queue *q)
{
    return PyUnicode_FromFormat("<SplitQueue size=%u last_avail_idx=%u used_idx=%u%s>",
                                q->size, q->last_avail_idx, q->used_idx,
                                q->broken ? " broken" : "");
}

/* last_avail_idx and used_idx: u16 attributes that refuse out-of-range values. */
static PyObject *get_idx(Queue *q, void *off)
{
    return PyLong_FromLong(*(uint16_t *)((char *)q + (size_t)off));
}

static int set_idx(Queue *q, PyObject *v, void *off)
{
    int overflow = 0;
    if (v == NULL)
        return PyErr_SetString(PyExc_AttributeError, "cannot delete a ring index"), -1;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow || x < 0 || x > 0xffff)
        return PyErr_Format(PyExc_OverflowError, "ring index %R is not in 0..65535", v), -1;
    *(uint16_t *)((char *)q + (size_t)off) = (uint16_t)x;
    if ((size_t)off == offsetof(Queue, used_idx))
        q->signalled_used = q->used_idx; /* should_notify() counts from the new base */
    return 0;
}

static PyGetSetDef Queue_getset[] = {
    {"last_avail_idx", (getter)get_idx, (setter)set_idx, "next avail idx to pop",
     (void *)offsetof(Queue, last_avail_idx)},
    {"used_idx", (getter)get_idx, (setter)set_idx, "next used idx to push",
     (void *)offsetof(Queue, used_idx)},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Queue_members[] = {
    {"size", T_UINT, offsetof(Queue, size), READONLY, "queue size (a power of two)"},
    {"desc", T_ULONGLONG, offsetof(Queue, desc), READONLY, "gpa of the descriptor table"},
    {"avail", T_ULONGLONG, offsetof(Queue, avail), READONLY, "gpa of the avail ring"},
    {"used", T_ULONGLONG, offsetof(Queue, used), READONLY, "gpa of the used ring"},
    {"event_idx", T_BOOL, offsetof(Queue, event_idx), 0, "VIRTIO_RING_F_EVENT_IDX in use"},
    {"broken", T_OBJECT, offsetof(Queue, broken), READONLY, "None, or why the queue broke"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Queue_methods[] = {
    {"pop", (PyCFunction)(void (*)(void))Queue_pop, METH_VARARGS | METH_KEYWORDS,
     "pop(mem, max_chains=0) -> list of (head, readable, writable)"},
    {"push", (PyCFunction)(void (*)(void))Queue_push, METH_VARARGS | METH_KEYWORDS,
     "push(mem, completions): publish (head, written_len) pairs in the used ring"},
    {"pop_batch", (PyCFunction)(void (*)(void))Queue_pop_batch, METH_VARARGS | METH_KEYWORDS,
     "pop_batch(mem, max_chains=0) -> (chains, segments): pop() as two flat records"},
    {"push_batch", (PyCFunction)(void (*)(void))Queue_push_batch, METH_VARARGS | METH_KEYWORDS,
     "push_batch(mem, used): push() from a buffer of (u32 head, u32 len) entries"},
    {"should_notify", (PyCFunction)Queue_should_notify, METH_O,
     "should_notify(mem) -> bool: must the driver be signalled now?"},
    {"set_notification", (PyCFunction)(void (*)(void))Queue_set_notification,
     METH_VARARGS | METH_KEYWORDS, "set_notification(mem, enable): ask for kicks or not"},
    {"pending", (PyCFunction)Queue_pending, METH_O, "pending(mem) -> int: chains available"},
    {"serve_blk", (PyCFunction)(void (*)(void))Queue_serve_blk, METH_VARARGS | METH_KEYWORDS,
     "serve_blk(mem, fd, capacity, seg_max, readonly, max_chains=0, inflight=None, counter=0,"
     " fd_fallback=-1, *, notify=False) -> BlkResult: the virtio-blk request path of up to "
     "max_chains chains; with notify, also should_notify() and the re-check of the avail ring "
     "(notified, pending)"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Queue_slots[] = {
    {Py_tp_new, Queue_new},
    {Py_tp_dealloc, Queue_dealloc},
    {Py_tp_repr, Queue_repr},
    {Py_tp_getset, Queue_getset},
    {Py_tp_members, Queue_members},
    {Py_tp_methods, Queue_methods},
    {Py_tp_doc, "SplitQueue(size, desc, avail, used, *, event_idx=False)\n\n"
                "Device side of a split virtqueue; see edgevirt.backend.virtq.pyring."},
    {0, NULL},
};

static PyType_Spec Queue_spec = {
    "edgevirt.backend.virtq._ring.SplitQueue", sizeof(Queue), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE, Queue_slots,
};

/* ---- module: multi-phase init, state ---- */

static int ring_exec(PyObject *mod)
{
    ring_state *st = PyModule_GetState(mod);
    PyObject *errors = PyImport_ImportModule("edgevirt.errors");
    PyObject *logging = PyImport_ImportModule("logging");
    if (errors != NULL && logging != NULL) {
        st->ring_error = PyObject_GetAttrString(errors, "RingError");
        st->mem_error = PyObject_GetAttrString(errors, "GuestMemoryError");
        st->log = PyObject_CallMethod(logging, "getLogger", "s", "edgevirt.backend.virtq");
    }
    Py_XDECREF(errors);
    Py_XDECREF(logging);
    if (st->ring_error == NULL || st->mem_error == NULL || st->log == NULL)
        return -1;
    st->queue_type = PyType_FromModuleAndSpec(mod, &Queue_spec, NULL);
    if (st->queue_type == NULL || PyModule_AddType(mod, (PyTypeObject *)st->queue_type) < 0)
        return -1;
    st->blk_result_type = blk_result_type_new();
    if (st->blk_result_type == NULL ||
        PyModule_AddType(mod, (PyTypeObject *)st->blk_result_type) < 0)
        return -1;
    st->aio_type = PyType_FromModuleAndSpec(mod, blk_aio_spec(), NULL);
    if (st->aio_type == NULL || PyModule_AddType(mod, (PyTypeObject *)st->aio_type) < 0)
        return -1;
    return PyModule_AddIntConstant(mod, "POP_SEGMENT_BUDGET", POP_SEGMENT_BUDGET);
}

#define STATE_REFS(X, st) \
    X(st->ring_error); X(st->mem_error); X(st->log); X(st->queue_type); X(st->blk_result_type); \
    X(st->aio_type)

static int ring_traverse(PyObject *mod, visitproc visit, void *arg)
{
    ring_state *st = PyModule_GetState(mod);
    STATE_REFS(Py_VISIT, st);
    return 0;
}

static int ring_clear(PyObject *mod)
{
    ring_state *st = PyModule_GetState(mod);
    STATE_REFS(Py_CLEAR, st);
    return 0;
}

static void ring_free(void *mod) { ring_clear((PyObject *)mod); }

static PyModuleDef_Slot ring_slots[] = {{Py_mod_exec, ring_exec}, {0, NULL}};

static struct PyModuleDef ring_module = {
    PyModuleDef_HEAD_INIT, "_ring", "Split virtqueue (device side), hardened C fast path.",
    sizeof(ring_state), NULL, ring_slots, ring_traverse, ring_clear, ring_free,
};

PyMODINIT_FUNC PyInit__ring(void) { return PyModuleDef_Init(&ring_module); }
