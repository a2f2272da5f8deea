/* A whole decode step of the model on a CPU in one call, for the fast path (see llama/engine/cpu_decode.py).
 *
 * On two cores a quantized step spends ~23 ms in its products and 3-6 ms between them: each of the ~150 calls
 * a compiled step makes (products, attention, inductor's small kernels) costs 10-25 us of Python and torch
 * dispatch. Here the glue between the products runs in C, and the products and the attention are the
 * library's own kernels (gemv_bf16.c, gemv_quant.c, attend_one.c), called through the pointers the caller
 * passes, so one step is one call.
 *
 * The math is the reference's, step by step, with its roundings to the model's dtype (bf16 or fp32):
 *
 *   x = norm(h) * attention_norm       norm(h) = h * rsqrt(mean(h^2) + eps) in fp32, rounded; then the product
 *   q, k, v = x @ (wq | wk | wv)       the stacked product
 *   q, k = rope(q), rope(k)            row b's pairs rotated in fp32 by cos/sin[pos[b]] (the model's freqs_cis)
 *   cache_k[slot[b], pos[b]], cache_v[slot[b], pos[b]] = k[b], v[b]
 *   h = h + attend(q, cache[slot[b], : pos[b] + 1]) @ wo
 *   x = norm(h) * ffn_norm
 *   gate, up = x @ (w1 | w3)
 *   h = h + (silu(gate) * up) @ w2     silu rounded, then the product rounded, as torch does in bf16
 *
 * and after the layers, logits = norm(h) * norm @ output, in the model's dtype.
 *
 * With several rows, OpenMP threads take the rows of the glue between the products (norms, RoPE), which would
 * otherwise grow with the rows on one core while the products do not; SwiGLU, the largest, is cut into chunks of
 * elements for every thread even for one row.
 *
 * Row b of a step sits at position pos[b] in the cache's row slot[b] (a continuous batch), or every row at one
 * position in cache rows 0..rows-1 (a static batch). Each row is computed on its own: the norms, RoPE and
 * attention take one row at a time, and the products compute each input row by the same loop whatever the rows
 * (gemv_bf16.c's give each row bitwise its result alone, tested), so a row's numbers do not depend on the other
 * rows of its step.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

typedef int (*GemvBf16)(const void *x, const void *w, void *y, int64_t rows, int64_t n, int64_t k);
typedef int (*GemvQuant)(const void *x, const void *w, const void *s, void *y, int64_t rows, int64_t n, int64_t k,
                         int64_t g, int64_t io);
typedef int (*Attend)(const void *q, const void *k, const void *v, void *out, const int64_t *pos, int64_t n_pos,
                      const int64_t *slots, int64_t bsz, int64_t max_batch, int64_t n_kv, int64_t n_rep,
                      int64_t head_dim, int64_t max_len, int64_t batch_stride, int64_t pos_stride, int io);

/* A linear layer: bf16 weights (s NULL: fn is llama_gemv_bf16) or quantized codes with their scales (fn one of
 * gemv_quant.c's products, io telling it the activations' dtype). */
typedef struct {
    void *fn;
    const void *w, *s;
    int64_t n, k, g, io;
} Linear;

typedef struct {
    const void *attention_norm, *ffn_norm; /* (dim), the model's dtype */
    Linear qkv, wo, w13, w2;               /* wq|wk|wv and w1|w3 stacked along their outputs */
    void *cache_k, *cache_v;               /* (max_batch, max_len, n_kv, head_dim), the model's dtype */
} Layer;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv, head_dim, hidden, max_len, max_batch, bf16;
    double eps;
    const float *cos, *sin; /* (max_len, head_dim / 2) */
    const void *norm;
    Linear output;
    void *attend;
    const Layer *layers;
} Model;

/* Activations are bf16 or fp32 (the model's dtype): element i of p as fp32, and stored rounded. */
static inline float get(const void *p, int64_t i, int64_t bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void put(void *p, int64_t i, float v, int64_t bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = float_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* The dtype's rounding of an fp32 value (what storing it and reading it back gives). */
static inline float rounded(float v, int64_t bf16) { return bf16 ? bf16_to_float(float_to_bf16(v)) : v; }

/* h += o over count elements, rounded to the dtype (the residual connections). */
static void add_residual(void *h, const void *o, int64_t count, int64_t bf16) {
    for (int64_t i = 0; i < count; i++) put(h, i, get(h, i, bf16) + get(o, i, bf16), bf16);
}

static int linear(const Linear *l, const void *x, void *y, int64_t rows) {
    if (l->s == NULL) return ((GemvBf16)l->fn)(x, l->w, y, rows, l->n, l->k);
    return ((GemvQuant)l->fn)(x, l->w, l->s, y, rows, l->n, l->k, l->g, l->io);
}

/* out = norm(h) * weight for each of the rows of h (rows, dim), as RMSNorm computes it. */
static void rms_norm(const Model *m, const void *h, const void *weight, void *out, int64_t rows) {
    const float eps = (float)m->eps;
#pragma omp parallel for if (rows > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float squares = 0.0f;
        for (int64_t i = 0; i < m->dim; i++) {
            const float v = get(h, r * m->dim + i, m->bf16);
            squares += v * v;
        }
        const float scale = 1.0f / sqrtf(squares / (float)m->dim + eps);
        for (int64_t i = 0; i < m->dim; i++) {
            const float normed = rounded(get(h, r * m->dim + i, m->bf16) * scale, m->bf16);
            put(out, r * m->dim + i, normed * get(weight, i, m->bf16), m->bf16);
        }
    }
}

/* Rotate the pairs (2i, 2i + 1) of `heads` heads at p (head_dim each) by the angles of row pos of cos/sin. */
static void rope(const Model *m, void *p, int64_t offset, int64_t heads, int64_t pos) {
    const int64_t half = m->head_dim / 2;
    const float *c = m->cos + pos * half, *s = m->sin + pos * half;
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < half; i++) {
            const int64_t at = offset + h * m->head_dim + 2 * i;
            const float even = get(p, at, m->bf16), odd = get(p, at + 1, m->bf16);
            put(p, at, even * c[i] - odd * s[i], m->bf16);
            put(p, at + 1, even * s[i] + odd * c[i], m->bf16);
        }
}

/* silu(g) = g * sigmoid(g), with e^-|g| so that the exponential never overflows. */
static inline float silu(float g) {
    const float e = exp_nonpositive(-fabsf(g));
    return g >= 0.0f ? g / (1.0f + e) : g * e / (1.0f + e);
}

#define SWIGLU_CHUNK 1024 /* elements of a row that a thread takes at a time */

/* mid = silu(gate) * up for each row of gu (rows, gate | up: 2 * hidden), silu rounded to the dtype first, as
 * torch computes it in bf16. Threads take chunks of the elements, one row or several: a step's ~8K elements a row
 * took 48 us a layer on one core as a loop over get/put, ~4 us vectorized over two (each element computed alone,
 * so its bits do not depend on the chunks). */
static void swiglu(const Model *m, const void *gu, void *mid, int64_t rows) {
    const int64_t hidden = m->hidden, per_row = (hidden + SWIGLU_CHUNK - 1) / SWIGLU_CHUNK;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < rows * per_row; c++) {
        const int64_t r = c / per_row, from = c % per_row * SWIGLU_CHUNK;
        const int64_t to = from + SWIGLU_CHUNK < hidden ? from + SWIGLU_CHUNK : hidden;
        if (m->bf16) { /* the dtype's loops apart, so that each is one vectorized loop */
            const uint16_t *gate = (const uint16_t *)gu + r * 2 * hidden, *up = gate + hidden;
            uint16_t *out = (uint16_t *)mid + r * hidden;
            for (int64_t i = from; i < to; i++)
                out[i] = float_to_bf16(rounded(silu(bf16_to_float(gate[i])), 1) * bf16_to_float(up[i]));
        } else {
            const float *gate = (const float *)gu + r * 2 * hidden, *up = gate + hidden;
            float *out = (float *)mid + r * hidden;
            for (int64_t i = from; i < to; i++) out[i] = silu(gate[i]) * up[i];
        }
    }
}

/* h (rows, dim) in the model's dtype holds the new tokens' embeddings and is updated in place; logits (rows,
 * vocab) in the model's dtype. pos: n_pos positions, 1 (every row at pos[0]) or rows (row b at pos[b]); slots: NULL
 * (row b in the cache's row b) or rows cache rows. Returns 0; 1 if out of memory; 2 if a position is outside
 * [0, max_len); 3 if a slot is outside [0, max_batch); or a kernel's nonzero return. The cache is written only
 * once every position and slot has been checked. (Two rows in one slot would write the same cells: the caller
 * keeps the slots of a step distinct.) */
int llama_decode_step(const Model *m, void *h, int64_t rows, const int64_t *pos, int64_t n_pos, const int64_t *slots,
                      void *logits) {
    for (int64_t i = 0; i < n_pos; i++)
        if (pos[i] < 0 || pos[i] >= m->max_len) return 2;
    if (slots != NULL)
        for (int64_t r = 0; r < rows; r++)
            if (slots[r] < 0 || slots[r] >= m->max_batch) return 3;
    const int64_t dim = m->dim, hd = m->head_dim, size = m->bf16 ? 2 : 4;
    const int64_t q_width = m->n_heads * hd, kv_width = m->n_kv * hd, qkv_width = q_width + 2 * kv_width;
    const int64_t elements = rows * (2 * dim + qkv_width + q_width + 3 * m->hidden);
    char *work = malloc((size_t)(elements * size));
    if (work == NULL) return 1;
    void *x = work, *o = work + rows * dim * size, *qkv = work + 2 * rows * dim * size;
    void *att = (char *)qkv + rows * qkv_width * size, *gu = (char *)att + rows * q_width * size;
    void *mid = (char *)gu + rows * 2 * m->hidden * size;
    const int64_t batch_stride = m->max_len * kv_width;
    int code = 0;
    for (int64_t l = 0; l < m->n_layers && code == 0; l++) {
        const Layer *layer = m->layers + l;
        rms_norm(m, h, layer->attention_norm, x, rows);
        if ((code = linear(&layer->qkv, x, qkv, rows))) break;
#pragma omp parallel for if (rows > 1) schedule(static)
        for (int64_t r = 0; r < rows; r++) { /* distinct slots: the rows write distinct cells */
            const int64_t row = r * qkv_width, at = pos[n_pos == 1 ? 0 : r], slot = slots == NULL ? r : slots[r];
            rope(m, qkv, row, m->n_heads + m->n_kv, at); /* q's heads, then k's, side by side */
            memcpy((char *)att + r * q_width * size, (char *)qkv + row * size, (size_t)(q_width * size));
            const int64_t cached = (slot * batch_stride + at * kv_width) * size;
            memcpy((char *)layer->cache_k + cached, (char *)qkv + (row + q_width) * size, (size_t)(kv_width * size));
            memcpy((char *)layer->cache_v + cached, (char *)qkv + (row + q_width + kv_width) * size,
                   (size_t)(kv_width * size));
        }
        /* the rotated queries (rows, n_heads, head_dim) are in att: attend writes into qkv, then it goes back */
        code = ((Attend)m->attend)(att, layer->cache_k, layer->cache_v, qkv, pos, n_pos, slots, rows, m->max_batch,
                                   m->n_kv, m->n_heads / m->n_kv, hd, m->max_len, batch_stride, kv_width,
                                   (int)m->bf16);
        if (code || (code = linear(&layer->wo, qkv, o, rows))) break;
        add_residual(h, o, rows * dim, m->bf16);
        rms_norm(m, h, layer->ffn_norm, x, rows);
        if ((code = linear(&layer->w13, x, gu, rows))) break;
        swiglu(m, gu, mid, rows);
        if ((code = linear(&layer->w2, mid, o, rows))) break;
        add_residual(h, o, rows * dim, m->bf16);
    }
    if (code == 0) {
        rms_norm(m, h, m->norm, x, rows);
        code = linear(&m->output, x, logits, rows);
    }
    free(work);
    return code;
}
