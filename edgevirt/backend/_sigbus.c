/* Survive a shared memory file that shrinks under a mapping (edgevirt.backend.memory).
 *
 * A page of a MAP_SHARED mapping past the end of its file raises SIGBUS on touch. Files the
 * back-end can seal (F_SEAL_SHRINK) never shrink; the others (memory-backend-file on
 * /dev/shm or hugetlbfs, a memfd with seal=off) are registered here. On SIGBUS inside a
 * registered range the handler puts an anonymous zero page over the faulting page
 * (MAP_FIXED; mmap is async-signal-safe) and returns: the access is retried and reads
 * zeros, the back-end lives on and counts the page. A SIGBUS anywhere else gets the action
 * that was there before (by default: the process ends, as it would have without us).
 *
 * Pages are replaced in units of the system page: inside a hugetlbfs mapping the kernel
 * refuses that (no hugetlbfs on the hosts this was tested on), and such a region that
 * shrinks still ends the process, as before.
 *
 * The table is a fixed array of atomics: the handler may run on any thread (engine
 * threads touch guest memory too) while Python adds or removes a range.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SLOTS 256

static struct {
    _Atomic uintptr_t start; /* 0: free */
    _Atomic size_t len;
    _Atomic unsigned long pages; /* pages replaced so far */
} slots[SLOTS];

static struct sigaction previous;
static int installed;
static uintptr_t page_size;

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
    uintptr_t addr = (uintptr_t)info->si_addr;
    if (info->si_code > 0) { /* a fault, not a kill(2) */
        for (int i = 0; i < SLOTS; i++) {
            uintptr_t start = atomic_load(&slots[i].start);
            size_t len = atomic_load(&slots[i].len);
            if (start && addr >= start && addr - start < len) {
                void *page = (void *)(addr & ~(page_size - 1));
                if (mmap(page, page_size, PROT_READ | PROT_WRITE,
                         MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) != MAP_FAILED) {
                    atomic_fetch_add(&slots[i].pages, 1);
                    return;
                }
                break;
            }
        }
    }
    /* Not ours: the previous action. A fault retried under it takes that action; a sent
     * signal is sent again. */
    if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction != NULL) {
        previous.sa_sigaction(sig, info, ctx);
        return;
    }
    sigaction(SIGBUS, &previous, NULL);
    if (info->si_code <= 0)
        raise(SIGBUS);
}

static PyObject *guard(PyObject *self, PyObject *obj)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uintptr_t start = (uintptr_t)view.buf;
    size_t len = (size_t)view.len;
    PyBuffer_Release(&view);
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        page_size = (uintptr_t)sysconf(_SC_PAGESIZE);
        if (sigaction(SIGBUS, &sa, &previous) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        installed = 1;
    }
    for (int i = 0; i < SLOTS; i++) {
        uintptr_t expected = 0;
        if (atomic_compare_exchange_strong(&slots[i].start, &expected, start)) {
            atomic_store(&slots[i].pages, 0);
            atomic_store(&slots[i].len, len);
            return PyLong_FromLong(i);
        }
    }
    PyErr_Format(PyExc_OverflowError, "all %d guarded-range slots in use", SLOTS);
    return NULL;
}

static int slot_arg(PyObject *arg)
{
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred())
        return -1;
    if (i < 0 || i >= SLOTS) {
        PyErr_Format(PyExc_IndexError, "slot %ld out of range", i);
        return -1;
    }
    return (int)i;
}

static PyObject *unguard(PyObject *self, PyObject *arg)
{
    (void)self;
    int i = slot_arg(arg);
    if (i < 0)
        return NULL;
    atomic_store(&slots[i].len, 0);
    atomic_store(&slots[i].start, 0);
    Py_RETURN_NONE;
}

static PyObject *pages(PyObject *self, PyObject *arg)
{
    (void)self;
    int i = slot_arg(arg);
    if (i < 0)
        return NULL;
    return PyLong_FromUnsignedLong(atomic_load(&slots[i].pages));
}

static PyMethodDef methods[] = {
    {"guard", guard, METH_O,
     "guard(mapping) -> slot: replace pages of this mapping that vanish (SIGBUS) by zeros"},
    {"unguard", unguard, METH_O, "unguard(slot): before the mapping is closed"},
    {"pages", pages, METH_O, "pages(slot) -> int: pages replaced so far"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sigbus", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sigbus(void)
{
    return PyModule_Create(&module);
}
