/* The compiled half of the per-segment search summary (recorder/summary.py).
 *
 * It is an accelerator, not a second definition: recorder/summary.py holds the same
 * function in Python (add_py), and tests/test_search_summary.py checks that both mark the
 * same trigrams for random text.
 *
 * add(table, data, strip, limit) marks, in `table` (TABLE_SIZE bytes, one per bit of
 * the filter: a plain store per trigram, where setting a bit would read and write), the
 * trigrams of `data` after:
 *   - removing escape sequences exactly as `replay search` does (replay.asciicast.ANSI,
 *     applied line by line: an OSC sequence never runs past the end of its line), when
 *     `strip` is true;
 *   - folding every byte with | 0x20 (A-Z become a-z, so case-insensitive searches can
 *     use the filter; a few other bytes pair up, which only costs selectivity).
 * Trigrams spanning a newline are marked as well: more than needed, never fewer.
 * It returns whether a line of `data` (a newline-separated piece) is longer than `limit`.
 */
#define _GNU_SOURCE /* memrchr */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TABLE_SIZE 32768 /* one byte per possible bit: a plain store per trigram, no read-modify-write */
#define TABLE_SHIFT 17   /* 32 - log2(TABLE_SIZE) */
#define HASH_MULT 0x9E3779B1u
#define FOLD 0x202020u   /* every byte | 0x20: A-Z become a-z (and a few other bytes pair up) */

/* A trigram is key = b0 | b1 << 8 | b2 << 16 of its folded bytes. */
static inline void put(uint8_t *table, uint32_t key) {
    table[(uint32_t)(key * HASH_MULT) >> TABLE_SHIFT] = 1;
}

static inline uint32_t load3(const uint8_t *p) { /* the 3 bytes at p, folded, without reading past them */
    return ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16) | FOLD;
}

/* The trigrams of kept text p[0:n], continuing the text kept before it (its last two bytes
 * are in *key's bits 8-23 once *have == 2). */
static void hash_span(uint8_t *table, const uint8_t *p, Py_ssize_t n, uint32_t *key, int *have) {
    uint32_t k = *key;
    Py_ssize_t i = 0;
    for (; i < n && i < 2; i++) { /* trigrams that start in the text before the span */
        k = (k >> 8) | (((uint32_t)p[i] | 0x20u) << 16);
        if (*have >= 2)
            put(table, k);
        else
            (*have)++;
    }
    Py_ssize_t j = 0;
    for (; j + 8 <= n; j += 6) { /* the span's own trigrams: six per 8-byte load, no carried state */
        uint64_t w;
        memcpy(&w, p + j, 8);
        w |= 0x2020202020202020ull;
        put(table, (uint32_t)w & 0xFFFFFFu);
        put(table, (uint32_t)(w >> 8) & 0xFFFFFFu);
        put(table, (uint32_t)(w >> 16) & 0xFFFFFFu);
        put(table, (uint32_t)(w >> 24) & 0xFFFFFFu);
        put(table, (uint32_t)(w >> 32) & 0xFFFFFFu);
        put(table, (uint32_t)(w >> 40) & 0xFFFFFFu);
    }
    for (; j + 3 <= n; j++)
        put(table, load3(p + j));
    if (n >= 2) {
        k = (((uint32_t)p[n - 2] | 0x20u) << 8) | (((uint32_t)p[n - 1] | 0x20u) << 16);
        *have = 2;
    }
    *key = k;
}

/* Length of the escape sequence at p[0] == ESC (p < end), or 0 when ANSI would not match
 * there. ANSI = \x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78DEHMc])
 * Each alternative starts with a different byte and its repeats are over disjoint byte
 * ranges, so no backtracking can change the outcome: one forward look decides. */
static Py_ssize_t escape_len(const uint8_t *p, const uint8_t *end) {
    if (p + 1 >= end)
        return 0;
    const uint8_t *q = p + 2;
    switch (p[1]) {
    case '[':
        while (q < end && *q >= 0x30 && *q <= 0x3F)
            q++;
        while (q < end && *q >= 0x20 && *q <= 0x2F)
            q++;
        return (q < end && *q >= 0x40 && *q <= 0x7E) ? (q + 1 - p) : 0;
    case ']':
        /* The body ends at BEL or ESC; a newline ends the line, and search strips per line. */
        while (q < end && *q != 0x07 && *q != 0x1B && *q != '\n')
            q++;
        if (q < end && *q == 0x07)
            return q + 1 - p;
        if (q + 1 < end && *q == 0x1B && q[1] == '\\')
            return q + 2 - p;
        return 0;
    case '(':
    case ')':
        if (q < end && ((*q >= '0' && *q <= '9') || (*q >= 'A' && *q <= 'Z') || (*q >= 'a' && *q <= 'z')))
            return 3;
        return 0;
    case '=': case '>': case '7': case '8': case 'D': case 'E': case 'H': case 'M': case 'c':
        return 2;
    default:
        return 0;
    }
}

/* Whether some line (newline-separated piece) of p[0:n] is longer than `limit`: a jump of
 * `limit` + 1 bytes from each line start must cross a newline, found looking back from its
 * end (a few bytes back in text; the cost is per `limit` bytes, not per line). */
static int has_long_line(const uint8_t *p, Py_ssize_t n, Py_ssize_t limit) {
    Py_ssize_t start = 0;
    while (n - start > limit) {
        const uint8_t *nl = memrchr(p + start, '\n', (size_t)limit + 1);
        if (nl == NULL)
            return 1;
        start = nl - p + 1;
    }
    return 0;
}

static PyObject *add(PyObject *self, PyObject *args) {
    Py_buffer bitmap, data;
    int strip;
    Py_ssize_t limit;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*y*pn", &bitmap, &data, &strip, &limit))
        return NULL;
    if (bitmap.len != TABLE_SIZE) {
        PyBuffer_Release(&bitmap);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "the table must be TABLE_SIZE bytes");
        return NULL;
    }
    uint8_t *table = bitmap.buf;
    const uint8_t *p = data.buf, *end = p + data.len;
    uint32_t key = 0;
    int have = 0;
    int long_line;
    Py_BEGIN_ALLOW_THREADS
    if (!strip) {
        hash_span(table, p, end - p, &key, &have);
    } else {
        while (p < end) {
            const uint8_t *esc = memchr(p, 0x1B, (size_t)(end - p));
            const uint8_t *stop = esc ? esc : end;
            hash_span(table, p, stop - p, &key, &have);
            if (!esc)
                break;
            Py_ssize_t n = escape_len(esc, end);
            if (n) {
                p = esc + n; /* removed: the text around it joins */
            } else {
                hash_span(table, esc, 1, &key, &have); /* kept, as re.sub keeps it */
                p = esc + 1;
            }
        }
    }
    long_line = has_long_line(data.buf, data.len, limit);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bitmap);
    PyBuffer_Release(&data);
    return PyBool_FromLong(long_line);
}

/* fold(table, min_bits, fill) -> (bits, packed): summary.py's _fold_python at C speed (it ran
 * 70 us a segment in Python, a twentieth of a busy recorder's seals). The table (one byte per
 * bit) is halved, OR-ing its halves, while the result stays at most `fill` set and above
 * `min_bits`; packed is the result, bit i in byte i / 8 at bit i % 8 (little-endian). */
static PyObject *fold(PyObject *self, PyObject *args) {
    Py_buffer bitmap;
    Py_ssize_t min_bits;
    double fill;
    if (!PyArg_ParseTuple(args, "y*nd", &bitmap, &min_bits, &fill))
        return NULL;
    if (bitmap.len != TABLE_SIZE) {
        PyBuffer_Release(&bitmap);
        PyErr_SetString(PyExc_ValueError, "the table must be TABLE_SIZE bytes");
        return NULL;
    }
    unsigned char cur[TABLE_SIZE];
    const unsigned char *table = (const unsigned char *)bitmap.buf;
    for (Py_ssize_t i = 0; i < TABLE_SIZE; i++)
        cur[i] = table[i] ? 1 : 0;
    PyBuffer_Release(&bitmap);
    Py_ssize_t size = TABLE_SIZE;
    while (size > min_bits) {
        Py_ssize_t half = size / 2, count = 0;
        for (Py_ssize_t i = 0; i < half; i++)
            count += cur[i] | cur[i + half];
        if ((double)count > fill * (double)half)
            break;
        for (Py_ssize_t i = 0; i < half; i++)
            cur[i] |= cur[i + half];
        size = half;
    }
    PyObject *packed = PyBytes_FromStringAndSize(NULL, size / 8);
    if (packed == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(packed);
    for (Py_ssize_t j = 0; j < size / 8; j++) {
        unsigned char byte = 0;
        for (int k = 0; k < 8; k++)
            byte |= (unsigned char)(cur[8 * j + k] << k);
        out[j] = byte;
    }
    return Py_BuildValue("nN", size, packed);
}

static PyMethodDef methods[] = {
    {"add", add, METH_VARARGS, "add(table, data, strip, limit) -> whether a line is longer than limit; marks data's trigrams."},
    {"fold", fold, METH_VARARGS, "fold(table, min_bits, fill) -> (bits, packed little-endian filter)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_summary", "Compiled trigram summary (see recorder/summary.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__summary(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* summary.py refuses a build of another version (a stale in-place build after an update) */
    if (PyModule_AddIntConstant(m, "ABI", 2) < 0 || PyModule_AddIntConstant(m, "TABLE_SIZE", TABLE_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
