/* The base model's small CPU ops, fused: what a Llama layer does besides its four GEMMs and LoRA.
 *
 * Why: the torch path spends ~40 small ops per layer on RMSNorm, the residual add, RoPE, the KV
 * store, SiLU and paged attention (gathering whole pages of K/V into new tensors before SDPA). On a
 * 2-core CPU each op pays dispatch and an OpenMP fork/join, and the gathers copy the step's whole
 * KV cache twice. Here each is one call that reads its operands in place. The references (the
 * specification, with the rounding steps these follow in bf16) are server/layers.py (rms_norm,
 * apply_rope, swiglu) and kernels/attention.py (store_kv_ref, paged_attention_ref).
 *
 * dtype codes: 0 = float32, 1 = bfloat16 (stored as uint16; computed in fp32, rounded where the
 * reference rounds). Row strides are in elements.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_simd.h"


/* exp(x) (Cephes' expf: x = k ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^k;
 * ~1 ulp), written so that loops over it vectorize (libm's expf is a call per element); x is
 * clamped to [-87, 88]: exp(-87) ~ 1.6e-38 stands for 0, exp(88) ~ 1.7e38 for overflow. */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float k = __builtin_roundf(x * 1.44269504088896341f);
    const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline float rbf(float f) { return bf2f(f2bf(f)); } /* round to bf16 and back */

/* n values of a row in dtype -> fp32 (dst), or the row itself when it already is fp32. */
static inline const float *as_f32(int bf16, const void *src, int64_t n, float *dst) {
    if (!bf16) return (const float *)src;
    const uint16_t *s = (const uint16_t *)src;
    for (int64_t i = 0; i < n; i++) dst[i] = bf2f(s[i]);
    return dst;
}

/* A thread's scratch of n floats inside a parallel region; NULL (and the call flagged as failed, its
 * iterations skipped by that thread) when memory runs out. */
static inline float *scratch(size_t n, int *failed) {
    float *p = malloc(sizeof(float) * n);
    if (!p) {
#pragma omp atomic write
        *failed = 1;
    }
    return p;
}

static inline void put_row(int bf16, void *dst, const float *src, int64_t n) {
    if (!bf16) {
        memcpy(dst, src, sizeof(float) * (size_t)n);
        return;
    }
    uint16_t *d = (uint16_t *)dst;
    for (int64_t i = 0; i < n; i++) d[i] = f2bf(src[i]);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    vf acc = {0};
    int64_t i = 0;
    for (; i + VW <= n; i += VW) acc += vload(a + i) * vload(b + i);
    float s = vsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Work below this many elements runs on the calling thread: an OpenMP fork/join costs more than a
 * decode step's norm (64 x 576) and, on a shared machine, waits for a descheduled worker. */
#define PAR_MIN 262144

/* RMSNorm with the residual add folded in (h and delta: [T, H] rows ldh / ldd apart):
 *     if delta: h[t] = h[t] + delta[t]                      (in place; rounded to dtype)
 *     x[t] = w * dtype(h[t] / sqrt(mean(h[t]^2) + eps))     (HF LlamaRMSNorm: fp32 inside)      */
int add_rms_norm(int bf16, void *h, int64_t ldh, const void *delta, int64_t ldd, const void *w,
                 void *x, int64_t ldx, int64_t T, int64_t H, float eps, int nthreads) {
    const size_t item = bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (T * H >= PAR_MIN)
    {
        float *row = scratch((size_t)H * 3, &failed);
        float *dbuf = row + H, *wbuf = row + 2 * H;
        const float *wf = row ? as_f32(bf16, w, H, wbuf) : NULL; /* the weight, widened once */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (!row) continue;
            char *hp = (char *)h + (size_t)(t * ldh) * item;
            const float *hf = as_f32(bf16, hp, H, row);
            if (hf != row) memcpy(row, hf, sizeof(float) * (size_t)H);
            if (delta) {
                const float *d = as_f32(bf16, (const char *)delta + (size_t)(t * ldd) * item, H, dbuf);
                for (int64_t i = 0; i < H; i++) row[i] = bf16 ? rbf(row[i] + d[i]) : row[i] + d[i];
                put_row(bf16, hp, row, H);
            }
            const float r = 1.0f / sqrtf(dot(row, row, H) / (float)H + eps);
            for (int64_t i = 0; i < H; i++) row[i] = bf16 ? rbf(wf[i] * rbf(row[i] * r)) : wf[i] * (row[i] * r);
            put_row(bf16, (char *)x + (size_t)(t * ldx) * item, row, H);
        }
        free(row);
    }
    return failed ? -1 : 0;
}

/* out[t, i] = silu(gu[t, i]) * gu[t, I + i] for i < I (gate | up halves of the fused GEMM).     */
int silu_mul(int bf16, const void *gu, int64_t ldgu, void *out, int64_t ldo, int64_t T, int64_t I,
             int nthreads) {
    const size_t item = bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (T * I >= PAR_MIN)
    {
        float *buf = scratch((size_t)I * 3, &failed);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (!buf) continue;
            const char *src = (const char *)gu + (size_t)(t * ldgu) * item;
            const float *g = as_f32(bf16, src, I, buf);
            const float *u = as_f32(bf16, src + (size_t)I * item, I, buf + I);
            float *o = buf + 2 * I;
#pragma omp simd
            for (int64_t i = 0; i < I; i++) o[i] = g[i] / (1.0f + exp_approx(-g[i]));
            if (bf16) {
                for (int64_t i = 0; i < I; i++) o[i] = rbf(o[i]) * u[i];
            } else {
#pragma omp simd
                for (int64_t i = 0; i < I; i++) o[i] *= u[i];
            }
            put_row(bf16, (char *)out + (size_t)(t * ldo) * item, o, I);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* In place on one head vector x[D] (HF rotate_half layout): x*cos + rotate_half(x)*sin, with cos and
 * sin already in the model dtype's precision; bf16 rounds each product and the sum as torch does. */
static inline void rope_head(int bf16, float *x, const float *c, const float *s, int64_t D) {
    const int64_t half = D / 2;
    float tmp[512];
    if (bf16) {
        for (int64_t i = 0; i < half; i++) tmp[i] = rbf(rbf(x[i] * c[i]) + rbf(-x[i + half] * s[i]));
        for (int64_t i = half; i < D; i++) tmp[i] = rbf(rbf(x[i] * c[i]) + rbf(x[i - half] * s[i]));
    } else {
        for (int64_t i = 0; i < half; i++) tmp[i] = x[i] * c[i] - x[i + half] * s[i];
        for (int64_t i = half; i < D; i++) tmp[i] = x[i] * c[i] + x[i - half] * s[i];
    }
    memcpy(x, tmp, sizeof(float) * (size_t)D);
}

/* RoPE on the q and k heads of the fused projection qkv [T, (nh + 2 * nkv) * D] (in place), then
 * K and V of every token into its KV slot: page = slot / bs, offset = slot % bs, in
 * kv_pages viewed as [pages, 2, bs, nkv, D]; slot -1 skips the store. cos/sin: fp32 tables
 * [max_pos, D], looked up by positions[t]. D <= 512.                                             */
int rope_store_kv(int bf16, void *qkv, int64_t ld, int64_t T, int64_t nh, int64_t nkv, int64_t D,
                  const int32_t *positions, const float *cos_t, const float *sin_t, void *kv_pages,
                  const int32_t *slots, int64_t bs, int nthreads) {
    const size_t item = bf16 ? 2 : 4;
    const int64_t width = (nh + 2 * nkv) * D, kvw = nkv * D;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (T * width >= PAR_MIN)
    {
        float *row = scratch((size_t)(width + 2 * D), &failed);
        float *c = row + width, *s = c + D;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (!row) continue;
            char *src = (char *)qkv + (size_t)(t * ld) * item;
            const float *f = as_f32(bf16, src, width, row);
            if (f != row) memcpy(row, f, sizeof(float) * (size_t)width);
            const float *ct = cos_t + (int64_t)positions[t] * D, *st = sin_t + (int64_t)positions[t] * D;
            for (int64_t i = 0; i < D; i++) {
                c[i] = bf16 ? rbf(ct[i]) : ct[i];
                s[i] = bf16 ? rbf(st[i]) : st[i];
            }
            for (int64_t hd = 0; hd < nh + nkv; hd++) rope_head(bf16, row + hd * D, c, s, D);
            put_row(bf16, src, row, (nh + nkv) * D);
            const int64_t slot = slots[t];
            if (slot < 0) continue;
            const int64_t page = slot / bs, off = slot % bs;
            char *kdst = (char *)kv_pages + (size_t)((page * 2 * bs + off) * kvw) * item;
            put_row(bf16, kdst, row + nh * D, kvw);
            put_row(bf16, kdst + (size_t)(bs * kvw) * item, row + (nh + nkv) * D, kvw);
        }
        free(row);
    }
    return failed ? -1 : 0;
}

/* Causal attention of the query rows of the listed sequences over their paged K/V.
 * Sequence s = seqs[i] has query rows cu_q[s] .. cu_q[s+1] of q ([*, nh * D], rows ldq apart) at
 * positions ctx_lens[s] - q_len + j; row j attends keys 0 .. its position, key p read from page
 * block_table[s * max_blocks + p / bs] at offset p % bs (kv_pages as in rope_store_kv). Query head
 * h uses KV head h / (nh / nkv). out rows (ldo apart) get softmax(q k^T * scale) v per head; the
 * softmax is computed online over blocks of bs keys (one pass over the pages).
 *
 * One work item per sequence and all its KV heads when there are at least 4 sequences per thread
 * (else per sequence and KV head, so that a few long sequences still use every thread). Per block
 * the item reads each K row whole, in order (a run the hardware prefetcher follows; one KV head's
 * third of every row, as items per KV head read them, was a strided walk that waited on memory),
 * asks for the matching V row meanwhile, then sums each head's weighted V rows into an
 * accumulator held in registers across the block. Against one item per KV head with the V sum
 * in memory: 8.4 against 18.7 ms for 30 layers of 32 decode rows over 110 keys (fp32, KV pages
 * out of cache), 4.4 against 6.9 with them in cache, 9.2 against 12.1 for 2 rows over 1,000 keys. */
int paged_attention(int bf16, const void *q, int64_t ldq, void *out, int64_t ldo, const void *kv_pages,
                     const int32_t *block_table, int64_t max_blocks, const int32_t *cu_q,
                     const int32_t *ctx_lens, const int64_t *seqs, int64_t nseq, int64_t nh, int64_t nkv,
                    int64_t D, int64_t bs, float scale, int nthreads) {
    const size_t item = bf16 ? 2 : 4;
    const int64_t G = nh / nkv, kvw = nkv * D;
    /* KV heads per work item (hc), the row width it reads (W) and its query heads (HG) */
    const int64_t hc = nseq >= 4 * (int64_t)nthreads ? nkv : 1, W = hc * D, HG = hc * G;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* per query head: query, accumulator, running max and sum; per block: scores, and the K row
         * and V rows widened from bf16 */
        float *buf = scratch((size_t)(HG * D * 2 + HG * bs + 2 * HG + W + bs * W), &failed);
        float *qv = buf, *acc = qv + HG * D, *sc = acc + HG * D, *m = sc + HG * bs, *l = m + HG;
        float *kb = l + HG, *vb = kb + W;
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t i = 0; i < nseq; i++) {
            for (int64_t g0 = 0; g0 < nkv; g0 += hc) {
                if (!buf) continue;
                const int64_t s = seqs[i], ctx = ctx_lens[s], r0 = cu_q[s], qlen = cu_q[s + 1] - r0;
                const int32_t *bt = block_table + s * max_blocks;
                for (int64_t j = 0; j < qlen; j++) {
                    const int64_t n_keys = ctx - qlen + j + 1;
                    const char *qrow = (const char *)q + (size_t)((r0 + j) * ldq + g0 * G * D) * item;
                    const float *qf = as_f32(bf16, qrow, HG * D, qv);
                    if (qf != qv) memcpy(qv, qf, sizeof(float) * (size_t)(HG * D));
                    for (int64_t h = 0; h < HG; h++) m[h] = -INFINITY, l[h] = 0.f;
                    memset(acc, 0, sizeof(float) * (size_t)(HG * D));
                    for (int64_t p0 = 0; p0 < n_keys; p0 += bs) {
                        const int64_t n = n_keys - p0 < bs ? n_keys - p0 : bs;
                        const char *page = (const char *)kv_pages + (size_t)(bt[p0 / bs] * 2 * bs * kvw) * item;
                        const char *vpage = page + (size_t)(bs * kvw + g0 * D) * item;
                        for (int64_t t = 0; t < n; t++) {
                            const float *k = as_f32(bf16, page + (size_t)(t * kvw + g0 * D) * item, W, kb);
                            const char *vt = vpage + (size_t)(t * kvw) * item;
                            for (size_t b = 0; b < (size_t)W * item; b += 64) __builtin_prefetch(vt + b, 0, 3);
                            for (int64_t h = 0; h < HG; h++) sc[h * bs + t] = dot(qv + h * D, k + (h / G) * D, D) * scale;
                        }
                        const float *vr = (const float *)vpage;
                        int64_t ld = kvw;
                        if (bf16) {
                            for (int64_t t = 0; t < n; t++) as_f32(1, vpage + (size_t)(t * kvw) * item, W, vb + t * W);
                            vr = vb, ld = W;
                        }
                        for (int64_t h = 0; h < HG; h++) {
                            float mx = m[h], sum = 0.f, *e = sc + h * bs;
                            for (int64_t t = 0; t < n; t++) mx = e[t] > mx ? e[t] : mx;
                            const float corr = exp_approx(m[h] - mx); /* ~0 on the first block */
#pragma omp simd reduction(+ : sum)
                            for (int64_t t = 0; t < n; t++) {
                                e[t] = exp_approx(e[t] - mx);
                                sum += e[t];
                            }
                            m[h] = mx, l[h] = l[h] * corr + sum;
                            float *a = acc + h * D;
                            const float *v = vr + (h / G) * D;
                            int64_t d = 0;
                            for (; d + 2 * VW <= D; d += 2 * VW) {
                                vf x0 = vload(a + d) * corr, x1 = vload(a + d + VW) * corr;
                                for (int64_t t = 0; t < n; t++) {
                                    x0 += e[t] * vload(v + t * ld + d);
                                    x1 += e[t] * vload(v + t * ld + d + VW);
                                }
                                vstore(a + d, x0), vstore(a + d + VW, x1);
                            }
                            for (; d < D; d++) {
                                float x = a[d] * corr;
                                for (int64_t t = 0; t < n; t++) x += e[t] * v[t * ld + d];
                                a[d] = x;
                            }
                        }
                    }
                    for (int64_t h = 0; h < HG; h++) {
                        const float inv = 1.0f / l[h];
                        float *a = acc + h * D;
                        for (int64_t d = 0; d < D; d++) a[d] *= inv;
                    }
                    put_row(bf16, (char *)out + (size_t)((r0 + j) * ldo + g0 * G * D) * item, acc, HG * D);
                }
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
