/*
 * Products of a few rows (a decoding step's batch) with a weight packed by `kernels.pack_weight`, one
 * product a call, for `scratchlm.model.kernels.packed_linear`; the kernels, the tiled layout and the
 * formats are in _matvec.h. `PATH`, `BF16_PATH` and `F32_PATH` name the instruction set each format's
 * kernel uses on this CPU.
 */
#include "_matvec.h"

#define MAX_ROWS 16 /* rows of x per call (a decoding step's batch) */

static PyObject *linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, scale, y;
    long long rows, d_in, d_out;
    int kind, threads;
    if (!PyArg_ParseTuple(args, "iKKKKLLLi", &kind, &x, &w, &scale, &y, &rows, &d_in, &d_out, &threads)) return NULL;
    if (rows < 1 || rows > MAX_ROWS || kind < F32 || kind > INT8) {
        PyErr_Format(PyExc_ValueError, "linear: rows must be 1..%d and kind 0..2, got %lld and %d", MAX_ROWS, rows,
                     kind);
        return NULL;
    }
    const int64_t d_pad = padded(d_in, kind);
    float *buffer = malloc(sizeof(float) * rows * d_pad), sx[MAX_ROWS];
    if (!buffer) return PyErr_NoMemory();
    MatvecArgs s = {kind, prepare_x(PTR(const float, x), rows, d_in, kind, buffer, sx), PTR(const void, w),
                    PTR(const float, scale), sx, PTR(float, y), rows, d_pad, d_out};
    parallel_for(matvec_range, &s, (d_out + 3) / 4, 4 * d_pad * rows, threads);
    free(buffer);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"linear", linear, METH_VARARGS,
     "linear(kind, x, w, scale, y, rows, d_in, d_out, threads): y = x W^T, W packed (kind 0 float32, 1 bfloat16, "
     "2 int8 with its scales)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quant", "Products with packed weights.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__quant(void) {
    matvec_init();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddStringConstant(m, "PATH", path_name[INT8]) < 0 ||
              PyModule_AddStringConstant(m, "BF16_PATH", path_name[BF16]) < 0 ||
              PyModule_AddStringConstant(m, "F32_PATH", path_name[F32]) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
