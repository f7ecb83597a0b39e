/*
 * 64-bit atomics and futex wait/wake on a shared-memory buffer, for the shm ring backend.
 *
 * Why C: the ring protocol does five to seven atomic operations per hop; the pure-Python
 * `atomics` package costs several microseconds per call, this costs a fraction of one.
 *
 * A Region holds one exported buffer (an mmap of a shared segment) for its lifetime, so each
 * call is a bounds check and one instruction. All operations are sequentially consistent.
 * Offsets of 64-bit operations must be 8-aligned; futex words are the low 32 bits
 * (little-endian) of such a slot, so a futex can sleep on a 64-bit counter's changes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
} Region;

static int region_init(Region *self, PyObject *args, PyObject *kwds) {
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O", &obj)) return -1;
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    self->has_view = 1;
    return 0;
}

static void region_dealloc(Region *self) {
    if (self->has_view) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *region_release(Region *self, PyObject *unused) {
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    Py_RETURN_NONE;
}

/* Returns a pointer to `nbytes` at `off`, or NULL with an exception set. */
static char *at(Region *self, PyObject *off_obj, Py_ssize_t nbytes, Py_ssize_t align) {
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "region is released");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(off_obj);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (off < 0 || nbytes < 0 || off > self->view.len - nbytes) {
        PyErr_Format(PyExc_IndexError, "offset %zd+%zd outside region of %zd bytes", off, nbytes,
                     self->view.len);
        return NULL;
    }
    if (align > 1 && off % align != 0) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zd-aligned", off, align);
        return NULL;
    }
    return (char *)self->view.buf + off;
}

static int nargs_ok(Py_ssize_t nargs, Py_ssize_t want, const char *name) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, want);
        return 0;
    }
    return 1;
}

static PyObject *region_load(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 1, "load")) return NULL;
    uint64_t *p = (uint64_t *)at(self, args[0], 8, 8);
    if (!p) return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(p, __ATOMIC_SEQ_CST));
}

static PyObject *region_store(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 2, "store")) return NULL;
    uint64_t *p = (uint64_t *)at(self, args[0], 8, 8);
    if (!p) return NULL;
    unsigned long long v = PyLong_AsUnsignedLongLong(args[1]);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    __atomic_store_n(p, (uint64_t)v, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *region_fetch_add(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 2, "fetch_add")) return NULL;
    uint64_t *p = (uint64_t *)at(self, args[0], 8, 8);
    if (!p) return NULL;
    long long d = PyLong_AsLongLong(args[1]);
    if (d == -1 && PyErr_Occurred()) return NULL;
    /* Two's complement: adding a negative delta as uint64 wraps to the right value. */
    return PyLong_FromUnsignedLongLong(__atomic_fetch_add(p, (uint64_t)d, __ATOMIC_SEQ_CST));
}

static PyObject *region_cas(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 3, "cas")) return NULL;
    uint64_t *p = (uint64_t *)at(self, args[0], 8, 8);
    if (!p) return NULL;
    unsigned long long expected = PyLong_AsUnsignedLongLong(args[1]);
    if (expected == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    unsigned long long desired = PyLong_AsUnsignedLongLong(args[2]);
    if (desired == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    uint64_t old = (uint64_t)expected;
    /* On failure `old` receives the current value; either way it is the value before. */
    __atomic_compare_exchange_n(p, &old, (uint64_t)desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return PyLong_FromUnsignedLongLong(old);
}

static PyObject *region_read(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 2, "read")) return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    char *p = at(self, args[0], n, 1);
    if (!p) return NULL;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return PyBytes_FromStringAndSize(p, n);
}

static PyObject *region_write(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 2, "write")) return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0) return NULL;
    char *p = at(self, args[0], data.len, 1);
    if (p) {
        memcpy(p, data.buf, data.len);
        /* Publish the bytes before any later atomic (the ring's seq store) is seen. */
        __atomic_thread_fence(__ATOMIC_RELEASE);
    }
    PyBuffer_Release(&data);
    if (!p) return NULL;
    Py_RETURN_NONE;
}

/* wait(off, expected_u32, timeout_s, mask) -> True if woken or the word differed, False on
 * timeout. Only a wake whose mask shares a bit with `mask` wakes this wait (FUTEX_WAIT_BITSET):
 * the ring wakes one consumer per publish, and its remote-wait forwarders apart. */
static PyObject *region_wait(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 4, "wait")) return NULL;
    uint32_t *p = (uint32_t *)at(self, args[0], 4, 4);
    if (!p) return NULL;
    unsigned long expected = PyLong_AsUnsignedLong(args[1]);
    if (expected == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    double timeout_s = PyFloat_AsDouble(args[2]);
    if (timeout_s == -1.0 && PyErr_Occurred()) return NULL;
    unsigned long mask = PyLong_AsUnsignedLong(args[3]);
    if (mask == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    if (timeout_s < 0) timeout_s = 0;
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    time_t whole = (time_t)timeout_s;
    ts.tv_sec += whole;
    ts.tv_nsec += (long)((timeout_s - (double)whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000L;
    }
    long rc;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    /* Not FUTEX_PRIVATE: the word lives in memory shared between processes. */
    rc = syscall(SYS_futex, p, FUTEX_WAIT_BITSET, (uint32_t)expected, &ts, NULL,
                 (uint32_t)mask);
    if (rc == -1) err = errno;
    Py_END_ALLOW_THREADS
    if (rc == -1 && err == ETIMEDOUT) Py_RETURN_FALSE;
    if (rc == -1 && err != EAGAIN && err != EINTR) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_TRUE;
}

/* wake(off, n, mask) -> how many waits whose mask shares a bit with `mask` were woken (<= n). */
static PyObject *region_wake(Region *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 3, "wake")) return NULL;
    uint32_t *p = (uint32_t *)at(self, args[0], 4, 4);
    if (!p) return NULL;
    int n = (int)PyLong_AsLong(args[1]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    unsigned long mask = PyLong_AsUnsignedLong(args[2]);
    if (mask == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    long rc = syscall(SYS_futex, p, FUTEX_WAKE_BITSET, n, NULL, NULL, (uint32_t)mask);
    if (rc == -1) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(rc);
}

static PyMethodDef region_methods[] = {
    {"load", (PyCFunction)(void (*)(void))region_load, METH_FASTCALL, "load(off) -> u64"},
    {"store", (PyCFunction)(void (*)(void))region_store, METH_FASTCALL, "store(off, u64)"},
    {"fetch_add", (PyCFunction)(void (*)(void))region_fetch_add, METH_FASTCALL,
     "fetch_add(off, delta) -> previous u64"},
    {"cas", (PyCFunction)(void (*)(void))region_cas, METH_FASTCALL,
     "cas(off, expected, desired) -> previous u64 (== expected when swapped)"},
    {"read", (PyCFunction)(void (*)(void))region_read, METH_FASTCALL, "read(off, n) -> bytes"},
    {"write", (PyCFunction)(void (*)(void))region_write, METH_FASTCALL, "write(off, data)"},
    {"wait", (PyCFunction)(void (*)(void))region_wait, METH_FASTCALL,
     "wait(off, expected_u32, timeout_s) -> False on timeout"},
    {"wake", (PyCFunction)(void (*)(void))region_wake, METH_FASTCALL, "wake(off, n) -> woken"},
    {"release", (PyCFunction)region_release, METH_NOARGS, "drop the buffer export"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stagepool.common.ring._atomics.Region",
    .tp_basicsize = sizeof(Region),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Atomic operations on a writable shared buffer.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)region_init,
    .tp_dealloc = (destructor)region_dealloc,
    .tp_methods = region_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_atomics", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__atomics(void) {
    if (PyType_Ready(&RegionType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&RegionType);
    if (PyModule_AddObject(m, "Region", (PyObject *)&RegionType) < 0) {
        Py_DECREF(&RegionType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
