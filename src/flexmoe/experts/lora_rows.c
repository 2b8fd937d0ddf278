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
 * (P blocks of `width` columns: a caller may keep a gated expert's gate and up apart). Sums are fp32;
 * bf16 data is widened on load and the output rounded to nearest even once.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"

#define LORA_MAX_RANK 1024

static inline float scalar_f32(const float *p) { return *p; }

static inline float scalar_bf16(const uint16_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* The next slot's factors, fetched into L2 a few lines per step of a slot's first loop. */
struct ahead {
    const char *A, *B;
    long A_bytes, B_bytes;
};

static inline void fetch_ahead(const struct ahead *next, long step, long steps) {
    if (steps < 1) steps = 1;
    long lines = (next->A_bytes + next->B_bytes + 63) / 64, per_step = (lines + steps - 1) / steps;
    for (long line = step * per_step; line < (step + 1) * per_step && line < lines; line++) {
        long offset = line * 64;
        const char *p = offset < next->A_bytes ? next->A + offset : next->B + (offset - next->A_bytes);
        _mm_prefetch(p, _MM_HINT_T1);
    }
}

/* This thread's contiguous run [*first, *end) of the L slots, about its share of the rows. */
static void share_of_rows(const int64_t *starts, long L, long *first, long *end) {
    long threads = omp_get_num_threads(), t = omp_get_thread_num(), total = starts[L];
    long l = 0;
    while (l < L && starts[l] * threads < total * t) l++;
    *first = l;
    while (l < L && starts[l] * threads < total * (t + 1)) l++;
    *end = t + 1 == threads ? L : l;
}

/* u[b] = A x_b for ranks R < 16 dividing 16: G = 16 / R consecutive columns of A^T fill
 * one vector (lane k holds column i + k % G, rank k / G), so every lane works, against
 * x_b[i .. i + G) broadcast G values at a time; the G lanes of each rank are summed at
 * the end. Returns 0 (nothing done) for other ranks, or a bf16 x too wide for the
 * stack copy it is widened into. */
#define GROUPED_MAX_FLOATS 32768

static inline __m512 x_group(const float *p, int G) {
    switch (G) {
        case 2: {
            double pair;
            memcpy(&pair, p, sizeof pair);
            return _mm512_castpd_ps(_mm512_set1_pd(pair));
        }
        case 4: return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
        case 8: return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd((const double *)p)));
        default: return _mm512_loadu_ps(p);
    }
}

/* Loops over a block's rows, unrolled: a sum vector indexed at run time would live in
 * memory, and GCC then stores every vector sum at every step of the loops around it. */
#define EACH_ROW(b, ROWS) _Pragma("GCC unroll 8") for (int b = 0; b < (ROWS); b++)

/* With fewer than 4 rows, SPLIT independent sums per row keep the multiply-adds from
 * waiting on each other. */
#define SPLIT(ROWS) ((ROWS) >= 4 ? 1 : 4)

#define GROUPED_A(T, G, ROWS)                                                                       \
    static void grouped_A_##T##_##G##_##ROWS(const float *const *xf, const T *AT, long I, float *u, \
                                             const struct ahead *next) {                            \
        const int R = 16 / G, S = SPLIT(ROWS);                                                      \
        int index[16];                                                                              \
        for (int k = 0; k < 16; k++) index[k] = (k % G) * R + k / G;                                \
        __m512i lane_index = _mm512_loadu_si512(index);                                             \
        __m512 acc[ROWS][SPLIT(ROWS)];                                                              \
        EACH_ROW(b, ROWS)                                                                           \
            _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) acc[b][s] = _mm512_setzero_ps();    \
        long i = 0, steps = I / (G * S);                                                            \
        for (long step = 0; step < steps; step++, i += G * S) {                                     \
            if (next) fetch_ahead(next, step, steps);                                               \
            _Pragma("GCC unroll 4") for (int s = 0; s < S; s++) {                                   \
                __m512 a = _mm512_permutexvar_ps(lane_index, load_##T((__mmask16)0xffff, AT + (i + s * G) * R)); \
                EACH_ROW(b, ROWS)                                                                   \
                    acc[b][s] = _mm512_fmadd_ps(x_group(xf[b] + i + s * G, G), a, acc[b][s]);       \
            }                                                                                       \
        }                                                                                           \
        for (; i + G <= I; i += G) {                                                                \
            __m512 a = _mm512_permutexvar_ps(lane_index, load_##T((__mmask16)0xffff, AT + i * R));  \
            EACH_ROW(b, ROWS) acc[b][0] = _mm512_fmadd_ps(x_group(xf[b] + i, G), a, acc[b][0]);     \
        }                                                                                           \
        float sums[ROWS][16];                                                                       \
        EACH_ROW(b, ROWS) {                                                                         \
            _Pragma("GCC unroll 4") for (int s = 1; s < S; s++) acc[b][0] = _mm512_add_ps(acc[b][0], acc[b][s]); \
            _mm512_storeu_ps(sums[b], acc[b][0]);                                                   \
        }                                                                                           \
        for (int b = 0; b < ROWS; b++) {                                                            \
            for (int j = 0; j < R; j++) {                                                           \
                float total = 0.0f;                                                                 \
                for (int g = 0; g < G; g++) total += sums[b][j * G + g];                            \
                for (long t = i; t < I; t++) total += xf[b][t] * scalar_##T(AT + t * R + j);        \
                u[b * R + j] = total;                                                               \
            }                                                                                       \
        }                                                                                           \
    }

#define GROUPED_A_G(T, G)                                                                           \
    GROUPED_A(T, G, 1)                                                                              \
    GROUPED_A(T, G, 4)                                                                              \
    GROUPED_A(T, G, 8)                                                                              \
    static void grouped_A_##T##_##G(const float *const *xf, const T *AT, long I, int rows, float *u, \
                                    const struct ahead *next) {                                     \
        if (rows == 1) grouped_A_##T##_##G##_1(xf, AT, I, u, next);                                 \
        else if (rows == 4) grouped_A_##T##_##G##_4(xf, AT, I, u, next);                            \
        else grouped_A_##T##_##G##_8(xf, AT, I, u, next);                                           \
    }

#define GROUPED_A_ALL(T)                                                                            \
    GROUPED_A_G(T, 2)                                                                               \
    GROUPED_A_G(T, 4)                                                                               \
    GROUPED_A_G(T, 8)                                                                               \
    GROUPED_A_G(T, 16)                                                                              \
    static int grouped_A_##T(const T *const *xr, const T *AT, long I, long R, int rows, float *u,   \
                             const struct ahead *next) {                                            \
        if (R >= 16 || 16 % R || (long)rows * I > GROUPED_MAX_FLOATS) return 0;                     \
        float widened[(long)rows * I + 1];                                                          \
        const float *xf[8];                                                                         \
        for (int b = 0; b < rows; b++) xf[b] = widen_##T(xr[b], I, widened + b * I);                \
        switch (16 / R) {                                                                           \
            case 2: grouped_A_##T##_2(xf, AT, I, rows, u, next); break;                             \
            case 4: grouped_A_##T##_4(xf, AT, I, rows, u, next); break;                             \
            case 8: grouped_A_##T##_8(xf, AT, I, rows, u, next); break;                             \
            default: grouped_A_##T##_16(xf, AT, I, rows, u, next); break;                           \
        }                                                                                           \
        return 1;                                                                                   \
    }

/* x as fp32: an fp32 row as it is, a bf16 row widened into `scratch`. */
static inline const float *widen_f32(const float *x, long I, float *scratch) {
    (void)I, (void)scratch;
    return x;
}
static inline const float *widen_bf16(const uint16_t *x, long I, float *scratch) {
    for (long i = 0; i < I; i += 16) {
        __mmask16 m = mask16(I - i);
        _mm512_mask_storeu_ps(scratch + i, m, load_bf16(m, x + i));
    }
    return scratch;
}

typedef float f32;
typedef uint16_t bf16;
GROUPED_A_ALL(f32)
GROUPED_A_ALL(bf16)

/* ROWS rows of one slot: u = A x for each (16 ranks at a time), then out += B u (16 output
 * columns at a time), every factor vector loaded once for the ROWS rows. */
#define LORA_BLOCK(T, ROWS)                                                                         \
    static void lora_block_##T##_##ROWS(const T *x, long x_stride, const int64_t *rows,             \
                                        const T *AT, const T *BT, long I, long R, long O, T *out,   \
                                        long out_stride, long width, long block_stride,             \
                                        const struct ahead *next, int valid) {                      \
        float u[ROWS][R];                                                                           \
        const T *xr[ROWS];                                                                          \
        T *yr[ROWS];                                                                                \
        for (int b = 0; b < ROWS; b++) { /* rows past `valid` repeat the first: computed, not stored */ \
            xr[b] = x + rows[b < valid ? b : 0] * x_stride;                                         \
            yr[b] = out + rows[b < valid ? b : 0] * out_stride;                                     \
        }                                                                                           \
        if (grouped_A_##T(xr, AT, I, R, ROWS, &u[0][0], next)) {                                    \
        } else                                                                                      \
        for (long j0 = 0; j0 < R; j0 += 16) {                                                       \
            __mmask16 m = mask16(R - j0);                                                            \
            __m512 acc[ROWS];                                                                       \
            EACH_ROW(b, ROWS) acc[b] = _mm512_setzero_ps();                                         \
            for (long i = 0; i < I; i++) {                                                          \
                if (next) fetch_ahead(next, i, I);                                                  \
                __m512 a = load_##T(m, AT + i * R + j0);                                            \
                EACH_ROW(b, ROWS)                                                                   \
                    acc[b] = _mm512_fmadd_ps(_mm512_set1_ps(scalar_##T(xr[b] + i)), a, acc[b]);     \
            }                                                                                       \
            EACH_ROW(b, ROWS) _mm512_mask_storeu_ps(u[b] + j0, m, acc[b]);                          \
        }                                                                                           \
        for (long o0 = 0; o0 < O; o0 += width)                                                      \
            for (long c0 = 0; c0 < width; c0 += 16) {                                               \
                __mmask16 m = mask16(width - c0);                                                    \
                long at = (o0 / width) * block_stride + c0;                                         \
                __m512 acc[ROWS];                                                                   \
                EACH_ROW(b, ROWS) acc[b] = load_##T(m, yr[b] + at);                                 \
                for (long j = 0; j < R; j++) {                                                      \
                    __m512 bt = load_##T(m, BT + j * O + o0 + c0);                                  \
                    EACH_ROW(b, ROWS)                                                               \
                        acc[b] = _mm512_fmadd_ps(_mm512_set1_ps(u[b][j]), bt, acc[b]);              \
                }                                                                                   \
                EACH_ROW(b, ROWS) if (b < valid) store_##T(m, yr[b] + at, acc[b]);                  \
            }                                                                                       \
    }

/* Every slot, over the team: blocks of 8 rows, then 4, then one at a time. Each thread
 * takes a contiguous run of slots holding about its share of the rows, and while it
 * computes a slot's first block it prefetches the factors of its next slot with rows into L2: a slot's
 * few rows leave too little time for the hardware prefetchers to ramp up on its own. */
#define LORA_ADD(T)                                                                                 \
    LORA_BLOCK(T, 1)                                                                                \
    LORA_BLOCK(T, 4)                                                                                \
    LORA_BLOCK(T, 8)                                                                                \
    static void lora_add_##T(const T *x, long x_stride, const int64_t *rows, const int64_t *starts, \
                             long L, const T *AT, const T *BT, long I, long R, long O, T *out,      \
                             long out_stride, long width, long block_stride) {                      \
        _Pragma("omp parallel") {                                                                   \
            long first, end_slot;                                                                   \
            share_of_rows(starts, L, &first, &end_slot);                                            \
            for (long l = first; l < end_slot; l++) {                                               \
                long k = starts[l], end = starts[l + 1];                                            \
                if (k == end) continue;                                                             \
                const T *A = AT + l * I * R, *B = BT + l * R * O;                                   \
                long n = l + 1; /* the next slot with rows: in decode most slots have none */       \
                while (n < end_slot && starts[n] == starts[n + 1]) n++;                             \
                struct ahead next = {(const char *)(AT + n * I * R), (const char *)(BT + n * R * O), \
                                     (long)sizeof(T) * I * R, (long)sizeof(T) * R * O};             \
                const struct ahead *pf = n < end_slot ? &next : 0;                                  \
                for (; k < end; k += 8, pf = 0) { /* a last block of 2-4 rows runs as 4, of 5-7 as 8 */ \
                    int valid = end - k < 8 ? (int)(end - k) : 8;                                   \
                    if (valid > 4)                                                                  \
                        lora_block_##T##_8(x, x_stride, rows + k, A, B, I, R, O, out, out_stride,   \
                                           width, block_stride, pf, valid);                         \
                    else if (valid > 1)                                                             \
                        lora_block_##T##_4(x, x_stride, rows + k, A, B, I, R, O, out, out_stride,   \
                                           width, block_stride, pf, valid);                         \
                    else                                                                            \
                        lora_block_##T##_1(x, x_stride, rows + k, A, B, I, R, O, out, out_stride,   \
                                           width, block_stride, pf, valid);                         \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }

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
