/*
 * Fused CPU kernels for the elementwise parts of a training step, float32, row-major, contiguous.
 *
 * PyTorch runs SwiGLU's activation and RMSNorm's backward as several whole-array passes each (silu,
 * mul, silu_backward, mul, mul, ...; RMSNorm's backward is eight). Every pass streams megabytes
 * through memory for a few FLOPs per element. Each kernel here is one pass: it reads its inputs once
 * and writes its outputs once, so a row is in L1 for all of its arithmetic.
 *
 *   swiglu_forward(g, u, a, n)                  a = silu(g) * u
 *   swiglu_backward(g, u, grad_a, grad_g, grad_u, n)
 *                                               the gradients of g and u
 *   rmsnorm_forward(x, w, y, rstd, rows, d, eps)
 *                                               y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per row
 *   rmsnorm_backward(x, w, rstd, grad_y, grad_x, grad_w_parts, rows, d)
 *                                               grad_x, and one partial grad_w per thread (summed by the caller)
 *   cross_entropy(logits, targets, losses, rows, vocab, grad)
 *                                               per-row cross-entropy; with grad, the logits are overwritten
 *                                               by its gradient softmax - onehot (the LM head's five passes)
 *
 * Arguments are tensors' data pointers (ints) and sizes; the last argument of each is the thread
 * count. Work is split into one contiguous range per thread (OpenMP, the GIL released), and each loop
 * is compiled twice, for x86-64-v3 (AVX2 + FMA) and for the baseline, picked at load time by the CPU.
 * exp is a polynomial (_cpu.h) so that the loops vectorize; SiLU computed with it is within 2e-7
 * relative of float64, as PyTorch's is (tested). The wrappers in kernels.py check dtype, device and
 * layout; these functions trust them.
 */
#include "_cpu.h"

/* ---- SwiGLU's activation: a = silu(g) * u = g * sigmoid(g) * u ---- */

typedef struct {
    const float *g, *u, *grad_a;
    float *a, *grad_g, *grad_u;
} SwiGLUArgs;

VECTORIZED static void swiglu_forward_loop(const float *restrict g, const float *restrict u, float *restrict a,
                                           int64_t n) {
    float e[EXP_BLOCK];
    for (int64_t b = 0; b < n; b += EXP_BLOCK) {
        const int64_t m = n - b < EXP_BLOCK ? n - b : EXP_BLOCK;
        exp_negated(g + b, e, m);
        for (int64_t i = 0; i < m; i++) a[b + i] = g[b + i] / (1.0f + e[i]) * u[b + i];
    }
}

/* d a / d g = u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  d a / d u = silu(g). (Pointer arguments
 * declared restrict here, not locals: gcc then needs no run-time alias checks, of which there would be
 * too many for it to vectorize.) */
VECTORIZED static void swiglu_backward_loop(const float *restrict g, const float *restrict u,
                                            const float *restrict grad_a, float *restrict grad_g,
                                            float *restrict grad_u, int64_t n) {
    float e[EXP_BLOCK];
    for (int64_t b = 0; b < n; b += EXP_BLOCK) {
        const int64_t m = n - b < EXP_BLOCK ? n - b : EXP_BLOCK;
        exp_negated(g + b, e, m);
        for (int64_t i = b; i < b + m; i++) {
            const float sig = 1.0f / (1.0f + e[i - b]);
            grad_g[i] = grad_a[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig));
            grad_u[i] = grad_a[i] * g[i] * sig;
        }
    }
}

static void swiglu_forward_range(const void *p, int64_t begin, int64_t end, int part) {
    (void)part;
    const SwiGLUArgs *s = (const SwiGLUArgs *)p;
    swiglu_forward_loop(s->g + begin, s->u + begin, s->a + begin, end - begin);
}

static void swiglu_backward_range(const void *p, int64_t begin, int64_t end, int part) {
    (void)part;
    const SwiGLUArgs *s = (const SwiGLUArgs *)p;
    swiglu_backward_loop(s->g + begin, s->u + begin, s->grad_a + begin, s->grad_g + begin, s->grad_u + begin,
                         end - begin);
}

/* ---- RMSNorm: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), per row of d ---- */

typedef struct {
    const float *x, *w, *grad_y;
    float *y, *rstd, *grad_x, *grad_w_parts; /* rstd: written by the forward, read by the backward */
    int64_t d;
    float eps;
} RMSNormArgs;

VECTORIZED static void rmsnorm_forward_range(const void *p, int64_t begin, int64_t end, int part) {
    (void)part;
    const RMSNormArgs *s = (const RMSNormArgs *)p;
    const int64_t d = s->d;
    const float *restrict w = s->w;
    for (int64_t row = begin; row < end; row++) {
        const float *restrict x = s->x + row * d;
        float *restrict y = s->y + row * d;
        float r = 1.0f / sqrtf(dot(x, x, d) / (float)d + s->eps);
        s->rstd[row] = r;
        for (int64_t j = 0; j < d; j++) y[j] = x[j] * r * w[j];
    }
}

/* grad_x = rstd * (gw - x * rstd^2 * mean(gw * x)) with gw = grad_y * w;  grad_w += grad_y * x * rstd. */
VECTORIZED static void rmsnorm_backward_range(const void *p, int64_t begin, int64_t end, int part) {
    const RMSNormArgs *s = (const RMSNormArgs *)p;
    const int64_t d = s->d;
    const float *restrict w = s->w;
    float *restrict grad_w = s->grad_w_parts + part * d;
    memset(grad_w, 0, (size_t)d * sizeof(float));
    for (int64_t row = begin; row < end; row++) {
        const float *restrict x = s->x + row * d, *restrict gy = s->grad_y + row * d;
        float *restrict gx = s->grad_x + row * d;
        float r = s->rstd[row];
        float lanes[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= d; j += LANES)
            for (int l = 0; l < LANES; l++) {
                float gyx = gy[j + l] * x[j + l];
                lanes[l] += gyx * w[j + l];
                grad_w[j + l] += gyx * r;
            }
        float gwx = 0.0f;
        for (; j < d; j++) {
            float gyx = gy[j] * x[j];
            gwx += gyx * w[j];
            grad_w[j] += gyx * r;
        }
        for (int l = 0; l < LANES; l++) gwx += lanes[l];
        float c = r * r * gwx / (float)d;
        for (j = 0; j < d; j++) gx[j] = r * (gy[j] * w[j] - x[j] * c);
    }
}

/* ---- cross-entropy over rows of logits, and its gradient in place ----
 * loss = log sum_j exp(z_j - max) + max - z_target; with grad, z becomes softmax(z) - onehot(target). */

typedef struct {
    float *logits;
    const int64_t *targets;
    float *losses;
    int64_t vocab;
    int grad;
} CrossEntropyArgs;

VECTORIZED static void cross_entropy_range(const void *p, int64_t begin, int64_t end, int part) {
    (void)part;
    const CrossEntropyArgs *s = (const CrossEntropyArgs *)p;
    for (int64_t row = begin; row < end; row++) {
        float *z = s->logits + row * s->vocab;
        int64_t target = s->targets[row];
        float target_logit = z[target], top = row_max(z, s->vocab);
        float total = exp_sum(z, top, s->vocab, s->grad);
        s->losses[row] = logf(total) + top - target_logit;
        if (s->grad) {
            scale(z, 1.0f / total, s->vocab);
            z[target] -= 1.0f;
        }
    }
}

/* ---- Python bindings ---- */

static PyObject *swiglu_forward(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long g, u, a;
    long long n;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLi", &g, &u, &a, &n, &threads)) return NULL;
    SwiGLUArgs s = {.g = PTR(const float, g), .u = PTR(const float, u), .a = PTR(float, a)};
    parallel_for(swiglu_forward_range, &s, n, 1, threads);
    Py_RETURN_NONE;
}

static PyObject *swiglu_backward(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long g, u, grad_a, grad_g, grad_u;
    long long n;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKLi", &g, &u, &grad_a, &grad_g, &grad_u, &n, &threads)) return NULL;
    SwiGLUArgs s = {.g = PTR(const float, g), .u = PTR(const float, u), .grad_a = PTR(const float, grad_a),
                    .grad_g = PTR(float, grad_g), .grad_u = PTR(float, grad_u)};
    parallel_for(swiglu_backward_range, &s, n, 1, threads);
    Py_RETURN_NONE;
}

static PyObject *rmsnorm_forward(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, y, rstd;
    long long rows, d;
    double eps;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLLdi", &x, &w, &y, &rstd, &rows, &d, &eps, &threads)) return NULL;
    RMSNormArgs s = {.x = PTR(const float, x), .w = PTR(const float, w), .y = PTR(float, y),
                     .rstd = PTR(float, rstd), .d = d, .eps = (float)eps};
    parallel_for(rmsnorm_forward_range, &s, rows, d, threads);
    Py_RETURN_NONE;
}

static PyObject *rmsnorm_backward(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, rstd, grad_y, grad_x, grad_w_parts;
    long long rows, d;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKLLi", &x, &w, &rstd, &grad_y, &grad_x, &grad_w_parts, &rows, &d, &threads))
        return NULL;
    RMSNormArgs s = {.x = PTR(const float, x),         .w = PTR(const float, w),
                     .rstd = PTR(float, rstd),          .grad_y = PTR(const float, grad_y),
                     .grad_x = PTR(float, grad_x),      .grad_w_parts = PTR(float, grad_w_parts),
                     .d = d};
    return PyLong_FromLong(parallel_for(rmsnorm_backward_range, &s, rows, d, threads));
}

static PyObject *cross_entropy(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long logits, targets, losses;
    long long rows, vocab;
    int grad, threads;
    if (!PyArg_ParseTuple(args, "KKKLLpi", &logits, &targets, &losses, &rows, &vocab, &grad, &threads)) return NULL;
    CrossEntropyArgs s = {PTR(float, logits), PTR(const int64_t, targets), PTR(float, losses), vocab, grad};
    parallel_for(cross_entropy_range, &s, rows, vocab, threads);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"swiglu_forward", swiglu_forward, METH_VARARGS, "swiglu_forward(g, u, a, n, threads): a = silu(g) * u"},
    {"swiglu_backward", swiglu_backward, METH_VARARGS,
     "swiglu_backward(g, u, grad_a, grad_g, grad_u, n, threads): the gradients of g and u"},
    {"rmsnorm_forward", rmsnorm_forward, METH_VARARGS,
     "rmsnorm_forward(x, w, y, rstd, rows, d, eps, threads): y = x * rstd * w, rstd per row"},
    {"rmsnorm_backward", rmsnorm_backward, METH_VARARGS,
     "rmsnorm_backward(x, w, rstd, grad_y, grad_x, grad_w_parts, rows, d, threads) -> parts used"},
    {"cross_entropy", cross_entropy, METH_VARARGS,
     "cross_entropy(logits, targets, losses, rows, vocab, grad, threads): per-row losses; with grad, "
     "logits become softmax - onehot"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU kernels (float32).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
