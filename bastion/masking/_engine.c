/* The compiled masking engine: finds, validates, replaces and hashes the built-in
 * detectors' values in one call per chunk of terminal text.
 *
 * It is an accelerator, not a second definition of masking. Everything it decides is
 * defined by the Python masker (bastion/masking/stream.py and detectors.py), and
 * tests/test_masking_engine.py checks that both give the same bytes and records:
 *
 *   - the patterns are the built-in regular expressions themselves, compiled by
 *     bastion/masking/engine.py from Python's own parse tree into the small backtracking
 *     program run here (the same leftmost, first-alternative semantics as `re`);
 *   - the validators (check digits, Luhn, area codes, e-mail labels) are transcribed
 *     from detectors.py, each next to the function it mirrors;
 *   - values are found left to right, the leftmost valid value wins, at the same start
 *     the longer, then the earlier detector (StreamMasker._scan);
 *   - the keyed hash is HMAC-SHA256 through OpenSSL's SHA-256 (the one hashlib uses).
 *
 * Two entry points: Engine.plain masks a whole chunk of plain text (no escape sequence,
 * not on the alternate screen); Engine.scan returns the values of one segment of visible
 * text, which the Python tokeniser cut out of a chunk with escape sequences and around
 * which it places the replacements. Configurations with custom detectors never get here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>

/* Program opcodes (bastion/masking/engine.py writes them). */
enum { OP_CLASS = 1, OP_SPLIT = 2, OP_JMP = 3, OP_MATCH = 4, OP_LOOK = 5, OP_REP = 6 };

/* Validators (bastion/masking/detectors.py _normalise_*). */
enum { K_CPF = 0, K_CNPJ = 1, K_CARD = 2, K_PHONE_BR = 3, K_E164 = 4, K_EMAIL = 5 };
/* Replacement styles (detectors.Replacement). */
enum { S_REDACT = 0, S_KEEP_LAST = 1, S_CONST = 2 };

#define MAX_PROGS 16
#define MAX_DIGIT_DETS 8
#define BT_STACK 2048
#define BINARY_WINDOW 32
#define EMAIL_WIDTH 64

typedef struct {
    int kind;
    int rank;            /* index in the masker's detector list */
    int nprogs;
    int progs[MAX_PROGS];
    int firsts[MAX_PROGS];  /* class of the bytes each program's matches can start with */
    int style;
    int keep_last;
    PyObject *name;      /* str */
    PyObject *constant;  /* bytes, for tag/fixed */
} Det;

typedef struct {
    PyObject_HEAD
    int32_t *code;
    Py_ssize_t ncode;
    uint8_t *boundary;   /* 1 where an instruction starts (check_code) */
    uint8_t (*classes)[32];
    Py_ssize_t nclasses;
    Det digits[MAX_DIGIT_DETS];
    int ndigits;
    Det email;
    int has_email;
    int width;           /* the longest numeric value: a value starts at most this far before a hit */
    SHA256_CTX inner, outer;
    PyTypeObject *masked_type;
} Engine;

/* Byte classes. */
static uint8_t T_DIGIT[256], T_WORD[256], T_SEP[256], T_NUMPREV[256], T_NUMFIRST[256],
    T_LOCAL[256], T_ALNUM[256], T_BINARY[256];

static void init_tables(void) {
    for (int c = 0; c < 256; c++) {
        int digit = c >= '0' && c <= '9';
        int alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
        T_DIGIT[c] = digit;
        T_ALNUM[c] = digit || alpha;
        T_WORD[c] = digit || alpha || c == '_';
        T_SEP[c] = c == '-' || c == '/' || c == ' ' || c == '(' || c == ')' || c == '+';
        T_NUMPREV[c] = T_WORD[c] || c == '+';                       /* _NUM_L's first look-behind */
        T_NUMFIRST[c] = digit || c == '(' || c == '+';               /* the union's (?=[0-9(+]) */
        T_LOCAL[c] = T_ALNUM[c] || c == '.' || c == '_' || c == '%' || c == '+' || c == '-';
        T_BINARY[c] = c <= 0x06 || (c >= 0x0e && c <= 0x1a) || (c >= 0x1c && c <= 0x1f);
    }
}

/* -- the pattern programs ------------------------------------------------------------- */

/* Run the program at pc from pos; the end of the match, -1 if none, -2 if the backtrack
 * stack overflowed (never for the built-ins; the caller then refuses the chunk). */
static Py_ssize_t vm(const Engine *e, int pc, const uint8_t *v, Py_ssize_t n, Py_ssize_t pos) {
    int32_t spc[BT_STACK];
    Py_ssize_t spos[BT_STACK];
    int sp = 0;
    const int32_t *c = e->code;
    for (;;) {
        switch (c[pc]) {
        case OP_CLASS:
            if (pos < n && (e->classes[c[pc + 1]][v[pos] >> 3] >> (v[pos] & 7) & 1)) {
                pos++;
                pc += 2;
                continue;
            }
            goto fail;
        case OP_REP: { /* greedy [class]{lo,hi}: the longest run first, then one shorter */
            const uint8_t *cls = e->classes[c[pc + 1]];
            int lo = c[pc + 2], hi = c[pc + 3], k = 0;
            while (k < hi && pos + k < n && (cls[v[pos + k] >> 3] >> (v[pos + k] & 7) & 1))
                k++;
            if (k < lo)
                goto fail;
            if (sp + (k - lo) > BT_STACK)
                return -2;
            for (int i = lo; i < k; i++) {
                spc[sp] = pc + 4;
                spos[sp] = pos + i;
                sp++;
            }
            pos += k;
            pc += 4;
            continue;
        }
        case OP_SPLIT:
            if (sp == BT_STACK)
                return -2;
            spc[sp] = c[pc + 2];
            spos[sp] = pos;
            sp++;
            pc = c[pc + 1];
            continue;
        case OP_JMP:
            pc = c[pc + 1];
            continue;
        case OP_MATCH:
            return pos;
        case OP_LOOK: { /* neg, behind, width, length of the sub-program that follows */
            int neg = c[pc + 1], behind = c[pc + 2], width = c[pc + 3], len = c[pc + 4];
            Py_ssize_t at = behind ? pos - width : pos;
            int ok = 0;
            if (at >= 0) {
                Py_ssize_t r = vm(e, pc + 5, v, n, at);
                if (r == -2)
                    return -2;
                ok = r >= 0;
            }
            if (ok != neg) {
                pc += 5 + len;
                continue;
            }
            goto fail;
        }
        default:
            return -2;
        }
    fail:
        if (sp == 0)
            return -1;
        sp--;
        pc = spc[sp];
        pos = spos[sp];
    }
}

/* -- validators: the normalised text (for the keyed hash) in out, its length, or 0 -------- */

static int all_same(const char *d, int n) {
    for (int i = 1; i < n; i++)
        if (d[i] != d[0])
            return 0;
    return 1;
}

static int digits_of(const uint8_t *v, Py_ssize_t len, char *out, int cap, int *all_digits) {
    int n = 0;
    *all_digits = len > 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        if (T_DIGIT[v[i]]) {
            if (n < cap)
                out[n] = (char)v[i];
            n++;
        } else {
            *all_digits = 0;
        }
    }
    return n;
}

/* cpf_valid */
static int cpf_ok(const char *d, int n) {
    if (n != 11 || all_same(d, 11))
        return 0;
    int s1 = 0, s2 = 0;
    for (int i = 0; i < 9; i++)
        s1 += (d[i] - '0') * (10 - i);
    for (int i = 0; i < 10; i++)
        s2 += (d[i] - '0') * (11 - i);
    return s1 * 10 % 11 % 10 == d[9] - '0' && s2 * 10 % 11 % 10 == d[10] - '0';
}

/* cnpj_valid */
static int cnpj_ok(const char *d, int n) {
    static const int w1[12] = {5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2};
    static const int w2[13] = {6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2};
    if (n != 14 || all_same(d, 14))
        return 0;
    int s1 = 0, s2 = 0;
    for (int i = 0; i < 12; i++)
        s1 += (d[i] - '0') * w1[i];
    for (int i = 0; i < 13; i++)
        s2 += (d[i] - '0') * w2[i];
    int r1 = s1 % 11, r2 = s2 % 11;
    return (r1 < 2 ? 0 : 11 - r1) == d[12] - '0' && (r2 < 2 ? 0 : 11 - r2) == d[13] - '0';
}

static int two(const char *d) { return (d[0] - '0') * 10 + d[1] - '0'; }

/* _looks_like_timestamp */
static int timestamp_like(const char *d, int n) {
    if (n != 14 || !((d[0] == '1' && d[1] == '9') || (d[0] == '2' && d[1] == '0')))
        return 0;
    int mo = two(d + 4), dd = two(d + 6), hh = two(d + 8), mi = two(d + 10), ss = two(d + 12);
    return mo >= 1 && mo <= 12 && dd >= 1 && dd <= 31 && hh < 24 && mi < 60 && ss < 60;
}

/* card_iin_known and luhn_valid */
static int card_ok(const char *d, int n) {
    if (n < 13 || n > 19 || all_same(d, n))
        return 0;
    int d2 = two(d), d3 = d2 * 10 + d[2] - '0', d4 = d3 * 10 + d[3] - '0';
    int known;
    switch (d[0]) {
    case '4': case '5': case '6': known = 1; break;
    case '2': known = d4 >= 2221 && d4 <= 2720; break;
    case '3':
        known = d2 == 34 || d2 == 36 || d2 == 37 || d2 == 38 || d2 == 39 || (d3 >= 300 && d3 <= 305) ||
                (d4 >= 3528 && d4 <= 3589);
        break;
    default: known = 0;
    }
    if (!known)
        return 0;
    static const int dbl[10] = {0, 2, 4, 6, 8, 1, 3, 5, 7, 9};
    int sum = 0;
    for (int i = n - 1, k = 0; i >= 0; i--, k++)
        sum += k & 1 ? dbl[d[i] - '0'] : d[i] - '0';
    return sum % 10 == 0;
}

static const uint8_t DDD_OK[100] = {
    [11] = 1, [12] = 1, [13] = 1, [14] = 1, [15] = 1, [16] = 1, [17] = 1, [18] = 1, [19] = 1,
    [21] = 1, [22] = 1, [24] = 1, [27] = 1, [28] = 1, [31] = 1, [32] = 1, [33] = 1, [34] = 1,
    [35] = 1, [37] = 1, [38] = 1, [41] = 1, [42] = 1, [43] = 1, [44] = 1, [45] = 1, [46] = 1,
    [47] = 1, [48] = 1, [49] = 1, [51] = 1, [53] = 1, [54] = 1, [55] = 1, [61] = 1, [62] = 1,
    [63] = 1, [64] = 1, [65] = 1, [66] = 1, [67] = 1, [68] = 1, [69] = 1, [71] = 1, [73] = 1,
    [74] = 1, [75] = 1, [77] = 1, [79] = 1, [81] = 1, [82] = 1, [83] = 1, [84] = 1, [85] = 1,
    [86] = 1, [87] = 1, [88] = 1, [89] = 1, [91] = 1, [92] = 1, [93] = 1, [94] = 1, [95] = 1,
    [96] = 1, [97] = 1, [98] = 1, [99] = 1};

/* phone_br_e164: "+55" and the national number into out */
static int phone_br(const char *d, int n, char *out) {
    if ((n == 12 || n == 13) && d[0] == '5' && d[1] == '5') {
        d += 2;
        n -= 2;
    } else if ((n == 11 || n == 12) && d[0] == '0') {
        d += 1;
        n -= 1;
    }
    if ((n != 10 && n != 11) || !DDD_OK[two(d)])
        return 0;
    if (n == 11 && d[2] != '9')
        return 0;
    if (n == 10 && !(d[2] >= '2' && d[2] <= '5'))
        return 0;
    memcpy(out, "+55", 3);
    memcpy(out + 3, d, (size_t)n);
    return n + 3;
}

/* _normalise_email: lower-cased address, or 0 */
static int email(const uint8_t *v, Py_ssize_t len, char *out, int cap) {
    if (len > cap)
        return 0;
    Py_ssize_t at = -1;
    for (Py_ssize_t i = len - 1; i >= 0; i--)
        if (v[i] == '@') {
            at = i;
            break;
        }
    if (at <= 0)
        return 0;
    if (v[0] == '.' || v[at - 1] == '.')
        return 0;
    for (Py_ssize_t i = 1; i < len; i++)
        if (v[i] == '.' && v[i - 1] == '.' && i != at + 1)
            return 0;
    Py_ssize_t label = at + 1;
    for (Py_ssize_t i = at + 1; i <= len; i++) {
        if (i == len || v[i] == '.') {
            Py_ssize_t ln = i - label;
            if (ln == 0 || ln > 63 || v[label] == '-' || v[i - 1] == '-')
                return 0;
            label = i + 1;
        }
    }
    for (Py_ssize_t i = 0; i < len; i++)
        out[i] = (char)(v[i] >= 'A' && v[i] <= 'Z' ? v[i] + 32 : v[i]);
    return (int)len;
}

#define NORM_CAP 256

static int normalise(int kind, const uint8_t *v, Py_ssize_t len, char *out) {
    char d[NORM_CAP];
    int all_digits, n;
    if (kind == K_EMAIL)
        return email(v, len, out, NORM_CAP);
    n = digits_of(v, len, d, NORM_CAP, &all_digits);
    if (n == 0 || n > NORM_CAP - 4)
        return 0;
    switch (kind) {
    case K_CPF:
        if (!cpf_ok(d, n))
            return 0;
        break;
    case K_CNPJ:
        if (!cnpj_ok(d, n) || (all_digits && timestamp_like(d, n)))
            return 0;
        break;
    case K_CARD:
        if (!card_ok(d, n))
            return 0;
        break;
    case K_PHONE_BR:
        if (all_digits && n == 10)
            return 0;
        return phone_br(d, n, out);
    case K_E164:
        if (all_same(d, n))
            return 0;
        out[0] = '+';
        memcpy(out + 1, d, (size_t)n);
        return n + 1;
    default:
        return 0;
    }
    memcpy(out, d, (size_t)n);
    return n;
}

/* -- candidates ------------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t q, end;
    int rank;
    const Det *det;
    int nlen;
    char norm[NORM_CAP];
} Cand;

/* StreamMasker._binary_before */
static int binary_before(const uint8_t *v, Py_ssize_t q) {
    for (Py_ssize_t i = q > BINARY_WINDOW ? q - BINARY_WINDOW : 0; i < q; i++)
        if (T_BINARY[v[i]])
            return 1;
    return 0;
}

/* The first of the detectors (in list order), and the first of its patterns, whose match
 * at q validates: 1 and *c filled; 0 if none or binary data precedes q; -2 on overflow.
 * For the numeric detectors the caller has tested the boundary look-behinds their
 * programs leave out (_NUM_L). */
static int value_at(const Engine *e, const Det *dets, int ndets, const uint8_t *v, Py_ssize_t n, Py_ssize_t q,
                    Cand *c) {
    int b = v[q];
    for (int j = 0; j < ndets; j++) {
        const Det *d = &dets[j];
        for (int k = 0; k < d->nprogs; k++) {
            if (!(e->classes[d->firsts[k]][b >> 3] >> (b & 7) & 1))
                continue;
            Py_ssize_t end = vm(e, d->progs[k], v, n, q);
            if (end == -2)
                return -2;
            if (end < 0)
                continue;
            int len = normalise(d->kind, v + q, end - q, c->norm);
            if (!len)
                continue;
            if (binary_before(v, q))
                return 0;
            c->q = q;
            c->end = end;
            c->rank = d->rank;
            c->det = d;
            c->nlen = len;
            return 1;
        }
    }
    return 0;
}

/* A source yields, for a position p, its leftmost valid value starting in [p, limit).
 * It only tries starts in zones around cheap hits: every value a built-in numeric
 * detector accepts holds one of the shapes of stream.py's _HS_SHAPES, and every e-mail
 * address an '@' (the same invariant as the Python pre-filters, checked by the tests). */
typedef struct {
    const uint8_t *v;
    Py_ssize_t n, limit;
    Py_ssize_t scan;       /* where the search for the next hit resumes */
    Py_ssize_t zlo, zhi;   /* the current zone of starts, inclusive; zhi < zlo: none */
    Py_ssize_t q;          /* next start to try */
    int done;
    int cached;
    Cand cand;
} Source;

static void source_init(Source *s, const uint8_t *v, Py_ssize_t n, Py_ssize_t limit) {
    s->v = v;
    s->n = n;
    s->limit = limit;
    s->scan = 0;
    s->zlo = 0;
    s->zhi = -1;
    s->q = 0;
    s->done = 0;
    s->cached = 0;
}

#if defined(__SSE2__)
static unsigned digits16(const uint8_t *p) { /* bit k: p[k] is a digit */
    __m128i t = _mm_sub_epi8(_mm_loadu_si128((const __m128i *)p), _mm_set1_epi8('0'));
    return (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_min_epu8(t, _mm_set1_epi8(9)), t));
}
#endif

/* The start of the next run of 3 or more digits at or after i, n if none; i is not inside
 * a run (v[i - 1] is no digit). Every shape a hit needs holds such a run, and most runs in
 * logs are shorter (dates, times, addresses): this skips them 16 bytes at a time where
 * SSE2 is there (every x86-64). The first start of three digits is a run's start: one
 * digit earlier would be a start of three as well. */
static Py_ssize_t next_run3(const uint8_t *v, Py_ssize_t i, Py_ssize_t n) {
#if defined(__SSE2__)
    for (; i + 18 <= n; i += 16) {
        unsigned m = digits16(v + i) & digits16(v + i + 1) & digits16(v + i + 2);
        if (m)
            return i + __builtin_ctz(m);
    }
#endif
    for (; i + 2 < n; i++)
        if (T_DIGIT[v[i]] && T_DIGIT[v[i + 1]] && T_DIGIT[v[i + 2]])
            return i;
    return n;
}

static Py_ssize_t run_len(const uint8_t *v, Py_ssize_t n, Py_ssize_t i) {
    Py_ssize_t j = i;  /* runs are short (dates, times, addresses): a byte loop is faster */
    while (j < n && T_DIGIT[v[j]])
        j++;
    return j - i;
}

/* The next digit run at or after s->scan that holds a shape hit: its zone. 0 if none. */
static int next_digit_zone(Source *s, int width) {
    const uint8_t *v = s->v;
    Py_ssize_t n = s->n, i = s->scan;
    for (;;) {
        i = next_run3(v, i, n);
        if (i >= n)
            return 0;
        Py_ssize_t st = i, len = run_len(v, n, i), en = st + len;
        int P = st > 0 ? v[st - 1] : -1, N = en < n ? v[en] : -1;
        int hit = (len >= 11 && !(P >= 0 && T_WORD[P]) && !(N >= 0 && T_WORD[N]))  /* a free run of 11+ */
                  || (len >= 8 && P >= 0 && T_SEP[P])                              /* separator, 8 digits */
                  || (len >= 8 && N >= 0 && T_SEP[N] && en + 2 < n && T_DIGIT[v[en + 1]] &&
                      T_DIGIT[v[en + 2]])                                          /* 8 digits, sep, 2 */
                  || (len >= 4 && N >= 0 && T_SEP[N] && en + 1 < n && run_len(v, n, en + 1) >= 4)
                  || (P == '.' && len == 3 && N == '.' && en + 4 < n && run_len(v, n, en + 1) == 3 &&
                      (v[en + 4] == '-' || v[en + 4] == '/'));                     /* .ddd.ddd[-/] */
        i = en;
        if (hit) {
            s->scan = en;
            s->zlo = st - width;
            s->zhi = en;
            return 1;
        }
    }
}

static int next_email_zone(Source *s) {
    const uint8_t *v = s->v;
    Py_ssize_t n = s->n;
    if (s->scan >= n)
        return 0;
    const uint8_t *at = memchr(v + s->scan, '@', (size_t)(n - s->scan));
    if (at == NULL)
        return 0;
    Py_ssize_t h = at - v;
    s->scan = h + 1;
    s->zlo = h - EMAIL_WIDTH;
    s->zhi = h - 1;
    return 1;
}

/* The leftmost valid value starting at or after p: 1, 0 if none, -2 on overflow. */
static int source_next(const Engine *e, Source *s, int is_email, Py_ssize_t p) {
    if (s->cached) {
        if (s->cand.q >= p)
            return 1;
        s->cached = 0;
    }
    if (s->done)
        return 0;
    const uint8_t *v = s->v;
    Py_ssize_t q = s->q > p ? s->q : p;
    for (;;) {
        while (q > s->zhi || q > s->limit - 1) {
            if (q > s->limit - 1 || !(is_email ? next_email_zone(s) : next_digit_zone(s, e->width))) {
                s->done = 1;
                return 0;
            }
            if (s->zlo > q)
                q = s->zlo;
        }
        Py_ssize_t hi = s->zhi < s->limit - 1 ? s->zhi : s->limit - 1;
        for (; q <= hi; q++) {
            int c = v[q];
            int r;
            if (is_email) {
                if (!T_LOCAL[c] || (q > 0 && T_LOCAL[v[q - 1]]))
                    continue;
                r = value_at(e, &e->email, 1, v, s->n, q, &s->cand);
            } else {
                if (!T_NUMFIRST[c] || (q > 0 && T_NUMPREV[v[q - 1]]) ||
                    (q > 1 && (v[q - 1] == '.' || v[q - 1] == '-') && T_DIGIT[v[q - 2]]))
                    continue;
                r = value_at(e, e->digits, e->ndigits, v, s->n, q, &s->cand);
            }
            if (r == -2)
                return -2;
            if (r) {
                s->q = q;
                s->cached = 1;
                return 1;
            }
        }
    }
}

/* -- output ----------------------------------------------------------------------------- */

/* Replacement.apply, for the ASCII values of the built-in detectors. */
static Py_ssize_t replace(const Det *d, const uint8_t *v, Py_ssize_t len, char *out, Py_ssize_t cap) {
    if (d->style == S_CONST) {
        Py_ssize_t n = PyBytes_GET_SIZE(d->constant);
        if (n > cap)
            return -1;
        memcpy(out, PyBytes_AS_STRING(d->constant), (size_t)n);
        return n;
    }
    if (len > cap)
        return -1;
    int count = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        out[i] = T_ALNUM[v[i]] || v[i] >= 0x80 ? '*' : (char)v[i];
        count += T_ALNUM[v[i]];
    }
    if (d->style == S_KEEP_LAST) {
        int keep = d->keep_last < count / 2 ? d->keep_last : count / 2;
        for (Py_ssize_t i = len - 1; i >= 0 && keep; i--)
            if (T_ALNUM[v[i]]) {
                out[i] = (char)v[i];
                keep--;
            }
    }
    return len;
}

static PyObject *hmac_hex(const Engine *e, const char *norm, int len) {
    static const char hexd[] = "0123456789abcdef";
    unsigned char ih[32], oh[32];
    SHA256_CTX c = e->inner;
    SHA256_Update(&c, norm, (size_t)len);
    SHA256_Final(ih, &c);
    c = e->outer;
    SHA256_Update(&c, ih, 32);
    SHA256_Final(oh, &c);
    PyObject *s = PyUnicode_New(64, 127);
    if (s == NULL)
        return NULL;
    Py_UCS1 *p = PyUnicode_1BYTE_DATA(s);
    for (int i = 0; i < 32; i++) {
        p[2 * i] = (Py_UCS1)hexd[oh[i] >> 4];
        p[2 * i + 1] = (Py_UCS1)hexd[oh[i] & 15];
    }
    return s;
}

/* _utf8_boundary */
static Py_ssize_t utf8_boundary(const uint8_t *v, Py_ssize_t d, Py_ssize_t floor) {
    for (int k = 1; k <= 3; k++) {
        if (d - k < floor)
            return d;
        int b = v[d - k];
        if (b < 0x80)
            return d;
        if (b >= 0xC0) {
            int need = b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
            return need > k ? d - k : d;
        }
    }
    return d;
}

/* The values of v[start:limit], left to right: both sources, and where the last value
 * ended (StreamMasker._scan). */
typedef struct {
    Source dig, em;
    Py_ssize_t p;
} Finder;

/* 0, or -1 with ValueError when start/limit do not fit v. */
static int finder_init(const Engine *e, Finder *f, const uint8_t *v, Py_ssize_t n, Py_ssize_t start,
                       Py_ssize_t limit) {
    if (start < 0 || start > n || limit > n) {
        PyErr_SetString(PyExc_ValueError, "start/limit out of range");
        return -1;
    }
    source_init(&f->dig, v, n, limit);
    source_init(&f->em, v, n, limit);
    f->dig.done = e->ndigits == 0 || limit <= start;
    f->em.done = !e->has_email || limit <= start;
    f->p = start;
    return 0;
}

/* The first position not yet decided once every value is found: past the last value,
 * and at least limit and start (StreamMasker._scan's second result). */
static Py_ssize_t finder_decided(const Finder *f, Py_ssize_t start, Py_ssize_t limit) {
    Py_ssize_t d = limit > f->p ? limit : f->p;
    return d < start ? start : d;
}

/* The next value: 1 and *out set (valid until the next call), 0 at the end, -1 with an
 * exception set. The leftmost wins; at the same start the longer, then the earlier
 * detector. */
static int finder_next(const Engine *e, Finder *f, const Cand **out) {
    int rd = source_next(e, &f->dig, 0, f->p), re = source_next(e, &f->em, 1, f->p);
    if (rd == -2 || re == -2) {
        PyErr_SetString(PyExc_RuntimeError, "masking engine: backtracking limit");
        return -1;
    }
    const Cand *c;
    if (rd && re) {
        const Cand *a = &f->dig.cand, *b = &f->em.cand;
        c = (a->q != b->q) ? (a->q < b->q ? a : b) : (a->end != b->end) ? (a->end > b->end ? a : b)
            : (a->rank <= b->rank ? a : b);
    } else if (rd) {
        c = &f->dig.cand;
    } else if (re) {
        c = &f->em.cand;
    } else {
        return 0;
    }
    f->p = c->end;
    *out = c;
    return 1;
}

/* Engine.plain(v, start, limit, final, offset) -> (out, decided, masked)
 *
 * v is the masker's context followed by the held and new bytes, start where the new
 * ones begin; values are searched from start to limit. out is v[start:decided] with the
 * values replaced; masked the Masked records (offsets from offset, the stream position
 * of v[start]). */
static PyObject *engine_plain(Engine *e, PyObject *args) {
    Py_buffer vb;
    Py_ssize_t start, limit, offset;
    int final;
    if (!PyArg_ParseTuple(args, "y*nnpn", &vb, &start, &limit, &final, &offset))
        return NULL;
    const uint8_t *v = vb.buf;
    Py_ssize_t n = vb.len;
    PyObject *masked = NULL, *out = NULL, *result = NULL;
    char *buf = NULL;
    Finder f;
    if (finder_init(e, &f, v, n, start, limit) < 0)
        goto done;
    masked = PyList_New(0);
    if (masked == NULL)
        goto done;
    /* Room for the rest of the input and one replacement (a value's length, or a tag or
     * fixed text of at most 64 bytes), grown before each value while tags outgrow values. */
    Py_ssize_t cap = (n - start) + 1024;
    buf = PyMem_Malloc((size_t)cap);
    if (buf == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t w = 0, copied = start;
    for (;;) {
        const Cand *c;
        int r = finder_next(e, &f, &c);
        if (r < 0)
            goto done;
        if (r == 0)
            break;
        if (w + (n - copied) + 64 > cap) {
            Py_ssize_t ncap = 2 * cap + 64;
            char *nb = PyMem_Realloc(buf, (size_t)ncap);
            if (nb == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            buf = nb;
            cap = ncap;
        }
        memcpy(buf + w, v + copied, (size_t)(c->q - copied));
        w += c->q - copied;
        Py_ssize_t rl = replace(c->det, v + c->q, c->end - c->q, buf + w, cap - w);
        if (rl < 0) {
            PyErr_SetString(PyExc_RuntimeError, "masking engine: output overflow");
            goto done;
        }
        PyObject *rep = PyUnicode_DecodeASCII(buf + w, rl, "replace");
        w += rl;
        copied = c->end;
        PyObject *h = hmac_hex(e, c->norm, c->nlen);
        PyObject *item = e->masked_type->tp_alloc(e->masked_type, 5);
        if (rep == NULL || h == NULL || item == NULL) {
            Py_XDECREF(rep);
            Py_XDECREF(h);
            Py_XDECREF(item);
            goto done;
        }
        Py_INCREF(c->det->name);
        PyTuple_SET_ITEM(item, 0, c->det->name);
        PyTuple_SET_ITEM(item, 1, PyLong_FromSsize_t(offset + (c->q - start)));
        PyTuple_SET_ITEM(item, 2, PyLong_FromSsize_t(c->end - c->q));
        PyTuple_SET_ITEM(item, 3, h);
        PyTuple_SET_ITEM(item, 4, rep);
        if (PyTuple_GET_ITEM(item, 1) == NULL || PyTuple_GET_ITEM(item, 2) == NULL ||
            PyList_Append(masked, item) < 0) {
            Py_DECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    Py_ssize_t decided = finder_decided(&f, start, limit);
    if (!final)
        decided = utf8_boundary(v, decided, start);
    if (decided > copied) {
        memcpy(buf + w, v + copied, (size_t)(decided - copied));
        w += decided - copied;
    }
    out = PyBytes_FromStringAndSize(buf, w);
    if (out == NULL)
        goto done;
    result = Py_BuildValue("(NnN)", out, decided, masked);
    out = masked = NULL;
done:
    PyMem_Free(buf);
    Py_XDECREF(out);
    Py_XDECREF(masked);
    PyBuffer_Release(&vb);
    return result;
}

/* Engine.scan(v, pos, limit) -> (decided, [(q, end, rank, hmac, replacement), ...])
 *
 * StreamMasker._scan for one segment of visible text (escape sequences removed), with
 * each value's keyed hash and replacement: the tokenised path places them around the
 * escape sequences in Python. */
static PyObject *engine_scan(Engine *e, PyObject *args) {
    Py_buffer vb;
    Py_ssize_t start, limit;
    if (!PyArg_ParseTuple(args, "y*nn", &vb, &start, &limit))
        return NULL;
    const uint8_t *v = vb.buf;
    Py_ssize_t n = vb.len;
    PyObject *values = NULL, *result = NULL;
    char rep[NORM_CAP + 64];
    Finder f;
    if (finder_init(e, &f, v, n, start, limit) < 0)
        goto done;
    values = PyList_New(0);
    if (values == NULL)
        goto done;
    for (;;) {
        const Cand *c;
        int r = finder_next(e, &f, &c);
        if (r < 0)
            goto done;
        if (r == 0)
            break;
        Py_ssize_t rl = replace(c->det, v + c->q, c->end - c->q, rep, (Py_ssize_t)sizeof rep);
        if (rl < 0) {
            PyErr_SetString(PyExc_RuntimeError, "masking engine: output overflow");
            goto done;
        }
        PyObject *item = Py_BuildValue("(nniNy#)", c->q, c->end, c->rank, hmac_hex(e, c->norm, c->nlen), rep, rl);
        if (item == NULL || PyList_Append(values, item) < 0) {
            Py_XDECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    result = Py_BuildValue("(nO)", finder_decided(&f, start, limit), values);
done:
    Py_XDECREF(values);
    PyBuffer_Release(&vb);
    return result;
}

/* -- construction ------------------------------------------------------------------------ */

static int parse_det(const Engine *e, PyObject *t, Det *d) {
    PyObject *progs, *firsts, *constant;
    if (!PyArg_ParseTuple(t, "iiO!O!iiUO!", &d->kind, &d->rank, &PyList_Type, &progs, &PyList_Type, &firsts,
                          &d->style, &d->keep_last, &d->name, &PyBytes_Type, &constant))
        return -1;
    Py_ssize_t np = PyList_GET_SIZE(progs);
    if (np < 1 || np > MAX_PROGS || PyList_GET_SIZE(firsts) != np) {
        PyErr_SetString(PyExc_ValueError, "bad number of programs");
        return -1;
    }
    d->nprogs = (int)np;
    for (Py_ssize_t i = 0; i < np; i++) {
        long pc = PyLong_AsLong(PyList_GET_ITEM(progs, i));
        long fc = PyLong_AsLong(PyList_GET_ITEM(firsts, i));
        if (PyErr_Occurred())
            return -1;
        if (pc < 0 || pc >= e->ncode || !e->boundary[pc] || fc < 0 || fc >= e->nclasses) {
            PyErr_SetString(PyExc_ValueError, "program or class out of range");
            return -1;
        }
        d->progs[i] = (int)pc;
        d->firsts[i] = (int)fc;
    }
    Py_INCREF(d->name);
    Py_INCREF(constant);
    d->constant = constant;
    return 0;
}

/* The programs come from engine.py, but the engine never trusts them: every operand in
 * range, every jump to the start of an instruction, every sub-program closed by a MATCH. */
static int check_code(Engine *e) {
    const int32_t *c = e->code;
    Py_ssize_t n = e->ncode;
    e->boundary = PyMem_Calloc((size_t)n + 1, 1);
    if (e->boundary == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t pc = 0;
    while (pc < n) {
        e->boundary[pc] = 1;
        int size;
        switch (c[pc]) {
        case OP_CLASS: size = 2; break;
        case OP_SPLIT: size = 3; break;
        case OP_JMP: size = 2; break;
        case OP_MATCH: size = 1; break;
        case OP_LOOK: size = 5; break;
        case OP_REP: size = 4; break;
        default: goto bad;
        }
        if (pc + size > n)
            goto bad;
        if ((c[pc] == OP_CLASS || c[pc] == OP_REP) && (c[pc + 1] < 0 || c[pc + 1] >= e->nclasses))
            goto bad;
        if (c[pc] == OP_REP && (c[pc + 2] < 0 || c[pc + 3] < c[pc + 2]))
            goto bad;
        if (c[pc] == OP_LOOK && (c[pc + 3] < 0 || c[pc + 4] < 1 || pc + 5 + c[pc + 4] > n ||
                                 c[pc + 5 + c[pc + 4] - 1] != OP_MATCH))
            goto bad;
        pc += size;
    }
    pc = 0;
    while (pc < n) { /* jumps land on instructions */
        int op = c[pc];
        if (op == OP_SPLIT && (c[pc + 1] < 0 || c[pc + 1] >= n || !e->boundary[c[pc + 1]] || c[pc + 2] < 0 ||
                               c[pc + 2] >= n || !e->boundary[c[pc + 2]]))
            goto bad;
        if (op == OP_JMP && (c[pc + 1] < 0 || c[pc + 1] >= n || !e->boundary[c[pc + 1]]))
            goto bad;
        pc += op == OP_CLASS || op == OP_JMP ? 2 : op == OP_SPLIT ? 3 : op == OP_MATCH ? 1 : op == OP_LOOK ? 5 : 4;
    }
    return 0;
bad:
    PyErr_Format(PyExc_ValueError, "masking engine: malformed program at %zd", pc);
    return -1;
}

static void engine_dealloc(Engine *e) {
    PyMem_Free(e->code);
    PyMem_Free(e->boundary);
    PyMem_Free(e->classes);
    for (int i = 0; i < e->ndigits; i++) {
        Py_XDECREF(e->digits[i].name);
        Py_XDECREF(e->digits[i].constant);
    }
    if (e->has_email) {
        Py_XDECREF(e->email.name);
        Py_XDECREF(e->email.constant);
    }
    Py_XDECREF(e->masked_type);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* Engine(code: bytes of int32, classes: bytes of 32-byte bitmaps, digits: list of detector
 *        tuples, email: tuple or None, width: int, secret: bytes, masked_type: type) */
static PyObject *engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Py_buffer code, classes, secret;
    PyObject *digits, *emailt, *mtype;
    int width;
    (void)kw;
    if (!PyArg_ParseTuple(args, "y*y*O!Oiy*O!", &code, &classes, &PyList_Type, &digits, &emailt, &width,
                          &secret, &PyType_Type, &mtype))
        return NULL;
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    PyObject *ret = NULL;
    if (e == NULL)
        goto done;
    if (code.len % 4 || classes.len % 32 || PyList_GET_SIZE(digits) > MAX_DIGIT_DETS || secret.len == 0 ||
        !PyType_IsSubtype((PyTypeObject *)mtype, &PyTuple_Type)) {
        PyErr_SetString(PyExc_ValueError, "bad engine arguments");
        goto done;
    }
    e->ncode = code.len / 4;
    e->code = PyMem_Malloc((size_t)code.len + 4);
    e->nclasses = classes.len / 32;
    e->classes = PyMem_Malloc((size_t)classes.len + 32);
    if (e->code == NULL || e->classes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(e->code, code.buf, (size_t)code.len);
    if (check_code(e) < 0)
        goto done;
    memcpy(e->classes, classes.buf, (size_t)classes.len);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(digits); i++) {
        if (parse_det(e, PyList_GET_ITEM(digits, i), &e->digits[i]) < 0)
            goto done;
        e->ndigits++;
    }
    if (emailt != Py_None) {
        if (parse_det(e, emailt, &e->email) < 0)
            goto done;
        e->has_email = 1;
    }
    e->width = width;
    /* HMAC-SHA256 (RFC 2104): the key block's inner and outer states, copied per value. */
    unsigned char key[64] = {0}, pad[64];
    if (secret.len > 64)
        SHA256(secret.buf, (size_t)secret.len, key);
    else
        memcpy(key, secret.buf, (size_t)secret.len);
    for (int i = 0; i < 64; i++)
        pad[i] = key[i] ^ 0x36;
    SHA256_Init(&e->inner);
    SHA256_Update(&e->inner, pad, 64);
    for (int i = 0; i < 64; i++)
        pad[i] = key[i] ^ 0x5c;
    SHA256_Init(&e->outer);
    SHA256_Update(&e->outer, pad, 64);
    Py_INCREF(mtype);
    e->masked_type = (PyTypeObject *)mtype;
    ret = (PyObject *)e;
    e = NULL;
done:
    Py_XDECREF(e);
    PyBuffer_Release(&code);
    PyBuffer_Release(&classes);
    PyBuffer_Release(&secret);
    return ret;
}

/* match(pc, text, pos) -> end or -1: one program alone, for the tests. */
static PyObject *engine_match(Engine *e, PyObject *args) {
    Py_buffer vb;
    int pc;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "iy*n", &pc, &vb, &pos))
        return NULL;
    Py_ssize_t r = (pc < 0 || pc >= e->ncode || !e->boundary[pc] || pos < 0 || pos > vb.len)
                       ? -2 : vm(e, pc, vb.buf, vb.len, pos);
    PyBuffer_Release(&vb);
    if (r == -2) {
        PyErr_SetString(PyExc_ValueError, "bad program or position, or backtracking limit");
        return NULL;
    }
    return PyLong_FromSsize_t(r);
}

/* -- the recording's masking marker ----------------------------------------------------- */

/* Text that needs no JSON escaping: detector names and hex digests, checked. */
static int json_plain(const char *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c >= 0x7f || c == '"' || c == '\\')
            return 0;
    }
    return 1;
}

/* marker_values(found) -> (json, counts)
 *
 * json: the marker's "values" as json.dumps(..., separators=(",", ":")) writes them,
 * [[detector, offset, length, hmac], ...]; counts: values per detector. ValueError for
 * anything that would need escaping (the caller then uses json.dumps). */
static PyObject *marker_values(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "a list of Masked records");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(arg), cap = 2 + n * 128, w = 0;
    char *buf = PyMem_Malloc((size_t)cap);
    PyObject *counts = PyDict_New(), *res = NULL;
    if (buf == NULL || counts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    buf[w++] = '[';
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyList_GET_ITEM(arg, i);
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) < 4) {
            PyErr_SetString(PyExc_ValueError, "not a Masked record");
            goto done;
        }
        PyObject *name = PyTuple_GET_ITEM(it, 0), *h = PyTuple_GET_ITEM(it, 3);
        Py_ssize_t nl, hl;
        const char *ns = PyUnicode_Check(name) ? PyUnicode_AsUTF8AndSize(name, &nl) : NULL;
        const char *hs = PyUnicode_Check(h) ? PyUnicode_AsUTF8AndSize(h, &hl) : NULL;
        long long off = PyLong_AsLongLong(PyTuple_GET_ITEM(it, 1));
        long long len = PyLong_AsLongLong(PyTuple_GET_ITEM(it, 2));
        if (ns == NULL || hs == NULL || PyErr_Occurred() || !json_plain(ns, nl) || !json_plain(hs, hl) ||
            nl > 200 || hl > 200) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "a field needs JSON escaping");
            goto done;
        }
        if (w + nl + hl + 64 > cap) {
            cap = cap * 2 + nl + hl + 64;
            char *nb = PyMem_Realloc(buf, (size_t)cap);
            if (nb == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            buf = nb;
        }
        if (i)
            buf[w++] = ',';
        buf[w++] = '[';
        buf[w++] = '"';
        memcpy(buf + w, ns, (size_t)nl);
        w += nl;
        w += sprintf(buf + w, "\",%lld,%lld,\"", off, len);
        memcpy(buf + w, hs, (size_t)hl);
        w += hl;
        buf[w++] = '"';
        buf[w++] = ']';
        PyObject *c = PyDict_GetItemWithError(counts, name);
        if (c == NULL && PyErr_Occurred())
            goto done;
        PyObject *nc = PyLong_FromLong(c == NULL ? 1 : PyLong_AsLong(c) + 1);
        if (nc == NULL || PyDict_SetItem(counts, name, nc) < 0) {
            Py_XDECREF(nc);
            goto done;
        }
        Py_DECREF(nc);
    }
    buf[w++] = ']';
    res = Py_BuildValue("(y#O)", buf, w, counts);
done:
    PyMem_Free(buf);
    Py_XDECREF(counts);
    return res;
}

static PyMethodDef module_methods[] = {
    {"marker_values", marker_values, METH_O, "The masking marker's values as JSON, and counts per detector."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef engine_methods[] = {
    {"plain", (PyCFunction)engine_plain, METH_VARARGS, "Mask plain text: (out, decided, masked)."},
    {"scan", (PyCFunction)engine_scan, METH_VARARGS, "The values of a segment: (decided, values)."},
    {"match", (PyCFunction)engine_match, METH_VARARGS, "Run one program at a position."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bastion.masking._engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The built-in detectors compiled for one masker's configuration.",
    .tp_methods = engine_methods,
    .tp_new = engine_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_engine", "Compiled masking engine (see bastion/masking/engine.py).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__engine(void) {
    init_tables();
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* engine.py refuses a build of another version (a stale in-place build after an update) */
    if (PyModule_AddIntConstant(m, "ABI", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
