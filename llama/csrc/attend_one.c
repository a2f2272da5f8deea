/* Attention of one new query per row over the KV cache, for decoding on CPUs (see llama/kernels/cpu_attention.py).
 *
 * For each row b, at position p = pos[b] and reading the cache's row (slot) s = slots[b], and each query head
 * h = g * n_rep + r (g: the KV head it shares, as repeat_kv has it):
 *
 *   out[b, h] = sum_{j <= p} p_j v[s, j, g],  p = softmax_j(q[b, h] . k[s, j, g] / sqrt(head_dim)),
 *
 * which is the reference's attention for a single query at position p: every cached position up to and
 * including p is visible. Only those positions are read, where SDPA over the static cache reads all of it
 * and masks the rest; and one call replaces SDPA's dispatch and setup, which cost ~240 us a layer on two cores
 * for a 256-position cache. Rows may sit at different positions and in any slots of the cache (the rows of a
 * continuous batch); with one position and no slots, row b is at pos[0] in slot b, as in a static batch.
 *
 * Numerics: q, k and v are widened to fp32 (exact), the dot products, the softmax and the weighted sum of
 * values all run in fp32, as the reference's fp32 path does, and the result is rounded once to the model's
 * dtype. Only the order of the sums differs from torch's kernels. NaN in the inputs gives NaN outputs. A row's
 * result depends on its own query, slot and position only (not on the other rows of the call).
 *
 * Threads (OpenMP) take the (row, KV head) pairs: the n_rep query heads of a pair read each cached key once,
 * while it is in cache, and each cached value once per WEIGHED of them (weigh_values).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define IO_BF16 1 /* q, the cache and out are bf16; fp32 otherwise */

/* dst[i] = src[offset + i] as fp32, for i < count. */
static inline void widen(const void *src, int64_t offset, int64_t count, int io, float *dst) {
    if (io & IO_BF16)
        for (int64_t i = 0; i < count; i++) dst[i] = bf16_to_float(((const uint16_t *)src)[offset + i]);
    else
        memcpy(dst, (const float *)src + offset, sizeof(float) * (size_t)count);
}

#define KEYS 8 /* cached positions whose scores are summed side by side */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* scores[r * stride + jj] = q_r . keys[jj] / root for the n_rep queries and KEYS keys (fp32, head_dim each, a
 * multiple of 8). The KEYS sums of a query run side by side, so none waits on the one before it. */
static inline void score_block(const float *queries, const float *keys, int64_t n_rep, int64_t head_dim,
                               float root, float *scores, int64_t stride) {
    const __m256 divisor = _mm256_set1_ps(root);
    for (int64_t r = 0; r < n_rep; r++) {
        __m256 acc[KEYS];
        for (int jj = 0; jj < KEYS; jj++) acc[jj] = _mm256_setzero_ps();
        for (int64_t d = 0; d < head_dim; d += 8) {
            const __m256 qv = _mm256_loadu_ps(queries + r * head_dim + d);
            for (int jj = 0; jj < KEYS; jj++) acc[jj] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + jj * head_dim + d), acc[jj]);
        }
        /* the 8 horizontal sums at once: pairwise adds leave each 128-bit half with half of every sum */
        const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
        const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
        _mm256_storeu_ps(scores + r * stride, _mm256_div_ps(sums, divisor));
    }
}

/* exp_nonpositive on 8 lanes, the same steps in the same order. */
static inline __m256 exp_nonpositive8(__m256 x) {
    const __m256 low = _mm256_set1_ps(-87.0f);
    const __m256 clamped = _mm256_max_ps(low, x); /* NaN in x stays NaN (max_ps returns its second operand) */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), clamped);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, low, _CMP_LT_OQ), e);
}

/* s[j] = exp_nonpositive(s[j] - top) for j < length; returns their sum. */
static inline float exp_shifted(float *s, int64_t length, float top) {
    const __m256 t = _mm256_set1_ps(top);
    __m256 total8 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= length; j += 8) {
        const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), t));
        _mm256_storeu_ps(s + j, e);
        total8 = _mm256_add_ps(total8, e);
    }
    float lanes[8], total = 0.0f;
    _mm256_storeu_ps(lanes, total8);
    for (int l = 0; l < 8; l++) total += lanes[l];
    for (; j < length; j++) {
        s[j] = exp_nonpositive(s[j] - top);
        total += s[j];
    }
    return total;
}

/* 8 bf16 values from p on, widened to fp32 (exactly). */
static inline __m256 widen8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

#define WEIGHED 4 /* queries whose sums of values run side by side */

/* acc[r * head_dim + d] = sum over positions j < length, in order, of p[r * length + j] * value_j[d], one fused
 * multiply-add a term (as values_in_order computes it), for the queries r < nq (<= WEIGHED) and d in [d0, d0 + 16):
 * the values come from the cache (position j's at offset + j * pos_stride, bf16 where io says so, widened in
 * registers), each 16 of them read once for the nq queries. */
static inline __attribute__((always_inline)) void weigh_values16(const float *p, const void *v, int64_t offset,
                                                                 int64_t pos_stride, int64_t length, int nq,
                                                                 int64_t d0, int io, float *acc, int64_t head_dim) {
    __m256 sum[WEIGHED][2];
    for (int r = 0; r < nq; r++) sum[r][0] = sum[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < length; j++) {
        const int64_t at = offset + j * pos_stride + d0;
        __m256 lo, hi;
        if (io & IO_BF16) {
            lo = widen8((const uint16_t *)v + at);
            hi = widen8((const uint16_t *)v + at + 8);
        } else {
            lo = _mm256_loadu_ps((const float *)v + at);
            hi = _mm256_loadu_ps((const float *)v + at + 8);
        }
        for (int r = 0; r < nq; r++) {
            const __m256 weight = _mm256_set1_ps(p[r * length + j]);
            sum[r][0] = _mm256_fmadd_ps(weight, lo, sum[r][0]);
            sum[r][1] = _mm256_fmadd_ps(weight, hi, sum[r][1]);
        }
    }
    for (int r = 0; r < nq; r++) {
        _mm256_storeu_ps(acc + r * head_dim + d0, sum[r][0]);
        _mm256_storeu_ps(acc + r * head_dim + d0 + 8, sum[r][1]);
    }
}

/* The queries' sums of values (p: their probabilities, n_rep x length; acc: n_rep x head_dim, head_dim a multiple
 * of 16) by weigh_values16, WEIGHED queries at a time; nq and io as constants in each call, so that the sums stay in
 * registers. (Before, each block of 8 positions' values was widened into memory and summed a query at a time: the
 * attention of 8 rows of the 0.85B shape at positions 128-255, 16 layers, took 2.82-3.07 ms so and 2.57-2.66 ms
 * this way on a Zen 4.) */
static void weigh_values(const float *p, const void *v, int64_t offset, int64_t pos_stride, int64_t length,
                         int64_t n_rep, int64_t head_dim, int io, float *acc) {
    for (int64_t r0 = 0; r0 < n_rep; r0 += WEIGHED) {
        const int nq = n_rep - r0 < WEIGHED ? (int)(n_rep - r0) : WEIGHED;
        const float *pr = p + r0 * length;
        float *ar = acc + r0 * head_dim;
        for (int64_t d0 = 0; d0 < head_dim; d0 += 16) {
#define WEIGH(n, bf16) weigh_values16(pr, v, offset, pos_stride, length, n, d0, bf16, ar, head_dim)
            if (io & IO_BF16) {
                if (nq == WEIGHED) WEIGH(WEIGHED, IO_BF16);
                else if (nq == 1) WEIGH(1, IO_BF16);
                else WEIGH(nq, IO_BF16);
            } else {
                if (nq == WEIGHED) WEIGH(WEIGHED, 0);
                else if (nq == 1) WEIGH(1, 0);
                else WEIGH(nq, 0);
            }
#undef WEIGH
        }
    }
}
#else
static inline float exp_shifted(float *s, int64_t length, float top) {
    float total = 0.0f;
    for (int64_t j = 0; j < length; j++) {
        s[j] = exp_nonpositive(s[j] - top);
        total += s[j];
    }
    return total;
}
#endif

/* acc[r] += p[r * stride + jj] * values[jj] for jj < count in order, one fused multiply-add a term (as
 * weigh_values16 sums them), for the n_rep queries (fp32 values): the sums of values where head_dim is not a
 * multiple of 16 or the build has no AVX2. */
static inline void values_in_order(const float *p, int64_t stride, const float *values, int count, int64_t n_rep,
                                   int64_t head_dim, float *acc) {
    for (int64_t r = 0; r < n_rep; r++)
        for (int jj = 0; jj < count; jj++)
            for (int64_t d = 0; d < head_dim; d++)
                acc[r * head_dim + d] = __builtin_fmaf(p[r * stride + jj], values[jj * head_dim + d], acc[r * head_dim + d]);
}

#define AHEAD (4 * KEYS) /* positions whose keys are asked for ahead of the ones being scored */

/* Ask the memory for the head_dim elements at offset + j * pos_stride of p, for positions j in [from, to), into the
 * L2 cache. In a decode step the cached keys and values are not in the caches (the products before them streamed
 * the weights), and a pair reads a few hundred bytes of every position, too little for the hardware prefetchers:
 * 16 layers of an 8-row step (positions 128-255) took 3.3 ms on a Zen 4, against 5.9 without (5.2 into L1). */
static inline void prefetch_positions(const void *p, int64_t offset, int64_t pos_stride, int64_t from, int64_t to,
                                      int64_t head_dim, int io) {
    const int64_t size = io & IO_BF16 ? 2 : 4;
    for (int64_t j = from; j < to; j++)
        for (int64_t b = 0; b < head_dim * size; b += 64)
            __builtin_prefetch((const char *)p + (offset + j * pos_stride) * size + b, 0, 2);
}


/* One (row, KV head) pair: the n_rep query heads at q_offset, keys and values at kv_offset + j * pos_stride.
 * scratch: n_rep * (length + 2 * head_dim) + KEYS * head_dim floats. */
static void attend_pair(const void *q, const void *k, const void *v, void *out, int64_t q_offset,
                        int64_t kv_offset, int64_t pos_stride, int64_t length, int64_t n_rep, int64_t head_dim,
                        int io, float *scratch) {
    float *scores = scratch;                  /* (n_rep, length) */
    float *queries = scores + n_rep * length; /* (n_rep, head_dim) */
    float *acc = queries + n_rep * head_dim;  /* (n_rep, head_dim) */
    float *rows = acc + n_rep * head_dim;     /* (KEYS, head_dim): keys or values of KEYS positions */
    const float root = sqrtf((float)head_dim);
    widen(q, q_offset, n_rep * head_dim, io, queries);
    prefetch_positions(k, kv_offset, pos_stride, 0, length < AHEAD ? length : AHEAD, head_dim, io);
    for (int64_t j = 0; j < length; j += KEYS) {
        const int count = length - j < KEYS ? (int)(length - j) : KEYS;
        const int64_t ahead = j + AHEAD + KEYS < length ? j + AHEAD + KEYS : length;
        if (j + AHEAD < ahead) prefetch_positions(k, kv_offset, pos_stride, j + AHEAD, ahead, head_dim, io);
        prefetch_positions(v, kv_offset, pos_stride, j, j + count, head_dim, io); /* for the sum of values below */
        for (int jj = 0; jj < count; jj++) widen(k, kv_offset + (j + jj) * pos_stride, head_dim, io, rows + jj * head_dim);
#if defined(__AVX2__) && defined(__FMA__)
        if (count == KEYS && head_dim % 8 == 0) {
            score_block(queries, rows, n_rep, head_dim, root, scores + j, length);
            continue;
        }
#endif
        for (int64_t r = 0; r < n_rep; r++)
            for (int jj = 0; jj < count; jj++) {
                float dot = 0.0f;
                for (int64_t d = 0; d < head_dim; d++) dot += queries[r * head_dim + d] * rows[jj * head_dim + d];
                scores[r * length + j + jj] = dot / root;
            }
    }
    for (int64_t r = 0; r < n_rep; r++) {
        float *s = scores + r * length;
        float top = s[0];
        for (int64_t j = 1; j < length; j++) top = s[j] > top ? s[j] : top;
        if (isnan(top)) top = 0.0f; /* NaN scores stay NaN below */
        const float inverse = 1.0f / exp_shifted(s, length, top);
        for (int64_t j = 0; j < length; j++) s[j] *= inverse;
    }
#if defined(__AVX2__) && defined(__FMA__)
    if (head_dim % 16 == 0)
        weigh_values(scores, v, kv_offset, pos_stride, length, n_rep, head_dim, io, acc);
    else
#endif
    {
        memset(acc, 0, sizeof(float) * (size_t)(n_rep * head_dim));
        for (int64_t j = 0; j < length; j += KEYS) {
            const int count = length - j < KEYS ? (int)(length - j) : KEYS;
            for (int jj = 0; jj < count; jj++)
                widen(v, kv_offset + (j + jj) * pos_stride, head_dim, io, rows + jj * head_dim);
            values_in_order(scores + j, length, rows, count, n_rep, head_dim, acc);
        }
    }
    for (int64_t i = 0; i < n_rep * head_dim; i++) {
        if (io & IO_BF16)
            ((uint16_t *)out)[q_offset + i] = float_to_bf16(acc[i]);
        else
            ((float *)out)[q_offset + i] = acc[i];
    }
}

/* Whether every position (n_pos of them: 1, or one per row) lies in [0, max_len): 0, else 2; and every slot
 * (NULL, or one per row) in [0, max_batch): 0, else 3. */
static int check_rows(const int64_t *pos, int64_t n_pos, const int64_t *slots, int64_t bsz, int64_t max_batch,
                       int64_t max_len) {
    for (int64_t i = 0; i < n_pos; i++)
        if (pos[i] < 0 || pos[i] >= max_len) return 2;
    if (slots != NULL)
        for (int64_t b = 0; b < bsz; b++)
            if (slots[b] < 0 || slots[b] >= max_batch) return 3;
    return 0;
}

/* q and out: (bsz, n_kv * n_rep, head_dim), contiguous. k, v: element (s, j, g, d) at
 * s * batch_stride + j * pos_stride + g * head_dim + d, for slots s < max_batch and positions j < max_len.
 * pos: n_pos int64 positions, 1 (every row at pos[0]) or bsz (row b at pos[b]); slots: NULL (row b reads slot b)
 * or bsz int64 slots. Both are read here, so that a compiled graph can pass them as data.
 * Returns 0; 1 if out of memory; 2 if a position is outside [0, max_len); 3 if a slot is outside
 * [0, max_batch) (nothing written in any of these cases). */
int llama_attend_one(const void *q, const void *k, const void *v, void *out, const int64_t *pos, int64_t n_pos,
                     const int64_t *slots, int64_t bsz, int64_t max_batch, int64_t n_kv, int64_t n_rep,
                     int64_t head_dim, int64_t max_len, int64_t batch_stride, int64_t pos_stride, int io) {
    const int code = check_rows(pos, n_pos, slots, bsz, max_batch, max_len);
    if (code) return code;
    int64_t longest = 0;
    for (int64_t i = 0; i < n_pos; i++) longest = pos[i] + 1 > longest ? pos[i] + 1 : longest;
    const int64_t pairs = bsz * n_kv, per_pair = n_rep * (longest + 2 * head_dim) + KEYS * head_dim;
    float *scratch = malloc(sizeof(float) * (size_t)(pairs * per_pair));
    if (scratch == NULL) return 1;
    /* dynamic: with rows at different positions the pairs differ in length */
#pragma omp parallel for schedule(dynamic)
    for (int64_t i = 0; i < pairs; i++) {
        const int64_t b = i / n_kv, g = i % n_kv, slot = slots == NULL ? b : slots[b];
        const int64_t length = pos[n_pos == 1 ? 0 : b] + 1;
        attend_pair(q, k, v, out, i * n_rep * head_dim, slot * batch_stride + g * head_dim, pos_stride, length,
                    n_rep, head_dim, io, scratch + i * per_pair);
    }
    free(scratch);
    return 0;
}
