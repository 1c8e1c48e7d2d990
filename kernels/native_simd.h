/* What both CPU kernel sources share: the vector width and types (GCC/Clang vector extensions, so
 * the compiler picks AVX-512 or AVX2 instructions from -march), unaligned loads and stores, the
 * horizontal sum, fp32 <-> bf16 conversions, and the LoRA kernel's paired (bf16: de-interleaved)
 * weight loads. Included by lora_native.c and model_native.c. */
#ifndef LORA_SERVER_NATIVE_SIMD_H
#define LORA_SERVER_NATIVE_SIMD_H

#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Horizontal sum as a tree of halving adds (a chain of VW dependent adds would be ~4x slower). */
static inline float vsum(vf v) {
#if VW == 16
    vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vf8 a = v;
#endif
    vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The hot loops take weights 2 * VW at a time, as a pair of vectors (e, o). fp32: in order, e =
 * elements [i, i + VW), o = [i + VW, i + 2 * VW). bf16: de-interleaved, e = the even elements and o
 * the odd ones: one load of VW 32-bit words, each an even element in its low half and the next odd
 * one in its high half, widened by a shift and a mask. Widening in order (wload) takes a shuffle per
 * VW weights (vpmovzxwd), slower than the FMAs it feeds: with it a bf16 row cost more time than the
 * fp32 row of twice its bytes. The x or y that meets the weights is put in the same order
 * (xpair / ypair_load / ypair_store), once per tile for x, once per block of rows for y. */
static inline __attribute__((always_inline)) void wpair(const void *row, int64_t i, int wbf16, vf *e,
                                                        vf *o) {
    if (!wbf16) {
        *e = vload((const float *)row + i);
        *o = vload((const float *)row + i + VW);
        return;
    }
    vu w;
    memcpy(&w, (const uint16_t *)row + i, sizeof w);
    *e = (vf)(w << 16);
    *o = (vf)(w & 0xffff0000u);
}

#if VW == 16
#define EVENS 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define ODDS 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#define ZIP_LO 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define ZIP_HI 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#else
#define EVENS 0, 2, 4, 6, 8, 10, 12, 14
#define ODDS 1, 3, 5, 7, 9, 11, 13, 15
#define ZIP_LO 0, 8, 1, 9, 2, 10, 3, 11
#define ZIP_HI 4, 12, 5, 13, 6, 14, 7, 15
#endif

/* 2 * VW fp32 values from p in the order of wpair (bf16: de-interleaved), and back. */
static inline __attribute__((always_inline)) void ypair_load(const float *p, int wbf16, vf *e, vf *o) {
    const vf a = vload(p), b = vload(p + VW);
    *e = wbf16 ? __builtin_shufflevector(a, b, EVENS) : a;
    *o = wbf16 ? __builtin_shufflevector(a, b, ODDS) : b;
}

static inline __attribute__((always_inline)) void ypair_store(float *p, vf e, vf o, int wbf16) {
    vstore(p, wbf16 ? __builtin_shufflevector(e, o, ZIP_LO) : e);
    vstore(p + VW, wbf16 ? __builtin_shufflevector(e, o, ZIP_HI) : o);
}

/* xp = x de-interleaved per 2 * VW block (evens then odds), for the shrink of bf16 rows; the
 * K % (2 * VW) tail is left out (read from x itself). */
static inline void xpair(const float *x, int64_t K, float *xp) {
    for (int64_t k = 0; k + 2 * VW <= K; k += 2 * VW) {
        vf e, o;
        ypair_load(x + k, 1, &e, &o);
        vstore(xp + k, e);
        vstore(xp + k + VW, o);
    }
}

#endif
