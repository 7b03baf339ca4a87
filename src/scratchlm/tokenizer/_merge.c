/*
 * The BPE merge loop of `trainer.py`, in C. Same algorithm, same result (tested):
 *
 *   words   each distinct pre-token as an array of token ids, with its count
 *   pairs   (a, b) -> total count, and the list of words that (ever) held the pair
 *   heap    lazy max-heap of (count, pair): most frequent first, ties to the greater (bytes_a, bytes_b);
 *           entries whose count is out of date are skipped when popped
 *
 * Each merge rewrites only the words that hold the pair: their old adjacent pairs are subtracted,
 * their new ones added, and every pair whose count changed is pushed again.
 *
 * train(words: list[bytes], counts: list[int], tokens: list[bytes], vocab_size: int, progress)
 *   -> list[(a, b, merged_id)]   (merged_id is new unless the merged bytes already had an id)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t *ids;
    int32_t len;
    int64_t count;
} Word;

typedef struct {
    unsigned char *bytes;
    Py_ssize_t len;
} Token;

typedef struct {
    int32_t a, b;
    int64_t count;
    int32_t *words, n_words, cap_words;
    int64_t stamp; /* last merge that pushed this pair: push each changed pair once per merge */
} Pair;

typedef struct {
    int64_t count;
    int32_t pair;
} Entry;

typedef struct {
    Word *words;
    Py_ssize_t n_words;
    Token *tokens;
    int32_t n_tokens, cap_tokens;
    Pair *pairs;
    int32_t n_pairs, cap_pairs;
    int32_t *pair_slots; /* open addressing: (a, b) -> index in pairs, -1 empty */
    uint64_t pair_mask;
    int32_t *token_slots; /* open addressing: bytes -> token id, -1 empty */
    uint64_t token_mask;
    Entry *heap;
    Py_ssize_t heap_len, heap_cap;
} State;

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static uint64_t hash_bytes(const unsigned char *p, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return mix(h);
}

static int cmp_bytes(const Token *x, const Token *y) {
    Py_ssize_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->bytes, y->bytes, n);
    if (c) return c;
    return (x->len > y->len) - (x->len < y->len);
}

/* ------------------------------------------------------------------ token ids by bytes */

static int32_t *token_slot(State *s, const unsigned char *p, Py_ssize_t n) {
    for (uint64_t h = hash_bytes(p, n) & s->token_mask;; h = (h + 1) & s->token_mask) {
        int32_t id = s->token_slots[h];
        if (id < 0) return &s->token_slots[h];
        Token *t = &s->tokens[id];
        if (t->len == n && memcmp(t->bytes, p, n) == 0) return &s->token_slots[h];
    }
}

static int add_token(State *s, unsigned char *bytes, Py_ssize_t len) {
    if (s->n_tokens == s->cap_tokens) {
        int32_t cap = s->cap_tokens * 2;
        Token *t = realloc(s->tokens, cap * sizeof(Token));
        if (!t) return -1;
        s->tokens = t;
        s->cap_tokens = cap;
    }
    s->tokens[s->n_tokens] = (Token){bytes, len};
    *token_slot(s, bytes, len) = s->n_tokens;
    return s->n_tokens++;
}

/* ------------------------------------------------------------------ pairs */

static int grow_pairs(State *s) {
    uint64_t size = (s->pair_mask + 1) * 2;
    int32_t *slots = malloc(size * sizeof(int32_t));
    if (!slots) return -1;
    memset(slots, -1, size * sizeof(int32_t));
    for (int32_t i = 0; i < s->n_pairs; i++) {
        uint64_t key = ((uint64_t)s->pairs[i].a << 32) | (uint32_t)s->pairs[i].b;
        uint64_t h = mix(key) & (size - 1);
        while (slots[h] >= 0) h = (h + 1) & (size - 1);
        slots[h] = i;
    }
    free(s->pair_slots);
    s->pair_slots = slots;
    s->pair_mask = size - 1;
    return 0;
}

/* Index of pair (a, b), created with count 0 if new; -1 on allocation failure. */
static int32_t pair_index(State *s, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)a << 32) | (uint32_t)b;
    uint64_t h = mix(key) & s->pair_mask;
    for (;; h = (h + 1) & s->pair_mask) {
        int32_t i = s->pair_slots[h];
        if (i < 0) break;
        if (s->pairs[i].a == a && s->pairs[i].b == b) return i;
    }
    if ((uint64_t)(s->n_pairs + 1) * 2 > s->pair_mask + 1) {
        if (grow_pairs(s) < 0) return -1;
        return pair_index(s, a, b);
    }
    if (s->n_pairs == s->cap_pairs) {
        int32_t cap = s->cap_pairs * 2;
        Pair *p = realloc(s->pairs, cap * sizeof(Pair));
        if (!p) return -1;
        s->pairs = p;
        s->cap_pairs = cap;
    }
    s->pairs[s->n_pairs] = (Pair){a, b, 0, NULL, 0, 0, -1};
    s->pair_slots[h] = s->n_pairs;
    return s->n_pairs++;
}

static int add_word_to_pair(Pair *p, int32_t w) {
    if (p->n_words && p->words[p->n_words - 1] == w) return 0;
    if (p->n_words == p->cap_words) {
        int32_t cap = p->cap_words ? p->cap_words * 2 : 4;
        int32_t *words = realloc(p->words, cap * sizeof(int32_t));
        if (!words) return -1;
        p->words = words;
        p->cap_words = cap;
    }
    p->words[p->n_words++] = w;
    return 0;
}

/* ------------------------------------------------------------------ heap */

static inline int better(const State *s, const Entry *x, const Entry *y) {
    if (x->count != y->count) return x->count > y->count;
    const Pair *px = &s->pairs[x->pair], *py = &s->pairs[y->pair];
    int c = cmp_bytes(&s->tokens[px->a], &s->tokens[py->a]);
    if (c) return c > 0;
    return cmp_bytes(&s->tokens[px->b], &s->tokens[py->b]) > 0;
}

static int heap_push(State *s, int32_t pair) {
    if (s->heap_len == s->heap_cap) {
        Py_ssize_t cap = s->heap_cap * 2;
        Entry *h = realloc(s->heap, cap * sizeof(Entry));
        if (!h) return -1;
        s->heap = h;
        s->heap_cap = cap;
    }
    Py_ssize_t i = s->heap_len++;
    Entry e = {s->pairs[pair].count, pair};
    while (i > 0) {
        Py_ssize_t parent = (i - 1) / 2;
        if (!better(s, &e, &s->heap[parent])) break;
        s->heap[i] = s->heap[parent];
        i = parent;
    }
    s->heap[i] = e;
    return 0;
}

static Entry heap_pop(State *s) {
    Entry top = s->heap[0], last = s->heap[--s->heap_len];
    Py_ssize_t i = 0, n = s->heap_len;
    for (;;) {
        Py_ssize_t child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && better(s, &s->heap[child + 1], &s->heap[child])) child++;
        if (!better(s, &s->heap[child], &last)) break;
        s->heap[i] = s->heap[child];
        i = child;
    }
    if (n) s->heap[i] = last;
    return top;
}

/* ------------------------------------------------------------------ the merge */

static int touch(State *s, int32_t pair, int64_t merge, int32_t **changed, Py_ssize_t *n, Py_ssize_t *cap) {
    if (s->pairs[pair].stamp == merge) return 0;
    s->pairs[pair].stamp = merge;
    if (*n == *cap) {
        *cap *= 2;
        int32_t *c = realloc(*changed, *cap * sizeof(int32_t));
        if (!c) return -1;
        *changed = c;
    }
    (*changed)[(*n)++] = pair;
    return 0;
}

/* Rewrite every word holding pairs[p] with new_id; adjust counts; push changed pairs. */
static int apply_merge(State *s, int32_t p, int32_t new_id, int64_t merge, int32_t *scratch) {
    int32_t a = s->pairs[p].a, b = s->pairs[p].b;
    int32_t *words = s->pairs[p].words, n_words = s->pairs[p].n_words;
    s->pairs[p].words = NULL;
    s->pairs[p].n_words = s->pairs[p].cap_words = 0;
    Py_ssize_t n_changed = 0, cap_changed = 64;
    int32_t *changed = malloc(cap_changed * sizeof(int32_t));
    int status = changed ? 0 : -1;
    for (int32_t k = 0; k < n_words && status == 0; k++) {
        Word *w = &s->words[words[k]];
        int32_t n = w->len, m = 0;
        for (int32_t i = 0; i < n; i++) {
            if (i + 1 < n && w->ids[i] == a && w->ids[i + 1] == b) {
                scratch[m++] = new_id;
                i++;
            } else {
                scratch[m++] = w->ids[i];
            }
        }
        if (m == n) continue; /* stale: the pair left this word in an earlier merge */
        for (int32_t i = 0; i + 1 < n && status == 0; i++) {
            int32_t q = pair_index(s, w->ids[i], w->ids[i + 1]);
            if (q < 0) status = -1;
            else {
                s->pairs[q].count -= w->count;
                status = touch(s, q, merge, &changed, &n_changed, &cap_changed);
            }
        }
        for (int32_t i = 0; i + 1 < m && status == 0; i++) {
            int32_t q = pair_index(s, scratch[i], scratch[i + 1]);
            if (q < 0) status = -1;
            else {
                s->pairs[q].count += w->count;
                if (add_word_to_pair(&s->pairs[q], words[k]) < 0) status = -1;
                else status = touch(s, q, merge, &changed, &n_changed, &cap_changed);
            }
        }
        memcpy(w->ids, scratch, m * sizeof(int32_t));
        w->len = m;
    }
    s->pairs[p].count = 0;
    for (Py_ssize_t i = 0; i < n_changed && status == 0; i++)
        if (changed[i] != p && s->pairs[changed[i]].count > 0) status = heap_push(s, changed[i]);
    free(changed);
    free(words);
    return status;
}

static void free_state(State *s) {
    for (Py_ssize_t i = 0; i < s->n_words; i++) free(s->words[i].ids);
    for (int32_t i = 0; i < s->n_tokens; i++) free(s->tokens[i].bytes);
    for (int32_t i = 0; i < s->n_pairs; i++) free(s->pairs[i].words);
    free(s->words);
    free(s->tokens);
    free(s->pairs);
    free(s->pair_slots);
    free(s->token_slots);
    free(s->heap);
}

static PyObject *train(PyObject *self, PyObject *args) {
    PyObject *words, *counts, *tokens, *progress;
    Py_ssize_t vocab_size;
    if (!PyArg_ParseTuple(args, "O!O!O!nO", &PyList_Type, &words, &PyList_Type, &counts, &PyList_Type, &tokens,
                          &vocab_size, &progress))
        return NULL;
    State s = {0};
    PyObject *merges = NULL;
    int32_t *scratch = NULL;
    Py_ssize_t n_words = PyList_GET_SIZE(words), n_tokens = PyList_GET_SIZE(tokens), longest = 2;

    uint64_t token_slots = 1024;
    while (token_slots < (uint64_t)vocab_size * 2) token_slots <<= 1;
    s.token_mask = token_slots - 1;
    s.token_slots = malloc(token_slots * sizeof(int32_t));
    s.cap_tokens = (int32_t)(n_tokens + 16);
    s.tokens = malloc(s.cap_tokens * sizeof(Token));
    s.pair_mask = 1023;
    s.pair_slots = malloc(1024 * sizeof(int32_t));
    s.cap_pairs = 1024;
    s.pairs = malloc(s.cap_pairs * sizeof(Pair));
    s.heap_cap = 1024;
    s.heap = malloc(s.heap_cap * sizeof(Entry));
    s.words = calloc(n_words ? n_words : 1, sizeof(Word));
    if (!s.token_slots || !s.tokens || !s.pair_slots || !s.pairs || !s.heap || !s.words) goto nomem;
    memset(s.token_slots, -1, token_slots * sizeof(int32_t));
    memset(s.pair_slots, -1, 1024 * sizeof(int32_t));

    for (Py_ssize_t i = 0; i < n_tokens; i++) {
        char *p;
        Py_ssize_t n;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(tokens, i), &p, &n) < 0) goto fail;
        unsigned char *copy = malloc(n ? n : 1);
        if (!copy) goto nomem;
        memcpy(copy, p, n);
        if (add_token(&s, copy, n) < 0) {
            free(copy);
            goto nomem;
        }
    }
    for (Py_ssize_t w = 0; w < n_words; w++) {
        char *p;
        Py_ssize_t n;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(words, w), &p, &n) < 0) goto fail;
        s.words[w].count = PyLong_AsLongLong(PyList_GET_ITEM(counts, w));
        if (s.words[w].count == -1 && PyErr_Occurred()) goto fail;
        s.words[w].ids = malloc((n ? n : 1) * sizeof(int32_t));
        if (!s.words[w].ids) goto nomem;
        s.n_words = w + 1;
        s.words[w].len = (int32_t)n;
        for (Py_ssize_t i = 0; i < n; i++) s.words[w].ids[i] = (unsigned char)p[i]; /* ids 0-255 are the bytes */
        if (n > longest) longest = n;
        for (Py_ssize_t i = 0; i + 1 < n; i++) {
            int32_t q = pair_index(&s, (unsigned char)p[i], (unsigned char)p[i + 1]);
            if (q < 0 || add_word_to_pair(&s.pairs[q], (int32_t)w) < 0) goto nomem;
            s.pairs[q].count += s.words[w].count;
        }
    }
    for (int32_t q = 0; q < s.n_pairs; q++)
        if (s.pairs[q].count > 0 && heap_push(&s, q) < 0) goto nomem;
    scratch = malloc(longest * sizeof(int32_t));
    merges = PyList_New(0);
    if (!scratch || !merges) goto nomem;

    for (int64_t merge = 0; s.n_tokens < vocab_size && s.heap_len > 0;) {
        Entry top = heap_pop(&s);
        Pair *best = &s.pairs[top.pair];
        if (best->count != top.count || top.count <= 0) continue; /* stale */
        int32_t a = best->a, b = best->b;
        Token *ta = &s.tokens[a], *tb = &s.tokens[b];
        Py_ssize_t len = ta->len + tb->len;
        unsigned char *bytes = malloc(len);
        if (!bytes) goto nomem;
        memcpy(bytes, ta->bytes, ta->len);
        memcpy(bytes + ta->len, tb->bytes, tb->len);
        int32_t id = *token_slot(&s, bytes, len);
        if (id >= 0) {
            free(bytes); /* the same bytes came from an earlier merge: reuse that id */
        } else {
            if (s.n_tokens * 2 + 2 > (int32_t)(s.token_mask + 1)) {
                free(bytes);
                PyErr_SetString(PyExc_RuntimeError, "token table full");
                goto fail;
            }
            id = add_token(&s, bytes, len);
            if (id < 0) {
                free(bytes);
                goto nomem;
            }
        }
        PyObject *item = Py_BuildValue("(iii)", a, b, id);
        if (!item || PyList_Append(merges, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
        if (apply_merge(&s, top.pair, id, merge++, scratch) < 0) goto nomem;
        if (progress != Py_None && (merge & 255) == 0) {
            PyObject *r = PyObject_CallFunction(progress, "i", s.n_tokens);
            if (!r) goto fail;
            Py_DECREF(r);
        }
    }
    free(scratch);
    free_state(&s);
    return merges;

nomem:
    PyErr_NoMemory();
fail:
    Py_XDECREF(merges);
    free(scratch);
    free_state(&s);
    return NULL;
}

static PyMethodDef methods[] = {
    {"train", train, METH_VARARGS, "train(words, counts, tokens, vocab_size, progress) -> [(a, b, merged_id)]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_merge", "the BPE merge loop in C", -1, methods};

PyMODINIT_FUNC PyInit__merge(void) { return PyModule_Create(&module); }
