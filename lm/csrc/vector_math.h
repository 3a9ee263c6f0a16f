/* What lm's kernels share (included by causal.c and decode.c, and part of their build's key: lm.native.build hashes
   the headers beside a source): e^x for eight floats x <= 0 (AVX2 + FMA), and the coefficients of the erf that
   their GELUs use. */
#ifndef LM_VECTOR_MATH_H
#define LM_VECTOR_MATH_H

#include <immintrin.h>

/* e^x for x <= 0 to about 2 float ulps: x = n ln 2 + r, |r| <= ln(2) / 2, e^r by a degree-7 polynomial
   (Taylor's coefficients, slightly adjusted), 2^n put straight into the exponent bits. Below -87 the
   result is e^-87 (still a normal float) rather than a smaller one; a NaN stays NaN. */
static const float EXP_TERMS[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                                   1.6666665459e-1f, 5.0000001201e-1f};  /* r^7 .. r^2, by Horner's rule */
static const float EXP_FLOOR = -87.0f, LOG2_E = 1.44269504088896341f;
static const float LN2_HIGH = 0.693359375f, LN2_LOW = -2.12194440e-4f;  /* ln 2 in two parts */

static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(EXP_FLOOR), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HIGH), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LOW), r);
    __m256 p = _mm256_set1_ps(EXP_TERMS[0]);
    for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_TERMS[i]));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* erfc(z) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-z^2), t = 1 / (1 + ERF_P z), for z >= 0: Abramowitz and
   Stegun's formula 7.1.26, within 1.5e-7 of erf, the approximation PyTorch's vectorised erf uses too. ERF_TERMS
   holds a5 .. a1, in the order of Horner's rule. */
static const float ERF_P = 0.3275911f;
static const float ERF_TERMS[5] = {1.061405429f, -1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f};

/* Subnormal floats (below 2^-126) read or written as zero by the calling thread, until restore_tiny(saved): the
   tails of softmax and GELU are full of them (e^-90 = 8e-40; a probability of 1e-30 times a value of 1e-10), and
   on x86 each subnormal operand or result of an instruction costs a microcode assist of about a hundred cycles.
   Without this, causal attention over sharp scores (q and k of standard deviation 20) took 50 times as long
   forward and backward, and the bias-GELU over pre-activations past |x| = 11 seven times as long. What changes
   is below 1.2e-38 in absolute value. Each kernel sets it in every thread of its parallel region and puts the
   thread's control word back before leaving, so PyTorch's own operations on those threads are as they were. */
#define TINY_AS_ZERO 0x8040u  /* MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6) */

static inline unsigned tiny_as_zero(void) {
    unsigned saved = _mm_getcsr();
    _mm_setcsr(saved | TINY_AS_ZERO);
    return saved;
}

static inline void restore_tiny(unsigned saved) { _mm_setcsr(saved); }

#endif
