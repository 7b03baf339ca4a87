/*
 * A whole decoding step of TransformerLM in one call, for the few rows of a step: `seqs` sequences that
 * each add `n_new` tokens (one, for a generation step; a few, for a speculative draft checked at once, or
 * a short prompt), positions past..past+n_new-1, each row attending causally: every block — RMSNorm, q|k|v, RoPE, the new key and value into the layer's KV cache,
 * attention over the cache, the output projection and its residual, RMSNorm, w1|w3, SwiGLU, w2 and its
 * residual — then the final RMSNorm and the LM head, to the logits. The same arithmetic as the model's modules (the tests check it
 * against them), without what it costs to run them one PyTorch operation at a time: a small model's
 * step is ~15 operations a layer of a few microseconds of work each, and their dispatch took more time
 * than reading the weights did. Here the GIL is released once, each product is spread over the OpenMP
 * threads (or, with many rows, each thread takes whole sequences through the step), and everything else
 * runs in place.
 *
 * Weights (per layer, addresses in a row of the `layers` table): q|k|v stacked, the output projection,
 * w1|w3 stacked and w2, each packed (`kernels.pack_weight`: tiled, in one format for the step, float32,
 * bfloat16, or int8 with a scale per output channel: _matvec.h); the two RMSNorm gains in float32; the layer's KV
 * cache, k and v float32, contiguous (sequences, kv_heads, max_len, d_head) or a paged pool found
 * through block tables (the serving engine's), positions 0..past[b]-1 filled for sequence b. The LM
 * head in the same format, (vocab, d).
 */
#include "_matvec.h"

/* The columns of the `layers` table, one row per layer. */
enum { LN1, QKV, QKV_SCALE, WO, WO_SCALE, LN2, W13, W13_SCALE, W2, W2_SCALE, K_CACHE, V_CACHE,
       QKV_PANELS, WO_PANELS, W13_PANELS, W2_PANELS, FIELDS };

#define MAX_ROWS 256
#define ROWS_PER_PART 32 /* the fewest rows a thread takes a step of its own for (see `step`) */

typedef struct {
    int64_t rows, n_new, d, heads, kv_heads, d_head, d_ff; /* rows = sequences x n_new */
    const int64_t *past;   /* (sequences,): positions cached before this step, each sequence its own */
    const int64_t *start;  /* (sequences,): its first position (after left padding, which no row sees) */
    int64_t longest;       /* the most keys a row attends to, of any sequence in the whole step */
    int64_t first_seq;     /* this part's first sequence in the caches (a step split over threads) */
    /* where a sequence's keys lie: contiguous caches (sequences, kv_heads, max_len, d_head), or, with
     * `tables`, a paged pool (rows of the pool, kv_heads, d_head), position t of sequence b at pool row
     * tables[b, t / block_size] * block_size + t % block_size */
    int64_t max_len;
    const int64_t *tables;
    int64_t max_blocks, block_size;
    int64_t *key_rows; /* (sequences, longest): the row of each position, in the pool or in the sequence */
    float eps;
    int kind, threads;
    const float *rotations; /* (positions, d_head / 2, 2): cos, sin; NULL without RoPE */
    void *x_buffer;         /* x as the products read it: (rows, d_in padded) float32, or int8 */
    float sx[MAX_ROWS];
} Step;

/* n keys rounded up to whole vectors of sixteen (the softmax's, and AVX-512's scores). */
INLINE int64_t padded_keys(int64_t n) { return (n + 15) / 16 * 16; }

static int threads_for(int64_t n, int64_t cost, int threads) {
    int64_t useful = (n * cost) / MIN_ELEMENTS_PER_THREAD;
    if (threads > useful) threads = (int)(useful > 1 ? useful : 1);
    if (threads > n) threads = (int)(n > 1 ? n : 1);
    return threads;
}

/* fn over [0, n) in `threads` contiguous parts (the GIL is already released). */
static void run(RangeFn fn, const void *args, int64_t n, int threads) {
    if (threads <= 1) {
        fn(args, 0, n, 0);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) fn(args, n * t / threads, n * (t + 1) / threads, t);
}

/* y (rows, d_out) = x (rows, d_in) W^T, W packed in the step's format (_matvec.h), or, where the step
 * has PANEL_ROWS rows or more and float32 weights, from W's panels (NULL when the plan has none). */
static void matvec(Step *s, const float *x, const void *w, const float *scale, const float *panels, float *y,
                   int64_t d_in, int64_t d_out) {
#ifdef X86
    if (panels && s->rows >= PANEL_ROWS) {
        const int64_t n = (d_out + PANEL - 1) / PANEL;
        PanelArgs a = {x, panels, y, s->rows, d_in, d_out};
        run(panels_range, &a, n, threads_for(n, PANEL * d_in * s->rows, s->threads));
        return;
    }
#endif
    const int64_t groups = (d_out + 3) / 4, d_pad = padded(d_in, s->kind);
    MatvecArgs a = {s->kind, prepare_x(x, s->rows, d_in, s->kind, s->x_buffer, s->sx), w, scale, s->sx, y, s->rows,
                    d_pad, d_out};
    run(matvec_range, &a, groups, threads_for(groups, 4 * d_pad * s->rows, s->threads));
}

/* out = x / sqrt(mean(x^2) + eps) * gain, per row. */
VECTORIZED static void rms_norm(const float *x, const float *gain, float *out, int64_t rows, int64_t d, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        const float inverse = 1.0f / sqrtf(dot(xr, xr, d) / (float)d + eps);
        for (int64_t i = 0; i < d; i++) out[r * d + i] = xr[i] * inverse * gain[i];
    }
}

/* Rotates each pair (v[2i], v[2i+1]) of each of `heads` heads by its angle: rot = (cos, sin) pairs. */
VECTORIZED static void rope(float *v, const float *rot, int64_t heads, int64_t d_head) {
    for (int64_t h = 0; h < heads; h++) {
        float *vh = v + h * d_head;
        for (int64_t i = 0; i < d_head / 2; i++) {
            const float a = vh[2 * i], b = vh[2 * i + 1], c = rot[2 * i], sn = rot[2 * i + 1];
            vh[2 * i] = a * c - b * sn;
            vh[2 * i + 1] = a * sn + b * c;
        }
    }
}

/* Where key / value head g of position t of sequence b lies in a layer's cache (in floats). */
INLINE int64_t kv_offset(const Step *s, int64_t b, int64_t g, int64_t t) {
    const int64_t row = s->key_rows[b * s->longest + t];
    if (!s->tables) return (((s->first_seq + b) * s->kv_heads + g) * s->max_len + row) * s->d_head;
    return (row * s->kv_heads + g) * s->d_head;
}

/* key_rows: position t of sequence b at row t of its cache, or at pool row tables[b, t / block_size] *
 * block_size + t % block_size; the same for every layer, so found once a step. */
static void find_key_rows(Step *s, int64_t seqs) {
    for (int64_t b = 0; b < seqs; b++)
        for (int64_t t = 0; t < s->past[b] + s->n_new; t++)
            s->key_rows[b * s->longest + t] =
                s->tables ? s->tables[b * s->max_blocks + t / s->block_size] * s->block_size + t % s->block_size : t;
}

/* scores[0..n) <- softmax(scores[0..n)), over whole vectors: the padding up to sixteen is -inf, whose
 * exp is ~1e-38 (exp_poly clamps), nothing beside the top's 1. */
INLINE void softmax_padded(float *scores, int64_t n) {
    const int64_t n_pad = padded_keys(n);
    for (int64_t t = n; t < n_pad; t++) scores[t] = -INFINITY;
    const float top = row_max(scores, n_pad), inverse = 1.0f / exp_sum(scores, top, n_pad, 1);
    for (int64_t t = 0; t < n; t++) scores[t] *= inverse;
}

#ifdef X86
/* One query's attention (see attention_range) with AVX-512, d_head a multiple of 16: the scores of
 * sixteen keys at a time, their sums reduced together (SUM16, _matvec.h), and the output in registers,
 * sixteen of its elements at a time, over all positions. */
__attribute__((target("avx512f"))) static void attend_avx512(const Step *s, const float *q, const float *k,
                                                             const float *v, int64_t b, int64_t g, int64_t first,
                                                             int64_t n, float scale, float *scores, float *o) {
    const int64_t dh = s->d_head;
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
        __m512 acc[16];
        for (int j = 0; j < 16; j++) {
            acc[j] = _mm512_setzero_ps();
            if (t0 + j >= n) continue;
            const float *kt = k + kv_offset(s, b, g, first + t0 + j);
            for (int64_t c = 0; c < dh; c += 16)
                acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(kt + c), acc[j]);
        }
        SUM16(acc, _mm512_add_ps, SAME, SAME);
        _mm512_storeu_ps(scores + t0, _mm512_mul_ps(acc[0], _mm512_set1_ps(scale)));
    }
    softmax_padded(scores, n);
    for (int64_t c = 0; c < dh; c += 16) {
        __m512 out = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t++)
            out = _mm512_fmadd_ps(_mm512_set1_ps(scores[t]), _mm512_loadu_ps(v + kv_offset(s, b, g, first + t) + c), out);
        _mm512_storeu_ps(o + c, out);
    }
}
#endif

typedef struct {
    const Step *s;
    const float *qkv;   /* (rows, (heads + 2 kv_heads) d_head): the queries, rotated */
    const float *k, *v; /* this layer's cache, the new positions written */
    float *out;         /* (rows, heads d_head) */
    float *scores;      /* (threads, longest) */
} AttentionArgs;

/* softmax(q k^T / sqrt(d_head)) v for the (row, head) items [begin, end): row r, the i-th new token of
 * sequence b, sees positions 0..past[b]+i of its sequence. */
VECTORIZED static void attention_range(const void *args, int64_t begin, int64_t end, int part) {
    const AttentionArgs *a = args;
    const Step *s = a->s;
    const int64_t dh = s->d_head, group = s->heads / s->kv_heads;
    const int64_t width = (s->heads + 2 * s->kv_heads) * dh;
    const float scale_ = 1.0f / sqrtf((float)dh);
    float *scores = a->scores + part * padded_keys(s->longest);
    const int by_sixteen = use_avx512 && dh % 16 == 0;
    for (int64_t item = begin; item < end; item++) {
        const int64_t r = item / s->heads, h = item % s->heads, b = r / s->n_new, g = h / group;
        const int64_t first = s->start[b], n = s->past[b] + r % s->n_new + 1 - first;
        const float *q = a->qkv + r * width + h * dh;
        float *o = a->out + r * s->heads * dh + h * dh;
        if (n <= 0) { /* a padding token of a left-padded prompt: it sees nothing, and no one reads it */
            memset(o, 0, (size_t)dh * sizeof(float));
            continue;
        }
#ifdef X86
        if (by_sixteen) {
            attend_avx512(s, q, a->k, a->v, b, g, first, n, scale_, scores, o);
            continue;
        }
#endif
        for (int64_t t = 0; t < n; t++) scores[t] = dot(q, a->k + kv_offset(s, b, g, first + t), dh) * scale_;
        softmax_padded(scores, n);
        for (int64_t i = 0; i < dh; i++) o[i] = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            const float *vt = a->v + kv_offset(s, b, g, first + t);
            for (int64_t i = 0; i < dh; i++) o[i] += scores[t] * vt[i];
        }
    }
}

/* silu(gate) * up for each row of gate|up (rows, 2 d_ff), into the gate's half. */
typedef struct {
    const float *wide; /* (rows, 2 d_ff): gate|up */
    float *out;        /* (rows, d_ff) */
    int64_t d_ff;
} SwigluArgs;

/* out = silu(gate) * up for the rows [begin, end). */
VECTORIZED static void swiglu_range(const void *args, int64_t begin, int64_t end, int part) {
    (void)part;
    const SwigluArgs *a = args;
    const int64_t d_ff = a->d_ff;
    for (int64_t r = begin; r < end; r++) {
        const float *gate = a->wide + r * 2 * d_ff, *up = gate + d_ff;
        float *out = a->out + r * d_ff;
        float e[EXP_BLOCK];
        for (int64_t b = 0; b < d_ff; b += EXP_BLOCK) {
            const int64_t m = d_ff - b < EXP_BLOCK ? d_ff - b : EXP_BLOCK;
            exp_negated(gate + b, e, m);
            for (int64_t i = 0; i < m; i++) out[b + i] = gate[b + i] / (1.0f + e[i]) * up[b + i];
        }
    }
}

INLINE const void *at(const int64_t *row, int field) { return (const void *)(uintptr_t)row[field]; }

/* One block on x (rows, d), in place. */
static void block(Step *s, const int64_t *w, float *x, float *h, float *qkv, float *att, float *wide, float *ff,
                  float *scores) {
    const int64_t rows = s->rows, d = s->d, dh = s->d_head, d_ff = s->d_ff;
    const int64_t q_dim = s->heads * dh, kv_dim = s->kv_heads * dh, width = q_dim + 2 * kv_dim;
    float *k_cache = (float *)at(w, K_CACHE), *v_cache = (float *)at(w, V_CACHE);

    rms_norm(x, at(w, LN1), h, rows, d, s->eps);
    matvec(s, h, at(w, QKV), at(w, QKV_SCALE), at(w, QKV_PANELS), qkv, d, width);
    for (int64_t r = 0; r < rows; r++) {
        float *row = qkv + r * width;
        const int64_t b = r / s->n_new, position = s->past[b] + r % s->n_new;
        if (s->rotations) { /* RoPE counts positions from the sequence's first token */
            const int64_t counted = position > s->start[b] ? position - s->start[b] : 0; /* padding: 0, as in the modules */
            const float *rot = s->rotations + counted * dh; /* (d_head / 2) (cos, sin) pairs */
            rope(row, rot, s->heads, dh);
            rope(row + q_dim, rot, s->kv_heads, dh);
        }
        for (int64_t g = 0; g < s->kv_heads; g++) {
            const int64_t slot = kv_offset(s, b, g, position);
            memcpy(k_cache + slot, row + q_dim + g * dh, (size_t)dh * sizeof(float));
            memcpy(v_cache + slot, row + q_dim + kv_dim + g * dh, (size_t)dh * sizeof(float));
        }
    }
    AttentionArgs a = {s, qkv, k_cache, v_cache, att, scores};
    run(attention_range, &a, rows * s->heads, threads_for(rows * s->heads, s->longest * dh * 2, s->threads));
    matvec(s, att, at(w, WO), at(w, WO_SCALE), at(w, WO_PANELS), h, q_dim, d);
    for (int64_t i = 0; i < rows * d; i++) x[i] += h[i];

    rms_norm(x, at(w, LN2), h, rows, d, s->eps);
    matvec(s, h, at(w, W13), at(w, W13_SCALE), at(w, W13_PANELS), wide, d, 2 * d_ff);
    SwigluArgs activation = {wide, ff, d_ff};
    run(swiglu_range, &activation, rows, threads_for(rows, 8 * d_ff, s->threads)); /* exp: ~8 element-costs */
    matvec(s, ff, at(w, W2), at(w, W2_SCALE), at(w, W2_PANELS), h, d_ff, d);
    for (int64_t i = 0; i < rows * d; i++) x[i] += h[i];
}

/* The activations a part of the step works in, besides its rows of x and of the logits. */
typedef struct {
    float *h, *qkv, *att, *wide, *ff, *scores;
    void *x_buffer;
} Buffers;

static void free_buffers(Buffers *b) {
    free(b->h), free(b->qkv), free(b->att), free(b->wide), free(b->ff), free(b->scores), free(b->x_buffer);
}

static int alloc_buffers(Buffers *b, const Step *s) {
    const int64_t rows = s->rows, d = s->d, q_dim = s->heads * s->d_head, d_ff = s->d_ff;
    const int64_t width = q_dim + 2 * s->kv_heads * s->d_head;
    const int64_t wide_in = padded(d > d_ff ? d : d_ff, s->kind);
    b->h = malloc(sizeof(float) * rows * (d > q_dim ? d : q_dim));
    b->qkv = malloc(sizeof(float) * rows * width);
    b->att = malloc(sizeof(float) * rows * q_dim);
    b->wide = malloc(sizeof(float) * rows * 2 * d_ff), b->ff = malloc(sizeof(float) * rows * d_ff);
    b->scores = malloc(sizeof(float) * (s->threads > 0 ? s->threads : 1) * padded_keys(s->longest));
    b->x_buffer = malloc(sizeof(float) * rows * wide_in);
    if (b->h && b->qkv && b->att && b->wide && b->ff && b->scores && b->x_buffer) return 0;
    free_buffers(b);
    return -1;
}

typedef struct {
    const int64_t *table;
    int64_t n_layers, vocab;
    const float *ln_final, *head_scale, *head_panels;
    const void *head;
} Model;

/* Every block, the final norm and the LM head for the rows of `s`: x (rows, d) in place, logits (rows,
 * vocab). Returns -1 when its buffers cannot be allocated (nothing computed). */
static int forward(Step *s, const Model *m, float *x, float *logits) {
    Buffers b = {0};
    if (alloc_buffers(&b, s)) return -1;
    s->x_buffer = b.x_buffer;
    for (int64_t l = 0; l < m->n_layers; l++) block(s, m->table + l * FIELDS, x, b.h, b.qkv, b.att, b.wide, b.ff, b.scores);
    rms_norm(x, m->ln_final, b.h, s->rows, s->d, s->eps);
    matvec(s, b.h, m->head, m->head_scale, m->head_panels, logits, s->d, m->vocab);
    free_buffers(&b);
    return 0;
}

/* Sequences [first, end) of the step as a step of their own, computed on one thread. */
static Step part_of(const Step *s, int64_t first, int64_t end) {
    Step p = *s;
    p.rows = (end - first) * s->n_new, p.first_seq = s->first_seq + first;
    p.past += first, p.start += first, p.key_rows += first * s->longest, p.threads = 1;
    return p;
}

static PyObject *step(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, layers, rotations, ln_final, head, head_scale, head_panels, logits, past, start, tables;
    long long n_layers, seqs, n_new, d, heads, kv_heads, d_head, d_ff, max_len, max_blocks, block_size, vocab;
    float eps;
    int kind, threads;
    if (!PyArg_ParseTuple(args, "KKLLLLLLLLKKLKLLKfiKKKKLKi", &x, &layers, &n_layers, &seqs, &n_new, &d, &heads,
                          &kv_heads, &d_head, &d_ff, &past, &start, &max_len, &tables, &max_blocks, &block_size,
                          &rotations, &eps, &kind, &ln_final, &head, &head_scale, &head_panels, &vocab, &logits,
                          &threads))
        return NULL;
    const int64_t rows = seqs * n_new, *pasts = PTR(const int64_t, past);
    int64_t longest = 0;
    for (int64_t b = 0; b < seqs; b++) longest = pasts[b] + n_new > longest ? pasts[b] + n_new : longest;
    if (seqs < 1 || n_new < 1 || rows > MAX_ROWS || (!tables && longest > max_len) ||
        (tables && longest > max_blocks * block_size) || kind < F32 || kind > INT8 || heads % kv_heads) {
        PyErr_SetString(PyExc_ValueError, "decode step: bad shape");
        return NULL;
    }
    Step s = {rows, n_new, d, heads, kv_heads, d_head, d_ff, pasts, PTR(const int64_t, start), longest, 0, max_len,
              PTR(const int64_t, tables),
              max_blocks, block_size, NULL, eps, kind, threads, PTR(const float, rotations), NULL, {0}};
    s.key_rows = malloc(sizeof(int64_t) * seqs * longest);
    if (!s.key_rows) return PyErr_NoMemory();
    const Model m = {PTR(const int64_t, layers), n_layers, vocab, PTR(const float, ln_final),
                     PTR(const float, head_scale), PTR(const float, head_panels), PTR(const void, head)};
    float *state = PTR(float, x), *out = PTR(float, logits);
    /* Many rows: each thread takes whole sequences through the whole step, reading all the weights, not a
     * share of every product's outputs: no barrier between the operations, and each thread's activations
     * stay in its own core's cache. Few rows: the products, bound by reading the weights, split them. */
    const int parts = seqs >= threads && rows >= ROWS_PER_PART * threads ? threads : 1;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    find_key_rows(&s, seqs);
    if (parts == 1) {
        failed = forward(&s, &m, state, out);
    } else {
#pragma omp parallel for num_threads(parts) schedule(static, 1) reduction(| : failed)
        for (int t = 0; t < parts; t++) {
            const int64_t first = seqs * t / parts, end = seqs * (t + 1) / parts;
            Step p = part_of(&s, first, end);
            failed |= forward(&p, &m, state + first * n_new * d, out + first * n_new * vocab);
        }
    }
    Py_END_ALLOW_THREADS
    free(s.key_rows);
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"step", step, METH_VARARGS,
     "step(x, layers, n_layers, seqs, n_new, d, heads, kv_heads, d_head, d_ff, past, start, max_len, tables, max_blocks, "
     "block_size, rotations, eps, kind, ln_final, head, head_scale, head_panels, vocab, logits, threads): "
     "x (seqs * n_new, d) -> "
     "logits (seqs * n_new, vocab)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode", "A whole decoding step in one call.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__decode(void) {
    matvec_init();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "FIELDS", FIELDS) < 0 || PyModule_AddIntConstant(m, "MAX_ROWS", MAX_ROWS) < 0 ||
              PyModule_AddIntConstant(m, "PANEL_ROWS", use_avx512 ? PANEL_ROWS : 0) < 0 ||
              PyModule_AddStringConstant(m, "F32_PATH", path_name[F32]) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
