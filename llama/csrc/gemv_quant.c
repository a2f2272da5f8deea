/* Matrix-vector products with int8 and int4 weights for batch-1 decoding on CPUs (see llama/quantize.py).
 *
 * y[r, o] = sum_b s[o, b] * sum_{i in group b} x[r, i] * q[o, i], for x fp32 (rows, k), y fp32 (rows, n),
 * and weights in groups of g consecutive inputs, each group with its own scale s (bf16, (n, k / g)):
 *
 * - int8: q int8 (n, k), one byte per weight;
 * - int4: q in [-8, 7], stored as q + 8 in a nibble, two per byte, (n, k / 2). In each group, byte j holds
 *   weight j in its low nibble and weight j + g / 2 in its high one, so a run of bytes unpacks into two runs
 *   of consecutive weights, which the compiler vectorizes without shuffles.
 *
 * Every product x * q is exact in fp32 (q has at most 8 bits), the group sums and the scaled sums run in
 * fp32, so the result is the fp32 product with the dequantized weights up to the order of the sums.
 *
 * As in gemv_bf16.c, each thread walks BLOCK weight rows side by side, so BLOCK streams of memory are in
 * flight, and asks for each of them PREFETCH_BYTES ahead. Each row keeps LANES partial sums. Group sizes
 * that are a multiple of LANES (int8) or 2 * LANES (int4) take the vectorized loops; any other group size
 * takes a plain loop that gives the same sums.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 8
#define LANES 16
#define PREFETCH_BYTES 256

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1

/* Horizontal sum of 8 fp32 lanes. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 int8x8_to_float(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

/* Vectorized rows for group sizes that are multiples of 32, AVX2 + FMA: each group's 32-weight pieces are
 * widened to fp32 (exactly) and multiplied with x into a group sum, which is scaled into the row sum. */
static void dot_rows_int8_avx2(const float *x, const int8_t *w, const uint16_t *s, int64_t k, int64_t g,
                               int count, float *out) {
    int64_t groups = k / g;
    __m256 acc[BLOCK];
    for (int j = 0; j < count; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < groups; b++) {
        const float *xb = x + b * g;
        for (int j = 0; j < count; j++)
            __builtin_prefetch((const char *)(w + j * k + b * g) + PREFETCH_BYTES, 0, 3);
        for (int j = 0; j < count; j++) {
            const int8_t *wb = w + j * k + b * g;
            __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
            for (int64_t i = 0; i < g; i += 32) {
                __m128i q = _mm_loadu_si128((const __m128i *)(wb + i));
                __m128i r = _mm_loadu_si128((const __m128i *)(wb + i + 16));
                p0 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + i), int8x8_to_float(q), p0);
                p1 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + i + 8), int8x8_to_float(_mm_srli_si128(q, 8)), p1);
                p0 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + i + 16), int8x8_to_float(r), p0);
                p1 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + i + 24), int8x8_to_float(_mm_srli_si128(r, 8)), p1);
            }
            __m256 scale = _mm256_set1_ps(bf16_to_float(s[j * groups + b]));
            acc[j] = _mm256_fmadd_ps(scale, _mm256_add_ps(p0, p1), acc[j]);
        }
    }
    for (int j = 0; j < count; j++) out[j] = hsum(acc[j]);
}

static void dot_rows_int4_avx2(const float *x, const uint8_t *w, const uint16_t *s, int64_t k, int64_t g,
                               int count, float *out) {
    int64_t groups = k / g, half = g / 2, row_bytes = k / 2;
    const __m128i low4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    __m256 acc[BLOCK];
    for (int j = 0; j < count; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < groups; b++) {
        const float *xb = x + b * g;
        for (int j = 0; j < count; j++)
            __builtin_prefetch((const char *)(w + j * row_bytes + b * half) + PREFETCH_BYTES, 0, 3);
        for (int j = 0; j < count; j++) {
            const uint8_t *wb = w + j * row_bytes + b * half;
            __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
            for (int64_t i = 0; i < half; i += 16) {
                __m128i v = _mm_loadu_si128((const __m128i *)(wb + i));
                __m128i lo = _mm_sub_epi8(_mm_and_si128(v, low4), eight);                      /* weights i.. */
                __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low4), eight);   /* half + i.. */
                p0 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + i), int8x8_to_float(lo), p0);
                p1 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + i + 8), int8x8_to_float(_mm_srli_si128(lo, 8)), p1);
                p0 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + half + i), int8x8_to_float(hi), p0);
                p1 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + half + i + 8), int8x8_to_float(_mm_srli_si128(hi, 8)), p1);
            }
            __m256 scale = _mm256_set1_ps(bf16_to_float(s[j * groups + b]));
            acc[j] = _mm256_fmadd_ps(scale, _mm256_add_ps(p0, p1), acc[j]);
        }
    }
    for (int j = 0; j < count; j++) out[j] = hsum(acc[j]);
}
#endif

/* out[j] = x . dequant(w[j]) for the `count` (at most BLOCK) int8 weight rows starting at w. */
static inline void dot_rows_int8(const float *x, const int8_t *w, const uint16_t *s, int64_t k, int64_t g,
                                 int count, float *out) {
    int64_t groups = k / g;
    if (g % LANES != 0) {
        for (int j = 0; j < count; j++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < groups; b++) {
                float part = 0.0f;
                for (int64_t i = b * g; i < (b + 1) * g; i++) part += x[i] * (float)w[j * k + i];
                sum += bf16_to_float(s[j * groups + b]) * part;
            }
            out[j] = sum;
        }
        return;
    }
    float acc[BLOCK][LANES] = {{0.0f}};
    for (int64_t b = 0; b < groups; b++) {
        const float *xb = x + b * g;
        for (int j = 0; j < count; j++)
            __builtin_prefetch((const char *)(w + j * k + b * g) + PREFETCH_BYTES, 0, 3);
        for (int j = 0; j < count; j++) {
            const int8_t *wb = w + j * k + b * g;
            float part[LANES] = {0.0f};
            if (g == 2 * LANES) {  /* the default group size: fixed trip counts, all in registers */
                for (int l = 0; l < LANES; l++) part[l] = xb[l] * (float)wb[l] + xb[LANES + l] * (float)wb[LANES + l];
            } else {
                for (int64_t i = 0; i < g; i += LANES)
                    for (int l = 0; l < LANES; l++) part[l] += xb[i + l] * (float)wb[i + l];
            }
            float scale = bf16_to_float(s[j * groups + b]);
            for (int l = 0; l < LANES; l++) acc[j][l] += scale * part[l];
        }
    }
    for (int j = 0; j < count; j++) {
        float sum = 0.0f;
        for (int l = 0; l < LANES; l++) sum += acc[j][l];
        out[j] = sum;
    }
}

/* The same for int4 rows: w points at packed bytes, k / 2 per row. */
static inline void dot_rows_int4(const float *x, const uint8_t *w, const uint16_t *s, int64_t k, int64_t g,
                                 int count, float *out) {
    int64_t groups = k / g, half = g / 2, row_bytes = k / 2;
    if (half % LANES != 0) {
        for (int j = 0; j < count; j++) {
            float sum = 0.0f;
            for (int64_t b = 0; b < groups; b++) {
                const uint8_t *wb = w + j * row_bytes + b * half;
                const float *xb = x + b * g;
                float part = 0.0f;
                for (int64_t i = 0; i < half; i++)
                    part += xb[i] * (float)((int)(wb[i] & 15) - 8) + xb[half + i] * (float)((int)(wb[i] >> 4) - 8);
                sum += bf16_to_float(s[j * groups + b]) * part;
            }
            out[j] = sum;
        }
        return;
    }
    float acc[BLOCK][LANES] = {{0.0f}};
    for (int64_t b = 0; b < groups; b++) {
        const float *xb = x + b * g;
        for (int j = 0; j < count; j++)
            __builtin_prefetch((const char *)(w + j * row_bytes + b * half) + PREFETCH_BYTES, 0, 3);
        for (int j = 0; j < count; j++) {
            const uint8_t *wb = w + j * row_bytes + b * half;
            float part[LANES] = {0.0f};
            if (half == LANES) {  /* the default group size */
                for (int l = 0; l < LANES; l++) {
                    uint8_t v = wb[l];
                    part[l] = xb[l] * (float)((int)(v & 15) - 8) + xb[LANES + l] * (float)((int)(v >> 4) - 8);
                }
            } else {
                for (int64_t i = 0; i < half; i += LANES)
                    for (int l = 0; l < LANES; l++) {
                        uint8_t v = wb[i + l];
                        part[l] += xb[i + l] * (float)((int)(v & 15) - 8) + xb[half + i + l] * (float)((int)(v >> 4) - 8);
                    }
            }
            float scale = bf16_to_float(s[j * groups + b]);
            for (int l = 0; l < LANES; l++) acc[j][l] += scale * part[l];
        }
    }
    for (int j = 0; j < count; j++) {
        float sum = 0.0f;
        for (int l = 0; l < LANES; l++) sum += acc[j][l];
        out[j] = sum;
    }
}

void llama_gemv_int8(const float *x, const int8_t *w, const uint16_t *s, float *y, int64_t rows, int64_t n,
                     int64_t k, int64_t g) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK, groups = k / g;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * BLOCK;
        int count = first + BLOCK <= n ? BLOCK : (int)(n - first);
        for (int64_t r = 0; r < rows; r++) {
#ifdef HAVE_AVX2
            if (g % 32 == 0) {
                dot_rows_int8_avx2(x + r * k, w + first * k, s + first * groups, k, g, count, y + r * n + first);
                continue;
            }
#endif
            dot_rows_int8(x + r * k, w + first * k, s + first * groups, k, g, count, y + r * n + first);
        }
    }
}

void llama_gemv_int4(const float *x, const uint8_t *w, const uint16_t *s, float *y, int64_t rows, int64_t n,
                     int64_t k, int64_t g) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK, groups = k / g;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * BLOCK;
        int count = first + BLOCK <= n ? BLOCK : (int)(n - first);
        for (int64_t r = 0; r < rows; r++) {
#ifdef HAVE_AVX2
            if (g % 32 == 0) {
                dot_rows_int4_avx2(x + r * k, w + first * (k / 2), s + first * groups, k, g, count, y + r * n + first);
                continue;
            }
#endif
            dot_rows_int4(x + r * k, w + first * (k / 2), s + first * groups, k, g, count, y + r * n + first);
        }
    }
}
