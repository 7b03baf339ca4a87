/*
 * Paged attention for decoding steps: one query per sequence attends to that sequence's keys and values
 * where they lie in the block pool, found through its block table, with no gather into a contiguous
 * copy. One task per (sequence, head), split over OpenMP threads; grouped-query attention maps query
 * head h to key/value head h / (heads / kv_heads).
 *
 *     out[b, h] = sum_j softmax_j(q[b, h] . k_j * scale) v_j,   j over the sequence's `lengths[b]` keys,
 *     key j at pool row tables[b, j / block_size] * block_size + j % block_size.
 */
#include "../model/_cpu.h"

#include <stdlib.h>

typedef struct {
    const float *q;         /* (b, heads, d) */
    const float *k, *v;     /* (pool rows, kv_heads, d) */
    const int64_t *tables;  /* (b, max_blocks) */
    const int64_t *lengths; /* (b,) */
    float *out;             /* (b, heads, d) */
    int64_t heads, kv_heads, d, max_blocks, block_size, max_len;
    float scale;
} PagedArgs;

VECTORIZED static void paged_range(const void *p, int64_t begin, int64_t end, int part) {
    (void)part;
    const PagedArgs *s = p;
    float *scores = malloc(sizeof(float) * (size_t)(s->max_len > 0 ? s->max_len : 1));
    if (!scores) return;
    const int64_t group = s->heads / s->kv_heads, d = s->d;
    for (int64_t task = begin; task < end; task++) {
        const int64_t b = task / s->heads, h = task % s->heads, g = h / group, n = s->lengths[b];
        const float *q = s->q + task * d;
        const int64_t *table = s->tables + b * s->max_blocks;
        for (int64_t j = 0; j < n; j++) {
            const int64_t row = table[j / s->block_size] * s->block_size + j % s->block_size;
            scores[j] = dot(q, s->k + (row * s->kv_heads + g) * d, d) * s->scale;
        }
        const float total = exp_sum(scores, row_max(scores, n), n, 1);
        float *o = s->out + task * d;
        memset(o, 0, sizeof(float) * (size_t)d);
        for (int64_t j = 0; j < n; j++) {
            const int64_t row = table[j / s->block_size] * s->block_size + j % s->block_size;
            const float *restrict vr = s->v + (row * s->kv_heads + g) * d;
            const float w = scores[j] / total;
            for (int64_t i = 0; i < d; i++) o[i] += w * vr[i];
        }
    }
    free(scores);
}

static PyObject *decode_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q, k, v, tables, lengths, out;
    long long batch, heads, kv_heads, d, max_blocks, block_size, max_len;
    double scale;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLLLLLdi", &q, &k, &v, &tables, &lengths, &out, &batch, &heads, &kv_heads,
                          &d, &max_blocks, &block_size, &max_len, &scale, &threads))
        return NULL;
    PagedArgs s = {PTR(const float, q),   PTR(const float, k),       PTR(const float, v),
                   PTR(const int64_t, tables), PTR(const int64_t, lengths), PTR(float, out),
                   heads, kv_heads, d, max_blocks, block_size, max_len, (float)scale};
    parallel_for(paged_range, &s, batch * heads, max_len * d * 2, threads);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_attention", decode_attention, METH_VARARGS,
     "decode_attention(q, k, v, tables, lengths, out, batch, heads, kv_heads, d, max_blocks, block_size, max_len, "
     "scale, threads)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_paged", "Paged attention for decoding steps.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__paged(void) { return PyModule_Create(&module); }
