/* The body of a JSON string for valid UTF-8 bytes, as json.dumps(ensure_ascii=False) writes it
 * (recorder/events.py json_escape is the same in Python, and the fallback where this is not
 * built). Terminal output is the bulk of every recording; this does in two C passes what the
 * Python version does in one pass per escaped byte value plus a table pass: words of 8 bytes
 * with nothing to escape (most of any text) are tested and copied whole.
 *
 * escape(data: bytes) -> bytes: `data` itself when nothing needs escaping. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define ABI_VERSION 1

static char esc_text[256][8];
static unsigned char esc_len[256]; /* 0: the byte stands for itself */
static unsigned char esc_extra[256]; /* esc_len - 1, or 0 */

static void init_table(void)
{
    static const char hex[] = "0123456789abcdef";
    for (int b = 0; b < 256; b++) {
        esc_len[b] = 0;
        if (b < 0x20) {
            const char *named = NULL;
            switch (b) {
            case '\b': named = "\\b"; break;
            case '\t': named = "\\t"; break;
            case '\n': named = "\\n"; break;
            case '\f': named = "\\f"; break;
            case '\r': named = "\\r"; break;
            }
            if (named != NULL) {
                memcpy(esc_text[b], named, 2);
                esc_len[b] = 2;
            } else {
                memcpy(esc_text[b], "\\u00", 4);
                esc_text[b][4] = hex[b >> 4];
                esc_text[b][5] = hex[b & 15];
                esc_len[b] = 6;
            }
        }
    }
    memcpy(esc_text['"'], "\\\"", 2);
    esc_len['"'] = 2;
    memcpy(esc_text['\\'], "\\\\", 2);
    esc_len['\\'] = 2;
    for (int b = 0; b < 256; b++)
        esc_extra[b] = esc_len[b] ? (unsigned char)(esc_len[b] - 1) : 0;
}

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* Non-zero when one of the 8 bytes of w may need escaping (below 0x20, '"' or '\\'). Exact
 * as a yes/no for the word: the byte loop decides which. */
static inline uint64_t word_special(uint64_t w)
{
    uint64_t below = (w - ONES * 0x20) & ~w;
    uint64_t quote = w ^ (ONES * '"');
    uint64_t slash = w ^ (ONES * '\\');
    quote = (quote - ONES) & ~quote;
    slash = (slash - ONES) & ~slash;
    return (below | quote | slash) & HIGHS;
}

/* Bytes added by escaping p[0:n]. Words of 8 bytes with nothing to escape are skipped whole. */
static Py_ssize_t extra_bytes(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t extra = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (word_special(w))
            for (int k = 0; k < 8; k++)
                extra += esc_extra[p[i + k]];
    }
    for (; i < n; i++)
        extra += esc_extra[p[i]];
    return extra;
}

static inline char *put(char *o, unsigned char c)
{
    if (!esc_len[c]) {
        *o = (char)c;
        return o + 1;
    }
    if (esc_len[c] == 2) {
        o[0] = '\\';
        o[1] = esc_text[c][1];
        return o + 2;
    }
    memcpy(o, esc_text[c], 6);
    return o + 6;
}

static void fill(char *o, const unsigned char *p, Py_ssize_t n);

static PyObject *escape(PyObject *self, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "escape() takes bytes");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    /* Large inputs (bulk output) are escaped without the GIL: the event loop relaying the
     * session keeps running meanwhile. The input is immutable and held by the caller; the
     * output is not visible to anyone else until returned. */
    int release = n >= 65536;
    Py_ssize_t extra;
    PyThreadState *state = release ? PyEval_SaveThread() : NULL;
    extra = extra_bytes(p, n);
    if (release)
        PyEval_RestoreThread(state);
    if (extra == 0) {
        Py_INCREF(arg);
        return arg;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n + extra);
    if (out == NULL)
        return NULL;
    char *o = PyBytes_AS_STRING(out);
    if (release)
        state = PyEval_SaveThread();
    fill(o, p, n);
    if (release)
        PyEval_RestoreThread(state);
    return out;
}

static void fill(char *o, const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (!word_special(w)) {
            memcpy(o, &w, 8);
            o += 8;
            continue;
        }
        for (int k = 0; k < 8; k++)
            o = put(o, p[i + k]);
    }
    for (; i < n; i++)
        o = put(o, p[i]);
}

static PyMethodDef methods[] = {
    {"escape", escape, METH_O, "The body of a JSON string (ensure_ascii=False) holding valid UTF-8 bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "recorder._escape", NULL, -1, methods};

PyMODINIT_FUNC PyInit__escape(void)
{
    init_table();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", ABI_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
