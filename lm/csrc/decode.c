/* lm's CPU decoding kernels: the products and the attention of a few new tokens, at the speed the
   memory delivers the weights. Built by lm.cpu_kernels with the system's C compiler (-O2 -mavx2 -mfma
   -fopenmp) and loaded with ctypes; both split their work over PyTorch's own OpenMP threads.

   lm_matvec: a few rows times a weight matrix,

   y[m][o] = post(act(b[o] + sum_i W[o][i] x[m][i]), other[m][o])     for m < n_rows, o < n_out,

   W row-major (n_out, n_in) float32, as an nn.Linear stores it; x (n_rows, n_in), other and y
   (n_rows, n_out), contiguous; b and other may be NULL. act: 0 none, 1 GELU (erf), 2 GELU (tanh
   approximation), 3 SiLU; post: 0 none, 1 add other, 2 multiply by other.

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

static inline float finish(float v, const float *b, const float *other, long o, int act, int post) {
    if (b) v += b[o];
    if (act == 1) v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    else if (act == 2) v = 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    else if (act == 3) v = v / (1.0f + expf(-v));
    if (post == 1) v += other[o];
    else if (post == 2) v *= other[o];
    return v;
}

void lm_matvec(const float *W, const float *x, const float *b, const float *other, float *y,
               long n_rows, long n_out, long n_in, int act, int post, int threads) {
    long blocks = (n_out + 3) / 4, n8 = n_in & ~7L;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long k = 0; k < blocks; k++) {
        long o = 4 * k, rows = n_out - o < 4 ? n_out - o : 4;
        for (long m = 0; m < n_rows; m++) {  /* each input row meets the same weights, from the cache */
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
                ym[o] = finish(row_dot(w0, xm, n_in, a0), b, om, o, act, post);
                ym[o + 1] = finish(row_dot(w1, xm, n_in, a1), b, om, o + 1, act, post);
                ym[o + 2] = finish(row_dot(w2, xm, n_in, a2), b, om, o + 2, act, post);
                ym[o + 3] = finish(row_dot(w3, xm, n_in, a3), b, om, o + 3, act, post);
            } else {
                for (long r = 0; r < rows; r++) {  /* the last n_out % 4 outputs, one at a time */
                    const float *w = W + (o + r) * n_in;
                    __m256 a = _mm256_setzero_ps();
                    for (long i = 0; i < n8; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(xm + i), a);
                    ym[o + r] = finish(row_dot(w, xm, n_in, a), b, om, o + r, act, post);
                }
            }
        }
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
    for (long r = 0; r < rows; r++) {
        const int8_t *qr = q + r * n_in;
        float s = lanes_sum(acc[r]);
        for (long i = n8; i < n_in; i++) s += (float)qr[i] * x[i];  /* as row_dot: the last n_in % 8 */
        y[o + r] = finish(scale[o + r] * s, b, other, o + r, act, post);
    }
}

void lm_matvec_int8(const int8_t *Q, const float *scale, const float *x, const float *b, const float *other,
                    float *y, long n_rows, long n_out, long n_in, int act, int post, int threads) {
    long blocks = (n_out + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long k = 0; k < blocks; k++) {
        long o = 4 * k, rows = n_out - o < 4 ? n_out - o : 4;
        for (long m = 0; m < n_rows; m++)  /* each input row meets the same weights, from the cache */
            one_row_int8(Q + o * n_in, scale, x + m * n_in, b, other ? other + m * n_out : 0, y + m * n_out,
                         o, rows, n_in, act, post);
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
void lm_attend(const float *q, const float *k, const float *v, float *out, long B, long H, long H_kv, long T,
               long S, long D, long q_sb, long q_sh, long q_st, long k_sb, long k_sh, long k_ss,
               long v_sb, long v_sh, long v_ss, long o_sb, long o_sh, long o_st, float scale, int threads) {
    long group = H / H_kv, d8 = D & ~7L;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long job = 0; job < B * H * T; job++) {
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
            for (; i < d8; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + i), _mm256_loadu_ps(o + i)));
            for (; i < D; i++) o[i] += scores[j] * vj[i];
        }
        float inverse = 1.0f / total;
        for (long i = 0; i < D; i++) o[i] *= inverse;
    }
}
