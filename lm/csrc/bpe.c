/* Byte-pair merging of one pre-token, for lm.tokenizers.bpe_core (loaded with ctypes; see lm/native.py).

   The merge rule is the one `bpe_core.bpe` follows in Python: start from single bytes and keep
   joining the adjacent pair whose joined bytes have the lowest rank (a token's rank is its id),
   the leftmost on ties, until no adjacent pair is a token. The tokens live in a hash table built once
   per vocabulary (`lm_bpe_new`); a part is a slice of the pre-token, so looking up a pair needs no
   copy: its bytes are already side by side. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LM_BPE_MAX 1024 /* bytes of one pre-token; Python's bpe_heap takes longer ones */
#define NO_ID INT32_MAX

typedef struct {
    uint64_t hash; /* 0: an empty slot */
    int64_t offset, length;
    int32_t id;
} slot_t;

typedef struct {
    uint64_t mask; /* slots - 1; the table is at most half full */
    slot_t *slots;
    uint8_t *bytes; /* every token's bytes, one after the other */
} table_t;

static uint64_t hash_of(const uint8_t *p, int64_t n) { /* FNV-1a */
    uint64_t h = 14695981039346656037ULL;
    for (int64_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h | 1;
}

static int32_t lookup(const table_t *t, const uint8_t *p, int64_t n) {
    uint64_t h = hash_of(p, n);
    for (uint64_t i = h & t->mask;; i = (i + 1) & t->mask) {
        const slot_t *s = &t->slots[i];
        if (s->hash == 0) return NO_ID;
        if (s->hash == h && s->length == n && memcmp(t->bytes + s->offset, p, (size_t)n) == 0) return s->id;
    }
}

void lm_bpe_free(table_t *t) {
    if (t) {
        free(t->slots);
        free(t->bytes);
        free(t);
    }
}

/* The table of n tokens: token k is bytes[offsets[k] : offsets[k + 1]] with id ids[k]. A token seen
   twice keeps its first id. NULL when memory runs out. */
table_t *lm_bpe_new(const uint8_t *bytes, const int64_t *offsets, const int32_t *ids, int64_t n) {
    uint64_t size = 16;
    while (size < 2 * (uint64_t)n) size *= 2;
    table_t *t = calloc(1, sizeof(table_t));
    if (!t) return NULL;
    t->mask = size - 1;
    t->slots = calloc(size, sizeof(slot_t));
    t->bytes = malloc(offsets[n] > 0 ? (size_t)offsets[n] : 1);
    if (!t->slots || !t->bytes) {
        lm_bpe_free(t);
        return NULL;
    }
    memcpy(t->bytes, bytes, (size_t)offsets[n]);
    for (int64_t k = 0; k < n; k++) {
        const uint8_t *p = t->bytes + offsets[k];
        int64_t length = offsets[k + 1] - offsets[k];
        if (lookup(t, p, length) != NO_ID) continue;
        uint64_t h = hash_of(p, length), i = h & t->mask;
        while (t->slots[i].hash) i = (i + 1) & t->mask;
        t->slots[i] = (slot_t){h, offsets[k], length, ids[k]};
    }
    return t;
}

/* The ids of the pre-token data[0:n] into out (room for n); returns how many, -1 when a single
   byte has no token (the caller raises the error), -2 when n is over LM_BPE_MAX. */
int lm_bpe_encode(const table_t *t, const uint8_t *data, int n, int32_t *out) {
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
