/* Matrix products with int8 and int4 weights for decoding on CPUs (see llama/quant/kernels.py).
 *
 * y[r, o] = sum_b s[o, b] * sum_{i in group b} x[r, i] * q[o, i], for x fp32 (rows, k), y fp32 (rows, n),
 * and weights in groups of g consecutive inputs, each group with its own scale s (bf16, (n, k / g)):
 *
 * - int8: q int8 (n, k), one byte per weight;
 * - int4: q in [-8, 7], stored as q + 8 in a nibble, two per byte, (n, k / 2). In each group, byte j holds
 *   weight j in its low nibble and weight j + g / 2 in its high one (llama.cpp's Q4_0 order for g = 32).
 *
 * Two kinds of kernels:
 *
 * - "exact" (llama_gemv_int8, llama_gemv_int4): every product x * q is exact in fp32 (q has at most 8 bits)
 *   and the sums run in fp32, so the result is the fp32 product with the dequantized weights up to the order
 *   of the sums. Widening every weight to fp32 costs several instructions per 8 weights, which on two cores
 *   is slower than reading the bytes.
 * - "int8 inputs" (llama_gemv_int8_q8x, llama_gemv_int4_q8x), llama.cpp's way: each input row is rounded to
 *   int8 in blocks of 32 with one fp32 scale per block (xs = max|x| / 127), and each block's dot product with
 *   32 weights is summed exactly in int32 by byte multiply-adds (AVX2's vpmaddubsw) before it is scaled by
 *   xs * s. That is a few instructions per 32 weights, fast enough to stream the packed weights at the
 *   memory's speed, but the input's rounding (half a step of 1/127 of each block's largest value) moves the
 *   result: it approximates the dequantized product. Groups must be multiples of 32 (int4: exactly 32). From four
 *   input rows on they hand over to the panel product (the last section), which sums the same integer products
 *   with 4-way byte dot products (vpdpbusd on AVX512-VNNI) over weights repacked once per call.
 * - the same two on weights stored in panels (*_panels, *_panels_q8x: the layout of the last section), which
 *   layers whose outputs are a multiple of 16 keep: the panel product for any number of rows, without repacking.
 *
 * Memory. Each thread walks a few weight rows side by side (BLOCK for the exact kernels, QROWS for those with
 * int8 inputs: as many streams) and, while it works on one block of rows, prefetches the next block (which
 * lies right after it: rows are contiguous) at the same pace, so the bytes arrive a whole block ahead. With
 * several input rows, each block of weight rows serves every input row while it is in cache, so the weights
 * are read from memory once per call whatever the number of rows.
 *
 * AVX2 + FMA code paths where the compiler targets them (-march=native), and portable loops that give the same
 * sums (up to order) elsewhere; tests check both against exact references.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define BLOCK 8 /* weight rows walked side by side (the exact kernels) */
/* The same for the one-row kernels with int8 inputs: 8, whose exact block sums fill one vector (sum_blocks). */
#define QROWS 8
#define QBLOCK 32 /* inputs per int8 block of the input row */

/* The exported products come in pairs, for int8 and int4 weights (llama_gemv_int8_q8x and llama_gemv_int4_q8x...),
 * each calling fn(x, w, s, y, rows, n, k, g, int4, io). They return 0, or 1 if out of memory. */
#define EXPORT_PAIR(prefix, suffix, fn)                                                                          \
    int prefix##int8##suffix(const void *x, const void *w, const uint16_t *s, void *y, int64_t rows, int64_t n,  \
                             int64_t k, int64_t g, int64_t io) {                                                \
        return fn(x, w, s, y, rows, n, k, g, 0, io);                                                           \
    }                                                                                                           \
    int prefix##int4##suffix(const void *x, const void *w, const uint16_t *s, void *y, int64_t rows, int64_t n,  \
                             int64_t k, int64_t g, int64_t io) {                                                \
        return fn(x, w, s, y, rows, n, k, g, 1, io);                                                           \
    }

/* Inputs and outputs are fp32, or bf16 where these bits of `io` say so (saves the caller two conversions). */
#define IO_X_BF16 1
#define IO_Y_BF16 2

/* The input rows as fp32: x itself, or a converted copy to free (NULL if out of memory). */
static const float *float_rows(const void *x, int64_t count, int64_t io) {
    return (io & IO_X_BF16) ? widened_copy((const uint16_t *)x, count) : (const float *)x;
}

/* y[offset + j] = v[j] for j < count, in y's dtype. */
static inline void store(void *y, int64_t offset, const float *v, int count, int64_t io) {
    for (int j = 0; j < count; j++) {
        if (io & IO_Y_BF16)
            ((uint16_t *)y)[offset + j] = float_to_bf16(v[j]);
        else
            ((float *)y)[offset + j] = v[j];
    }
}

/* Prefetch `bytes` bytes at p (a stretch of the next block of weight rows), one cache line at a time, into L2:
 * into L1 the one-row int8 loop streamed 20-25% slower on a Zen 4 (weights in 2 MB pages, two threads). */
static inline void prefetch_stretch(const void *p, int64_t bytes) {
    for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch((const char *)p + l, 0, 1);
}

/* ---------------------------------------------------------------------------------------------------------
 * Exact kernels: fp32 input rows.
 */

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

/* 8 bf16 values -> 8 fp32 (a bf16 is the top half of an fp32). */
static inline __m256 load_bf16x8(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

static inline __m256 int8x8_to_float(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

/* out[j] = x . dequant(w[j]) for `count` (at most BLOCK) int8 rows at w; g a multiple of 32. Each group's
 * 32-weight pieces are widened to fp32 (exactly) and multiplied with x into a group sum, scaled into the row
 * sum. `next`: the next block of rows, prefetched g * BLOCK bytes per group. */
static void rows_int8_exact(const float *x, const int8_t *w, const uint16_t *s, int64_t k, int64_t g, int count,
                            float *out, const int8_t *next) {
    int64_t groups = k / g;
    __m256 acc[BLOCK];
    for (int j = 0; j < count; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < groups; b++) {
        const float *xb = x + b * g;
        prefetch_stretch(next + b * g * BLOCK, g * BLOCK);
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

/* The same for int4 rows (k / 2 bytes each); g a multiple of 32. */
static void rows_int4_exact(const float *x, const uint8_t *w, const uint16_t *s, int64_t k, int64_t g, int count,
                            float *out, const uint8_t *next) {
    int64_t groups = k / g, half = g / 2, row_bytes = k / 2;
    const __m128i low4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    __m256 acc[BLOCK];
    for (int j = 0; j < count; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < groups; b++) {
        const float *xb = x + b * g;
        prefetch_stretch(next + b * half * BLOCK, half * BLOCK);
        for (int j = 0; j < count; j++) {
            const uint8_t *wb = w + j * row_bytes + b * half;
            __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
            for (int64_t i = 0; i < half; i += 16) {
                __m128i v = _mm_loadu_si128((const __m128i *)(wb + i));
                __m128i lo = _mm_sub_epi8(_mm_and_si128(v, low4), eight);                    /* weights i.. */
                __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low4), eight); /* half + i.. */
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

/* Portable exact rows: any group size. */
static void rows_int8_plain(const float *x, const int8_t *w, const uint16_t *s, int64_t k, int64_t g, int count,
                            float *out) {
    int64_t groups = k / g;
    for (int j = 0; j < count; j++) {
        float sum = 0.0f;
        for (int64_t b = 0; b < groups; b++) {
            float part = 0.0f;
            for (int64_t i = b * g; i < (b + 1) * g; i++) part += x[i] * (float)w[j * k + i];
            sum += bf16_to_float(s[j * groups + b]) * part;
        }
        out[j] = sum;
    }
}

static void rows_int4_plain(const float *x, const uint8_t *w, const uint16_t *s, int64_t k, int64_t g, int count,
                            float *out) {
    int64_t groups = k / g, half = g / 2, row_bytes = k / 2;
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
}

/* The b-th block of `size` weight rows (count of them at the end), the next block to prefetch (itself when
 * the next one is short or absent) and its scales. */
typedef struct {
    int64_t first;
    int count;
    const uint8_t *w, *next;
    const uint16_t *s;
} RowBlock;

static inline RowBlock row_block(const void *w, const uint16_t *s, int64_t b, int size, int64_t n,
                                 int64_t row_bytes, int64_t groups) {
    RowBlock block;
    block.first = b * size;
    block.count = block.first + size <= n ? size : (int)(n - block.first);
    block.w = (const uint8_t *)w + block.first * row_bytes;
    block.next = block.first + 2 * size <= n ? block.w + size * row_bytes : block.w;
    block.s = s + block.first * groups;
    return block;
}

/* out[j] = x . dequant(w[j]) for `count` (at most BLOCK) weight rows at w (their scales at s); next: the rows to
 * prefetch meanwhile. */
static inline void exact_rows(const float *x, const uint8_t *w, const uint16_t *s, int64_t k, int64_t g, int int4,
                              int count, float *out, const uint8_t *next) {
#ifdef HAVE_AVX2 /* groups of a multiple of 32: the AVX2 rows; otherwise (or without AVX2) the plain ones */
    if (g % 32 == 0 && int4)
        rows_int4_exact(x, w, s, k, g, count, out, next);
    else if (g % 32 == 0)
        rows_int8_exact(x, (const int8_t *)w, s, k, g, count, out, (const int8_t *)next);
    else
#else
    (void)next;
#endif
    if (int4)
        rows_int4_plain(x, w, s, k, g, count, out);
    else
        rows_int8_plain(x, (const int8_t *)w, s, k, g, count, out);
}

/* One call: blocks of BLOCK weight rows split among the threads; each block serves every input row. */
static void gemv_exact(const float *x, const void *w, const uint16_t *s, void *y, int64_t rows, int64_t n,
                       int64_t k, int64_t g, int int4, int64_t io) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK, groups = k / g, row_bytes = int4 ? k / 2 : k;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        RowBlock rb = row_block(w, s, blk, BLOCK, n, row_bytes, groups);
        for (int64_t r = 0; r < rows; r++) {
            float out[BLOCK];
            exact_rows(x + r * k, rb.w, rb.s, k, g, int4, rb.count, out, rb.next);
            store(y, r * n + rb.first, out, rb.count, io);
        }
    }
}

/* The exact product; returns 0, or 1 if out of memory (nothing written). */
static int exact_call(const void *x, const void *w, const uint16_t *s, void *y, int64_t rows, int64_t n, int64_t k,
                      int64_t g, int int4, int64_t io) {
    const float *xf = float_rows(x, rows * k, io);
    if (xf == NULL) return 1;
    gemv_exact(xf, w, s, y, rows, n, k, g, int4, io);
    if ((const void *)xf != x) free((void *)xf);
    return 0;
}

EXPORT_PAIR(llama_gemv_, , exact_call) /* llama_gemv_int8, llama_gemv_int4 */

/* ---------------------------------------------------------------------------------------------------------
 * Kernels with int8 inputs. An input row is quantized once per call into xq (k int8), xs (k / 32 block scales) and
 * xsum (each block's sum of xq, for int4's offset: below). The int4 loop reads xq rearranged once per call
 * (arrange_pairs) into pairs of blocks as its vectors hold them.
 *
 * The result is the panel product's (the last section): y[j] = sum over blocks b, in order, of fma(d, ws[j, b] *
 * xs[b], .) in fp32, d the exact integer dot product of the block, so a row gives the same bits alone (these loops)
 * and in a call of any number of rows (the panel product from GEMM_MIN_ROWS on): the continuous-batching engine's
 * requests do not depend on their batch. Each loop takes QROWS weight rows side by side; per block, each row's
 * 32 byte products are summed into 8 int32 lanes, and one vector of the 8 rows' block sums is gathered from those
 * (sum_blocks: unpacks and adds), converted and multiplied by the 8 rows' combined scales.
 */

typedef struct {
    int8_t *xq;
    float *xs;
    int32_t *xsum;
    int8_t *pair_q; /* int4 (arrange_pairs): per pair of blocks, inputs 0-15 of both, then 16-31 of both */
    int64_t apart;  /* block b at xq + b * apart * QBLOCK, xs[b * apart], xsum[b * apart] (1: side by side) */
} QuantRow;

/* 127 / amax, the factor that maps a block onto [-127, 127]; 0 for a block of zeros, a bad one (NaN or inf),
 * or one so small (amax under ~4e-37) that the factor would overflow: its inputs then round to 0, an error of
 * under 1e-36 per input. */
static inline float input_step_inverse(float amax, int bad) {
    if (bad || !(amax > 0.0f)) return 0.0f;
    const float inv = 127.0f / amax;
    return isinf(inv) ? 0.0f : inv;
}

/* Round each block of 32 inputs to int8 against its own scale, ties to even (as lrintf; llama.cpp's rounding).
 * A block holding NaN or inf gets a NaN scale, so the products that use it are NaN, as the exact ones are. */
static void quantize_row_q8(const float *x, int64_t k, QuantRow q) {
    for (int64_t b = 0; b < k / QBLOCK; b++) {
        const float *p = x + b * QBLOCK;
        float amax = 0.0f;
        int bad = 0, sum = 0;
#ifdef HAVE_AVX2
        __m256 v[4], m = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(p + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v[i]));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        bad = _mm256_movemask_ps(unordered) != 0 || isinf(amax);
        __m256 inv = _mm256_set1_ps(input_step_inverse(amax, bad));
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv));
        if (bad) i0 = i1 = i2 = i3 = _mm256_setzero_si256();
        /* the packs interleave 128-bit halves; the permutation puts the 32 bytes back in order */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q.xq + b * q.apart * QBLOCK), packed);
        int32_t parts[8];
        _mm256_storeu_si256((__m256i *)parts, _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
        for (int i = 0; i < 8; i++) sum += parts[i];
#else
        for (int i = 0; i < QBLOCK; i++) {
            bad |= !isfinite(p[i]);
            amax = fmaxf(amax, fabsf(p[i]));
        }
        float inv = input_step_inverse(amax, bad);
        for (int i = 0; i < QBLOCK; i++) {
            int v = (int)lrintf(p[i] * inv);
            q.xq[b * q.apart * QBLOCK + i] = (int8_t)v;
            sum += v;
        }
#endif
        q.xs[b * q.apart] = bad ? NAN : amax / 127.0f;
        q.xsum[b * q.apart] = sum;
    }
}

/* Round the input rows (fp32, or bf16 per io) to int8 blocks: xq (rows x k), xs (rows x nb) and xsum (rows x nb:
 * each block's sum of xq, times offset), row after row, or with by_block block after block, the rows of each side
 * by side (block b of row r at xq + (b * rows + r) * QBLOCK, xs[b * rows + r]). One row at a time: a bf16 row is
 * widened into one row's buffer, not the whole input at once (a long prompt's would be large). Returns 1 if out
 * of memory. */
static int quantize_inputs(const void *x, int64_t rows, int64_t k, int64_t io, int32_t offset, int by_block,
                           int8_t *xq, float *xs, int32_t *xsum) {
    int64_t nb = k / QBLOCK;
    float *row = (io & IO_X_BF16) ? malloc(sizeof(float) * (size_t)k) : NULL;
    if ((io & IO_X_BF16) && row == NULL) return 1;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = (const float *)x + r * k;
        if (io & IO_X_BF16) {
            for (int64_t i = 0; i < k; i++) row[i] = bf16_to_float(((const uint16_t *)x)[r * k + i]);
            xr = row;
        }
        QuantRow q = by_block ? (QuantRow){xq + r * QBLOCK, xs + r, xsum + r, NULL, rows}
                              : (QuantRow){xq + r * k, xs + r * nb, xsum + r * nb, NULL, 1};
        quantize_row_q8(xr, k, q);
        if (offset != 1)
            for (int64_t b = 0; b < nb; b++) q.xsum[b * q.apart] *= offset;
    }
    free(row);
    return 0;
}

/* Exact int32 dot product of 32 int8 weights and 32 int8 inputs (the portable path). */
static inline int32_t dot32(const int8_t *w, const int8_t *x) {
    int32_t sum = 0;
    for (int i = 0; i < QBLOCK; i++) sum += (int32_t)w[i] * (int32_t)x[i];
    return sum;
}

#ifdef HAVE_AVX2
/* r[i] (8 dwords each) becomes column i of the 8 x 8 matrix of dwords whose rows were r[0..7]. */
static inline __attribute__((always_inline)) void transpose8x8(__m256i r[8]) {
    __m256i a[8], b[8];
    for (int i = 0; i < 8; i += 2) {
        a[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        b[i] = _mm256_unpacklo_epi64(a[i], a[i + 2]);
        b[i + 1] = _mm256_unpackhi_epi64(a[i], a[i + 2]);
        b[i + 2] = _mm256_unpacklo_epi64(a[i + 1], a[i + 3]);
        b[i + 3] = _mm256_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2x128_si256(b[i], b[i + 4], 0x20);
        r[i + 4] = _mm256_permute2x128_si256(b[i], b[i + 4], 0x31);
    }
}

/* Lane j of *low = the sum of lanes 0-3 of p[j], of *high = of lanes 4-7 (exact: int32). */
static inline __attribute__((always_inline)) void sum_halves(const __m256i p[8], __m256i *low, __m256i *high) {
    /* unpacks and adds (single instructions, where horizontal adds are several): pairs of rows, then fours */
    __m256i t[4], u[2];
    for (int i = 0; i < 4; i++)
        t[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(p[2 * i], p[2 * i + 1]),
                                _mm256_unpackhi_epi32(p[2 * i], p[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        u[i] = _mm256_add_epi32(_mm256_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                                _mm256_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    *low = _mm256_permute2x128_si256(u[0], u[1], 0x20);
    *high = _mm256_permute2x128_si256(u[0], u[1], 0x31);
}

/* Lane j = the sum of the 8 lanes of p[j]. */
static inline __attribute__((always_inline)) __m256i sum_blocks(const __m256i p[8]) {
    __m256i low, high;
    sum_halves(p, &low, &high);
    return _mm256_add_epi32(low, high);
}

/* 32 weights (signed bytes) times 32 int8 inputs, summed exactly into 8 int32 lanes (4 products each). The byte
 * products take an unsigned operand first, so the weights' signs move onto the inputs: |w| * (x * sign(w)). */
static inline __m256i dot_lanes(__m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
#else /* pair sums within int16: 2 * 128 * 127 < 32767 */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
#endif
}

/* The same for unsigned weights below 16 (int4 nibbles, q + 8): two halves, lo x xlo + hi x xhi. */
static inline __m256i nibble_dot_lanes(__m256i lo, __m256i xlo, __m256i hi, __m256i xhi) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xlo), hi, xhi);
#else /* within int16: 4 * 15 * 127 < 32767 */
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)),
                             _mm256_set1_epi16(1));
#endif
}
#endif

#ifdef HAVE_AVX2
/* out[j] = lane j of acc, for the count (at most QROWS = 8) rows of a block. */
static inline void store_lanes(__m256 acc, float *out, int count) {
    float lanes[QROWS];
    _mm256_storeu_ps(lanes, acc);
    memcpy(out, lanes, sizeof(float) * (size_t)count);
}
#endif

/* comb[b * QROWS + j] = ws[j, b] * xs[b] (0 for rows past count): the combined scale of each block's integer dot
 * product, per block for the QROWS rows at s (groups scales a row, per blocks a group). */
static void combine_scales(const uint16_t *s, const float *xs, int64_t nb, int64_t groups, int64_t per, int count,
                           float *comb) {
    int64_t done = 0;
#ifdef HAVE_AVX2
    if (per == 1) /* 8 blocks of the 8 rows at a time: widened, transposed, times the inputs' scales */
        for (; done + 8 <= nb; done += 8) {
            __m256i r[8];
            for (int j = 0; j < 8; j++)
                r[j] = j < count ? _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(
                                       s + j * groups + done))), 16)
                                 : _mm256_setzero_si256();
            transpose8x8(r);
            for (int t = 0; t < 8; t++)
                _mm256_storeu_ps(comb + (done + t) * QROWS,
                                 _mm256_mul_ps(_mm256_castsi256_ps(r[t]), _mm256_set1_ps(xs[done + t])));
        }
#endif
    for (int j = 0; j < QROWS; j++)
        for (int64_t group = done / per; group < groups; group++) {
            const float scale = j < count ? bf16_to_float(s[j * groups + group]) : 0.0f;
            for (int64_t b = group * per > done ? group * per : done; b < (group + 1) * per; b++)
                comb[b * QROWS + j] = scale * xs[b];
        }
}

/* out[j] for `count` (at most QROWS) int8 rows at w against one quantized input row; comb from combine_scales.
 * next: the next block of rows, prefetched as this one is read. */
static void rows_int8_q8x(QuantRow q, const int8_t *w, int64_t k, int count, float *out, const int8_t *next,
                          const float *comb) {
    int64_t nb = k / QBLOCK;
#ifdef HAVE_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(q.xq + b * QBLOCK));
        prefetch_stretch(next + b * QBLOCK * QROWS, QBLOCK * QROWS);
        __m256i p[QROWS];
        for (int j = 0; j < QROWS; j++)
            p[j] = j < count ? dot_lanes(_mm256_loadu_si256((const __m256i *)(w + j * k + b * QBLOCK)), xv)
                             : _mm256_setzero_si256();
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_blocks(p)), _mm256_loadu_ps(comb + b * QROWS), acc);
    }
    store_lanes(acc, out, count);
#else
    (void)next;
    for (int j = 0; j < count; j++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++)
            acc = fmaf((float)dot32(w + j * k + b * QBLOCK, q.xq + b * QBLOCK), comb[b * QROWS + j], acc);
        out[j] = acc;
    }
#endif
}

#ifdef HAVE_AVX2
/* Where its vectors hold two blocks (b, b + 1), the int4 loop reads the input row from pair_q: inputs 0-15 of both
 * blocks, then inputs 16-31 of both, the order of the low and high nibbles of the 32 bytes that hold the two
 * blocks' weights. An odd last block is copied as it is. */
static void arrange_pairs(QuantRow q, int64_t nb) {
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        int8_t *to = q.pair_q + b * QBLOCK;
        const int8_t *x0 = q.xq + b * QBLOCK, *x1 = x0 + QBLOCK;
        memcpy(to, x0, 16);
        memcpy(to + 16, x1, 16);
        memcpy(to + 32, x0 + 16, 16);
        memcpy(to + 48, x1 + 16, 16);
    }
    if (b < nb) memcpy(q.pair_q + b * QBLOCK, q.xq + b * QBLOCK, QBLOCK);
}
#endif

/* The same for int4 rows with groups of 32 (16 bytes a block). The nibbles hold q + 8 (unsigned, as the byte
 * products take them), so each block sum overshoots by 8 * xsum[b], taken off exactly before the scaling. Two
 * blocks a vector: the 32 bytes of blocks b and b + 1 hold weights 0-15 of each in their low nibbles and 16-31 in
 * their high ones, against pair_q; lanes 0-3 of each row's sums are block b's, lanes 4-7 block b + 1's. An odd last
 * block: its 16 bytes in both halves, the upper half's high nibbles, against its 32 inputs in order. */
static void rows_int4_q8x(QuantRow q, const uint8_t *w, int64_t k, int count, float *out, const uint8_t *next,
                          const float *comb) {
    int64_t nb = k / QBLOCK, row_bytes = k / 2;
#ifdef HAVE_AVX2
    const __m256i low4 = _mm256_set1_epi8(15);
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m256i x_lo = _mm256_loadu_si256((const __m256i *)(q.pair_q + b * QBLOCK));
        const __m256i x_hi = _mm256_loadu_si256((const __m256i *)(q.pair_q + b * QBLOCK + 32));
        prefetch_stretch(next + b * 16 * QROWS, 32 * QROWS);
        __m256i p[QROWS];
        for (int j = 0; j < QROWS; j++) {
            if (j >= count) {
                p[j] = _mm256_setzero_si256();
                continue;
            }
            const __m256i packed = _mm256_loadu_si256((const __m256i *)(w + j * row_bytes + b * 16));
            p[j] = nibble_dot_lanes(_mm256_and_si256(packed, low4), x_lo,
                                    _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4), x_hi);
        }
        __m256i first, second;
        sum_halves(p, &first, &second);
        first = _mm256_sub_epi32(first, _mm256_set1_epi32(8 * q.xsum[b]));
        second = _mm256_sub_epi32(second, _mm256_set1_epi32(8 * q.xsum[b + 1]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first), _mm256_loadu_ps(comb + b * QROWS), acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(second), _mm256_loadu_ps(comb + (b + 1) * QROWS), acc);
    }
    if (b < nb) {
        const __m256i shift = _mm256_set_epi64x(4, 4, 0, 0);
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(q.pair_q + b * QBLOCK));
        __m256i p[QROWS];
        for (int j = 0; j < QROWS; j++) {
            if (j >= count) {
                p[j] = _mm256_setzero_si256();
                continue;
            }
            const __m128i packed = _mm_loadu_si128((const __m128i *)(w + j * row_bytes + b * 16));
            const __m256i wv = _mm256_and_si256(_mm256_srlv_epi64(_mm256_broadcastsi128_si256(packed), shift), low4);
            p[j] = nibble_dot_lanes(wv, xv, _mm256_setzero_si256(), _mm256_setzero_si256());
        }
        const __m256i d = _mm256_sub_epi32(sum_blocks(p), _mm256_set1_epi32(8 * q.xsum[b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(comb + b * QROWS), acc);
    }
    store_lanes(acc, out, count);
#else
    (void)next;
    for (int j = 0; j < count; j++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int8_t wq[QBLOCK];
            const uint8_t *p = w + j * row_bytes + b * 16;
            for (int i = 0; i < 16; i++) {
                wq[i] = (int8_t)((p[i] & 15) - 8);
                wq[16 + i] = (int8_t)((p[i] >> 4) - 8);
            }
            acc = fmaf((float)dot32(wq, q.xq + b * QBLOCK), comb[b * QROWS + j], acc);
        }
        out[j] = acc;
    }
#endif
}

/* Input row r of `rows`, quantized into xq (int4: 2 * rows * k bytes, the second half pair_q; else rows * k), xs
 * (rows * nb floats) and xsum (rows * nb). */
static QuantRow input_row(int8_t *xq, float *xs, int32_t *xsum, int64_t rows, int64_t r, int64_t k, int64_t nb,
                          int int4) {
    QuantRow q = {xq + r * k, xs + r * nb, xsum + r * nb, int4 ? xq + (rows + r) * k : NULL, 1};
    return q;
}

static int gemv_q8x(const void *x, const void *w, const uint16_t *s, void *y, int64_t rows, int64_t n, int64_t k,
                    int64_t g, int int4, int64_t io) {
    int64_t nb = k / QBLOCK, groups = k / g, row_bytes = int4 ? k / 2 : k;
    int64_t blocks = (n + QROWS - 1) / QROWS;
    int8_t *xq = malloc((size_t)((int4 ? 2 : 1) * rows * k));
    float *xs = malloc(sizeof(float) * (size_t)(rows * nb));
    int32_t *xsum = malloc(sizeof(int32_t) * (size_t)(rows * nb));
    const int64_t per_thread = QROWS * nb; /* the combined scales of a block of rows */
    float *comb = malloc(sizeof(float) * (size_t)per_thread * (size_t)omp_get_max_threads());
    int failed = xq == NULL || xs == NULL || xsum == NULL || comb == NULL;
    if (!failed) failed = quantize_inputs(x, rows, k, io, 1, 0, xq, xs, xsum);
    if (!failed) {
#ifdef HAVE_AVX2
        if (int4)
            for (int64_t r = 0; r < rows; r++) arrange_pairs(input_row(xq, xs, xsum, rows, r, k, nb, int4), nb);
#endif
#pragma omp parallel for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            RowBlock rb = row_block(w, s, blk, QROWS, n, row_bytes, groups);
            float *mine = comb + (size_t)omp_get_thread_num() * (size_t)per_thread;
            for (int64_t r = 0; r < rows; r++) {
                QuantRow q = input_row(xq, xs, xsum, rows, r, k, nb, int4);
                float out[QROWS];
                combine_scales(rb.s, q.xs, nb, groups, g / QBLOCK, rb.count, mine);
                if (int4)
                    rows_int4_q8x(q, rb.w, k, rb.count, out, rb.next, mine);
                else
                    rows_int8_q8x(q, (const int8_t *)rb.w, k, rb.count, out, (const int8_t *)rb.next, mine);
                store(y, r * n + rb.first, out, rb.count, io);
            }
        }
    }
    free(xq);
    free(xs);
    free(xsum);
    free(comb);
    return failed;
}

/* ---------------------------------------------------------------------------------------------------------
 * Many input rows (prefill, a batch of decoding rows), and any number of rows for weights stored in panels: a
 * product over panels of STORED weight rows.
 *
 * The input rows are rounded to int8 blocks exactly as above (quantize_row_q8), so each (input row, weight row,
 * block of 32) has the same exact integer dot product d as in the kernels above; the result is
 * y[r, j] = sum over blocks b, in order, of fma(d, ws[j, b] * xs[r, b], .) in fp32. Every code path below (AVX512
 * VNNI, AVX2, portable) computes exactly that, so they agree bitwise, and each row of a call is bitwise the row
 * alone (nothing depends on the other rows or on where a row falls in a tile).
 *
 * The panel layout. A panel is STORED = 16 consecutive weight rows laid out for the vector units: the rows' 4-byte
 * words side by side, word d of rows 0..15, then word d + 1 (the bytes as (n / 16, 16, row bytes / 4, 4)
 * transposed to (n / 16, row bytes / 4, 16, 4)); its scales likewise, each group's 16 scales side by side. A
 * block of 32 inputs is then 8 "steps" of 64 bytes for int8 (step t: weights 4t..4t+3 of the 16 rows) and 4 for
 * int4 (step t: the nibbles of weights 4t..4t+3 low and 16+4t..16+4t+3 high, as the rows hold them). Layers whose
 * rows are a multiple of 16 keep their weights in this layout (llama/quant/tensor.py): the *_panels products read
 * them as they are. Other weights are copied into a panel per call (pack_panel: loads and 8 x 8 transposes of
 * 4-byte words), which costs about as much again as reading them.
 *
 * One vector of a step meets 4 inputs of an input row (the same 4 bytes in every lane) in one 4-way byte dot
 * product per lane: vpdpbusd on AVX512-VNNI (a panel's 16 rows a vector), vpmaddubsw + vpmaddwd on AVX2 (8 rows a
 * vector: a panel in two halves). The panel stays in cache while TILE input rows at a time run over it, so each
 * weight is read from memory once per call. The byte products take one unsigned and one signed operand. Int4
 * nibbles are q + 8 (unsigned) as stored; int8 weights get + 128 (a flip of the top bit) as AVX512-VNNI loads
 * them, whose 32-bit sums cannot overflow. Either way each block sum overshoots by offset * (the block's sum of the
 * int8 inputs), which starts the sum negated (corr). The AVX2 int8 loop instead keeps the weights signed and
 * moves their signs onto the inputs (as dot_lanes does): its pair sums must stay within int16.
 *
 * Memory. With several input rows the tiles are bound by the arithmetic, so the first tile of a panel asks for the
 * next panel block by block as it computes (prefetch_block), and the memory streams while the vector units work
 * (asked for all at once while packing, the two took turns: 8 rows 10% slower). With one or two rows the stored
 * panels are read as one stream, which the hardware prefetchers follow best (STORED_AHEAD_ROWS).
 *
 * Measured (two threads on a Zen 4, the 0.85B shape's 64 layer products, weights in 2 MB pages, benchmarks/
 * RESULTS.md): int8 1 / 4 / 8 rows 22.4 / 25.4 / 26.3 ms on stored panels against 24.5 / 34.0 / 41.6 ms on rows
 * (the one-row loops, then the panel product packing per call); int4 12.0 / 13.4 / 19.5 against 13.7 / 24.3 / 31.5.
 */
#define STORED 16 /* weight rows of a panel */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GEMM_VNNI 1
#define LANES 16 /* weight rows a tile computes: a vector's */
#define TILE 8   /* input rows a tile runs over a panel together (their sums stay in registers: AVX-512 has 32) */
#define GEMM_LOOP "avx512vnni"
#elif defined(HAVE_AVX2)
#define GEMM_AVX2 1
#define LANES 8
#define TILE 4
#define GEMM_LOOP "avx2"
#else
#define LANES STORED
#define TILE 1
#define GEMM_LOOP "plain"
#endif

/* From this many input rows on, llama_gemv_*_q8x run the product below on weights not stored in panels (the same
 * bits either way). It pays for packing each panel once per call: the one-row loops, which stream the weights as
 * they are, win below 3 rows and tie at 3 (two threads on a Zen 4, weights in 2 MB pages: int8 1 / 2 / 3 / 4 rows
 * 7.0 / 10.6 / 12.8 / 17.5 ms against 10.8 / 11.7 / 12.4 / 13.2 for this product, over 6 layers' weights). */
#define GEMM_MIN_ROWS 4
/* From this many input rows on, the products on stored panels ask for the next panel as they compute (below that
 * the hardware prefetchers follow the one stream better: 1 and 2 rows 4-9% faster without; 3 rows 20% slower). */
#ifndef STORED_AHEAD_ROWS
#define STORED_AHEAD_ROWS 3
#endif

const char *llama_gemm_q8_loop(void) { return GEMM_LOOP; }

/* The input rows rounded to int8 blocks, their block scales, and corr: the weights' offset times each block's sum of
 * int8 inputs; block b of row r at q + (b * rows + r) * QBLOCK, its scale and corr at [b * rows + r]
 * (quantize_inputs by_block). The tiles read block b of all their rows together, which lie side by side so: with the
 * rows k bytes apart (a power of 2 for most layers) the VNNI tile's byte dot products ran at 0.57 a cycle on a Zen
 * 4, 0.76-0.79 so (a synthetic loop of the tile's instructions, 8 rows, in L1); the products over panels streamed
 * from memory, 8 and 16 rows, 0-7% faster. */
typedef struct {
    int8_t *q;
    float *s;
    int32_t *corr;
    int64_t rows;
} InputRows;

/* The weights' offset as the tiles read them: what each block sum overshoots by, per unit of the inputs' sum. */
static inline int32_t packed_offset(int int4) {
#if defined(GEMM_VNNI)
    return int4 ? 8 : 128;
#else /* AVX2 and the portable loop read int8 weights as they are */
    return int4 ? 8 : 0;
#endif
}

/* The scales of weight rows first.. (count of them, the rest of the panel 0) in the panel layout: sp[group * STORED
 * + j]. */
static void pack_scales(const uint16_t *s, int64_t first, int count, int64_t groups, uint16_t *sp) {
    for (int64_t group = 0; group < groups; group++)
        for (int j = 0; j < STORED; j++) sp[group * STORED + j] = j < count ? s[(first + j) * groups + group] : 0;
}

#if defined(GEMM_VNNI) || defined(GEMM_AVX2)
/* 32 bytes of each of the 8 weight rows from `row` on (rows at or past `count` read as zeros; only 16 bytes each,
 * zero-extended, if `half`), transposed: r[t] holds bytes 4t..4t+3 of each row. */
static inline __attribute__((always_inline)) void load_transposed(const uint8_t *p, int64_t row_bytes, int row,
                                                                  int count, int half, __m256i r[8]) {
    for (int i = 0; i < 8; i++) {
        const uint8_t *q = p + (int64_t)(row + i) * row_bytes;
        if (row + i >= count)
            r[i] = _mm256_setzero_si256();
        else if (half)
            r[i] = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)q));
        else
            r[i] = _mm256_loadu_si256((const __m256i *)q);
    }
    transpose8x8(r);
}

/* Weight rows first.. (count <= STORED; the rest of the panel 0) in the panel layout at pw: 8 rows and 8 words at
 * a time, loaded and transposed in registers. */
static void pack_panel(const uint8_t *w, int64_t first, int count, int64_t row_bytes, uint8_t *pw) {
    const int64_t words = row_bytes / 4;
    for (int h = 0; h < STORED; h += 8)
        for (int64_t d = 0; d < words; d += 8) {
            __m256i r[8];
            load_transposed(w + first * row_bytes + d * 4, row_bytes, h, count, d + 4 == words, r);
            for (int t = 0; t < 8 && d + t < words; t++)
                _mm256_storeu_si256((__m256i *)(pw + ((d + t) * STORED + h) * 4), r[t]);
        }
}

static inline int32_t load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Ask for block b of the next panel's weight rows (at `ahead`, as laid out: rows row_bytes apart, or a stored
 * panel, whose lines are the same set; NULL: none), a cache line of each row at a time, into L2 (prefetches never
 * fault, past the end included; into L2 rather than L1 or non-temporally: 8 rows read 1.2-1.6x faster on a Zen 4). */
static inline __attribute__((always_inline)) void prefetch_block(const uint8_t *ahead, int64_t b, int64_t k,
                                                                 int int4) {
    const int64_t bytes = int4 ? QBLOCK / 2 : QBLOCK, row_bytes = int4 ? k / 2 : k;
    if (ahead != NULL && (b * bytes) % 64 == 0)
        for (int j = 0; j < STORED; j++) __builtin_prefetch(ahead + j * row_bytes + b * bytes, 0, 1);
}
#else
/* The portable packing: word by word. */
static void pack_panel(const uint8_t *w, int64_t first, int count, int64_t row_bytes, uint8_t *pw) {
    for (int64_t d = 0; d < row_bytes / 4; d++)
        for (int j = 0; j < STORED; j++) {
            uint8_t *to = pw + (d * STORED + j) * 4;
            if (j < count)
                memcpy(to, w + (first + j) * row_bytes + d * 4, 4);
            else
                memset(to, 0, 4);
        }
}
#endif

#ifdef GEMM_VNNI
/* 16 bf16 scales as fp32. */
static inline __m512 widen_scales(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* out[r * STORED + j] for input rows r0..r0+count-1 (count <= TILE) against a panel (pw, sp; per blocks a
 * group). */
static inline __attribute__((always_inline)) void tile(const uint8_t *pw, const uint16_t *sp, int64_t per,
                                                         InputRows in, int64_t r0, int count, int64_t k, int int4,
                                                         const uint8_t *ahead, float *out, int halves) {
    (void)halves; /* a vector holds the whole panel */
    int64_t nb = k / QBLOCK, left = per;
    const __m512i low4 = _mm512_set1_epi8(15), flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[TILE];
    for (int r = 0; r < count; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_block(ahead, b, k, int4);
        __m512i d[TILE];
        const int8_t *xb = in.q + (b * in.rows + r0) * QBLOCK; /* then row r0 + r at xb + r * QBLOCK */
        for (int r = 0; r < count; r++) d[r] = _mm512_set1_epi32(-in.corr[b * in.rows + r0 + r]);
        if (int4) {
            const uint8_t *pb = pw + b * 4 * STORED * 4;
            for (int t = 0; t < 4; t++) {
                __m512i packed = _mm512_loadu_si512((const void *)(pb + t * STORED * 4));
                __m512i lo = _mm512_and_si512(packed, low4), hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
                for (int r = 0; r < count; r++) {
                    d[r] = _mm512_dpbusd_epi32(d[r], lo, _mm512_set1_epi32(load4(xb + r * QBLOCK + 4 * t)));
                    d[r] = _mm512_dpbusd_epi32(d[r], hi, _mm512_set1_epi32(load4(xb + r * QBLOCK + 16 + 4 * t)));
                }
            }
        } else {
            const uint8_t *pb = pw + b * 8 * STORED * 4;
            for (int t = 0; t < 8; t++) {
                __m512i wv = _mm512_xor_si512(_mm512_loadu_si512((const void *)(pb + t * STORED * 4)), flip);
                for (int r = 0; r < count; r++)
                    d[r] = _mm512_dpbusd_epi32(d[r], wv, _mm512_set1_epi32(load4(xb + r * QBLOCK + 4 * t)));
            }
        }
        __m512 ws = widen_scales(sp);
        for (int r = 0; r < count; r++) {
            __m512 scale = _mm512_mul_ps(ws, _mm512_set1_ps(in.s[b * in.rows + r0 + r]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), scale, acc[r]);
        }
        if (--left == 0) sp += STORED, left = per;
    }
    for (int r = 0; r < count; r++) _mm512_storeu_ps(out + r * STORED, acc[r]);
}
#elif defined(GEMM_AVX2)
/* 8 bf16 scales as fp32. */
static inline __m256 widen_scales(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* The same for LANES = 8 rows of a panel, or for all 16 (halves 2, count * halves <= TILE): pw and sp point at the
 * first of them (a panel's second half: 32 bytes and 8 scales on), the steps STORED * 4 bytes apart. */
static inline __attribute__((always_inline)) void tile(const uint8_t *pw, const uint16_t *sp, int64_t per,
                                                         InputRows in, int64_t r0, int count, int64_t k, int int4,
                                                         const uint8_t *ahead, float *out, int halves) {
    int64_t nb = k / QBLOCK, left = per;
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(15);
    __m256 acc[TILE]; /* [r * halves + h] */
    for (int i = 0; i < count * halves; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_block(ahead, b, k, int4);
        __m256i d[TILE];
        const int8_t *xb = in.q + (b * in.rows + r0) * QBLOCK; /* then row r0 + r at xb + r * QBLOCK */
        if (int4) { /* nibble x int8 pair sums stay within 2 * 15 * 127: 8 steps add up in int16 */
            const uint8_t *pb = pw + b * 4 * STORED * 4;
            __m256i pairs[TILE];
            for (int i = 0; i < count * halves; i++) pairs[i] = _mm256_setzero_si256();
            for (int t = 0; t < 4; t++)
                for (int h = 0; h < halves; h++) {
                    __m256i packed = _mm256_loadu_si256((const __m256i *)(pb + t * STORED * 4 + h * 32));
                    __m256i lo = _mm256_and_si256(packed, low4);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
                    for (int r = 0; r < count; r++) {
                        __m256i x_lo = _mm256_set1_epi32(load4(xb + r * QBLOCK + 4 * t));
                        __m256i x_hi = _mm256_set1_epi32(load4(xb + r * QBLOCK + 16 + 4 * t));
                        pairs[r * halves + h] = _mm256_add_epi16(
                            pairs[r * halves + h],
                            _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_lo), _mm256_maddubs_epi16(hi, x_hi)));
                    }
                }
            for (int i = 0; i < count * halves; i++)
                d[i] = _mm256_sub_epi32(_mm256_madd_epi16(pairs[i], ones),
                                        _mm256_set1_epi32(in.corr[b * in.rows + r0 + i / halves]));
        } else { /* signed weights: |w| * (x * sign(w)) = w * x, pair sums within 2 * 128 * 127 */
            const uint8_t *pb = pw + b * 8 * STORED * 4;
            for (int i = 0; i < count * halves; i++) d[i] = _mm256_setzero_si256();
            for (int t = 0; t < 8; t++)
                for (int h = 0; h < halves; h++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(pb + t * STORED * 4 + h * 32));
                    __m256i magnitude = _mm256_sign_epi8(wv, wv);
                    for (int r = 0; r < count; r++) {
                        __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(load4(xb + r * QBLOCK + 4 * t)), wv);
                        d[r * halves + h] = _mm256_add_epi32(
                            d[r * halves + h], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, xv), ones));
                    }
                }
        }
        for (int h = 0; h < halves; h++) {
            __m256 ws = widen_scales(sp + h * 8);
            for (int r = 0; r < count; r++) {
                __m256 scale = _mm256_mul_ps(ws, _mm256_set1_ps(in.s[b * in.rows + r0 + r]));
                acc[r * halves + h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r * halves + h]), scale, acc[r * halves + h]);
            }
        }
        if (--left == 0) sp += STORED, left = per;
    }
    for (int r = 0; r < count; r++)
        for (int h = 0; h < halves; h++) _mm256_storeu_ps(out + r * STORED + h * 8, acc[r * halves + h]);
}
#else
/* The portable loop: the same sums, one input row and one weight row at a time. */
static void tile(const uint8_t *pw, const uint16_t *sp, int64_t per, InputRows in, int64_t r0, int count, int64_t k,
                 int int4, const uint8_t *ahead, float *out, int halves) {
    (void)ahead, (void)halves;
    int64_t nb = k / QBLOCK;
    for (int r = 0; r < count; r++)
        for (int j = 0; j < STORED; j++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *xb = in.q + (b * in.rows + r0 + r) * QBLOCK;
                int32_t d = -in.corr[b * in.rows + r0 + r];
                for (int i = 0; i < QBLOCK; i++) {
                    /* the word of weight i of the block (int4: of its nibble pair), then its byte */
                    int64_t word = int4 ? b * 4 + (i % 16) / 4 : b * 8 + i / 4;
                    uint8_t byte = pw[(word * STORED + j) * 4 + i % 4];
                    int32_t q = int4 ? (i < 16 ? byte & 15 : byte >> 4) : (int32_t)(int8_t)byte;
                    d += q * xb[i];
                }
                acc = fmaf((float)d, bf16_to_float(sp[(b / per) * STORED + j]) * in.s[b * in.rows + r0 + r], acc);
            }
            out[r * STORED + j] = acc;
        }
}
#endif

/* Every input row against one panel (pw, sp), into out (rows x STORED): TILE rows at a time over each LANES rows of
 * it. Full tiles take TILE as a constant, and so does each count of the last one (the switch), which keeps their
 * sums in registers. The first tile asks for the next panel (ahead; NULL: none). */
static void panel_rows(const uint8_t *pw, const uint16_t *sp, int64_t per, InputRows in, int64_t rows, int64_t k,
                       int int4, const uint8_t *ahead, float *out) {
#ifdef GEMM_AVX2
    /* up to 2 rows: both halves of the panel in one pass, each line of it read once (the AVX2 build on a Zen 4:
     * int8 1 row 26.7 -> 22.0 ms, the one-row loops on rows 23.3) */
    if (rows <= TILE / 2) {
        if (rows == 1)
            tile(pw, sp, per, in, 0, 1, k, int4, ahead, out, 2);
        else
            tile(pw, sp, per, in, 0, 2, k, int4, ahead, out, 2);
        return;
    }
#endif
    for (int h = 0; h < STORED; h += LANES) {
        const uint8_t *ph = pw + h * 4;
        const uint16_t *sh = sp + h;
        int64_t r0 = 0;
        for (; r0 + TILE <= rows; r0 += TILE, ahead = NULL)
            tile(ph, sh, per, in, r0, TILE, k, int4, ahead, out + r0 * STORED + h, 1);
        switch (rows - r0) { /* the last rows of the last tile, fewer than TILE */
#define LAST_TILE(c) case c: tile(ph, sh, per, in, r0, c, k, int4, ahead, out + r0 * STORED + h, 1); break;
#if TILE > 7
            LAST_TILE(7) LAST_TILE(6) LAST_TILE(5) LAST_TILE(4)
#endif
#if TILE > 3
            LAST_TILE(3) LAST_TILE(2) LAST_TILE(1)
#endif
#undef LAST_TILE
            default: break;
        }
        ahead = NULL;
    }
}

/* The product with int8 inputs over panels: weights (w, s) stored in panels (n a multiple of STORED), or as rows,
 * copied into a panel at a time per call. Returns 0, or 1 if out of memory (y may be partly written). */
static int gemm_q8(const void *x, const void *w, const uint16_t *s, void *y, int64_t rows, int64_t n, int64_t k,
                   int64_t g, int int4, int64_t io, int stored) {
    const int64_t nb = k / QBLOCK, panels = (n + STORED - 1) / STORED, row_bytes = int4 ? k / 2 : k, groups = k / g;
    InputRows in = {malloc((size_t)(rows * k)), malloc(sizeof(float) * (size_t)(rows * nb)),
                    malloc(sizeof(int32_t) * (size_t)(rows * nb)), rows};
    int failed = in.q == NULL || in.s == NULL || in.corr == NULL;
    if (!failed) failed = quantize_inputs(x, rows, k, io, packed_offset(int4), 1, in.q, in.s, in.corr);
    if (!failed) {
#pragma omp parallel
        {
            /* each thread's panel (when it packs one) and results */
            uint8_t *pw = stored ? NULL : malloc((size_t)(STORED * row_bytes));
            uint16_t *sp = stored ? NULL : malloc(sizeof(uint16_t) * (size_t)(STORED * groups));
            float *out = malloc(sizeof(float) * (size_t)(STORED * rows));
            int mine_failed = out == NULL || (!stored && (pw == NULL || sp == NULL));
            if (mine_failed) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int64_t p = 0; p < panels; p++) {
                if (mine_failed) continue;
                const int64_t first = p * STORED;
                const int count = first + STORED <= n ? STORED : (int)(n - first);
                /* the next panel, with the static schedule this thread's next one */
                const uint8_t *here = (const uint8_t *)w + first * row_bytes, *ahead = here + STORED * row_bytes;
                if (stored) {
                    panel_rows(here, s + first * groups, g / QBLOCK, in, rows, k, int4,
                               rows >= STORED_AHEAD_ROWS ? ahead : NULL, out);
                } else {
                    pack_scales(s, first, count, groups, sp);
                    pack_panel((const uint8_t *)w, first, count, row_bytes, pw);
                    panel_rows(pw, sp, g / QBLOCK, in, rows, k, int4, ahead, out);
                }
                for (int64_t r = 0; r < rows; r++) store(y, r * n + first, out + r * STORED, count, io);
            }
            free(pw);
            free(sp);
            free(out);
        }
    }
    free(in.q);
    free(in.s);
    free(in.corr);
    return failed;
}

/* The product with int8 inputs: the panels above from GEMM_MIN_ROWS input rows on, else gemv_q8x. Group sizes:
 * int8 a multiple of 32, int4 exactly 32 (checked by the caller, llama/quant/kernels.py). Return 0, or 1 if out of
 * memory (the caller falls back; y may be partly written). */
static int q8x_call(const void *x, const void *w, const uint16_t *s, void *y, int64_t rows, int64_t n, int64_t k,
                    int64_t g, int int4, int64_t io) {
    if (rows >= GEMM_MIN_ROWS) return gemm_q8(x, w, s, y, rows, n, k, g, int4, io, 0);
    return gemv_q8x(x, w, s, y, rows, n, k, g, int4, io);
}
EXPORT_PAIR(llama_gemv_, _q8x, q8x_call)

/* The panel product at any row count on weights as rows (tests and benchmarks compare it with the one-row kernels
 * above). */
static int gemm_rows(const void *x, const void *w, const uint16_t *s, void *y, int64_t rows, int64_t n, int64_t k,
                     int64_t g, int int4, int64_t io) {
    return gemm_q8(x, w, s, y, rows, n, k, g, int4, io, 0);
}
EXPORT_PAIR(llama_gemm_, _q8x, gemm_rows)

/* The same products on weights stored in panels (n a multiple of STORED), for any number of rows: the same bits
 * as the products above on the weights as rows. */
static int gemm_panels(const void *x, const void *w, const uint16_t *s, void *y, int64_t rows, int64_t n, int64_t k,
                       int64_t g, int int4, int64_t io) {
    return gemm_q8(x, w, s, y, rows, n, k, g, int4, io, 1);
}
EXPORT_PAIR(llama_gemv_, _panels_q8x, gemm_panels)

/* The exact products on weights stored in panels: per input row, each weight widened to fp32 (exactly) and
 * multiplied with its input, the panel's rows in the lanes: a step's 4 weights of each row meet 4 inputs, summed per
 * group into 4 partial sums (by the input's place in its word), which are added and scaled into the row's sum.
 * Every row is summed in that order whatever the rows of the call (another order than the exact kernels' on rows:
 * the two agree to fp32 rounding). next: the panel to ask for as it goes (NULL: none). */
#if defined(__AVX512F__)
static void exact_panel(const float *x, const uint8_t *pw, const uint16_t *sp, int64_t k, int64_t g, int int4,
                        const uint8_t *next, float *out) {
    const int64_t words = (int4 ? g / 2 : g) / 4; /* a group's (int4: weights w and w + g / 2 share a byte) */
    const __m512i low4 = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t group = 0; group < k / g; group++) {
        __m512 p[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        const float *xg = x + group * g;
        if (next != NULL) prefetch_stretch(next + group * words * STORED * 4, words * STORED * 4);
        for (int64_t w = 0; w < words; w++) {
            const __m512i v = _mm512_loadu_si512((const void *)(pw + (group * words + w) * STORED * 4));
            for (int t = 0; t < 4; t++) {
                if (int4) {
                    const __m512i lo = _mm512_and_si512(_mm512_srli_epi32(v, 8 * t), low4);
                    const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(v, 8 * t + 4), low4);
                    p[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight)),
                                           _mm512_set1_ps(xg[4 * w + t]), p[t]);
                    p[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight)),
                                           _mm512_set1_ps(xg[g / 2 + 4 * w + t]), p[t]);
                } else { /* byte t of each lane, sign-extended */
                    const __m512i q = _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * t), 24);
                    p[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(xg[4 * w + t]), p[t]);
                }
            }
        }
        const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sp + group * STORED))), 16));
        acc = _mm512_fmadd_ps(scale, _mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3])), acc);
    }
    _mm512_storeu_ps(out, acc);
}
#elif defined(HAVE_AVX2)
/* The same on AVX2: the panel's 16 rows in two halves of 8 lanes. */
static void exact_panel(const float *x, const uint8_t *pw, const uint16_t *sp, int64_t k, int64_t g, int int4,
                        const uint8_t *next, float *out) {
    const int64_t words = (int4 ? g / 2 : g) / 4;
    const __m256i low4 = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t group = 0; group < k / g; group++) {
        __m256 p[4][2];
        for (int t = 0; t < 4; t++) p[t][0] = p[t][1] = _mm256_setzero_ps();
        const float *xg = x + group * g;
        if (next != NULL) prefetch_stretch(next + group * words * STORED * 4, words * STORED * 4);
        for (int64_t w = 0; w < words; w++)
            for (int h = 0; h < 2; h++) {
                const uint8_t *step = pw + (group * words + w) * STORED * 4 + h * 32;
                const __m256i v = _mm256_loadu_si256((const __m256i *)step);
                for (int t = 0; t < 4; t++) {
                    if (int4) {
                        const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(v, 8 * t), low4);
                        const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(v, 8 * t + 4), low4);
                        p[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(lo, eight)),
                                                  _mm256_set1_ps(xg[4 * w + t]), p[t][h]);
                        p[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(hi, eight)),
                                                  _mm256_set1_ps(xg[g / 2 + 4 * w + t]), p[t][h]);
                    } else {
                        const __m256i q = _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * t), 24);
                        p[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(xg[4 * w + t]), p[t][h]);
                    }
                }
            }
        for (int h = 0; h < 2; h++) {
            const __m256 scale = widen_scales(sp + group * STORED + h * 8);
            const __m256 sum = _mm256_add_ps(_mm256_add_ps(p[0][h], p[1][h]), _mm256_add_ps(p[2][h], p[3][h]));
            acc[h] = _mm256_fmadd_ps(scale, sum, acc[h]);
        }
    }
    _mm256_storeu_ps(out, acc[0]);
    _mm256_storeu_ps(out + 8, acc[1]);
}
#else
/* The portable loop: the same sums in the same order. */
static void exact_panel(const float *x, const uint8_t *pw, const uint16_t *sp, int64_t k, int64_t g, int int4,
                        const uint8_t *next, float *out) {
    const int64_t words = (int4 ? g / 2 : g) / 4;
    float acc[STORED] = {0};
    for (int64_t group = 0; group < k / g; group++) {
        float p[4][STORED] = {{0}};
        const float *xg = x + group * g;
        if (next != NULL) prefetch_stretch(next + group * words * STORED * 4, words * STORED * 4);
        for (int64_t w = 0; w < words; w++) {
            const uint8_t *v = pw + (group * words + w) * STORED * 4;
            for (int t = 0; t < 4; t++)
                for (int j = 0; j < STORED; j++) {
                    const uint8_t byte = v[j * 4 + t];
                    if (int4) {
                        p[t][j] = fmaf((float)((byte & 15) - 8), xg[4 * w + t], p[t][j]);
                        p[t][j] = fmaf((float)((byte >> 4) - 8), xg[g / 2 + 4 * w + t], p[t][j]);
                    } else {
                        p[t][j] = fmaf((float)(int8_t)byte, xg[4 * w + t], p[t][j]);
                    }
                }
        }
        for (int j = 0; j < STORED; j++)
            acc[j] = fmaf(bf16_to_float(sp[group * STORED + j]), (p[0][j] + p[1][j]) + (p[2][j] + p[3][j]), acc[j]);
    }
    memcpy(out, acc, sizeof acc);
}
#endif

static int exact_panels(const void *x, const void *w, const uint16_t *s, void *y, int64_t rows, int64_t n,
                        int64_t k, int64_t g, int int4, int64_t io) {
    const float *xf = float_rows(x, rows * k, io);
    if (xf == NULL) return 1;
    const int64_t row_bytes = int4 ? k / 2 : k, groups = k / g;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < n / STORED; p++) {
        const uint8_t *pw = (const uint8_t *)w + p * STORED * row_bytes;
        for (int64_t r = 0; r < rows; r++) {
            float out[STORED];
            /* the first row asks for the next panel (contiguous) group by group as it goes: the widening keeps the
             * cores busy, the memory would wait */
            exact_panel(xf + r * k, pw, s + p * STORED * groups, k, g, int4, r == 0 ? pw + STORED * row_bytes : NULL,
                        out);
            store(y, r * n + p * STORED, out, STORED, io);
        }
    }
    if ((const void *)xf != x) free((void *)xf);
    return 0;
}

EXPORT_PAIR(llama_gemv_, _panels, exact_panels)

/* ---------------------------------------------------------------------------------------------------------
 * Dequantization to fp32, (n, k), for prefill: torch's fp32 GEMM on the result beats any of the kernels above
 * once there are more than a few input rows. Each value is q * s exactly. Returns 0.
 */
int llama_dequant_int8(const int8_t *w, const uint16_t *s, float *out, int64_t n, int64_t k, int64_t g) {
    int64_t groups = k / g;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++)
        for (int64_t b = 0; b < groups; b++) {
            float scale = bf16_to_float(s[o * groups + b]);
            const int8_t *q = w + o * k + b * g;
            float *y = out + o * k + b * g;
            for (int64_t i = 0; i < g; i++) y[i] = (float)q[i] * scale;
        }
    return 0;
}

/* One int4 group of 2 * half weights from its half bytes: low nibbles first, then high ones. */
static inline __attribute__((always_inline)) void dequant_nibbles(const uint8_t *q, float scale, int64_t half,
                                                                  float *y) {
    for (int64_t i = 0; i < half; i++) y[i] = (float)((int)(q[i] & 15) - 8) * scale;
    for (int64_t i = 0; i < half; i++) y[half + i] = (float)((int)(q[i] >> 4) - 8) * scale;
}

int llama_dequant_int4(const uint8_t *w, const uint16_t *s, float *out, int64_t n, int64_t k, int64_t g) {
    int64_t groups = k / g, half = g / 2;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++)
        for (int64_t b = 0; b < groups; b++) {
            float scale = bf16_to_float(s[o * groups + b]);
            const uint8_t *q = w + o * (k / 2) + b * half;
            float *y = out + o * k + b * g;
            if (half == 16) /* groups of 32: fixed trip counts, which the compiler vectorizes */
                dequant_nibbles(q, scale, 16, y);
            else
                dequant_nibbles(q, scale, half, y);
        }
    return 0;
}
