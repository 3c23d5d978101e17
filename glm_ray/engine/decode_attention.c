/* Decode attention over the paged KV cache for fp32 on x86-64 CPUs with AVX2 + FMA.
 *
 * Each decode sequence's one query (Hq heads) attends to its first len positions, read in place
 * from the cache's blocks ([num_blocks, block_size, Hkv, D], a block table per sequence): no
 * gather copy, no padding to the longest sequence, no mask. A work item is one (sequence, KV
 * head): the G = Hq / Hkv query heads that read that KV head share every key and value load.
 * The softmax is taken online over chunks of CHUNK positions (a running maximum and sum per head,
 * the output rescaled when the maximum grows), so the scratch is fixed whatever the length.
 *
 * Summation order differs from torch's scaled_dot_product_attention (dot products in 8 lanes then
 * a tree, the softmax per chunk): results match it to fp32 rounding, not bit for bit.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define CHUNK 64
#define MAX_GROUP 16

static inline float dot(const float *a, const float *b, int64_t d)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum256(acc);
    for (; i < d; i++)
        s += a[i] * b[i];
    return s;
}

/* scores[t] = dot(q, keys[t]) * scale for t < n, the keys' rows given by pointers: four keys at
 * a time, four independent accumulator chains (one chain would wait on each FMA's latency). */
static inline void qk(const float *q, const float *const *keys, int64_t n, int64_t d, float scale, float *scores)
{
    int64_t t = 0;
    if (d % 8 == 0)
        for (; t + 4 <= n; t += 4) {
            const float *k0 = keys[t], *k1 = keys[t + 1], *k2 = keys[t + 2], *k3 = keys[t + 3];
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t i = 0; i < d; i += 8) {
                __m256 qv = _mm256_loadu_ps(q + i);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), a3);
            }
            _mm_storeu_ps(scores + t, _mm_mul_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
        }
    for (; t < n; t++)
        scores[t] = dot(q, keys[t], d) * scale;
}

/* acc[0:d] = acc * alpha + sum over t < n of p[t] * values[t]: for d a multiple of 64, each run of
 * 64 output floats stays in 8 registers across all n values. */
static inline void pv(float *acc, float alpha, const float *p, const float *const *values, int64_t n, int64_t d)
{
    __m256 al = _mm256_set1_ps(alpha);
    if (d % 64 == 0) {
        for (int64_t i = 0; i < d; i += 64) {
            __m256 a0 = _mm256_mul_ps(al, _mm256_loadu_ps(acc + i)), a1 = _mm256_mul_ps(al, _mm256_loadu_ps(acc + i + 8));
            __m256 a2 = _mm256_mul_ps(al, _mm256_loadu_ps(acc + i + 16)), a3 = _mm256_mul_ps(al, _mm256_loadu_ps(acc + i + 24));
            __m256 a4 = _mm256_mul_ps(al, _mm256_loadu_ps(acc + i + 32)), a5 = _mm256_mul_ps(al, _mm256_loadu_ps(acc + i + 40));
            __m256 a6 = _mm256_mul_ps(al, _mm256_loadu_ps(acc + i + 48)), a7 = _mm256_mul_ps(al, _mm256_loadu_ps(acc + i + 56));
            for (int64_t t = 0; t < n; t++) {
                const float *v = values[t] + i;
                __m256 w = _mm256_set1_ps(p[t]);
                a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
                a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
                a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
                a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
                a4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 32), a4);
                a5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 40), a5);
                a6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 48), a6);
                a7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 56), a7);
            }
            _mm256_storeu_ps(acc + i, a0), _mm256_storeu_ps(acc + i + 8, a1);
            _mm256_storeu_ps(acc + i + 16, a2), _mm256_storeu_ps(acc + i + 24, a3);
            _mm256_storeu_ps(acc + i + 32, a4), _mm256_storeu_ps(acc + i + 40, a5);
            _mm256_storeu_ps(acc + i + 48, a6), _mm256_storeu_ps(acc + i + 56, a7);
        }
        return;
    }
    for (int64_t i = 0; i < d; i++)
        acc[i] *= alpha;
    for (int64_t t = 0; t < n; t++)
        for (int64_t i = 0; i < d; i++)
            acc[i] += p[t] * values[t][i];
}

static void attend_one(const float *q, const float *k_cache, const float *v_cache, const int64_t *table, int64_t len,
                       int64_t block_size, int64_t hkv, int64_t h, int64_t g, int64_t d, float scale, float *out,
                       float *acc, float *scores)
{
    float m[MAX_GROUP], l[MAX_GROUP];
    const float *keys[CHUNK], *values[CHUNK];
    for (int64_t j = 0; j < g; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    for (int64_t i = 0; i < g * d; i++)
        acc[i] = 0.0f;
    for (int64_t c0 = 0; c0 < len; c0 += CHUNK) {
        int64_t n = len - c0 < CHUNK ? len - c0 : CHUNK;
        for (int64_t t = 0; t < n; t++) {
            int64_t pos = c0 + t, at = ((table[pos / block_size] * block_size + pos % block_size) * hkv + h) * d;
            keys[t] = k_cache + at;
            values[t] = v_cache + at;
        }
        for (int64_t j = 0; j < g; j++) {
            float *s = scores + j * CHUNK, top = m[j];
            qk(q + j * d, keys, n, d, scale, s);
            for (int64_t t = 0; t < n; t++)
                top = s[t] > top ? s[t] : top;
            float alpha = m[j] == -INFINITY ? 0.0f : expf(m[j] - top), sum = 0.0f;
            int64_t t = 0;
            for (; t + 8 <= n; t += 8) {
                __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(top)));
                _mm256_storeu_ps(s + t, e);
                sum += hsum256(e);
            }
            for (; t < n; t++) {
                s[t] = expf(s[t] - top);
                sum += s[t];
            }
            l[j] = l[j] * alpha + sum;
            m[j] = top;
            pv(acc + j * d, alpha, s, values, n, d);
        }
    }
    for (int64_t j = 0; j < g; j++) {
        float inv = 1.0f / l[j];
        for (int64_t i = 0; i < d; i++)
            out[j * d + i] = acc[j * d + i] * inv;
    }
}

/* q [T, Hq, D]; rows [B] the query row of each decode sequence; tables [B, width] block ids;
 * lens [B] positions to attend (>= 1, the new token's own key already written); caches
 * [num_blocks, block_size, Hkv, D]; out [T, Hq, D], only rows[] written. Returns 0, or -1 when
 * scratch memory ran out or Hq / Hkv exceeds MAX_GROUP. */
int glm_ray_decode_attention(const float *q, const int64_t *rows, int64_t b, const float *k_cache,
                             const float *v_cache, const int64_t *tables, int64_t width, const int64_t *lens,
                             int64_t block_size, int64_t hq, int64_t hkv, int64_t d, float scale, float *out,
                             int threads)
{
    if (hkv < 1 || hq % hkv != 0 || hq / hkv > MAX_GROUP)
        return -1;
    const int64_t g = hq / hkv, items = b * hkv;
    int failed = 0;
    if (threads < 1)
        threads = 1;
    if (threads > items)
        threads = items > 0 ? (int)items : 1;
#pragma omp parallel num_threads(threads)
    {
        float *acc = thread_scratch(g * (d + CHUNK), &failed);
#pragma omp for schedule(dynamic, 4)
        for (int64_t it = 0; it < items; it++) {
            if (!acc)
                continue;
            int64_t s = it / hkv, h = it % hkv, r = rows[s];
            attend_one(q + (r * hq + h * g) * d, k_cache, v_cache, tables + s * width, lens[s], block_size, hkv, h, g,
                       d, scale, out + (r * hq + h * g) * d, acc, acc + g * d);
        }
        free(acc);
    }
    return failed ? -1 : 0;
}
