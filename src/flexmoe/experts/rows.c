/* Products of a few rows with a weight read once, for decoding on CPUs with AVX512-BF16.
 *
 * y[M, O] = x[M, I] @ w[O, I]^T with the weight in PyTorch's plain row-major layout:
 *   - flexmoe_rows_bf16: bf16 x and w, products and sums in fp32 (vdpbf16ps), bf16 y;
 *   - flexmoe_rows_int8: bf16 x, int8 w with one fp32 scale per output row,
 *     y = (x @ w^T) * scale in bf16 (integer products, below);
 *   - flexmoe_expert_bf16 / flexmoe_expert_int8: one expert's FFN on a few rows in one call,
 *     y = (act(x @ w_in^T) * row_weight) @ w_out^T, both products in one OpenMP region.
 * A decode step multiplies one row by weights far larger than the caches, so the time is
 * the time to stream the weight: each block of 4 output rows is read once for every x row
 * (x stays in L1), and output blocks are split over the calling thread's OpenMP team (the
 * same runtime, hence the same threads, as PyTorch's: the library is linked against
 * libgomp.so.1, which PyTorch has loaded before this library).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define OUT_BLOCK 4
#ifndef PREFETCH
#define PREFETCH 1024 /* bytes ahead in each weight row: further than the hardware prefetchers go */
#endif

static inline uint16_t round_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

static inline long clamp_row(long row, long rows) { return row < rows ? row : rows - 1; }

/* ------------------------------------------------------------------ bf16 weights */

/* One step of 32 columns: NW weight rows, each read once, against ROWS x rows. */
#define BF16_STEP(ROWS, NW, MASK)                                                                   \
    do {                                                                                            \
        __m512bh wv[NW];                                                                            \
        for (int r = 0; r < NW; r++) {                                                              \
            wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(MASK, wr[r] + i);                            \
            _mm_prefetch((const char *)(wr[r] + i) + PREFETCH, _MM_HINT_T0);                        \
        }                                                                                           \
        for (int k = 0; k < ROWS; k++) {                                                            \
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(MASK, xr[k] + i);                      \
            for (int r = 0; r < NW; r++) acc[k][r] = _mm512_dpbf16_ps(acc[k][r], wv[r], xv);        \
        }                                                                                           \
    } while (0)

/* sums[k][r] = xr[k] . wr[r] over I columns, in fp32: ROWS rows against NW weight rows. */
#define BF16_SUMS(ROWS, NW)                                                                         \
    static void bf16_sums_##ROWS##_##NW(const uint16_t *const *xr, const uint16_t *const *wr,      \
                                        long I, float sums[ROWS][NW]) {                             \
        __m512 acc[ROWS][NW];                                                                       \
        for (int k = 0; k < ROWS; k++)                                                              \
            for (int r = 0; r < NW; r++) acc[k][r] = _mm512_setzero_ps();                           \
        long i = 0;                                                                                 \
        for (; i + 32 <= I; i += 32) BF16_STEP(ROWS, NW, (__mmask32)0xffffffffu);                   \
        if (i < I) BF16_STEP(ROWS, NW, (__mmask32)((1ull << (I - i)) - 1));                         \
        for (int k = 0; k < ROWS; k++)                                                              \
            for (int r = 0; r < NW; r++) sums[k][r] = _mm512_reduce_add_ps(acc[k][r]);              \
    }

BF16_SUMS(1, 4)
BF16_SUMS(2, 4)
BF16_SUMS(1, 8)
BF16_SUMS(2, 8)

/* Row pointers of ROWS consecutive rows from `first` (copies of the last row past `count`). */
static inline void row_pointers(const uint16_t *base, long first, long count, long stride, int rows,
                                const uint16_t **out) {
    for (int k = 0; k < rows; k++) out[k] = base + clamp_row(first + k, count) * stride;
}

/* y[m0.., o0..o0+3] for one or two rows m0.. of x, rounded to bf16. */
static void bf16_block(const uint16_t *x, long M, long m0, int rows, const uint16_t *w, long O, long o0,
                       long I, uint16_t *y) {
    const uint16_t *xr[2], *wr[OUT_BLOCK];
    float sums[2][OUT_BLOCK];
    row_pointers(x, m0, M, I, rows, xr);
    row_pointers(w, o0, O, I, OUT_BLOCK, wr);
    if (rows == 2)
        bf16_sums_2_4(xr, wr, I, sums);
    else
        bf16_sums_1_4(xr, wr, I, sums);
    for (int k = 0; k < rows; k++)
        for (int r = 0; r < OUT_BLOCK && o0 + r < O; r++) y[(m0 + k) * O + o0 + r] = round_to_bf16(sums[k][r]);
}

void flexmoe_rows_bf16(const uint16_t *x, long M, const uint16_t *w, long O, long I, uint16_t *y) {
    long blocks = (O + OUT_BLOCK - 1) / OUT_BLOCK;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < blocks; b++)
        for (long m0 = 0; m0 < M; m0 += 2) bf16_block(x, M, m0, M - m0 > 1 ? 2 : 1, w, O, b * OUT_BLOCK, I, y);
}

/* ------------------------------------------------------------------ one expert, bf16 weights */

/* The activations of flexmoe.experts.activations, in fp32. */
enum { ACT_SILU = 0, ACT_GELU = 1, ACT_RELU = 2 };

static inline float activate(float v, int kind) {
    if (kind == ACT_SILU) return v / (1.0f + expf(-v));
    if (kind == ACT_GELU) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    return v > 0.0f ? v : (isnan(v) ? v : 0.0f);
}

/* a[m0.., f0..f0+3] = act(gate) * up * weight (gated) or act(h) * weight, rounded to bf16. */
static void ffn_in_block(const uint16_t *x, long M, long m0, int rows, const uint16_t *w_in, long D, long F,
                         int gated, int kind, const float *row_weights, long f0, uint16_t *a) {
    const uint16_t *xr[2], *wr[2 * OUT_BLOCK];
    float sums[2][2 * OUT_BLOCK];
    row_pointers(x, m0, M, D, rows, xr);
    row_pointers(w_in, f0, F, D, OUT_BLOCK, wr);
    if (gated) {
        row_pointers(w_in + F * D, f0, F, D, OUT_BLOCK, wr + OUT_BLOCK);
        if (rows == 2)
            bf16_sums_2_8(xr, wr, D, sums);
        else
            bf16_sums_1_8(xr, wr, D, sums);
    } else {
        float four[2][OUT_BLOCK];
        if (rows == 2)
            bf16_sums_2_4(xr, wr, D, four);
        else
            bf16_sums_1_4(xr, wr, D, four);
        for (int k = 0; k < rows; k++)
            for (int r = 0; r < OUT_BLOCK; r++) sums[k][r] = four[k][r];
    }
    for (int k = 0; k < rows; k++) {
        float weight = row_weights == NULL ? 1.0f : row_weights[m0 + k];
        for (int r = 0; r < OUT_BLOCK && f0 + r < F; r++) {
            float value = activate(sums[k][r], kind);
            if (gated) value *= sums[k][OUT_BLOCK + r];
            a[(m0 + k) * F + f0 + r] = round_to_bf16(value * weight);
        }
    }
}

/* y[M, D] = (act(x @ w_in^T) * row_weights) @ w_out^T for one expert: w_in [H, D] ([gate; up]
 * when gated, H = 2F), w_out [D, F]. The activation (and its product with up and the row's
 * weight) is applied to the fp32 sums and rounded to bf16 once; each weight is read once,
 * both products split over the team. Returns 0, or -1 without memory for the activations. */
int flexmoe_expert_bf16(const uint16_t *x, long M, const uint16_t *w_in, const uint16_t *w_out, long D, long F,
                        int gated, int kind, const float *row_weights, uint16_t *y) {
    uint16_t *a = malloc((size_t)(M * F) * sizeof *a);
    if (a == NULL) return -1;
    long f_blocks = (F + OUT_BLOCK - 1) / OUT_BLOCK, d_blocks = (D + OUT_BLOCK - 1) / OUT_BLOCK;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (long b = 0; b < f_blocks; b++)
            for (long m0 = 0; m0 < M; m0 += 2)
                ffn_in_block(x, M, m0, M - m0 > 1 ? 2 : 1, w_in, D, F, gated, kind, row_weights, b * OUT_BLOCK, a);
#pragma omp for schedule(static)
        for (long b = 0; b < d_blocks; b++)
            for (long m0 = 0; m0 < M; m0 += 2) bf16_block(a, M, m0, M - m0 > 1 ? 2 : 1, w_out, D, b * OUT_BLOCK, F, y);
    }
    free(a);
    return 0;
}

/* ------------------------------------------------------------------ int8 weights */

/* Converting int8 weights to fp32 costs more instructions than memory gives time for, so
 * the int8 products are integer ones: each x row is rounded to 16-bit fixed point,
 * x ~ xi * step with step = max|x| / 32767 (an error of at most step / 2, far below the
 * weights' own int8 rounding), and vpdpwssd multiplies xi by the weights widened to
 * int16, two columns per lane. A lane's int32 sum gains at most 2 * 127 * 32767 per 32
 * columns, so each lane is moved to fp32 every CHUNK columns, before it could overflow. */
#define CHUNK 4096
#define FIXED_MAX 32767.0f

#define INT8_STEP(ROWS, MASK)                                                                       \
    do {                                                                                            \
        __m512i wv[OUT_BLOCK];                                                                      \
        for (int r = 0; r < OUT_BLOCK; r++) wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(MASK, wr[r] + i)); \
        for (int k = 0; k < ROWS; k++) {                                                            \
            __m512i xv = _mm512_maskz_loadu_epi16(MASK, xr[k] + i);                                 \
            for (int r = 0; r < OUT_BLOCK; r++) acc[k][r] = _mm512_dpwssd_epi32(acc[k][r], xv, wv[r]); \
        }                                                                                           \
    } while (0)

/* 64 columns: one cache line of each weight row, the one PREFETCH bytes ahead requested. */
#define INT8_LINE(ROWS)                                                                             \
    do {                                                                                            \
        __m512i lo[OUT_BLOCK], hi[OUT_BLOCK];                                                       \
        for (int r = 0; r < OUT_BLOCK; r++) {                                                       \
            __m512i line = _mm512_loadu_si512(wr[r] + i);                                           \
            _mm_prefetch((const char *)(wr[r] + i) + PREFETCH, _MM_HINT_T0);                        \
            lo[r] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(line));                             \
            hi[r] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(line, 1));                       \
        }                                                                                           \
        for (int k = 0; k < ROWS; k++) {                                                            \
            __m512i xlo = _mm512_loadu_si512(xr[k] + i), xhi = _mm512_loadu_si512(xr[k] + i + 32); \
            for (int r = 0; r < OUT_BLOCK; r++) {                                                   \
                acc[k][r] = _mm512_dpwssd_epi32(acc[k][r], xlo, lo[r]);                             \
                acc[k][r] = _mm512_dpwssd_epi32(acc[k][r], xhi, hi[r]);                             \
            }                                                                                       \
        }                                                                                           \
    } while (0)

/* sums[k][r] = xr[k] . wr[r] over I columns (integers, moved to fp32 every CHUNK columns). */
#define INT8_SUMS(ROWS)                                                                             \
    static void int8_sums_##ROWS(const int16_t *const *xr, const int8_t *const *wr, long I,        \
                                 float sums[ROWS][OUT_BLOCK]) {                                     \
        for (int k = 0; k < ROWS; k++)                                                              \
            for (int r = 0; r < OUT_BLOCK; r++) sums[k][r] = 0.0f;                                  \
        for (long c = 0; c < I; c += CHUNK) {                                                       \
            long end = c + CHUNK < I ? c + CHUNK : I;                                               \
            __m512i acc[ROWS][OUT_BLOCK];                                                           \
            for (int k = 0; k < ROWS; k++)                                                          \
                for (int r = 0; r < OUT_BLOCK; r++) acc[k][r] = _mm512_setzero_si512();            \
            long i = c;                                                                             \
            for (; i + 64 <= end; i += 64) INT8_LINE(ROWS);                                         \
            for (; i + 32 <= end; i += 32) INT8_STEP(ROWS, (__mmask32)0xffffffffu);                 \
            if (i < end) INT8_STEP(ROWS, (__mmask32)((1ull << (end - i)) - 1));                     \
            for (int k = 0; k < ROWS; k++)                                                          \
                for (int r = 0; r < OUT_BLOCK; r++) sums[k][r] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[k][r])); \
        }                                                                                           \
    }

INT8_SUMS(1)
INT8_SUMS(2)

/* The fp32 sums of one or two fixed-point rows m0.. against the 4 int8 weight rows from o0. */
static void int8_block_sums(const int16_t *xi, long M, long m0, int rows, const int8_t *w, long O, long o0,
                            long I, float sums[2][OUT_BLOCK]) {
    const int16_t *xr[2];
    const int8_t *wr[OUT_BLOCK];
    for (int k = 0; k < rows; k++) xr[k] = xi + clamp_row(m0 + k, M) * I;
    for (int r = 0; r < OUT_BLOCK; r++) wr[r] = w + clamp_row(o0 + r, O) * I;
    if (rows == 2)
        int8_sums_2(xr, wr, I, sums);
    else
        int8_sums_1(xr, wr, I, sums);
}

/* y[m0.., o0..o0+3] = sums * step[m] * scale[o], rounded to bf16. */
static void int8_block(const int16_t *xi, const float *step, long M, long m0, int rows, const int8_t *w,
                       const float *scale, long O, long o0, long I, uint16_t *y) {
    float sums[2][OUT_BLOCK];
    int8_block_sums(xi, M, m0, rows, w, O, o0, I, sums);
    for (int k = 0; k < rows; k++)
        for (int r = 0; r < OUT_BLOCK && o0 + r < O; r++)
            y[(m0 + k) * O + o0 + r] = round_to_bf16(sums[k][r] * step[m0 + k] * scale[o0 + r]);
}

static inline __m512 load_bf16(__mmask16 mask, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

static inline float bf16_to_float(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

/* x[M, I] (bf16) rounded to xi * step[m]; a row that is not finite gets step NaN (its outputs NaN). */
static void to_fixed_point(const uint16_t *x, long M, long I, int16_t *xi, float *step) {
    for (long m = 0; m < M; m++) {
        const uint16_t *row = x + m * I;
        int16_t *fixed = xi + m * I;
        __m512 largest = _mm512_setzero_ps();
        for (long i = 0; i < I; i += 16) {
            __mmask16 mask = I - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (I - i)) - 1);
            largest = _mm512_max_ps(largest, _mm512_abs_ps(load_bf16(mask, row + i)));
        }
        float top = _mm512_reduce_max_ps(largest);
        for (long i = 0; i < I; i++) top = isnan(bf16_to_float(row[i])) ? NAN : top; /* max_ps drops NaNs */
        if (!isfinite(top)) {
            step[m] = NAN;
            memset(fixed, 0, (size_t)I * sizeof *fixed);
            continue;
        }
        step[m] = top / FIXED_MAX;
        __m512 inverse = _mm512_set1_ps(top > 0.0f ? FIXED_MAX / top : 0.0f);
        for (long i = 0; i < I; i += 16) {
            __mmask16 mask = I - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (I - i)) - 1);
            __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(load_bf16(mask, row + i), inverse));
            _mm256_mask_storeu_epi16(fixed + i, mask, _mm512_cvtsepi32_epi16(rounded));
        }
    }
}

/* Returns 0, or -1 when the scratch memory could not be allocated. */
int flexmoe_rows_int8(const uint16_t *x, long M, const int8_t *w, const float *scale, long O, long I, uint16_t *y) {
    int16_t *xi = malloc((size_t)(M * I) * sizeof *xi);
    float *step = malloc((size_t)M * sizeof *step);
    if (xi == NULL || step == NULL) {
        free(xi);
        free(step);
        return -1;
    }
    to_fixed_point(x, M, I, xi, step);
    long blocks = (O + OUT_BLOCK - 1) / OUT_BLOCK;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < blocks; b++) {
        for (long m0 = 0; m0 < M; m0 += 2)
            int8_block(xi, step, M, m0, M - m0 > 1 ? 2 : 1, w, scale, O, b * OUT_BLOCK, I, y);
    }
    free(xi);
    free(step);
    return 0;
}

/* ------------------------------------------------------------------ one expert, int8 weights */

/* a[m0.., f0..f0+3] from the int8 first projection, as ffn_in_block does from bf16 weights. */
static void ffn_in_block_int8(const int16_t *xi, const float *step, long M, long m0, int rows, const int8_t *q_in,
                              const float *s_in, long D, long F, int gated, int kind, const float *row_weights,
                              long f0, uint16_t *a) {
    float gate[2][OUT_BLOCK], up[2][OUT_BLOCK];
    int8_block_sums(xi, M, m0, rows, q_in, F, f0, D, gate);
    if (gated) int8_block_sums(xi, M, m0, rows, q_in + F * D, F, f0, D, up);
    for (int k = 0; k < rows; k++) {
        float weight = row_weights == NULL ? 1.0f : row_weights[m0 + k];
        for (int r = 0; r < OUT_BLOCK && f0 + r < F; r++) {
            float value = activate(gate[k][r] * step[m0 + k] * s_in[f0 + r], kind);
            if (gated) value *= up[k][r] * step[m0 + k] * s_in[F + f0 + r];
            a[(m0 + k) * F + f0 + r] = round_to_bf16(value * weight);
        }
    }
}

/* flexmoe_expert_bf16 for int8 weights with one fp32 scale per output row (q_in [H, D] with
 * s_in [H], q_out [D, F] with s_out [D]): x and the activations are rounded to 16-bit fixed
 * point before each product, as in flexmoe_rows_int8. Returns 0, or -1 without memory. */
int flexmoe_expert_int8(const uint16_t *x, long M, const int8_t *q_in, const float *s_in, const int8_t *q_out,
                        const float *s_out, long D, long F, int gated, int kind, const float *row_weights,
                        uint16_t *y) {
    int16_t *xi = malloc((size_t)(M * D) * sizeof *xi), *ai = malloc((size_t)(M * F) * sizeof *ai);
    uint16_t *a = malloc((size_t)(M * F) * sizeof *a);
    float *step = malloc((size_t)(2 * M) * sizeof *step);
    int status = xi == NULL || ai == NULL || a == NULL || step == NULL ? -1 : 0;
    if (status == 0) {
        float *a_step = step + M;
        long f_blocks = (F + OUT_BLOCK - 1) / OUT_BLOCK, d_blocks = (D + OUT_BLOCK - 1) / OUT_BLOCK;
        to_fixed_point(x, M, D, xi, step);
#pragma omp parallel
        {
#pragma omp for schedule(static)
            for (long b = 0; b < f_blocks; b++)
                for (long m0 = 0; m0 < M; m0 += 2)
                    ffn_in_block_int8(xi, step, M, m0, M - m0 > 1 ? 2 : 1, q_in, s_in, D, F, gated, kind, row_weights,
                                      b * OUT_BLOCK, a);
#pragma omp single
            to_fixed_point(a, M, F, ai, a_step);
#pragma omp for schedule(static)
            for (long b = 0; b < d_blocks; b++)
                for (long m0 = 0; m0 < M; m0 += 2)
                    int8_block(ai, a_step, M, m0, M - m0 > 1 ? 2 : 1, q_out, s_out, D, b * OUT_BLOCK, F, y);
        }
    }
    free(xi);
    free(ai);
    free(a);
    free(step);
    return status;
}

/* The OpenMP team size a parallel region of the calling thread gets: PyTorch's, when the
 * runtime is shared (what the tests check). */
int flexmoe_rows_threads(void) { return omp_get_max_threads(); }
