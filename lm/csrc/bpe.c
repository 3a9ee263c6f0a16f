/* Byte-pair merging of one pre-token, for lm.tokenizers.bpe_core (loaded with ctypes; see lm/native.py).

   The merge rule is the one `bpe_core.bpe` follows in Python: start from single bytes and keep
   joining the adjacent pair whose joined bytes have the lowest rank (a token's rank is its id),
   the leftmost on ties, until no adjacent pair is a token. The tokens live in a hash table built once
   per vocabulary (`lm_bpe_new`); a part is a slice of the pre-token, so looking up a pair needs no
   copy: its bytes are already side by side. The same kind of table caches whole pre-tokens' ids and
   counts them (below). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LM_BPE_MAX 1024 /* bytes of one pre-token; Python's bpe_heap takes longer ones */
#define NO_ID INT32_MAX

static uint64_t hash_of(const uint8_t *p, int64_t n) { /* FNV-1a */
    uint64_t h = 14695981039346656037ULL;
    for (int64_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h | 1;
}

typedef struct {
    uint64_t hash; /* 0: an empty slot */
    int64_t at, value; /* where its bytes are kept; its id, where its ids are (a cache) or its count */
    int32_t length, count; /* bytes, and ids (a cache) */
} entry_t;

/* Pre-tokens (bytes) with a number each, in a hash table: the vocabulary's ids (lm_bpe_new), a cache of
   pre-tokens' ids (lm_bpe_cache_new, emptied when `limit` are stored) or their counts (lm_bpe_counts_new). */
typedef struct {
    uint64_t mask; /* slots - 1; at most half of them used */
    entry_t *entries;
    int64_t used, limit;
    uint8_t *bytes;
    int32_t *ids;
    int64_t bytes_used, bytes_room, ids_used, ids_room;
} cache_t;

void lm_bpe_cache_free(cache_t *c) {
    if (c) {
        free(c->entries);
        free(c->bytes);
        free(c->ids);
        free(c);
    }
}

/* An empty cache that keeps at most `limit` pre-tokens; NULL when memory runs out. */
cache_t *lm_bpe_cache_new(int64_t limit) {
    cache_t *c = calloc(1, sizeof(cache_t));
    if (!c) return NULL;
    c->mask = 4095;
    c->limit = limit > 0 ? limit : 1;
    c->entries = calloc(c->mask + 1, sizeof(entry_t));
    c->bytes_room = c->ids_room = 1 << 16;
    c->bytes = malloc((size_t)c->bytes_room);
    c->ids = malloc((size_t)c->ids_room * sizeof(int32_t));
    if (!c->entries || !c->bytes || !c->ids) {
        lm_bpe_cache_free(c);
        return NULL;
    }
    return c;
}

static entry_t *cache_find(const cache_t *c, const uint8_t *p, int64_t n, uint64_t h) {
    for (uint64_t i = h & c->mask;; i = (i + 1) & c->mask) {
        entry_t *e = &c->entries[i];
        if (e->hash == 0) return NULL;
        if (e->hash == h && e->length == n && memcmp(c->bytes + e->at, p, (size_t)n) == 0) return e;
    }
}

static int room_for(void **buffer, int64_t *room, int64_t need, size_t item) {
    if (need <= *room) return 0;
    int64_t size = *room;
    while (size < need) size *= 2;
    void *bigger = realloc(*buffer, (size_t)size * item);
    if (!bigger) return -1;
    *buffer = bigger;
    *room = size;
    return 0;
}

/* a new entry for p[0:n] (not there yet), its value and count 0; NULL when memory runs out */
static entry_t *cache_add(cache_t *c, const uint8_t *p, int64_t n, uint64_t h) {
    if (2 * (uint64_t)(c->used + 1) > c->mask + 1) { /* twice the slots, everything placed again */
        uint64_t mask = 2 * c->mask + 1;
        entry_t *entries = calloc(mask + 1, sizeof(entry_t));
        if (!entries) return NULL;
        for (uint64_t k = 0; k <= c->mask; k++) {
            if (!c->entries[k].hash) continue;
            uint64_t i = c->entries[k].hash & mask;
            while (entries[i].hash) i = (i + 1) & mask;
            entries[i] = c->entries[k];
        }
        free(c->entries);
        c->entries = entries;
        c->mask = mask;
    }
    if (room_for((void **)&c->bytes, &c->bytes_room, c->bytes_used + n, 1)) return NULL;
    uint64_t i = h & c->mask;
    while (c->entries[i].hash) i = (i + 1) & c->mask;
    c->entries[i] = (entry_t){h, c->bytes_used, 0, (int32_t)n, 0};
    memcpy(c->bytes + c->bytes_used, p, (size_t)n);
    c->bytes_used += n;
    c->used++;
    return &c->entries[i];
}

/* stores the pre-token p[0:n] with its ids; -1 when memory runs out */
static int cache_put(cache_t *c, const uint8_t *p, int64_t n, uint64_t h, const int32_t *ids, int32_t count) {
    if (c->used >= c->limit) { /* full: start again, as TokenCache does */
        memset(c->entries, 0, (size_t)(c->mask + 1) * sizeof(entry_t));
        c->used = c->bytes_used = c->ids_used = 0;
    }
    if (room_for((void **)&c->ids, &c->ids_room, c->ids_used + count, sizeof(int32_t))) return -1;
    entry_t *e = cache_add(c, p, n, h);
    if (!e) return -1;
    e->value = c->ids_used;
    e->count = count;
    memcpy(c->ids + c->ids_used, ids, (size_t)count * sizeof(int32_t));
    c->ids_used += count;
    return 0;
}

/* The vocabulary: each token's bytes -> its id, a table of pre-tokens (below) that never empties, each entry's
   value the id. A token seen twice keeps its first id. NULL when memory runs out. */
cache_t *lm_bpe_new(const uint8_t *bytes, const int64_t *offsets, const int32_t *ids, int64_t n) {
    cache_t *t = lm_bpe_cache_new(INT64_MAX);
    for (int64_t k = 0; t && k < n; k++) {
        const uint8_t *p = bytes + offsets[k];
        int64_t length = offsets[k + 1] - offsets[k];
        uint64_t h = hash_of(p, length);
        if (cache_find(t, p, length, h)) continue;
        entry_t *e = cache_add(t, p, length, h);
        if (!e) {
            lm_bpe_cache_free(t);
            return NULL;
        }
        e->value = ids[k];
    }
    return t;
}

void lm_bpe_free(cache_t *t) { lm_bpe_cache_free(t); }

static int32_t lookup(const cache_t *t, const uint8_t *p, int64_t n) {
    const entry_t *e = cache_find(t, p, n, hash_of(p, n));
    return e ? (int32_t)e->value : NO_ID;
}

/* The ids of the pre-token data[0:n] into out (room for n); returns how many, -1 when a single
   byte has no token (the caller raises the error), -2 when n is over LM_BPE_MAX. */
int lm_bpe_encode(const cache_t *t, const uint8_t *data, int n, int32_t *out) {
    int start[LM_BPE_MAX + 1]; /* part k is data[start[k] : start[k + 1]] */
    int32_t rank[LM_BPE_MAX];  /* rank[k]: the id of parts k and k + 1 joined, NO_ID if none */
    if (n <= 0) return 0;
    if (n > LM_BPE_MAX) return -2;
    int32_t whole = lookup(t, data, n); /* a whole word that is one token, as tiktoken also checks first */
    if (whole != NO_ID) {
        out[0] = whole;
        return 1;
    }
    int parts = n;
    for (int k = 0; k <= n; k++) start[k] = k;
    for (int k = 0; k + 1 < n; k++) rank[k] = lookup(t, data + k, 2);
    while (parts > 1) {
        int best = 0;
        for (int k = 1; k + 1 < parts; k++)
            if (rank[k] < rank[best]) best = k;
        if (rank[best] == NO_ID) break;
        /* join parts best and best + 1: their boundary and their pair go */
        memmove(&start[best + 1], &start[best + 2], (size_t)(parts - best - 1) * sizeof(int));
        memmove(&rank[best], &rank[best + 1], (size_t)(parts - best - 2) * sizeof(int32_t));
        parts--;
        if (best + 1 < parts) rank[best] = lookup(t, data + start[best], start[best + 2] - start[best]);
        if (best > 0) rank[best - 1] = lookup(t, data + start[best - 1], start[best + 1] - start[best - 1]);
    }
    for (int k = 0; k < parts; k++) {
        out[k] = lookup(t, data + start[k], start[k + 1] - start[k]);
        if (out[k] == NO_ID) return -1;
    }
    return parts;
}

/* ---- whole texts under GPT-2's or GPT-4's pattern (lm_bpe_text) --------------------------------------------
   The pre-tokens of GPT-2's pattern (bpe_core's GPT2_PATTERN, which the tests hold this to):

     'd 'm 's 't 'll 've 're | ' '? letters | ' '? numbers | ' '? others | spaces not before a non-space | spaces

   or GPT-4's (cl100k's, GPT4_PATTERN):

     the same contractions in either case | one character that is not \r, \n, a letter or a number, then letters
     | 1 to 3 numbers | ' '? others, then \r and \n | spaces to the end of the text | spaces up to their last \r
     or \n | spaces not before a non-space | one space

   over UTF-8 text, where a letter is \p{L}, a number \p{N} and a space \s (Unicode's White_Space): the ASCII
   ones are known here, the rest are looked up in ranges of code points that Python reads off the `regex`
   module's own tables and hands over once (lm_bpe_set_classes) before the first text that is not ASCII.
   Each pre-token is looked up in a cache of the pre-tokens met so far (`cache_t`: bytes -> ids, emptied
   when `limit` are stored, as bpe_core.TokenCache is) and merged by lm_bpe_encode when new. */

enum { LETTER = 1, DIGIT = 2, SPACE = 3, OTHER = 4 };

static uint32_t *class_first, *class_last; /* sorted, disjoint ranges of code points past ASCII */
static uint8_t *class_kind;
static int32_t class_count;

/* Takes a copy of n ranges [first[k], last[k]] of code points past ASCII, each of one class (LETTER, DIGIT or
   SPACE; a code point in none is OTHER), sorted and disjoint. Once per process; 0, or -1 when memory runs out. */
int lm_bpe_set_classes(const uint32_t *first, const uint32_t *last, const uint8_t *kind, int32_t n) {
    uint32_t *f = malloc(sizeof(uint32_t) * (size_t)(n + 1)), *l = malloc(sizeof(uint32_t) * (size_t)(n + 1));
    uint8_t *k = malloc((size_t)(n + 1));
    if (!f || !l || !k) {
        free(f);
        free(l);
        free(k);
        return -1;
    }
    memcpy(f, first, sizeof(uint32_t) * (size_t)n);
    memcpy(l, last, sizeof(uint32_t) * (size_t)n);
    memcpy(k, kind, (size_t)n);
    class_first = f, class_last = l, class_kind = k, class_count = n;
    return 0;
}

static int class_of_point(uint32_t point) {
    int32_t low = 0, high = class_count - 1;
    while (low <= high) {
        int32_t middle = (low + high) / 2;
        if (point < class_first[middle]) high = middle - 1;
        else if (point > class_last[middle]) low = middle + 1;
        else return class_kind[middle];
    }
    return OTHER;
}

static inline int ascii_class(uint8_t c) {
    if ((c | 32) >= 'a' && (c | 32) <= 'z') return LETTER;
    if (c >= '0' && c <= '9') return DIGIT;
    if (c == ' ' || (c >= '\t' && c <= '\r')) return SPACE;
    return OTHER;
}

/* The class of the character that starts at s[i] (i < n; the UTF-8 that Python's str.encode writes), and in
   *length its length in bytes. */
static inline int char_at(const uint8_t *s, int64_t i, int64_t n, int *length) {
    uint8_t c = s[i];
    if (c < 0x80) {
        *length = 1;
        return ascii_class(c);
    }
    int more = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : 1;
    uint32_t point = c & (0x3F >> more);
    if (i + more >= n) more = (int)(n - i - 1); /* (never, in valid UTF-8) */
    for (int j = 1; j <= more; j++) point = (point << 6) | (s[i + j] & 0x3F);
    *length = more + 1;
    return class_of_point(point);
}

/* the end of the run of characters of class `kind` that starts at s[e] (or e, if none does) */
static inline int64_t run_end(const uint8_t *s, int64_t e, int64_t n, int kind) {
    int length;
    while (e < n && char_at(s, e, n, &length) == kind) e += length;
    return e;
}

static inline int newline(uint8_t c) { return c == '\r' || c == '\n'; }

/* where GPT-2's pre-token that starts at text[i] ends (i < n) */
static int64_t gpt2_end(const uint8_t *s, int64_t i, int64_t n) {
    uint8_t c = s[i];
    if (c == '\'' && i + 1 < n) { /* the contractions come before a run of others */
        uint8_t d = s[i + 1];
        if (d == 's' || d == 'd' || d == 'm' || d == 't') return i + 2;
        if (i + 2 < n) {
            uint8_t e = s[i + 2];
            if ((d == 'l' && e == 'l') || (d == 'v' && e == 'e') || (d == 'r' && e == 'e')) return i + 3;
        }
    }
    int length, kind = char_at(s, i, n, &length);
    if (c == ' ' && i + 1 < n) { /* ' ?' and a run */
        int after, next = char_at(s, i + 1, n, &after);
        if (next != SPACE) return run_end(s, i + 1 + after, n, next);
    }
    if (kind != SPACE) return run_end(s, i + length, n, kind);
    int64_t last = i, e = i + length; /* a run of spaces: all of it at the end of the text, else all but the last */
    while (e < n && char_at(s, e, n, &length) == SPACE) last = e, e += length;
    return (e == n || last == i) ? e : last;
}

/* where GPT-4's pre-token that starts at text[i] ends (i < n) */
static int64_t gpt4_end(const uint8_t *s, int64_t i, int64_t n) {
    uint8_t c = s[i];
    if (c == '\'' && i + 1 < n) { /* contractions, in either case (and U+017F, long s, is an s) */
        uint8_t d = s[i + 1] | 32;
        if (d == 's' || d == 'd' || d == 'm' || d == 't') return i + 2;
        if (s[i + 1] == 0xC5 && i + 2 < n && s[i + 2] == 0xBF) return i + 3;
        if (i + 2 < n) {
            uint8_t e = s[i + 2] | 32;
            if ((d == 'l' && e == 'l') || (d == 'v' && e == 'e') || (d == 'r' && e == 'e')) return i + 3;
        }
    }
    int length, after = 0, kind = char_at(s, i, n, &length);
    if (kind == LETTER) return run_end(s, i + length, n, LETTER);
    int next = i + length < n ? char_at(s, i + length, n, &after) : 0;
    if (kind != DIGIT && !newline(c) && next == LETTER) return run_end(s, i + length + after, n, LETTER);
    if (kind == DIGIT) {
        int64_t e = i + length;
        for (int count = 1; count < 3 && e < n && char_at(s, e, n, &length) == DIGIT; count++) e += length;
        return e;
    }
    if (kind == OTHER || (c == ' ' && next == OTHER)) { /* ' '? others, then \r and \n */
        int64_t e = run_end(s, kind == OTHER ? i + length : i + 1, n, OTHER);
        while (e < n && newline(s[e])) e++;
        return e;
    }
    int64_t last = i, e = i + length, line_end = newline(c) ? i + 1 : -1; /* a run of spaces */
    while (e < n && char_at(s, e, n, &length) == SPACE) {
        if (newline(s[e])) line_end = e + 1;
        last = e, e += length;
    }
    if (e == n) return e;
    if (line_end >= 0) return line_end; /* up to its last newline */
    return last > i ? last : e; /* all but the last one, before a non-space; or that one alone */
}

typedef int64_t (*scan_t)(const uint8_t *s, int64_t i, int64_t n);

static scan_t scan_of(int pattern) { return pattern == 4 ? gpt4_end : gpt2_end; }

/* The ids of the UTF-8 text[start:n] under `pattern` (2: GPT-2's, 4: GPT-4's), pre-token by pre-token, into out (room for `room` ids); returns how many.
   *stop is n when the text is done; otherwise it is where the next pre-token begins, and *piece_end is -1 when
   out is full (the caller takes the ids and calls again from *stop), else the end of a pre-token this leaves to
   the caller (over LM_BPE_MAX bytes or over `room`, or a byte without a token), who encodes that one and calls
   again from its end.
   -1 when memory runs out. */
int64_t lm_bpe_text(const cache_t *t, cache_t *c, const uint8_t *text, int64_t start, int64_t n, int32_t *out,
                    int64_t room, int64_t *stop, int64_t *piece_end, int pattern) {
    int64_t written = 0;
    int32_t merged[LM_BPE_MAX];
    scan_t end_of = scan_of(pattern);
    for (int64_t i = start; i < n;) {
        int64_t end = end_of(text, i, n), length = end - i;
        if (written + length > room) { /* a pre-token has at most as many ids as bytes */
            *stop = i;
            *piece_end = written ? -1 : end; /* out is full, or this one pre-token could overflow all of it */
            return written;
        }
        uint64_t h = hash_of(text + i, length);
        const entry_t *e = cache_find(c, text + i, length, h);
        if (e) {
            memcpy(out + written, c->ids + e->value, (size_t)e->count * sizeof(int32_t));
            written += e->count;
        } else {
            int count = length <= LM_BPE_MAX ? lm_bpe_encode(t, text + i, (int)length, merged) : -2;
            if (count < 0) {
                *stop = i;
                *piece_end = end;
                return written;
            }
            if (cache_put(c, text + i, length, h, merged, count)) return -1;
            memcpy(out + written, merged, (size_t)count * sizeof(int32_t));
            written += count;
        }
        i = end;
    }
    *stop = n;
    return written;
}

/* ---- counting the pre-tokens of texts under GPT-2's or GPT-4's pattern (lm_bpe_count), for training ------- */

/* An empty table of counts; NULL when memory runs out. Free it with lm_bpe_cache_free. */
cache_t *lm_bpe_counts_new(void) { return lm_bpe_cache_new(INT64_MAX); }

/* Adds the pre-tokens of the UTF-8 text[0:n] under `pattern` (2 or 4) to the counts; -1 when memory runs out. */
int lm_bpe_count(cache_t *c, const uint8_t *text, int64_t n, int pattern) {
    scan_t end_of = scan_of(pattern);
    for (int64_t i = 0; i < n;) {
        int64_t end = end_of(text, i, n), length = end - i;
        uint64_t h = hash_of(text + i, length);
        entry_t *e = cache_find(c, text + i, length, h);
        if (!e && !(e = cache_add(c, text + i, length, h))) return -1;
        e->value++;
        i = end;
    }
    return 0;
}

/* How many distinct pre-tokens are counted, and (*bytes) their bytes together. */
int64_t lm_bpe_counts_size(const cache_t *c, int64_t *bytes) {
    *bytes = c->bytes_used;
    return c->used;
}

/* Each counted pre-token: its bytes, one after the other, into bytes (pre-token k is bytes[offsets[k] :
   offsets[k + 1]], offsets holding lm_bpe_counts_size + 1 numbers) and its count into counts[k]. */
void lm_bpe_counts_export(const cache_t *c, uint8_t *bytes, int64_t *offsets, int64_t *counts) {
    int64_t k = 0, at = 0;
    offsets[0] = 0;
    for (uint64_t i = 0; i <= c->mask; i++) {
        const entry_t *e = &c->entries[i];
        if (!e->hash) continue;
        memcpy(bytes + at, c->bytes + e->at, (size_t)e->length);
        at += e->length;
        counts[k] = e->value;
        offsets[++k] = at;
    }
}

/* ---- decoding: ids to their bytes (lm_bpe_decode) ---------------------------------------------------------- */

typedef struct {
    uint8_t *bytes;   /* every token's bytes, one after the other */
    int64_t *offsets; /* token k is bytes[offsets[k] : offsets[k + 1]]; empty for an id with no token */
    int64_t n;
} vocab_t;

void lm_bpe_vocab_free(vocab_t *v) {
    if (!v) return;
    free(v->bytes);
    free(v->offsets);
    free(v);
}

/* A copy of n tokens: token k is bytes[offsets[k] : offsets[k + 1]] (offsets holds n + 1 numbers), and an
   empty one is an id with no token (a BPE token has at least one byte). NULL when memory runs out. */
vocab_t *lm_bpe_vocab_new(const uint8_t *bytes, const int64_t *offsets, int64_t n) {
    vocab_t *v = calloc(1, sizeof(vocab_t));
    if (!v) return NULL;
    v->bytes = malloc((size_t)(offsets[n] > 0 ? offsets[n] : 1));
    v->offsets = malloc(sizeof(int64_t) * (size_t)(n + 1));
    if (!v->bytes || !v->offsets) {
        lm_bpe_vocab_free(v);
        return NULL;
    }
    memcpy(v->bytes, bytes, (size_t)offsets[n]);
    memcpy(v->offsets, offsets, sizeof(int64_t) * (size_t)(n + 1));
    v->n = n;
    return v;
}

/* How many bytes ids[0:n] decode to; -1 when one is out of range or has no token (the caller says which). */
int64_t lm_bpe_decoded_size(const vocab_t *v, const int32_t *ids, int64_t n) {
    int64_t size = 0;
    for (int64_t k = 0; k < n; k++) {
        int32_t id = ids[k];
        if (id < 0 || id >= v->n || v->offsets[id + 1] == v->offsets[id]) return -1;
        size += v->offsets[id + 1] - v->offsets[id];
    }
    return size;
}

/* The bytes of ids[0:n] into out, which has room for lm_bpe_decoded_size's count. */
void lm_bpe_decode(const vocab_t *v, const int32_t *ids, int64_t n, uint8_t *out) {
    for (int64_t k = 0; k < n; k++) {
        int64_t start = v->offsets[ids[k]], length = v->offsets[ids[k] + 1] - start;
        memcpy(out, v->bytes + start, (size_t)length);
        out += length;
    }
}
