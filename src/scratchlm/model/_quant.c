/*
 * Products of a few rows (a decoding step's batch) with int8 or bfloat16 weights, one product a call,
 * for `scratchlm.model.kernels.int8_linear` and `bf16_linear`; the kernels themselves, and how the
 * formats work, are in _matvec.h. `PATH` and `BF16_PATH` name the instruction set each format's kernel
 * uses on this CPU.
 */
#include "_matvec.h"

#define MAX_ROWS 16 /* rows of x per call (a decoding step's batch) */

static PyObject *int8_linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, q, scale, y;
    long long rows, d_in, d_out;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLi", &x, &q, &scale, &y, &rows, &d_in, &d_out, &threads)) return NULL;
    if (rows < 1 || rows > MAX_ROWS) {
        PyErr_Format(PyExc_ValueError, "int8_linear: rows must be 1..%d, got %lld", MAX_ROWS, rows);
        return NULL;
    }
    int8_t *qx = malloc((size_t)(rows * d_in));
    float sx[MAX_ROWS];
    if (!qx) return PyErr_NoMemory();
    quantize_rows(PTR(const float, x), rows, d_in, qx, sx);
    Int8Args s = {qx, sx, PTR(const int8_t, q), PTR(const float, scale), PTR(float, y), rows, d_in, d_out};
    parallel_for(int8_range, &s, (d_out + 3) / 4, 4 * d_in * rows, threads);
    free(qx);
    Py_RETURN_NONE;
}

static PyObject *bf16_linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, y;
    long long rows, d_in, d_out;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLLLi", &x, &w, &y, &rows, &d_in, &d_out, &threads)) return NULL;
    Bf16Args s = {PTR(const float, x), PTR(const uint16_t, w), PTR(float, y), rows, d_in, d_out};
    parallel_for(bf16_range, &s, (d_out + 3) / 4, 4 * d_in * rows, threads);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"int8_linear", int8_linear, METH_VARARGS,
     "int8_linear(x, q, scale, y, rows, d_in, d_out, threads): y = x (scale * q)^T, x quantised per row"},
    {"bf16_linear", bf16_linear, METH_VARARGS, "bf16_linear(x, w, y, rows, d_in, d_out, threads): y = x w^T, w bf16"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quant", "Int8 decoding products.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__quant(void) {
    matvec_init();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddStringConstant(m, "PATH", dot_name) < 0 ||
              PyModule_AddStringConstant(m, "BF16_PATH", bf16_name) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
