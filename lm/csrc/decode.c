/* lm's CPU decoding kernels: the products and the attention of a few new tokens, at the speed the
   memory delivers the weights, and a whole decoding step made of them (lm_decode_step, at the end). Built by
   lm.cpu_kernels with the system's C compiler (-O2 -mavx2 -mfma -fopenmp) and loaded with ctypes; they split
   their work over PyTorch's own OpenMP threads.

   lm_matvec: a few rows times a weight matrix,

   y[m][o] = post(act(b[o] + sum_i W[o][i] x[m][i]), other[m][o])     for m < n_rows, o < n_out,

   W row-major (n_out, n_in) float32, as an nn.Linear stores it; x (n_rows, n_in), other and y
   (n_rows, n_out), contiguous; b and other may be NULL. act: 0 none, 1 GELU (erf, eight outputs at a time by
   gelu8), 2 GELU (tanh approximation), 3 SiLU; post: 0 none, 1 add other, 2 multiply by other.

   At batch 1 a product reads every weight once and does one multiply-add with it, so its time is the
   time the weights take to come from memory. The rows of W are split between the threads in equal
   parts, and each thread takes four at a time: four streams of weights, eight floats a load, one
   multiply-add per float (AVX2 + FMA), then each input row in turn against the same four rows (in
   the cache by then). Each output is summed by one thread in one fixed order (eight lanes, then the
   lanes added pairwise), so the result depends neither on the number of threads nor on how many
   rows came with it: a row's outputs are the same floats alone or among others. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"  /* exp_nonpositive, ERF_P, ERF_TERMS, tiny_as_zero */

static inline float lanes_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); /* 8 lanes -> 4 */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                         /* 4 -> 2 */
    s = _mm_add_ss(s, _mm_movehdup_ps(s));                                          /* 2 -> 1 */
    return _mm_cvtss_f32(s);
}

static inline float row_dot(const float *w, const float *x, long n, __m256 acc) {
    long i = n & ~7L;
    float s = lanes_sum(acc);
    for (; i < n; i++) s += w[i] * x[i];  /* the last n % 8 inputs */
    return s;
}

/* GELU(x) = x Phi(x) for eight floats, Phi(x) = 1 - Q(x) for x >= 0 and Q(|x|) below, Q the normal tail erfc(z) / 2,
   z = |x| / sqrt 2, erfc by Abramowitz and Stegun's formula (vector_math.h), as PyTorch's vectorised GELU and lm's
   training kernel compute it */
static inline __m256 gelu8(__m256 x) {
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 z = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(0.70710678118654752f));
    __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(ERF_P), z, one)), erfc = _mm256_set1_ps(ERF_TERMS[0]);
    for (int i = 1; i < 5; i++) erfc = _mm256_fmadd_ps(erfc, t, _mm256_set1_ps(ERF_TERMS[i]));
    __m256 e = exp_nonpositive(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), z));  /* e^(-z^2) */
    erfc = _mm256_mul_ps(_mm256_mul_ps(erfc, t), e);
    __m256 tail = _mm256_mul_ps(_mm256_set1_ps(0.5f), erfc);  /* Q(|x|) */
    return _mm256_mul_ps(x, _mm256_blendv_ps(_mm256_sub_ps(one, tail), tail, x));  /* x Phi(x): x's sign picks */
}

/* 1 / (1 + e^-u) for eight floats: e = e^-|u| <= 1, then 1 / (1 + e) for u >= 0 and e / (1 + e) below */
static inline __m256 sigmoid8(__m256 u) {
    __m256 e = exp_nonpositive(_mm256_or_ps(u, _mm256_set1_ps(-0.0f))), one = _mm256_set1_ps(1.0f);  /* -|u| */
    return _mm256_div_ps(_mm256_blendv_ps(one, e, u), _mm256_add_ps(one, e));  /* u's sign picks */
}

/* outputs o .. o+n-1 (n <= 4) of a row from their sums s: the bias, the activation, then the combination with
   `other`. Each output's floats depend on its own sum alone, however many come together. */
static inline void finish(const float *s, long n, const float *b, const float *other, float *y, long o, int act,
                          int post) {
    float v[8] = {0};
    for (long r = 0; r < n; r++) v[r] = b ? s[r] + b[o + r] : s[r];
    __m256 u = _mm256_loadu_ps(v);
    if (act == 1) {
        _mm256_storeu_ps(v, gelu8(u));
    } else if (act == 2) {  /* 0.5 u (1 + tanh(k)) = u sigmoid(2k), k = sqrt(2 / pi) (u + 0.044715 u^3) */
        __m256 u3 = _mm256_mul_ps(_mm256_mul_ps(u, u), u);
        __m256 k2 = _mm256_mul_ps(_mm256_set1_ps(2 * 0.79788456080286536f),
                                  _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), u3, u));
        _mm256_storeu_ps(v, _mm256_mul_ps(u, sigmoid8(k2)));
    } else if (act == 3) {  /* SiLU: u sigmoid(u) */
        _mm256_storeu_ps(v, _mm256_mul_ps(u, sigmoid8(u)));
    }
    for (long r = 0; r < n; r++) y[o + r] = post == 1 ? v[r] + other[o + r] : post == 2 ? v[r] * other[o + r] : v[r];
}

/* block k of lm_matvec: outputs 4k .. 4k+3 (fewer at the end) of every input row */
static inline void matvec_block(const float *W, const float *x, const float *b, const float *other, float *y,
                                long k, long n_rows, long n_out, long n_in, int act, int post) {
    long o = 4 * k, rows = n_out - o < 4 ? n_out - o : 4, n8 = n_in & ~7L, m = 0;
    for (; rows == 4 && m + 2 <= n_rows; m += 2) {  /* two input rows at a time: each weight load feeds two */
        const float *x0 = x + m * n_in, *x1 = x0 + n_in, *o0 = other ? other + m * n_out : 0;
        const float *w0 = W + o * n_in, *w1 = w0 + n_in, *w2 = w1 + n_in, *w3 = w2 + n_in;
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
        for (long i = 0; i < n8; i += 8) {  /* each sum in the order of the one-row loop below: the same floats */
            __m256 u = _mm256_loadu_ps(x0 + i), v = _mm256_loadu_ps(x1 + i), w;
            w = _mm256_loadu_ps(w0 + i), a00 = _mm256_fmadd_ps(w, u, a00), a10 = _mm256_fmadd_ps(w, v, a10);
            w = _mm256_loadu_ps(w1 + i), a01 = _mm256_fmadd_ps(w, u, a01), a11 = _mm256_fmadd_ps(w, v, a11);
            w = _mm256_loadu_ps(w2 + i), a02 = _mm256_fmadd_ps(w, u, a02), a12 = _mm256_fmadd_ps(w, v, a12);
            w = _mm256_loadu_ps(w3 + i), a03 = _mm256_fmadd_ps(w, u, a03), a13 = _mm256_fmadd_ps(w, v, a13);
        }
        float first[4] = {row_dot(w0, x0, n_in, a00), row_dot(w1, x0, n_in, a01), row_dot(w2, x0, n_in, a02),
                          row_dot(w3, x0, n_in, a03)};
        float second[4] = {row_dot(w0, x1, n_in, a10), row_dot(w1, x1, n_in, a11), row_dot(w2, x1, n_in, a12),
                           row_dot(w3, x1, n_in, a13)};
        finish(first, 4, b, o0, y + m * n_out, o, act, post);
        finish(second, 4, b, o0 ? o0 + n_out : 0, y + (m + 1) * n_out, o, act, post);
    }
    for (; m < n_rows; m++) {  /* each input row meets the same weights, from the cache */
        const float *xm = x + m * n_in, *om = other ? other + m * n_out : 0;
        float *ym = y + m * n_out;
        if (rows == 4) {
            const float *w0 = W + o * n_in, *w1 = w0 + n_in, *w2 = w1 + n_in, *w3 = w2 + n_in;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (long i = 0; i < n8; i += 8) {
                __m256 xi = _mm256_loadu_ps(xm + i);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xi, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xi, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xi, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xi, a3);
            }
            float sums[4] = {row_dot(w0, xm, n_in, a0), row_dot(w1, xm, n_in, a1), row_dot(w2, xm, n_in, a2),
                             row_dot(w3, xm, n_in, a3)};
            finish(sums, 4, b, om, ym, o, act, post);
        } else {
            float sums[4];
            for (long r = 0; r < rows; r++) {  /* the last n_out % 4 outputs, one at a time */
                const float *w = W + (o + r) * n_in;
                __m256 a = _mm256_setzero_ps();
                for (long i = 0; i < n8; i += 8)
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(xm + i), a);
                sums[r] = row_dot(w, xm, n_in, a);
            }
            finish(sums, rows, b, om, ym, o, act, post);
        }
    }
}

void lm_matvec(const float *W, const float *x, const float *b, const float *other, float *y,
               long n_rows, long n_out, long n_in, int act, int post, int threads) {
    long blocks = (n_out + 3) / 4;
    #pragma omp parallel num_threads(threads)
    {
        unsigned saved = tiny_as_zero();
        #pragma omp for schedule(static)
        for (long k = 0; k < blocks; k++) matvec_block(W, x, b, other, y, k, n_rows, n_out, n_in, act, post);
        restore_tiny(saved);
    }
}

/* lm_matvec_int8: the same with a weight stored as int8 and a float scale per output row (an
   lm.quantize.Int8Linear),

   y[m][o] = post(act(b[o] + scale[o] * sum_i Q[o][i] x[m][i]), other[m][o]).

   A step streams a quarter of the bytes. Each int8 weight is widened to float32 as it is read
   (sign-extended, then converted: exact) and summed in lm_matvec's fixed order; the row's scale
   multiplies the sum once, before the bias. With several input rows each row widens
   the four weight rows again, from the cache: that measured faster than widening them once into a
   float buffer, four times the bytes, which the cache then has to hold. */
static inline __m256 widen8(const int8_t *q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

/* the `rows` outputs from o of input row x: each accumulator's lanes summed, the last n_in % 8 products added (as
   row_dot), times the row's scale; then the bias, activation and combination (finish) */
static inline void finish_int8(const __m256 *acc, const int8_t *q, const float *scale, const float *x, const float *b,
                               const float *other, float *y, long o, long rows, long n_in, int act, int post) {
    float sums[4];
    for (long r = 0; r < rows; r++) {
        const int8_t *qr = q + r * n_in;
        float s = lanes_sum(acc[r]);
        for (long i = n_in & ~7L; i < n_in; i++) s += (float)qr[i] * x[i];
        sums[r] = scale[o + r] * s;
    }
    finish(sums, rows, b, other, y, o, act, post);
}

static void one_row_int8(const int8_t *q, const float *scale, const float *x, const float *b, const float *other,
                         float *y, long o, long rows, long n_in, int act, int post) {
    long n8 = n_in & ~7L;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    if (rows == 4) {
        const int8_t *q0 = q, *q1 = q0 + n_in, *q2 = q1 + n_in, *q3 = q2 + n_in;
        for (long i = 0; i < n8; i += 8) {
            __m256 xi = _mm256_loadu_ps(x + i);
            acc[0] = _mm256_fmadd_ps(widen8(q0 + i), xi, acc[0]);
            acc[1] = _mm256_fmadd_ps(widen8(q1 + i), xi, acc[1]);
            acc[2] = _mm256_fmadd_ps(widen8(q2 + i), xi, acc[2]);
            acc[3] = _mm256_fmadd_ps(widen8(q3 + i), xi, acc[3]);
        }
    } else {
        for (long r = 0; r < rows; r++)
            for (long i = 0; i < n8; i += 8)
                acc[r] = _mm256_fmadd_ps(widen8(q + r * n_in + i), _mm256_loadu_ps(x + i), acc[r]);
    }
    finish_int8(acc, q, scale, x, b, other, y, o, rows, n_in, act, post);
}

/* one_row_int8's four outputs (rows == 4) for two input rows, x and x + n_in: each weight widened once for both,
   each sum in one_row_int8's order (the same floats) */
static void two_rows_int8(const int8_t *q, const float *scale, const float *x, const float *b, const float *other,
                          float *y, long n_out, long o, long n_in, int act, int post) {
    long n8 = n_in & ~7L;
    const int8_t *q0 = q, *q1 = q0 + n_in, *q2 = q1 + n_in, *q3 = q2 + n_in;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (long i = 0; i < n8; i += 8) {
        __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + n_in + i), w;
        w = widen8(q0 + i), a00 = _mm256_fmadd_ps(w, u, a00), a10 = _mm256_fmadd_ps(w, v, a10);
        w = widen8(q1 + i), a01 = _mm256_fmadd_ps(w, u, a01), a11 = _mm256_fmadd_ps(w, v, a11);
        w = widen8(q2 + i), a02 = _mm256_fmadd_ps(w, u, a02), a12 = _mm256_fmadd_ps(w, v, a12);
        w = widen8(q3 + i), a03 = _mm256_fmadd_ps(w, u, a03), a13 = _mm256_fmadd_ps(w, v, a13);
    }
    __m256 first[4] = {a00, a01, a02, a03}, second[4] = {a10, a11, a12, a13};
    finish_int8(first, q, scale, x, b, other, y, o, 4, n_in, act, post);
    finish_int8(second, q, scale, x + n_in, b, other ? other + n_out : 0, y + n_out, o, 4, n_in, act, post);
}

static inline void matvec_int8_block(const int8_t *Q, const float *scale, const float *x, const float *b,
                                     const float *other, float *y, long k, long n_rows, long n_out, long n_in,
                                     int act, int post) {
    long o = 4 * k, rows = n_out - o < 4 ? n_out - o : 4, m = 0;
    for (; rows == 4 && m + 2 <= n_rows; m += 2)  /* two input rows at a time, as matvec_block */
        two_rows_int8(Q + o * n_in, scale, x + m * n_in, b, other ? other + m * n_out : 0, y + m * n_out, n_out, o,
                      n_in, act, post);
    for (; m < n_rows; m++)  /* each input row meets the same weights, from the cache */
        one_row_int8(Q + o * n_in, scale, x + m * n_in, b, other ? other + m * n_out : 0, y + m * n_out,
                     o, rows, n_in, act, post);
}

void lm_matvec_int8(const int8_t *Q, const float *scale, const float *x, const float *b, const float *other,
                    float *y, long n_rows, long n_out, long n_in, int act, int post, int threads) {
    long blocks = (n_out + 3) / 4;
    #pragma omp parallel num_threads(threads)
    {
        unsigned saved = tiny_as_zero();
        #pragma omp for schedule(static)
        for (long k = 0; k < blocks; k++)
            matvec_int8_block(Q, scale, x, b, other, y, k, n_rows, n_out, n_in, act, post);
        restore_tiny(saved);
    }
}

/* Attention of a few new queries over a KV cache, each query on its own, in a fixed order.

   out[b][t][h] = softmax_j(scale * q[b][h][t] . k[b][g][j]) . v[b][g][j]   over j < S - T + 1 + t,

   g = h / (H / H_kv) the query head's key-value head (grouped-query attention): the T new queries
   come after S - T cached positions, and each sees those and the new ones up to its own. Strides
   are in floats, the last dimension (D) contiguous. Scores first (one dot product of D floats per
   key, eight lanes then pairwise), their largest, the exponentials and their sum, then the
   weighted sum of the values: for any T, a query's output is the same floats as when it comes
   alone, which is what lets a speculative step's check match one-token decoding exactly. */
/* one job of lm_attend: query t of head h of batch row b */
static inline void attend_job(const float *q, const float *k, const float *v, float *out, long job, long H, long H_kv,
                              long T, long S, long D, long q_sb, long q_sh, long q_st, long k_sb, long k_sh, long k_ss,
                              long v_sb, long v_sh, long v_ss, long o_sb, long o_sh, long o_st, float scale) {
    long group = H / H_kv, d8 = D & ~7L;
    long b = job / (H * T), h = (job / T) % H, t = job % T, g = h / group, keys = S - T + 1 + t;
    const float *qi = q + b * q_sb + h * q_sh + t * q_st;
    const float *kb = k + b * k_sb + g * k_sh, *vb = v + b * v_sb + g * v_sh;
    float *o = out + b * o_sb + h * o_sh + t * o_st;
    float scores[keys], top = -INFINITY, total = 0.0f;
    for (long j = 0; j < keys; j++) {
        const float *kj = kb + j * k_ss;
        __m256 a = _mm256_setzero_ps();
        for (long i = 0; i < d8; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qi + i), _mm256_loadu_ps(kj + i), a);
        float s = scale * row_dot(kj, qi, D, a);
        scores[j] = s;
        if (s > top) top = s;
    }
    for (long j = 0; j < keys; j++) {
        scores[j] = expf(scores[j] - top);
        total += scores[j];
    }
    for (long i = 0; i < D; i++) o[i] = 0.0f;
    for (long j = 0; j < keys; j++) {
        const float *vj = vb + j * v_ss;
        __m256 p = _mm256_set1_ps(scores[j]);
        long i = 0;
        for (; i < d8; i += 8)
            _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + i), _mm256_loadu_ps(o + i)));
        for (; i < D; i++) o[i] += scores[j] * vj[i];
    }
    float inverse = 1.0f / total;
    for (long i = 0; i < D; i++) o[i] *= inverse;
}

void lm_attend(const float *q, const float *k, const float *v, float *out, long B, long H, long H_kv, long T,
               long S, long D, long q_sb, long q_sh, long q_st, long k_sb, long k_sh, long k_ss,
               long v_sb, long v_sh, long v_ss, long o_sb, long o_sh, long o_st, float scale, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        unsigned saved = tiny_as_zero();
        #pragma omp for schedule(static)
        for (long job = 0; job < B * H * T; job++)
            attend_job(q, k, v, out, job, H, H_kv, T, S, D, q_sb, q_sh, q_st, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss,
                       o_sb, o_sh, o_st, scale);
        restore_tiny(saved);
    }
}

/* ---- a whole decoding step (lm_decode_step) ---------------------------------------------------------
   Every block of a pre-norm model for R = B T new rows, in one call and one parallel region: the same
   products and attention as above, in the same order, with the norms, RoPE's rotation and the KV cache's
   writes between them, so that a step makes no trip back to Python between its ~10 operations a block.

     for each block:   h = norm1(x)   qkv = h Wqkv^T + b   (q, k rotated)   k, v -> the cache at n .. n+T-1
                       a = attention of q over the cache's n + T positions   x = x + a Wproj^T + b
                       h = norm2(x)   x = x + W3 act(h W1^T + b1) (* (h W2^T + b2) for SwiGLU) + b3
     then:             logits = norm_f(x) Whead^T + b

   Each output is computed by one thread in the fixed order of lm_matvec and lm_attend, and each row's norm
   by one thread in a fixed order, so a row's logits do not depend on the number of threads or of rows: a
   speculative check of k rows gives the logits of k one-token steps bit for bit. */

typedef struct { const void *w; const float *scale, *b; } Linear;  /* scale NULL: float32 weights, else int8 */

enum { NORM_LAYER = 0, NORM_RMS = 1 };
enum { FFN_GELU = 1, FFN_GELU_TANH = 2, FFN_SWIGLU = 3 };  /* GELU ones as lm_matvec's act; SwiGLU's gate is SiLU */

/* the slots of one block in lm_decode_step's `ptr`, in longs */
enum { P_NORM1_W, P_NORM1_B, P_NORM2_W, P_NORM2_B, P_QKV, P_PROJ = P_QKV + 3, P_UP = P_PROJ + 3,
       P_VALUE = P_UP + 3, P_DOWN = P_VALUE + 3, P_KEYS = P_DOWN + 3, P_VALUES, P_BLOCK };

static inline Linear linear_at(const long *p) {
    return (Linear){(const void *)p[0], (const float *)p[1], (const float *)p[2]};
}

/* y (rows, n_out) = post(act(x W^T + b), other): lm_matvec's blocks, shared among the team */
static void product_rows(Linear l, const float *x, const float *other, float *y, long rows, long n_out, long n_in,
                         int act, int post) {
    long blocks = (n_out + 3) / 4;
    #pragma omp for schedule(static)
    for (long k = 0; k < blocks; k++) {
        if (l.scale)
            matvec_int8_block((const int8_t *)l.w, l.scale, x, l.b, other, y, k, rows, n_out, n_in, act, post);
        else
            matvec_block((const float *)l.w, x, l.b, other, y, k, rows, n_out, n_in, act, post);
    }
}

/* h[r] = norm(x[r]) for R rows of C: LayerNorm (x - mean) / sqrt(var + eps) * w + b (b NULL: none) or
   RMSNorm x / sqrt(mean(x^2) + eps) * w, the sums eight lanes wide, then the lanes pairwise */
static void norm_rows(const float *x, float *h, const float *w, const float *b, long R, long C, int kind, float eps) {
    long c8 = C & ~7L;
    #pragma omp for schedule(static)
    for (long r = 0; r < R; r++) {
        const float *xr = x + r * C;
        float *hr = h + r * C, mean = 0.0f;
        if (kind == NORM_LAYER) {
            __m256 s = _mm256_setzero_ps();
            for (long i = 0; i < c8; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xr + i));
            float total = lanes_sum(s);
            for (long i = c8; i < C; i++) total += xr[i];
            mean = total / (float)C;
        }
        __m256 m = _mm256_set1_ps(mean), s = _mm256_setzero_ps();
        for (long i = 0; i < c8; i += 8) {
            __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + i), m);
            s = _mm256_fmadd_ps(d, d, s);
        }
        float squares = lanes_sum(s);
        for (long i = c8; i < C; i++) squares += (xr[i] - mean) * (xr[i] - mean);
        float rstd = 1.0f / sqrtf(squares / (float)C + eps);
        for (long i = 0; i < C; i++) hr[i] = (xr[i] - mean) * rstd * w[i] + (b ? b[i] : 0.0f);
    }
}

/* RoPE on the new rows' q and k heads inside qkv (rows of `width` floats): the pair (x[i], x[i + D/2]) of each
   head turned by the angle of its position, x cos + rotate_half(x) sin with the (T, D) tables of positions
   n .. n+T-1, as lm.positions.apply_rotary computes it */
static void rotate_rows(float *qkv, const float *cos, const float *sin, long R, long T, long heads, long D,
                        long width) {
    long half = D / 2;
    #pragma omp for schedule(static)
    for (long job = 0; job < R * heads; job++) {
        long r = job / heads, h = job % heads, t = r % T;
        float *x = qkv + r * width + h * D;
        const float *c = cos + t * D, *s = sin + t * D;
        for (long i = 0; i < half; i++) {
            float x1 = x[i], x2 = x[i + half];
            x[i] = x1 * c[i] + (-x2) * s[i];
            x[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
    }
}

/* dim: n_layer, B, T, C (d_model), H, H_kv, D, F (feed-forward width), V, n (cached positions), slots (the
   cache's positions), norm kind, feed-forward kind. ptr: P_BLOCK longs a block (norm weights and biases, the
   qkv, proj, up, value (SwiGLU's) and down Linears as (weight, scale, bias), the cache's keys and values
   (B, H_kv, slots, D)), then norm_f's weight and bias, the head's Linear, RoPE's cos and sin (T, D) tables
   (0: no RoPE). x (R, C) the embedded rows, overwritten; work R (C + (H + 2 H_kv) D + H D + F) floats;
   logits (R, V). NULL pointers (0) for absent biases. */
void lm_decode_step(const long *ptr, const long *dim, float eps, float scale, float *x, float *work, float *logits,
                    int threads) {
    long L = dim[0], B = dim[1], T = dim[2], C = dim[3], H = dim[4], H_kv = dim[5], D = dim[6], F = dim[7];
    long V = dim[8], n = dim[9], slots = dim[10], R = B * T, width = (H + 2 * H_kv) * D, S = n + T;
    int norm = (int)dim[11], ffn = (int)dim[12];
    float *h = work, *qkv = h + R * C, *att = qkv + R * width, *up = att + R * H * D;
    const long *tail = ptr + L * P_BLOCK;
    const float *cos = (const float *)tail[5], *sin = (const float *)tail[6];
    #pragma omp parallel num_threads(threads)
    {
        unsigned saved = tiny_as_zero();
        for (long l = 0; l < L; l++) {
            const long *p = ptr + l * P_BLOCK;
            float *keys = (float *)p[P_KEYS], *values = (float *)p[P_VALUES];
            norm_rows(x, h, (const float *)p[P_NORM1_W], (const float *)p[P_NORM1_B], R, C, norm, eps);
            product_rows(linear_at(p + P_QKV), h, 0, qkv, R, width, C, 0, 0);
            if (cos) rotate_rows(qkv, cos, sin, R, T, H + H_kv, D, width);
            #pragma omp for schedule(static)
            for (long job = 0; job < R * H_kv; job++) {  /* the new keys and values into the cache */
                long r = job / H_kv, g = job % H_kv, b = r / T, t = r % T;
                long at = ((b * H_kv + g) * slots + n + t) * D;
                memcpy(keys + at, qkv + r * width + (H + g) * D, D * sizeof(float));
                memcpy(values + at, qkv + r * width + (H + H_kv + g) * D, D * sizeof(float));
            }
            #pragma omp for schedule(static)
            for (long job = 0; job < B * H * T; job++)
                attend_job(qkv, keys, values, att, job, H, H_kv, T, S, D, T * width, D, width, H_kv * slots * D,
                           slots * D, D, H_kv * slots * D, slots * D, D, T * H * D, D, H * D, scale);
            product_rows(linear_at(p + P_PROJ), att, x, x, R, C, H * D, 0, 1);  /* x += proj(a) */
            norm_rows(x, h, (const float *)p[P_NORM2_W], (const float *)p[P_NORM2_B], R, C, norm, eps);
            if (ffn == FFN_SWIGLU) {
                product_rows(linear_at(p + P_UP), h, 0, up, R, F, C, 3, 0);         /* silu(h W1^T + b1) */
                product_rows(linear_at(p + P_VALUE), h, up, up, R, F, C, 0, 2);     /* times h W2^T + b2 */
            } else {
                product_rows(linear_at(p + P_UP), h, 0, up, R, F, C, ffn, 0);       /* GELU(h W^T + b) */
            }
            product_rows(linear_at(p + P_DOWN), up, x, x, R, C, F, 0, 1);           /* x += down(...) */
        }
        norm_rows(x, h, (const float *)tail[0], (const float *)tail[1], R, C, norm, eps);
        product_rows(linear_at(tail + 2), h, 0, logits, R, V, C, 0, 0);
        restore_tiny(saved);
    }
}
