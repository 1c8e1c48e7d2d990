/* Multi-adapter LoRA on the CPU, reading the adapters' rows in place from the paged arena.
 *
 * One call computes the LoRA terms of one module group (modules that read the same input x and
 * write consecutive column blocks of one output y: q/k/v, gate/up, o, down) of one layer, for
 * every token of the step:
 *
 *     for each segment s (tokens seg_starts[s] .. seg_starts[s + 1]) and module m of the group:
 *         d = desc[s * desc_stride + mods[m]]             (that segment's adapter, that module)
 *         v[t, j]          = sum_k A_j[k] * x[t, k]              j < d.rank   (shrink)
 *         y[t, col_m + n] += d.scale * sum_j v[t, j] * Bt_j[n]   n < width_m  (expand)
 *
 * where A_j is the row at byte offset ((int64_t *) d.a_rows)[j] of the arena, Bt_j likewise (rows
 * of B transposed), stored as fp32 or, with d.flags & WEIGHTS_BF16, as bf16 (widened to fp32 as
 * they are loaded: a shift). x and y are fp32, or bf16 (xy_bf16: x widened, the delta accumulated
 * in fp32 and added to y with one rounding). The torch reference is kernels/lora.py:
 * lora_shrink_ref / lora_expand_ref and lora_group_ref. Three variants per module:
 *   - DoRA (d.g_rows != 0): the epilogue scales the output, y[t, col_m + n] = g[n] * (y + ...),
 *     g being the module's scale row in the arena (y holds the base layer's output on entry);
 *   - gather (embed_tokens): x holds int32 token ids and v[t, j] = A^T[x[t]][j] (A stored
 *     transposed: a_rows has one offset per token id);
 *   - replace (a module's full copy): y[t, col_m + n] = scale * sum_j v[t, j] * Bt_j[n], the base
 *     output dropped.
 * A module writes its first d.out columns (<= width_m): at lm_head adapters differ in vocabulary.
 * A row longer than a page (lm_head's B^T and g: vocab-long) is stored as pieces of one page each
 * (page_bytes / the weights' item size columns), piece-major: piece c of row j is b_rows[c * rank
 * + j] (server/page_layout.py).
 *
 * Why a C kernel: a decode step with 64 adapters makes ~16,000 tiny per-adapter matmuls through
 * torch (each paying a fixed dispatch cost larger than its arithmetic). Here one call per group
 * and layer covers them all, and rows are read straight from the pages (no gathered copy). Decode
 * is a stream over every adapter's weights (each row is used once per token): the loops read rows
 * front to back, a few at a time, so that every weight load feeds the tile's TILE tokens, while a
 * read-ahead (lora_ahead.h) requests the rows they will read next. Prefill segments reuse each row
 * TILE times.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_simd.h"

#define TILE 4
#define WEIGHTS_BF16 1

typedef uint16_t vh __attribute__((vector_size(VW * 2)));

typedef struct {
    int64_t rank;    /* 0: this segment's adapter lacks the module (or no adapter) */
    int64_t a_rows;  /* address of int64_t[rank] (gather: [vocab]): byte offsets of A's rows in the arena */
    int64_t b_rows;  /* address of int64_t[rank * pieces]: byte offsets of B^T's rows */
    double scale;
    int64_t flags;   /* WEIGHTS_BF16: the rows are bf16 (else fp32) */
    int64_t g_rows;  /* DoRA: address of int64_t[pieces]: byte offsets of the scale row g; 0: none */
    int64_t out;     /* columns written (the module's out_features) */
    int64_t replace; /* 1: a full copy, its output replaces y's */
} Desc;

#include "lora_ahead.h"

/* VW weights from element i of a row of fp32 or bf16 (wbf16 is a constant at every call site, so
 * each caller is compiled twice, without a branch in its loops). */
static inline __attribute__((always_inline)) vf wload(const void *row, int64_t i, int wbf16) {
    if (!wbf16) return vload((const float *)row + i);
    vh h;
    memcpy(&h, (const uint16_t *)row + i, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline __attribute__((always_inline)) float wload1(const void *row, int64_t i, int wbf16) {
    return wbf16 ? bf2f(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* v[i * r + j] = scale * dot(A_j, x_i) for i < nt (nt <= TILE), ROWS rows of A at a time: each x
 * load feeds ROWS FMAs, each A load nt, and the ROWS * nt accumulators are independent chains (one
 * chain would wait out the FMA latency at every step: decode is nt = 1). xv: the vector loop's x,
 * xs itself for fp32 rows, de-interleaved (xpair) for bf16 ones; the tail reads xs. */
#define ROWS 4
static inline __attribute__((always_inline)) void shrink(const char *arena, const int64_t *ar, int64_t r,
                                                         float sc, int64_t K, int nt, const float *const xs[TILE],
                                                         const float *const xv[TILE], float *v, Ahead *h, int wbf16) {
    const int64_t kv = K - K % (2 * VW), item = wbf16 ? 2 : 4;
    int64_t j = 0;
    for (; j + ROWS <= r; j += ROWS) {
        const void *a[ROWS];
        for (int q = 0; q < ROWS; q++) a[q] = arena + ar[j + q];
        vf c[TILE][ROWS];
        for (int i = 0; i < TILE; i++)
            for (int q = 0; q < ROWS; q++) c[i][q] = (vf){0};
        for (int64_t k = 0; k < kv; k += 2 * VW) {
            vf we[ROWS], wo[ROWS];
            for (int q = 0; q < ROWS; q++) wpair(a[q], k, wbf16, &we[q], &wo[q]);
            ahead(h, lines_of(ROWS * 2 * VW * item));
            for (int i = 0; i < TILE; i++) {
                if (i < nt) {
                    const vf xe = vload(xv[i] + k), xo = vload(xv[i] + k + VW);
                    for (int q = 0; q < ROWS; q++) { /* two FMAs (as one expression: a mul, an FMA, an add) */
                        c[i][q] += we[q] * xe;
                        c[i][q] += wo[q] * xo;
                    }
                }
            }
        }
        if (kv < K) ahead(h, ROWS * lines_of((K - kv) * item));
        for (int i = 0; i < nt; i++)
            for (int q = 0; q < ROWS; q++) {
                float s = vsum(c[i][q]);
                for (int64_t k = kv; k < K; k++) s += wload1(a[q], k, wbf16) * xs[i][k];
                v[i * r + j + q] = s * sc;
            }
    }
    for (; j < r; j++) {
        const void *a0 = arena + ar[j];
        ahead(h, lines_of(K * item));
        for (int i = 0; i < nt; i++) {
            vf c0 = {0}, c1 = {0};
            for (int64_t k = 0; k < kv; k += 2 * VW) {
                vf we, wo;
                wpair(a0, k, wbf16, &we, &wo);
                c0 += we * vload(xv[i] + k);
                c1 += wo * vload(xv[i] + k + VW);
            }
            float s = vsum(c0 + c1);
            for (int64_t k = kv; k < K; k++) s += wload1(a0, k, wbf16) * xs[i][k];
            v[i * r + j] = s * sc;
        }
    }
}

/* y_i[n] += sum_j v[i * r + j] * Bt_j[n]. Rows of B^T are taken JBLOCK at a time (that many memory
 * streams, which hardware prefetchers follow; all r rows at once would thrash them when a decode
 * token streams its adapter from memory), NV * VW columns at a time held in registers over those
 * rows (NV independent chains per token: enough FMAs in flight), so each B^T load feeds nt FMAs and
 * y (in L1) is read and written once per JBLOCK rows. NV: 4 with 32 vector registers (AVX-512), 2
 * with 16 (AVX2). */
#define JBLOCK 8
#if VW == 16
#define NV 4
#else
#define NV 2
#endif
static inline __attribute__((always_inline)) void expand(const char *arena, const int64_t *br, int64_t r,
                                                         int64_t N, int nt, const float *v, float *const ys[TILE],
                                                         Ahead *h, int wbf16) {
    const int64_t nv = N - N % (NV * VW), item = wbf16 ? 2 : 4;
    for (int64_t j0 = 0; j0 < r; j0 += JBLOCK) {
        const int64_t j1 = j0 + JBLOCK < r ? j0 + JBLOCK : r;
        for (int64_t n = 0; n < nv; n += NV * VW) {
            ahead(h, lines_of((j1 - j0) * NV * VW * item));
            vf acc[TILE][NV]; /* in wpair's order: acc[i][u], acc[i][u + 1] hold columns n + u * VW.. */
            for (int i = 0; i < TILE; i++)
                if (i < nt)
                    for (int u = 0; u < NV; u += 2) ypair_load(ys[i] + n + u * VW, wbf16, &acc[i][u], &acc[i][u + 1]);
            for (int64_t j = j0; j < j1; j++) {
                const void *b = arena + br[j];
                vf bw[NV];
                for (int u = 0; u < NV; u += 2) wpair(b, n + u * VW, wbf16, &bw[u], &bw[u + 1]);
                for (int i = 0; i < TILE; i++) {
                    if (i < nt) {
                        const float w = v[i * r + j];
                        for (int u = 0; u < NV; u++) acc[i][u] += w * bw[u];
                    }
                }
            }
            for (int i = 0; i < nt; i++)
                for (int u = 0; u < NV; u += 2) ypair_store(ys[i] + n + u * VW, acc[i][u], acc[i][u + 1], wbf16);
        }
        if (nv < N) ahead(h, lines_of((j1 - j0) * (N - nv) * item));
        for (int64_t n = nv; n + VW <= N; n += VW) { /* whole vectors left over */
            for (int i = 0; i < nt; i++) {
                vf acc = vload(ys[i] + n);
                for (int64_t j = j0; j < j1; j++) acc += v[i * r + j] * wload(arena + br[j], n, wbf16);
                vstore(ys[i] + n, acc);
            }
        }
    }
    for (int64_t n = N - N % VW; n < N; n++)
        for (int i = 0; i < nt; i++) {
            float s = 0.f;
            for (int64_t j = 0; j < r; j++) s += v[i * r + j] * wload1(arena + br[j], n, wbf16);
            ys[i][n] += s;
        }
}

/* v[i * r + j] = scale * A^T[ids[i]][j]: a gather shrink (embed_tokens) is a row lookup. */
static void gather(const char *arena, const int64_t *ar, int64_t r, float sc, int nt, const int32_t *ids,
                   float *v, int wbf16) {
    for (int i = 0; i < nt; i++) {
        const char *row = arena + ar[ids[i]];
        for (int64_t j = 0; j < r; j++) v[i * r + j] = wload1(row, j, wbf16) * sc;
    }
}

/* Columns of piece c of an output of width N cut into pieces of cw: [c * cw, c * cw + *n). */
static inline int64_t piece(int64_t c, int64_t cw, int64_t N, int64_t *n) {
    *n = N - c * cw < cw ? N - c * cw : cw;
    return c * cw;
}

/* DoRA's epilogue: y_i[k] *= g[k] for the tile's rows. */
static void scale_rows(float *const ys[TILE], int nt, const void *g, int64_t n, int wbf16) {
    for (int i = 0; i < nt; i++)
        for (int64_t k = 0; k < n; k++) ys[i][k] *= wload1(g, k, wbf16);
}

static void zero_rows(float *const ys[TILE], int nt, int64_t n) {
    for (int i = 0; i < nt; i++) memset(ys[i], 0, sizeof(float) * (size_t)n);
}

/* Piece c's output columns of one module: ys[i] += B^T piece c (then, in_place, the epilogue:
 * replace starts from zero, DoRA scales by g). */
static inline __attribute__((always_inline)) void expand_piece(const char *arena, const Desc *d, int64_t c,
                                                               int64_t n, int nt, const float *v,
                                                               float *const ys[TILE], int in_place, Ahead *h,
                                                               int wbf16) {
    const int64_t *br = (const int64_t *)(intptr_t)d->b_rows;
    const int64_t *gr = (const int64_t *)(intptr_t)d->g_rows;
    if (in_place && d->replace) zero_rows(ys, nt, n);
    expand(arena, br + c * d->rank, d->rank, n, nt, v, ys, h, wbf16);
    if (gr) ahead(h, lines_of(n * (wbf16 ? 2 : 4)));
    if (in_place && gr) scale_rows(ys, nt, arena + gr[c], n, wbf16);
}

/* One tile (nt <= TILE tokens of one segment) of one module into fp32 rows ys (already offset to
 * the module's first column). in_place: ys is y itself, holding the base output (the epilogue is
 * applied here); else ys is a zeroed delta and the caller applies it (finish_bf16). ids: the
 * tile's token ids for a gather, else NULL. xps: xs de-interleaved (xpair), for bf16 rows. */
static inline __attribute__((always_inline)) void tile_body(const char *arena, const Desc *d, int64_t K, int64_t N,
                                                            int64_t page_bytes, int nt, const float *const xs[TILE],
                                                            const float *const xps[TILE], const int32_t *ids,
                                                            float *const ys[TILE], float *v, int in_place,
                                                            Ahead *h, int wbf16) {
    const int64_t *ar = (const int64_t *)(intptr_t)d->a_rows;
    const int64_t r = d->rank, cap = page_bytes / (wbf16 ? 2 : 4), cw = N > cap ? cap : N;
    const float sc = (float)d->scale;
    if (ids)
        gather(arena, ar, r, sc, nt, ids, v, wbf16);
    else
        shrink(arena, ar, r, sc, K, nt, xs, wbf16 ? xps : xs, v, h, wbf16);
    if (cw == N) { /* rows within a page (all but lm_head): no piece loop around the expand */
        expand_piece(arena, d, 0, N, nt, v, ys, in_place, h, wbf16);
        return;
    }
    for (int64_t c = 0; c * cw < N; c++) { /* rows in pieces (lm_head) */
        int64_t n;
        const int64_t n0 = piece(c, cw, N, &n);
        float *yc[TILE];
        for (int i = 0; i < nt; i++) yc[i] = ys[i] + n0;
        expand_piece(arena, d, c, n, nt, v, yc, in_place, h, wbf16);
    }
}

/* tile_body compiled per row dtype and for decode (nt = 1: the loops without their per-token
 * branches, which cost a bf16 decode row ~20% when its rows are in cache). */
static void tile(const char *arena, const Desc *d, int64_t K, int64_t N, int64_t page_bytes, int nt,
                 const float *const xs[TILE], const float *const xps[TILE], const int32_t *ids,
                 float *const ys[TILE], float *v, int in_place, Ahead *h) {
    if (d->flags & WEIGHTS_BF16) {
        if (nt == 1)
            tile_body(arena, d, K, N, page_bytes, 1, xs, xps, ids, ys, v, in_place, h, 1);
        else
            tile_body(arena, d, K, N, page_bytes, nt, xs, xps, ids, ys, v, in_place, h, 1);
    } else {
        if (nt == 1)
            tile_body(arena, d, K, N, page_bytes, 1, xs, xps, ids, ys, v, in_place, h, 0);
        else
            tile_body(arena, d, K, N, page_bytes, nt, xs, xps, ids, ys, v, in_place, h, 0);
    }
}

/* bf16 y: y = round((y + delta) * g) with delta in acc (fp32, TILE rows of N), y dropped for a full
 * copy and g only for DoRA: one rounding, as lora_group_ref. */
static void finish_bf16(const char *arena, const Desc *d, int64_t N, int64_t page_bytes, int nt,
                        const float *acc, uint16_t *const yb[TILE]) {
    const int wbf16 = (d->flags & WEIGHTS_BF16) != 0;
    const int64_t *gr = (const int64_t *)(intptr_t)d->g_rows;
    const int64_t cap = page_bytes / (wbf16 ? 2 : 4), cw = N > cap ? cap : N;
    for (int64_t c = 0; c * cw < N; c++) {
        int64_t n;
        const int64_t n0 = piece(c, cw, N, &n);
        const char *g = gr ? arena + gr[c] : NULL;
        for (int i = 0; i < nt; i++) {
            const float *ai = acc + i * N + n0;
            uint16_t *yi = yb[i] + n0;
            for (int64_t k = 0; k < n; k++) {
                float s = d->replace ? ai[k] : bf2f(yi[k]) + ai[k];
                yi[k] = f2bf(g ? s * wload1(g, k, wbf16) : s);
            }
        }
    }
}

/* One work item: tokens t0 .. t0 + nt of a segment, every module of the group. With bf16 x/y, x is
 * widened into xbuf and each module's delta is summed in acc (fp32, zeroed) and added to y once.
 * For bf16 rows x is de-interleaved once into xbuf + TILE * K, for every module of the group.
 * gather: x holds int32 token ids. */
static void item(int xy_bf16, int gather_ids, const char *arena, const void *x, int64_t ldx, void *y,
                 int64_t ldy, int64_t K, int64_t page_bytes, const Desc *seg_desc, int64_t nmod,
                 const int64_t *mods, const int64_t *cols, const int64_t *widths, int64_t t0, int nt,
                 float *v, float *xbuf, float *acc, Ahead *h) {
    const float *xs[TILE] = {0}, *xps[TILE] = {0};
    const int32_t *ids = gather_ids ? (const int32_t *)x + t0 : NULL;
    for (int i = 0; i < nt && !ids; i++) {
        if (xy_bf16) {
            const uint16_t *xr = (const uint16_t *)x + (t0 + i) * ldx;
            for (int64_t k = 0; k < K; k++) xbuf[i * K + k] = bf2f(xr[k]);
            xs[i] = xbuf + i * K;
        } else {
            xs[i] = (const float *)x + (t0 + i) * ldx;
        }
    }
    for (int64_t m = 0; m < nmod; m++) {
        const Desc *d = seg_desc + mods[m];
        if (d->rank <= 0) continue;
        const int64_t N = d->out < widths[m] ? d->out : widths[m];
        if (!ids && (d->flags & WEIGHTS_BF16) && !xps[0])
            for (int i = 0; i < nt; i++) {
                xpair(xs[i], K, xbuf + (TILE + i) * K);
                xps[i] = xbuf + (TILE + i) * K;
            }
        float *ys[TILE];
        if (!xy_bf16) {
            for (int i = 0; i < nt; i++) ys[i] = (float *)y + (t0 + i) * ldy + cols[m];
            tile(arena, d, K, N, page_bytes, nt, xs, xps, ids, ys, v, 1, h);
            continue;
        }
        uint16_t *yb[TILE];
        memset(acc, 0, sizeof(float) * (size_t)(nt * N));
        for (int i = 0; i < nt; i++) {
            ys[i] = acc + i * N;
            yb[i] = (uint16_t *)y + (t0 + i) * ldy + cols[m];
        }
        tile(arena, d, K, N, page_bytes, nt, xs, xps, ids, ys, v, 0, h);
        finish_bf16(arena, d, N, page_bytes, nt, acc, yb);
    }
}

/* A work item: tokens t0 .. of segment s; w: its rows to stream (the sum of its modules' ranks). */
typedef struct {
    int64_t s, t0, w;
} Item;

/* Heaviest first (then in segment order): with dynamic scheduling the last items taken, which can
 * leave a thread waiting at the end of the call, are the lightest (ranks 8..64 in one call: a
 * rank-64 adapter last would idle the other thread for the whole of its stream). */
static int heavier_first(const void *pa, const void *pb) {
    const Item *a = pa, *b = pb;
    if (a->w != b->w) return a->w > b->w ? -1 : 1;
    return a->s != b->s ? (a->s < b->s ? -1 : 1) : (a->t0 < b->t0 ? -1 : a->t0 > b->t0);
}

/* Rows a tile of segment s streams per token: the sum of its adapter's ranks over the group's modules. */
static int64_t seg_work(const Desc *seg_desc, int64_t nmod, const int64_t *mods) {
    int64_t w = 0;
    for (int64_t m = 0; m < nmod; m++) w += seg_desc[mods[m]].rank > 0 ? seg_desc[mods[m]].rank : 0;
    return w;
}

/* The call's work items, heaviest first (NULL if there are none, *nitems = 0, or no memory), and
 * the most read-ahead spans one of them has. */
static Item *work_list(int64_t nseg, const int64_t *seg_starts, const Desc *desc, int64_t desc_stride,
                       int64_t nmod, const int64_t *mods, const int64_t *widths, int64_t K, int64_t page_bytes,
                       int gather_ids, int64_t *nitems, int64_t *max_spans) {
    int64_t n = 0;
    *max_spans = 0;
    for (int64_t s = 0; s < nseg; s++)
        if (seg_work(desc + s * desc_stride, nmod, mods) > 0)
            n += (seg_starts[s + 1] - seg_starts[s] + TILE - 1) / TILE;
    *nitems = n;
    Item *items = n ? malloc(sizeof(Item) * (size_t)n) : NULL;
    if (!items) return NULL;
    n = 0;
    for (int64_t s = 0; s < nseg; s++) {
        const Desc *sd = desc + s * desc_stride;
        const int64_t w = seg_work(sd, nmod, mods);
        const int64_t spans = item_spans(sd, nmod, mods, widths, K, page_bytes, gather_ids, NULL);
        *max_spans = spans > *max_spans ? spans : *max_spans;
        for (int64_t t = seg_starts[s]; w > 0 && t < seg_starts[s + 1]; t += TILE) items[n++] = (Item){s, t, w};
    }
    qsort(items, (size_t)n, sizeof(Item), heavier_first);
    return items;
}

/* Returns 0, or -1 if memory for the work list could not be allocated.
 * xy_bf16: x and y are bf16 (else fp32). x: [T, K] rows ldx apart (gather: int32[T] token ids);
 * y: rows ldy apart. seg_starts: int64[nseg + 1]; desc: Desc[nseg * desc_stride]; mods, cols,
 * widths: int64[nmod]. page_bytes: a page's bytes (the longest stored row). */
int lora_group(int xy_bf16, const void *arena, const void *x, int64_t ldx, void *y, int64_t ldy,
               int64_t K, int64_t nseg, const int64_t *seg_starts, const Desc *desc,
               int64_t desc_stride, int64_t nmod, const int64_t *mods, const int64_t *cols,
               const int64_t *widths, int num_threads, int gather_ids, int64_t page_bytes) {
    int64_t max_n = 0, max_rank = 0;
    for (int64_t m = 0; m < nmod; m++) {
        max_n = widths[m] > max_n ? widths[m] : max_n;
        for (int64_t s = 0; s < nseg; s++) {
            const int64_t r = desc[s * desc_stride + mods[m]].rank;
            max_rank = r > max_rank ? r : max_rank;
        }
    }
    int64_t nitems, max_spans;
    Item *items = work_list(nseg, seg_starts, desc, desc_stride, nmod, mods, widths, K, page_bytes, gather_ids,
                            &nitems, &max_spans);
    if (nitems == 0) return 0; /* no adapter of the step has these modules (e.g. q,k,v,o adapters, MLP group) */
    if (!items) return -1;
    int failed = 0;
    int64_t taken = 0; /* items claimed so far (dynamic scheduling, one at a time) */

#pragma omp parallel num_threads(num_threads)
    {
        float *v = malloc(sizeof(float) * (size_t)(TILE * max_rank));
        float *acc = xy_bf16 ? malloc(sizeof(float) * (size_t)(TILE * max_n)) : NULL;
        float *xbuf = gather_ids ? NULL : malloc(sizeof(float) * (size_t)(2 * TILE * K));
        Ahead h = {(const char *)arena, malloc(sizeof(Span) * (size_t)(2 * max_spans + 1)), 0, 0, NULL, NULL};
        int ok = v && (xbuf || gather_ids) && (!xy_bf16 || acc) && h.plan;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        /* Each thread claims its next item while it works on the current one, so that the read-ahead
         * runs on into it (the lightest items come last: at most one of them waits this way). The
         * next tile of the same segment reads the rows this one leaves in cache: not planned. */
        int64_t it = ok ? __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED) : nitems, done = 0;
        if (it < nitems) {
            plan_next(&h, 0, desc + items[it].s * desc_stride, nmod, mods, widths, K, page_bytes, gather_ids);
            ahead(&h, AHEAD / LINE);
        }
        while (it < nitems) {
            const int64_t nx = __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED), cur = h.n;
            const int fresh = nx < nitems && items[nx].s != items[it].s;
            plan_next(&h, done, fresh ? desc + items[nx].s * desc_stride : NULL, nmod, mods, widths, K, page_bytes,
                      gather_ids);
            done = cur - done;
            const int64_t s = items[it].s, t0 = items[it].t0;
            const int64_t end = seg_starts[s + 1];
            const int nt = (int)(end - t0 < TILE ? end - t0 : TILE);
            item(xy_bf16, gather_ids, (const char *)arena, x, ldx, y, ldy, K, page_bytes, desc + s * desc_stride,
                 nmod, mods, cols, widths, t0, nt, v, xbuf, acc, &h);
            it = nx;
        }
        free(v);
        free(acc);
        free(xbuf);
        free(h.plan);
    }
    free(items);
    return failed ? -1 : 0;
}
