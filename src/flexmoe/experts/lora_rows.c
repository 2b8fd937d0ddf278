/* LoRA terms of a multi-adapter batch, added in place on CPUs with AVX512 (S-LoRA's and
 * Punica's segmented LoRA product, SGMV).
 *
 * The rows of one LoRA stack are grouped by slot (an adapter's version of one expert):
 * slot l owns counts[l] consecutive entries of `rows`, and for each of its rows
 *   out[row] += B_l (A_l x[row])
 * with the factors stored transposed (A_l^T [I, R], B_l^T [R, O], the weave's layout).
 * A slot's factors are small (tens of KB) and its rows few, so the work is to read each
 * slot's factors once for all its rows: blocks of up to 8 rows share every vector of
 * A^T and B^T loaded, the low-rank vector u = A_l x stays in registers, and the sums go
 * straight into the output rows (no gathered copies of x, no delta buffer, no scatter).
 * Slots are spread over the calling thread's OpenMP team (PyTorch's); rows of different
 * slots are different rows, so threads never write the same output.
 *
 * The output row's O columns may lie in blocks of `width` columns, `block_stride` apart
 * (the pre-activation [P, N, F] of a gated expert keeps gate and up apart). Sums are fp32;
 * bf16 data is widened on load and the output rounded to nearest even once.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define LORA_MAX_RANK 1024

static inline __mmask16 lanes(long left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

static inline __m512 load_f32(__mmask16 m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline float scalar_f32(const float *p) { return *p; }
static inline void store_f32(__mmask16 m, float *p, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }

static inline __m512 load_bf16(__mmask16 m, const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline float scalar_bf16(const uint16_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}
static inline void store_bf16(__mmask16 m, uint16_t *p, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* ROWS rows of one slot: u = A x for each (16 ranks at a time), then out += B u (16 output
 * columns at a time), every factor vector loaded once for the ROWS rows. */
#define LORA_BLOCK(T, ROWS)                                                                         \
    static void lora_block_##T##_##ROWS(const T *x, long x_stride, const int64_t *rows,            \
                                        const T *AT, const T *BT, long I, long R, long O, T *out,  \
                                        long out_stride, long width, long block_stride) {          \
        float u[ROWS][R];                                                                            \
        const T *xr[ROWS];                                                                          \
        T *yr[ROWS];                                                                                \
        for (int b = 0; b < ROWS; b++) {                                                            \
            xr[b] = x + rows[b] * x_stride;                                                         \
            yr[b] = out + rows[b] * out_stride;                                                     \
        }                                                                                           \
        for (long j0 = 0; j0 < R; j0 += 16) {                                                       \
            __mmask16 m = lanes(R - j0);                                                            \
            __m512 acc[ROWS];                                                                       \
            for (int b = 0; b < ROWS; b++) acc[b] = _mm512_setzero_ps();                            \
            for (long i = 0; i < I; i++) {                                                          \
                __m512 a = load_##T(m, AT + i * R + j0);                                            \
                for (int b = 0; b < ROWS; b++)                                                      \
                    acc[b] = _mm512_fmadd_ps(_mm512_set1_ps(scalar_##T(xr[b] + i)), a, acc[b]);     \
            }                                                                                       \
            for (int b = 0; b < ROWS; b++) _mm512_mask_storeu_ps(u[b] + j0, m, acc[b]);             \
        }                                                                                           \
        for (long o0 = 0; o0 < O; o0 += width)                                                      \
            for (long c0 = 0; c0 < width; c0 += 16) {                                               \
                __mmask16 m = lanes(width - c0);                                                    \
                long at = (o0 / width) * block_stride + c0;                                         \
                __m512 acc[ROWS];                                                                   \
                for (int b = 0; b < ROWS; b++) acc[b] = load_##T(m, yr[b] + at);                    \
                for (long j = 0; j < R; j++) {                                                      \
                    __m512 bt = load_##T(m, BT + j * O + o0 + c0);                                  \
                    for (int b = 0; b < ROWS; b++)                                                  \
                        acc[b] = _mm512_fmadd_ps(_mm512_set1_ps(u[b][j]), bt, acc[b]);              \
                }                                                                                   \
                for (int b = 0; b < ROWS; b++) store_##T(m, yr[b] + at, acc[b]);                    \
            }                                                                                       \
    }

/* Every slot, over the team: blocks of 8 rows, then 4, then one at a time. */
#define LORA_ADD(T)                                                                                 \
    LORA_BLOCK(T, 1)                                                                                \
    LORA_BLOCK(T, 4)                                                                                \
    LORA_BLOCK(T, 8)                                                                                \
    static void lora_add_##T(const T *x, long x_stride, const int64_t *rows, const int64_t *starts,  \
                             long L, const T *AT, const T *BT, long I, long R, long O, T *out,     \
                             long out_stride, long width, long block_stride) {                      \
        _Pragma("omp parallel for schedule(dynamic, 1)")                                            \
        for (long l = 0; l < L; l++) {                                                              \
            const T *A = AT + l * I * R, *B = BT + l * R * O;                                       \
            long k = starts[l], end = starts[l + 1];                                                \
            for (; k + 8 <= end; k += 8)                                                            \
                lora_block_##T##_8(x, x_stride, rows + k, A, B, I, R, O, out, out_stride, width,    \
                                   block_stride);                                                   \
            for (; k + 4 <= end; k += 4)                                                            \
                lora_block_##T##_4(x, x_stride, rows + k, A, B, I, R, O, out, out_stride, width,    \
                                   block_stride);                                                   \
            for (; k < end; k++)                                                                    \
                lora_block_##T##_1(x, x_stride, rows + k, A, B, I, R, O, out, out_stride, width,    \
                                   block_stride);                                                   \
        }                                                                                           \
    }

typedef float f32;
typedef uint16_t bf16;
LORA_ADD(f32)
LORA_ADD(bf16)

/* out[rows] += B_l A_l x[rows] for every slot l (see the top of the file). `starts` holds
 * L + 1 offsets into `rows`. Returns 0, or -1 where the rank or the block width is not
 * taken (rank above LORA_MAX_RANK: the low-rank vectors live on the stack; O not a
 * multiple of width). */
int flexmoe_lora_add(int is_bf16, const void *x, long x_stride, const int64_t *rows, const int64_t *starts,
                     long L, const void *AT, const void *BT, long I, long R, long O, void *out,
                     long out_stride, long width, long block_stride) {
    if (R < 1 || R > LORA_MAX_RANK || width < 1 || O % width) return -1;
    if (is_bf16)
        lora_add_bf16((const bf16 *)x, x_stride, rows, starts, L, (const bf16 *)AT, (const bf16 *)BT, I, R, O,
                      (bf16 *)out, out_stride, width, block_stride);
    else
        lora_add_f32((const f32 *)x, x_stride, rows, starts, L, (const f32 *)AT, (const f32 *)BT, I, R, O,
                     (f32 *)out, out_stride, width, block_stride);
    return 0;
}
