/* Matrix-vector product with bfloat16 weights for batch-1 decoding on CPUs (see llama/cpu_gemv.py).
 *
 * y[r, o] = sum_i x[r, i] * w[o, i], for x fp32 (rows, k), w bf16 (n, k) and y bf16 (rows, n).
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
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 8
#define LANES 16
#define PREFETCH_BYTES 512

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest, ties to even, as torch does; NaN stays a (quiet) NaN. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

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

void llama_gemv_bf16(const float *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t n, int64_t k) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * BLOCK;
        const uint16_t *w_block = w + first * k;
        for (int64_t r = 0; r < rows; r++) {
            if (first + BLOCK <= n)
                dot_rows(x + r * k, w_block, k, BLOCK, y + r * n + first);
            else
                dot_rows(x + r * k, w_block, k, (int)(n - first), y + r * n + first);
        }
    }
}
