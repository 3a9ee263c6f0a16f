/* lm's CPU kernels for training causal attention in float32: softmax(q k^T / sqrt(D) + causal mask) v
   forward, keeping the probabilities P, and its backward from them. Built by lm.cpu_kernels with the
   system's C compiler (-O3 -mavx2 -mfma -fopenmp, and -mavx512f where the CPU has AVX-512) and loaded
   with ctypes.

   torch's CPU flash kernel walks the keys in blocks and recomputes the probabilities in backward; at
   the book's training sizes (T = 256, D = 64) it reaches a third of what the multiply-adds allow. Here
   each (batch, head) is one job on one thread, T x T at a time, in four kinds of small products, each
   a block of 6 rows x 16 columns held in twelve 8-float registers (AVX2 + FMA), or with AVX-512 8 rows x
   16 columns in eight 16-float registers (about 1.2 times as fast there):

     forward:   S = q k^T scale (upper triangle skipped)   P = softmax(S) by rows   out = P v
     backward:  dP = g v^T   dS = P (dP - rowsum(P dP)) scale   dq = dS k   dk = dS^T q   dv = P^T g

   Only blocks touching the lower triangle are computed, and P and dS are zero above the diagonal,
   so products over them may run past it. P is kept in rows of lm_causal_stride(T) floats (T rounded
   up, so a block never reads past a row). Strides are in floats, D contiguous; D a multiple of 16.
   Every output is summed by one thread in a fixed order: the result does not depend on the number
   of threads. Each thread gets lm_causal_scratch(T, D, backward) floats of `scratch`. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#ifdef __AVX512F__
#define ROWS 8   /* eight 16-float sums (12 rows spill the row pointers: slower) */
#else
#define ROWS 6   /* twelve 8-float sums */
#endif

long lm_causal_stride(long T) { return (T + ROWS - 1 + 15) / 16 * 16; }

long lm_causal_scratch(long T, long D, int backward) {
    long ld = lm_causal_stride(T);
    return D * ld + (backward ? T * ld + 3 * T * D : 2 * T * D) + (ld > D ? ld : D);
}

/* e^x for x <= 0 to about 2 float ulps: x = n ln 2 + r, |r| <= ln(2) / 2, e^r by a degree-7 polynomial
   (Taylor's coefficients, slightly adjusted), 2^n put straight into the exponent bits. Below -87 the
   result is e^-87 (still a normal float) rather than a smaller one; a NaN stays NaN. */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
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

/* out[r][c0..c0+16) = sum_{i = j0}^{T-1} w[i][j0 + r] y[i][c0..]: columns j0.. of weights (rows of ld floats,
   zero above the diagonal, so the rows before j0 add nothing) times rows of y */
static inline void columns_by_rows(const float *w, long ld, long j0, long T, const float *y, long ys, long c0,
                                   float *out[ROWS]) {
    Columns acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = columns_zero();
    for (long i = j0; i < T; i++) {
        Columns yi = columns_load(y + i * ys + c0);
        const float *wi = w + i * ld + j0;  /* the block's weights side by side in row i */
        for (int r = 0; r < ROWS; r++) acc[r] = columns_fma(wi[r], yi, acc[r]);
    }
    for (int r = 0; r < ROWS; r++) columns_store(out[r] + c0, acc[r], 1.0f);
}

/* xt (D rows of ld floats) = x^T for the T rows of x (stride xs), zero past T */
static void transpose(const float *x, long xs, long T, long D, float *xt, long ld) {
    for (long d = 0; d < D; d++) memset(xt + d * ld + T, 0, (ld - T) * sizeof(float));
    for (long t = 0; t < T; t++)
        for (long d = 0; d < D; d++) xt[d * ld + t] = x[t * xs + d];
}

/* a head's T rows of D floats (stride xs) copied next to each other, so the products read them as one stream */
static const float *packed(const float *x, long xs, long T, long D, float *to) {
    for (long t = 0; t < T; t++) memcpy(to + t * D, x + t * xs, D * sizeof(float));
    return to;
}

/* the rows i0 .. i0+5 of a head's matrix (rows of `stride` floats from `base`), or `spare` past T for
   outputs and the last row again for inputs, so a block always has 6 rows */
static inline void block_rows(const float *base, long stride, long i0, long T, const float *in[ROWS]) {
    for (int r = 0; r < ROWS; r++) in[r] = base + (i0 + r < T ? i0 + r : T - 1) * stride;
}

static inline void block_outputs(float *base, long stride, long i0, long T, float *spare, float *out[ROWS]) {
    for (int r = 0; r < ROWS; r++) out[r] = i0 + r < T ? base + (i0 + r) * stride : spare;
}

/* p[0..ld) = softmax(p[0..n)), zero from n on; the entries from n to the next multiple of 8 must be finite
   or not, they are masked */
static void softmax_row(float *p, long n, long ld) {
    long j = 0, n8 = (n + 7) & ~7L;
    __m256 top = _mm256_set1_ps(-INFINITY), total = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(p + j));
    float m = lanes_max(top);
    for (; j < n; j++) m = (p[j] > m || p[j] != p[j]) ? p[j] : m;
    __m256 mv = _mm256_set1_ps(m), lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    for (j = 0; j < n8; j += 8) {
        __m256 keep = _mm256_cmp_ps(lane, _mm256_set1_ps((float)(n - j)), _CMP_LT_OQ);
        __m256 e = _mm256_and_ps(exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv)), keep);
        total = _mm256_add_ps(total, e);
        _mm256_storeu_ps(p + j, e);
    }
    __m256 inverse = _mm256_set1_ps(1.0f / lanes_sum(total));
    for (j = 0; j < n8; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), inverse));
    memset(p + n8, 0, (ld - n8) * sizeof(float));
}

void lm_causal_forward(const float *q, const float *k, const float *v, float *out, float *probs, float *scratch,
                       long B, long H, long T, long D, long q_sb, long q_sh, long q_st, long k_sb, long k_sh,
                       long k_st, long v_sb, long v_sh, long v_st, long o_sb, long o_sh, long o_st, float scale,
                       int threads) {
    long ld = lm_causal_stride(T);
    #pragma omp parallel num_threads(threads)
    {
        float *kt = scratch + omp_get_thread_num() * lm_causal_scratch(T, D, 0), *qp = kt + D * ld, *vp = qp + T * D;
        float *spare = vp + T * D;
        #pragma omp for schedule(static)
        for (long bh = 0; bh < B * H; bh++) {
            long b = bh / H, h = bh % H;
            const float *qh = packed(q + b * q_sb + h * q_sh, q_st, T, D, qp);
            const float *vh = packed(v + b * v_sb + h * v_sh, v_st, T, D, vp);
            float *oh = out + b * o_sb + h * o_sh, *P = probs + bh * T * ld;
            transpose(k + b * k_sb + h * k_sh, k_st, T, D, kt, ld);
            for (long i0 = 0; i0 < T; i0 += ROWS) {
                long last = i0 + ROWS - 1 < T ? i0 + ROWS - 1 : T - 1;  /* the block's last real row */
                const float *in[ROWS];
                float *rows[ROWS];
                block_rows(qh, D, i0, T, in);
                block_outputs(P, ld, i0, T, spare, rows);
                for (long j0 = 0; j0 <= last; j0 += 16) rows_times(in, kt, ld, D, j0, rows, scale);
                for (long i = i0; i <= last; i++) softmax_row(P + i * ld, i + 1, ld);
                block_rows(P, ld, i0, T, in);
                block_outputs(oh, o_st, i0, T, spare, rows);
                for (long c0 = 0; c0 < D; c0 += 16) rows_times(in, vh, D, last + 1, c0, rows, 1.0f);
            }
        }
    }
}

void lm_causal_backward(const float *q, const float *k, const float *v, const float *probs, const float *g,
                        float *dq, float *dk, float *dv, float *scratch, long B, long H, long T, long D,
                        long q_sb, long q_sh, long q_st, long k_sb, long k_sh, long k_st, long v_sb, long v_sh,
                        long v_st, long g_sb, long g_sh, long g_st, long d_sb, long d_sh, long d_st,
                        float scale, int threads) {
    long ld = lm_causal_stride(T);
    #pragma omp parallel num_threads(threads)
    {
        float *vt = scratch + omp_get_thread_num() * lm_causal_scratch(T, D, 1), *dS = vt + D * ld;
        float *qp = dS + T * ld, *kp = qp + T * D, *gp = kp + T * D, *spare = gp + T * D;
        #pragma omp for schedule(static)
        for (long bh = 0; bh < B * H; bh++) {
            long b = bh / H, h = bh % H;
            const float *qh = packed(q + b * q_sb + h * q_sh, q_st, T, D, qp);
            const float *kh = packed(k + b * k_sb + h * k_sh, k_st, T, D, kp);
            const float *gh = packed(g + b * g_sb + h * g_sh, g_st, T, D, gp), *P = probs + bh * T * ld;
            float *dqh = dq + b * d_sb + h * d_sh, *dkh = dk + b * d_sb + h * d_sh, *dvh = dv + b * d_sb + h * d_sh;
            transpose(v + b * v_sb + h * v_sh, v_st, T, D, vt, ld);
            for (long i0 = 0; i0 < T; i0 += ROWS) {  /* dS, a block of rows at a time */
                long last = i0 + ROWS - 1 < T ? i0 + ROWS - 1 : T - 1;
                const float *in[ROWS];
                float *rows[ROWS];
                block_rows(gh, D, i0, T, in);
                block_outputs(dS, ld, i0, T, spare, rows);
                for (long j0 = 0; j0 <= last; j0 += 16) rows_times(in, vt, ld, D, j0, rows, 1.0f);
                for (long i = i0; i <= last; i++) {
                    float *s = dS + i * ld;
                    const float *p = P + i * ld;
                    long n8 = (i + 8) & ~7L;  /* P is zero from i + 1 on */
                    __m256 acc = _mm256_setzero_ps();
                    for (long j = 0; j < n8; j += 8)
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(s + j), acc);
                    __m256 dot = _mm256_set1_ps(lanes_sum(acc)), sc = _mm256_set1_ps(scale);
                    for (long j = 0; j < n8; j += 8)
                        _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(p + j), sc),
                                                              _mm256_sub_ps(_mm256_loadu_ps(s + j), dot)));
                    memset(s + n8, 0, (ld - n8) * sizeof(float));
                }
            }
            for (long i0 = 0; i0 < T; i0 += ROWS) {
                long last = i0 + ROWS - 1 < T ? i0 + ROWS - 1 : T - 1;
                const float *in[ROWS];
                float *q_rows[ROWS], *k_rows[ROWS], *v_rows[ROWS];
                block_rows(dS, ld, i0, T, in);
                block_outputs(dqh, d_st, i0, T, spare, q_rows);
                block_outputs(dkh, d_st, i0, T, spare, k_rows);
                block_outputs(dvh, d_st, i0, T, spare, v_rows);
                for (long c0 = 0; c0 < D; c0 += 16) {
                    rows_times(in, kh, D, last + 1, c0, q_rows, 1.0f);  /* dq = dS k */
                    columns_by_rows(dS, ld, i0, T, qh, D, c0, k_rows);  /* dk = dS^T q */
                    columns_by_rows(P, ld, i0, T, gh, D, c0, v_rows);   /* dv = P^T g */
                }
            }
        }
    }
}
