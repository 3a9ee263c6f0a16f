/* lm's CPU kernels for training causal attention in float32: softmax(q k^T / sqrt(D) + causal mask) v
   forward, keeping the probabilities P, and its backward from them; and at the end of this file, kernels over
   rows for training: the MLP's bias and exact GELU (lm_bias_gelu_*), a residual sum with its sublayer's bias
   (lm_bias_residual), RMSNorm, SwiGLU's gate and RoPE. Built by lm.cpu_kernels with the
   system's C compiler (-O3 -mavx2 -mfma -fopenmp, and -mavx512f where the CPU has AVX-512) and loaded
   with ctypes.

   torch's CPU flash kernel walks the keys in blocks and recomputes the probabilities in backward; at
   the book's training sizes (T = 256, D = 64) it reaches a third of what the multiply-adds allow. Here
   each (batch, head) is one job on one thread, T x T at a time, in four kinds of small products, each
   a block of 6 rows x 16 columns held in twelve 8-float registers (AVX2 + FMA), or with AVX-512 8 rows x
   32 columns in sixteen 16-float registers, each broadcast number feeding two multiply-adds (8 x 16 where
   fewer than 32 columns are left). k and v are transposed 8 x 8 at a time in registers, and the softmax
   and backward's row sums run 16 lanes wide (as two 8-float halves in the AVX2 build, which sums them in
   the same order: the two builds agree to the bit):

     forward:   S = q k^T scale (upper triangle skipped)   P = softmax(S) by rows   out = P v
     backward:  dP = g v^T   dS = P (dP - rowsum(P dP)) scale   dq = dS k   dk = dS^T q   dv = P^T g

   Only blocks touching the lower triangle are computed, and P and dS are zero above the diagonal,
   so products over them may run past it. P is kept by blocks of rows, each as wide as its block's last
   row needs (about half of T x T floats: lm_causal_probs(T) a head), so a block never reads past a row. Strides are in floats, D contiguous; D a multiple of 16. `bias`
   (NULL for none) holds 3 H D floats, q's, k's and v's biases as qkv lays them out, added to q, k and v
   as each head's rows are gathered: a model's qkv projection then needs no bias of its own.
   Every output is summed by one thread in a fixed order: the result does not depend on the number
   of threads. Each thread gets lm_causal_scratch(T, D, backward) floats of `scratch`. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "vector_math.h"  /* exp_nonpositive, ERF_P, ERF_TERMS, tiny_as_zero */

#ifdef __AVX512F__
#define ROWS 8   /* eight 16-float sums (12 rows spill the row pointers: slower) */
#else
#define ROWS 6   /* twelve 8-float sums */
#endif

long lm_causal_stride(long T) { return (T + ROWS - 1 + 15) / 16 * 16; }

/* P (and backward's dS) is kept by blocks of ROWS rows, each row of the block starting at row i0 as wide as
   the block's last row needs (its length rounded up to 16; the last block's as if it were whole, so dk's
   and dv's products, which read ROWS columns from row i0 on, stay inside it): the lower triangle and the
   diagonal's blocks, about half of T x T, the rows of one block after another. */
static inline long block_width(long i0) { return (i0 + ROWS - 1 + 16) & ~15L; }

static inline long block_height(long i0, long T) { return i0 + ROWS <= T ? ROWS : T - i0; }

/* the floats of one head's kept P */
long lm_causal_probs(long T) {
    long n = 0;
    for (long i0 = 0; i0 < T; i0 += ROWS) n += block_height(i0, T) * block_width(i0);
    return n;
}

long lm_causal_scratch(long T, long D, int backward) {
    long ld = lm_causal_stride(T);
    return D * ld + (backward ? lm_causal_probs(T) + 3 * T * D : 2 * T * D) + (ld > D ? ld : D);
}

static inline float lanes_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float lanes_max(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 columns of a block's row: one 16-float register with AVX-512, two 8-float ones with AVX2 */
#ifdef __AVX512F__
typedef __m512 Columns;
static inline Columns columns_load(const float *p) { return _mm512_loadu_ps(p); }
static inline Columns columns_zero(void) { return _mm512_setzero_ps(); }
static inline Columns columns_fma(float a, Columns y, Columns acc) { return _mm512_fmadd_ps(_mm512_set1_ps(a), y, acc); }
static inline void columns_store(float *p, Columns x, float scale) {
    _mm512_storeu_ps(p, _mm512_mul_ps(x, _mm512_set1_ps(scale)));
}
static inline void columns_put(float *p, Columns x) { _mm512_storeu_ps(p, x); }
static inline Columns columns_set1(float a) { return _mm512_set1_ps(a); }
static inline Columns columns_add(Columns x, Columns y) { return _mm512_add_ps(x, y); }
static inline Columns columns_sub(Columns x, Columns y) { return _mm512_sub_ps(x, y); }
static inline Columns columns_mul(Columns x, Columns y) { return _mm512_mul_ps(x, y); }
static inline Columns columns_max(Columns x, Columns y) { return _mm512_max_ps(x, y); }
static inline Columns columns_fmav(Columns x, Columns y, Columns acc) { return _mm512_fmadd_ps(x, y, acc); }
static inline __mmask16 lanes_below(long n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
/* x where the lane is below n, else `fill` */
static inline Columns columns_fill(Columns x, long n, float fill) {
    return _mm512_mask_blend_ps(lanes_below(n), _mm512_set1_ps(fill), x);
}
static inline Columns columns_keep(Columns x, long n) { return _mm512_maskz_mov_ps(lanes_below(n), x); }
static inline Columns columns_abs(Columns x) { return _mm512_abs_ps(x); }
static inline Columns columns_div(Columns x, Columns y) { return _mm512_div_ps(x, y); }
/* `negative` where x < 0, else `other` */
static inline Columns columns_by_sign(Columns x, Columns negative, Columns other) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), other, negative);
}
static inline __m256 upper_half(__m512 x) {  /* AVX-512F alone has no float32 x 8 extract */
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
}
/* the 16 lanes summed as the AVX2 build sums them: the upper 8 onto the lower 8, then those */
static inline float columns_sum(Columns x) {
    return lanes_sum(_mm256_add_ps(_mm512_castps512_ps256(x), upper_half(x)));
}
static inline float columns_hmax(Columns x) {
    return lanes_max(_mm256_max_ps(_mm512_castps512_ps256(x), upper_half(x)));
}
/* exp_nonpositive on 16 lanes, the same operations (so the same bits) */
static inline Columns columns_exp(Columns x) {
    x = _mm512_max_ps(_mm512_set1_ps(EXP_FLOOR), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2_E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HIGH), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LOW), r);
    __m512 p = _mm512_set1_ps(EXP_TERMS[0]);
    for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_TERMS[i]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(two_n));
}
#else
typedef struct { __m256 lo, hi; } Columns;
static inline Columns columns_load(const float *p) { return (Columns){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline Columns columns_zero(void) { return (Columns){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline Columns columns_fma(float a, Columns y, Columns acc) {
    __m256 b = _mm256_set1_ps(a);
    return (Columns){_mm256_fmadd_ps(b, y.lo, acc.lo), _mm256_fmadd_ps(b, y.hi, acc.hi)};
}
static inline void columns_store(float *p, Columns x, float scale) {
    __m256 s = _mm256_set1_ps(scale);
    _mm256_storeu_ps(p, _mm256_mul_ps(x.lo, s));
    _mm256_storeu_ps(p + 8, _mm256_mul_ps(x.hi, s));
}
static inline void columns_put(float *p, Columns x) { _mm256_storeu_ps(p, x.lo); _mm256_storeu_ps(p + 8, x.hi); }
static inline Columns columns_set1(float a) { return (Columns){_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
static inline Columns columns_add(Columns x, Columns y) {
    return (Columns){_mm256_add_ps(x.lo, y.lo), _mm256_add_ps(x.hi, y.hi)};
}
static inline Columns columns_sub(Columns x, Columns y) {
    return (Columns){_mm256_sub_ps(x.lo, y.lo), _mm256_sub_ps(x.hi, y.hi)};
}
static inline Columns columns_mul(Columns x, Columns y) {
    return (Columns){_mm256_mul_ps(x.lo, y.lo), _mm256_mul_ps(x.hi, y.hi)};
}
static inline Columns columns_max(Columns x, Columns y) {
    return (Columns){_mm256_max_ps(x.lo, y.lo), _mm256_max_ps(x.hi, y.hi)};
}
static inline Columns columns_fmav(Columns x, Columns y, Columns acc) {
    return (Columns){_mm256_fmadd_ps(x.lo, y.lo, acc.lo), _mm256_fmadd_ps(x.hi, y.hi, acc.hi)};
}
/* all-ones in the lanes of (the lower, the upper) 8 below n */
static inline Columns lanes_below(long n) {
    __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), count = _mm256_set1_ps((float)(n < 16 ? n : 16));
    return (Columns){_mm256_cmp_ps(lane, count, _CMP_LT_OQ),
                     _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(8.0f)), count, _CMP_LT_OQ)};
}
static inline Columns columns_fill(Columns x, long n, float fill) {
    Columns keep = lanes_below(n);
    __m256 f = _mm256_set1_ps(fill);
    return (Columns){_mm256_blendv_ps(f, x.lo, keep.lo), _mm256_blendv_ps(f, x.hi, keep.hi)};
}
static inline Columns columns_keep(Columns x, long n) {
    Columns keep = lanes_below(n);
    return (Columns){_mm256_and_ps(x.lo, keep.lo), _mm256_and_ps(x.hi, keep.hi)};
}
static inline Columns columns_abs(Columns x) {
    __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return (Columns){_mm256_and_ps(x.lo, magnitude), _mm256_and_ps(x.hi, magnitude)};
}
static inline Columns columns_div(Columns x, Columns y) {
    return (Columns){_mm256_div_ps(x.lo, y.lo), _mm256_div_ps(x.hi, y.hi)};
}
static inline Columns columns_by_sign(Columns x, Columns negative, Columns other) {
    __m256 zero = _mm256_setzero_ps();
    return (Columns){_mm256_blendv_ps(other.lo, negative.lo, _mm256_cmp_ps(x.lo, zero, _CMP_LT_OQ)),
                     _mm256_blendv_ps(other.hi, negative.hi, _mm256_cmp_ps(x.hi, zero, _CMP_LT_OQ))};
}
static inline float columns_sum(Columns x) { return lanes_sum(_mm256_add_ps(x.lo, x.hi)); }
static inline float columns_hmax(Columns x) { return lanes_max(_mm256_max_ps(x.lo, x.hi)); }
static inline Columns columns_exp(Columns x) { return (Columns){exp_nonpositive(x.lo), exp_nonpositive(x.hi)}; }
#endif

/* out[r][c0..c0+16) = scale * sum_{j < n} a[r][j] y[j][c0..] for rows y[j] of ys floats. With the rows of
   a transposed matrix as y this is rows of a times columns of that matrix: S = q k^T, dP = g v^T; with
   the rows of v or k, P v and dS k. */
static inline void rows_times(const float *a[ROWS], const float *y, long ys, long n, long c0, float *out[ROWS],
                              float scale) {
    Columns acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = columns_zero();
    for (long j = 0; j < n; j++) {
        Columns yj = columns_load(y + j * ys + c0);
        for (int r = 0; r < ROWS; r++) acc[r] = columns_fma(a[r][j], yj, acc[r]);
    }
    for (int r = 0; r < ROWS; r++) columns_store(out[r] + c0, acc[r], scale);
}

/* out[r][c0..c0+16) = sum_{i = j0}^{T-1} w[i][j0 + r] y[i][c0..]: columns j0.. of weights kept by blocks (see
   block_width; `w` is the block of row j0, zero above the diagonal, so the rows before j0 add nothing) times
   rows of y. Each row of a later block is at least as wide as the block of j0 needs. */
static inline void columns_by_rows(const float *w, long j0, long T, const float *y, long ys, long c0,
                                   float *out[ROWS]) {
    Columns acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = columns_zero();
    for (long i0 = j0; i0 < T; i0 += ROWS) {
        long width = block_width(i0), end = i0 + block_height(i0, T);
        for (long i = i0; i < end; i++, w += width) {
            Columns yi = columns_load(y + i * ys + c0);
            const float *wi = w + j0;  /* the block's weights side by side in row i */
            for (int r = 0; r < ROWS; r++) acc[r] = columns_fma(wi[r], yi, acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) columns_store(out[r] + c0, acc[r], 1.0f);
}

#ifdef __AVX512F__
/* rows_times and columns_by_rows for 32 columns, two 16-float registers a row: each broadcast feeds two
   multiply-adds, so the blocks stop waiting on loads. Each sum is added in the same order as 16 columns at a
   time would (so the two builds still agree to the bit); the AVX2 build has too few registers for this. */
static inline void rows_times_wide(const float *a[ROWS], const float *y, long ys, long n, long c0,
                                   float *out[ROWS], float scale) {
    __m512 lo[ROWS], hi[ROWS];
    for (int r = 0; r < ROWS; r++) lo[r] = hi[r] = _mm512_setzero_ps();
    for (long j = 0; j < n; j++) {
        __m512 y0 = _mm512_loadu_ps(y + j * ys + c0), y1 = _mm512_loadu_ps(y + j * ys + c0 + 16);
        for (int r = 0; r < ROWS; r++) {
            __m512 b = _mm512_set1_ps(a[r][j]);
            lo[r] = _mm512_fmadd_ps(b, y0, lo[r]);
            hi[r] = _mm512_fmadd_ps(b, y1, hi[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        columns_store(out[r] + c0, lo[r], scale);
        columns_store(out[r] + c0 + 16, hi[r], scale);
    }
}

static inline void columns_by_rows_wide(const float *w, long j0, long T, const float *y, long ys, long c0,
                                        float *out[ROWS]) {
    __m512 lo[ROWS], hi[ROWS];
    for (int r = 0; r < ROWS; r++) lo[r] = hi[r] = _mm512_setzero_ps();
    for (long i0 = j0; i0 < T; i0 += ROWS) {
        long width = block_width(i0), end = i0 + block_height(i0, T);
        for (long i = i0; i < end; i++, w += width) {
            __m512 y0 = _mm512_loadu_ps(y + i * ys + c0), y1 = _mm512_loadu_ps(y + i * ys + c0 + 16);
            const float *wi = w + j0;
            for (int r = 0; r < ROWS; r++) {
                __m512 b = _mm512_set1_ps(wi[r]);
                lo[r] = _mm512_fmadd_ps(b, y0, lo[r]);
                hi[r] = _mm512_fmadd_ps(b, y1, hi[r]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) {
        columns_store(out[r] + c0, lo[r], 1.0f);
        columns_store(out[r] + c0 + 16, hi[r], 1.0f);
    }
}
#define WIDE 32
#else
#define WIDE 0  /* no wide blocks */
#define rows_times_wide rows_times
#define columns_by_rows_wide columns_by_rows
#endif

/* rows_times for the columns c0 .. c1 (multiples of 16): 32 at a time where they fit and the build has it */
static inline void rows_times_span(const float *a[ROWS], const float *y, long ys, long n, long c0, long c1,
                                   float *out[ROWS], float scale) {
    for (; WIDE && c0 + 32 <= c1; c0 += 32) rows_times_wide(a, y, ys, n, c0, out, scale);
    for (; c0 < c1; c0 += 16) rows_times(a, y, ys, n, c0, out, scale);
}

static inline void columns_by_rows_span(const float *w, long j0, long T, const float *y, long ys, long c1,
                                        float *out[ROWS]) {
    long c0 = 0;
    for (; WIDE && c0 + 32 <= c1; c0 += 32) columns_by_rows_wide(w, j0, T, y, ys, c0, out);
    for (; c0 < c1; c0 += 16) columns_by_rows(w, j0, T, y, ys, c0, out);
}

static const float NO_BIAS[16];  /* zeros, for a head without a bias */

/* the 8 x 8 floats at x (rows xs apart) plus bias[0..8) on every row, transposed into xt (rows ld apart) */
static inline void transpose8(const float *x, long xs, const float *bias, float *xt, long ld) {
    __m256 r[8], t[8], u[8], b = _mm256_loadu_ps(bias);
    for (int i = 0; i < 8; i++) r[i] = _mm256_add_ps(_mm256_loadu_ps(x + i * xs), b);
    for (int i = 0; i < 8; i += 2) {  /* pairs of rows interleaved */
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {  /* then pairs of pairs: each 128-bit half holds a column's 4 floats */
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {  /* halves from rows 0-3 and 4-7 joined */
        _mm256_storeu_ps(xt + i * ld, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(xt + (i + 4) * ld, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}

/* xt (D rows of ld floats) = (x + bias)^T for the T rows of x (stride xs) and the D floats of bias (NULL:
   none), zero past T; D a multiple of 8 */
static void transpose(const float *x, long xs, const float *bias, long T, long D, float *xt, long ld) {
    long t0 = 0;
    for (long d = 0; d < D; d++) memset(xt + d * ld + T, 0, (ld - T) * sizeof(float));
    for (; t0 + 8 <= T; t0 += 8)
        for (long d0 = 0; d0 < D; d0 += 8)
            transpose8(x + t0 * xs + d0, xs, bias ? bias + d0 : NO_BIAS, xt + d0 * ld + t0, ld);
    for (long t = t0; t < T; t++)
        for (long d = 0; d < D; d++) xt[d * ld + t] = x[t * xs + d] + (bias ? bias[d] : 0.0f);
}

/* a head's T rows of D floats (stride xs), plus the D floats of bias (NULL: none), copied next to each
   other, so the products read them as one stream */
static const float *packed(const float *x, long xs, const float *bias, long T, long D, float *to) {
    for (long t = 0; t < T; t++) {
        if (!bias) {
            memcpy(to + t * D, x + t * xs, D * sizeof(float));
            continue;
        }
        for (long d = 0; d < D; d += 16)
            columns_put(to + t * D + d, columns_add(columns_load(x + t * xs + d), columns_load(bias + d)));
    }
    return to;
}

/* asks the cache for rows r0 .. r1-1 (of D floats, xs apart) of the next head that this thread takes, block by
   block while the current head is computed, so that gathering the next head does not wait on memory (the
   heads' rows are strided in qkv and far apart) */
static inline void prefetch_rows(const float *x, long xs, long r0, long r1, long D) {
    for (long r = r0; r < r1; r++)
        for (long d = 0; d < D; d += 16) _mm_prefetch((const char *)(x + r * xs + d), _MM_HINT_T1);
}

/* head h's D floats of one of q's, k's or v's (`part` 0, 1, 2) biases, laid out as qkv's are; NULL for none */
static inline const float *head_bias(const float *bias, long part, long H, long h, long D) {
    return bias ? bias + (part * H + h) * D : NULL;
}

/* the rows i0 .. i0+ROWS-1 of a head's matrix, rows of `stride` floats with row `first` at `base`, or `spare`
   past T for outputs and the last row again for inputs, so a block always has ROWS rows */
static inline void block_rows(const float *base, long stride, long first, long i0, long T, const float *in[ROWS]) {
    for (int r = 0; r < ROWS; r++) in[r] = base + ((i0 + r < T ? i0 + r : T - 1) - first) * stride;
}

static inline void block_outputs(float *base, long stride, long first, long i0, long T, float *spare,
                                 float *out[ROWS]) {
    for (int r = 0; r < ROWS; r++) out[r] = i0 + r < T ? base + (i0 + r - first) * stride : spare;
}

/* p[0..ld) = softmax(p[0..n)), zero from n on; the entries from n to the next multiple of 16 must be there
   (finite or not: they are masked). The sum runs over 16 lanes in both builds, so they agree to the bit. */
static void softmax_row(float *p, long n, long ld) {
    long j = 0, n16 = (n + 15) & ~15L;
    Columns top = columns_set1(-INFINITY), other = top, total = columns_zero();
    for (; j + 32 <= n; j += 32) {
        top = columns_max(top, columns_load(p + j));
        other = columns_max(other, columns_load(p + j + 16));
    }
    for (; j < n; j += 16) top = columns_max(top, columns_fill(columns_load(p + j), n - j, -INFINITY));
    Columns m = columns_set1(columns_hmax(columns_max(top, other)));
    for (j = 0; j < n16; j += 16) {
        Columns e = columns_keep(columns_exp(columns_sub(columns_load(p + j), m)), n - j);
        total = columns_add(total, e);
        columns_put(p + j, e);
    }
    Columns inverse = columns_set1(1.0f / columns_sum(total));
    for (j = 0; j < n16; j += 16) columns_put(p + j, columns_mul(columns_load(p + j), inverse));
    memset(p + n16, 0, (ld - n16) * sizeof(float));
}

void lm_causal_forward(const float *q, const float *k, const float *v, const float *bias, float *out, float *probs,
                       float *scratch,
                       long B, long H, long T, long D, long q_sb, long q_sh, long q_st, long k_sb, long k_sh,
                       long k_st, long v_sb, long v_sh, long v_st, long o_sb, long o_sh, long o_st, float scale,
                       int threads) {
    long ld = lm_causal_stride(T), per_head = lm_causal_probs(T);
    #pragma omp parallel num_threads(threads)
    {
        unsigned saved = tiny_as_zero();
        float *kt = scratch + omp_get_thread_num() * lm_causal_scratch(T, D, 0), *qp = kt + D * ld, *vp = qp + T * D;
        float *spare = vp + T * D;
        #pragma omp for schedule(static)
        for (long bh = 0; bh < B * H; bh++) {
            long b = bh / H, h = bh % H;
            const float *qh = packed(q + b * q_sb + h * q_sh, q_st, head_bias(bias, 0, H, h, D), T, D, qp);
            const float *vh = packed(v + b * v_sb + h * v_sh, v_st, head_bias(bias, 2, H, h, D), T, D, vp);
            float *oh = out + b * o_sb + h * o_sh, *P = probs + bh * per_head;
            transpose(k + b * k_sb + h * k_sh, k_st, head_bias(bias, 1, H, h, D), T, D, kt, ld);
            long nb = (bh + 1) / H, nh = (bh + 1) % H, more = bh + 1 < B * H;  /* the next head */
            for (long i0 = 0; i0 < T; P += block_height(i0, T) * block_width(i0), i0 += ROWS) {
                long last = i0 + block_height(i0, T) - 1, width = block_width(i0);  /* P: this block's rows */
                const float *in[ROWS];
                float *rows[ROWS];
                if (more) {
                    prefetch_rows(q + nb * q_sb + nh * q_sh, q_st, i0, last + 1, D);
                    prefetch_rows(k + nb * k_sb + nh * k_sh, k_st, i0, last + 1, D);
                    prefetch_rows(v + nb * v_sb + nh * v_sh, v_st, i0, last + 1, D);
                }
                block_rows(qh, D, 0, i0, T, in);
                block_outputs(P, width, i0, i0, T, spare, rows);
                rows_times_span(in, kt, ld, D, 0, width, rows, scale);  /* up to the diagonal */
                for (long i = i0; i <= last; i++) softmax_row(P + (i - i0) * width, i + 1, width);
                block_rows(P, width, i0, i0, T, in);
                block_outputs(oh, o_st, 0, i0, T, spare, rows);
                rows_times_span(in, vh, D, last + 1, 0, D, rows, 1.0f);
            }
        }
        restore_tiny(saved);
    }
}

/* the sums over t of a head's T rows of D floats (stride xs), in order, into sums[0..D) */
static void column_sums(const float *x, long xs, long T, long D, float *sums) {
    for (long d = 0; d < D; d += 16) {
        Columns total = columns_zero();
        for (long t = 0; t < T; t++) total = columns_add(total, columns_load(x + t * xs + d));
        columns_put(sums + d, total);
    }
}

/* dbias (NULL: none wanted), 3 H D floats laid out as `bias` is, gets the gradient of q's, k's and v's biases:
   each head's column sums of dq, dk and dv, summed over the batch in order (`partial`: 3 B H D floats) */
void lm_causal_backward(const float *q, const float *k, const float *v, const float *bias, const float *probs,
                        const float *g,
                        float *dq, float *dk, float *dv, float *dbias, float *partial, float *scratch,
                        long B, long H, long T, long D,
                        long q_sb, long q_sh, long q_st, long k_sb, long k_sh, long k_st, long v_sb, long v_sh,
                        long v_st, long g_sb, long g_sh, long g_st, long d_sb, long d_sh, long d_st,
                        float scale, int threads) {
    long ld = lm_causal_stride(T), per_head = lm_causal_probs(T);
    #pragma omp parallel num_threads(threads)
    {
        unsigned saved = tiny_as_zero();
        float *vt = scratch + omp_get_thread_num() * lm_causal_scratch(T, D, 1), *dS = vt + D * ld;
        float *qp = dS + per_head, *kp = qp + T * D, *gp = kp + T * D, *spare = gp + T * D;
        #pragma omp for schedule(static)
        for (long bh = 0; bh < B * H; bh++) {
            long b = bh / H, h = bh % H;
            const float *qh = packed(q + b * q_sb + h * q_sh, q_st, head_bias(bias, 0, H, h, D), T, D, qp);
            const float *kh = packed(k + b * k_sb + h * k_sh, k_st, head_bias(bias, 1, H, h, D), T, D, kp);
            const float *gh = packed(g + b * g_sb + h * g_sh, g_st, NULL, T, D, gp), *P = probs + bh * per_head;
            float *dqh = dq + b * d_sb + h * d_sh, *dkh = dk + b * d_sb + h * d_sh, *dvh = dv + b * d_sb + h * d_sh;
            transpose(v + b * v_sb + h * v_sh, v_st, head_bias(bias, 2, H, h, D), T, D, vt, ld);
            long nb = (bh + 1) / H, nh = (bh + 1) % H, more = bh + 1 < B * H;  /* the next head */
            for (long i0 = 0, at = 0; i0 < T; at += block_height(i0, T) * block_width(i0), i0 += ROWS) {
                long last = i0 + block_height(i0, T) - 1, width = block_width(i0);  /* dS, block by block */
                const float *in[ROWS];
                float *rows[ROWS];
                if (more) {
                    prefetch_rows(q + nb * q_sb + nh * q_sh, q_st, i0, last + 1, D);
                    prefetch_rows(k + nb * k_sb + nh * k_sh, k_st, i0, last + 1, D);
                    prefetch_rows(v + nb * v_sb + nh * v_sh, v_st, i0, last + 1, D);
                    prefetch_rows(g + nb * g_sb + nh * g_sh, g_st, i0, last + 1, D);
                }
                block_rows(gh, D, 0, i0, T, in);
                block_outputs(dS + at, width, i0, i0, T, spare, rows);
                rows_times_span(in, vt, ld, D, 0, width, rows, 1.0f);
                for (long i = i0; i <= last; i++) {
                    float *s = dS + at + (i - i0) * width;
                    const float *p = P + at + (i - i0) * width;
                    long n16 = (i + 16) & ~15L;  /* P is zero from i + 1 on; dS was computed up to here */
                    Columns acc = columns_zero();
                    for (long j = 0; j < n16; j += 16) acc = columns_fmav(columns_load(p + j), columns_load(s + j), acc);
                    Columns dot = columns_set1(columns_sum(acc)), sc = columns_set1(scale);
                    for (long j = 0; j < n16; j += 16)
                        columns_put(s + j, columns_mul(columns_mul(columns_load(p + j), sc),
                                                       columns_sub(columns_load(s + j), dot)));
                    memset(s + n16, 0, (width - n16) * sizeof(float));
                }
            }
            for (long i0 = 0, at = 0; i0 < T; at += block_height(i0, T) * block_width(i0), i0 += ROWS) {
                long last = i0 + block_height(i0, T) - 1;
                const float *in[ROWS];
                float *q_rows[ROWS], *k_rows[ROWS], *v_rows[ROWS];
                block_rows(dS + at, block_width(i0), i0, i0, T, in);
                block_outputs(dqh, d_st, 0, i0, T, spare, q_rows);
                block_outputs(dkh, d_st, 0, i0, T, spare, k_rows);
                block_outputs(dvh, d_st, 0, i0, T, spare, v_rows);
                rows_times_span(in, kh, D, last + 1, 0, D, q_rows, 1.0f);  /* dq = dS k */
                columns_by_rows_span(dS + at, i0, T, qh, D, D, k_rows);     /* dk = dS^T q */
                columns_by_rows_span(P + at, i0, T, gh, D, D, v_rows);      /* dv = P^T g */
            }
            if (dbias) {  /* this head's rows, just written, are still in the cache */
                float *sums = partial + bh * 3 * D;
                column_sums(dqh, d_st, T, D, sums);
                column_sums(dkh, d_st, T, D, sums + D);
                column_sums(dvh, d_st, T, D, sums + 2 * D);
            }
        }
        if (dbias) {
            #pragma omp for schedule(static)
            for (long hd = 0; hd < 3 * H * D; hd += 16) {  /* (part, head, column), as qkv's bias is laid out */
                long part = hd / (H * D), h = hd / D % H, d = hd % D;
                Columns total = columns_zero();
                for (long b = 0; b < B; b++)
                    total = columns_add(total, columns_load(partial + ((b * H + h) * 3 + part) * D + d));
                columns_put(dbias + hd, total);
            }
        }
        restore_tiny(saved);
    }
}



/* ---- the MLP's bias and exact GELU, GELU(x) = x Phi(x), for x = h + b with h = input W^T ----------------
   Forward writes GELU(h + b); backward writes dh = g GELU'(h + b), GELU'(x) = Phi(x) + x phi(x), and the
   bias's gradient, the column sums of dh, in the same pass: each chunk of GELU_ROWS rows is summed in order
   into its row of `partial` (lm_bias_gelu_scratch(N, F) floats), then the chunks in order, so the sums do
   not depend on the number of threads. Rows of F floats, F a multiple of 16.

   Phi, the standard normal's distribution function, from the tail Q(x) = P(N(0, 1) > |x|) = erfc(z) / 2,
   z = |x| / sqrt 2: Phi(x) = Q for x < 0 and 1 - Q for x >= 0, with erfc(z) = t (a1 + t (a2 + t (a3 + t (a4 +
   t a5)))) e^(-z^2), t = 1 / (1 + p z), Abramowitz and Stegun's formula 7.1.26 (within 1.5e-7 of erf, the
   approximation PyTorch's vectorised erf uses too). e^(-z^2) = e^(-x^2 / 2) also gives the density phi. */
#define GELU_ROWS 64
#define ROW_AHEAD 1  /* rows: the memory of the row after next is asked for while this one is computed */

static inline void normal_parts(Columns x, Columns *cdf, Columns *pdf) {
    Columns z = columns_abs(columns_mul(x, columns_set1(0.70710678118654752f)));
    Columns t = columns_div(columns_set1(1.0f), columns_fmav(columns_set1(ERF_P), z, columns_set1(1.0f)));
    Columns poly = columns_set1(ERF_TERMS[0]);
    for (int i = 1; i < 5; i++) poly = columns_fmav(poly, t, columns_set1(ERF_TERMS[i]));
    Columns e = columns_exp(columns_mul(columns_sub(columns_zero(), z), z));
    Columns tail = columns_mul(columns_mul(columns_set1(0.5f), columns_mul(poly, t)), e);
    *cdf = columns_by_sign(x, tail, columns_sub(columns_set1(1.0f), tail));
    *pdf = columns_mul(e, columns_set1(0.39894228040143268f));  /* 1 / sqrt(2 pi) */
}

void lm_bias_gelu_forward(const float *h, const float *b, float *y, long N, long F, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        unsigned saved = tiny_as_zero();
        #pragma omp for schedule(static)
        for (long n = 0; n < N; n++)
            for (long c = 0; c < F; c += 16) {
                _mm_prefetch((const char *)(h + (n + ROW_AHEAD) * F + c), _MM_HINT_T0);
                Columns x = columns_add(columns_load(h + n * F + c), columns_load(b + c)), cdf, pdf;
                normal_parts(x, &cdf, &pdf);
                columns_put(y + n * F + c, columns_mul(x, cdf));
            }
        restore_tiny(saved);
    }
}

/* out[0..C) = the sums of the `chunks` rows of C floats at `partial`, in order (the same numbers for any thread
   count). Called by every thread of a parallel region: the columns are shared among them. */
static void chunks_summed(const float *partial, long chunks, long C, float *out) {
    #pragma omp for schedule(static)
    for (long c = 0; c < C; c += 16) {
        Columns total = columns_load(partial + c);
        for (long k = 1; k < chunks; k++) total = columns_add(total, columns_load(partial + k * C + c));
        columns_put(out + c, total);
    }
}

long lm_bias_gelu_scratch(long N, long F) { return (N + GELU_ROWS - 1) / GELU_ROWS * F; }

void lm_bias_gelu_backward(const float *h, const float *b, const float *g, float *dh, float *db, float *partial,
                           long N, long F, int threads) {
    long chunks = (N + GELU_ROWS - 1) / GELU_ROWS;
    #pragma omp parallel num_threads(threads)
    {
        unsigned saved = tiny_as_zero();
        #pragma omp for schedule(static)
        for (long k = 0; k < chunks; k++) {
            float *sums = partial + k * F;
            long end = (k + 1) * GELU_ROWS < N ? (k + 1) * GELU_ROWS : N;
            for (long c = 0; c < F; c += 16) columns_put(sums + c, columns_zero());
            for (long n = k * GELU_ROWS; n < end; n++)
                for (long c = 0; c < F; c += 16) {
                    _mm_prefetch((const char *)(h + (n + ROW_AHEAD) * F + c), _MM_HINT_T0);
                    _mm_prefetch((const char *)(g + (n + ROW_AHEAD) * F + c), _MM_HINT_T0);
                    Columns x = columns_add(columns_load(h + n * F + c), columns_load(b + c)), cdf, pdf;
                    normal_parts(x, &cdf, &pdf);
                    Columns d = columns_mul(columns_load(g + n * F + c), columns_fmav(x, pdf, cdf));
                    columns_put(dh + n * F + c, d);
                    columns_put(sums + c, columns_add(columns_load(sums + c), d));
                }
        }
        chunks_summed(partial, chunks, F, db);
        restore_tiny(saved);
    }
}


/* ---- a residual connection with the sublayer's output bias, y = x + (h + b), into h (lm_bias_residual) --------
   h is the output projection's product without its bias (rows of C floats, C a multiple of 16); the sum is
   rounded as torch's would be (the bias added to the product, then that to the residual x), in one pass where
   torch's linear broadcasts the bias into its output and the residual sum makes a pass of its own. */
void lm_bias_residual(const float *x, float *h, const float *b, long N, long C, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = 0; n < N; n++)
        for (long c = 0; c < C; c += 16) {
            _mm_prefetch((const char *)(x + (n + ROW_AHEAD) * C + c), _MM_HINT_T0);
            _mm_prefetch((const char *)(h + (n + ROW_AHEAD) * C + c), _MM_HINT_T0);
            Columns sum = columns_add(columns_load(h + n * C + c), columns_load(b + c));
            columns_put(h + n * C + c, columns_add(columns_load(x + n * C + c), sum));
        }
}


/* ---- RMSNorm, y = x r w with r = 1 / sqrt(mean(x^2) + eps) per row (lm_rms_norm_*) --------------------
   Forward writes y and each row's r (kept for backward). Backward writes dx = r (g w - x^ mean(g w x^)), with
   x^ = x r, and w's gradient, the column sums of g x^, by chunks of NORM_ROWS rows in order and then the
   chunks in order, as the bias-GELU sums its bias's. `w` NULL: no weight (ones), and no gradient for it. The
   rows are read once forward and twice backward, from the cache the second time; torch's written-out RMSNorm
   makes about ten passes. Rows of C floats, C a multiple of 16. */
#define NORM_ROWS 64
#define NORM_AHEAD 2  /* rows: the memory of the row NORM_AHEAD on is asked for while this one is computed */

static inline Columns scaled_by(const float *w, long d, Columns x) {
    return w ? columns_mul(x, columns_load(w + d)) : x;
}

void lm_rms_norm_forward(const float *x, const float *w, float *y, float *rstd, long N, long C, float eps,
                         int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = 0; n < N; n++) {
        const float *row = x + n * C;
        if (n + NORM_AHEAD < N) prefetch_rows(x, C, n + NORM_AHEAD, n + NORM_AHEAD + 1, C);
        Columns squares = columns_zero();
        for (long d = 0; d < C; d += 16) squares = columns_fmav(columns_load(row + d), columns_load(row + d), squares);
        float r = 1.0f / sqrtf(columns_sum(squares) / (float)C + eps);
        Columns rv = columns_set1(r);
        for (long d = 0; d < C; d += 16)
            columns_put(y + n * C + d, scaled_by(w, d, columns_mul(columns_load(row + d), rv)));
        rstd[n] = r;
    }
}

long lm_rms_norm_scratch(long N, long C) { return (N + NORM_ROWS - 1) / NORM_ROWS * C; }

void lm_rms_norm_backward(const float *x, const float *w, const float *rstd, const float *g, float *dx, float *dw,
                          float *partial, long N, long C, int threads) {
    long chunks = (N + NORM_ROWS - 1) / NORM_ROWS;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (long k = 0; k < chunks; k++) {
            float *sums = partial + k * C;
            long end = (k + 1) * NORM_ROWS < N ? (k + 1) * NORM_ROWS : N;
            for (long d = 0; w && d < C; d += 16) columns_put(sums + d, columns_zero());
            for (long n = k * NORM_ROWS; n < end; n++) {
                const float *row = x + n * C, *grad = g + n * C;
                if (n + NORM_AHEAD < N) {
                    prefetch_rows(x, C, n + NORM_AHEAD, n + NORM_AHEAD + 1, C);
                    prefetch_rows(g, C, n + NORM_AHEAD, n + NORM_AHEAD + 1, C);
                }
                Columns rv = columns_set1(rstd[n]), dot = columns_zero();
                for (long d = 0; d < C; d += 16) {
                    Columns xhat = columns_mul(columns_load(row + d), rv), gd = columns_load(grad + d);
                    dot = columns_fmav(scaled_by(w, d, gd), xhat, dot);
                    if (w) columns_put(sums + d, columns_fmav(gd, xhat, columns_load(sums + d)));
                }
                Columns mean = columns_set1(columns_sum(dot) / (float)C);
                for (long d = 0; d < C; d += 16) {
                    Columns xhat = columns_mul(columns_load(row + d), rv);
                    Columns gw = scaled_by(w, d, columns_load(grad + d));
                    columns_put(dx + n * C + d, columns_mul(rv, columns_sub(gw, columns_mul(xhat, mean))));
                }
            }
        }
        chunks_summed(partial, chunks, w ? C : 0, dw);
    }
}


/* ---- SwiGLU's gate, y = SiLU(a) b = a s(a) b with the logistic s(a) = 1 / (1 + e^-a) (lm_silu_gate_*) ------
   Backward: da = g b s(a) (1 + a (1 - s(a))), db = g a s(a). s(a) from e = e^-|a| (exp_nonpositive's range):
   1 / (1 + e) for a >= 0, e / (1 + e) below. One pass each way over a, b (and g), where torch's silu, product
   and their backward make five and keep SiLU(a) as well. Rows of F floats, F a multiple of 16. */
static inline Columns logistic(Columns a) {
    Columns e = columns_exp(columns_sub(columns_zero(), columns_abs(a)));
    Columns s = columns_div(columns_set1(1.0f), columns_add(columns_set1(1.0f), e));
    return columns_by_sign(a, columns_mul(e, s), s);
}

void lm_silu_gate_forward(const float *a, const float *b, float *y, long N, long F, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        unsigned saved = tiny_as_zero();
        #pragma omp for schedule(static)
        for (long n = 0; n < N; n++)
            for (long c = 0; c < F; c += 16) {
                _mm_prefetch((const char *)(a + (n + ROW_AHEAD) * F + c), _MM_HINT_T0);
                _mm_prefetch((const char *)(b + (n + ROW_AHEAD) * F + c), _MM_HINT_T0);
                Columns x = columns_load(a + n * F + c);
                columns_put(y + n * F + c, columns_mul(columns_mul(x, logistic(x)), columns_load(b + n * F + c)));
            }
        restore_tiny(saved);
    }
}

void lm_silu_gate_backward(const float *a, const float *b, const float *g, float *da, float *db, long N, long F,
                           int threads) {
    #pragma omp parallel num_threads(threads)
    {
        unsigned saved = tiny_as_zero();
        #pragma omp for schedule(static)
        for (long n = 0; n < N; n++)
            for (long c = 0; c < F; c += 16) {
                _mm_prefetch((const char *)(a + (n + ROW_AHEAD) * F + c), _MM_HINT_T0);
                _mm_prefetch((const char *)(b + (n + ROW_AHEAD) * F + c), _MM_HINT_T0);
                _mm_prefetch((const char *)(g + (n + ROW_AHEAD) * F + c), _MM_HINT_T0);
                Columns x = columns_load(a + n * F + c), s = logistic(x), gd = columns_load(g + n * F + c);
                Columns one = columns_set1(1.0f), silu = columns_mul(x, s);
                columns_put(db + n * F + c, columns_mul(gd, silu));
                Columns slope = columns_mul(s, columns_fmav(x, columns_sub(one, s), one));  /* SiLU'(a) */
                columns_put(da + n * F + c, columns_mul(columns_mul(gd, columns_load(b + n * F + c)), slope));
            }
        restore_tiny(saved);
    }
}


/* ---- RoPE, y = x cos + rotate_half(x) sin with rotate_half(x) = (-x[h:], x[:h]), h = D / 2 (lm_rope) ---------
   For the B x H x T rows of D floats of x (strides sb, sh, st in floats, D contiguous), cos and sin (T, D), into y,
   contiguous (B, H, T, D). `transposed` gives backward's y = x cos + rotate_half^T(x sin), rotate_half^T(u) =
   (u[h:], -u[:h]). Each product is rounded, then the two added, as torch's written-out rotation does (no fused
   multiply-add): the same bits. One pass where torch's makes five (and as many backward). D a multiple of 32. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))  /* gcc would fuse a product and a sum into one rounding */
#else
#pragma STDC FP_CONTRACT OFF
#endif
void lm_rope(const float *x, const float *c, const float *s, float *y, long B, long H, long T, long D, long sb,
             long sh, long st, int transposed, int threads) {
    long h = D / 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < B * H * T; row++) {
        long b = row / (H * T), head = row / T % H, t = row % T;
        const float *in = x + b * sb + head * sh + t * st, *ct = c + t * D, *st_ = s + t * D;
        float *out = y + row * D;
        for (long d = 0; d < h; d += 16) {
            Columns lo = columns_load(in + d), hi = columns_load(in + h + d);
            Columns lo_c = columns_mul(lo, columns_load(ct + d)), hi_c = columns_mul(hi, columns_load(ct + h + d));
            if (transposed) {  /* (x cos)[:h] + (x sin)[h:], (x cos)[h:] - (x sin)[:h] */
                columns_put(out + d, columns_add(lo_c, columns_mul(hi, columns_load(st_ + h + d))));
                columns_put(out + h + d, columns_sub(hi_c, columns_mul(lo, columns_load(st_ + d))));
            } else {  /* x[:h] cos - x[h:] sin, x[h:] cos + x[:h] sin */
                columns_put(out + d, columns_sub(lo_c, columns_mul(hi, columns_load(st_ + d))));
                columns_put(out + h + d, columns_add(hi_c, columns_mul(lo, columns_load(st_ + h + d))));
            }
        }
    }
}
