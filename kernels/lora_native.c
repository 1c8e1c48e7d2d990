/* Multi-adapter LoRA on the CPU, reading the adapters' rows in place from the paged arena.
 *
 * One call computes the LoRA terms of one module group (modules that read the same input x and
 * write consecutive column blocks of one output y: q/k/v, gate/up, o, down) of one layer, for
 * every token of the step:
 *
 *     for each segment s (tokens seg_starts[s] .. seg_starts[s + 1]) and module m of the group:
 *         d = desc[s * DESC_STRIDE + mods[m]]             (that segment's adapter, that module)
 *         v[t, j]          = sum_k A_j[k] * x[t, k]              j < d.rank   (shrink)
 *         y[t, col_m + n] += d.scale * sum_j v[t, j] * Bt_j[n]   n < width_m  (expand)
 *
 * where A_j is the arena row at element offset ((int64_t *) d.a_rows)[j], Bt_j likewise (rows of
 * B transposed). The torch reference is kernels/lora.py: lora_shrink_ref / lora_expand_ref and
 * lora_group_ref (one rounding of y when y is bf16). Two variants per module:
 *   - DoRA (d.g_rows != 0): the epilogue scales the output, y[t, col_m + n] = g[n] * (y + ...),
 *     g being the module's scale row in the arena (y holds the base layer's output on entry);
 *   - gather (embed_tokens): x holds int32 token ids and v[t, j] = A^T[x[t]][j] (A stored
 *     transposed: a_rows has one offset per token id);
 *   - replace (a module's full copy): y[t, col_m + n] = scale * sum_j v[t, j] * Bt_j[n], the base
 *     output dropped.
 * A module writes its first d.out columns (<= width_m): at lm_head adapters differ in vocabulary.
 * A row longer than row_cap elements (lm_head's B^T and g: vocab-long) is stored as pieces of
 * row_cap columns, piece-major: piece c of row j is b_rows[c * rank + j] (server/page_layout.py).
 *
 * Why a C kernel: a decode step with 64 adapters makes ~16,000 tiny per-adapter matmuls through
 * torch (each paying a fixed dispatch cost larger than its arithmetic). Here one call per group
 * and layer covers them all, and rows are read straight from the pages (no gathered copy).
 * Tokens are processed in tiles of TILE so that prefill segments reuse each weight row TILE times.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 4

typedef struct {
    int64_t rank;    /* 0: this segment's adapter lacks the module (or no adapter) */
    int64_t a_rows;  /* address of int64_t[rank]: element offsets of A's rows in the arena */
    int64_t b_rows;  /* address of int64_t[rank * pieces]: element offsets of B^T's rows */
    double scale;
    int64_t g_rows;  /* DoRA: address of int64_t[pieces]: offsets of the scale row g; 0: none */
    int64_t out;     /* columns written (the module's out_features) */
    int64_t replace; /* 1: a full copy, its output replaces y's */
} Desc;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* v[i * r + j] = scale * dot(A_j, x_i) for i < nt (nt <= TILE), two rows of A at a time so each
 * x load feeds two FMAs and each A load feeds nt. */
static void shrink_f32(const float *arena, const int64_t *ar, int64_t r, float sc, int64_t K, int nt,
                       const float *const xs[TILE], float *v) {
    const int64_t kv = K & ~(int64_t)7;
    int64_t j = 0;
    for (; j + 1 < r; j += 2) {
        const float *a0 = arena + ar[j], *a1 = arena + ar[j + 1];
        v8f c0[TILE] = {0}, c1[TILE] = {0};
        for (int64_t k = 0; k < kv; k += 8) {
            const v8f w0 = load8(a0 + k), w1 = load8(a1 + k);
            for (int i = 0; i < TILE; i++) {
                if (i < nt) {
                    const v8f xv = load8(xs[i] + k);
                    c0[i] += w0 * xv;
                    c1[i] += w1 * xv;
                }
            }
        }
        for (int i = 0; i < nt; i++) {
            float s0 = hsum8(c0[i]), s1 = hsum8(c1[i]);
            for (int64_t k = kv; k < K; k++) {
                s0 += a0[k] * xs[i][k];
                s1 += a1[k] * xs[i][k];
            }
            v[i * r + j] = s0 * sc;
            v[i * r + j + 1] = s1 * sc;
        }
    }
    for (; j < r; j++) {
        const float *a0 = arena + ar[j];
        for (int i = 0; i < nt; i++) {
            v8f c = {0};
            for (int64_t k = 0; k < kv; k += 8) c += load8(a0 + k) * load8(xs[i] + k);
            float s = hsum8(c);
            for (int64_t k = kv; k < K; k++) s += a0[k] * xs[i][k];
            v[i * r + j] = s * sc;
        }
    }
}

/* y_i[n] += sum_j v[i * r + j] * Bt_j[n]. Rows of B^T are taken 8 at a time (8 memory streams,
 * which hardware prefetchers follow; all r rows at once would thrash them when a decode token
 * streams its adapter from memory), 16 columns at a time held in registers over those rows, so
 * each B^T load feeds nt FMAs and y (in L1) is read and written once per 8 rows. */
#define JBLOCK 8
static void expand_f32(const float *arena, const int64_t *br, int64_t r, int64_t N, int nt,
                       const float *v, float *const ys[TILE]) {
    const int64_t nv = N & ~(int64_t)15;
    for (int64_t j0 = 0; j0 < r; j0 += JBLOCK) {
        const int64_t j1 = j0 + JBLOCK < r ? j0 + JBLOCK : r;
        for (int64_t n = 0; n < nv; n += 16) {
            v8f lo[TILE], hi[TILE];
            for (int i = 0; i < TILE; i++) {
                if (i < nt) {
                    lo[i] = load8(ys[i] + n);
                    hi[i] = load8(ys[i] + n + 8);
                }
            }
            for (int64_t j = j0; j < j1; j++) {
                const float *b = arena + br[j] + n;
                const v8f b0 = load8(b), b1 = load8(b + 8);
                for (int i = 0; i < TILE; i++) {
                    if (i < nt) {
                        const float w = v[i * r + j];
                        lo[i] += w * b0;
                        hi[i] += w * b1;
                    }
                }
            }
            for (int i = 0; i < nt; i++) {
                store8(ys[i] + n, lo[i]);
                store8(ys[i] + n + 8, hi[i]);
            }
        }
    }
    for (int64_t n = nv; n < N; n++)
        for (int i = 0; i < nt; i++) {
            float s = 0.f;
            for (int64_t j = 0; j < r; j++) s += v[i * r + j] * arena[br[j] + n];
            ys[i][n] += s;
        }
}

/* Columns of piece c of an output of width N cut into pieces of cw: [c * cw, c * cw + *n). */
static inline int64_t piece(int64_t c, int64_t cw, int64_t N, int64_t *n) {
    *n = N - c * cw < cw ? N - c * cw : cw;
    return c * cw;
}

/* DoRA's epilogue: y_i[k] *= g[k] for the tile's rows. */
static void scale_rows(float *const ys[TILE], int nt, const float *g, int64_t n) {
    for (int i = 0; i < nt; i++)
        for (int64_t k = 0; k < n; k++) ys[i][k] *= g[k];
}

static void zero_rows(float *const ys[TILE], int nt, int64_t n) {
    for (int i = 0; i < nt; i++) memset(ys[i], 0, sizeof(float) * (size_t)n);
}

/* One tile (nt <= TILE tokens of one segment) of one module, fp32 arena/x/y.
 * xs[i]: x row of token i (ids: their token ids for a gather); ys[i]: y row (already offset to
 * the module's first column). */
static void tile_f32(const float *arena, const Desc *d, int64_t K, int64_t N, int64_t cap, int nt,
                     const float *xs[TILE], const int32_t *ids, float *ys[TILE], float *v) {
    const int64_t *ar = (const int64_t *)(intptr_t)d->a_rows;
    const int64_t *br = (const int64_t *)(intptr_t)d->b_rows;
    const int64_t *gr = (const int64_t *)(intptr_t)d->g_rows;
    const int64_t r = d->rank, cw = N > cap ? cap : N;
    const float sc = (float)d->scale;
    if (ids) {
        for (int i = 0; i < nt; i++)
            for (int64_t j = 0; j < r; j++) v[i * r + j] = arena[ar[ids[i]] + j] * sc;
    } else {
        shrink_f32(arena, ar, r, sc, K, nt, xs, v);
    }
    if (cw == N) { /* rows within a page: kept apart from the loop below, which compiles slower */
        if (d->replace) zero_rows(ys, nt, N);
        expand_f32(arena, br, r, N, nt, v, ys);
        if (gr) scale_rows(ys, nt, arena + gr[0], N);
        return;
    }
    for (int64_t c = 0; c * cw < N; c++) { /* rows in pieces (lm_head) */
        int64_t n;
        const int64_t n0 = piece(c, cw, N, &n);
        float *yc[TILE];
        for (int i = 0; i < nt; i++) yc[i] = ys[i] + n0;
        if (d->replace) zero_rows(yc, nt, n);
        expand_f32(arena, br + c * r, r, n, nt, v, yc);
        if (gr) scale_rows(yc, nt, arena + gr[c], n);
    }
}

/* The same for bf16 arena/x/y: weights and x widened to fp32, the delta accumulated in fp32 and
 * added to y (then scaled by g for DoRA) with one rounding. acc: TILE * N floats. */
static void tile_bf16(const uint16_t *arena, const Desc *d, int64_t K, int64_t N, int64_t cap, int nt,
                      const float *xs[TILE], const int32_t *ids, uint16_t *ys[TILE], float *v, float *acc) {
    const int64_t *ar = (const int64_t *)(intptr_t)d->a_rows;
    const int64_t *br = (const int64_t *)(intptr_t)d->b_rows;
    const int64_t *gr = (const int64_t *)(intptr_t)d->g_rows;
    const int64_t r = d->rank, cw = N > cap ? cap : N;
    const float sc = (float)d->scale;
    if (ids) {
        for (int i = 0; i < nt; i++)
            for (int64_t j = 0; j < r; j++) v[i * r + j] = bf16_to_f32(arena[ar[ids[i]] + j]) * sc;
    } else {
        for (int64_t j = 0; j < r; j++) {
            const uint16_t *a = arena + ar[j];
            for (int i = 0; i < nt; i++) {
                const float *xi = xs[i];
                float s = 0.f;
                for (int64_t k = 0; k < K; k++) s += bf16_to_f32(a[k]) * xi[k];
                v[i * r + j] = s * sc;
            }
        }
    }
    memset(acc, 0, sizeof(float) * (size_t)(nt * N));
    for (int64_t c = 0; c * cw < N; c++) {
        int64_t n;
        const int64_t n0 = piece(c, cw, N, &n);
        for (int64_t j = 0; j < r; j++) {
            const uint16_t *b = arena + br[c * r + j];
            for (int i = 0; i < nt; i++) {
                float *ai = acc + i * N + n0;
                const float w = v[i * r + j];
                for (int64_t k = 0; k < n; k++) ai[k] += w * bf16_to_f32(b[k]);
            }
        }
    }
    for (int64_t c = 0; c * cw < N; c++) { /* epilogue: base output (unless replaced), DoRA, one rounding */
        int64_t n;
        const int64_t n0 = piece(c, cw, N, &n);
        const uint16_t *g = gr ? arena + gr[c] : NULL;
        for (int i = 0; i < nt; i++) {
            float *ai = acc + i * N + n0;
            uint16_t *yi = ys[i] + n0;
            if (!d->replace)
                for (int64_t k = 0; k < n; k++) ai[k] += bf16_to_f32(yi[k]);
            if (g)
                for (int64_t k = 0; k < n; k++) ai[k] *= bf16_to_f32(g[k]);
            for (int64_t k = 0; k < n; k++) yi[k] = f32_to_bf16(ai[k]);
        }
    }
}

/* Returns 0, or -1 if memory for the work list could not be allocated.
 * is_bf16: arena, x and y are bf16 (else fp32). x: [T, K] rows ldx apart (gather: int32[T] token
 * ids); y: rows ldy apart. seg_starts: int64[nseg + 1]; desc: Desc[nseg * desc_stride]; mods,
 * cols, widths: int64[nmod]. row_cap: the longest stored row (page_elems). */
int lora_group(int is_bf16, const void *arena, const void *x, int64_t ldx, void *y, int64_t ldy,
               int64_t K, int64_t nseg, const int64_t *seg_starts, const Desc *desc,
               int64_t desc_stride, int64_t nmod, const int64_t *mods, const int64_t *cols,
               const int64_t *widths, int num_threads, int gather, int64_t row_cap) {
    int64_t nitems = 0;
    for (int64_t s = 0; s < nseg; s++) nitems += (seg_starts[s + 1] - seg_starts[s] + TILE - 1) / TILE;
    if (nitems == 0) return 0;
    int64_t *items = malloc(sizeof(int64_t) * 2 * (size_t)nitems); /* (segment, first token) */
    if (!items) return -1;
    int64_t w = 0;
    for (int64_t s = 0; s < nseg; s++)
        for (int64_t t = seg_starts[s]; t < seg_starts[s + 1]; t += TILE) {
            items[2 * w] = s;
            items[2 * w + 1] = t;
            w++;
        }
    int64_t max_n = 0, max_rank = 1;
    for (int64_t m = 0; m < nmod; m++) {
        max_n = widths[m] > max_n ? widths[m] : max_n;
        for (int64_t s = 0; s < nseg; s++) {
            const int64_t r = desc[s * desc_stride + mods[m]].rank;
            max_rank = r > max_rank ? r : max_rank;
        }
    }
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        float *v = malloc(sizeof(float) * (size_t)(TILE * max_rank));
        float *acc = is_bf16 ? malloc(sizeof(float) * (size_t)(TILE * max_n)) : NULL;
        float *xbuf = is_bf16 && !gather ? malloc(sizeof(float) * (size_t)(TILE * K)) : NULL;
        int ok = v && (!is_bf16 || (acc && (xbuf || gather)));
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < nitems; it++) {
            if (!ok) continue;
            const int64_t s = items[2 * it], t0 = items[2 * it + 1];
            const int64_t end = seg_starts[s + 1];
            const int nt = (int)(end - t0 < TILE ? end - t0 : TILE);
            const float *xs[TILE];
            const int32_t *ids = gather ? (const int32_t *)x + t0 : NULL;
            if (is_bf16 && !gather) {
                for (int i = 0; i < nt; i++) {
                    const uint16_t *xr = (const uint16_t *)x + (t0 + i) * ldx;
                    for (int64_t k = 0; k < K; k++) xbuf[i * K + k] = bf16_to_f32(xr[k]);
                    xs[i] = xbuf + i * K;
                }
            } else if (!gather) {
                for (int i = 0; i < nt; i++) xs[i] = (const float *)x + (t0 + i) * ldx;
            }
            for (int64_t m = 0; m < nmod; m++) {
                const Desc *d = desc + s * desc_stride + mods[m];
                if (d->rank <= 0) continue;
                const int64_t N = d->out < widths[m] ? d->out : widths[m];
                if (is_bf16) {
                    uint16_t *ys[TILE];
                    for (int i = 0; i < nt; i++) ys[i] = (uint16_t *)y + (t0 + i) * ldy + cols[m];
                    tile_bf16((const uint16_t *)arena, d, K, N, row_cap, nt, xs, ids, ys, v, acc);
                } else {
                    float *ys[TILE];
                    for (int i = 0; i < nt; i++) ys[i] = (float *)y + (t0 + i) * ldy + cols[m];
                    tile_f32((const float *)arena, d, K, N, row_cap, nt, xs, ids, ys, v);
                }
            }
        }
        free(v);
        free(acc);
        free(xbuf);
    }
    free(items);
    return failed ? -1 : 0;
}

/* Copy n rows into the arena: row i is lens[i] bytes from address srcs[i] to byte offset dsts[i].
 * Used to write an adapter's rows into its pages (one call per adapter instead of one indexed
 * copy per matrix). The caller converts the rows to the arena's dtype and checks the offsets. */
void copy_rows(void *arena, int64_t n, const int64_t *dsts, const int64_t *srcs, const int64_t *lens,
               int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t i = 0; i < n; i++)
        memcpy((char *)arena + dsts[i], (const void *)(intptr_t)srcs[i], (size_t)lens[i]);
}
