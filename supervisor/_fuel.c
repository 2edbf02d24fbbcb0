/*
 * The native block hook that cuts a Unicorn CPU into exact slices.
 *
 * Unicorn calls block_hook on the emulating thread before each translated block
 * runs.  The hook ends the slice there (uc_emu_stop from inside a hook is exact:
 * the block has not run yet) when another thread raised `stop` or when the
 * slice's block budget or its time is spent.  The clock is read when
 * (blocks & clock_mask) == 0: every block for a guest whose blocks are slow
 * (code that keeps rewriting itself), every 256 for the rest, whose blocks
 * take nanoseconds.  Stopping from another thread instead would
 * replay guest memory writes (see docs/performance.md).
 *
 * The fuel_t layout is mirrored by supervisor/_slicing.py (ctypes).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <time.h>

typedef struct {
    volatile int32_t stop;      /* set by any thread: end the slice at the next block */
    int32_t reason;             /* set here: 0 none, 1 stop requested, 2 budget spent */
    int64_t budget;             /* blocks this slice may still start */
    uint64_t blocks;            /* blocks started, in total */
    int (*emu_stop)(void *uc);  /* uc_emu_stop from the unicorn shared library */
    int64_t deadline;           /* CLOCK_MONOTONIC nanoseconds at which the slice ends */
    uint64_t clock_mask;        /* read the clock when (blocks & clock_mask) == 0 */
} fuel_t;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void block_hook(void *uc, uint64_t address, uint32_t size, void *user)
{
    fuel_t *fuel = user;
    (void)address;
    (void)size;
    if (fuel->stop) {
        fuel->reason = 1;
        fuel->emu_stop(uc);
        return;
    }
    if (fuel->budget <= 0 ||
        ((fuel->blocks & fuel->clock_mask) == 0 && now_ns() >= fuel->deadline)) {
        fuel->reason = 2;
        fuel->emu_stop(uc);
        return;
    }
    fuel->budget--;
    fuel->blocks++;
}

static struct PyModuleDef fuel_module = {
    PyModuleDef_HEAD_INIT, "_fuel",
    "Address of the native Unicorn block hook and the size of its control block.",
    -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fuel(void)
{
    PyObject *m = PyModule_Create(&fuel_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "block_hook", PyLong_FromVoidPtr((void *)block_hook)) < 0 ||
        PyModule_AddIntConstant(m, "fuel_size", (long)sizeof(fuel_t)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
