/*
 * The GPT-2 pre-tokenizer as a hand-written scanner, and the two loops that use it.
 *
 * Pattern:  '(?:[sdmt]|ll|ve|re) | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
 *
 * At each position the alternatives are tried in order, exactly as the regex engine does:
 *   1. an apostrophe followed by s, d, m, t, ll, ve or re is a contraction;
 *   2. an optional space, then a maximal run of one class (letters, numbers or "other");
 *   3. a whitespace run: all of it at the end of the text, else all but its last character when
 *      the run is longer than one (`\s+(?!\S)` backtracks one), else the single character.
 * Character classes come from a 0x110000-entry table that Python builds with the `regex` module
 * (see fast.py), so this scanner and the regex agree on every code point.
 *
 * split(text, table)                 -> list[str]         the pre-tokens
 * count(text, table, counts)         -> None              counts[piece] += 1 for each pre-token
 * encode(text, table, cache, out)    -> None              out.extend(cache[piece]) for each pre-token
 *
 * And BPE on one pre-token, for cache misses:
 * merger(merges, byte_ids)           -> capsule           merges: [(a, b, merged_id)] in rank order
 * bpe(merger, piece)                 -> list[int]         ids of the piece's UTF-8 bytes after merging
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

enum { OTHER = 0, LETTER = 1, NUMBER = 2, SPACE = 3 };

typedef struct {
    int kind;
    const void *data;
    Py_ssize_t n;
    const unsigned char *table;
} Text;

static inline int cls(const Text *t, Py_ssize_t i) {
    return t->table[PyUnicode_READ(t->kind, t->data, i)];
}

static inline Py_UCS4 at(const Text *t, Py_ssize_t i) { return PyUnicode_READ(t->kind, t->data, i); }

/* End (exclusive) of the pre-token that starts at i. */
static Py_ssize_t next_piece(const Text *t, Py_ssize_t i) {
    Py_ssize_t n = t->n, j;
    Py_UCS4 c = at(t, i);
    if (c == '\'' && i + 1 < n) {
        Py_UCS4 c1 = at(t, i + 1);
        if (c1 == 's' || c1 == 'd' || c1 == 'm' || c1 == 't') return i + 2;
        if (i + 2 < n) {
            Py_UCS4 c2 = at(t, i + 2);
            if ((c1 == 'l' && c2 == 'l') || (c1 == 'v' && c2 == 'e') || (c1 == 'r' && c2 == 'e')) return i + 3;
        }
    }
    int k = cls(t, i);
    if (c == ' ' && i + 1 < n && cls(t, i + 1) != SPACE) {
        k = cls(t, i + 1);
        j = i + 2;
        while (j < n && cls(t, j) == k) j++;
        return j;
    }
    if (k != SPACE) {
        j = i + 1;
        while (j < n && cls(t, j) == k) j++;
        return j;
    }
    j = i + 1;
    while (j < n && cls(t, j) == SPACE) j++;
    if (j == n || j - i == 1) return j;
    return j - 1;
}

static int load(PyObject *text, Py_buffer *table, Text *t) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text must be a str");
        return -1;
    }
    if (table->len != 0x110000) {
        PyErr_SetString(PyExc_ValueError, "the class table must have 0x110000 entries");
        return -1;
    }
    t->kind = PyUnicode_KIND(text);
    t->data = PyUnicode_DATA(text);
    t->n = PyUnicode_GET_LENGTH(text);
    t->table = (const unsigned char *)table->buf;
    return 0;
}

static PyObject *split(PyObject *self, PyObject *args) {
    PyObject *text;
    Py_buffer table;
    Text t;
    if (!PyArg_ParseTuple(args, "Uy*", &text, &table)) return NULL;
    PyObject *out = NULL;
    if (load(text, &table, &t) < 0) goto done;
    out = PyList_New(0);
    if (!out) goto done;
    for (Py_ssize_t i = 0; i < t.n;) {
        Py_ssize_t j = next_piece(&t, i);
        PyObject *piece = PyUnicode_Substring(text, i, j);
        if (!piece || PyList_Append(out, piece) < 0) {
            Py_XDECREF(piece);
            Py_CLEAR(out);
            goto done;
        }
        Py_DECREF(piece);
        i = j;
    }
done:
    PyBuffer_Release(&table);
    return out;
}

static PyObject *count(PyObject *self, PyObject *args) {
    PyObject *text, *counts;
    Py_buffer table;
    Text t;
    if (!PyArg_ParseTuple(args, "Uy*O!", &text, &table, &PyDict_Type, &counts)) return NULL;
    PyObject *result = NULL;
    if (load(text, &table, &t) < 0) goto done;
    for (Py_ssize_t i = 0; i < t.n;) {
        Py_ssize_t j = next_piece(&t, i);
        PyObject *piece = PyUnicode_Substring(text, i, j);
        if (!piece) goto done;
        PyObject *old = PyDict_GetItemWithError(counts, piece); /* borrowed */
        if (!old && PyErr_Occurred()) {
            Py_DECREF(piece);
            goto done;
        }
        long before = old ? PyLong_AsLong(old) : 0;
        if (before == -1 && PyErr_Occurred()) {
            Py_DECREF(piece);
            goto done;
        }
        PyObject *now = PyLong_FromLong(before + 1);
        int failed = !now || PyDict_SetItem(counts, piece, now) < 0;
        Py_XDECREF(now);
        Py_DECREF(piece);
        if (failed) goto done;
        i = j;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&table);
    return result;
}

static PyObject *encode(PyObject *self, PyObject *args) {
    PyObject *text, *cache, *out;
    Py_buffer table;
    Text t;
    if (!PyArg_ParseTuple(args, "Uy*OO!", &text, &table, &cache, &PyList_Type, &out)) return NULL;
    PyObject *result = NULL;
    if (load(text, &table, &t) < 0) goto done;
    for (Py_ssize_t i = 0; i < t.n;) {
        Py_ssize_t j = next_piece(&t, i);
        PyObject *piece = PyUnicode_Substring(text, i, j);
        if (!piece) goto done;
        /* A hit is a plain dict lookup; a miss goes through cache[piece], i.e. __missing__ runs BPE. */
        PyObject *ids = PyDict_GetItemWithError(cache, piece);
        if (ids) {
            Py_INCREF(ids);
        } else if (PyErr_Occurred()) {
            Py_DECREF(piece);
            goto done;
        } else {
            ids = PyObject_GetItem(cache, piece);
        }
        Py_DECREF(piece);
        if (!ids) goto done;
        if (!PyList_Check(ids)) {
            Py_DECREF(ids);
            PyErr_SetString(PyExc_TypeError, "cache values must be lists of ids");
            goto done;
        }
        Py_ssize_t m = PyList_GET_SIZE(ids);
        for (Py_ssize_t k = 0; k < m; k++) {
            if (PyList_Append(out, PyList_GET_ITEM(ids, k)) < 0) {
                Py_DECREF(ids);
                goto done;
            }
        }
        Py_DECREF(ids);
        i = j;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&table);
    return result;
}

/* ---------------------------------------------------------------- BPE on one pre-token */

typedef struct {
    uint64_t key; /* (a << 32 | b) + 1; 0 marks an empty slot */
    int32_t rank;
    int32_t merged;
} Slot;

typedef struct {
    Slot *slots;
    uint64_t mask;
    int32_t byte_ids[256];
} Merger;

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static Slot *find(const Merger *m, uint64_t key) {
    for (uint64_t h = mix(key) & m->mask;; h = (h + 1) & m->mask) {
        Slot *s = &m->slots[h];
        if (s->key == key || s->key == 0) return s;
    }
}

static void merger_free(PyObject *capsule) {
    Merger *m = PyCapsule_GetPointer(capsule, "scratchlm.merger");
    if (m) {
        free(m->slots);
        free(m);
    }
}

static PyObject *merger(PyObject *self, PyObject *args) {
    PyObject *merges, *byte_ids;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &merges, &PyList_Type, &byte_ids)) return NULL;
    if (PyList_GET_SIZE(byte_ids) != 256) {
        PyErr_SetString(PyExc_ValueError, "byte_ids must list 256 ids");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(merges);
    uint64_t size = 16;
    while (size < (uint64_t)n * 2 + 16) size <<= 1;
    Merger *m = calloc(1, sizeof(Merger));
    if (m) m->slots = calloc(size, sizeof(Slot));
    if (!m || !m->slots) {
        if (m) free(m);
        return PyErr_NoMemory();
    }
    m->mask = size - 1;
    for (int b = 0; b < 256; b++) m->byte_ids[b] = (int32_t)PyLong_AsLong(PyList_GET_ITEM(byte_ids, b));
    for (Py_ssize_t r = 0; r < n; r++) {
        long a, b, merged;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(merges, r), "lll", &a, &b, &merged)) {
            free(m->slots);
            free(m);
            return NULL;
        }
        uint64_t key = (((uint64_t)a << 32) | (uint64_t)b) + 1;
        Slot *s = find(m, key);
        if (s->key == 0) { /* the first (lowest-rank) merge of a pair wins */
            s->key = key;
            s->rank = (int32_t)r;
            s->merged = (int32_t)merged;
        }
    }
    if (PyErr_Occurred()) {
        free(m->slots);
        free(m);
        return NULL;
    }
    return PyCapsule_New(m, "scratchlm.merger", merger_free);
}

static PyObject *bpe(PyObject *self, PyObject *args) {
    PyObject *capsule, *piece;
    if (!PyArg_ParseTuple(args, "OU", &capsule, &piece)) return NULL;
    Merger *m = PyCapsule_GetPointer(capsule, "scratchlm.merger");
    if (!m) return NULL;
    Py_ssize_t len;
    const char *utf8 = PyUnicode_AsUTF8AndSize(piece, &len); /* raises UnicodeEncodeError on surrogates */
    if (!utf8) return NULL;
    int32_t stack[256], *ids = len <= 256 ? stack : malloc(len * sizeof(int32_t));
    if (!ids) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < len; i++) ids[i] = m->byte_ids[(unsigned char)utf8[i]];
    Py_ssize_t n = len;
    while (n > 1) {
        int32_t best_rank = INT32_MAX, a = 0, b = 0, merged = 0;
        for (Py_ssize_t i = 0; i + 1 < n; i++) {
            Slot *s = find(m, (((uint64_t)ids[i] << 32) | (uint64_t)ids[i + 1]) + 1);
            if (s->key && s->rank < best_rank) {
                best_rank = s->rank;
                a = ids[i];
                b = ids[i + 1];
                merged = s->merged;
            }
        }
        if (best_rank == INT32_MAX) break;
        Py_ssize_t w = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i + 1 < n && ids[i] == a && ids[i + 1] == b) {
                ids[w++] = merged;
                i++;
            } else {
                ids[w++] = ids[i];
            }
        }
        n = w;
    }
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *v = PyLong_FromLong(ids[i]);
        if (!v) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, v);
    }
    if (ids != stack) free(ids);
    return out;
}

static PyMethodDef methods[] = {
    {"split", split, METH_VARARGS, "split(text, table) -> list of GPT-2 pre-tokens"},
    {"count", count, METH_VARARGS, "count(text, table, counts): counts[piece] += 1 for each pre-token"},
    {"encode", encode, METH_VARARGS, "encode(text, table, cache, out): out.extend(cache[piece]) per pre-token"},
    {"merger", merger, METH_VARARGS, "merger(merges, byte_ids) -> capsule holding the merge-rank table"},
    {"bpe", bpe, METH_VARARGS, "bpe(merger, piece) -> token ids of one pre-token"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pretok", "GPT-2 pre-tokenizer in C", -1, methods};

PyMODINIT_FUNC PyInit__pretok(void) { return PyModule_Create(&module); }
