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

/* ---------------------------------------------------------------------------------------------------------
 * The same products with the input row quantized too, as llama.cpp does: x is cut into blocks of 32, each
 * stored as int8 with its own fp32 scale (xs = max|x| / 127), and each block's dot product with 32 weights
 * is summed exactly in int32 before it is scaled by xs * s. Integer multiply-adds do 32 weights in a few
 * instructions, where widening every weight to fp32 takes several per 8. The input's rounding (half a step
 * of 1/127 of each block's largest value) changes the result: this is an approximation of the dequantized
 * product, unlike the kernels above. Group sizes must be multiples of 32.
 */
#include <stdlib.h>
#include <math.h>

#define QBLOCK 32

static void quantize_row_q8(const float *x, int64_t k, int8_t *xq, float *xs) {
    for (int64_t b = 0; b < k / QBLOCK; b++) {
        float amax = 0.0f;
        for (int i = 0; i < QBLOCK; i++) amax = fmaxf(amax, fabsf(x[b * QBLOCK + i]));
        float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        xs[b] = scale;
        for (int i = 0; i < QBLOCK; i++) xq[b * QBLOCK + i] = (int8_t)lrintf(x[b * QBLOCK + i] * inv);
    }
}

/* Exact int32 dot product of 32 int8 weights (w) and 32 int8 inputs (x). */
static inline int32_t dot32(const int8_t *w, const int8_t *x) {
    int32_t sum = 0;
    for (int i = 0; i < QBLOCK; i++) sum += (int32_t)w[i] * (int32_t)x[i];
    return sum;
}

#ifdef HAVE_AVX2
/* The same for 32 weights already in a register, as 8 int32 partial sums. maddubs multiplies unsigned by
 * signed bytes, so the weights' signs move onto the inputs: |w| * (x * sign(w)) = w * x. Pair sums stay within
 * int16 since |w|, |x| <= 127 (2 * 127 * 127 < 32767). */
static inline __m256i dot32_avx2(__m256i w, __m256i x) {
    __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

static inline __m256i unpack_int4_avx2(const uint8_t *p) {
    /* 16 packed bytes -> 32 int8 weights: low nibbles are the first 16, high nibbles the next 16 */
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m128i lo = _mm_and_si128(v, _mm_set1_epi8(15)), hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15));
    return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
}
#endif

/* out[o] for one row: sum over groups of s * sum over its 32-blocks of xs * dot. int4 rows are unpacked per
 * 32-block: a block of a group with g / 2 bytes... only g == 32 keeps blocks contiguous in the packing, so
 * int4 takes this path for g == 32 alone (checked by the caller). */
static void gemv_q8x(const int8_t *xq, const float *xs, const void *w, const uint16_t *s, float *y, int64_t n,
                     int64_t k, int64_t g, int int4) {
    int64_t groups = k / g, per = g / QBLOCK, row_bytes = int4 ? k / 2 : k;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const uint8_t *row = (const uint8_t *)w + o * row_bytes;
        __builtin_prefetch(row + 8 * row_bytes, 0, 3);
#ifdef HAVE_AVX2
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < groups; b++) {
            __m256 part = _mm256_setzero_ps();
            for (int64_t j = 0; j < per; j++) {
                int64_t blk = b * per + j;
                __m256i wv = int4 ? unpack_int4_avx2(row + blk * 16)
                                  : _mm256_loadu_si256((const __m256i *)(row + blk * QBLOCK));
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + blk * QBLOCK));
                part = _mm256_fmadd_ps(_mm256_set1_ps(xs[blk]), _mm256_cvtepi32_ps(dot32_avx2(wv, xv)), part);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(bf16_to_float(s[o * groups + b])), part, acc);
        }
        y[o] = hsum(acc);
#else
        float acc = 0.0f;
        for (int64_t b = 0; b < groups; b++) {
            float part = 0.0f;
            for (int64_t j = 0; j < per; j++) {
                int64_t blk = b * per + j;
                int8_t wq[QBLOCK];
                if (int4) {
                    for (int i = 0; i < 16; i++) {
                        uint8_t v = row[blk * 16 + i];
                        wq[i] = (int8_t)((v & 15) - 8);
                        wq[16 + i] = (int8_t)((v >> 4) - 8);
                    }
                } else {
                    memcpy(wq, row + blk * QBLOCK, QBLOCK);
                }
                part += xs[blk] * (float)dot32(wq, xq + blk * QBLOCK);
            }
            acc += bf16_to_float(s[o * groups + b]) * part;
        }
        y[o] = acc;
#endif
    }
}

static void gemv_q8x_rows(const float *x, const void *w, const uint16_t *s, float *y, int64_t rows, int64_t n,
                          int64_t k, int64_t g, int int4) {
    int8_t *xq = malloc((size_t)k);
    float *xs = malloc((size_t)(k / QBLOCK) * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        quantize_row_q8(x + r * k, k, xq, xs);
        gemv_q8x(xq, xs, w, s, y + r * n, n, k, g, int4);
    }
    free(xq);
    free(xs);
}

void llama_gemv_int8_q8x(const float *x, const int8_t *w, const uint16_t *s, float *y, int64_t rows, int64_t n,
                         int64_t k, int64_t g) {
    gemv_q8x_rows(x, w, s, y, rows, n, k, g, 0);
}

void llama_gemv_int4_q8x(const float *x, const uint8_t *w, const uint16_t *s, float *y, int64_t rows, int64_t n,
                         int64_t k, int64_t g) {
    gemv_q8x_rows(x, w, s, y, rows, n, k, g, 1);
}
