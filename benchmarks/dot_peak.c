/* The most multiply-adds a second this CPU's vector units do, with the instructions the decode kernels use
 * (benchmarks/bench_batch_decode.py --what bound): every OpenMP thread runs CHAINS independent sums of one
 * instruction over operands held in registers, so nothing waits on memory or on a previous result.
 *
 * kind 0, int8 x int8 byte dot products (llama/csrc/gemv_quant.c): vpdpbusd on 512 bits (64 multiply-adds) with
 * AVX512-VNNI; else vpmaddubsw + vpmaddwd + vpaddd on 256 bits (32). kind 1, bf16 dot products
 * (llama/csrc/gemv_bf16.c): vdpbf16ps on 512 bits (32) with AVX512-BF16; else fp32 FMAs, 16 lanes with AVX-512,
 * 8 with AVX2 (the kernels widen bf16 weights to fp32 there). */
#include <stdint.h>
#include <time.h>

#include "../llama/csrc/common.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define CHAINS 12

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* iters rounds of CHAINS instructions on one thread; returns the multiply-adds done and adds a checksum into *sink
 * (so that the sums are used). */
static double int8_dots(int64_t iters, uint32_t *sink) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    __m512i acc[CHAINS];
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(5);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_epi32(c);
    for (int64_t i = 0; i < iters; i++)
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbusd_epi32(acc[c], a, b);
    for (int c = 0; c < CHAINS; c++) *sink += (uint32_t)_mm512_reduce_add_epi32(acc[c]);
    return (double)iters * CHAINS * 64;
#elif defined(__AVX2__)
    __m256i acc[CHAINS];
    const __m256i b = _mm256_set1_epi8(5), ones = _mm256_set1_epi16(1);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_epi32(c);
    /* each chain's sum is also its next byte operand, so that the products cannot be computed once outside the
     * loop (the values wrap around; only the instructions count) */
    for (int64_t i = 0; i < iters; i++)
        for (int c = 0; c < CHAINS; c++)
            acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(acc[c], b), ones));
    int32_t lanes[8];
    for (int c = 0; c < CHAINS; c++) {
        _mm256_storeu_si256((__m256i *)lanes, acc[c]);
        for (int l = 0; l < 8; l++) *sink += (uint32_t)lanes[l];
    }
    return (double)iters * CHAINS * 32;
#else
    (void)iters, (void)sink;
    return 0.0;
#endif
}

static double bf16_dots(int64_t iters, uint32_t *sink) {
    float lanes[16] = {0};
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    __m512 acc[CHAINS];
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f00); /* 1, 0.5 */
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < iters; i++)
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
    for (int c = 0; c < CHAINS; c++) _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_loadu_ps(lanes), acc[c]));
    *sink += (uint32_t)lanes[0];
    return (double)iters * CHAINS * 32;
#elif defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#ifdef __AVX512F__ /* fp32 FMAs as wide as the build's vectors */
#define FMA_LANES 16
    typedef __m512 Fvec;
#define fvec_set1 _mm512_set1_ps
#define fvec_fma _mm512_fmadd_ps
#define fvec_store _mm512_storeu_ps
#else
#define FMA_LANES 8
    typedef __m256 Fvec;
#define fvec_set1 _mm256_set1_ps
#define fvec_fma _mm256_fmadd_ps
#define fvec_store _mm256_storeu_ps
#endif
    Fvec acc[CHAINS];
    const Fvec a = fvec_set1(1e-3f), b = fvec_set1(0.5f);
    for (int c = 0; c < CHAINS; c++) acc[c] = fvec_set1((float)c);
    /* acc * 0.5 + 0.001: each sum is an operand of its next product (nothing to compute once outside the loop) */
    for (int64_t i = 0; i < iters; i++)
        for (int c = 0; c < CHAINS; c++) acc[c] = fvec_fma(acc[c], b, a);
    for (int c = 0; c < CHAINS; c++) {
        fvec_store(lanes, acc[c]);
        *sink += (uint32_t)(1000.0f * lanes[0]);
    }
    return (double)iters * CHAINS * FMA_LANES;
#else
    (void)iters, (void)sink, (void)lanes;
    return 0.0;
#endif
}

volatile uint32_t llama_dot_checksum; /* where the sums go, so that the compiler keeps them */

/* Multiply-adds a second over all threads, kind 0 (int8) or 1 (bf16); 0 where this build has no vector loop for
 * it. iters rounds per thread. */
double llama_dot_peak(int kind, int64_t iters) {
    double done = 0.0;
    uint32_t sink = 0;
    const double start = seconds();
#pragma omp parallel reduction(+ : done, sink)
    done += kind == 0 ? int8_dots(iters, &sink) : bf16_dots(iters, &sink);
    const double elapsed = seconds() - start;
    llama_dot_checksum = sink;
    return done / elapsed;
}
