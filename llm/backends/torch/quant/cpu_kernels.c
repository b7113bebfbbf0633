/* Weight-only quantized matrix products on the CPU with float32 activations.

   A weight W [N, K] is stored in blocks of 32 columns; block b of row n holds 32 codes c and one
   float32 scale s[n, b] and zero z[n, b], and stands for the float32 weights

       w[n, 32 b + j] = fma(c[j], s[n, b], z[n, b])

   (exactly the dequantized GGUF value for the formats mapped onto it: see code_groups.py).
   Three code layouts:
     q4: 16 bytes per block, byte j = c[j] | c[j + 16] << 4 (c in 0..15), ggml's nibble order;
     q8: 32 int8 codes per block;
     q6: 32 int8 codes per block (Q6_K's q - 32) and a scale per 16 columns, no zero: the scale
         plane holds the first half's, the zero plane the second half's,
         w[n, 32 b + j] = c[j] * s[n, b] (j < 16), c[j] * z[n, b] (j >= 16).

   q{4,6,8}_matmul: y[M, N] = x[M, K] @ W^T, x and y row-major float32.
   Each weight is formed once in float32 as above and multiplied into up to 4 rows of x at a
   time, with float32 accumulators (16 lanes per half block, summed at the end of the row); q4
   forms a block's 16 possible weights once (fma(0..15, s, z)) and looks its 32 codes up in them.
   Rows of W are split over OpenMP threads (the caller's omp_get_max_threads():
   torch.set_num_threads). q{4,6,8}_dequant: W -> float32 [N, K] (prompts, which then run a
   dense matmul).

   Measured on the 2-core AVX-512 CI machine (2026-12-03): the decode step is bound by these
   instructions more than by memory: the table lookup for q4 instead of convert + fma saved 2-4%,
   float16 scales (a Q4_1 block in 20 bytes instead of 24) cost 5-10% for their conversion.
   2026-12-04: out of cache one core's demand misses do not overlap the arithmetic (3.2-4.4 ns
   per block and row against 1.8 in cache, 5-6 GB/s against the core's 11-13 GB/s streaming
   read), so the matmuls prefetch rows of W a few groups ahead: 2.3 ns, -20-30% per matmul.

   Built at first use by native.py with -O3 -march=native -fopenmp; the AVX-512 path is taken
   where the compiler targets it, portable loops elsewhere. */

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 32
#define MR 4 /* rows of x per pass over a row of W */

/* One block's 32 weights, one at a time (dequantization; the portable matmul). */
static inline void q4_block_scalar(const uint8_t *c, float s, float z, float *w) {
    for (int j = 0; j < 16; j++) {
        w[j] = (float)(c[j] & 15) * s + z;
        w[j + 16] = (float)(c[j] >> 4) * s + z;
    }
}

static inline void q8_block_scalar(const int8_t *c, float s, float z, float *w) {
    for (int j = 0; j < 32; j++) w[j] = (float)c[j] * s + z;
}

/* q6: s scales columns 0..15, z (the zero plane) columns 16..31. */
static inline void q6_block_scalar(const int8_t *c, float s, float z, float *w) {
    for (int j = 0; j < 16; j++) {
        w[j] = (float)c[j] * s;
        w[j + 16] = (float)c[j + 16] * z;
    }
}


typedef uint16_t half; /* IEEE float16 bits */

/* float16 -> float32, exact. */
static inline float half_to_float(half h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* n float16 values -> float32 (F16C 16 at a time where the compiler targets AVX-512). */
static inline void widen(const half *src, float *dst, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i + 8 <= n; i += 8) /* e.g. K = 576: 4 rows of 18 scales are 4 x 16 + 8 */
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

/* Ask for `bytes` from p into the cache ahead of use. One core's demand loads alone reach about
   half the memory bandwidth here (the kernel's arithmetic does not overlap the misses), so the
   matmuls fetch rows of W a few groups ahead of the rows they compute. */
#define AHEAD 4 /* groups of rows (4 at M = 1, 2 otherwise) ahead */
static inline void prefetch(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

/* Rows [row, row + rows) of a q4 / q8 matrix [N, K] (codes, scale and zero planes with `sb`
   bytes per scale) into the cache, if they exist. */
#define PREFETCH_ROWS(codes, s, z, row, rows, N, nb, BYTES, sb)                                 \
    do {                                                                                         \
        if ((row) + (rows) <= (N)) {                                                             \
            prefetch((codes) + (row) * (nb) * (BYTES), (rows) * (nb) * (BYTES));                 \
            prefetch((s) + (row) * (nb), (rows) * (nb) * (sb));                                  \
            prefetch((z) + (row) * (nb), (rows) * (nb) * (sb));                                  \
        }                                                                                        \
    } while (0)

#if defined(__AVX512F__)

/* The 32 weights of one block as two vectors of 16 (elements 0..15 and 16..31). */
static inline void q4_block(const uint8_t *c, float s, float z, __m512 *lo, __m512 *hi) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(z));
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
    *lo = _mm512_permutexvar_ps(v, table); /* uses the index's low 4 bits: c[j] & 15 */
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}

static inline void q8_block(const int8_t *c, float s, float z, __m512 *lo, __m512 *hi) {
    __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
    __m512i a = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c));
    __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + 16)));
    *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), vs, vz);
    *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), vs, vz);
}

static inline void q6_block(const int8_t *c, float s, float z, __m512 *lo, __m512 *hi) {
    __m512i a = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c));
    __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + 16)));
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(s));
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(b), _mm512_set1_ps(z));
}

/* One block's 32 weights stored to w (dequantization). */
static inline void q4_block_out(const uint8_t *c, float s, float z, float *w) {
    __m512 lo, hi;
    q4_block(c, s, z, &lo, &hi);
    _mm512_storeu_ps(w, lo);
    _mm512_storeu_ps(w + 16, hi);
}

static inline void q8_block_out(const int8_t *c, float s, float z, float *w) {
    __m512 lo, hi;
    q8_block(c, s, z, &lo, &hi);
    _mm512_storeu_ps(w, lo);
    _mm512_storeu_ps(w + 16, hi);
}

static inline void q6_block_out(const int8_t *c, float s, float z, float *w) {
    __m512 lo, hi;
    q6_block(c, s, z, &lo, &hi);
    _mm512_storeu_ps(w, lo);
    _mm512_storeu_ps(w + 16, hi);
}

/* Rows n and n2 of W (n2 == n for a lone last row) against rows 0..mr of x; NAME##_mr inlined
   twice, once with mr the constant MR (a batch's full groups of rows: no per-row branches in the
   loop over K) and once with mr as given (the last group). */
#define ROWS_KERNEL(NAME, CT, BYTES, DECODE)                                                     \
    static inline __attribute__((always_inline)) void NAME##_mr(                                 \
        const float *x, int64_t K, const int mr, const CT *c1, const CT *c2, const float *s1,    \
        const float *z1, const float *s2, const float *z2, float *out1, float *out2,             \
        int64_t ld1, int64_t ld2) {                                                              \
        __m512 a1[MR][2], a2[MR][2];                                                             \
        for (int m = 0; m < MR; m++)                                                             \
            a1[m][0] = a1[m][1] = a2[m][0] = a2[m][1] = _mm512_setzero_ps();                     \
        int64_t nb = K / BLOCK;                                                                  \
        for (int64_t b = 0; b < nb; b++) {                                                       \
            __m512 w1l, w1h, w2l, w2h;                                                           \
            DECODE(c1 + b * BYTES, s1[b], z1[b], &w1l, &w1h);                                    \
            DECODE(c2 + b * BYTES, s2[b], z2[b], &w2l, &w2h);                                    \
            _Pragma("GCC unroll 4")                                                              \
            for (int m = 0; m < MR; m++) {                                                       \
                if (m < mr) {                                                                    \
                    const float *xm = x + m * K + b * BLOCK;                                     \
                    __m512 xl = _mm512_loadu_ps(xm), xh = _mm512_loadu_ps(xm + 16);              \
                    a1[m][0] = _mm512_fmadd_ps(xl, w1l, a1[m][0]);                               \
                    a1[m][1] = _mm512_fmadd_ps(xh, w1h, a1[m][1]);                               \
                    a2[m][0] = _mm512_fmadd_ps(xl, w2l, a2[m][0]);                               \
                    a2[m][1] = _mm512_fmadd_ps(xh, w2h, a2[m][1]);                               \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int m = 0; m < mr; m++) {                                                           \
            out1[m * ld1] = _mm512_reduce_add_ps(_mm512_add_ps(a1[m][0], a1[m][1]));             \
            out2[m * ld2] = _mm512_reduce_add_ps(_mm512_add_ps(a2[m][0], a2[m][1]));             \
        }                                                                                        \
    }                                                                                            \
    static void NAME(const float *x, int64_t K, int mr, const CT *c1, const CT *c2,              \
                     const float *s1, const float *z1, const float *s2, const float *z2,         \
                     float *out1, float *out2, int64_t ld1, int64_t ld2) {                       \
        if (mr == MR)                                                                            \
            NAME##_mr(x, K, MR, c1, c2, s1, z1, s2, z2, out1, out2, ld1, ld2);                   \
        else                                                                                     \
            NAME##_mr(x, K, mr, c1, c2, s1, z1, s2, z2, out1, out2, ld1, ld2);                   \
    }

/* One row of x against rows n..n+4 of W: 8 independent accumulators, no branches (decode's
   common case; 1.8x faster than the pair kernel above at M = 1, measured). */
#define ROWS4_KERNEL(NAME, CT, BYTES, DECODE)                                                    \
    static inline void NAME(const float *x, int64_t K, const CT *c, const float *s,             \
                            const float *z, float *out) {                                        \
        int64_t nb = K / BLOCK;                                                                  \
        __m512 a[4][2];                                                                          \
        for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();                     \
        for (int64_t b = 0; b < nb; b++) {                                                       \
            __m512 xl = _mm512_loadu_ps(x + b * BLOCK), xh = _mm512_loadu_ps(x + b * BLOCK + 16);\
            _Pragma("GCC unroll 4")                                                              \
            for (int r = 0; r < 4; r++) {                                                        \
                __m512 lo, hi;                                                                   \
                DECODE(c + (r * nb + b) * BYTES, s[r * nb + b], z[r * nb + b], &lo, &hi);        \
                a[r][0] = _mm512_fmadd_ps(xl, lo, a[r][0]);                                      \
                a[r][1] = _mm512_fmadd_ps(xh, hi, a[r][1]);                                      \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));\
    }

#else /* portable: the compiler vectorizes the 32-lane loops as it can */
#define q4_block_out q4_block_scalar
#define q8_block_out q8_block_scalar
#define q6_block_out q6_block_scalar

#define ROWS_KERNEL(NAME, CT, BYTES, DECODE)                                                     \
    static inline void NAME(const float *x, int64_t K, int mr, const CT *c1, const CT *c2,       \
                            const float *s1, const float *z1, const float *s2,             \
                            const float *z2,                                                    \
                            float *out1, float *out2, int64_t ld1, int64_t ld2) {               \
        float a1[MR][32] = {{0}}, a2[MR][32] = {{0}};                                            \
        int64_t nb = K / BLOCK;                                                                  \
        for (int64_t b = 0; b < nb; b++) {                                                       \
            float w1[32], w2[32];                                                                \
            DECODE##_scalar(c1 + b * BYTES, s1[b], z1[b], w1);                            \
            DECODE##_scalar(c2 + b * BYTES, s2[b], z2[b], w2);                            \
            for (int m = 0; m < mr; m++) {                                                       \
                const float *xm = x + m * K + b * BLOCK;                                         \
                for (int j = 0; j < 32; j++) {                                                   \
                    a1[m][j] += xm[j] * w1[j];                                                   \
                    a2[m][j] += xm[j] * w2[j];                                                   \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int m = 0; m < mr; m++) {                                                           \
            float t1 = 0, t2 = 0;                                                                \
            for (int j = 0; j < 32; j++) {                                                       \
                t1 += a1[m][j];                                                                  \
                t2 += a2[m][j];                                                                  \
            }                                                                                    \
            out1[m * ld1] = t1;                                                                  \
            out2[m * ld2] = t2;                                                                  \
        }                                                                                        \
    }
/* One row of x against rows n..n+4 of W (the portable path: two pairs). */
#define ROWS4_KERNEL(NAME, CT, BYTES, DECODE)                                                    \
    static inline void NAME(const float *x, int64_t K, const CT *c, const float *s,             \
                            const float *z, float *out) {                                        \
        int64_t nb = K / BLOCK;                                                                  \
        for (int r = 0; r < 4; r++) {                                                            \
            float w[BLOCK], acc[BLOCK] = {0};                                                    \
            for (int64_t b = 0; b < nb; b++) {                                                   \
                DECODE##_scalar(c + (r * nb + b) * BYTES, s[r * nb + b], z[r * nb + b], w);      \
                for (int j = 0; j < BLOCK; j++) acc[j] += x[b * BLOCK + j] * w[j];               \
            }                                                                                    \
            float t = 0;                                                                         \
            for (int j = 0; j < BLOCK; j++) t += acc[j];                                         \
            out[r] = t;                                                                          \
        }                                                                                        \
    }
#endif

/* y[M, N] = x[M, K] @ W^T for rows [n0, n1) of W, scales float32; K a multiple of 32. */
#define MATMUL_ROWS(Q, CT, BYTES)                                                                \
    ROWS_KERNEL(Q##_rows, CT, BYTES, Q##_block)                                 \
    static inline void Q##_pair(const float *x, int64_t M, int64_t K, const CT *codes,          \
                                const float *s1, const float *z1, const float *s2,              \
                                const float *z2, int64_t N, int64_t n1, int64_t n2, float *y) { \
        int64_t nb = K / BLOCK;                                                                  \
        for (int64_t m0 = 0; m0 < M; m0 += MR) {                                                 \
            int mr = M - m0 < MR ? (int)(M - m0) : MR;                                           \
            float lone[MR];                                                                      \
            float *o2 = n2 != n1 ? y + m0 * N + n2 : lone;                                       \
            Q##_rows(x + m0 * K, K, mr, codes + n1 * nb * BYTES, codes + n2 * nb * BYTES, s1,    \
                     z1, s2, z2, y + m0 * N + n1, o2, N, n2 != n1 ? N : 1);                      \
        }                                                                                        \
    }

/* The exported functions of one code layout. */
#define KERNELS(Q, CT, BYTES)                                                                    \
    MATMUL_ROWS(Q, CT, BYTES)                                                                    \
    ROWS4_KERNEL(Q##_rows4, CT, BYTES, Q##_block)                                                \
    void Q##_matmul(const float *x, int64_t M, int64_t K, const CT *codes, const float *s,  \
                        const float *z, int64_t N, float *y) {                                   \
        int64_t nb = K / BLOCK, pairs = (N + 1) / 2;                                             \
        if (M == 1) { /* rows of W by fours, the last N % 4 by pairs */                          \
            int64_t quads = N / 4;                                                               \
            _Pragma("omp parallel for schedule(static)")                                         \
            for (int64_t q = 0; q < quads; q++) {                                                \
                PREFETCH_ROWS(codes, s, z, 4 * (q + AHEAD), 4, N, nb, BYTES, 4);                 \
                Q##_rows4(x, K, codes + 4 * q * nb * BYTES, s + 4 * q * nb, z + 4 * q * nb,      \
                          y + 4 * q);                                                            \
            }                                                                                    \
            for (int64_t n1 = 4 * quads; n1 < N; n1 += 2) {                                      \
                int64_t n2 = n1 + 1 < N ? n1 + 1 : n1;                                           \
                Q##_pair(x, M, K, codes, s + n1 * nb, z + n1 * nb, s + n2 * nb, z + n2 * nb, N,  \
                         n1, n2, y);                                                             \
            }                                                                                    \
            return;                                                                              \
        }                                                                                        \
        _Pragma("omp parallel for schedule(static)")                                             \
        for (int64_t p = 0; p < pairs; p++) {                                                    \
            int64_t n1 = 2 * p, n2 = n1 + 1 < N ? n1 + 1 : n1;                                   \
            PREFETCH_ROWS(codes, s, z, n1 + 2 * AHEAD, 2, N, nb, BYTES, 4);                      \
            Q##_pair(x, M, K, codes, s + n1 * nb, z + n1 * nb, s + n2 * nb, z + n2 * nb, N, n1,  \
                     n2, y);                                                                     \
        }                                                                                        \
    }                                                                                            \
    void Q##_dequant(const CT *codes, const float *s, const float *z, int64_t N, int64_t K,  \
                         float *out) {                                                           \
        int64_t nb = K / BLOCK;                                                                  \
        _Pragma("omp parallel for schedule(static)")                                             \
        for (int64_t n = 0; n < N; n++)                                                          \
            for (int64_t b = 0; b < nb; b++)                                                     \
                Q##_block_out(codes + (n * nb + b) * BYTES, s[n * nb + b], z[n * nb + b],        \
                              out + n * K + b * BLOCK);                                          \
    }

/* The same with float16 scale and zero (the GGUF's own for Q4_0 / Q4_1 / Q8_0: a Q4_1 block in
   20 bytes instead of 24; the step is memory-bound on one core), widened per group of rows into
   float32 buffers on the stack. */
#define KERNELS_F16(Q, CT, BYTES)                                                                \
    void Q##_matmul_f16(const float *x, int64_t M, int64_t K, const CT *codes, const half *s,   \
                        const half *z, int64_t N, float *y) {                                    \
        int64_t nb = K / BLOCK, quads = M == 1 ? N / 4 : 0;                                      \
        _Pragma("omp parallel for schedule(static)")                                             \
        for (int64_t q = 0; q < quads; q++) {                                                    \
            PREFETCH_ROWS(codes, s, z, 4 * (q + AHEAD), 4, N, nb, BYTES, 2);                     \
            float sb[4 * nb], zb[4 * nb];                                                        \
            widen(s + 4 * q * nb, sb, 4 * nb);                                                   \
            widen(z + 4 * q * nb, zb, 4 * nb);                                                   \
            Q##_rows4(x, K, codes + 4 * q * nb * BYTES, sb, zb, y + 4 * q);                      \
        }                                                                                        \
        int64_t first = 4 * quads, pairs = (N - first + 1) / 2;                                  \
        _Pragma("omp parallel for schedule(static) if (pairs > 8)")                              \
        for (int64_t p = 0; p < pairs; p++) {                                                    \
            int64_t n1 = first + 2 * p, n2 = n1 + 1 < N ? n1 + 1 : n1;                           \
            PREFETCH_ROWS(codes, s, z, n1 + 2 * AHEAD, 2, N, nb, BYTES, 2);                      \
            float sz[4 * nb];                                                                    \
            widen(s + n1 * nb, sz, nb);                                                          \
            widen(z + n1 * nb, sz + nb, nb);                                                     \
            widen(s + n2 * nb, sz + 2 * nb, nb);                                                 \
            widen(z + n2 * nb, sz + 3 * nb, nb);                                                 \
            Q##_pair(x, M, K, codes, sz, sz + nb, sz + 2 * nb, sz + 3 * nb, N, n1, n2, y);       \
        }                                                                                        \
    }                                                                                            \
    void Q##_dequant_f16(const CT *codes, const half *s, const half *z, int64_t N, int64_t K,    \
                         float *out) {                                                           \
        int64_t nb = K / BLOCK;                                                                  \
        _Pragma("omp parallel for schedule(static)")                                             \
        for (int64_t n = 0; n < N; n++)                                                          \
            for (int64_t b = 0; b < nb; b++)                                                     \
                Q##_block_out(codes + (n * nb + b) * BYTES, half_to_float(s[n * nb + b]),        \
                              half_to_float(z[n * nb + b]), out + n * K + b * BLOCK);            \
    }                                                                                            \
    void Q##_take_f16(const CT *codes, const half *s, const half *z, const int64_t *ids,        \
                      int64_t n, int64_t K, float *out) {                                        \
        int64_t nb = K / BLOCK;                                                                  \
        for (int64_t i = 0; i < n; i++)                                                          \
            for (int64_t b = 0; b < nb; b++) {                                                   \
                int64_t g = ids[i] * nb + b;                                                     \
                Q##_block_out(codes + g * BYTES, half_to_float(s[g]), half_to_float(z[g]),       \
                              out + i * K + b * BLOCK);                                          \
            }                                                                                    \
    }

KERNELS(q4, uint8_t, 16)
KERNELS(q8, int8_t, 32)
KERNELS(q6, int8_t, 32)
KERNELS_F16(q4, uint8_t, 16)
KERNELS_F16(q8, int8_t, 32)
KERNELS_F16(q6, int8_t, 32)

/* Rows ids[0..n) of W -> out float32 [n, K] (embedding lookups). */
#define TAKE(Q, CT, BYTES)                                                                       \
    void Q##_take(const CT *codes, const float *s, const float *z, const int64_t *ids,           \
                  int64_t n, int64_t K, float *out) {                                            \
        int64_t nb = K / BLOCK;                                                                  \
        for (int64_t i = 0; i < n; i++)                                                          \
            for (int64_t b = 0; b < nb; b++) {                                                   \
                int64_t g = ids[i] * nb + b;                                                     \
                Q##_block_out(codes + g * BYTES, s[g], z[g], out + i * K + b * BLOCK);           \
            }                                                                                    \
    }

TAKE(q4, uint8_t, 16)
TAKE(q8, int8_t, 32)
TAKE(q6, int8_t, 32)

/* ---- The rest of a float32 decode step (one token per user), so that a layer is a few calls. */

#include <math.h>

/* sum a[i] * b[i] over n, in 16 independent lanes (vectorizable without reassociating). */
static inline float dot(const float *a, const float *b, int64_t n) {
    float lane[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += a[i + l] * b[i + l];
    for (int w = 8; w > 0; w /= 2) /* a tree of lane sums: vector shuffles, not 16 adds */
        for (int l = 0; l < w; l++) lane[l] += lane[l + w];
    float acc = lane[0];
    for (; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* total = x + residual (residual NULL: x), out = total * rsqrt(mean(total^2) + eps) * w;
   rows of H; total is written to total_out (may alias x). */
void add_rms_norm(const float *x, const float *residual, const float *w, float eps, int64_t M,
                  int64_t H, float *total_out, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * H;
        float *t = total_out + m * H, *o = out + m * H;
        for (int64_t i = 0; i < H; i++) t[i] = residual ? xm[i] + residual[m * H + i] : xm[i];
        float ss = dot(t, t, H);
        float r = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t i = 0; i < H; i++) o[i] = t[i] * r * w[i];
    }
}

/* Rotate-half RoPE of one head x[hd] in place with cos/sin rows [hd]. */
static inline void rope_head(float *x, const float *cs, const float *sn, int64_t hd) {
    int64_t half = hd / 2;
    for (int64_t d = 0; d < half; d++) {
        float a = x[d], b = x[d + half];
        x[d] = a * cs[d] - b * sn[d];
        x[d + half] = b * cs[d + half] + a * sn[d + half];
    }
}

#if defined(__AVX512F__)
/* exp(x) for x <= 0, 16 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p a degree-7
   polynomial (Cephes' expf coefficients), within 2 ulp of expf; 0 below -87.3 (underflow).
   Masked lanes compute the same, so a value never depends on where it sits in the vector. */
static inline __m512 exp_neg(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)),
                                  23);
    return _mm512_maskz_mov_ps(~under, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}
#endif

/* out[M, I] = silu(gu[:, :I]) * gu[:, I:] for gu [M, 2I]: silu(g) = g sigmoid(g), the sigmoid
   from e = exp(-|g|) (it never overflows): 1 / (1 + e) for g >= 0, e / (1 + e) below; 16 lanes
   at a time, masked at the end of a row (the same arithmetic for every element). */
void silu_mul(const float *gu, int64_t M, int64_t I, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float *o = out + m * I;
#if defined(__AVX512F__)
        const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
        for (int64_t i = 0; i < I; i += 16) {
            __mmask16 k = I - i >= 16 ? 0xffff : (__mmask16)((1u << (I - i)) - 1);
            __m512 x = _mm512_maskz_loadu_ps(k, g + i);
            __m512 e = exp_neg(_mm512_sub_ps(zero, _mm512_abs_ps(x)));
            __mmask16 pos = _mm512_cmp_ps_mask(x, zero, _CMP_GE_OQ);
            __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(pos, e, one), _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(o + i, k, _mm512_mul_ps(_mm512_mul_ps(x, sig),
                                                          _mm512_maskz_loadu_ps(k, u + i)));
        }
#else
        for (int64_t i = 0; i < I; i++) {
            float x = g[i], e = expf(-fabsf(x));
            o[i] = x * ((x >= 0.0f ? 1.0f : e) / (1.0f + e)) * u[i];
        }
#endif
    }
}

#define ATT_CHUNK 128 /* positions per attention task (fixed: the result depends on it) */
#define ATT_HEADS 4   /* query heads of one KV head handled together (registers) */

/* Floats of the `scores` scratch attention_decode needs: per (user, head) max_len scores, then
   per (user, head, chunk of ATT_CHUNK positions) the chunk's max, sum and hd partial outputs. */
int64_t attention_scratch(int64_t B, int64_t nh, int64_t hd, int64_t max_len) {
    return B * nh * (max_len + (max_len + ATT_CHUNK - 1) / ATT_CHUNK * (hd + 2));
}

/* Heads q[0..G) [G, hd] (all reading KV head g) against positions [t0, t1) of one user: for
   each head i, s[i] [t] = q_i . k_t * scale, then part[i] = (max m, sum l of exp(s - m),
   sum of exp(s - m) v_t [hd]). s rows `ld` apart, part rows `pld` apart. */
static void attend_chunk(const float *q, int G, const float *kpool, const float *vpool,
                         const int64_t *pages, int64_t t0, int64_t t1, int64_t g, int64_t nkv,
                         int64_t hd, int64_t bs, float scale, float *s, int64_t ld, float *part,
                         int64_t pld) {
    const float *krow[ATT_CHUNK], *vrow[ATT_CHUNK]; /* rows of t0 + i, one division per page */
    for (int64_t t = t0; t < t1; t++) {
        int64_t at = ((pages[t / bs] * nkv + g) * bs + t % bs) * hd;
        krow[t - t0] = kpool + at;
        vrow[t - t0] = vpool + at;
    }
#if defined(__AVX512F__)
    if (hd % 16 == 0) {
        int64_t n = t1 - t0;
        for (int64_t t = t0; t < t1; t++) {
            if (t + 8 < t1) { /* the rows are scattered over pages: fetch K and V a few ahead */
                prefetch(krow[t + 8 - t0], hd * (int64_t)sizeof(float));
                prefetch(vrow[t + 8 - t0], hd * (int64_t)sizeof(float));
            }
            const float *k = krow[t - t0];
            for (int i = 0; i < G; i++) {
                const float *qi = q + i * hd;
                __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qi), _mm512_loadu_ps(k));
                for (int64_t d = 16; d < hd; d += 16)
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(qi + d), _mm512_loadu_ps(k + d), acc);
                s[i * ld + t - t0] = _mm512_reduce_add_ps(acc) * scale;
            }
        }
        for (int i = 0; i < G; i++) {
            float *si = s + i * ld;
            __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
            for (int64_t t = 0; t < n; t += 16) {
                __mmask16 m = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
                mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, si + t));
            }
            float top = _mm512_reduce_max_ps(mx);
            for (int64_t t = 0; t < n; t += 16) {
                __mmask16 m = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1);
                __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, si + t),
                                                 _mm512_set1_ps(top)));
                _mm512_mask_storeu_ps(si + t, m, e);
                sum = _mm512_mask_add_ps(sum, m, sum, e);
            }
            part[i * pld] = top;
            part[i * pld + 1] = _mm512_reduce_add_ps(sum);
        }
        for (int64_t d = 0; d < hd; d += 16) {
            __m512 acc[ATT_HEADS];
            for (int i = 0; i < G; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t t = t0; t < t1; t++) {
                __m512 v = _mm512_loadu_ps(vrow[t - t0] + d);
                for (int i = 0; i < G; i++)
                    acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(s[i * ld + t - t0]), v, acc[i]);
            }
            for (int i = 0; i < G; i++) _mm512_storeu_ps(part + i * pld + 2 + d, acc[i]);
        }
        return;
    }
#endif
    for (int i = 0; i < G; i++) {
        float *si = s + i * ld, *pi = part + i * pld, mx = -INFINITY, sum = 0.0f;
        for (int64_t t = t0; t < t1; t++) {
            si[t - t0] = dot(q + i * hd, krow[t - t0], hd) * scale;
            mx = si[t - t0] > mx ? si[t - t0] : mx;
        }
        for (int64_t d = 0; d < hd; d++) pi[2 + d] = 0.0f;
        for (int64_t t = t0; t < t1; t++) {
            float e = expf(si[t - t0] - mx);
            const float *v = vrow[t - t0];
            sum += e;
            for (int64_t d = 0; d < hd; d++) pi[2 + d] += e * v[d];
        }
        pi[0] = mx;
        pi[1] = sum;
    }
}

/* out [hd] = the softmax-weighted values of one head from its chunks' parts [chunks, hd + 2]. */
static void merge_chunks(const float *part, int64_t chunks, int64_t hd, float *out) {
    float top = -INFINITY, sum = 0.0f;
    for (int64_t c = 0; c < chunks; c++) top = part[c * (hd + 2)] > top ? part[c * (hd + 2)] : top;
    for (int64_t d = 0; d < hd; d++) out[d] = 0.0f;
    for (int64_t c = 0; c < chunks; c++) {
        const float *pc = part + c * (hd + 2);
        float w = expf(pc[0] - top);
        sum += pc[1] * w;
        for (int64_t d = 0; d < hd; d++) out[d] += pc[2 + d] * w;
    }
    float inv = 1.0f / sum;
    for (int64_t d = 0; d < hd; d++) out[d] *= inv;
}

/* One decode step of attention for B users: qkv [B, (nh + 2 nkv) hd] is rotated (q, k) in
   place, k and v are written into the layer's pools [blocks, nkv, bs, hd] at each user's
   position, and out [B, nh hd] = softmax(q K^T * scale) V over the user's keys 0..pos, GQA
   (head h reads KV head h / (nh / nkv)). page_table [B, max_blocks] int64, positions [B] int64. */
void attention_decode(float *qkv, const float *cos, const float *sin, float *kpool, float *vpool,
                      const int64_t *page_table, const int64_t *positions, int64_t B, int64_t nh,
                      int64_t nkv, int64_t hd, int64_t bs, int64_t max_blocks, float scale,
                      float *scores, int64_t max_len, float *out) {
    int64_t width = (nh + 2 * nkv) * hd;
    for (int64_t b = 0; b < B; b++) {
        float *row = qkv + b * width;
        int64_t pos = positions[b];
        for (int64_t h = 0; h < nh + nkv; h++) rope_head(row + h * hd, cos + b * hd, sin + b * hd, hd);
        int64_t blk = page_table[b * max_blocks + pos / bs], off = pos % bs;
        for (int64_t g = 0; g < nkv; g++) {
            float *kd = kpool + ((blk * nkv + g) * bs + off) * hd;
            float *vd = vpool + ((blk * nkv + g) * bs + off) * hd;
            for (int64_t d = 0; d < hd; d++) {
                kd[d] = row[(nh + g) * hd + d];
                vd[d] = row[(nh + nkv + g) * hd + d];
            }
        }
    }
    /* Tasks: (user, KV head, chunk of ATT_CHUNK positions), each for up to ATT_HEADS of the KV
       head's query heads (their K and V rows read once); then each head merges its chunks. The
       arithmetic depends on the user's length only: the same for any batch and thread count. */
    int64_t group = nh / nkv, chunks = (max_len + ATT_CHUNK - 1) / ATT_CHUNK, work = 0;
    int64_t hsets = (group + ATT_HEADS - 1) / ATT_HEADS;
    float *parts = scores + B * nh * max_len;
    for (int64_t b = 0; b < B; b++) work += nh * (positions[b] + 1);
#pragma omp parallel if (work > 1024)
    {
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++)
            for (int64_t gs = 0; gs < nkv * hsets; gs++)
                for (int64_t c = 0; c < chunks; c++) {
                    int64_t len = positions[b] + 1, t0 = c * ATT_CHUNK, g = gs / hsets;
                    int64_t h0 = g * group + (gs % hsets) * ATT_HEADS;
                    int G = (int)(g * group + group - h0 < ATT_HEADS ? g * group + group - h0
                                                                    : ATT_HEADS);
                    if (t0 >= len) continue;
                    attend_chunk(qkv + b * width + h0 * hd, G, kpool, vpool,
                                 page_table + b * max_blocks, t0,
                                 t0 + ATT_CHUNK < len ? t0 + ATT_CHUNK : len, g, nkv, hd, bs,
                                 scale, scores + (b * nh + h0) * max_len + t0, max_len,
                                 parts + ((b * nh + h0) * chunks + c) * (hd + 2),
                                 chunks * (hd + 2));
                }
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < nh; h++)
                merge_chunks(parts + (b * nh + h) * chunks * (hd + 2),
                             (positions[b] + ATT_CHUNK) / ATT_CHUNK, hd,
                             out + b * nh * hd + h * hd);
    }
}

/* ---- A whole decoder layer's decode step in one call (the same functions, in the same order,
   as the per-op path: bit-equal results, ~60 calls from Python fewer per layer). ---- */

typedef struct qmat_s {
    const void *codes, *scale, *zero; /* a q4 / q6 / q8 matrix [n, k] (code_groups.py) */
    const float *bias;                /* [n] or NULL */
    int64_t n, k;
    int32_t bits, f16;                /* 4, 6 or 8; scale and zero float16 (1) or float32 (0) */
    const struct qmat_s *next;        /* the next row block of a fused projection whose blocks
                                         are stored in different formats (NULL: none) */
} qmat;

typedef struct {
    qmat qkv, o, gate_up, down;
    const float *attn_norm, *mlp_norm;
    float eps, scale;
    float *kpool, *vpool;
    int64_t nh, nkv, hd, bs;
} layer_t;

static void qmat_apply_block(const qmat *w, const float *x, int64_t M, float *y) {
    if (w->bits == 4 && w->f16)
        q4_matmul_f16(x, M, w->k, w->codes, w->scale, w->zero, w->n, y);
    else if (w->bits == 4)
        q4_matmul(x, M, w->k, w->codes, w->scale, w->zero, w->n, y);
    else if (w->bits == 6 && w->f16)
        q6_matmul_f16(x, M, w->k, w->codes, w->scale, w->zero, w->n, y);
    else if (w->bits == 6)
        q6_matmul(x, M, w->k, w->codes, w->scale, w->zero, w->n, y);
    else if (w->f16)
        q8_matmul_f16(x, M, w->k, w->codes, w->scale, w->zero, w->n, y);
    else
        q8_matmul(x, M, w->k, w->codes, w->scale, w->zero, w->n, y);
    if (w->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t i = 0; i < w->n; i++) y[m * w->n + i] += w->bias[i];
}

/* rows of a projection: of its blocks together */
static int64_t qmat_rows(const qmat *w) {
    int64_t n = 0;
    for (; w; w = w->next) n += w->n;
    return n;
}

/* y [M, qmat_rows(w)] = x [M, k] @ W^T, W the blocks of w one under the other; tmp: M * the
   widest block's rows floats (unused with one block or M = 1) */
static void qmat_apply(const qmat *w, const float *x, int64_t M, float *y, float *tmp) {
    if (!w->next) {
        qmat_apply_block(w, x, M, y);
        return;
    }
    int64_t n = qmat_rows(w), lo = 0;
    for (; w; lo += w->n, w = w->next) {
        if (M == 1) {
            qmat_apply_block(w, x, 1, y + lo);
            continue;
        }
        qmat_apply_block(w, x, M, tmp);
        for (int64_t m = 0; m < M; m++)
            memcpy(y + m * n + lo, tmp + m * w->n, (size_t)w->n * sizeof(float));
    }
}

/* x [B, H]: the previous layer's MLP output (in: the embeddings, with has_residual 0);
   residual [B, H] in/out; out [B, H] this layer's MLP output. scratch: B * (2 H + qkv + q + 2 I
   + I + max(qkv, 2 I)) floats (the last: the blocks of a projection in several formats);
   scores: attention_scratch(B, nh, hd, max_pos + 1) floats. */
void layer_decode(const layer_t *L, int64_t B, const float *x, float *residual, int has_residual,
                  const float *cos, const float *sin, const int64_t *page_table,
                  int64_t max_blocks, const int64_t *positions, int64_t max_pos, float *scores,
                  float *scratch, float *out) {
    int64_t H = L->o.n, q = L->nh * L->hd, I = L->down.k;
    float *h = scratch, *qkv = h + B * H, *att = qkv + B * qmat_rows(&L->qkv), *o = att + B * q;
    float *gu = o + B * H, *act = gu + B * 2 * I, *tmp = act + B * I;
    add_rms_norm(x, has_residual ? residual : NULL, L->attn_norm, L->eps, B, H, residual, h);
    qmat_apply(&L->qkv, h, B, qkv, tmp);
    attention_decode(qkv, cos, sin, L->kpool, L->vpool, page_table, positions, B, L->nh, L->nkv,
                     L->hd, L->bs, max_blocks, L->scale, scores, max_pos + 1, att);
    qmat_apply(&L->o, att, B, o, tmp);
    add_rms_norm(o, residual, L->mlp_norm, L->eps, B, H, residual, h);
    qmat_apply(&L->gate_up, h, B, gu, tmp);
    silu_mul(gu, B, I, act);
    qmat_apply(&L->down, act, B, out, tmp);
}
