/* Vector helpers shared by the CPU kernels (AVX-512): masks, bf16 and fp32 loads and
 * stores in fp32 lanes, and e^x. */
#ifndef FLEXMOE_VECTOR_MATH_H
#define FLEXMOE_VECTOR_MATH_H

#include <immintrin.h>
#include <stdint.h>

/* The first min(left, 16) lanes. */
static inline __mmask16 mask16(long left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

static inline __m512 load_f32(__mmask16 m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline void store_f32(__mmask16 m, float *p, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }

static inline __m512 load_bf16(__mmask16 m, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
/* Rounded to nearest even, as PyTorch rounds fp32 to bf16. */
static inline void store_bf16(__mmask16 m, uint16_t *p, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* e^x for fp32 lanes: Cephes' expf (range reduction by ln 2, a degree-5 polynomial, the
 * exponent put back with scalef), within 2 ulp on the range that does not overflow.
 * NaN lanes come out finite; silu keeps them NaN through its numerator. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

#endif
