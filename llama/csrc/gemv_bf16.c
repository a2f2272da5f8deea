/* Products with bfloat16 weights for decoding on CPUs, 1 to 16 input rows (see llama/kernels/cpu_gemv.py).
 *
 * y[r, o] = sum_i x[r, i] * w[o, i], for x, w and y bf16: x (rows, k), w (n, k), y (rows, n).
 *
 * A decode step reads every weight once, so with one input row the speed is all in how the weights stream from
 * memory. One core reads far below the machine's bandwidth if it follows a single stream: on the Xeon we
 * measured (benchmarks/RESULTS.md), walking one weight row at a time reached 18 GB/s on two cores, against 28
 * for a plain sum. So each thread walks several weight rows side by side (that many streams in flight); that
 * reached 27.5 GB/s. Each thread takes a contiguous run of the weight rows and cuts it into STREAMS stretches, one
 * row of each at a time (one_row): every stretch is then one long stream rather than a short run of a row's 4 KB,
 * which is what the hardware prefetchers follow best. On the Zen 4 of benchmarks/RESULTS.md that took the 0.85B
 * shape's 1.57 GB from 30.2-31.7 ms (8 adjacent rows a block, the next block asked for as it went) to 27.6-28.6
 * ms, the same bits.
 *
 * With several input rows (a batch of requests decoding together) the weights still stream from memory once per
 * call, but the arithmetic grows with the rows, and a loop that takes the input rows one at a time (as this one
 * did) is then bound by it: 8 rows cost 4 one-row calls on a Zen 4. So a block of TILE_W weight rows meets the
 * input rows TILE_X at a time ("a pass"): each vector of weights, loaded (and widened) once, is multiplied by the
 * TILE_X input rows while it sits in a register, and the TILE_X x TILE_W sums stay in registers for the whole
 * length k. The next pass over the block reads its weights from the core's caches. The passes are bound by the
 * arithmetic, so, left to the hardware prefetchers, the memory would wait while they compute and they would wait
 * for the memory at the next block: the passes over a block ask for the next block's weights, spread evenly over
 * them, so that the stream and the arithmetic overlap (Ahead).
 *
 * Four versions of the inner loop, chosen when compiling for the CPU at hand (-march=native; tests build each):
 * - "avx512bf16", AVX-512 with bf16 dot products (AVX512_BF16: Zen 4, Sapphire Rapids and later): vdpbf16ps
 *   multiplies 32 bf16 pairs and adds them, two by two, into 16 fp32 lanes, straight from the bf16 inputs and
 *   weights (no widening): twice the multiply-adds of an fp32 FMA per instruction. The last k % 32 columns are
 *   loaded under a mask (zeros past the end). The instruction reads subnormal inputs (below 2^-126) as zero, which
 *   the bf16 activations and weights of a model are not in practice (a test pins it).
 * - "avx512", AVX-512 without them (Skylake to Ice Lake): the weights widened to 16 fp32 lanes (a zero-extension
 *   and a shift), fp32 FMAs.
 *   In both, one input row walks 12 streams, each asking for its next row's line into L2 as it reads one
 *   (STREAMS_AHEAD; 8 streams, 16, or none asked ahead were slower: 28.6, 33.4 and 33.3 ms against 28.5), without
 *   the per-row prefetch into L1 that passes over several input rows make (there it helps). (A plain read of as
 *   many bytes: 25-26 ms. The "avx512" loop, built on the Zen 4 with -mno-avx512bf16: 33.7-33.8 ms against
 *   33.1-33.2 for the blocks it walked before; not measured on a CPU that runs it natively.)
 * - "avx2", AVX2 and FMA without AVX-512 (Zen 2/3, Haswell to Alder Lake): 8 fp32 lanes per sum, the weights
 *   widened by two unpacks against zero, which put each bf16 in the top half of an fp32 lane. The unpacks take the
 *   weights of each 128-bit half in the order 0-3, 8-11 (low) and 4-7, 12-15 (high), so the input rows are widened
 *   and permuted once per call to match. One input row walks 8 streams with no software prefetch: on a Zen 3
 *   prefetching the next block made 8 adjacent rows 13% slower than leaving them to the hardware prefetchers (and
 *   16-lane sums for 8 rows spilled AVX2's 16 registers). Built for AVX2 on the Zen 4, 8 streams read 1.57 GB in
 *   34.1 ms against 35.4 for 8 adjacent rows.
 * - "plain": C that the compiler vectorizes (other architectures, x86 without AVX2): LANES partial sums per pair,
 *   and PREFETCH_BYTES of software prefetch ahead on each weight row.
 *
 * Numerics: products of bf16 values are exact in fp32, the sums run in fp32 (in another order than torch's, so
 * they can differ from it in the last fp32 bits), and each result is rounded to bf16 to nearest-even, as torch
 * does. Every (input row, weight row) pair is summed in the same order whatever the number of rows and wherever
 * the pair falls in a tile (the same vector steps, and one function for the tail and the sum of the lanes), so
 * row r of a call with several rows is bitwise the call with row r alone: a row's result does not depend on the
 * other rows of its batch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* Every size below can be set with -D, to measure others (benchmarks/bench_batch_decode.py --flags). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 512 /* how far ahead each weight row asks for its own bytes (not "avx2", not one AVX-512 row) */
#endif
/* TILE_X input rows against TILE_W weight rows: the sums, the input rows' vectors and the weights' must fit in the
 * registers (32 with AVX-512, 16 with AVX2). Measured on a Zen 4 (benchmarks/RESULTS.md): with bf16 dot products
 * 6 x 4 beat 4 x 4, 4 x 5, 4 x 6 and 8 x 3 by a few percent at 8-16 rows; the "avx512" loop (built with
 * -mno-avx512bf16 there) ran 4 x 4 as fast as 6 x 4 and 4 x 5; the AVX2 loop (built with -mno-avx512f) ran 2 x 4
 * faster than 2 x 3, 3 x 2 and 4 x 2, whose input vectors do not all fit in the registers. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define TILE_X_DEFAULT 6
#define TILE_W_DEFAULT 4
#define STREAMS_DEFAULT 12
#define STREAMS_AHEAD_DEFAULT 1
#elif defined(__AVX512F__)
#define TILE_X_DEFAULT 4
#define TILE_W_DEFAULT 4
#define STREAMS_DEFAULT 12
#define STREAMS_AHEAD_DEFAULT 1
#elif defined(__AVX2__) && defined(__FMA__)
#define TILE_X_DEFAULT 2
#define TILE_W_DEFAULT 4
#define STREAMS_DEFAULT 8
#define STREAMS_AHEAD_DEFAULT 0
#else
#define TILE_X_DEFAULT 2
#define TILE_W_DEFAULT 2
#define STREAMS_DEFAULT 8
#define STREAMS_AHEAD_DEFAULT 0
#endif
#ifndef STREAMS
#define STREAMS STREAMS_DEFAULT /* one input row: weight rows side by side, each from its own stream */
#endif
#ifndef STREAMS_AHEAD
#define STREAMS_AHEAD STREAMS_AHEAD_DEFAULT /* one input row: each stream asks for its next row as it goes */
#endif
#ifndef TILE_X
#define TILE_X TILE_X_DEFAULT
#endif
#ifndef TILE_W
#define TILE_W TILE_W_DEFAULT
#endif
#if TILE_X < 1 || TILE_X > 8 || TILE_W < 1 || STREAMS < 1
#error "TILE_X must be 1 to 8, TILE_W and STREAMS at least 1"
#endif
#define MAX_TILE_W (STREAMS > TILE_W ? STREAMS : TILE_W)

#define NOINLINE __attribute__((noinline, noclone))
#define INLINE static inline __attribute__((always_inline))

/* The part of the next block of weight rows that a pass asks the memory for while it computes: the 64-byte lines
 * from at (up to end), per_step of them each step of 32 columns. */
typedef struct {
    const char *at, *end;
    int per_step;
} Ahead;

/* Into the L2 cache (not L1, which the current block's weights and the input rows occupy): on the Zen 4 the 8-row
 * pass took 40% longer with the lines asked into L1 or with no locality hint. */
INLINE void fetch_ahead(Ahead *a) {
    for (int p = 0; p < a->per_step; p++, a->at += 64)
        if (a->at < a->end) __builtin_prefetch(a->at, 0, 2);
}

/* One input row: the line of a stream's next weight row (k further on) that the current step reads, into L2 (past
 * the stream's end it asks for a line the call may not need: prefetches never fault). */
INLINE void fetch_next_row(const uint16_t *at, int64_t k) { __builtin_prefetch((const char *)(at + k), 0, 2); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define INPUT uint16_t /* the input rows as the loop reads them: bf16 as given */
#define LOOP_NAME "avx512bf16"

/* The bf16 rounding of the sum of the 16 lanes (one function: one order for every caller). */
static NOINLINE uint16_t finish(__m512 acc) {
    float lanes[16], sum = 0.0f;
    _mm512_storeu_ps(lanes, acc);
    for (int l = 0; l < 16; l++) sum += lanes[l];
    return float_to_bf16(sum);
}

/* y[r * n + j * ys] for the nx input rows at x (k each) and the nw weight rows at w, ws elements apart (k: side by
 * side; one row of each stream: further), 32 columns a step. streams: one input row against STREAMS streams, each
 * weight row asking for its stream's next row (STREAMS_AHEAD). The tiles of the other loops take the same. */
INLINE void tile(const uint16_t *x, int64_t k, int nx, const uint16_t *w, int64_t ws, int nw, uint16_t *y, int64_t n,
                 int64_t ys, Ahead ahead, int streams) {
    __m512 acc[TILE_X][MAX_TILE_W];
    for (int r = 0; r < nx; r++)
        for (int j = 0; j < nw; j++) acc[r][j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        __m512i wv[MAX_TILE_W];
        fetch_ahead(&ahead);
        for (int j = 0; j < nw; j++) {
            if (nx > 1) __builtin_prefetch((const char *)(w + j * ws + i) + PREFETCH_BYTES, 0, 3);
            if (streams && STREAMS_AHEAD) fetch_next_row(w + j * ws + i, k);
            wv[j] = _mm512_loadu_si512(w + j * ws + i);
        }
        for (int r = 0; r < nx; r++) {
            const __m512i xv = _mm512_loadu_si512(x + r * k + i);
            for (int j = 0; j < nw; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    if (i < k) { /* the last k - i < 32 columns, zeros past the end */
        const __mmask32 mask = (__mmask32)((1ull << (k - i)) - 1);
        for (int r = 0; r < nx; r++) {
            const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + r * k + i);
            for (int j = 0; j < nw; j++) {
                const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + j * ws + i);
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)xv, (__m512bh)wv);
            }
        }
    }
    for (int r = 0; r < nx; r++)
        for (int j = 0; j < nw; j++) y[r * n + j * ys] = finish(acc[r][j]);
}

static const INPUT *prepare(const uint16_t *x, int64_t rows, int64_t k) {
    (void)rows, (void)k;
    return x;
}

#elif defined(__AVX512F__)
#include <immintrin.h>
#define INPUT float /* the input rows widened to fp32 (prepare) */
#define LOOP_NAME "avx512"

/* The bf16 rounding of the sum of the 16 lanes and of the columns after the last 16 (xf, w: those columns). */
static NOINLINE uint16_t finish(__m512 acc, const float *xf, const uint16_t *w, int64_t tail) {
    float lanes[16], sum = 0.0f;
    _mm512_storeu_ps(lanes, acc);
    for (int l = 0; l < 16; l++) sum += lanes[l];
    for (int64_t t = 0; t < tail; t++) sum += xf[t] * bf16_to_float(w[t]);
    return float_to_bf16(sum);
}

/* 16 bf16 weights as fp32: each in the top half of a 32-bit lane. */
INLINE __m512 widen16(const uint16_t *w) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w)), 16));
}

INLINE void tile(const float *xf, int64_t k, int nx, const uint16_t *w, int64_t ws, int nw, uint16_t *y, int64_t n,
                 int64_t ys, Ahead ahead, int streams) {
    const int64_t k16 = k / 16 * 16;
    __m512 acc[TILE_X][MAX_TILE_W];
    for (int r = 0; r < nx; r++)
        for (int j = 0; j < nw; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k16; i += 16) {
        if (i % 32 == 0) fetch_ahead(&ahead);
        __m512 xv[TILE_X];
        for (int r = 0; r < nx; r++) xv[r] = _mm512_loadu_ps(xf + r * k + i);
        for (int j = 0; j < nw; j++) {
            if (nx > 1 && i % 32 == 0) __builtin_prefetch((const char *)(w + j * ws + i) + PREFETCH_BYTES, 0, 3);
            if (streams && STREAMS_AHEAD && i % 32 == 0) fetch_next_row(w + j * ws + i, k);
            const __m512 wv = widen16(w + j * ws + i);
            for (int r = 0; r < nx; r++) acc[r][j] = _mm512_fmadd_ps(wv, xv[r], acc[r][j]);
        }
    }
    for (int r = 0; r < nx; r++)
        for (int j = 0; j < nw; j++)
            y[r * n + j * ys] = finish(acc[r][j], xf + r * k + k16, w + j * ws + k16, k - k16);
}

static const INPUT *prepare(const uint16_t *x, int64_t rows, int64_t k) { return widened_copy(x, rows * k); }

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define INPUT float /* the input rows widened to fp32 and permuted (prepare) */
#define LOOP_NAME "avx2"

/* The bf16 rounding of the sum of the 8 lanes and of the columns after the last 16 (xp, w: those columns). */
static NOINLINE uint16_t finish(__m256 acc, const float *xp, const uint16_t *w, int64_t tail) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float sum = _mm_cvtss_f32(s);
    for (int64_t t = 0; t < tail; t++) sum += xp[t] * bf16_to_float(w[t]);
    return float_to_bf16(sum);
}

INLINE void tile(const float *xp, int64_t k, int nx, const uint16_t *w, int64_t ws, int nw, uint16_t *y, int64_t n,
                 int64_t ys, Ahead ahead, int streams) {
    const int64_t k16 = k / 16 * 16;
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc[TILE_X][MAX_TILE_W];
    for (int r = 0; r < nx; r++)
        for (int j = 0; j < nw; j++) acc[r][j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k16; i += 16) {
        if (i % 32 == 0) fetch_ahead(&ahead); /* a line of 32 weights */
        __m256 x0[TILE_X], x1[TILE_X];
        for (int r = 0; r < nx; r++) {
            x0[r] = _mm256_loadu_ps(xp + r * k + i), x1[r] = _mm256_loadu_ps(xp + r * k + i + 8);
            /* With several input rows, keep their vectors in registers: left alone, the compiler folds a load into
             * every multiply-add, and the loop then waits on loads (8 rows took 1.7x as long). */
            if (nx > 1) __asm__("" : "+x"(x0[r]), "+x"(x1[r]));
        }
        for (int j = 0; j < nw; j++) {
            if (streams && STREAMS_AHEAD && i % 32 == 0) fetch_next_row(w + j * ws + i, k);
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + j * ws + i));
            if (nx > 1) __asm__("" : "+x"(v)); /* one load, not one per unpack */
            const __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
            const __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
            for (int r = 0; r < nx; r++) {
                acc[r][j] = _mm256_fmadd_ps(lo, x0[r], acc[r][j]);
                acc[r][j] = _mm256_fmadd_ps(hi, x1[r], acc[r][j]);
            }
        }
    }
    for (int r = 0; r < nx; r++)
        for (int j = 0; j < nw; j++)
            y[r * n + j * ys] = finish(acc[r][j], xp + r * k + k16, w + j * ws + k16, k - k16);
}

/* The input rows in fp32, each run of 16 columns in the order of the unpacks: 0-3, 8-11, then 4-7, 12-15. */
static const INPUT *prepare(const uint16_t *x, int64_t rows, int64_t k) {
    float *xp = malloc(sizeof(float) * (size_t)(rows * k));
    if (xp == NULL) return NULL;
    const int64_t k16 = k / 16 * 16;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * k;
        float *out = xp + r * k;
        for (int64_t i = 0; i < k16; i += 16)
            for (int l = 0; l < 4; l++) {
                out[i + l] = bf16_to_float(xr[i + l]);
                out[i + 4 + l] = bf16_to_float(xr[i + 8 + l]);
                out[i + 8 + l] = bf16_to_float(xr[i + 4 + l]);
                out[i + 12 + l] = bf16_to_float(xr[i + 12 + l]);
            }
        for (int64_t t = k16; t < k; t++) out[t] = bf16_to_float(xr[t]);
    }
    return xp;
}

#else
#define INPUT float /* the input rows widened to fp32 (prepare) */
#define LOOP_NAME "plain"
#define LANES 16

/* The bf16 rounding of the sum of the LANES lanes and of the columns after the last LANES (xf, w: those). */
static NOINLINE uint16_t finish(const float *acc, const float *xf, const uint16_t *w, int64_t tail) {
    float sum = 0.0f;
    for (int l = 0; l < LANES; l++) sum += acc[l];
    for (int64_t t = 0; t < tail; t++) sum += xf[t] * bf16_to_float(w[t]);
    return float_to_bf16(sum);
}

INLINE void tile(const float *xf, int64_t k, int nx, const uint16_t *w, int64_t ws, int nw, uint16_t *y, int64_t n,
                 int64_t ys, Ahead ahead, int streams) {
    (void)streams; /* each weight row asks for its own bytes ahead (PREFETCH_BYTES) */
    float acc[TILE_X][MAX_TILE_W][LANES];
    for (int r = 0; r < nx; r++)
        for (int j = 0; j < nw; j++)
            for (int l = 0; l < LANES; l++) acc[r][j][l] = 0.0f;
    int64_t i = 0;
    for (; i + LANES <= k; i += LANES) {
        if (i % 32 == 0) fetch_ahead(&ahead);
        for (int j = 0; j < nw; j++) __builtin_prefetch((const char *)(w + j * ws + i) + PREFETCH_BYTES, 0, 3);
        for (int r = 0; r < nx; r++)
            for (int j = 0; j < nw; j++)
                for (int l = 0; l < LANES; l++) acc[r][j][l] += xf[r * k + i + l] * bf16_to_float(w[j * ws + i + l]);
    }
    for (int r = 0; r < nx; r++)
        for (int j = 0; j < nw; j++) y[r * n + j * ys] = finish(acc[r][j], xf + r * k + i, w + j * ws + i, k - i);
}

static const INPUT *prepare(const uint16_t *x, int64_t rows, int64_t k) { return widened_copy(x, rows * k); }
#endif

/* The tiles, each its own function with constant sizes (so that its sums stay in registers), and one for any
 * sizes (the last, short block of weight rows; one input row's rows left over after its streams). */
#define TILE_FN(name, nx, nw)                                                                                     \
    static NOINLINE void name(const INPUT *x, int64_t k, const uint16_t *w, uint16_t *y, int64_t n, Ahead ahead) { \
        tile(x, k, nx, w, k, nw, y, n, 1, ahead, 0);                                                              \
    }
/* One per count of input rows, 1..8; counts past TILE_X (never called: a pass has at most TILE_X rows) are built
 * as TILE_X, so that the table needs no conditions. */
#define ROWS_UP_TO_TILE_X(r) ((r) < TILE_X ? (r) : TILE_X)
TILE_FN(tile_1, 1, TILE_W)
TILE_FN(tile_2, ROWS_UP_TO_TILE_X(2), TILE_W)
TILE_FN(tile_3, ROWS_UP_TO_TILE_X(3), TILE_W)
TILE_FN(tile_4, ROWS_UP_TO_TILE_X(4), TILE_W)
TILE_FN(tile_5, ROWS_UP_TO_TILE_X(5), TILE_W)
TILE_FN(tile_6, ROWS_UP_TO_TILE_X(6), TILE_W)
TILE_FN(tile_7, ROWS_UP_TO_TILE_X(7), TILE_W)
TILE_FN(tile_8, ROWS_UP_TO_TILE_X(8), TILE_W)
typedef void (*TileFn)(const INPUT *, int64_t, const uint16_t *, uint16_t *, int64_t, Ahead);
static const TileFn TILES[8] = {tile_1, tile_2, tile_3, tile_4, tile_5, tile_6, tile_7, tile_8};

static NOINLINE void tile_any(const INPUT *x, int64_t k, int nx, const uint16_t *w, int nw, uint16_t *y, int64_t n,
                              Ahead ahead) {
    tile(x, k, nx, w, k, nw, y, n, 1, ahead, 0);
}

/* One input row against STREAMS weight rows `apart` rows apart (a row of each stream), into y[j * apart]. */
static NOINLINE void tile_streams(const INPUT *x, int64_t k, const uint16_t *w, int64_t apart, uint16_t *y) {
    tile(x, k, 1, w, apart * k, STREAMS, y, 1, apart, (Ahead){NULL, NULL, 0}, 1);
}

/* One block of `count` weight rows (first: its first row) against every input row (two or more), in passes of up
 * to TILE_X input rows that ask for the next block (next_bytes from next) as they go. */
static void block(const INPUT *xp, const uint16_t *w, uint16_t *y, int64_t rows, int64_t n, int64_t k,
                  int64_t first, int count, const char *next, int64_t next_bytes) {
    const uint16_t *wb = w + first * k;
    const int64_t passes = (rows + TILE_X - 1) / TILE_X, lines = (next_bytes + 63) / 64;
    const int64_t steps = (k + 31) / 32; /* of each pass, in lines of 32 weights */
    for (int64_t t = 0; t < passes; t++) {
        const int64_t r = t * TILE_X;
        const int nx = rows - r < TILE_X ? (int)(rows - r) : TILE_X;
        const INPUT *xr = xp + r * k;
        uint16_t *yr = y + r * n + first;
        /* pass t asks for lines t * lines / passes .. (t + 1) * lines / passes of the next block (an even split
         * streamed 8 rows 6% faster than one in proportion to the passes' rows, 6 + 2, on the Zen 4) */
        const int64_t from = t * lines / passes, to = (t + 1) * lines / passes;
        const Ahead ahead = {next + 64 * from, next + 64 * to, (int)((to - from + steps - 1) / steps)};
        if (count != TILE_W) {
            tile_any(xr, k, nx, wb, count, yr, n, ahead);
        } else {
            TILES[nx - 1](xr, k, wb, yr, n, ahead);
        }
    }
}

/* One input row: each thread takes a contiguous run of the weight rows (the runs in thread order, as a static
 * schedule would give them) and cuts it into STREAMS stretches of equal length, which it walks side by side, row i
 * of every stretch at a time: each stretch is one long stream through memory, followed by the hardware prefetchers
 * and asked one row ahead (STREAMS_AHEAD). The rows left over (fewer than STREAMS) come after, as one block. */
static void one_row(const INPUT *x, const uint16_t *w, uint16_t *y, int64_t n, int64_t k) {
#pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t first = n * t / threads, last = n * (t + 1) / threads, per = (last - first) / STREAMS;
        for (int64_t i = 0; i < per; i++) tile_streams(x, k, w + (first + i) * k, per, y + first + i);
        const int64_t rest = first + per * STREAMS; /* fewer than STREAMS rows left: MAX_TILE_W holds them */
        if (rest < last) tile_any(x, k, 1, w + rest * k, (int)(last - rest), y + rest, n, (Ahead){NULL, NULL, 0});
    }
}

/* Which inner loop this build compiled: "avx512bf16", "avx512", "avx2" or "plain" (for tests and benchmarks). */
const char *llama_gemv_bf16_loop(void) { return LOOP_NAME; }

/* Returns 0, or 1 if out of memory for the converted input rows (nothing written). */
int llama_gemv_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t n, int64_t k) {
    if (rows <= 0 || n <= 0) return 0; /* nothing to write */
    if (k <= 0) {                       /* empty sums */
        memset(y, 0, sizeof(uint16_t) * (size_t)(rows * n));
        return 0;
    }
    const INPUT *xp = prepare(x, rows, k);
    if (xp == NULL) return 1;
    if (rows == 1) {
        one_row(xp, w, y, n, k);
    } else {
        const int64_t blocks = (n + TILE_W - 1) / TILE_W;
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t first = b * TILE_W;
            const int count = first + TILE_W <= n ? TILE_W : (int)(n - first);
            const int64_t after = first + count, next_rows = n - after < TILE_W ? n - after : TILE_W;
            block(xp, w, y, rows, n, k, first, count, (const char *)(w + after * k), next_rows * k * 2);
        }
    }
    if ((const void *)xp != (const void *)x) free((void *)xp);
    return 0;
}
