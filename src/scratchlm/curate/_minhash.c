/* MinHash signatures in C: the same words, shingle hashes and permutations as minhash.py's numpy path
 * (tests check they agree bit for bit), without a Python call per word.
 *
 * Words are maximal runs of bytes that are ASCII letters, digits or '_' or any byte >= 0x80 (so every
 * non-ASCII character counts as a word character), ASCII lower-cased; a word's hash is its CRC-32; a
 * shingle's hash folds its n word hashes (h = h * MIX + w), then h ^= h >> 29; permutation k maps a
 * shingle x to (a[k] * x + b[k]) mod 2^64 >> 32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIX 0x9E3779B97F4A7C15ULL

static uint32_t crc_table[256];

static void init_crc(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static inline int is_word_byte(unsigned char c) {
    return c >= 0x80 || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

/* The CRC-32 of each word of text[0:n]; returns the number of words (out has room for n/1 + 1). */
static Py_ssize_t word_hashes(const unsigned char *text, Py_ssize_t n, uint64_t *out) {
    Py_ssize_t count = 0, i = 0;
    while (i < n) {
        while (i < n && !is_word_byte(text[i])) i++;
        if (i >= n) break;
        uint32_t crc = 0xFFFFFFFFu;
        while (i < n && is_word_byte(text[i])) {
            unsigned char c = text[i++];
            if (c >= 'A' && c <= 'Z') c += 32;
            crc = crc_table[(crc ^ c) & 0xFF] ^ (crc >> 8);
        }
        out[count++] = crc ^ 0xFFFFFFFFu;
    }
    return count;
}

/* Shingle hashes of `words` (in place into out); returns how many. */
static Py_ssize_t fold_shingles(const uint64_t *words, Py_ssize_t count, int ngram, uint64_t *out) {
    if (count == 0) return 0;
    int n = count < ngram ? (int)count : ngram;
    Py_ssize_t shingles = count - n + 1;
    for (Py_ssize_t s = 0; s < shingles; s++) {
        uint64_t h = 0;
        for (int j = 0; j < n; j++) h = h * MIX + words[s + j];
        out[s] = h ^ (h >> 29);
    }
    return shingles;
}

static Py_ssize_t shingles_of(Py_buffer *text, int ngram, uint64_t **result) {
    Py_ssize_t n = text->len;
    uint64_t *buf = malloc(sizeof(uint64_t) * (n / 2 + 2));
    if (!buf) return -1;
    Py_ssize_t words = word_hashes(text->buf, n, buf);
    *result = buf;
    return fold_shingles(buf, words, ngram, buf); /* shingle s reads words s.. s+n-1 >= s: safe in place */
}

static PyObject *py_shingle_hashes(PyObject *self, PyObject *args) {
    Py_buffer text;
    int ngram;
    if (!PyArg_ParseTuple(args, "y*i", &text, &ngram)) return NULL;
    uint64_t *shingles = NULL;
    Py_ssize_t count;
    Py_BEGIN_ALLOW_THREADS count = shingles_of(&text, ngram, &shingles);
    Py_END_ALLOW_THREADS PyBuffer_Release(&text);
    if (count < 0) return PyErr_NoMemory();
    PyObject *out = PyBytes_FromStringAndSize((const char *)shingles, count * (Py_ssize_t)sizeof(uint64_t));
    free(shingles);
    return out;
}

static PyObject *py_signature(PyObject *self, PyObject *args) {
    Py_buffer text, a, b;
    int ngram;
    if (!PyArg_ParseTuple(args, "y*y*y*i", &text, &a, &b, &ngram)) return NULL;
    Py_ssize_t perms = a.len / (Py_ssize_t)sizeof(uint64_t);
    PyObject *out = NULL;
    if (b.len != a.len) {
        PyErr_SetString(PyExc_ValueError, "a and b must have the same length");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, perms * (Py_ssize_t)sizeof(uint32_t));
    if (!out) goto done;
    uint32_t *sig = (uint32_t *)PyBytes_AS_STRING(out);
    const uint64_t *pa = a.buf, *pb = b.buf;
    uint64_t *shingles = NULL;
    Py_ssize_t count;
    Py_BEGIN_ALLOW_THREADS count = shingles_of(&text, ngram, &shingles);
    if (count >= 0) {
        for (Py_ssize_t k = 0; k < perms; k++) sig[k] = 0xFFFFFFFFu;
        for (Py_ssize_t s = 0; s < count; s++) {
            uint64_t x = shingles[s];
            for (Py_ssize_t k = 0; k < perms; k++) {
                uint32_t v = (uint32_t)((pa[k] * x + pb[k]) >> 32);
                if (v < sig[k]) sig[k] = v;
            }
        }
    }
    Py_END_ALLOW_THREADS free(shingles);
    if (count < 0) {
        Py_CLEAR(out);
        PyErr_NoMemory();
    }
done:
    PyBuffer_Release(&text);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return out;
}

static PyMethodDef methods[] = {
    {"signature", py_signature, METH_VARARGS, "signature(text_utf8, a, b, ngram) -> bytes of uint32 minima"},
    {"shingle_hashes", py_shingle_hashes, METH_VARARGS, "shingle_hashes(text_utf8, ngram) -> bytes of uint64"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_minhash", NULL, -1, methods};

PyMODINIT_FUNC PyInit__minhash(void) {
    init_crc();
    return PyModule_Create(&module);
}
