/* The gated SiLU (SwiGLU) of the experts, forward and backward, in one pass each.
 *
 * Over a [rows, cols] grid of gate values g and up values u (each row contiguous, rows
 * `stride` elements apart), with optional fp32 weights w (one per row or one per column:
 * the routing weights of the rows of a [N, F] layout, or of the columns of the fused
 * backend's [F, N] layout):
 *   forward:  a = silu(g) * u * w
 *   backward, given d (the gradient of a):
 *     a_w    = silu(g) * u * w                  (the weighted activation, if asked for)
 *     grad_w = sum of d * silu(g) * u           (over each weight's row or column, if asked for; fp32)
 *     d_up   = d * w * silu(g)
 *     d_gate = d * w * u * s * (1 + g * (1 - s)),  s = sigmoid(g)
 * Everything is computed in fp32 from fp32 or bf16 data and rounded once (nearest even),
 * where PyTorch's sequence of elementwise ops reads and writes the whole grid once for
 * each op (and rounds in between). Rows are split over the calling thread's OpenMP team.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "vector_math.h"

typedef float f32;
typedef uint16_t bf16;

enum { NO_WEIGHTS = 0, ROW_WEIGHTS = 1, COLUMN_WEIGHTS = 2 };

static inline __m512 sigmoid_ps(__m512 g) {
    return _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

#define SWIGLU_FORWARD(T)                                                                           \
    static void swiglu_forward_##T(const T *gate, const T *up, long stride, long rows, long cols,   \
                                   const float *w, int weights, T *out, long out_stride) {          \
        _Pragma("omp parallel for schedule(static)") for (long r = 0; r < rows; r++) {              \
            const T *g_row = gate + r * stride, *u_row = up + r * stride;                           \
            T *a_row = out + r * out_stride;                                                        \
            __m512 row_w = _mm512_set1_ps(weights == ROW_WEIGHTS ? w[r] : 1.0f);                   \
            for (long c = 0; c < cols; c += 16) {                                                   \
                __mmask16 m = mask16(cols - c);                                                     \
                __m512 g = load_##T(m, g_row + c), u = load_##T(m, u_row + c);                      \
                __m512 a = _mm512_mul_ps(_mm512_mul_ps(g, sigmoid_ps(g)), u);                       \
                a = _mm512_mul_ps(a, weights == COLUMN_WEIGHTS ? load_f32(m, w + c) : row_w);       \
                store_##T(m, a_row + c, a);                                                         \
            }                                                                                       \
        }                                                                                           \
    }

/* Per-column sums of grad_w (the [F, N] layout): each thread sums its rows' share in an
 * fp32 row of its own (it stays in the cache), added up at the end. Per-row sums (the
 * [N, F] layout) are one horizontal sum per row. */
#define SWIGLU_BACKWARD(T)                                                                          \
    static int swiglu_backward_##T(const T *gate, const T *up, long stride, const T *d,             \
                                   long d_stride, long rows, long cols, const float *w, int weights, \
                                   T *a_w, long a_stride, float *grad_w, T *d_gate, T *d_up,        \
                                   long out_stride) {                                               \
        int threads = omp_get_max_threads(), per_column = grad_w && weights == COLUMN_WEIGHTS;      \
        float *partial = per_column ? calloc((size_t)threads * (size_t)cols, sizeof(float)) : NULL; \
        if (per_column && !partial) return -2;                                                      \
        _Pragma("omp parallel") {                                                                   \
            float *mine = partial ? partial + (long)omp_get_thread_num() * cols : NULL;             \
            _Pragma("omp for schedule(static)") for (long r = 0; r < rows; r++) {                   \
                const T *g_row = gate + r * stride, *u_row = up + r * stride, *d_row = d + r * d_stride; \
                __m512 row_w = _mm512_set1_ps(weights == ROW_WEIGHTS ? w[r] : 1.0f);               \
                __m512 row_sum = _mm512_setzero_ps();                                               \
                for (long c = 0; c < cols; c += 16) {                                               \
                    __mmask16 m = mask16(cols - c);                                                 \
                    __m512 g = load_##T(m, g_row + c), u = load_##T(m, u_row + c);                  \
                    __m512 dd = load_##T(m, d_row + c);                                             \
                    __m512 weight = weights == COLUMN_WEIGHTS ? load_f32(m, w + c) : row_w;         \
                    __m512 s = sigmoid_ps(g), act = _mm512_mul_ps(g, s);                            \
                    __m512 a = _mm512_mul_ps(act, u);                                               \
                    if (a_w) store_##T(m, a_w + r * a_stride + c, _mm512_mul_ps(a, weight));        \
                    if (mine) store_f32(m, mine + c, _mm512_fmadd_ps(dd, a, load_f32(m, mine + c))); \
                    row_sum = _mm512_fmadd_ps(dd, a, row_sum); /* masked lanes load as zeros */     \
                    __m512 dw = _mm512_mul_ps(dd, weight);                                          \
                    store_##T(m, d_up + r * out_stride + c, _mm512_mul_ps(dw, act));                \
                    /* silu'(g) = s (1 + g (1 - s)) */                                              \
                    __m512 slope = _mm512_mul_ps(                                                   \
                        s, _mm512_fmadd_ps(g, _mm512_sub_ps(_mm512_set1_ps(1.0f), s), _mm512_set1_ps(1.0f))); \
                    store_##T(m, d_gate + r * out_stride + c, _mm512_mul_ps(_mm512_mul_ps(dw, u), slope)); \
                }                                                                                   \
                if (grad_w && weights == ROW_WEIGHTS) grad_w[r] = _mm512_reduce_add_ps(row_sum);    \
            }                                                                                       \
            if (partial) {                                                                          \
                _Pragma("omp for schedule(static)") for (long c = 0; c < cols; c++) {               \
                    float total = 0.0f;                                                             \
                    for (int t = 0; t < threads; t++) total += partial[(long)t * cols + c];        \
                    grad_w[c] = total;                                                              \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
        free(partial);                                                                              \
        return 0;                                                                                   \
    }

SWIGLU_FORWARD(f32)
SWIGLU_FORWARD(bf16)
SWIGLU_BACKWARD(f32)
SWIGLU_BACKWARD(bf16)

/* out = silu(gate) * up * w; `weights` 0 (none), 1 (w per row) or 2 (w per column). */
int flexmoe_swiglu_forward(int is_bf16, const void *gate, const void *up, long stride, long rows, long cols,
                           const float *w, int weights, void *out, long out_stride) {
    if (rows < 0 || cols < 0 || weights < NO_WEIGHTS || weights > COLUMN_WEIGHTS || (weights && !w)) return -1;
    if (is_bf16)
        swiglu_forward_bf16(gate, up, stride, rows, cols, w, weights, out, out_stride);
    else
        swiglu_forward_f32(gate, up, stride, rows, cols, w, weights, out, out_stride);
    return 0;
}

/* The backward above; `weights` as for the forward (w NULL for none); a_w and grad_w
 * (one per row or per column, as the weights) may be NULL. Returns 0, -1 for bad sizes
 * or weights, -2 where the per-thread sums could not be allocated. */
int flexmoe_swiglu_backward(int is_bf16, const void *gate, const void *up, long stride, const void *d,
                            long d_stride, long rows, long cols, const float *w, int weights, void *a_w,
                            long a_stride, float *grad_w, void *d_gate, void *d_up, long out_stride) {
    if (rows < 0 || cols < 0 || weights < NO_WEIGHTS || weights > COLUMN_WEIGHTS || (weights && !w) ||
        (grad_w && !weights))
        return -1;
    if (is_bf16)
        return swiglu_backward_bf16(gate, up, stride, d, d_stride, rows, cols, w, weights, a_w, a_stride, grad_w,
                                    d_gate, d_up, out_stride);
    return swiglu_backward_f32(gate, up, stride, d, d_stride, rows, cols, w, weights, a_w, a_stride, grad_w,
                               d_gate, d_up, out_stride);
}
