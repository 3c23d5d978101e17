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
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MR 4
#define NR 3
#define ROWS_PER_ITEM 64

static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* [sum(a), sum(b), sum(c), sum(d)] */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d)
{
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    __m256 abcd = _mm256_hadd_ps(ab, cd); /* per 128-bit lane: a, b, c, d partial sums */
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* exp(x) for 8 floats: Cody-Waite range reduction to x = n ln2 + r, |r| <= ln2 / 2, then the
 * Cephes degree-6 polynomial for e^r; ~1 ulp. Inputs are clamped to where fp32 exp is finite and
 * normal (below, e^x comes out 0). */
static inline __m256 exp256(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.37626f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* out[m * ldo + n] = dot(x[m * ldx : + k], w[n * k : + k]) for m < mr, n < nr (mr <= MR, nr <= NR). */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, const float *w, int64_t k,
                                                       float *out, int64_t ldo, const int mr, const int nr)
{
    __m256 acc[MR][NR];
    for (int m = 0; m < mr; m++)
        for (int n = 0; n < nr; n++)
            acc[m][n] = _mm256_setzero_ps();
    int64_t kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        __m256 wv[NR];
        for (int n = 0; n < nr; n++)
            wv[n] = _mm256_loadu_ps(w + n * k + kk);
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
                s += x[m * ldx + t] * w[n * k + t];
            out[m * ldo + n] = s;
        }
}

/* The full 4 x 3 tile written out, so the 12 accumulators, 3 weight vectors and 1 input vector
 * stay in the 16 ymm registers; it also prefetches the next 3 weight rows (pf) while the current
 * ones stream, so the first row block's reads overlap with compute. */
static inline void tile_4x3(const float *x, int64_t ldx, const float *w, int64_t k, float *out, int64_t ldo,
                            const float *pf)
{
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    const float *w0 = w, *w1 = w + k, *w2 = w + 2 * k;
    int64_t kk = 0;
    for (; kk + 8 <= k; kk += 8) {
        if (pf && (kk & 15) == 0) {
            _mm_prefetch((const char *)(pf + kk), _MM_HINT_T0);
            _mm_prefetch((const char *)(pf + k + kk), _MM_HINT_T0);
            _mm_prefetch((const char *)(pf + 2 * k + kk), _MM_HINT_T0);
        }
        __m256 b0 = _mm256_loadu_ps(w0 + kk), b1 = _mm256_loadu_ps(w1 + kk), b2 = _mm256_loadu_ps(w2 + kk);
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
                s[n][m] += x[m * ldx + t] * w[n * k + t];
            out[m * ldo + n] = s[n][m];
        }
}

#define TILE_CASE(MRV, NRV) tile(x + m0 * ldx, ldx, wr, k, out + m0 * ldo + n0, ldo, MRV, NRV)

static void tile_dispatch(const float *x, int64_t ldx, const float *wr, int64_t k, float *out, int64_t ldo,
                          int64_t m0, int64_t n0, int mr, int nr, const float *pf)
{
    switch (mr * 4 + nr) {
    case 4 * 4 + 3: tile_4x3(x + m0 * ldx, ldx, wr, k, out + m0 * ldo + n0, ldo, pf); break;
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
static void matmul_nt(const float *x, int64_t rows, int64_t ldx, const float *w, int64_t n, int64_t k,
                      float *out, int64_t ldo)
{
    for (int64_t n0 = 0; n0 < n; n0 += NR) {
        int nr = n - n0 < NR ? (int)(n - n0) : NR;
        const float *wr = w + n0 * k;
        for (int64_t m0 = 0; m0 < rows; m0 += MR) {
            int mr = rows - m0 < MR ? (int)(rows - m0) : MR;
            /* the first row block prefetches the next weight rows */
            const float *pf = m0 == 0 && n0 + 2 * NR <= n ? wr + NR * k : NULL;
            tile_dispatch(x, ldx, wr, k, out, ldo, m0, n0, mr, nr, pf);
        }
    }
}

/* One item: rows [r0, r0 + rows) of x all use expert e. scratch holds rows * 3I floats. */
static void expert_rows(const float *x, const float *w13, const float *w2, float *y, int64_t r0, int64_t rows,
                        int64_t e, int64_t hidden, int64_t inter, float *scratch)
{
    float *gu = scratch;                        /* [rows, 2I] gate | up */
    float *act = scratch + rows * 2 * inter;    /* [rows, I] */
    matmul_nt(x + r0 * hidden, rows, hidden, w13 + e * 2 * inter * hidden, 2 * inter, hidden, gu, 2 * inter);
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
    matmul_nt(act, rows, inter, w2 + e * hidden * inter, hidden, inter, y + r0 * hidden, hidden);
}

/* x [P, H] with rows sorted by expert, counts [E] rows per expert (sum = P), w13 [E, 2I, H],
 * w2 [E, H, I], y [P, H]; all fp32 and contiguous. Returns 0, or -1 when scratch memory ran out. */
int glm_ray_swiglu(const float *x, const int64_t *counts, int64_t experts, const float *w13, const float *w2,
                   float *y, int64_t hidden, int64_t inter, int threads)
{
    /* items: (expert, first row, rows), busiest experts' chunks are not special-cased: dynamic
     * scheduling over ~one item per active expert balances well enough at decode sizes. */
    int64_t n_items = 0;
    for (int64_t e = 0; e < experts; e++)
        n_items += (counts[e] + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    if (n_items == 0)
        return 0;
    int64_t *items = malloc(sizeof(int64_t) * 3 * n_items);
    if (!items)
        return -1;
    int64_t start = 0, i = 0;
    for (int64_t e = 0; e < experts; e++) {
        for (int64_t r = 0; r < counts[e]; r += ROWS_PER_ITEM) {
            items[3 * i] = e;
            items[3 * i + 1] = start + r;
            items[3 * i + 2] = counts[e] - r < ROWS_PER_ITEM ? counts[e] - r : ROWS_PER_ITEM;
            i++;
        }
        start += counts[e];
    }
    int failed = 0;
    if (threads < 1)
        threads = 1;
    if (threads > n_items)
        threads = (int)n_items;
#pragma omp parallel num_threads(threads)
    {
        float *scratch = malloc(sizeof(float) * ROWS_PER_ITEM * 3 * inter);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n_items; it++)
            if (scratch)
                expert_rows(x, w13, w2, y, items[3 * it + 1], items[3 * it + 2], items[3 * it], hidden, inter,
                            scratch);
        free(scratch);
    }
    free(items);
    return failed ? -1 : 0;
}
