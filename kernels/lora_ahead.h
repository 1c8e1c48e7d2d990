/* The LoRA kernel's read-ahead (included by lora_native.c only; Desc is defined there).
 *
 * Why: a decode step streams every row of its adapters once, from memory, in runs that end at each
 * row (1-2 KiB), matrix, page and work item. The hardware prefetchers restart at every 4 KiB page
 * and know nothing of the next matrix or item, so loops that lean on them wait out the memory's
 * latency at every start, with few lines in flight (the kernel ran at ~17 GB/s of a machine's
 * 21-48). Here a thread lists the rows it will read, in the order it reads them (its plan: the
 * current work item's rows, then the next one's, claimed early for this), and a cursor AHEAD
 * bytes ahead of the loops prefetches them line by line: as the loops take n lines, the cursor
 * requests the next n. The distance is in bytes, so bf16 rows keep as many bytes in flight as
 * fp32 ones; the lines land in L2 (prefetcht1: the distance exceeds what L1 holds beside the
 * loops' own lines). */
#ifndef LORA_SERVER_LORA_AHEAD_H
#define LORA_SERVER_LORA_AHEAD_H

#include <stdint.h>
#include <string.h>

#define AHEAD 16384 /* bytes; 12-32 KiB measured alike, 8 KiB slower */
#define LINE 64

typedef struct {
    int64_t off, bytes; /* a run of the arena some loop reads: byte offset, length */
} Span;

typedef struct {
    const char *arena;
    Span *plan;          /* the current item's spans, then the next item's */
    int64_t n, next;     /* spans in plan; the cursor's next span */
    const char *p, *end; /* the cursor's next line and the end of its span */
} Ahead;

/* Prefetch the next `lines` cache lines of the plan (as the loops consume as many). */
static inline __attribute__((always_inline)) void ahead(Ahead *h, int64_t lines) {
    const char *p = h->p, *end = h->end;
    for (int64_t i = 0; i < lines; i++) {
        if (p >= end) {
            if (h->next >= h->n) break;
            const Span s = h->plan[h->next++];
            p = (const char *)((uintptr_t)(h->arena + s.off) & ~(uintptr_t)(LINE - 1));
            end = h->arena + s.off + s.bytes;
        }
        __builtin_prefetch(p, 0, 2); /* prefetcht1: into L2 (t0 and nta: ~1.5x slower) */
        p += LINE;
    }
    h->p = p;
    h->end = end;
}

/* Lines of `bytes` (the loops' accounting of what they consumed). */
static inline int64_t lines_of(int64_t bytes) { return (bytes + LINE - 1) / LINE; }

/* The spans a work item's loops read, in their order, for one segment's descriptors: per module, A's
 * rows (none for a gather: one row per token, looked up), B^T's (piece-major), DoRA's g. Writes
 * them to out (if not NULL) and returns their number. */
static int64_t item_spans(const Desc *seg_desc, int64_t nmod, const int64_t *mods, const int64_t *widths,
                          int64_t K, int64_t page_bytes, int gather_ids, Span *out) {
    int64_t n = 0;
    for (int64_t m = 0; m < nmod; m++) {
        const Desc *d = seg_desc + mods[m];
        if (d->rank <= 0) continue;
        const int64_t item = d->flags & WEIGHTS_BF16 ? 2 : 4, cap = page_bytes / item;
        const int64_t N = d->out < widths[m] ? d->out : widths[m], cw = N > cap ? cap : N;
        const int64_t pieces = (N + cw - 1) / cw;
        const int64_t *ar = (const int64_t *)(intptr_t)d->a_rows, *br = (const int64_t *)(intptr_t)d->b_rows;
        const int64_t *gr = (const int64_t *)(intptr_t)d->g_rows;
        for (int64_t j = 0; j < d->rank && !gather_ids; j++, n++)
            if (out) out[n] = (Span){ar[j], K * item};
        for (int64_t c = 0; c < pieces; c++) {
            const int64_t bytes = (N - c * cw < cw ? N - c * cw : cw) * item;
            for (int64_t j = 0; j < d->rank; j++, n++)
                if (out) out[n] = (Span){br[c * d->rank + j], bytes};
            if (gr && out) out[n] = (Span){gr[c], bytes};
            n += gr != 0;
        }
    }
    return n;
}

/* The item after the current one enters the plan: its spans are appended; done: the current one's
 * spans (the first `done`) are dropped first, the cursor kept where it is in what follows. */
static void plan_next(Ahead *h, int64_t done, const Desc *seg_desc, int64_t nmod, const int64_t *mods,
                      const int64_t *widths, int64_t K, int64_t page_bytes, int gather_ids) {
    if (done > 0) {
        memmove(h->plan, h->plan + done, sizeof(Span) * (size_t)(h->n - done));
        h->n -= done;
        h->next = h->next > done ? h->next - done : 0;
    }
    if (seg_desc) h->n += item_spans(seg_desc, nmod, mods, widths, K, page_bytes, gather_ids, h->plan + h->n);
}

#endif
