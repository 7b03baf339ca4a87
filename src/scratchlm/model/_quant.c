/*
 * Int8 decoding products: y = x W^T for the few rows of a decoding step, W stored as int8 with one
 * float scale per output channel (W ~ scale[o] * q[o, :]), x quantised on the fly to int8 per row
 * (x ~ sx[r] * qx[r, :], sx = max |x[r]| / 127). Each output is then one integer dot product:
 *
 *     y[r, o] = scale[o] * sx[r] * sum_i qx[r, i] q[o, i]
 *
 * The byte products use llama.cpp's sign trick: |q| (unsigned) times qx with q's sign (signed), the
 * operand types of AVX2's vpmaddubsw and AVX-512 VNNI's vpdpbusd, and no pair sum can saturate
 * (2 * 127 * 127 < 2^15). The CPU's best path is picked at load time: AVX-512 VNNI (64 bytes an
 * instruction), AVX2, or plain C. A decoding step reads each weight once for all its rows: a quarter
 * of the bytes of float32, which is what bounds the speed of decoding.
 */
#include "_cpu.h"

#include <stdlib.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define X86 1
#endif

#define MAX_ROWS 16 /* rows of x per call (a decoding step's batch) */

typedef int32_t (*DotFn)(const int8_t *a, const int8_t *w, int64_t d);

static int32_t dot_plain(const int8_t *restrict a, const int8_t *restrict w, int64_t d) {
    int32_t acc = 0;
    for (int64_t i = 0; i < d; i++) acc += (int32_t)a[i] * (int32_t)w[i];
    return acc;
}

#ifdef X86
__attribute__((target("avx2,fma"))) static int32_t dot_avx2(const int8_t *a, const int8_t *w, int64_t d) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 64 <= d; i += 64) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + i)), a0 = _mm256_loadu_si256((const __m256i *)(a + i));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + i + 32));
        __m256i a1 = _mm256_loadu_si256((const __m256i *)(a + i + 32));
        __m256i p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(a0, w0));
        __m256i p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(a1, w1));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(p0, ones));
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(p1, ones));
    }
    __m256i acc = _mm256_add_epi32(acc0, acc1);
    __m128i half = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    half = _mm_hadd_epi32(half, half);
    half = _mm_hadd_epi32(half, half);
    return _mm_cvtsi128_si32(half) + dot_plain(a + i, w + i, d - i);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static int32_t dot_vnni(const int8_t *a, const int8_t *w,
                                                                              int64_t d) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i acc0 = zero, acc1 = zero;
    int64_t i = 0;
    for (; i + 128 <= d; i += 128) {
        __m512i w0 = _mm512_loadu_si512(w + i), a0 = _mm512_loadu_si512(a + i);
        __m512i w1 = _mm512_loadu_si512(w + i + 64), a1 = _mm512_loadu_si512(a + i + 64);
        __m512i s0 = _mm512_mask_sub_epi8(a0, _mm512_movepi8_mask(w0), zero, a0); /* a with w's sign */
        __m512i s1 = _mm512_mask_sub_epi8(a1, _mm512_movepi8_mask(w1), zero, a1);
        acc0 = _mm512_dpbusd_epi32(acc0, _mm512_abs_epi8(w0), s0);
        acc1 = _mm512_dpbusd_epi32(acc1, _mm512_abs_epi8(w1), s1);
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1)) + dot_plain(a + i, w + i, d - i);
}
#endif

static DotFn best_dot(const char **name) {
#ifdef X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) {
        *name = "avx512-vnni";
        return dot_vnni;
    }
    if (__builtin_cpu_supports("avx2")) {
        *name = "avx2";
        return dot_avx2;
    }
#endif
    *name = "c";
    return dot_plain;
}

static DotFn dot_int8;
static const char *dot_name;

typedef struct {
    const int8_t *qx; /* (rows, d_in) */
    const float *sx;  /* (rows,) */
    const int8_t *q;  /* (d_out, d_in) */
    const float *scale;
    float *y; /* (rows, d_out) */
    int64_t rows, d_in, d_out;
} Int8Args;

static void int8_range(const void *args, int64_t begin, int64_t end, int part) {
    (void)part;
    const Int8Args *s = args;
    for (int64_t o = begin; o < end; o++)
        for (int64_t r = 0; r < s->rows; r++) {
            int32_t acc = dot_int8(s->qx + r * s->d_in, s->q + o * s->d_in, s->d_in);
            s->y[r * s->d_out + o] = s->scale[o] * s->sx[r] * (float)acc;
        }
}

/* qx[r, :] = round(x[r, :] / sx[r]) with sx[r] = max |x[r, :]| / 127 (1 for a row of zeros). */
VECTORIZED static void quantize_rows(const float *restrict x, int64_t rows, int64_t d, int8_t *restrict qx,
                                     float *restrict sx) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float top = 0.0f;
        for (int64_t i = 0; i < d; i++) {
            float v = fabsf(xr[i]);
            top = v > top ? v : top;
        }
        sx[r] = top > 0.0f ? top / 127.0f : 1.0f;
        const float inverse = 1.0f / sx[r];
        for (int64_t i = 0; i < d; i++) qx[r * d + i] = (int8_t)lrintf(xr[i] * inverse);
    }
}

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
    parallel_for(int8_range, &s, d_out, d_in * rows, threads);
    free(qx);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"int8_linear", int8_linear, METH_VARARGS,
     "int8_linear(x, q, scale, y, rows, d_in, d_out, threads): y = x (scale * q)^T, x quantised per row"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quant", "Int8 decoding products.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__quant(void) {
    dot_int8 = best_dot(&dot_name);
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "PATH", dot_name) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
