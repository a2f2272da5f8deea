/* Helpers that the C kernels share (each kernel file is compiled on its own and includes this). */
#ifndef LLAMA_CSRC_COMMON_H
#define LLAMA_CSRC_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else /* a compiler without OpenMP: one thread */
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* count bf16 values widened to fp32 (exactly) into a new buffer for the caller to free; NULL if out of memory. */
static inline float *widened_copy(const uint16_t *x, int64_t count) {
    float *out = malloc(sizeof(float) * (size_t)count);
    if (out != NULL)
        for (int64_t i = 0; i < count; i++) out[i] = bf16_to_float(x[i]);
    return out;
}

/* Round to nearest, ties to even, as torch does; NaN stays a (quiet) NaN. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* e^x for x <= 0 (NaN stays NaN) within 2 ulp, as a plain expression the compiler vectorizes (libm's expf
 * is one call per value): e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln(2) / 2, and e^r by its Taylor
 * polynomial to degree 7 (error under 1e-8 relative). Below -87 the result is 0 (e^-87 ~ 1.6e-38). */
static inline float exp_nonpositive(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    const float n = __builtin_roundf(clamped * 1.44269504f);
    /* ln 2 in two parts, as fused multiply-adds: the build's -fassociative-math would fold plain ones */
    const float r = __builtin_fmaf(-n, 1.428606765330187e-06f, __builtin_fmaf(-n, 0.693145751953125f, clamped));
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

#endif
