/*
 * Causal self-attention for short sequences, forward and backward, float32 on CPU, from the fused
 * q|k|v projection and with RoPE applied inside.
 *
 *   forward(qkv, out, lse, rotations, scratch, batch, seq, heads, kv_heads, d, scale, threads)
 *       out = softmax(scale rope(q) rope(k)^T + causal mask) v, per head; lse = each row's log-sum-exp
 *   backward(qkv, grad_out, grad_qkv, lse, rotations, scratch, batch, seq, heads, kv_heads, d, scale, threads)
 *       grad_qkv = the gradient of the loss with respect to qkv
 *
 * Tensors are data pointers into contiguous float32 arrays:
 *   qkv, grad_qkv: (batch, seq, (heads + 2 kv_heads) d): the query heads, then the key heads, then the
 *                  value heads; query head h reads key/value head h / (heads / kv_heads)
 *   out, grad_out: (batch, seq, heads d), the heads merged, as the output projection reads them
 *   lse:           (batch, heads, seq)
 *   rotations:     (seq, d / 2, 2): cos and sin of each position's angle per pair of dimensions; 0 for none
 *   scratch:       per thread, ROWS * tp * d + SQUARES * tp * tp floats (FORWARD_ / BACKWARD_, below;
 *                  also module constants), tp being seq rounded up to a multiple of 16
 *
 * PyTorch's CPU flash attention cuts a sequence into tiles for long contexts; at a few hundred
 * positions and head dimensions of 32-128 its per-tile overhead dominates. Here one (batch, key/value
 * head) pair is one task: its rows are copied into scratch (L2-sized at these lengths), rotated, padded
 * to a multiple of 16, with q pre-scaled, and every product runs as 4 x 16 register blocks over the
 * blocks on or below the diagonal only. As in flash attention the forward keeps only lse, and the
 * backward recomputes the probabilities from it, so what is kept for the backward grows with seq, not
 * seq^2 (the seq^2 scratch is per thread, and reused). With P = softmax(S):
 *   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = scale dS K,  dK = dS^T (scale Q),
 * and the gradients of the unrotated q and k are those of the rotated ones rotated back.
 * d must be a multiple of 16 (the wrapper in kernels.py checks this, and the rest).
 */
#include "_cpu.h"

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* for unaligned loads and stores */
typedef int32_t v8i __attribute__((vector_size(32)));

enum { FORWARD_ROWS = 4, FORWARD_SQUARES = 1, BACKWARD_ROWS = 8, BACKWARD_SQUARES = 2 }; /* scratch, per thread */

typedef struct {
    const float *qkv, *grad_out, *rotations;
    float *out, *grad_qkv, *lse, *scratch;
    int64_t seq, heads, kv_heads, d;
    float scale;
} AttentionArgs;

/* c[r][0:16] (+)= sum over k in [k0, k1) of a[r * a_row + k * a_k] * b[k * b_k + (0:16)], for rows r < 4.
 * Eight accumulators of 8 floats stay in registers; each k costs 2 loads, 4 broadcasts and 8 FMAs. */
INLINE void block4x16(const float *a, int64_t a_row, int64_t a_k, const float *b, int64_t b_k, int64_t k0,
                      int64_t k1, float *c, int64_t c_row, int accumulate) {
    v8 c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
    for (int64_t k = k0; k < k1; k++) {
        const float *bk = b + k * b_k, *ak = a + k * a_k;
        v8 b0 = *(const v8u *)bk, b1 = *(const v8u *)(bk + 8);
        float a0 = ak[0], a1 = ak[a_row], a2 = ak[2 * a_row], a3 = ak[3 * a_row];
        c00 += a0 * b0, c01 += a0 * b1, c10 += a1 * b0, c11 += a1 * b1;
        c20 += a2 * b0, c21 += a2 * b1, c30 += a3 * b0, c31 += a3 * b1;
    }
    v8 sums[8] = {c00, c01, c10, c11, c20, c21, c30, c31};
    for (int r = 0; r < 4; r++)
        for (int h = 0; h < 2; h++) {
            v8u *dst = (v8u *)(c + r * c_row + 8 * h);
            *dst = accumulate ? *dst + sums[2 * r + h] : sums[2 * r + h];
        }
}

/* The columns a score row's block of 4 rows computes: up to its last row, rounded up to 16. */
INLINE int64_t row_end(int64_t i) { return (((i | 3) + 1) + 15) & ~(int64_t)15; }

/* (tp x tp) s = a b^T on and below the diagonal, a: (tp x d), bt = b^T: (d x tp). */
INLINE void lower_products(float *s, const float *a, const float *bt, int64_t tp, int64_t d) {
    for (int64_t i = 0; i < tp; i += 4)
        for (int64_t j = 0; j < row_end(i); j += 16)
            block4x16(a + i * d, d, 1, bt + j, tp, 0, d, s + i * tp + j, tp, 0);
}

/* (tp x d) c = p b with p lower triangular (tp x tp), b: (tp x d). */
INLINE void lower_times(float *c, const float *p, const float *b, int64_t tp, int64_t d) {
    for (int64_t i = 0; i < tp; i += 4)
        for (int64_t e = 0; e < d; e += 16) block4x16(p + i * tp, tp, 1, b + e, d, 0, i + 4, c + i * d + e, d, 0);
}

/* (tp x d) c += p^T b with p lower triangular (tp x tp), b: (tp x d). */
INLINE void add_lower_transposed_times(float *c, const float *p, const float *b, int64_t tp, int64_t d) {
    for (int64_t j = 0; j < tp; j += 4)
        for (int64_t e = 0; e < d; e += 16) block4x16(p + j, 1, tp, b + e, d, j, tp, c + j * d + e, d, 1);
}

#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* dst[e][i] = src[i][e] for an 8 x 8 block, in registers: unpack pairs, then quads, then halves (AVX's
 * unpcklps / shufps / vperm2f128). Element by element this was a sixth of the kernels' time. */
INLINE void transpose8x8(const float *src, int64_t src_row, float *dst, int64_t dst_row) {
    v8 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = *(const v8u *)(src + i * src_row);
    for (int i = 0; i < 8; i += 2) {
        t[i] = SHUFFLE(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = SHUFFLE(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; h++) {
            u[i + h] = SHUFFLE(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[i + h + 2] = SHUFFLE(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    /* u[0..3] hold columns 0, 2, 1, 3 of rows 0-3 (low half) and 4, 6, 5, 7 (high half); u[4..7], rows 4-7 */
    static const int column[4] = {0, 2, 1, 3};
    for (int c = 0; c < 4; c++) {
        *(v8u *)(dst + column[c] * dst_row) = SHUFFLE(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        *(v8u *)(dst + (column[c] + 4) * dst_row) = SHUFFLE(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* (d x tp) dst = src^T for src (tp x d) rows in scratch (so tp is a multiple of 8). */
INLINE void transpose(float *dst, const float *src, int64_t tp, int64_t d) {
    for (int64_t i = 0; i < tp; i += 8)
        for (int64_t e = 0; e < d; e += 8) transpose8x8(src + i * d + e, d, dst + e * tp + i, tp);
}

/* Each pair (x[2m], x[2m+1]) turned by the angle whose (cos, sin) is (rot[2m], rot[2m+1]), or by its
 * negative (`sign` -1: the transpose, for gradients), and times `factor`. */
INLINE void rotate(float *restrict dst, const float *restrict src, const float *restrict rot, int64_t d, float factor,
                   float sign) {
    for (int64_t e = 0; e < d; e += 2) {
        float c = rot[e] * factor, s = rot[e + 1] * sign * factor, x0 = src[e], x1 = src[e + 1];
        dst[e] = x0 * c - x1 * s;
        dst[e + 1] = x0 * s + x1 * c;
    }
}

/* (tp x d) dst <- rows 0..seq-1 of src (row stride `row`), rotated if rot, times factor; the rest zero. */
INLINE void load_rows(float *dst, const float *src, int64_t row, const float *rot, int64_t seq, int64_t tp,
                      int64_t d, float factor) {
    for (int64_t i = 0; i < seq; i++) {
        if (rot)
            rotate(dst + i * d, src + i * row, rot + i * d, d, factor, 1.0f);
        else
            for (int64_t e = 0; e < d; e++) dst[i * d + e] = src[i * row + e] * factor;
    }
    memset(dst + seq * d, 0, (size_t)((tp - seq) * d) * sizeof(float));
}

/* Rows 0..seq-1 of (tp x d) src into dst (row stride `row`), rotated back if rot, times factor. */
INLINE void store_rows(float *dst, int64_t row, const float *src, const float *rot, int64_t seq, int64_t d,
                       float factor) {
    for (int64_t i = 0; i < seq; i++) {
        if (rot)
            rotate(dst + i * row, src + i * d, rot + i * d, d, factor, -1.0f);
        else
            for (int64_t e = 0; e < d; e++) dst[i * row + e] = src[i * d + e] * factor;
    }
}

/* One task: batch b, key/value head j, which serves query heads j * group ... (j + 1) * group - 1. */
typedef struct {
    int64_t b, first_head, group, width; /* width: floats per position of qkv */
    const float *k, *v;                  /* offsets into a position's qkv row */
} Task;

INLINE Task task(const AttentionArgs *s, int64_t index) {
    Task t;
    t.b = index / s->kv_heads;
    t.group = s->heads / s->kv_heads;
    t.first_head = (index % s->kv_heads) * t.group;
    t.width = (s->heads + 2 * s->kv_heads) * s->d;
    const float *row0 = s->qkv + t.b * s->seq * t.width;
    t.k = row0 + (s->heads + index % s->kv_heads) * s->d;
    t.v = t.k + s->kv_heads * s->d;
    return t;
}

VECTORIZED static void forward_range(const void *p, int64_t begin, int64_t end, int part) {
    const AttentionArgs *s = (const AttentionArgs *)p;
    const int64_t seq = s->seq, d = s->d, tp = (seq + 15) & ~(int64_t)15;
    float *q = s->scratch + part * (FORWARD_ROWS * tp * d + FORWARD_SQUARES * tp * tp);
    float *kt = q + tp * d, *v = kt + tp * d, *o = v + tp * d, *scores = o + tp * d;
    for (int64_t index = begin; index < end; index++) {
        Task t = task(s, index);
        load_rows(o, t.k, t.width, s->rotations, seq, tp, d, 1.0f); /* o: the rotated keys, for now */
        transpose(kt, o, tp, d);
        load_rows(v, t.v, t.width, NULL, seq, tp, d, 1.0f);
        for (int64_t h = t.first_head; h < t.first_head + t.group; h++) {
            load_rows(q, s->qkv + t.b * seq * t.width + h * d, t.width, s->rotations, seq, tp, d, s->scale);
            lower_products(scores, q, kt, tp, d);
            float *lse = s->lse + (t.b * s->heads + h) * seq;
            for (int64_t i = 0; i < tp; i++) {
                float *row = scores + i * tp;
                float top = row_max(row, i + 1), total = exp_sum(row, top, i + 1, 1);
                scale(row, 1.0f / total, i + 1);
                memset(row + i + 1, 0, (size_t)(row_end(i) - i - 1) * sizeof(float));
                if (i < seq) lse[i] = top + logf(total);
            }
            lower_times(o, scores, v, tp, d);
            store_rows(s->out + (t.b * seq * s->heads + h) * d, s->heads * d, o, NULL, seq, d, 1.0f);
        }
    }
}

VECTORIZED static void backward_range(const void *p, int64_t begin, int64_t end, int part) {
    const AttentionArgs *s = (const AttentionArgs *)p;
    const int64_t seq = s->seq, d = s->d, tp = (seq + 15) & ~(int64_t)15;
    float *q = s->scratch + part * (BACKWARD_ROWS * tp * d + BACKWARD_SQUARES * tp * tp);
    float *k = q + tp * d, *kt = k + tp * d, *vt = kt + tp * d, *grad_out = vt + tp * d, *grad_q = grad_out + tp * d,
          *grad_k = grad_q + tp * d, *grad_v = grad_k + tp * d, *probs = grad_v + tp * d, *grad_scores = probs + tp * tp;
    for (int64_t index = begin; index < end; index++) {
        Task t = task(s, index);
        load_rows(k, t.k, t.width, s->rotations, seq, tp, d, 1.0f);
        transpose(kt, k, tp, d);
        load_rows(grad_q, t.v, t.width, NULL, seq, tp, d, 1.0f); /* grad_q: the values, for now */
        transpose(vt, grad_q, tp, d);
        memset(grad_k, 0, (size_t)(2 * tp * d) * sizeof(float)); /* and grad_v */
        for (int64_t h = t.first_head; h < t.first_head + t.group; h++) {
            float *grad_q_out = s->grad_qkv + t.b * seq * t.width + h * d;
            load_rows(q, s->qkv + t.b * seq * t.width + h * d, t.width, s->rotations, seq, tp, d, s->scale);
            load_rows(grad_out, s->grad_out + (t.b * seq * s->heads + h) * d, s->heads * d, NULL, seq, tp, d, 1.0f);
            lower_products(probs, q, kt, tp, d);
            lower_products(grad_scores, grad_out, vt, tp, d); /* dP, overwritten by dS below */
            const float *lse = s->lse + (t.b * s->heads + h) * seq;
            for (int64_t i = 0; i < tp; i++) {
                float *pr = probs + i * tp, *gs = grad_scores + i * tp;
                int64_t pad = row_end(i) - i - 1;
                exp_sum(pr, i < seq ? lse[i] : 0.0f, i + 1, 1); /* P = exp(S - lse) */
                memset(pr + i + 1, 0, (size_t)pad * sizeof(float));
                float row_dot = dot(pr, gs, i + 1);
                for (int64_t j = 0; j <= i; j++) gs[j] = pr[j] * (gs[j] - row_dot);
                memset(gs + i + 1, 0, (size_t)pad * sizeof(float));
            }
            add_lower_transposed_times(grad_v, probs, grad_out, tp, d);
            lower_times(grad_q, grad_scores, k, tp, d);
            add_lower_transposed_times(grad_k, grad_scores, q, tp, d);
            store_rows(grad_q_out, t.width, grad_q, s->rotations, seq, d, s->scale);
        }
        float *grad_k_out = s->grad_qkv + (t.k - s->qkv), *grad_v_out = s->grad_qkv + (t.v - s->qkv);
        store_rows(grad_k_out, t.width, grad_k, s->rotations, seq, d, 1.0f);
        store_rows(grad_v_out, t.width, grad_v, NULL, seq, d, 1.0f);
    }
}

/* ---- Python bindings ---- */

static PyObject *forward(PyObject *self, PyObject *args) {
    (void)self;
    AttentionArgs a = {0};
    unsigned long long qkv, out, lse, rotations, scratch;
    long long batch;
    double scale_arg;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLdi", &qkv, &out, &lse, &rotations, &scratch, &batch, &a.seq, &a.heads,
                          &a.kv_heads, &a.d, &scale_arg, &threads))
        return NULL;
    a.qkv = PTR(const float, qkv), a.out = PTR(float, out), a.lse = PTR(float, lse);
    a.rotations = PTR(const float, rotations), a.scratch = PTR(float, scratch), a.scale = (float)scale_arg;
    parallel_for(forward_range, &a, batch * a.kv_heads, a.seq * a.seq * a.d, threads);
    Py_RETURN_NONE;
}

static PyObject *backward(PyObject *self, PyObject *args) {
    (void)self;
    AttentionArgs a = {0};
    unsigned long long qkv, grad_out, grad_qkv, lse, rotations, scratch;
    long long batch;
    double scale_arg;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLLLdi", &qkv, &grad_out, &grad_qkv, &lse, &rotations, &scratch, &batch,
                          &a.seq, &a.heads, &a.kv_heads, &a.d, &scale_arg, &threads))
        return NULL;
    a.qkv = PTR(const float, qkv), a.grad_out = PTR(const float, grad_out), a.grad_qkv = PTR(float, grad_qkv);
    a.lse = PTR(float, lse), a.rotations = PTR(const float, rotations), a.scratch = PTR(float, scratch);
    a.scale = (float)scale_arg;
    parallel_for(backward_range, &a, batch * a.kv_heads, a.seq * a.seq * a.d, threads);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS,
     "forward(qkv, out, lse, rotations, scratch, batch, seq, heads, kv_heads, d, scale, threads)"},
    {"backward", backward, METH_VARARGS,
     "backward(qkv, grad_out, grad_qkv, lse, rotations, scratch, batch, seq, heads, kv_heads, d, scale, threads)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_attention", "Causal attention for short sequences.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__attention(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "FORWARD_ROWS", FORWARD_ROWS) ||
              PyModule_AddIntConstant(m, "FORWARD_SQUARES", FORWARD_SQUARES) ||
              PyModule_AddIntConstant(m, "BACKWARD_ROWS", BACKWARD_ROWS) ||
              PyModule_AddIntConstant(m, "BACKWARD_SQUARES", BACKWARD_SQUARES))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
