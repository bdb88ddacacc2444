/* lorapipe.core._rowscan: the clean stage's per-row hot path for rows exactly as ingest writes them.

Why C of our own: for such a row the stage needs only its role sequence, its normalised replies, its
dedupe fingerprint and its split side. Getting those in Python costs ~25 us of CPU per row (a JSON
parse that builds every object, then a few passes over the texts and two hashlib calls), which caps
the stage at ~10x the seed's loop on 2 cores. No library does JSON -> Unicode normalisation ->
fingerprint in one pass without building Python objects. Everything Unicode-specific comes from
Python itself: the caller (core/rowscan.py) passes a table, made with the running Python's
unicodedata, that maps each code point to its NFKC + casefold form when that form can be found one
character at a time, so the result is the one sharegpt.normalise gives, by construction. Any line
this scanner is not certain about (another layout, an escape it does not take, a character outside
the table, invalid UTF-8, ...) is answered None, and the Python path decides it exactly as before.

scan(lines, table, salt, eval_cut) -> list, one entry per line:
  None  - not taken here: the caller examines the line in Python;
  (roles, replies, fingerprint, to_eval, canonical)
        - the line is {"messages":[{"role":R,"content":C},...],"source":S,"origin":O} with exactly
          that layout (keys in that order; compact or with json.dumps' default separators), every string valid JSON and valid UTF-8, the
          roles a valid sequence (optional system, then user/assistant alternating, ending with
          assistant), every content non-empty and not all whitespace;
          roles: tuple of str; replies: the normalised assistant texts (list of str);
          fingerprint: sharegpt.dialogue_fingerprint of the normalised turns, i.e. BLAKE2b-128 of
          b"u<user>\x1ea<reply>\x1e..." (UTF-8);
          to_eval: BLAKE2b-64 of salt + fingerprint, read big-endian, < eval_cut (the clean stage's
          split: salt is data.split.salt + NUL, eval_cut eval_fraction * 2^64);
          canonical: the line is byte for byte what orjson.dumps writes for its value.
table: bytes, native-endian uint32 per code point from 0 (as many as the caller covers):
  0xFFFFFFFF = not handled here; else the mapped code point, with bit 31 set when it is whitespace
  (str.isspace), which normalisation collapses.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NOT_HANDLED 0xFFFFFFFFu
#define WS_FLAG 0x80000000u

/* BLAKE2b (RFC 7693), one-shot, unkeyed: the fingerprint and the split hash that core.sharegpt
   and the clean stage compute with hashlib.blake2b, here without a Python call per row (tests check
   the two agree). Written from the RFC's reference code, as Python exposes no C API for it. */
static const uint64_t blake2b_iv[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL, 0xA54FF53A5F1D36F1ULL,
    0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL, 0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL};
static const uint8_t blake2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

#define ROTR64(x, y) (((x) >> (y)) ^ ((x) << (64 - (y))))
#define B2B_G(a, b, c, d, x, y)                 \
    do {                                        \
        v[a] = v[a] + v[b] + (x);               \
        v[d] = ROTR64(v[d] ^ v[a], 32);         \
        v[c] = v[c] + v[d];                     \
        v[b] = ROTR64(v[b] ^ v[c], 24);         \
        v[a] = v[a] + v[b] + (y);               \
        v[d] = ROTR64(v[d] ^ v[a], 16);         \
        v[c] = v[c] + v[d];                     \
        v[b] = ROTR64(v[b] ^ v[c], 63);         \
    } while (0)

static inline uint64_t load64_le(const uint8_t *p) {
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) | ((uint64_t)p[3] << 24) |
           ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) | ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

static void blake2b_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t v[16], m[16];
    for (int i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = blake2b_iv[i]; }
    v[12] ^= t;  /* the high 64 bits of the byte counter stay 0: inputs are far below 2^64 bytes */
    if (last) v[14] = ~v[14];
    for (int i = 0; i < 16; i++) m[i] = load64_le(block + 8 * i);
    /* The 12 rounds written out with constant indexes, so that the message words stay in
       registers (a loop over the sigma table is ~2x slower). */
#define B2B_ROUND(r)                                                                   \
    do {                                                                               \
        B2B_G(0, 4, 8, 12, m[blake2b_sigma[r][0]], m[blake2b_sigma[r][1]]);            \
        B2B_G(1, 5, 9, 13, m[blake2b_sigma[r][2]], m[blake2b_sigma[r][3]]);            \
        B2B_G(2, 6, 10, 14, m[blake2b_sigma[r][4]], m[blake2b_sigma[r][5]]);           \
        B2B_G(3, 7, 11, 15, m[blake2b_sigma[r][6]], m[blake2b_sigma[r][7]]);           \
        B2B_G(0, 5, 10, 15, m[blake2b_sigma[r][8]], m[blake2b_sigma[r][9]]);           \
        B2B_G(1, 6, 11, 12, m[blake2b_sigma[r][10]], m[blake2b_sigma[r][11]]);         \
        B2B_G(2, 7, 8, 13, m[blake2b_sigma[r][12]], m[blake2b_sigma[r][13]]);          \
        B2B_G(3, 4, 9, 14, m[blake2b_sigma[r][14]], m[blake2b_sigma[r][15]]);          \
    } while (0)
    B2B_ROUND(0); B2B_ROUND(1); B2B_ROUND(2); B2B_ROUND(3); B2B_ROUND(4); B2B_ROUND(5);
    B2B_ROUND(6); B2B_ROUND(7); B2B_ROUND(8); B2B_ROUND(9); B2B_ROUND(10); B2B_ROUND(11);
#undef B2B_ROUND
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* hashlib.blake2b(data, digest_size=outlen).digest() into out (outlen <= 64). */
static void blake2b_digest(uint8_t *out, size_t outlen, const uint8_t *in, size_t inlen) {
    uint64_t h[8];
    uint8_t block[128];
    uint64_t t = 0;
    for (int i = 0; i < 8; i++) h[i] = blake2b_iv[i];
    h[0] ^= 0x01010000ULL ^ (uint64_t)outlen;
    while (inlen > 128) {
        t += 128;
        blake2b_compress(h, in, t, 0);
        in += 128;
        inlen -= 128;
    }
    memcpy(block, in, inlen);
    memset(block + inlen, 0, 128 - inlen);
    t += inlen;
    blake2b_compress(h, block, t, 1);
    for (size_t i = 0; i < outlen; i++) out[i] = (uint8_t)(h[i >> 3] >> (8 * (i & 7)));
}

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *data = PyMem_Realloc(b->data, cap);
    if (!data) { PyErr_NoMemory(); return -1; }
    b->data = data;
    b->cap = cap;
    return 0;
}

/* Append code point cp (valid, not a surrogate) as UTF-8; the room must be reserved. */
#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

static ALWAYS_INLINE char *put_utf8(char *o, uint32_t cp) {
    unsigned char *p = (unsigned char *)o;
    if (cp < 0x80) { p[0] = (unsigned char)cp; return o + 1; }
    if (cp < 0x800) { p[0] = 0xC0 | (cp >> 6); p[1] = 0x80 | (cp & 0x3F); return o + 2; }
    if (cp < 0x10000) { p[0] = 0xE0 | (cp >> 12); p[1] = 0x80 | ((cp >> 6) & 0x3F); p[2] = 0x80 | (cp & 0x3F); return o + 3; }
    p[0] = 0xF0 | (cp >> 18); p[1] = 0x80 | ((cp >> 12) & 0x3F); p[2] = 0x80 | ((cp >> 6) & 0x3F); p[3] = 0x80 | (cp & 0x3F);
    return o + 4;
}

/* Decode one strict UTF-8 code point at *pp (< end): no overlong forms, no surrogates, <= U+10FFFF.
   Returns -1 on anything invalid (the caller leaves the line to Python, which reports it). */
static ALWAYS_INLINE int32_t utf8_next(const unsigned char **pp, const unsigned char *end) {
    const unsigned char *p = *pp;
    uint32_t c = p[0];
    if (c < 0x80) { *pp = p + 1; return (int32_t)c; }
    if (c < 0xC2) return -1;
    if (c < 0xE0) {
        if (end - p < 2 || (p[1] & 0xC0) != 0x80) return -1;
        *pp = p + 2;
        return (int32_t)(((c & 0x1F) << 6) | (p[1] & 0x3F));
    }
    if (c < 0xF0) {
        if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return -1;
        uint32_t cp = ((c & 0x0F) << 12) | ((uint32_t)(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
        if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)) return -1;
        *pp = p + 3;
        return (int32_t)cp;
    }
    if (c < 0xF5) {
        if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return -1;
        uint32_t cp = ((c & 0x07) << 18) | ((uint32_t)(p[1] & 0x3F) << 12) | ((uint32_t)(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
        if (cp < 0x10000 || cp > 0x10FFFF) return -1;
        *pp = p + 4;
        return (int32_t)cp;
    }
    return -1;
}

static inline int hex4(const unsigned char *p, uint32_t *out) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char h = p[i];
        v <<= 4;
        if (h >= '0' && h <= '9') v |= h - '0';
        else if (h >= 'a' && h <= 'f') v |= h - 'a' + 10;
        else if (h >= 'A' && h <= 'F') v |= h - 'A' + 10;
        else return -1;
    }
    *out = v;
    return 0;
}

/* The next code point of a JSON string body at *pp, escapes decoded. Returns the code point, -2 at
   the closing quote (consumed), -1 for anything not taken (invalid JSON or UTF-8, a raw control
   character, a lone surrogate escape, the end of the line). */
/* Whether the line being scanned is exactly what orjson.dumps (and json.dumps with
   ensure_ascii=False and compact separators) writes for its value: no whitespace between tokens,
   and only the escapes those write (\" \\ \b \f \n \r \t, and \u00xx in lower case for the other
   control characters). Then the line can stand for its row inside another JSON document (a reject
   record) as it is. One flag for the module: scan() holds the GIL throughout. */
static int line_canonical;

static ALWAYS_INLINE int32_t json_char(const unsigned char **pp, const unsigned char *end) {
    const unsigned char *p = *pp;
    if (p >= end) return -1;
    unsigned char c = *p;
    if (c == '"') { *pp = p + 1; return -2; }
    if (c < 0x20) return -1;
    if (c != '\\') {
        if (c < 0x80) { *pp = p + 1; return c; }
        return utf8_next(pp, end);
    }
    if (end - p < 2) return -1;
    switch (p[1]) {
    case '"': *pp = p + 2; return '"';
    case '\\': *pp = p + 2; return '\\';
    case '/': *pp = p + 2; line_canonical = 0; return '/';
    case 'b': *pp = p + 2; return '\b';
    case 'f': *pp = p + 2; return '\f';
    case 'n': *pp = p + 2; return '\n';
    case 'r': *pp = p + 2; return '\r';
    case 't': *pp = p + 2; return '\t';
    case 'u': {
        uint32_t hi, lo;
        if (end - p < 6 || hex4(p + 2, &hi) < 0) return -1;
        if (hi < 0xD800 || hi > 0xDFFF) {
            /* canonical only for a control character without a short escape, in lower case */
            if (hi >= 0x20 || hi == '\b' || hi == '\t' || hi == '\n' || hi == '\f' || hi == '\r' || (p[5] >= 'A' && p[5] <= 'F'))
                line_canonical = 0;
            *pp = p + 6;
            return (int32_t)hi;
        }
        line_canonical = 0;  /* a surrogate pair: orjson writes the character itself */
        /* a surrogate pair, or a lone surrogate (json keeps it, orjson refuses: Python decides) */
        if (hi > 0xDBFF || end - p < 12 || p[6] != '\\' || p[7] != 'u' || hex4(p + 8, &lo) < 0 || lo < 0xDC00 || lo > 0xDFFF) return -1;
        *pp = p + 12;
        return (int32_t)(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00));
    }
    default: return -1;
    }
}

/* Skip a JSON string body (after its opening quote), checking it; 0 ok, -1 not taken. */
static int skip_string(const unsigned char **pp, const unsigned char *end) {
    for (;;) {
        int32_t cp = json_char(pp, end);
        if (cp == -2) return 0;
        if (cp < 0) return -1;
    }
}

/* A content string (after its opening quote): checked like validate_messages (non-empty, not all
   whitespace), and for a dialogue turn normalised into `out` as sharegpt.normalise does: each code
   point mapped by the table, whitespace runs collapsed to one space, none at either end.
   `out` has room for 4 bytes per input byte (scan_line reserves it): no code point's UTF-8 form is
   longer than 4 bytes, nor than 4x its shortest JSON form. Returns 0 ok, -1 not taken. */
/* Bytes of a JSON string body, for the loop over plain ASCII: 0 stops it (the quote, the backslash,
   control characters, DEL and every byte of a multi-byte UTF-8 sequence), 1 is the space, 2 any
   other printable ASCII character. */
static unsigned char ascii_class[256];

static void init_ascii_class(void) {
    for (int c = 0x21; c < 0x7F; c++) ascii_class[c] = 2;
    ascii_class[' '] = 1;
    ascii_class['"'] = 0;
    ascii_class['\\'] = 0;
}

static int content_string(const unsigned char **pp, const unsigned char *end, Buf *out, int normalise,
                          const uint32_t *table, Py_ssize_t table_len) {
    const unsigned char *p = *pp;
    const unsigned char *start = p;
    int all_space = 1, started = 0, pending_space = 0;
    char *o = out->data + out->len;
    for (;;) {
        /* The common case first: printable ASCII other than the quote and the backslash, where the
           mapping is lower-casing and the only whitespace is the space. */
        unsigned char c, k;
        while (p < end && (k = ascii_class[c = *p]) != 0) {
            p++;
            if (k == 1) {
                pending_space = started;
                continue;
            }
            all_space = 0;
            if (pending_space) { *o++ = ' '; pending_space = 0; }
            *o++ = (c >= 'A' && c <= 'Z') ? c + 32 : c;
            started = 1;
        }
        const unsigned char *char_start = p;
        int32_t cp = json_char(&p, end);
        if (cp == -2) break;
        if (cp < 0) return -1;
        if (all_space && !Py_UNICODE_ISSPACE((Py_UCS4)cp)) all_space = 0;
        if (!normalise) continue;
        if (cp >= table_len) return -1;
        uint32_t m = table[cp];
        if (m == NOT_HANDLED) return -1;
        if (m & WS_FLAG) {
            pending_space = started;
            continue;
        }
        if (pending_space) { *o++ = ' '; pending_space = 0; }
        if (m == (uint32_t)cp && *char_start != '\\') {  /* unchanged, and read as UTF-8: copy its bytes */
            while (char_start < p) *o++ = (char)*char_start++;
        } else {
            o = put_utf8(o, m);
        }
        started = 1;
    }
    *pp = p;
    if (p - start == 1 || all_space) return -1;  /* empty or all whitespace: invalid, Python gives the exact reason */
    if (normalise) out->len = o - out->data;  /* else what was written is dropped */
    return 0;
}

/* Skip JSON whitespace, then match the literal token; 0 ok, -1 not there. Compact lines (as ingest
   writes them) and json.dumps' default ", " / ": " separators are both taken. */
static inline int tok(const unsigned char **pp, const unsigned char *end, const char *lit, Py_ssize_t n) {
    const unsigned char *p = *pp;
    if (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
        line_canonical = 0;
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    }
    if (end - p < n || memcmp(p, lit, n) != 0) return -1;
    *pp = p + n;
    return 0;
}

enum { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT };
static PyObject *role_names[3];

/* The role string, quotes included. */
static int role_of(const unsigned char **pp, const unsigned char *end) {
    if (tok(pp, end, "\"user\"", 6) == 0) return ROLE_USER;
    if (tok(pp, end, "\"assistant\"", 11) == 0) return ROLE_ASSISTANT;
    if (tok(pp, end, "\"system\"", 8) == 0) return ROLE_SYSTEM;
    return -1;
}

#define MAX_TURNS 4096

typedef struct {
    const uint32_t *table;
    Py_ssize_t table_len;
    uint8_t *salted;        /* split salt, then room for the 16-byte fingerprint */
    Py_ssize_t salt_len;
    uint64_t eval_cut;      /* a row goes to eval when its split hash is below this ... */
    int eval_all;           /* ... or always, when the cut is 2^64 or more */
} Settings;

/* One line; returns a new reference to the result tuple, Py_None (new ref) if not taken, NULL on error. */
static PyObject *scan_line(const unsigned char *p, const unsigned char *end, const Settings *st,
                           Buf *fp, Py_ssize_t *reply_at, Py_ssize_t *reply_end, int *roles) {
    const uint32_t *table = st->table;
    Py_ssize_t table_len = st->table_len;
    int n = 0, n_replies = 0;
    fp->len = 0;
    line_canonical = 1;
    /* Room for everything this line can add: 4 bytes per byte of it (see content_string), plus the
       two bytes per turn written here, which the turn's own JSON syntax outweighs. */
    if (buf_reserve(fp, 4 * (end - p) + 16) < 0) return NULL;
    if (tok(&p, end, "{", 1) < 0 || tok(&p, end, "\"messages\"", 10) < 0 || tok(&p, end, ":", 1) < 0 || tok(&p, end, "[", 1) < 0) goto not_taken;
    for (;;) {
        if (n >= MAX_TURNS) goto not_taken;
        if (tok(&p, end, "{", 1) < 0 || tok(&p, end, "\"role\"", 6) < 0 || tok(&p, end, ":", 1) < 0) goto not_taken;
        int role = role_of(&p, end);
        if (role < 0) goto not_taken;
        /* the sequence: [system] user assistant user assistant ... */
        if (role == ROLE_SYSTEM ? n != 0 : role != ((n - (n > 0 && roles[0] == ROLE_SYSTEM)) % 2 == 0 ? ROLE_USER : ROLE_ASSISTANT))
            goto not_taken;
        roles[n++] = role;
        if (tok(&p, end, ",", 1) < 0 || tok(&p, end, "\"content\"", 9) < 0 || tok(&p, end, ":", 1) < 0 || tok(&p, end, "\"", 1) < 0) goto not_taken;
        int dialogue = role != ROLE_SYSTEM;
        if (dialogue) {
            fp->data[fp->len++] = role == ROLE_USER ? 'u' : 'a';
            if (role == ROLE_ASSISTANT) reply_at[n_replies] = fp->len;
        }
        if (content_string(&p, end, fp, dialogue, table, table_len) < 0) {
            if (PyErr_Occurred()) return NULL;
            goto not_taken;
        }
        if (dialogue) {
            if (role == ROLE_ASSISTANT) reply_end[n_replies++] = fp->len;
            fp->data[fp->len++] = '\x1e';
        }
        if (tok(&p, end, "}", 1) < 0) goto not_taken;
        if (tok(&p, end, ",", 1) == 0) continue;
        if (tok(&p, end, "]", 1) == 0) break;
        goto not_taken;
    }
    if (roles[n - 1] != ROLE_ASSISTANT) goto not_taken;
    if (tok(&p, end, ",", 1) < 0 || tok(&p, end, "\"source\"", 8) < 0 || tok(&p, end, ":", 1) < 0 || tok(&p, end, "\"", 1) < 0 || skip_string(&p, end) < 0) goto not_taken;
    if (tok(&p, end, ",", 1) < 0 || tok(&p, end, "\"origin\"", 8) < 0 || tok(&p, end, ":", 1) < 0 || tok(&p, end, "\"", 1) < 0 || skip_string(&p, end) < 0) goto not_taken;
    if (tok(&p, end, "}", 1) < 0) goto not_taken;
    if (p < end) line_canonical = 0;
    while (p < end && (*p == ' ' || *p == '\t')) p++;  /* trailing whitespace: json.loads allows it */
    if (p != end) goto not_taken;

    /* The fingerprint: BLAKE2b-128 of the dialogue (sharegpt.dialogue_fingerprint); the split
       side: BLAKE2b-64 of salt + fingerprint, big-endian, against the cut (clean._Examiner._to_eval). */
    uint8_t *digest = st->salted + st->salt_len;
    blake2b_digest(digest, 16, (const uint8_t *)fp->data, (size_t)fp->len);
    uint8_t side[8];
    blake2b_digest(side, 8, st->salted, (size_t)st->salt_len + 16);
    uint64_t side_value = 0;
    for (int i = 0; i < 8; i++) side_value = (side_value << 8) | side[i];
    int to_eval = st->eval_all || side_value < st->eval_cut;

    PyObject *role_tuple = PyTuple_New(n);
    PyObject *replies = PyList_New(n_replies);
    PyObject *data = PyBytes_FromStringAndSize((const char *)digest, 16);
    if (!role_tuple || !replies || !data) goto fail;
    for (int i = 0; i < n; i++) {
        Py_INCREF(role_names[roles[i]]);
        PyTuple_SET_ITEM(role_tuple, i, role_names[roles[i]]);
    }
    for (int i = 0; i < n_replies; i++) {
        PyObject *s = PyUnicode_DecodeUTF8(fp->data + reply_at[i], reply_end[i] - reply_at[i], "strict");
        if (!s) goto fail;
        PyList_SET_ITEM(replies, i, s);
    }
    PyObject *result = PyTuple_Pack(5, role_tuple, replies, data, to_eval ? Py_True : Py_False, line_canonical ? Py_True : Py_False);
    Py_DECREF(role_tuple);
    Py_DECREF(replies);
    Py_DECREF(data);
    return result;
fail:
    Py_XDECREF(role_tuple);
    Py_XDECREF(replies);
    Py_XDECREF(data);
    return NULL;
not_taken:
    Py_RETURN_NONE;
}

static PyObject *scan(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *lines, *cut;
    Py_buffer table_view;
    const char *salt;
    Py_ssize_t salt_len;
    if (!PyArg_ParseTuple(args, "O!y*y#O!:scan", &PyList_Type, &lines, &table_view, &salt, &salt_len, &PyLong_Type, &cut)) return NULL;
    Settings st = {(const uint32_t *)table_view.buf, table_view.len / 4, NULL, salt_len, 0, 0};
    if (table_view.len % 4 != 0) {
        PyBuffer_Release(&table_view);
        PyErr_SetString(PyExc_ValueError, "table: a whole number of uint32 entries expected");
        return NULL;
    }
    st.eval_cut = PyLong_AsUnsignedLongLong(cut);
    if (st.eval_cut == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {  /* (the caller passes no negative cut) */
            PyBuffer_Release(&table_view);
            return NULL;
        }
        PyErr_Clear();
        st.eval_all = 1;  /* 2^64 or more: every row */
    }
    Py_ssize_t n = PyList_GET_SIZE(lines);
    PyObject *out = PyList_New(n);
    Buf fp = {0};
    st.salted = PyMem_Malloc(salt_len + 16);
    if (st.salted) memcpy(st.salted, salt, salt_len);
    Py_ssize_t *reply_at = PyMem_Malloc(sizeof(Py_ssize_t) * MAX_TURNS);
    Py_ssize_t *reply_end = PyMem_Malloc(sizeof(Py_ssize_t) * MAX_TURNS);
    int *roles = PyMem_Malloc(sizeof(int) * MAX_TURNS);
    if (!out || !reply_at || !reply_end || !roles || !st.salted) {
        if (out) Py_DECREF(out);
        out = NULL;
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *line = PyList_GET_ITEM(lines, i);
        if (!PyBytes_Check(line)) {
            Py_DECREF(out);
            out = NULL;
            PyErr_SetString(PyExc_TypeError, "lines: a list of bytes expected");
            goto done;
        }
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(line);
        PyObject *r = scan_line(p, p + PyBytes_GET_SIZE(line), &st, &fp, reply_at, reply_end, roles);
        if (!r) {
            Py_DECREF(out);
            out = NULL;
            goto done;
        }
        PyList_SET_ITEM(out, i, r);
    }
done:
    PyMem_Free(fp.data);
    PyMem_Free(reply_at);
    PyMem_Free(reply_end);
    PyMem_Free(roles);
    PyMem_Free(st.salted);
    PyBuffer_Release(&table_view);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(lines, table) -> list: see the module source."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rowscan", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rowscan(void) {
    init_ascii_class();
    const char *names[3] = {"system", "user", "assistant"};
    for (int i = 0; i < 3; i++) {
        role_names[i] = PyUnicode_InternFromString(names[i]);
        if (!role_names[i]) return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    /* What core/rowscan.py expects (its SCANNER_VERSION): bump both on any change of behaviour, so
       that a module built from an older source is refused instead of used. */
    if (m && PyModule_AddIntConstant(m, "VERSION", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
