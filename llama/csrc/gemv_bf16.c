/* Matrix-vector product with bfloat16 weights for batch-1 decoding on CPUs (see llama/kernels/cpu_gemv.py).
 *
 * y[r, o] = sum_i x[r, i] * w[o, i], for x, w and y bf16: x (rows, k), w (n, k), y (rows, n). The input rows
 * are widened to fp32 once per call.
 *
 * Plain C that the compiler vectorizes for the CPU it runs on (-O3 -march=native): a bf16 value is the top
 * half of an fp32, so widening is a shift, and the sums run in fp32 like torch's own kernels.
 *
 * Speed is all in how the weights stream from memory. One core reads far below the machine's bandwidth if
 * it follows a single stream: on the Xeon we measured (benchmarks/RESULTS.md), walking one weight row at a
 * time reached 18 GB/s on two cores, against 28 for a plain sum. So each thread walks BLOCK rows side by
 * side (BLOCK streams in flight) and asks for each of them PREFETCH_BYTES ahead; that reached 27.5 GB/s.
 * Each row keeps LANES partial sums, one vector register's worth, which the compiler maps onto the lanes.
 * The blocks of rows are split among the OpenMP threads in contiguous runs.
 *
 * That blocking keeps BLOCK x LANES = 128 sums live: 8 of AVX-512's 32 registers, but all 16 of AVX2's, which
 * then spill (on a Zen 3 the loop was bound by instructions at 6 G weights/s a core, under the memory's
 * speed on two cores). So on CPUs with AVX2 and FMA but not AVX-512, an intrinsics loop keeps 8 lanes per row
 * (8 of the 16 registers) and widens 16 weights with two unpacks against zero, which put each bf16 in the top
 * half of an fp32 lane. The unpacks take the weights of each 128-bit half in the order 0-3, 8-11 (low) and
 * 4-7, 12-15 (high), so the input row is permuted once per call to match. That loop runs at twice the speed
 * per core. It has no software prefetch: on a Zen 3, asking for the next block of rows while one is summed
 * (a whole block ahead, at the same pace) made the pass 13% slower than leaving the 8 streams to the hardware
 * prefetchers, which then stream at the speed of a plain sum (benchmarks/RESULTS.md).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define BLOCK 8
#define LANES 16
#define PREFETCH_BYTES 512

/* out[j] = x . w[j] for the `count` (at most BLOCK) weight rows starting at w. */
static inline void dot_rows(const float *x, const uint16_t *w, int64_t k, int count, uint16_t *out) {
    float acc[BLOCK][LANES] = {{0.0f}};
    int64_t i = 0;
    for (; i + LANES <= k; i += LANES) {
        for (int j = 0; j < count; j++) __builtin_prefetch((const char *)(w + j * k + i) + PREFETCH_BYTES, 0, 3);
        for (int j = 0; j < count; j++)
            for (int l = 0; l < LANES; l++) acc[j][l] += x[i + l] * bf16_to_float(w[j * k + i + l]);
    }
    for (int j = 0; j < count; j++) {
        float sum = 0.0f;
        for (int l = 0; l < LANES; l++) sum += acc[j][l];
        for (int64_t t = i; t < k; t++) sum += x[t] * bf16_to_float(w[j * k + t]);
        out[j] = float_to_bf16(sum);
    }
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x in fp32, each run of 16 inputs in the order of the unpacks below: 0-3, 8-11, then 4-7, 12-15. */
static void permute_row(const uint16_t *x, int64_t k, float *xp) {
    int64_t k16 = k / 16 * 16;
    for (int64_t i = 0; i < k16; i += 16)
        for (int l = 0; l < 4; l++) {
            xp[i + l] = bf16_to_float(x[i + l]);
            xp[i + 4 + l] = bf16_to_float(x[i + 8 + l]);
            xp[i + 8 + l] = bf16_to_float(x[i + 4 + l]);
            xp[i + 12 + l] = bf16_to_float(x[i + 12 + l]);
        }
    for (int64_t t = k16; t < k; t++) xp[t] = bf16_to_float(x[t]);
}

/* The rows' sums over runs of 16 inputs (always inlined: with count == BLOCK the trip counts are fixed and the
 * sums stay in registers). */
static inline __attribute__((always_inline)) void loop_avx2(const float *xp, const uint16_t *w, int64_t k,
                                                             int count, uint16_t *out) {
    int64_t k16 = k / 16 * 16;
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc[BLOCK];
    for (int j = 0; j < count; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k16; i += 16) {
        __m256 x0 = _mm256_loadu_ps(xp + i), x1 = _mm256_loadu_ps(xp + i + 8);
        for (int j = 0; j < count; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + j * k + i));
            acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), x0, acc[j]);
            acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), x1, acc[j]);
        }
    }
    for (int j = 0; j < count; j++) {
        float sum = hsum(acc[j]);
        for (int64_t t = k16; t < k; t++) sum += xp[t] * bf16_to_float(w[j * k + t]);
        out[j] = float_to_bf16(sum);
    }
}

/* Returns 0, or 1 if out of memory for the converted input rows (nothing written). */
int llama_gemv_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t n, int64_t k) {
    float *xp = malloc(sizeof(float) * (size_t)(rows * k));
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    if (xp == NULL) return 1;
    for (int64_t r = 0; r < rows; r++) permute_row(x + r * k, k, xp + r * k);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * BLOCK;
        int count = first + BLOCK <= n ? BLOCK : (int)(n - first);
        const uint16_t *w_block = w + first * k;
        for (int64_t r = 0; r < rows; r++) {
            if (count == BLOCK)
                loop_avx2(xp + r * k, w_block, k, BLOCK, y + r * n + first);
            else
                loop_avx2(xp + r * k, w_block, k, count, y + r * n + first);
        }
    }
    free(xp);
    return 0;
}
#else
int llama_gemv_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t n, int64_t k) {
    float *xf = malloc(sizeof(float) * (size_t)(rows * k));
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    if (xf == NULL) return 1;
    for (int64_t i = 0; i < rows * k; i++) xf[i] = bf16_to_float(x[i]);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * BLOCK;
        const uint16_t *w_block = w + first * k;
        for (int64_t r = 0; r < rows; r++) {
            if (first + BLOCK <= n)
                dot_rows(xf + r * k, w_block, k, BLOCK, y + r * n + first);
            else
                dot_rows(xf + r * k, w_block, k, (int)(n - first), y + r * n + first);
        }
    }
    free(xf);
    return 0;
}
#endif
