/* Loading an adapter: the finiteness check of a weights file's floats, and the copy of its matrices'
 * rows into their pool pages.
 *
 * Why: a rank-8 q,k,v,o adapter is 240 small matrices. Checked, transposed (B is stored as B^T),
 * cast and copied one torch op at a time, its load cost ~10 ms of Python per adapter on the engine
 * thread, for ~2 MB of bytes. Here each is one call over the whole adapter. The references are
 * kernels/lora_pages.py (write_matrix_rows: row j of a matrix lands at its pages' row offset j,
 * cast to the pages' dtype) and adapter_store/peft_format.py (_finite: no NaN or Inf).
 *
 * dtype codes: 0 = float32, 1 = bfloat16 (uint16 bits), 2 = float16 (uint16 bits).
 */
#include <stdint.h>
#include <string.h>

#include "native_simd.h"

/* Whether all n floats at p are finite: the exponent bits of none of them are all ones. */
int all_finite(const void *p, int64_t n, int dtype) {
    uint32_t bad = 0;
    if (dtype == 0) {
        const uint32_t *u = (const uint32_t *)p;
        for (int64_t i = 0; i < n; i++) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint16_t *u = (const uint16_t *)p;
        const uint16_t exp = dtype == 1 ? 0x7f80u : 0x7c00u;
        for (int64_t i = 0; i < n; i++) bad |= (uint32_t)((u[i] & exp) == exp);
    }
    return bad == 0;
}

/* One matrix's rows: its source [rows, row_len] (strides in elements: B^T is B read by column) and
 * the index of its first row in the byte offsets of every row. */
enum { SRC, SRC_BF16, ROW_STRIDE, COL_STRIDE, ROWS, ROW_LEN, FIRST, MAT_FIELDS };

static void copy_row(char *dst, int dst_bf16, const char *src, int src_bf16, int64_t cs, int64_t n) {
    if (dst_bf16 == src_bf16 && cs == 1) {
        memcpy(dst, src, (size_t)n * (dst_bf16 ? 2 : 4));
    } else if (dst_bf16 && src_bf16) {
        for (int64_t c = 0; c < n; c++) ((uint16_t *)dst)[c] = ((const uint16_t *)src)[c * cs];
    } else if (dst_bf16) {
        for (int64_t c = 0; c < n; c++) ((uint16_t *)dst)[c] = f2bf(((const float *)src)[c * cs]);
    } else if (src_bf16) {
        for (int64_t c = 0; c < n; c++) ((float *)dst)[c] = bf2f(((const uint16_t *)src)[c * cs]);
    } else {
        for (int64_t c = 0; c < n; c++) ((float *)dst)[c] = ((const float *)src)[c * cs];
    }
}

/* Row j of matrix m (mats[m * MAT_FIELDS ...]) to arena + offsets[first + j], cast to the arena's
 * dtype (bf16: rounded to nearest even, as torch's cast). One thread: an adapter is ~0.3 ms of it;
 * two threads took 1.4 ms when the other core was busy with a step (the fork/join waits for it). */
void scatter_rows(void *arena, int dst_bf16, int64_t n_mats, const int64_t *mats, const int64_t *offsets) {
    for (int64_t m = 0; m < n_mats; m++) {
        const int64_t *d = mats + m * MAT_FIELDS;
        const int64_t item = d[SRC_BF16] ? 2 : 4;
        for (int64_t j = 0; j < d[ROWS]; j++) {
            const char *src = (const char *)(intptr_t)d[SRC] + j * d[ROW_STRIDE] * item;
            copy_row((char *)arena + offsets[d[FIRST] + j], dst_bf16, src, (int)d[SRC_BF16], d[COL_STRIDE],
                     d[ROW_LEN]);
        }
    }
}

/* The byte offset of every stored row of every matrix, matrix after matrix, into out: matrix m
 * (meta[5 m ...] = index of its first page in pages, row0, rows, row length, rows per page) has
 * row j on page pages[first + (row0 + j) / rpp] at row (row0 + j) % rpp. The caller checked that
 * its rows fit its pages. Returns -1 if a row's page lies outside [0, num_pages) (num_pages < 0: no
 * such check), else 0. */
int row_offsets(int64_t n_mats, const int64_t *meta, const int64_t *pages, int64_t elems, int64_t item,
                int64_t num_pages, int64_t *out) {
    int64_t k = 0;
    for (int64_t m = 0; m < n_mats; m++) {
        const int64_t *d = meta + 5 * m;
        for (int64_t j = 0; j < d[2]; j++) {
            const int64_t r = d[1] + j, page = pages[d[0] + r / d[4]];
            if (num_pages >= 0 && (page < 0 || page >= num_pages)) return -1;
            out[k++] = (page * elems + (r % d[4]) * d[3]) * item;
        }
    }
    return 0;
}
