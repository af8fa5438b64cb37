/* Decoding kernels for fp32 on CPU: palm_decode_mix (below) and palm_greedy (at the end).
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

int palm_decode_abi(void) { return 3; }  /* bumped with every change of the signature below */

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
