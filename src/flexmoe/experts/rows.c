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

#include "vector_math.h"

#define OUT_BLOCK 4
/* Each weight row asks for the same column of the next block's row (OUT_BLOCK rows, I
 * columns further), which its thread reads next: one stream the prefetch keeps ahead of,
 * where the hardware prefetchers lose time at the start of every short row. */

static inline uint16_t round_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

static inline float bf16_to_float(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

static inline long clamp_row(long row, long rows) { return row < rows ? row : rows - 1; }

/* ------------------------------------------------------------------ bf16 weights */

/* One step of 32 columns: NW weight rows, each read once, against ROWS x rows. */
#define BF16_STEP(ROWS, NW, MASK)                                                                   \
    do {                                                                                            \
        __m512bh wv[NW];                                                                            \
        for (int r = 0; r < NW; r++) {                                                              \
            wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(MASK, wr[r] + i);                            \
            _mm_prefetch((const char *)(wr[r] + i + OUT_BLOCK * I), _MM_HINT_T0);                  \
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

static void vector_rows_bf16(const uint16_t *x, long M, const uint16_t *w, long O, long I, uint16_t *y) {
    long blocks = (O + OUT_BLOCK - 1) / OUT_BLOCK;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < blocks; b++)
        for (long m0 = 0; m0 < M; m0 += 2) bf16_block(x, M, m0, M - m0 > 1 ? 2 : 1, w, O, b * OUT_BLOCK, I, y);
}

/* ------------------------------------------------------------------ fp32 weights */

/* One step of 16 columns: OUT_BLOCK weight rows, each read once, against ROWS x rows. */
#define FP32_STEP(ROWS, MASK)                                                                        \
    do {                                                                                             \
        __m512 wv[OUT_BLOCK];                                                                        \
        for (int r = 0; r < OUT_BLOCK; r++) {                                                        \
            wv[r] = _mm512_maskz_loadu_ps(MASK, wr[r] + i);                                          \
            _mm_prefetch((const char *)(wr[r] + i + OUT_BLOCK * I), _MM_HINT_T0);                   \
        }                                                                                            \
        for (int k = 0; k < ROWS; k++) {                                                             \
            __m512 xv = _mm512_maskz_loadu_ps(MASK, xr[k] + i);                                      \
            for (int r = 0; r < OUT_BLOCK; r++) acc[k][r] = _mm512_fmadd_ps(wv[r], xv, acc[k][r]);   \
        }                                                                                            \
    } while (0)

/* sums[k][r] = xr[k] . wr[r] over I columns, in fp32: ROWS rows against OUT_BLOCK weight rows. */
#define FP32_SUMS(ROWS)                                                                              \
    static void fp32_sums_##ROWS(const float *const *xr, const float *const *wr, long I,            \
                                 float sums[][OUT_BLOCK]) {                                          \
        __m512 acc[ROWS][OUT_BLOCK];                                                                 \
        for (int k = 0; k < ROWS; k++)                                                               \
            for (int r = 0; r < OUT_BLOCK; r++) acc[k][r] = _mm512_setzero_ps();                     \
        long i = 0;                                                                                  \
        for (; i + 16 <= I; i += 16) FP32_STEP(ROWS, (__mmask16)0xffffu);                            \
        if (i < I) FP32_STEP(ROWS, (__mmask16)((1u << (I - i)) - 1));                                \
        for (int k = 0; k < ROWS; k++)                                                               \
            for (int r = 0; r < OUT_BLOCK; r++) sums[k][r] = _mm512_reduce_add_ps(acc[k][r]);        \
    }

FP32_SUMS(1)
FP32_SUMS(2)
FP32_SUMS(3)
FP32_SUMS(4)

/* y[m0..m0+rows, o0..o0+3] for 1 to 4 rows of x. */
static void fp32_block(const float *x, long M, long m0, int rows, const float *w, long O, long o0, long I,
                       float *y) {
    const float *xr[4], *wr[OUT_BLOCK];
    float sums[4][OUT_BLOCK];
    for (int k = 0; k < rows; k++) xr[k] = x + clamp_row(m0 + k, M) * I;
    for (int r = 0; r < OUT_BLOCK; r++) wr[r] = w + clamp_row(o0 + r, O) * I;
    if (rows == 4)
        fp32_sums_4(xr, wr, I, sums);
    else if (rows == 3)
        fp32_sums_3(xr, wr, I, sums);
    else if (rows == 2)
        fp32_sums_2(xr, wr, I, sums);
    else
        fp32_sums_1(xr, wr, I, sums);
    for (int k = 0; k < rows; k++)
        for (int r = 0; r < OUT_BLOCK && o0 + r < O; r++) y[(m0 + k) * O + o0 + r] = sums[k][r];
}

/* y = x @ w^T in fp32 for a few rows of x [M, I] and w [O, I]: each block of OUT_BLOCK weight rows
 * is read once for all rows (x stays in the cache), blocks split over the calling thread's team. */
int flexmoe_rows_fp32(const float *x, long M, const float *w, long O, long I, float *y) {
    long blocks = (O + OUT_BLOCK - 1) / OUT_BLOCK;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < blocks; b++) {
        long m0 = 0;
        while (m0 < M) {
            int rows = M - m0 >= 4 ? 4 : (int)(M - m0);
            fp32_block(x, M, m0, rows, w, O, b * OUT_BLOCK, I, y);
            m0 += rows;
        }
    }
    return 0;
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

/* flexmoe_expert_bf16 on the vector units: both products split over the team in one region. */
static int vector_expert_bf16(const uint16_t *x, long M, const uint16_t *w_in, const uint16_t *w_out, long D,
                              long F, int gated, int kind, const float *row_weights, uint16_t *y) {
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

/* ------------------------------------------------------------------ bf16 weights on AMX tiles */

/* With AMX (Sapphire Rapids and later), one TDPBF16PS multiplies 16 weight rows by 32
 * columns of up to 16 x rows: the tile unit keeps up with memory for any row count up to
 * AMX_MAX_ROWS, where the vector kernels above become compute-bound past 2 rows. The
 * weight stays as stored: a tile's A operand is 16 consecutive rows of w, 64 bytes of
 * each; the B operand is x transposed into pairs of columns (xb[i / 2][m][i % 2], the
 * "VNNI" layout), packed once per call. Weight rows go in groups of two 16-row blocks;
 * while a group is multiplied, the next group of the same thread is prefetched into L2 as
 * one sequential stream. Columns past the last whole 32 are summed in scalar fp32, and a
 * block of fewer than 16 rows is copied into zeroed scratch first. */
#ifndef FLEXMOE_NO_AMX
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_MAX_ROWS 32
#define BLOCK 16
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_enabled = 0;

/* Asks the kernel for the tile state (once per process); returns whether AMX is now used. */
int flexmoe_use_amx(int enable) {
    static int permitted = -1;
    if (enable && permitted < 0) permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    amx_enabled = enable && permitted > 0;
    return amx_enabled;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t columns_bytes[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-3: fp32 sums of block 0 (rows 0-15, 16-31 of x) and block 1; 4, 5: the blocks'
 * weights; 6, 7: x rows 0-15 and 16-31. */
static void configure_tiles(long M) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    uint16_t low = (uint16_t)((M < BLOCK ? M : BLOCK) * 4), high = (uint16_t)((M > BLOCK ? M - BLOCK : 0) * 4);
    uint16_t widths[8] = {low, high, low, high, 64, 64, low, high};
    for (int t = 0; t < 8; t++) {
        config.columns_bytes[t] = widths[t];
        config.rows[t] = widths[t] ? BLOCK : 0;
    }
    /* the asm's input is the whole struct (gcc 12 drops stores it thinks _tile_loadconfig won't read) */
    __asm__ volatile("ldtilecfg %0" : : "m"(config));
}

/* xb[(i / 2) * M + m][i % 2] = x[m, i], the last odd column's pair completed with zero. */
static void pack_pairs(const uint16_t *x, long M, long I, uint16_t *xb) {
    memset(xb, 0, (size_t)(((I + 1) / 2) * M * 2) * sizeof *xb);
    for (long m = 0; m < M; m++)
        for (long i = 0; i < I; i++) xb[((i >> 1) * M + m) * 2 + (i & 1)] = x[m * I + i];
}

static inline float packed_value(const uint16_t *xb, long M, long m, long i) {
    return bf16_to_float(xb[((i >> 1) * M + m) * 2 + (i & 1)]);
}

/* Where a block's tiles read: the rows in place, or the scratch copy of a short block. */
static const uint16_t *block_rows(const uint16_t *rows, long count, long I, uint16_t *scratch) {
    if (count == BLOCK) return rows;
    memset(scratch, 0, (size_t)(BLOCK * I) * sizeof *scratch);
    if (count > 0) memcpy(scratch, rows, (size_t)(count * I) * sizeof *scratch);
    return scratch;
}

/* sums[b][r][m] = x[m] . w_b[r] for blocks b = 0, 1 of `counts[b]` rows at `rows[b]` (16 at
 * most; a block of 0 rows is skipped), fp32; `next[b]` is prefetched (NULL: nothing). */
static void amx_group_sums(const uint16_t *xb, long M, long I, const uint16_t *const rows[2], const long counts[2],
                           const uint16_t *const next[2], uint16_t *scratch, float sums[2][BLOCK][AMX_MAX_ROWS]) {
    const uint16_t *w0 = block_rows(rows[0], counts[0], I, scratch);
    const uint16_t *w1 = counts[1] > 0 ? block_rows(rows[1], counts[1], I, scratch + BLOCK * I) : NULL;
    long stride = I * 2, x_stride = M * 4, whole = I / 32 * 32;
    int high = M > BLOCK;
    /* gcc's tile load and store intrinsics declare no memory effects: fence them in */
    __asm__ volatile("" : : : "memory");
    _tile_zero(0);
    _tile_zero(2);
    if (high) {
        _tile_zero(1);
        _tile_zero(3);
    }
    for (long i = 0, line = 0; i < whole; i += 32, line += BLOCK) {
        for (int b = 0; b < 2; b++)
            if (next[b] != NULL)
                for (int l = 0; l < BLOCK; l++) _mm_prefetch((const char *)next[b] + (line + l) * 64, _MM_HINT_T1);
        _tile_loadd(6, xb + i * M, x_stride);
        if (high) _tile_loadd(7, xb + i * M + 2 * BLOCK, x_stride);
        _tile_loadd(4, w0 + i, stride);
        _tile_dpbf16ps(0, 4, 6);
        if (high) _tile_dpbf16ps(1, 4, 7);
        if (w1 != NULL) {
            _tile_loadd(5, w1 + i, stride);
            _tile_dpbf16ps(2, 5, 6);
            if (high) _tile_dpbf16ps(3, 5, 7);
        }
    }
    long row_bytes = AMX_MAX_ROWS * sizeof(float);
    _tile_stored(0, &sums[0][0][0], row_bytes);
    _tile_stored(2, &sums[1][0][0], row_bytes);
    if (high) {
        _tile_stored(1, &sums[0][0][BLOCK], row_bytes);
        _tile_stored(3, &sums[1][0][BLOCK], row_bytes);
    }
    __asm__ volatile("" : : : "memory");
    for (int b = 0; b < 2; b++) /* the columns past the last whole 32 */
        for (long r = 0; r < counts[b]; r++)
            for (long m = 0; m < M; m++)
                for (long i = whole; i < I; i++)
                    sums[b][r][m] += bf16_to_float(rows[b][r * I + i]) * packed_value(xb, M, m, i);
}

/* This thread's share [*first, *end) of `count` groups, in one contiguous run (so that the
 * next group it prefetches is its own). */
static void thread_share(long count, long *first, long *end) {
    long threads = omp_get_num_threads(), t = omp_get_thread_num();
    *first = count * t / threads;
    *end = count * (t + 1) / threads;
}

static inline long block_count(long first, long total) {
    long left = total - first;
    return left < 0 ? 0 : left < BLOCK ? left : BLOCK;
}

/* y[M, O] = x @ w^T on the tiles, from the packed x; run by every thread of a team. */
static void amx_product(const uint16_t *xb, long M, const uint16_t *w, long O, long I, uint16_t *scratch,
                        uint16_t *y) {
    long groups = (O + 2 * BLOCK - 1) / (2 * BLOCK), first, end;
    float sums[2][BLOCK][AMX_MAX_ROWS];
    thread_share(groups, &first, &end);
    for (long g = first; g < end; g++) {
        long o0 = g * 2 * BLOCK;
        const uint16_t *rows[2] = {w + o0 * I, w + (o0 + BLOCK) * I};
        long counts[2] = {block_count(o0, O), block_count(o0 + BLOCK, O)};
        const uint16_t *next[2] = {NULL, NULL};
        if (g + 1 < end) next[0] = rows[0] + 2 * BLOCK * I, next[1] = rows[1] + 2 * BLOCK * I;
        amx_group_sums(xb, M, I, rows, counts, next, scratch, sums);
        for (int b = 0; b < 2; b++)
            for (long r = 0; r < counts[b]; r++)
                for (long m = 0; m < M; m++) y[m * O + o0 + b * BLOCK + r] = round_to_bf16(sums[b][r][m]);
    }
}

/* x [M, I] packed in pairs (pack_pairs) into new memory, or NULL. */
static uint16_t *packed_copy(const uint16_t *x, long M, long I) {
    uint16_t *xb = malloc((size_t)(((I + 1) / 2) * M * 2) * sizeof *xb);
    if (xb != NULL && x != NULL) pack_pairs(x, M, I, xb);
    return xb;
}

/* Room for two short blocks of `width` columns per thread, only where a block can be short
 * (output rows not a multiple of 16: weights of real models have none). */
static uint16_t *short_blocks(int short_rows, long width, int threads) {
    return short_rows ? malloc((size_t)(2 * BLOCK * width) * (size_t)threads * sizeof(uint16_t)) : NULL;
}

static uint16_t *thread_blocks(uint16_t *blocks, long width) {
    return blocks == NULL ? NULL : blocks + (long)omp_get_thread_num() * 2 * BLOCK * width;
}

static int amx_rows_bf16(const uint16_t *x, long M, const uint16_t *w, long O, long I, uint16_t *y) {
    uint16_t *xb = packed_copy(x, M, I), *blocks = short_blocks(O % BLOCK != 0, I, omp_get_max_threads());
    int status = xb == NULL || (O % BLOCK != 0 && blocks == NULL) ? -1 : 0;
    if (status == 0) {
#pragma omp parallel
        {
            configure_tiles(M);
            amx_product(xb, M, w, O, I, thread_blocks(blocks, I), y);
            _tile_release();
        }
    }
    free(xb);
    free(blocks);
    return status;
}

/* The activated column c of the group, rows m0..m0+15 (16 lanes): silu(gate) * up, or silu(h). */
static inline __m512 silu_column(float sums[2][BLOCK][AMX_MAX_ROWS], long c, long m0, __mmask16 lanes, int gated) {
    /* lanes past the rows stay zero: their stale sums could be denormals, which cost microcode assists */
    __m512 h = _mm512_maskz_loadu_ps(lanes, gated ? sums[0][c] + m0 : sums[c / BLOCK][c % BLOCK] + m0);
    __m512 value = _mm512_div_ps(h, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), h))));
    return gated ? _mm512_mul_ps(value, _mm512_maskz_loadu_ps(lanes, sums[1][c] + m0)) : value;
}

/* amx_ffn_in's activation step for silu, 16 rows at a time: columns f, f + 1 (f even) of
 * the rows are rounded to bf16 and stored as the pairs of the second product's B layout. */
static void silu_pairs(float sums[2][BLOCK][AMX_MAX_ROWS], long M, long columns, long f0, int gated,
                       const float *row_weights, uint16_t *ab) {
    /* lane 2k takes the first column's row k, lane 2k + 1 the second's */
    __m512i pairs = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                     37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    for (long m0 = 0; m0 < M; m0 += 16) {
        long rows = M - m0 < 16 ? M - m0 : 16;
        __mmask16 lanes = rows == 16 ? (__mmask16)0xffff : (__mmask16)((1u << rows) - 1);
        __m512 weight = row_weights == NULL ? _mm512_set1_ps(1.0f) : _mm512_maskz_loadu_ps(lanes, row_weights + m0);
        for (long c = 0; c < columns; c += 2) {
            __m256bh first = _mm512_cvtneps_pbh(_mm512_mul_ps(silu_column(sums, c, m0, lanes, gated), weight));
            __m256bh second = c + 1 < columns
                                  ? _mm512_cvtneps_pbh(_mm512_mul_ps(silu_column(sums, c + 1, m0, lanes, gated), weight))
                                  : (__m256bh)_mm256_setzero_si256();
            __m512i both = _mm512_permutex2var_epi16(_mm512_castsi256_si512((__m256i)first), pairs,
                                                     _mm512_castsi256_si512((__m256i)second));
            uint64_t stored = rows == 16 ? ~0ull : (1ull << (2 * rows)) - 1;
            if (c + 1 >= columns) stored &= 0x5555555555555555ull; /* the odd column is not there */
            long f = f0 + c;
            _mm512_mask_storeu_epi16(ab + ((f >> 1) * M + m0) * 2, (__mmask32)stored, both);
        }
    }
}

/* The first projection of one expert into ab, the activations packed for the second:
 * groups of 16 gate rows with their 16 up rows (gated) or 32 rows (not gated). */
static void amx_ffn_in(const uint16_t *xb, long M, const uint16_t *w_in, long D, long F, int gated, int kind,
                       const float *row_weights, uint16_t *scratch, uint16_t *ab) {
    long width = gated ? BLOCK : 2 * BLOCK, groups = (F + width - 1) / width, first, end;
    float sums[2][BLOCK][AMX_MAX_ROWS];
    thread_share(groups, &first, &end);
    for (long g = first; g < end; g++) {
        long f0 = g * width;
        long second = gated ? F + f0 : f0 + BLOCK;
        const uint16_t *rows[2] = {w_in + f0 * D, w_in + second * D};
        long counts[2] = {block_count(f0, F), block_count(gated ? f0 : f0 + BLOCK, F)};
        const uint16_t *next[2] = {NULL, NULL};
        if (g + 1 < end) next[0] = rows[0] + width * D, next[1] = rows[1] + width * D;
        amx_group_sums(xb, M, D, rows, counts, next, scratch, sums);
        long columns = F - f0 < width ? F - f0 : width;
        if (kind == ACT_SILU)
            silu_pairs(sums, M, columns, f0, gated, row_weights, ab);
        else
            for (long m = 0; m < M; m++) {
                float weight = row_weights == NULL ? 1.0f : row_weights[m];
                for (long c = 0; c < columns; c++) {
                    float value;
                    if (gated)
                        value = activate(sums[0][c][m], kind) * sums[1][c][m];
                    else
                        value = activate(sums[c / BLOCK][c % BLOCK][m], kind);
                    long f = f0 + c;
                    ab[((f >> 1) * M + m) * 2 + (f & 1)] = round_to_bf16(value * weight);
                }
            }
    }
}

static int amx_expert_bf16(const uint16_t *x, long M, const uint16_t *w_in, const uint16_t *w_out, long D, long F,
                           int gated, int kind, const float *row_weights, uint16_t *y) {
    long widest = D > F ? D : F;
    int short_rows = F % BLOCK != 0 || D % BLOCK != 0;
    uint16_t *xb = packed_copy(x, M, D), *ab = packed_copy(NULL, M, F);
    uint16_t *blocks = short_blocks(short_rows, widest, omp_get_max_threads());
    int status = xb == NULL || ab == NULL || (short_rows && blocks == NULL) ? -1 : 0;
    if (status == 0) {
        if (F % 2) memset(ab, 0, (size_t)(((F + 1) / 2) * M * 2) * sizeof *ab); /* the odd column's pair */
#pragma omp parallel
        {
            uint16_t *scratch = thread_blocks(blocks, widest);
            configure_tiles(M);
            amx_ffn_in(xb, M, w_in, D, F, gated, kind, row_weights, scratch, ab);
#pragma omp barrier
            amx_product(ab, M, w_out, D, F, scratch, y);
            _tile_release();
        }
    }
    free(xb);
    free(ab);
    free(blocks);
    return status;
}
#endif

/* ------------------------------------------------------------------ bf16 entry points */

/* y[M, O] = x @ w^T; returns 0, or -1 without scratch memory. */
int flexmoe_rows_bf16(const uint16_t *x, long M, const uint16_t *w, long O, long I, uint16_t *y) {
#ifndef FLEXMOE_NO_AMX
    if (amx_enabled && M <= AMX_MAX_ROWS) return amx_rows_bf16(x, M, w, O, I, y);
#endif
    vector_rows_bf16(x, M, w, O, I, y);
    return 0;
}

/* y[M, D] = (act(x @ w_in^T) * row_weights) @ w_out^T for one expert: w_in [H, D] ([gate; up]
 * when gated, H = 2F), w_out [D, F]. The activation (and its product with up and the row's
 * weight) is applied to the fp32 sums and rounded to bf16 once; each weight is read once.
 * Returns 0, or -1 without scratch memory. */
int flexmoe_expert_bf16(const uint16_t *x, long M, const uint16_t *w_in, const uint16_t *w_out, long D, long F,
                        int gated, int kind, const float *row_weights, uint16_t *y) {
#ifndef FLEXMOE_NO_AMX
    if (amx_enabled && M <= AMX_MAX_ROWS) return amx_expert_bf16(x, M, w_in, w_out, D, F, gated, kind, row_weights, y);
#endif
    return vector_expert_bf16(x, M, w_in, w_out, D, F, gated, kind, row_weights, y);
}

/* Many segments in one call (a layer's experts on their decoding rows): segment k is
 * flexmoe_rows_bf16 / flexmoe_expert_bf16 on the pointers x[k], w[k], y[k] (passed as
 * integers) and M[k] rows, with no return to the caller in between. Returns 0, or -1
 * if any call lacked scratch memory. */
int flexmoe_rows_bf16_many(long n, const int64_t *x, const int64_t *M, const int64_t *w, long O, long I,
                           const int64_t *y) {
    int status = 0;
    for (long k = 0; k < n; k++)
        status |= flexmoe_rows_bf16((const uint16_t *)(intptr_t)x[k], M[k], (const uint16_t *)(intptr_t)w[k], O,
                                    I, (uint16_t *)(intptr_t)y[k]);
    return status;
}

/* row_weights: NULL, or one pointer per segment. */
int flexmoe_expert_bf16_many(long n, const int64_t *x, const int64_t *M, const int64_t *w_in, const int64_t *w_out,
                             long D, long F, int gated, int kind, const int64_t *row_weights, const int64_t *y) {
    int status = 0;
    for (long k = 0; k < n; k++)
        status |= flexmoe_expert_bf16((const uint16_t *)(intptr_t)x[k], M[k], (const uint16_t *)(intptr_t)w_in[k],
                                      (const uint16_t *)(intptr_t)w_out[k], D, F, gated, kind,
                                      row_weights ? (const float *)(intptr_t)row_weights[k] : NULL,
                                      (uint16_t *)(intptr_t)y[k]);
    return status;
}

#ifdef FLEXMOE_NO_AMX
int flexmoe_use_amx(int enable) { return 0 * enable; }
#endif

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

/* 64 columns: one cache line of each weight row, and the next block's line requested. */
#define INT8_LINE(ROWS)                                                                             \
    do {                                                                                            \
        __m512i lo[OUT_BLOCK], hi[OUT_BLOCK];                                                       \
        for (int r = 0; r < OUT_BLOCK; r++) {                                                       \
            __m512i line = _mm512_loadu_si512(wr[r] + i);                                           \
            _mm_prefetch((const char *)(wr[r] + i + OUT_BLOCK * I), _MM_HINT_T0);                   \
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

/* flexmoe_expert_int8 on many segments in one call, as flexmoe_expert_bf16_many: segment k
 * on x[k], M[k] rows, q_in[k] with s_in[k], q_out[k] with s_out[k], into y[k]. */
int flexmoe_expert_int8_many(long n, const int64_t *x, const int64_t *M, const int64_t *q_in, const int64_t *s_in,
                             const int64_t *q_out, const int64_t *s_out, long D, long F, int gated, int kind,
                             const int64_t *row_weights, const int64_t *y) {
    int status = 0;
    for (long k = 0; k < n; k++)
        status |= flexmoe_expert_int8((const uint16_t *)(intptr_t)x[k], M[k], (const int8_t *)(intptr_t)q_in[k],
                                      (const float *)(intptr_t)s_in[k], (const int8_t *)(intptr_t)q_out[k],
                                      (const float *)(intptr_t)s_out[k], D, F, gated, kind,
                                      row_weights ? (const float *)(intptr_t)row_weights[k] : NULL,
                                      (uint16_t *)(intptr_t)y[k]);
    return status;
}

/* The OpenMP team size a parallel region of the calling thread gets: PyTorch's, when the
 * runtime is shared (what the tests check). */
int flexmoe_rows_threads(void) { return omp_get_max_threads(); }
