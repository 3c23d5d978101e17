/* Routed-expert SwiGLU for fp32 on x86-64 CPUs with AVX2 + FMA, for few rows per expert.
 *
 * y[r] = W2_e (silu(W1_e x[r]) * W3_e x[r]) for the rows r of each expert e, rows sorted by expert.
 * w13 [E, 2I, H] holds W1 (gate) rows then W3 (up) rows, w2 [E, H, I]: the checkpoint's
 * [out, in] layout, so a weight row and an input row are both contiguous along the reduction and
 * each output is a dot product. A 4 x 3 register tile (4 input rows, 3 weight rows, 12
 * accumulators) reads every weight row once per expert from memory and reuses it from L1 for all
 * of that expert's rows: no packing pass over the weights, which is what a BLAS call spends most
 * of its time on when an expert has ~8 rows. Threads (the caller's OpenMP team, i.e. torch's when
 * loaded into a torch process) take (expert, row chunk) items dynamically.
 *
 * Summation order: 8 interleaved partial sums along the reduction, then a fixed tree; results
 * match a BLAS matmul to fp32 rounding, not bit for bit.
 *
 * The weights may also be held in bf16 (a bf16 checkpoint computed in fp32 on a CPU without bf16
 * matrix instructions): each is widened to fp32 in a register as it is loaded, which is exact, and
 * the arithmetic is the fp32 path's, so the results are the same bits as with the weights upcast
 * at load, for half the memory traffic of a step that is bound by reading the weights. The scalar
 * tails (widths not a multiple of 8; no GLM shape has one) are fused multiply-adds in both, as the
 * vector steps are (before the bf16 form they were a rounded product, then an add).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define MR 4
#define NR 3
#define ROWS_PER_ITEM 64

/* Weights are fp32, or bf16 where `bf16` (a compile-time constant in every specialised caller). */
static inline __attribute__((always_inline)) const void *wptr(const void *w, int64_t i, const int bf16)
{
    return (const char *)w + i * (bf16 ? 2 : 4);
}

/* w[i .. i + 8) as fp32; a bf16 value is the upper half of its fp32 bits, so widening is exact */
static inline __attribute__((always_inline)) __m256 wload8(const void *w, int64_t i, const int bf16)
{
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)w + i);
}

static inline __attribute__((always_inline)) float wload1(const void *w, int64_t i, const int bf16)
{
    if (bf16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    return ((const float *)w)[i];
}

/* out[m * ldo + n] = dot(x[m * ldx : + k], w[n * k : + k]) for m < mr, n < nr (mr <= MR, nr <= NR). */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, const void *w, int64_t k,
                                                       float *out, int64_t ldo, const int mr, const int nr,
                                                       const int bf16)
{
    __m256 acc[MR][NR];
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++)
            acc[m][n] = _mm256_setzero_ps();
    int64_t kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        __m256 wv[NR];
        for (int n = 0; n < nr; n++)
            wv[n] = wload8(w, n * k + kk, bf16);
        for (int m = 0; m < mr; m++) {
            __m256 xv = _mm256_loadu_ps(x + m * ldx + kk);
            for (int n = 0; n < nr; n++)
                acc[m][n] = _mm256_fmadd_ps(xv, wv[n], acc[m][n]);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++) {
            float s = hsum256(acc[m][n]);
            for (int64_t t = kk; t < k; t++)
                s = fmaf(x[m * ldx + t], wload1(w, n * k + t, bf16), s); /* fused, as the vector steps */
            out[m * ldo + n] = s;
        }
}

/* The full 4 x 3 tile written out, so the 12 accumulators, 3 weight vectors and 1 input vector
 * stay in the 16 ymm registers; it also prefetches the next 3 weight rows (pf) while the current
 * ones stream, so the first row block's reads overlap with compute. */
static inline __attribute__((always_inline)) void tile_4x3(const float *x, int64_t ldx, const void *w, int64_t k,
                                                           float *out, int64_t ldo, const void *pf, const int bf16)
{
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    const int64_t line = bf16 ? 32 : 16; /* weights per 64-byte cache line */
    int64_t kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        if (pf && (kk & (line - 1)) == 0) {
            _mm_prefetch((const char *)wptr(pf, kk, bf16), _MM_HINT_T0);
            _mm_prefetch((const char *)wptr(pf, k + kk, bf16), _MM_HINT_T0);
            _mm_prefetch((const char *)wptr(pf, 2 * k + kk, bf16), _MM_HINT_T0);
        }
        __m256 b0 = wload8(w, kk, bf16), b1 = wload8(w, k + kk, bf16), b2 = wload8(w, 2 * k + kk, bf16);
        __m256 v = _mm256_loadu_ps(x0 + kk);
        a00 = _mm256_fmadd_ps(v, b0, a00); a01 = _mm256_fmadd_ps(v, b1, a01); a02 = _mm256_fmadd_ps(v, b2, a02);
        v = _mm256_loadu_ps(x1 + kk);
        a10 = _mm256_fmadd_ps(v, b0, a10); a11 = _mm256_fmadd_ps(v, b1, a11); a12 = _mm256_fmadd_ps(v, b2, a12);
        v = _mm256_loadu_ps(x2 + kk);
        a20 = _mm256_fmadd_ps(v, b0, a20); a21 = _mm256_fmadd_ps(v, b1, a21); a22 = _mm256_fmadd_ps(v, b2, a22);
        v = _mm256_loadu_ps(x3 + kk);
        a30 = _mm256_fmadd_ps(v, b0, a30); a31 = _mm256_fmadd_ps(v, b1, a31); a32 = _mm256_fmadd_ps(v, b2, a32);
    }
    float s[NR][MR];
    _mm_storeu_ps(s[0], hsum4(a00, a10, a20, a30));
    _mm_storeu_ps(s[1], hsum4(a01, a11, a21, a31));
    _mm_storeu_ps(s[2], hsum4(a02, a12, a22, a32));
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++) {
            for (int64_t t = kk; t < k; t++)
                s[n][m] = fmaf(x[m * ldx + t], wload1(w, n * k + t, bf16), s[n][m]);
            out[m * ldo + n] = s[n][m];
        }
}

#define TILE_CASE(MRV, NRV) tile(x + m0 * ldx, ldx, wr, k, out + m0 * ldo + n0, ldo, MRV, NRV, bf16)

static inline __attribute__((always_inline)) void tile_dispatch(const float *x, int64_t ldx, const void *wr, int64_t k,
                                                                float *out, int64_t ldo, int64_t m0, int64_t n0,
                                                                int mr, int nr, const void *pf, const int bf16)
{
    switch (mr * 4 + nr) {
    case 4 * 4 + 3: tile_4x3(x + m0 * ldx, ldx, wr, k, out + m0 * ldo + n0, ldo, pf, bf16); break;
    case 4 * 4 + 2: TILE_CASE(4, 2); break;
    case 4 * 4 + 1: TILE_CASE(4, 1); break;
    case 3 * 4 + 3: TILE_CASE(3, 3); break;
    case 3 * 4 + 2: TILE_CASE(3, 2); break;
    case 3 * 4 + 1: TILE_CASE(3, 1); break;
    case 2 * 4 + 3: TILE_CASE(2, 3); break;
    case 2 * 4 + 2: TILE_CASE(2, 2); break;
    case 2 * 4 + 1: TILE_CASE(2, 1); break;
    case 1 * 4 + 3: TILE_CASE(1, 3); break;
    case 1 * 4 + 2: TILE_CASE(1, 2); break;
    default: TILE_CASE(1, 1); break;
    }
}

/* out [rows, n] = x [rows, k] @ w [n, k]^T; the weight rows are the outer loop so each is read
 * from memory once and reused from cache for every row block. */
static inline __attribute__((always_inline)) void matmul_nt(const float *x, int64_t rows, int64_t ldx, const void *w,
                                                            int64_t n, int64_t k, float *out, int64_t ldo,
                                                            const int bf16)
{
    for (int64_t n0 = 0; n0 < n; n0 += NR) {
        int nr = n - n0 < NR ? (int)(n - n0) : NR;
        const void *wr = wptr(w, n0 * k, bf16);
        for (int64_t m0 = 0; m0 < rows; m0 += MR) {
            int mr = rows - m0 < MR ? (int)(rows - m0) : MR;
            /* the first row block prefetches the next weight rows */
            const void *pf = m0 == 0 && n0 + 2 * NR <= n ? wptr(wr, NR * k, bf16) : NULL;
            tile_dispatch(x, ldx, wr, k, out, ldo, m0, n0, mr, nr, pf, bf16);
        }
    }
}

/* One item: rows [r0, r0 + rows) of x all use expert e. scratch holds rows * 3I floats. */
static inline __attribute__((always_inline)) void expert_rows(const float *x, const void *w13, const void *w2,
                                                              float *y, int64_t r0, int64_t rows, int64_t e,
                                                              int64_t hidden, int64_t inter, float *scratch,
                                                              const int bf16)
{
    float *gu = scratch;                        /* [rows, 2I] gate | up */
    float *act = scratch + rows * 2 * inter;    /* [rows, I] */
    matmul_nt(x + r0 * hidden, rows, hidden, wptr(w13, e * 2 * inter * hidden, bf16), 2 * inter, hidden, gu,
              2 * inter, bf16);
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
        float *a = act + r * inter;
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) { /* silu(g) * u = g / (1 + e^-g) * u */
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
            _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
        }
        for (; i < inter; i++)
            a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    matmul_nt(act, rows, inter, wptr(w2, e * hidden * inter, bf16), hidden, inter, y + r0 * hidden, hidden, bf16);
}

/* expert_rows made twice, each with its weight type fixed */
static void expert_rows_f32(const float *x, const void *w13, const void *w2, float *y, int64_t r0, int64_t rows,
                            int64_t e, int64_t hidden, int64_t inter, float *scratch)
{
    expert_rows(x, w13, w2, y, r0, rows, e, hidden, inter, scratch, 0);
}

static void expert_rows_bf16(const float *x, const void *w13, const void *w2, float *y, int64_t r0, int64_t rows,
                             int64_t e, int64_t hidden, int64_t inter, float *scratch)
{
    expert_rows(x, w13, w2, y, r0, rows, e, hidden, inter, scratch, 1);
}

/* A whole MoE layer's routed experts at decode sizes, with the routing bookkeeping in here too:
 * hidden [T, H], ids [T, K] local expert slots (-1: the pair is computed elsewhere), weights
 * [T, K] fp32, w13/w2 as above (bf16 where weights_bf16, else fp32), pairs [T * K, H] scratch, out [T, H].
 * out[t] = sum over k of weights[t, k] * SwiGLU_{ids[t, k]}(hidden[t]), k in order, skipped pairs
 * adding 0: what sorting the pairs by expert, one kernel call, scaling and a sum over k give, without
 * a torch op per stage (each a pass over [T * K, H] and an OpenMP region of its own).
 * Returns 0, 1 when an expert has more than max_rows rows (declined: nothing written; the caller
 * takes the torch path, which is faster there), or -1 when scratch memory ran out. */
int glm_ray_moe(const float *hidden, int64_t t, int64_t k, const int64_t *ids, const float *weights,
                int64_t experts, const void *w13, const void *w2, int weights_bf16, float *pairs, float *out,
                int64_t hidden_size, int64_t inter, int64_t max_rows, int threads)
{
    const int64_t p = t * k;
    int64_t *counts = calloc(experts + 1, sizeof(int64_t));
    int64_t *order = malloc(sizeof(int64_t) * (p > 0 ? p : 1)); /* pair indices grouped by expert, stable */
    int64_t *items = malloc(sizeof(int64_t) * 3 * (p > 0 ? p : 1));
    if (!counts || !order || !items) {
        free(counts), free(order), free(items);
        return -1;
    }
    for (int64_t i = 0; i < p; i++)
        if (ids[i] >= 0 && ids[i] < experts)
            counts[ids[i] + 1]++;
    int64_t busiest = 0;
    for (int64_t e = 1; e <= experts; e++)
        busiest = counts[e] > busiest ? counts[e] : busiest;
    if (busiest > max_rows) {
        free(counts), free(order), free(items);
        return 1;
    }
    for (int64_t e = 0; e < experts; e++) /* counts[e] becomes expert e's first place in order */
        counts[e + 1] += counts[e];
    int64_t n_items = 0;
    for (int64_t e = 0; e < experts; e++)
        for (int64_t r = counts[e]; r < counts[e + 1]; r += ROWS_PER_ITEM) {
            items[3 * n_items] = e;
            items[3 * n_items + 1] = r;
            items[3 * n_items + 2] = counts[e + 1] - r < ROWS_PER_ITEM ? counts[e + 1] - r : ROWS_PER_ITEM;
            n_items++;
        }
    for (int64_t i = 0; i < p; i++)
        if (ids[i] >= 0 && ids[i] < experts)
            order[counts[ids[i]]++] = i;
    int failed = 0;
    if (threads < 1)
        threads = 1;
#pragma omp parallel num_threads(threads)
    {
        /* gathered rows, their gate|up and activation, and their outputs */
        float *x = thread_scratch(ROWS_PER_ITEM * (2 * hidden_size + 3 * inter), &failed);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n_items; it++) {
            if (!x)
                continue;
            int64_t e = items[3 * it], first = items[3 * it + 1], rows = items[3 * it + 2];
            float *y = x + ROWS_PER_ITEM * hidden_size, *scratch = y + ROWS_PER_ITEM * hidden_size;
            for (int64_t r = 0; r < rows; r++) {
                const float *src = hidden + (order[first + r] / k) * hidden_size;
                for (int64_t h = 0; h < hidden_size; h++)
                    x[r * hidden_size + h] = src[h];
            }
            (weights_bf16 ? expert_rows_bf16 : expert_rows_f32)(x, w13, w2, y, 0, rows, e, hidden_size, inter,
                                                                scratch);
            for (int64_t r = 0; r < rows; r++) {
                int64_t pair = order[first + r];
                __m256 wv = _mm256_set1_ps(weights[pair]);
                float *dst = pairs + pair * hidden_size, *src = y + r * hidden_size;
                int64_t h = 0;
                for (; h + 8 <= hidden_size; h += 8)
                    _mm256_storeu_ps(dst + h, _mm256_mul_ps(_mm256_loadu_ps(src + h), wv));
                for (; h < hidden_size; h++)
                    dst[h] = src[h] * weights[pair];
            }
        }
        /* each token's pairs, summed in k order; a skipped pair adds nothing (as its zero would) */
#pragma omp for schedule(static)
        for (int64_t tok = 0; tok < t; tok++) {
            float *dst = out + tok * hidden_size;
            int any = 0;
            for (int64_t j = 0; j < k; j++) {
                int64_t id = ids[tok * k + j];
                if (id < 0 || id >= experts)
                    continue;
                const float *src = pairs + (tok * k + j) * hidden_size;
                if (!any) {
                    for (int64_t h = 0; h < hidden_size; h++)
                        dst[h] = src[h];
                    any = 1;
                } else {
                    int64_t h = 0;
                    for (; h + 8 <= hidden_size; h += 8)
                        _mm256_storeu_ps(dst + h, _mm256_add_ps(_mm256_loadu_ps(dst + h), _mm256_loadu_ps(src + h)));
                    for (; h < hidden_size; h++)
                        dst[h] += src[h];
                }
            }
            if (!any)
                for (int64_t h = 0; h < hidden_size; h++)
                    dst[h] = 0.0f;
        }
        free(x);
    }
    free(counts), free(order), free(items);
    return failed ? -1 : 0;
}

/* The bookkeeping after torch's matmuls, where experts have too many rows for the kernel above
 * (prefill): y [n, H] holds the outputs of the kept pairs sorted by expert, order [n] their pair
 * indices among the t * k pairs (the others were skipped). out[tok] = sum over j, in order, of
 * y[row of pair (tok, j)] * weights[tok, j], a skipped pair adding nothing: the arithmetic of
 * scaling the sorted rows, scattering them into zeroed [T * K, H] pairs and summing over k (each
 * product rounded, then added left to right), in one pass over y instead of four torch ops, each a
 * pass over [T * K, H] memory. torch sums over k in that order where k <= 4 or H is a multiple of
 * its vector block (32 floats with AVX2, 64 with AVX-512); elsewhere it interleaves, and callers
 * keep its ops. The sum starts from +0, as torch's does (so it is never -0). Returns 0, -1 when
 * memory ran out, -2 when an entry of order is not a pair index. */
__attribute__((optimize("fp-contract=off"))) /* GCC: a product is rounded before it is added */
int glm_ray_moe_combine(const float *y, int64_t n, const int64_t *order, int64_t t, int64_t k,
                        const float *weights, float *out, int64_t hidden_size, int threads)
{
#ifdef __clang__
#pragma clang fp contract(off) /* the same for clang, which ignores the attribute */
#endif
    const int64_t p = t * k;
    int64_t *row = malloc(sizeof(int64_t) * (p > 0 ? p : 1)); /* pair -> its row of y, -1: skipped */
    if (!row)
        return -1;
    for (int64_t i = 0; i < p; i++)
        row[i] = -1;
    for (int64_t r = 0; r < n; r++) {
        if (order[r] < 0 || order[r] >= p) {
            free(row);
            return -2;
        }
        row[order[r]] = r;
    }
    if (threads < 1)
        threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tok = 0; tok < t; tok++) {
        float *dst = out + tok * hidden_size;
        for (int64_t h = 0; h < hidden_size; h++)
            dst[h] = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            int64_t r = row[tok * k + j];
            if (r < 0)
                continue;
            const float *src = y + r * hidden_size;
            const float w = weights[tok * k + j];
            const __m256 wv = _mm256_set1_ps(w);
            int64_t h = 0;
            for (; h + 8 <= hidden_size; h += 8)
                _mm256_storeu_ps(dst + h, _mm256_add_ps(_mm256_loadu_ps(dst + h),
                                                        _mm256_mul_ps(_mm256_loadu_ps(src + h), wv)));
            for (; h < hidden_size; h++)
                dst[h] += src[h] * w;
        }
    }
    free(row);
    return 0;
}
