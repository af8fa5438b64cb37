/* Decoding kernels for fp32 on CPU: palm_decode_mix (below), palm_greedy and palm_int8_linear
 * (at the end).
 *
 * palm_decode_mix: one decoding step of one PaLM block between its two matmuls, fused:
 * RoPE on the query heads and the shared key head, the key and value written into the KV cache,
 * multi-query attention of each row's single query over its cached keys (scores, softmax,
 * weighted values), and SwiGLU's silu(gate) * up. Loaded and called by palm/native/__init__.py
 * (which compiles it at first use); the torch operations it replaces are the reference
 * (palm.model.Decoder without it), and tests/test_native.py holds the two together.
 *
 * Why: at a few rows these are a dozen small torch calls per block, each costing more in
 * dispatch, allocation and memory traffic than in arithmetic, and the attention reads every
 * cached key and value once per head. Here each row's keys and values are read once for all its
 * heads, and nothing is allocated.
 *
 * Layouts (all fp32, element strides):
 *   y     [b, (h + 2) * hd + 2 * f], row stride y_row: the block's fused input projection of this
 *         step: h query heads (already scaled by 1/sqrt(hd)), the key head, the value head,
 *         then gate [f] and up [f]
 *   cos, sin  the rolled RoPE tables C = [cos, cos], S = [-sin, sin] at this step's position,
 *         hd each, row stride cs_row (0: one table for every row)
 *   kc, vc  [b, max_len, hd] caches, row stride cache_row; this step writes position pos and
 *         attends positions [0, pos]
 *   bias  additive key mask, row stride bias_row, positions [0, pos] (NULL: none)
 *   scratch  per row (stride scratch_row >= hp * hd + hp * (pos + 1), hp = h rounded up to a
 *         multiple of 4): rotated queries, scores
 *   out   [b, h * hd + f]: the attention output of the h heads, then silu(gate) * up
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) without libm, branch-free so the compiler vectorises its loops (Cephes' expf:
 * 2^n * p(r), |r| <= ln2 / 2; within 2 ulp of the true value). Below -87.3 (exp underflows
 * fp32's normal range), including -inf from a masked key, it is exactly 0, as torch gives. */
static inline float exp_f32(float x) {
    const float hi = 88.3762626647949f, lo = -87.3365478515625f;
    float c = x < lo ? lo : (x > hi ? hi : x);
    float n = floorf(c * 1.44269504088896341f + 0.5f);
    float r = c - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s;
    s.i = ((int32_t)n + 127) << 23;
    return x < lo ? 0.0f : p * s.f;
}

/* out = x C + roll(x, hd / 2) S (palm.model.RotaryEmbedding.rolled) */
static inline void rope(const float *x, const float *c, const float *s, float *out, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) out[i] = x[i] * c[i] + x[i + half] * s[i];
    for (int i = half; i < hd; i++) out[i] = x[i] * c[i] + x[i - half] * s[i];
}

/* Eight floats as one value (GCC's and clang's portable vectors: one AVX register, two SSE or
 * NEON ones); unaligned loads and stores go through the aligned(4) type. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
static inline v8 ld(const float *p) { return *(const v8u *)p; }
static inline void st(float *p, v8 v) { *(v8u *)p = v; }
static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* Scores of 4 query heads q [4, hd] over keys K [t, hd] (hd a multiple of 8):
 * sc[j * t + tau] = q_j . k_tau + bias[tau]. Four independent sums per key, each key read once. */
static void scores4(const float *q, const float *K, const float *bias, float *sc, int64_t t, int64_t hd) {
    for (int64_t tau = 0; tau < t; tau++) {
        const float *k = K + tau * hd;
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t i = 0; i < hd; i += 8) {
            v8 kv = ld(k + i);
            a0 += ld(q + i) * kv;
            a1 += ld(q + hd + i) * kv;
            a2 += ld(q + 2 * hd + i) * kv;
            a3 += ld(q + 3 * hd + i) * kv;
        }
        float add = bias ? bias[tau] : 0.0f;
        sc[tau] = hsum(a0) + add;
        sc[t + tau] = hsum(a1) + add;
        sc[2 * t + tau] = hsum(a2) + add;
        sc[3 * t + tau] = hsum(a3) + add;
    }
}

/* o_j = sum_tau p[j * t + tau] v_tau for 4 heads over values V [t, hd] (hd a multiple of 16),
 * 16 columns at a time held in registers for all 4 heads; the first nj heads are written. */
static void weighted4(const float *p, const float *V, float *o, int64_t t, int64_t hd, int64_t nj) {
    for (int64_t c = 0; c < hd; c += 16) {
        v8 a[4][2] = {{{0}}};
        for (int64_t tau = 0; tau < t; tau++) {
            v8 v0 = ld(V + tau * hd + c), v1 = ld(V + tau * hd + c + 8);
            for (int j = 0; j < 4; j++) {
                float pj = p[j * t + tau];
                a[j][0] += pj * v0;
                a[j][1] += pj * v1;
            }
        }
        for (int64_t j = 0; j < nj; j++) {
            st(o + j * hd + c, a[j][0]);
            st(o + j * hd + c + 8, a[j][1]);
        }
    }
}

int palm_decode_abi(void) { return 4; }  /* bumped with every change of the signature below */

/* The blocked loops (hd a multiple of 16) take heads 4 at a time, the extra ones of the last
 * group zeros; other head sizes take plain loops. */
void palm_decode_mix(const float *y, int64_t y_row, int64_t b, int64_t h, int64_t hd, int64_t f,
                     const float *cos, const float *sin, int64_t cs_row,
                     float *kc, float *vc, int64_t cache_row, int64_t pos,
                     const float *bias, int64_t bias_row,
                     float *scratch, int64_t scratch_row, float *out) {
    const int64_t t = pos + 1, width = h * hd + f, hp = (h + 3) / 4 * 4;
    const int blocked = hd % 16 == 0;
#pragma omp parallel for schedule(static) if (b > 1)
    for (int64_t r = 0; r < b; r++) {
        const float *yr = y + r * y_row, *c = cos + r * cs_row, *s = sin + r * cs_row;
        float *q = scratch + r * scratch_row, *sc = q + hp * hd;
        float *K = kc + r * cache_row, *V = vc + r * cache_row, *o = out + r * width;
        const float *br = bias ? bias + r * bias_row : 0;
        for (int64_t j = 0; j < h; j++) rope(yr + j * hd, c, s, q + j * hd, (int)hd);
        memset(q + h * hd, 0, (size_t)((hp - h) * hd) * sizeof(float));
        rope(yr + h * hd, c, s, K + pos * hd, (int)hd);
        memcpy(V + pos * hd, yr + (h + 1) * hd, (size_t)hd * sizeof(float));

        if (blocked) {
            for (int64_t j = 0; j < hp; j += 4) scores4(q + j * hd, K, br, sc + j * t, t, hd);
        } else {
            for (int64_t tau = 0; tau < t; tau++) {
                float add = br ? br[tau] : 0.0f;
                for (int64_t j = 0; j < h; j++) {
                    float acc = 0.0f;
                    for (int64_t i = 0; i < hd; i++) acc += q[j * hd + i] * K[tau * hd + i];
                    sc[j * t + tau] = acc + add;
                }
            }
        }
        for (int64_t j = 0; j < h; j++) {  /* softmax of each head's scores */
            float *row = sc + j * t, m = row[0], sum = 0.0f;
#pragma omp simd reduction(max : m)
            for (int64_t tau = 1; tau < t; tau++) m = row[tau] > m ? row[tau] : m;
#pragma omp simd reduction(+ : sum)
            for (int64_t tau = 0; tau < t; tau++) {
                row[tau] = exp_f32(row[tau] - m);
                sum += row[tau];
            }
            float inv = 1.0f / sum;
#pragma omp simd
            for (int64_t tau = 0; tau < t; tau++) row[tau] *= inv;
        }
        if (blocked) {
            memset(sc + h * t, 0, (size_t)((hp - h) * t) * sizeof(float));  /* the extra heads: 0 */
            for (int64_t j = 0; j < hp; j += 4) weighted4(sc + j * t, V, o + j * hd, t, hd, h - j < 4 ? h - j : 4);
        } else {
            memset(o, 0, (size_t)(h * hd) * sizeof(float));
            for (int64_t tau = 0; tau < t; tau++)
                for (int64_t j = 0; j < h; j++)
                    for (int64_t i = 0; i < hd; i++) o[j * hd + i] += sc[j * t + tau] * V[tau * hd + i];
        }
        const float *gate = yr + (h + 2) * hd, *up = gate + f;
        float *a = o + h * hd;
#pragma omp simd
        for (int64_t i = 0; i < f; i++) a[i] = gate[i] / (1.0f + exp_f32(-gate[i])) * up[i];
    }
}

/* The greedy pick of palm.generate: for each row of logits x [b, v] (row stride x_row), the first
 * index holding the row's maximum, and its log-probability under the row's softmax,
 * -log(sum_i exp(x_i - max)). Two passes over the row: the maximum, then the sum of exps; the
 * index is found by blocks of 64 (their maxima vectorise), stopping at the first block that holds
 * the maximum. */
void palm_greedy(const float *x, int64_t b, int64_t v, int64_t x_row, int64_t *token, float *logp) {
#pragma omp parallel for schedule(static) if (b > 1)
    for (int64_t r = 0; r < b; r++) {
        const float *row = x + r * x_row;
        float m = row[0], sum = 0.0f;
#pragma omp simd reduction(max : m)
        for (int64_t i = 1; i < v; i++) m = row[i] > m ? row[i] : m;
        int64_t at = 0;
        for (int64_t lo = 0; lo < v; lo += 64) {
            int64_t hi = lo + 64 < v ? lo + 64 : v;
            float bm = row[lo];
#pragma omp simd reduction(max : bm)
            for (int64_t i = lo; i < hi; i++) bm = row[i] > bm ? row[i] : bm;
            if (bm == m) {
                at = lo;
                while (row[at] != m) at++;
                break;
            }
        }
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < v; i++) sum += exp_f32(row[i] - m);
        token[r] = at;
        logp[r] = -logf(sum);
    }
}

/* palm_int8_linear: out[r, j] ~= scale[j] * sum_i x[r, i] * w[j, i] for fp32 rows x [m, k] (row
 * stride x_row) and int8 weights w [n, k] with one fp32 scale per output channel (row of w), into
 * out [m, n] (row stride out_row); k a multiple of 16, at most INT8_MAX_K. The int8 weight-only
 * matmul of palm.decode.quant: a decoding step reads each weight once, as one byte instead of four.
 *
 * How: each row of x is first rounded to int16 with its own scale, max |x_r| / 8191 (14 bits: a
 * relative error of 1/16382 of the row's largest element, 64x below the weights' 1/254), then
 * 16 products at a time are summed exactly in int32 (AVX2's vpmaddwd of the sign-extended weights
 * and the int16 row: 16 multiply-adds per instruction, where widening the weights to fp32 and
 * fma-ing them does 8 in three: measured 2-3x slower), and the sum scaled once. No overflow:
 * a pair of products is at most 2 * 8191 * 127 and each of the 8 int32 lanes adds k / 16 pairs,
 * below 2^31 for k <= INT8_MAX_K. Tiles: one row times 4 output channels (a step of one prompt),
 * or 4 rows times 2 channels (each widened weight serves 4 rows; 8 accumulators in AVX2's 16
 * registers). A tile past the last row or channel repeats the last one and writes nothing for it.
 * 256-bit vectors on every x86 CPU, AVX-512 or not: the code an AVX2-only CPU runs. Output
 * channels split between torch's OpenMP threads. Without AVX2: plain loops, the same sums. */
#include <stdlib.h>
#define INT8_MAX_K 16384
#define X_MAX 8191.0f

#ifdef __AVX2__
#include <immintrin.h>
typedef __m256i acc_t;
#define ACC_ZERO _mm256_setzero_si256()
/* 16 int8 weights sign-extended to int16 */
static inline __m256i ldw(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256i ldx(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
/* acc + the 8 sums of adjacent pairs of a * b */
static inline __m256i madd(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
static inline int32_t hsum_i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
/* 16 floats * inv rounded to nearest -> int16, in order (packs works within 128-bit lanes) */
static inline void round16(const float *x, float inv, int16_t *q) {
    __m256 f = _mm256_set1_ps(inv);
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), f));
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), f));
    _mm256_storeu_si256((__m256i *)q, _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
}
#else
typedef struct { int32_t v; } acc_t;
#define ACC_ZERO ((acc_t){0})
static inline const int8_t *ldw(const int8_t *p) { return p; }
static inline const int16_t *ldx(const int16_t *p) { return p; }
static inline acc_t madd_s(acc_t acc, const int16_t *x, const int8_t *w) {
    for (int i = 0; i < 16; i++) acc.v += (int32_t)x[i] * w[i];
    return acc;
}
#define madd(acc, x, w) madd_s(acc, x, w)
static inline int32_t hsum_i(acc_t v) { return v.v; }
static inline void round16(const float *x, float inv, int16_t *q) {
    for (int i = 0; i < 16; i++) q[i] = (int16_t)lrintf(x[i] * inv);
}
#endif

void palm_int8_linear(const float *x, int64_t m, int64_t k, int64_t x_row, const int8_t *w,
                      const float *scale, int64_t n, float *out, int64_t out_row) {
    int16_t *xq = malloc((size_t)(m * k) * sizeof(int16_t));
    float *xs = malloc((size_t)m * sizeof(float));
    for (int64_t r = 0; r < m; r++) {  /* each row to int16 with its own scale */
        const float *xr = x + r * x_row;
        float a = 0.0f;
#pragma omp simd reduction(max : a)
        for (int64_t i = 0; i < k; i++) a = fabsf(xr[i]) > a ? fabsf(xr[i]) : a;
        xs[r] = a > 0.0f ? a / X_MAX : 1.0f;
        for (int64_t i = 0; i < k; i += 16) round16(xr + i, a > 0.0f ? X_MAX / a : 0.0f, xq + r * k + i);
    }
    if (m < 4) {
        const int64_t nb = (n + 3) / 4;
#pragma omp parallel for schedule(static) if (n * k * m >= 65536)
        for (int64_t jb = 0; jb < nb; jb++) {
            const int64_t j0 = jb * 4, nj = n - j0 < 4 ? n - j0 : 4;
            const int8_t *w0 = w + j0 * k, *w1 = w + (j0 + (nj > 1)) * k;
            const int8_t *w2 = w + (j0 + (nj > 2 ? 2 : nj - 1)) * k, *w3 = w + (j0 + nj - 1) * k;
            for (int64_t r = 0; r < m; r++) {
                const int16_t *xr = xq + r * k;
                acc_t a0 = ACC_ZERO, a1 = ACC_ZERO, a2 = ACC_ZERO, a3 = ACC_ZERO;
                for (int64_t i = 0; i < k; i += 16) {
                    a0 = madd(a0, ldx(xr + i), ldw(w0 + i));
                    a1 = madd(a1, ldx(xr + i), ldw(w1 + i));
                    a2 = madd(a2, ldx(xr + i), ldw(w2 + i));
                    a3 = madd(a3, ldx(xr + i), ldw(w3 + i));
                }
                float *o = out + r * out_row + j0;
                int32_t s[4] = {hsum_i(a0), hsum_i(a1), hsum_i(a2), hsum_i(a3)};
                for (int64_t j = 0; j < nj; j++) o[j] = (float)s[j] * (xs[r] * scale[j0 + j]);
            }
        }
    } else {
        const int64_t nb = (n + 1) / 2;
#pragma omp parallel for schedule(static) if (n * k * m >= 65536)
        for (int64_t jb = 0; jb < nb; jb++) {
            const int64_t j0 = jb * 2, nj = n - j0 < 2 ? n - j0 : 2;
            const int8_t *w0 = w + j0 * k, *w1 = w + (j0 + nj - 1) * k;
            for (int64_t r0 = 0; r0 < m; r0 += 4) {
                const int64_t nr = m - r0 < 4 ? m - r0 : 4;
                const int16_t *x0 = xq + r0 * k, *x1 = xq + (r0 + (nr > 1)) * k;
                const int16_t *x2 = xq + (r0 + (nr > 2 ? 2 : nr - 1)) * k, *x3 = xq + (r0 + nr - 1) * k;
                acc_t a00 = ACC_ZERO, a01 = ACC_ZERO, a10 = ACC_ZERO, a11 = ACC_ZERO;
                acc_t a20 = ACC_ZERO, a21 = ACC_ZERO, a30 = ACC_ZERO, a31 = ACC_ZERO;
                for (int64_t i = 0; i < k; i += 16) {
                    __typeof__(ldw(w0)) u = ldw(w0 + i), v = ldw(w1 + i);
                    a00 = madd(a00, ldx(x0 + i), u); a01 = madd(a01, ldx(x0 + i), v);
                    a10 = madd(a10, ldx(x1 + i), u); a11 = madd(a11, ldx(x1 + i), v);
                    a20 = madd(a20, ldx(x2 + i), u); a21 = madd(a21, ldx(x2 + i), v);
                    a30 = madd(a30, ldx(x3 + i), u); a31 = madd(a31, ldx(x3 + i), v);
                }
                int32_t s[4][2] = {{hsum_i(a00), hsum_i(a01)}, {hsum_i(a10), hsum_i(a11)},
                                   {hsum_i(a20), hsum_i(a21)}, {hsum_i(a30), hsum_i(a31)}};
                for (int64_t r = 0; r < nr; r++)
                    for (int64_t j = 0; j < nj; j++)
                        out[(r0 + r) * out_row + j0 + j] = (float)s[r][j] * (xs[r0 + r] * scale[j0 + j]);
            }
        }
    }
    free(xq);
    free(xs);
}
