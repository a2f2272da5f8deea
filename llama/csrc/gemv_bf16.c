/* Matrix-vector product with bfloat16 weights for batch-1 decoding on CPUs (see llama/cpu_gemv.py).
 *
 * y[r, o] = sum_i x[r, i] * w[o, i], for x fp32 (rows, k), w bf16 (n, k) and y bf16 (rows, n).
 *
 * Plain C that the compiler vectorizes for the CPU it runs on (-O3 -march=native): a bf16 value is the top
 * half of an fp32, so widening is a shift, and the sums run in fp32 like torch's own kernels. Each weight
 * row is read once per row of x, so this is meant for one or a few rows. The rows of w are split among the
 * OpenMP threads in contiguous blocks, so each thread streams its own part of the matrix.
 */
#include <stdint.h>
#include <string.h>

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

void llama_gemv_bf16(const float *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t n, int64_t k) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const uint16_t *w_row = w + o * k;
        for (int64_t r = 0; r < rows; r++) {
            const float *x_row = x + r * k;
            float acc = 0.0f;
            for (int64_t i = 0; i < k; i++) acc += x_row[i] * bf16_to_float(w_row[i]);
            y[r * n + o] = float_to_bf16(acc);
        }
    }
}
