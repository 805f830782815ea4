/* A register-blocked GEMM for the small per-location products of a locally connected layer.
 *
 * At batch 32 every product is tiny (32 x 75 x 16 for a 5x5x3 field and 16 filters), and
 * BLAS spends more time packing and dispatching than multiplying.  This kernel keeps a block
 * of R rows x V vectors of C in registers and streams over k: V loads of B and R broadcasts
 * of A for every R*V fused multiply-adds.
 *
 *   C[i, 0:n] = beta * C[i, 0:n] + sum_q A(i, q) * B[q*ldb + 0:n] (+ bias[0:n], then relu),
 *   n % VW == 0 (DBMPI_VW)
 *
 * with q = sg*k + kk over nseg segments of k values, A(i, q) = A[i*rsa + sg*sstride + kk*csa].
 * Segments let A be a patch of an image read in place (k rows of k*c contiguous values),
 * strides let A be transposed for free.  The vector width VW is 16 floats where the compiler
 * targets AVX-512 (32 registers: 12 x 2 blocks) and 8 floats otherwise (AVX2, 16 registers:
 * 6 x 2 blocks, the classic 6 x 16 sgemm kernel).
 */
#ifndef DBMPI_MICROGEMM_H
#define DBMPI_MICROGEMM_H

#include <stddef.h>
#include <string.h>

#ifdef __AVX512F__
#define DBMPI_VW 16
#define DBMPI_RB 12
#else
#define DBMPI_VW 8
#define DBMPI_RB 6
#endif

typedef float dbmpi_vec __attribute__((vector_size(4 * DBMPI_VW)));
typedef int dbmpi_ivec __attribute__((vector_size(4 * DBMPI_VW)));

static inline dbmpi_vec dbmpi_ld(const float *p) { dbmpi_vec v; memcpy(&v, p, sizeof v); return v; }
static inline void dbmpi_st(float *p, dbmpi_vec v) { memcpy(p, &v, sizeof v); }

#define DBMPI_BLOCK(NAME, R, V)                                                              \
static inline void NAME(int nseg, ptrdiff_t sstride, int k, const float *A, ptrdiff_t rsa,   \
        ptrdiff_t csa, const float *B, ptrdiff_t ldb, float beta, float *C, ptrdiff_t ldc,   \
        const float *bias, int relu, const float *pf, int npf)                               \
{                                                                                            \
    dbmpi_vec acc[R][V];                                                                     \
    _Pragma("GCC unroll 16")                                                                 \
    for (int r = 0; r < R; r++)                                                              \
        _Pragma("GCC unroll 4")                                                              \
        for (int v = 0; v < V; v++)                                                          \
            acc[r][v] = (dbmpi_vec){0};                                                      \
    for (int sg = 0; sg < nseg; sg++)                                                        \
    for (int kk = 0; kk < k; kk++) {                                                         \
        if (sg * k + kk < npf) /* one line of what comes next, into L2 */                    \
            __builtin_prefetch(pf + 16 * (sg * k + kk), 0, 1);                               \
        dbmpi_vec b[V];                                                                      \
        const float *bk = B + (sg * k + kk) * ldb;                                           \
        _Pragma("GCC unroll 4")                                                              \
        for (int v = 0; v < V; v++) b[v] = dbmpi_ld(bk + DBMPI_VW * v);                      \
        const float *a = A + sg * sstride + kk * csa;                                        \
        _Pragma("GCC unroll 16")                                                             \
        for (int r = 0; r < R; r++) {                                                        \
            const float s = a[r * rsa];  /* scalar * vector: vbroadcastss m32 */\
            _Pragma("GCC unroll 4")                                                          \
            for (int v = 0; v < V; v++) acc[r][v] += s * b[v];                               \
        }                                                                                    \
    }                                                                                        \
    _Pragma("GCC unroll 16")                                                                 \
    for (int r = 0; r < R; r++)                                                              \
        _Pragma("GCC unroll 4")                                                              \
        for (int v = 0; v < V; v++) {                                                        \
            float *c = C + r * ldc + DBMPI_VW * v;                                           \
            dbmpi_vec out = beta != 0.0f ? acc[r][v] + beta * dbmpi_ld(c) : acc[r][v];       \
            if (bias) out += dbmpi_ld(bias + DBMPI_VW * v);                                  \
            if (relu) out = (dbmpi_vec)((dbmpi_ivec)out & (out > 0));                        \
            dbmpi_st(c, out);                                                                \
        }                                                                                    \
}

DBMPI_BLOCK(dbmpi_block_full_2, DBMPI_RB, 2)
DBMPI_BLOCK(dbmpi_block_full_1, DBMPI_RB, 1)
#if DBMPI_RB > 6
DBMPI_BLOCK(dbmpi_block_6_2, 6, 2)
DBMPI_BLOCK(dbmpi_block_6_1, 6, 1)
#endif
DBMPI_BLOCK(dbmpi_block_4_2, 4, 2)
DBMPI_BLOCK(dbmpi_block_4_1, 4, 1)
DBMPI_BLOCK(dbmpi_block_3_2, 3, 2)
DBMPI_BLOCK(dbmpi_block_3_1, 3, 1)
DBMPI_BLOCK(dbmpi_block_2_2, 2, 2)
DBMPI_BLOCK(dbmpi_block_2_1, 2, 1)
DBMPI_BLOCK(dbmpi_block_1_2, 1, 2)
DBMPI_BLOCK(dbmpi_block_1_1, 1, 1)

typedef void (*dbmpi_block_fn)(int, ptrdiff_t, int, const float *, ptrdiff_t, ptrdiff_t,
                               const float *, ptrdiff_t, float, float *, ptrdiff_t,
                               const float *, int, const float *, int);

/* Rows left after the full blocks are done in blocks of 4, 3, 2 or 1 (5 = 3 + 2): few rows
 * per block leave too few independent accumulators to hide the FMA latency, so the tail is
 * split to keep every block as tall as possible. */
static inline int dbmpi_tail_rows(int rem)
{
#if DBMPI_RB > 6
    if (rem >= 6) return 6;
#endif
    return rem >= 5 ? 3 : rem;
}

static inline dbmpi_block_fn dbmpi_block_for(int rows, int two)
{
    switch (rows) {
#if DBMPI_RB > 6
    case 6: return two ? dbmpi_block_6_2 : dbmpi_block_6_1;
#endif
    case 4: return two ? dbmpi_block_4_2 : dbmpi_block_4_1;
    case 3: return two ? dbmpi_block_3_2 : dbmpi_block_3_1;
    case 2: return two ? dbmpi_block_2_2 : dbmpi_block_2_1;
    default: return two ? dbmpi_block_1_2 : dbmpi_block_1_1;
    }
}

/* pf, pfn: pfn floats to prefetch into L2 while multiplying, a line per k step, shared out
 * over the blocks (the next product's operand, which would otherwise arrive on demand). */
static inline void dbmpi_mgemm_seg(int m, int n, int nseg, ptrdiff_t sstride, int k,
                                   const float *A, ptrdiff_t rsa, ptrdiff_t csa,
                                   const float *B, ptrdiff_t ldb, float beta, float *C,
                                   ptrdiff_t ldc, const float *bias, int relu,
                                   const float *pf, ptrdiff_t pfn)
{
    ptrdiff_t lines = pf ? (pfn + 15) / 16 : 0;
    /* spread over all blocks: a burst would overrun the outstanding-miss queues */
    int blocks = ((n + 2 * DBMPI_VW - 1) / (2 * DBMPI_VW)) * ((m + DBMPI_RB - 1) / DBMPI_RB);
    ptrdiff_t share = (lines + blocks - 1) / blocks;
    int steps = share < nseg * k ? (int)share : nseg * k;
    for (int j = 0; j < n; ) {
        int two = n - j >= 2 * DBMPI_VW;
        int i = 0;
        while (i < m) {
            int left = m - i;   /* 7 = 4 + 3 and 8 = 4 + 4 beat 6 + 1 and 6 + 2 */
            int r = left == DBMPI_RB || left >= DBMPI_RB + 3 ? DBMPI_RB
                    : left > DBMPI_RB ? 4 : dbmpi_tail_rows(left);
            int npf = lines < steps ? (int)lines : steps;
            dbmpi_block_fn blk = r == DBMPI_RB ? (two ? dbmpi_block_full_2 : dbmpi_block_full_1)
                                               : dbmpi_block_for(r, two);
            blk(nseg, sstride, k, A + i * rsa, rsa, csa, B + j, ldb, beta, C + i * ldc + j, ldc,
                bias ? bias + j : bias, relu, pf, npf);
            pf += 16 * npf;
            lines -= npf;
            i += r;
        }
        j += two ? 2 * DBMPI_VW : DBMPI_VW;
    }
}

/* The plain product: one segment. */
static inline void dbmpi_mgemm(int m, int n, int k, const float *A, ptrdiff_t rsa,
                               ptrdiff_t csa, const float *B, ptrdiff_t ldb, float beta,
                               float *C, ptrdiff_t ldc, const float *pf, ptrdiff_t pfn)
{
    dbmpi_mgemm_seg(m, n, 1, 0, k, A, rsa, csa, B, ldb, beta, C, ldc, NULL, 0, pf, pfn);
}

/* A thin product as dot products: y[s*ldy + t] = beta * y[...] + sum_q x[s*ldx + q] * w[t*ldw + q]
 * for s < n samples, t < u units, q < k.  For a layer of few units (a softmax's classes, or a
 * partition's share of them) BLAS, whose kernels vectorize along the output's rows, runs at a
 * fraction of its speed: here both operands are read along k, their contiguous direction, a
 * block of S samples x T units of vector accumulators at a time, reduced at the end. */
#define DBMPI_DOTS(NAME, S, T)                                                               \
static inline void NAME(int k, const float *x, ptrdiff_t ldx, const float *w, ptrdiff_t ldw, \
                        float beta, float *y, ptrdiff_t ldy)                                 \
{                                                                                            \
    dbmpi_vec acc[S][T];                                                                     \
    float tail[S][T];                                                                        \
    _Pragma("GCC unroll 4")                                                                  \
    for (int s = 0; s < S; s++)                                                              \
        _Pragma("GCC unroll 4")                                                              \
        for (int t = 0; t < T; t++) { acc[s][t] = (dbmpi_vec){0}; tail[s][t] = 0.0f; }       \
    int q = 0;                                                                               \
    for (; q + DBMPI_VW <= k; q += DBMPI_VW) {                                               \
        dbmpi_vec a[S], b[T];                                                                \
        _Pragma("GCC unroll 4")                                                              \
        for (int s = 0; s < S; s++) a[s] = dbmpi_ld(x + s * ldx + q);                        \
        _Pragma("GCC unroll 4")                                                              \
        for (int t = 0; t < T; t++) b[t] = dbmpi_ld(w + t * ldw + q);                        \
        _Pragma("GCC unroll 4")                                                              \
        for (int s = 0; s < S; s++)                                                          \
            _Pragma("GCC unroll 4")                                                          \
            for (int t = 0; t < T; t++) acc[s][t] += a[s] * b[t];                            \
    }                                                                                        \
    for (; q < k; q++)                                                                       \
        for (int s = 0; s < S; s++)                                                          \
            for (int t = 0; t < T; t++) tail[s][t] += x[s * ldx + q] * w[t * ldw + q];      \
    for (int s = 0; s < S; s++)                                                              \
        for (int t = 0; t < T; t++) {                                                        \
            float v = tail[s][t];                                                            \
            for (int l = 0; l < DBMPI_VW; l++) v += acc[s][t][l];                            \
            float *o = y + s * ldy + t;                                                      \
            *o = beta != 0.0f ? v + beta * *o : v;                                           \
        }                                                                                    \
}

/* Blocks of 4 samples x T units hold 4T accumulators and T vectors of w (x is read as the
 * FMA's memory operand): T up to 4 in AVX-512's 32 registers, up to 3 in AVX2's 16. */
#ifdef __AVX512F__
#define DBMPI_DOTS_T 4
DBMPI_DOTS(dbmpi_dots_4_4, 4, 4)
DBMPI_DOTS(dbmpi_dots_1_4, 1, 4)
#else
#define DBMPI_DOTS_T 3
#endif
DBMPI_DOTS(dbmpi_dots_4_3, 4, 3)
DBMPI_DOTS(dbmpi_dots_4_2, 4, 2)
DBMPI_DOTS(dbmpi_dots_4_1, 4, 1)
DBMPI_DOTS(dbmpi_dots_1_3, 1, 3)
DBMPI_DOTS(dbmpi_dots_1_2, 1, 2)
DBMPI_DOTS(dbmpi_dots_1_1, 1, 1)

typedef void (*dbmpi_dots_fn)(int, const float *, ptrdiff_t, const float *, ptrdiff_t, float,
                              float *, ptrdiff_t);

/* Samples in fours (one at a time for the rest); the units of each in blocks as even as the
 * register budget allows (10 = 3 + 3 + 2 + 2, not 3 + 3 + 3 + 1: a 1-unit block does one
 * FMA per load), over k in chunks whose rows of x and w stay in L1 while every unit is
 * taken: x streams from memory once. */
static inline void dbmpi_dots(int n, int u, int k, const float *x, ptrdiff_t ldx,
                              const float *w, ptrdiff_t ldw, float beta, float *y,
                              ptrdiff_t ldy)
{
#ifdef __AVX512F__
    static const dbmpi_dots_fn four[5] = {0, dbmpi_dots_4_1, dbmpi_dots_4_2, dbmpi_dots_4_3,
                                          dbmpi_dots_4_4};
    static const dbmpi_dots_fn one[5] = {0, dbmpi_dots_1_1, dbmpi_dots_1_2, dbmpi_dots_1_3,
                                         dbmpi_dots_1_4};
#else
    static const dbmpi_dots_fn four[4] = {0, dbmpi_dots_4_1, dbmpi_dots_4_2, dbmpi_dots_4_3};
    static const dbmpi_dots_fn one[4] = {0, dbmpi_dots_1_1, dbmpi_dots_1_2, dbmpi_dots_1_3};
#endif
    enum { KC = 512 };      /* 4 rows of x and 4 of w, 2 KB each: in L1 for all the units */
    int blocks = (u + DBMPI_DOTS_T - 1) / DBMPI_DOTS_T;
    for (int s = 0; s < n; ) {
        int rows = n - s >= 4 ? 4 : 1;
        for (int q = 0; q < k || q == 0; q += KC) {
            int kc = k - q < KC ? k - q : KC;
            for (int i = 0, t = 0; i < blocks; i++) {
                int cols = (u - t) / (blocks - i) + ((u - t) % (blocks - i) != 0);
                (rows == 4 ? four : one)[cols](kc, x + s * ldx + q, ldx, w + t * ldw + q, ldw,
                                               q == 0 ? beta : 1.0f, y + s * ldy + t, ldy);
                t += cols;
            }
        }
        s += rows;
    }
}

#endif
