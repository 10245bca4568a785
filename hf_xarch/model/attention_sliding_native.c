/* The banded sliding-window attention kernel, fused per block of queries (fp32, one head per call).

   The torch path in attention_sliding_kernels.py (_BandedCore) runs each op over a chunk of many blocks, so that
   Python's per-op cost is paid once per ~1 MiB of scores. That working set (scores, their gradient, five key and
   value windows) spills the 2 MiB L2 of a core, and every op streams it again. Here every op runs on one block: its
   scores (block x (span + G) floats, ~70 KB for w = 512) stay in cache between the matmul that writes them, the
   softmax and the matmuls that read them, and consecutive windows share 94% of their keys, so the keys stay in L2
   too. The matmuls are MKL's sgemm, from the torch library already loaded (handed over by xarch_set_blas).

   Rows, windows and biases follow _BandedCore (see its docstring): block c holds queries c*block ..., its window
   holds the span keys from slot c*block - left (key_bias is indexed by padded slot, slot + left), and the G extra
   keys (global tokens, sinks) come after the band. Where a window reaches past either end of the sequence, the
   matmuls run on the part inside it, and the columns outside get the score a zero key would (0 plus the biases,
   which mask them), as in _BandedCore's zero-padded copies; nothing is copied here. A row's softmax is
   exp(s - max) / sum with the max and 1 / sum saved, so that the backward recomputes the forward's probabilities
   with one exp pass. */
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux >= 5.14; older kernels refuse it (EINVAL), and then nothing is done */
#endif
#endif

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef int (*threads_fn)(int);

static sgemm_fn SGEMM = 0;
static threads_fn SET_THREADS_LOCAL = 0;

int xarch_set_blas(void *sgemm, void *set_threads_local) {
    SGEMM = (sgemm_fn)sgemm;
    SET_THREADS_LOCAL = (threads_fn)set_threads_local;
    return 0;
}

/* Row-major C (m x n) = alpha op(A) op(B) + beta C, through column-major sgemm (C^T = op(B)^T op(A)^T).
   ta == 'T': A is stored as (k x m); tb == 'T': B is stored as (n x k). */
static void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
                 const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    if (m <= 0 || n <= 0 || k <= 0) return; /* k <= 0 never happens: a window holds at least its block's keys */
    int im = (int)m, in = (int)n, ik = (int)k, ila = (int)lda, ilb = (int)ldb, ilc = (int)ldc;
    SGEMM(&tb, &ta, &in, &im, &ik, &alpha, b, &ilb, a, &ila, &beta, c, &ilc);
}

/* exp(x) for x <= 0 (softmax arguments: a score minus its row's max), Cephes' single-precision polynomial (within
   about 1 ulp); 0 below the log of the smallest normal float. Plain arithmetic, so that the loops calling it
   vectorise. */
static inline float exp_nonpositive(float x) {
    const float lowest = -87.3365447504f;
    float xc = x < lowest ? lowest : (x > 0.f ? 0.f : x);
    float fx = xc * 1.44269504088896341f;
    fx = (fx + 12582912.f) - 12582912.f; /* round to nearest: |fx| < 2^22 */
    float r = xc - fx * 0.693359375f;
    r = r - fx * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.f;
    int32_t bits = ((int32_t)fx + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < lowest ? 0.f : y * scale;
}

/* Fault in the whole pages of [p, p + bytes) with one call (Linux's MADV_POPULATE_WRITE); elsewhere, or where the
   kernel refuses it, nothing (the pages then fault in when first written). The outputs of both passes are fresh
   memory, and a page that faults in mid-loop costs about twice what it costs here (measured in place: ~2.5 us
   against ~1.1 us), because clearing it evicts the block's scores and windows from cache between two matmuls.
   Returns 0, or -1 where the kernel refused (errno says why). */
int xarch_prefault(void *p, int64_t bytes) {
#if defined(__linux__)
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t first = ((uintptr_t)p + page - 1) & ~(page - 1), last = ((uintptr_t)p + bytes) & ~(page - 1);
    if (last > first && madvise((void *)first, last - first, MADV_POPULATE_WRITE) != 0) return -1;
#endif
    (void)p;
    (void)bytes;
    return 0;
}

/* exp_nonpositive over an array: for the tests, which hold it to float64's exp. */
void xarch_exp_nonpositive(const float *x, float *y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = exp_nonpositive(x[i]);
}

/* One head. Row strides are in floats; every row has unit stride. */
typedef struct {
    int64_t n, dim, block, span, left, extra, n_strips;
    double scale;            /* of the scores: q k^T * scale */
    double dropout;          /* probability of dropping a probability (0: none) */
    int64_t seed, stream;    /* dropout's hash inputs: the call's seed, and this head's index (batch row * heads + h) */
    const float *q, *k, *v;  /* (n, dim) each */
    int64_t q_stride, k_stride, v_stride;
    float *kt, *vt;          /* scratch for the keys and values of the current windows transposed, (dim, t_stride)
                                with t_stride >= span (see Transposed); vt only for the backward. q kt runs faster
                                than q k^T: MKL packs a transposed operand slowly, and every key is packed again for
                                each of the windows that hold it */
    int64_t t_stride;
    const float *ek, *ev;    /* (extra, dim): extra keys and values */
    const float *band_bias;  /* (block + span - 1): the bias of each offset in the band, column j of row r at
                                j - r + block - 1 (it depends on the distance alone), so row r's window columns are
                                the span floats from band_bias + block - 1 - r */
    const int64_t *strips;   /* n_strips column ranges [lo, hi) outside which every row's band bias is zero */
    const float *key_bias;   /* per padded key slot */
    const uint8_t *clean;    /* per block: 1 when no key of its window has a key_bias */
    const float *extra_bias; /* (n, extra) */
    float *out;              /* (n, dim): written by the forward */
    int64_t out_stride;
    float *row_max, *row_inv_sum; /* (n): written by the forward, read by the backward */
    float *scores, *grad_scores;  /* scratch, block * (span + extra) floats each */
    const float *grad_out;   /* backward: (n, dim) */
    int64_t grad_out_stride;
    float *grad_q;           /* backward: (n, dim), written */
    int64_t grad_q_stride;
    float *grad_k, *grad_v;  /* backward: (n, dim), written (each row zeroed when a window first reaches it) */
    int64_t grad_k_stride, grad_v_stride;
    float *grad_ek, *grad_ev; /* backward: (extra, dim), accumulated (zeroed by the caller) */
    int64_t grad_out_col_stride; /* backward: grad_out's stride along dim; where grad_out_block is set, any strides
                                    (0 included: the broadcast gradient of a sum) */
    float *grad_out_block;   /* backward: null where grad_out's rows suit BLAS (unit column stride, rows at least
                                dim apart); else scratch, (block, dim), that each block's rows are gathered into,
                                instead of a dense copy of the whole gradient */
    float *grad_band_bias;   /* backward: null, or (block + span - 1) accumulated (zeroed by the caller): the
                                gradient of a learned band_bias (T5's table), the scores' gradient summed per offset
                                over every row of every block */
    float *grad_extra_bias;  /* backward: null, or (n, extra) written: the gradient of extra_bias */
} Head;

/* Block c: its queries q0 ... q0 + rows - 1, and the keys lo ... hi - 1 of its window that lie in the sequence,
   at columns j0 ... j0 + (hi - lo) - 1 of its scores. */
typedef struct {
    int64_t q0, rows, lo, hi, j0;
} Block;

static Block block_at(const Head *h, int64_t c) {
    Block b;
    b.q0 = c * h->block;
    b.rows = h->n - b.q0 < h->block ? h->n - b.q0 : h->block;
    int64_t start = b.q0 - h->left; /* the slot of the window's first column */
    b.lo = start < 0 ? 0 : start;
    b.hi = start + h->span < h->n ? start + h->span : h->n;
    b.j0 = b.lo - start;
    return b;
}

/* Zero the columns of a block's rows outside the sequence (what zero-padded keys or values would give). */
static void zero_outside(const Head *h, const Block *b, float *s, int64_t ld) {
    const int64_t tail = b->j0 + (b->hi - b->lo);
    if (b->j0 == 0 && tail == h->span) return;
    for (int64_t r = 0; r < b->rows; r++) {
        memset(s + r * ld, 0, sizeof(float) * b->j0);
        memset(s + r * ld + tail, 0, sizeof(float) * (h->span - tail));
    }
}

/* Block c's scores (rows x (span + extra), leading dimension span + extra) with every bias added; kt: the window's
   keys transposed, (dim x (hi - lo)), row stride t_stride. */
static void block_scores(const Head *h, int64_t c, const Block *b, const float *kt, float *s) {
    const int64_t span = h->span, g = h->extra, ld = span + g, dim = h->dim;
    const float *q = h->q + b->q0 * h->q_stride;
    zero_outside(h, b, s, ld);
    gemm('N', 'N', b->rows, b->hi - b->lo, dim, (float)h->scale, q, h->q_stride, kt, h->t_stride, 0.f, s + b->j0,
         ld);
    if (g) gemm('N', 'T', b->rows, g, dim, (float)h->scale, q, h->q_stride, h->ek, dim, 0.f, s + span, ld);
    for (int64_t r = 0; r < b->rows; r++) {
        float *row = s + r * ld;
        const float *bias = h->band_bias + (h->block - 1 - r);
        for (int64_t t = 0; t < h->n_strips; t++) /* without ALiBi, only the window's two corners */
            for (int64_t j = h->strips[2 * t]; j < h->strips[2 * t + 1]; j++) row[j] += bias[j];
        if (!h->clean[c]) {
            const float *kb = h->key_bias + b->q0;
            for (int64_t j = 0; j < span; j++) row[j] += kb[j];
        }
        if (g) {
            const float *eb = h->extra_bias + (b->q0 + r) * g;
            for (int64_t j = 0; j < g; j++) row[span + j] += eb[j];
        }
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* One full 16 x 16 tile in registers: 16 loads, four rounds of shuffles (32-bit pairs, 64-bit pairs, then 128-bit
   lanes twice), 16 stores; about 5x fewer instructions than the element-wise loop, which GCC turns into two-element
   inserts. */
static inline void transpose_tile16(const float *src, int64_t src_stride, float *dst, int64_t dst_stride) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * src_stride);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * dst_stride, r[i]);
}
#endif

/* dst (cols x rows, row stride dst_stride) = src^T, src (rows x cols, row stride src_stride), in 16 x 16 tiles
   (a tile's reads and writes stay in L1): full tiles in registers where the CPU has AVX-512, the rest (and every
   tile elsewhere) element by element. */
static void transpose(const float *src, int64_t rows, int64_t cols, int64_t src_stride, float *dst,
                      int64_t dst_stride) {
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {
        const int64_t i1 = i0 + 16 < rows ? i0 + 16 : rows;
        for (int64_t j0 = 0; j0 < cols; j0 += 16) {
            const int64_t j1 = j0 + 16 < cols ? j0 + 16 : cols;
#if defined(__AVX512F__)
            if (i1 - i0 == 16 && j1 - j0 == 16) {
                transpose_tile16(src + i0 * src_stride + j0, src_stride, dst + j0 * dst_stride + i0, dst_stride);
                continue;
            }
#endif
            for (int64_t j = j0; j < j1; j++)
                for (int64_t i = i0; i < i1; i++) dst[j * dst_stride + i] = src[i * src_stride + j];
        }
    }
}

/* transpose, for the tests (which hold it to torch's). */
void xarch_transpose(const float *src, int64_t rows, int64_t cols, int64_t src_stride, float *dst,
                     int64_t dst_stride) {
    transpose(src, rows, cols, src_stride, dst, dst_stride);
}

/* The keys (or values) of the current window, transposed: (dim x stride) floats where column j holds row base + j
   of src, for the rows [base, done). The windows only move forward, so each block transposes just the rows its
   window adds; when the buffer is full, the columns still in use move to its front. The buffer is a few windows
   wide (set by the caller), so it stays in cache: transposing into a copy of the whole head made every new column
   a write miss to memory, and a head-sized copy per thread. */
typedef struct {
    float *buffer;
    int64_t stride, base, done;
} Transposed;

/* Rows [lo, hi) of src (n x dim, row stride src_stride) transposed: a pointer to (dim x (hi - lo)) floats, row stride
   t->stride. Needs hi - lo <= t->stride, and lo, hi no smaller than in the call before. The rows the next window
   will add are prefetched: nothing else reads them before it, so they would come from memory while it waits. */
static const float *transposed_window(Transposed *t, const float *src, int64_t src_stride, int64_t n, int64_t dim,
                                      int64_t lo, int64_t hi) {
    if (hi - t->base > t->stride) { /* no room for the new rows: move the columns from lo on to the front */
        const int64_t keep = t->done > lo ? t->done - lo : 0;
        for (int64_t d = 0; d < dim; d++)
            memmove(t->buffer + d * t->stride, t->buffer + d * t->stride + (lo - t->base), sizeof(float) * keep);
        t->base = lo;
        if (t->done < lo) t->done = lo;
    }
    if (hi > t->done) {
        const int64_t added = hi - t->done, next = hi + added < n ? hi + added : n;
        transpose(src + t->done * src_stride, added, dim, src_stride, t->buffer + (t->done - t->base), t->stride);
        t->done = hi;
        for (int64_t r = hi; r < next; r++)
            for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(src + r * src_stride + d);
    }
    return t->buffer + (lo - t->base);
}

/* Dropout keeps a probability when a hash of (seed, head, query, key) clears p * 2^32. Pure function of those, so
   the backward draws the forward's mask again without storing it, whatever the blocks or threads. A band key is
   named by its slot, extra key g by EXTRA_KEY + g. The hash is the "lowbias32" integer finaliser (C. Wellons). */
#define EXTRA_KEY 0x80000000u
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

static inline uint32_t row_hash(const Head *h, int64_t query) {
    return mix32((uint32_t)h->seed ^ mix32((uint32_t)(h->seed >> 32) ^ mix32((uint32_t)h->stream ^
                                                                               mix32((uint32_t)query))));
}

/* 1 / (1 - p) where (row, key) is kept, else 0. */
static inline float keep_scale(uint32_t row, uint32_t key, uint32_t threshold, float scale) {
    return mix32(row ^ (key * 0x9e3779b9u)) >= threshold ? scale : 0.f;
}

/* Multiply a block row's band and extra columns by their keep_scale (the key of band column j is slot first + j). */
static void apply_dropout(const Head *h, int64_t query, int64_t first, float *row) {
    const uint32_t hrow = row_hash(h, query), threshold = (uint32_t)(h->dropout * 4294967296.0);
    const float scale = (float)(1.0 / (1.0 - h->dropout));
#pragma omp simd
    for (int64_t j = 0; j < h->span; j++) row[j] *= keep_scale(hrow, (uint32_t)(first + j), threshold, scale);
    for (int64_t j = 0; j < h->extra; j++)
        row[h->span + j] *= keep_scale(hrow, EXTRA_KEY + (uint32_t)j, threshold, scale);
}

static int begin(void) { return SET_THREADS_LOCAL ? SET_THREADS_LOCAL(1) : 0; }
static void end(int previous) { if (SET_THREADS_LOCAL) SET_THREADS_LOCAL(previous); }

/* out = softmax(scores) [v window | extra values], block by block. The exponentials multiply the values unscaled
   and each output row is divided by its sum afterwards: a pass over dim numbers instead of span + extra. */
int xarch_banded_forward(Head *h) {
    if (!SGEMM) return -1;
    int previous = begin();
    const int64_t span = h->span, g = h->extra, ld = span + g, dim = h->dim;
    Transposed keys = {h->kt, h->t_stride, 0, 0};
    for (int64_t c = 0; c * h->block < h->n; c++) {
        const Block b = block_at(h, c);
        const float *kt = transposed_window(&keys, h->k, h->k_stride, h->n, dim, b.lo, b.hi);
        float *s = h->scores;
        block_scores(h, c, &b, kt, s);
        for (int64_t r = 0; r < b.rows; r++) {
            float *row = s + r * ld;
            float max = row[0], sum = 0.f;
#pragma omp simd reduction(max : max)
            for (int64_t j = 0; j < ld; j++) max = row[j] > max ? row[j] : max;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < ld; j++) {
                row[j] = exp_nonpositive(row[j] - max);
                sum += row[j];
            }
            h->row_max[b.q0 + r] = max;
            h->row_inv_sum[b.q0 + r] = 1.f / sum;
            if (h->dropout > 0) apply_dropout(h, b.q0 + r, b.q0 - h->left, row); /* after the sum: it normalises */
        }
        float *o = h->out + b.q0 * h->out_stride;
        gemm('N', 'N', b.rows, dim, b.hi - b.lo, 1.f, s + b.j0, ld, h->v + b.lo * h->v_stride, h->v_stride, 0.f, o,
             h->out_stride);
        if (g) gemm('N', 'N', b.rows, dim, g, 1.f, s + span, ld, h->ev, dim, 1.f, o, h->out_stride);
        for (int64_t r = 0; r < b.rows; r++) {
            const float inv = h->row_inv_sum[b.q0 + r];
#pragma omp simd
            for (int64_t d = 0; d < dim; d++) o[r * h->out_stride + d] *= inv;
        }
    }
    end(previous);
    return 0;
}

/* Gradients of one head: dS = P o (dP - rowsum(dP o P)), dQ = dS K, dK += dS^T Q, dV += P^T dO (the scale of the
   scores folded into the matmuls). The windows of consecutive blocks overlap; the blocks run in order, so each
   key's gradient adds up in a fixed order, whatever the threads. */
int xarch_banded_backward(Head *h) {
    if (!SGEMM) return -1;
    int previous = begin();
    const int64_t span = h->span, g = h->extra, ld = span + g, dim = h->dim;
    const float scale = (float)h->scale;
    int64_t written = 0; /* key rows [0, written) of grad_k and grad_v hold sums; the windows only move forward */
    Transposed keys = {h->kt, h->t_stride, 0, 0}, values = {h->vt, h->t_stride, 0, 0};
    for (int64_t c = 0; c * h->block < h->n; c++) {
        const Block b = block_at(h, c);
        const int64_t w = b.hi - b.lo;
        const float *kt = transposed_window(&keys, h->k, h->k_stride, h->n, dim, b.lo, b.hi);
        const float *vt = transposed_window(&values, h->v, h->v_stride, h->n, dim, b.lo, b.hi);
        for (; written < b.hi; written++) { /* rows first reached by this window start from zero */
            memset(h->grad_k + written * h->grad_k_stride, 0, sizeof(float) * dim);
            memset(h->grad_v + written * h->grad_v_stride, 0, sizeof(float) * dim);
        }
        float *p = h->scores, *dp = h->grad_scores;
        block_scores(h, c, &b, kt, p);
        const float *q = h->q + b.q0 * h->q_stride, *go = h->grad_out + b.q0 * h->grad_out_stride;
        int64_t go_ld = h->grad_out_stride;
        if (h->grad_out_block) {
            float *gathered = h->grad_out_block;
            const int64_t row_stride = h->grad_out_stride, col_stride = h->grad_out_col_stride;
            for (int64_t r = 0; r < b.rows; r++)
                for (int64_t d = 0; d < dim; d++) gathered[r * dim + d] = go[r * row_stride + d * col_stride];
            go = gathered;
            go_ld = dim;
        }
        zero_outside(h, &b, dp, ld);
        gemm('N', 'N', b.rows, w, dim, 1.f, go, go_ld, vt, h->t_stride, 0.f, dp + b.j0, ld);
        if (g) gemm('N', 'T', b.rows, g, dim, 1.f, go, go_ld, h->ev, dim, 0.f, dp + span, ld);
        for (int64_t r = 0; r < b.rows; r++) { /* P from the saved max and 1 / sum, and rowsum(dP o P), in one pass */
            float *prow = p + r * ld, *dprow = dp + r * ld;
            const float max = h->row_max[b.q0 + r], inv = h->row_inv_sum[b.q0 + r];
            /* with dropout the matmul gave the gradient of the kept probabilities: through the mask to P's */
            if (h->dropout > 0) apply_dropout(h, b.q0 + r, b.q0 - h->left, dprow);
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < ld; j++) {
                prow[j] = exp_nonpositive(prow[j] - max) * inv;
                dot += dprow[j] * prow[j];
            }
#pragma omp simd
            for (int64_t j = 0; j < ld; j++) dprow[j] = prow[j] * (dprow[j] - dot);
            if (h->dropout > 0) apply_dropout(h, b.q0 + r, b.q0 - h->left, prow); /* dV takes the kept ones */
            if (h->grad_band_bias) { /* a bias added to the scores has the scores' gradient */
                float *gb = h->grad_band_bias + (h->block - 1 - r);
#pragma omp simd
                for (int64_t j = 0; j < span; j++) gb[j] += dprow[j];
            }
            if (h->grad_extra_bias) memcpy(h->grad_extra_bias + (b.q0 + r) * g, dprow + span, sizeof(float) * g);
        }
        float *dq = h->grad_q + b.q0 * h->grad_q_stride;
        gemm('N', 'N', b.rows, dim, w, scale, dp + b.j0, ld, h->k + b.lo * h->k_stride, h->k_stride, 0.f, dq,
             h->grad_q_stride);
        gemm('T', 'N', w, dim, b.rows, scale, dp + b.j0, ld, q, h->q_stride, 1.f, h->grad_k + b.lo * h->grad_k_stride,
             h->grad_k_stride);
        gemm('T', 'N', w, dim, b.rows, 1.f, p + b.j0, ld, go, go_ld, 1.f,
             h->grad_v + b.lo * h->grad_v_stride, h->grad_v_stride);
        if (g) {
            gemm('N', 'N', b.rows, dim, g, scale, dp + span, ld, h->ek, dim, 1.f, dq, h->grad_q_stride);
            gemm('T', 'N', g, dim, b.rows, scale, dp + span, ld, q, h->q_stride, 1.f, h->grad_ek, dim);
            gemm('T', 'N', g, dim, b.rows, 1.f, p + span, ld, go, go_ld, 1.f, h->grad_ev, dim);
        }
    }
    end(previous);
    return 0;
}
