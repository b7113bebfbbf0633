// GGUF block weights as stored (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) and our int8 /
// int4_g128 (llm.model.quant.int_formats) times 1..64 rows
// of x on the tensor cores (mma.sync m16n8k16: bf16 codes and x, fp32 sums), compiled at first use
// by NVRTC (kernels/qmma.py appends the one KERNEL(...) line it needs and launches it; the engine
// uses the `_m8` kernels for 2..8 rows and `_m16` for 9..16; `_m32` / `_m64` (NT = 4 / 8 B tiles)
// are for 17..64 rows where qmma.py's `mma_rows` allows it (not yet: not run on a GPU), `_m1` is
// timed by bench/qmma_explore.py).
//
// Planes (llm.model.quant): x [M, K] bf16 (row stride ldx); qs [N, ldq bytes]: 4-bit codes (per
// 32-group 16 bytes; byte i holds column i in its low nibble and column 16 + i in its high one) or
// Q8_0's int8 codes (32 bytes a group, column order); qh [N, ldh bytes]: the fifth bits (Q5_*,
// 1-bit plane: byte j of a group holds columns 4j..4j+3 in bits 0-3 and 16+4j..16+4j+3 in bits 4-7)
// or Q6_K's bits 4-5 (2-bit plane: byte 8g + i holds column 32g + 8s + i in bits 2s, 2s + 1).
// p1..p4 by format: Q4_0 / Q5_0 / Q8_0 p1 = d [N, K/32] fp16; Q4_1 / Q5_1 p1 = d, p2 = m
// [N, K/32] fp16; Q4_K / Q5_K p1 = scales, p2 = mins [N, K/32] u8, p3 = d, p4 = dmin [N, K/256]
// fp16; Q6_K p1 = scales [N, K/16] int8, p3 = d [N, K/256] fp16; INT8 (Q8_0's code layout) p3 =
// d [N, 1] float32; INT4_G128 (Q4_1's code layout) p3 = d, p4 = m [N, K/128] bf16 (p1 / p2 row
// stride ld1 bytes, p3 / p4 ld2 elements). y [M, N] bf16 (row stride ldy).
//
// A CTA takes 32 rows of w (two 16-row mma blocks; or two halves of 32, H = 2, each with half
// the warps); its W warps (W / H a half) split K's quads of groups. Lane
// (g, t) = (lane / 4, lane % 4) feeds rows g, g + 8 (+ 16, + 24) with columns 4t..4t+3 of a group
// (first mma, k = 2t, 2t+1, 2t+8, 2t+9) and 16+4t..16+4t+3 (second mma): for the 4-bit planes
// the low and high nibbles of word t, with the fifth / fifth-and-sixth bits or'ed in; for Q8_0
// words t and 4 + t, each as two mmas, low nibbles as bf16 128 + n and high ones as 16 (128 + n)
// (both exact). B's column n holds row 8 * tile + n of x at the same columns (ONE: row 0 in all
// 8). Codes enter as bf16 128 + q, the symmetric formats' less their offset c0 by one bf16 fma
// (q - 8, q - 16, q - 32; Q8_0's nibbles 128 + n and 16 (n - 16)), all exact, so the products
// are exact in fp32; a group (Q6_K: a 16-column sub-block) adds, with C its mma sum and, for
// the affine formats, S the sum of x over its columns (an mma of ones with the same B):
//   Q4_0 / Q5_0 / Q8_0: d C (c0 = 136 / 144; Q8_0 0 and 2304)
//   Q4_1 / Q5_1:        d C - (128 d - m) S   (INT4_G128 too, d and m per quad)
//   INT8:               d C (Q8_0's codes, d per row)
//   Q4_K / Q5_K:        s C - (128 s + o) S, s = d * scale, o = dmin * min
//   Q6_K:               d * scale C (c0 = 160)
// Each warp streams its quads' codes, high bits and scales into its own ring of STAGES shared-
// memory buffers by cp.async (16-byte copies; the scales 8 or 4 bytes) and reads its words from
// there (rows padded: no bank conflicts). The warps' sums meet in shared memory in warp order:
// the result does not depend on timing. Split-K (SPLIT, the _s kernels; gridDim.y = S, for
// grids smaller than the GPU): CTA (i, s) takes the s-th of S ranges of K's quads; each writes
// its float32 sum to part [S][M][N] and counts itself in cnt[i] (zero before the launch); the
// last to arrive adds the S sums in split order, writes y and sets cnt[i] to 0 again. A CTA
// covers H halves of 32 rows (H = 2: the _h2 kernels), W / H warps a half over the same K
// shares, so each share's x is read from the L2 once for 32 H rows. Both are template
// parameters: the plain kernel (H = 1, no split) carries none of their code. The _glu kernels
// (GLU; H = 2, no split) put SiLU*up in the epilogue: half 0 takes 32 gate rows i.., half 1 the
// up rows I + i.. of a fused [2I, K] gate/up weight, y is [M, I]. With PDL the first quads'
// copies start before the kernel before it has finished.
template <unsigned BASE>  // bytes 0, 1 of w -> bf16x2 BASE:byte (0x43: 128 + b, 0x45: 16 (128 + b))
__device__ __forceinline__ unsigned lo2(unsigned w) {
  unsigned d; asm("prmt.b32 %0, %1, %2, 0x4140;" : "=r"(d) : "r"(w), "r"(BASE * 0x01010101u));
  return d;
}
template <unsigned BASE>  // bytes 2, 3
__device__ __forceinline__ unsigned hi2(unsigned w) {
  unsigned d; asm("prmt.b32 %0, %1, %2, 0x4342;" : "=r"(d) : "r"(w), "r"(BASE * 0x01010101u));
  return d;
}
// PDL: wait for the kernel before (x is its output), then let the next one launch; both are
// no-ops in a launch without the programmatic attribute (and below sm_90)
__device__ __forceinline__ void wait_then_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ unsigned bf16_bits(float v) {  // to nearest even (finite v)
  const unsigned u = __float_as_uint(v);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ float bf16_rn(float v) {  // v rounded to bf16 (NaN stays NaN)
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return __uint_as_float((unsigned)h << 16);
}
__device__ __forceinline__ float bf2f(unsigned short h) { return __uint_as_float((unsigned)h << 16); }
__device__ __forceinline__ float h2f(unsigned h) {
  float f; asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "r"(h));
  return f;
}
// bf16 pair p + NEG (NEG a bf16 pair; 0: p as it is): exact for the codes and offsets here
template <unsigned NEG>
__device__ __forceinline__ unsigned plus(unsigned p) {
  if (NEG == 0u) return p;
  unsigned d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(p), "r"(0x3F803F80u), "r"(NEG));
  return d;
}
// c += A x B: A rows g, g + 8 from the code bytes v0, v1 (each < 128) as bf16 BASE:byte + NEG
template <unsigned BASE, unsigned NEG>
__device__ __forceinline__ void mma(float* c, unsigned v0, unsigned v1, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(plus<NEG>(lo2<BASE>(v0))), "r"(plus<NEG>(lo2<BASE>(v1))),
        "r"(plus<NEG>(hi2<BASE>(v0))), "r"(plus<NEG>(hi2<BASE>(v1))), "r"(b0), "r"(b1));
}
// c += ones x B: every row of c the sums of B's columns over the mma's 16 k
__device__ __forceinline__ void mma_ones(float* c, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
      "{%4,%4,%4,%4}, {%5,%6}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(0x3F803F80u), "r"(b0), "r"(b1));
}
enum { Q4_0 = 0, Q4_K = 1, Q5_0 = 2, Q5_K = 3, Q6_K = 4, Q8_0 = 5, Q4_1 = 6, Q5_1 = 7, INT8 = 8,
       INT4_G128 = 9 };
#define HD __host__ __device__ constexpr
HD bool has_fifth(int F) { return F == Q5_0 || F == Q5_K || F == Q5_1; }
HD bool k_quant(int F) { return F == Q4_K || F == Q5_K; }  // d / dmin per 256, u8 scales
HD bool affine(int F) { return F == Q4_K || F == Q5_K || F == Q4_1 || F == Q5_1 || F == INT4_G128; }
HD bool bytes8(int F) { return F == Q8_0 || F == INT8; }  // int8 codes, 32 bytes a group
HD bool ring_scales(int F) { return F != INT8 && F != INT4_G128; }  // else read by __ldg
HD int code_bytes(int F) { return bytes8(F) ? 32 : 16; }  // a group's codes, a row
HD int high_bytes(int F) { return has_fifth(F) ? 4 : (F == Q6_K ? 8 : 0); }  // ... high bits
HD int scale_bytes(int F) { return (F == Q4_1 || F == Q5_1) ? 16 : 8; }  // a quad, a row
// bytes a row of a stage: codes then high bits, padded so that the 8 rows g of a warp's 32-bit
// reads fall in distinct banks (80 = 20 words, 112 = 28, 144 = 36: 4 g (mod 32) apart or more)
HD int row_bytes(int F) { return bytes8(F) ? 144 : (F == Q6_K ? 112 : 80); }
HD int stage_bytes(int F) { return 32 * row_bytes(F) + 32 * scale_bytes(F); }
HD int subs(int F) { return F == Q6_K ? 2 : 1; }  // scales a 32-group
// minus the codes' offset as a bf16 pair, which the symmetric formats' A takes (so C is their
// sum itself): -136, -144, -160; Q8_0's high nibble codes 16 (128 + n) -2304 (the low ones are
// left 128 + n: 128 + lo + 16 (hi - 16) = q)
HD unsigned neg_offset(int F, bool high) {
  return F == Q4_0 ? 0xC308C308u : (F == Q5_0 ? 0xC310C310u : (F == Q6_K ? 0xC320C320u
         : (bytes8(F) && high ? 0xC510C510u : 0u)));
}
#ifndef STAGES_N
#define STAGES_N 4
#endif
constexpr int STAGES = STAGES_N;  // quads a warp has in flight + 1 (at least 2)
__device__ __forceinline__ void cp_async(unsigned dst, const void* src, int bytes) {
  if (bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
  else if (bytes == 8)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
struct Rows {  // the CTA's row 0 of each plane, and the planes' row strides (bytes)
  const unsigned char *qs, *qh, *a, *b;
  size_t qrow, hrow, srow;
};
// the copies of quad q of the CTA's 32 rows into the stage at `dst`
template <int F>
__device__ __forceinline__ void issue_quad(unsigned dst, const Rows& p, int q, int lane) {
  constexpr int RB = row_bytes(F), CP = code_bytes(F) / 4, HP = high_bytes(F) / 4;  // 16-B parts
#pragma unroll
  for (int i = 0; i < CP; ++i) {  // chunk 32i + lane: row (32i + lane) / CP, part % CP
    const int c = 32 * i + lane, row = c / CP, part = c % CP;
    cp_async(dst + row * RB + part * 16, p.qs + row * p.qrow + q * 16 * CP + part * 16, 16);
  }
#pragma unroll
  for (int i = 0; i < HP; ++i) {
    const int c = 32 * i + lane, row = c / (HP ? HP : 1), part = c % (HP ? HP : 1);
    cp_async(dst + row * RB + 16 * CP + part * 16, p.qh + row * p.hrow + q * 16 * HP + part * 16,
             16);
  }
  const unsigned s = dst + 32 * RB + lane * scale_bytes(F);  // row lane's scales
  if (!ring_scales(F)) return;  // INT8, INT4_G128: none in the ring (2-byte or per-row scales)
  if (k_quant(F)) {  // 4 scales, then 4 mins
    cp_async(s, p.a + lane * p.srow + q * 4, 4);
    cp_async(s + 4, p.b + lane * p.srow + q * 4, 4);
  } else if (F == Q4_1 || F == Q5_1) {  // 4 d, then 4 m
    cp_async(s, p.a + lane * p.srow + q * 8, 8);
    cp_async(s + 8, p.b + lane * p.srow + q * 8, 8);
  } else {  // 4 d (Q6_K: 8 scales)
    cp_async(s, p.a + lane * p.srow + q * 8, 8);
  }
}
// the code bytes (< 128) of row `row`, group j that lane t gives the first (lo) and the second
// (hi) mma; Q8_0: those of word t (lo, hi: low and high nibbles) and of word 4 + t (lo2, hi2)
template <int F>
__device__ __forceinline__ void codes(const unsigned char* src, int row, int j, int t,
                                      unsigned& lo, unsigned& hi, unsigned& lo2, unsigned& hi2) {
  constexpr int RB = row_bytes(F), CB = code_bytes(F);
  const unsigned char* r = src + row * RB;
  const unsigned w = *reinterpret_cast<const unsigned*>(r + j * CB + t * 4);
  if (bytes8(F)) {
    const unsigned u = w ^ 0x80808080u;  // q + 128
    const unsigned u2 = *reinterpret_cast<const unsigned*>(r + j * CB + 16 + t * 4) ^ 0x80808080u;
    lo = u & 0x0F0F0F0Fu;
    hi = (u >> 4) & 0x0F0F0F0Fu;
    lo2 = u2 & 0x0F0F0F0Fu;
    hi2 = (u2 >> 4) & 0x0F0F0F0Fu;
    return;
  }
  lo = w & 0x0F0F0F0Fu;
  hi = (w >> 4) & 0x0F0F0F0Fu;
  if (has_fifth(F)) {  // byte t of the group's 4: bit b -> column 4t + b, bit 4 + b -> 16 + 4t + b
    const unsigned h = *reinterpret_cast<const unsigned*>(r + 16 * 4 + j * 4) >> (8 * t);
    lo |= ((h & 15u) * 0x2040810u) & 0x10101010u;  // bit b to bit 4 of byte b
    hi |= (((h >> 4) & 15u) * 0x2040810u) & 0x10101010u;
  } else if (F == Q6_K) {  // word t & 1 of the group's 8 bytes: columns 4t + b at bits 2 (t >> 1)
    const unsigned h = *reinterpret_cast<const unsigned*>(r + 16 * 4 + j * 8 + (t & 1) * 4);
    const int sh = 2 * (t >> 1);
    lo |= (h << (4 - sh)) & 0x30303030u;
    hi |= (h >> sh) & 0x30303030u;
  }
}
// acc += the quad's four groups of stage `src` times x; xw[nt] points at the quad's
// x of tile nt; dk / mk: the quad's super-block's d / dmin (K-quants, Q6_K; INT4_G128: the
// quad's d / m; INT8: the row's d) of rows g + 8r
template <int F, int NT, bool ONE>
__device__ __forceinline__ void step(float (&acc)[2][NT][4], const unsigned char* src,
                                     const float (&dk)[4], const float (&mk)[4],
                                     const uint2* const (&xw)[NT], const bool (&live)[NT],
                                     int gq, int t) {
  constexpr int RB = row_bytes(F), SB = scale_bytes(F);
  uint4 sq[4];  // the quad's scales of rows g + 8r, read once (8 bytes; Q4_1 / Q5_1 16; none
  // for INT8 / INT4_G128, whose scales come by __ldg)
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    sq[r] = make_uint4(0u, 0u, 0u, 0u);
    if (!ring_scales(F)) continue;
    const unsigned char* s = src + 32 * RB + (gq + 8 * r) * SB;
    if (SB == 16) {
      sq[r] = *reinterpret_cast<const uint4*>(s);
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(s);
      sq[r] = make_uint4(v.x, v.y, 0u, 0u);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float dd[4][2], ee[4];  // per row g + 8r: the multipliers of C (Q6_K: of each sub-block's C)
    unsigned lo[4], hi[4], lo2[4], hi2[4];  // and of S (affine formats)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = gq + 8 * r;
      const unsigned half = (j < 2 ? sq[r].x : sq[r].y) >> (16 * (j & 1));  // fp16 j; Q6_K: 2j..
      if (F == INT8) {
        dd[r][0] = dk[r];
      } else if (F == INT4_G128) {
        dd[r][0] = dk[r];
        ee[r] = fmaf(128.f, dk[r], -mk[r]);
      } else if (F == Q4_0 || F == Q5_0 || F == Q8_0) {
        dd[r][0] = h2f(half);
      } else if (F == Q4_1 || F == Q5_1) {
        dd[r][0] = h2f(half);
        const float m = h2f((j < 2 ? sq[r].z : sq[r].w) >> (16 * (j & 1)));
        ee[r] = fmaf(128.f, dd[r][0], -m);
      } else if (k_quant(F)) {  // bytes j of the scales' and the mins' words
        dd[r][0] = dk[r] * (float)((sq[r].x >> (8 * j)) & 0xFFu);
        ee[r] = fmaf(128.f, dd[r][0], mk[r] * (float)((sq[r].y >> (8 * j)) & 0xFFu));
      } else {  // Q6_K: int8 scales of sub-blocks 2j, 2j + 1 (bytes 2j, 2j + 1)
        dd[r][0] = dk[r] * (float)(signed char)(half & 0xFFu);
        dd[r][1] = dk[r] * (float)(signed char)((half >> 8) & 0xFFu);
      }
      codes<F>(src, row, j, t, lo[r], hi[r], lo2[r], hi2[r]);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint2 xl = make_uint2(0u, 0u), xh = make_uint2(0u, 0u);
      if (live[nt]) {
        xl = __ldg(xw[nt] + 8 * j);
        xh = __ldg(xw[nt] + 8 * j + 4);
      }
      // [16-row block][sub-block]: C (sub-block 1 only for Q6_K)
      float c[2][2][4] = {{{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}},
                          {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}}};
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        constexpr unsigned NL = neg_offset(F, false), NH = neg_offset(F, true);
        if (bytes8(F)) {
          mma<0x43, NL>(c[b][0], lo[2 * b], lo[2 * b + 1], xl.x, xl.y);
          mma<0x45, NH>(c[b][0], hi[2 * b], hi[2 * b + 1], xl.x, xl.y);
          mma<0x43, NL>(c[b][0], lo2[2 * b], lo2[2 * b + 1], xh.x, xh.y);
          mma<0x45, NH>(c[b][0], hi2[2 * b], hi2[2 * b + 1], xh.x, xh.y);
        } else {
          mma<0x43, NL>(c[b][0], lo[2 * b], lo[2 * b + 1], xl.x, xl.y);
          mma<0x43, NL>(c[b][subs(F) - 1], hi[2 * b], hi[2 * b + 1], xh.x, xh.y);
        }
      }
      // affine formats: S, the sums of x over the group's columns, by the tensor cores: c0 / c2
      // hold column 2t of the tile, c1 / c3 column 2t + 1 (ONE: row 0 in every column)
      float cs[4] = {0.f, 0.f, 0.f, 0.f};
      if (affine(F)) {
        mma_ones(cs, xl.x, xl.y);
        mma_ones(cs, xh.x, xh.y);
      }
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (ONE && (e & 1)) continue;
          const int r = 2 * b + (e >> 1);
          float& a = acc[b][nt][e];
          if (affine(F)) {
            a = fmaf(dd[r][0], c[b][0][e], fmaf(-ee[r], cs[e & 1], a));
          } else {
            a = fmaf(dd[r][0], c[b][0][e], a);
            if (F == Q6_K) a = fmaf(dd[r][1], c[b][1][e], a);
          }
        }
    }
  }
}
template <int F, int NT, bool ONE, int H, bool SPLIT, bool GLU>
__device__ __forceinline__ void qmma(
    const unsigned short* __restrict__ x, const unsigned char* __restrict__ qs,
    const unsigned char* __restrict__ qh, const unsigned char* __restrict__ p1,
    const unsigned char* __restrict__ p2, const unsigned short* __restrict__ p3,
    const unsigned short* __restrict__ p4, unsigned short* __restrict__ y, int M, int K, int ldq,
    int ldh, int ld1, int ld2, int ldx, int ldy, float* __restrict__ part,
    int* __restrict__ cnt) {
  extern __shared__ __align__(16) float smem[];  // the warps' partials [W][32][8 * NT] (ONE:
  // [W][32][1]), then from `ring`: [W][STAGES][stage_bytes]
  constexpr int STAGE = stage_bytes(F);
  const int W = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int Q = K >> 7;
  const int MP = ONE ? 1 : 8 * NT;
  const int gq = lane >> 2, t = lane & 3;
  // H (compile time: 1 or 2) row halves of 32 a CTA, WK warps each: warp (half, kw) takes the
  // half's 32 rows over the kw-th share of the split's quads; the halves' warps of one share read
  // the same x (the L1). One half and no split compile to the plain kernel's prologue.
  const int WK = H == 2 ? W >> 1 : W, half = H == 2 ? warp >= WK : 0;
  const int kw = H == 2 ? warp - half * WK : warp;
  // split-K (SPLIT): CTA (blockIdx.x, split) takes SQ quads of K from s_lo, its warps a share each
  const int S = SPLIT ? gridDim.y : 1, split = SPLIT ? blockIdx.y : 0;
  const int s_lo = SPLIT ? (unsigned)(Q * split) / S : 0;
  const int SQ = SPLIT ? (unsigned)(Q * (split + 1)) / S - s_lo : Q;
  const int q_lo = s_lo + SQ * kw / WK, q_hi = s_lo + SQ * (kw + 1) / WK, n = q_hi - q_lo;
  const int SX = (4 * W * 32 * MP + 15) & ~15;
  unsigned char* ring = reinterpret_cast<unsigned char*>(smem) + SX + warp * STAGES * STAGE;
  const unsigned ring_s = (unsigned)__cvta_generic_to_shared(ring);
  // GLU (SiLU*up, two halves): half 0 takes gate rows 32 i.., half 1 the up rows I + 32 i..
  // (I = 32 gridDim.x); else the CTA's 32 H rows in a row
  const size_t r0 = GLU ? (size_t)half * gridDim.x * 32 + (size_t)blockIdx.x * 32
                        : ((size_t)blockIdx.x * H + half) * 32;
  const Rows p = {qs + r0 * ldq, qh + r0 * ldh, p1 + r0 * ld1, p2 + r0 * ld1, (size_t)ldq,
                  (size_t)ldh, (size_t)ld1};
  const unsigned short* dk0 = p3 + (r0 + gq) * ld2;  // K-quants / Q6_K: row g's d
  const unsigned short* mk0 = p4 + (r0 + gq) * ld2;  // K-quants: ... and dmin (INT4_G128: m)
  float d8[4] = {0.f, 0.f, 0.f, 0.f};  // INT8: rows g + 8r's float32 d, for the whole K
  if (F == INT8) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
      d8[r] = __ldg(reinterpret_cast<const float*>(p3) + (r0 + gq + 8 * r) * ld2);
  }
  // the weights are no other kernel's output: their first quads are fetched before the wait
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < n) issue_quad<F>(ring_s + i * STAGE, p, q_lo + i, lane);
    cp_commit();
  }
  wait_then_release();
  // B: lane (g, t) gives column g of each tile: row 8 * tile + g of x (ONE: row 0)
  const uint2* xw[NT];
  bool live[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = ONE ? 0 : 8 * nt + gq;
    live[nt] = m < M;
    xw[nt] = reinterpret_cast<const uint2*>(x + (size_t)(live[nt] ? m : 0) * ldx) + t + q_lo * 32;
  }
  // sums: [block of 16 rows][tile][c0..c3]; c1 / c3 unused with ONE
  float acc[2][NT][4];
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[b][nt][e] = 0.f;
  int read = 0, write = STAGES - 1;  // the ring's slots: quad i's, and quad i + STAGES - 1's
  for (int i = 0; i < n; ++i) {
    cp_wait<STAGES - 2>();  // quad i's copies (this lane's) are done
    __syncwarp();           // ... and the other lanes'; slot `write` was read by all in i - 1
    if (i + STAGES - 1 < n) issue_quad<F>(ring_s + write * STAGE, p, q_lo + i + STAGES - 1, lane);
    cp_commit();
    float dk[4] = {0.f, 0.f, 0.f, 0.f}, mk[4] = {0.f, 0.f, 0.f, 0.f};
    if (k_quant(F) || F == Q6_K) {  // the quad's super-block (256 columns: two quads)
      const int sb = (q_lo + i) >> 1;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        dk[r] = h2f(__ldg(dk0 + (size_t)8 * r * ld2 + sb));
        if (k_quant(F)) mk[r] = h2f(__ldg(mk0 + (size_t)8 * r * ld2 + sb));
      }
    } else if (F == INT4_G128) {  // the quad's d and m (128 columns: one scale pair)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        dk[r] = bf2f(__ldg(dk0 + (size_t)8 * r * ld2 + q_lo + i));
        mk[r] = bf2f(__ldg(mk0 + (size_t)8 * r * ld2 + q_lo + i));
      }
    } else if (F == INT8) {
#pragma unroll
      for (int r = 0; r < 4; ++r) dk[r] = d8[r];
    }
    step<F, NT, ONE>(acc, ring + read * STAGE, dk, mk, xw, live, gq, t);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xw[nt] += 32;
    read = read + 1 == STAGES ? 0 : read + 1;
    write = write + 1 == STAGES ? 0 : write + 1;
  }
  cp_wait<0>();
  float* wp = smem;  // [W][32 rows][MP]: each warp its own rows (not the rings: no barrier here)
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int row = 16 * b + gq;
      if (ONE) {
        if (t == 0) {
          wp[(warp * 32 + row) * MP] = acc[b][nt][0];
          wp[(warp * 32 + row + 8) * MP] = acc[b][nt][2];
        }
      } else {
        const int col = 8 * nt + 2 * t;
        wp[(warp * 32 + row) * MP + col] = acc[b][nt][0];
        wp[(warp * 32 + row) * MP + col + 1] = acc[b][nt][1];
        wp[(warp * 32 + row + 8) * MP + col] = acc[b][nt][2];
        wp[(warp * 32 + row + 8) * MP + col + 1] = acc[b][nt][3];
      }
    }
  __syncthreads();
  if (GLU) {  // y [M, I] = silu(gate) * up, each rounded as the product's bf16, then with the
    // instructions Triton gives kernels/silu_mul.py (ex2.approx of -g log2 e, div.full), so the
    // result has silu_mul's bits
    for (int i = threadIdx.x; i < 32 * MP; i += blockDim.x) {
      const int r = i / MP, m = i - r * MP;
      if (m >= M) continue;
      float g = 0.f, u = 0.f;
      for (int w = 0; w < WK; ++w) g += wp[(w * 32 + r) * MP + m];
      for (int w = WK; w < 2 * WK; ++w) u += wp[(w * 32 + r) * MP + m];
      g = bf16_rn(g);
      float e, act;
      asm("ex2.approx.f32 %0, %1;" : "=f"(e) : "f"(__fmul_rn(g, -1.44269504088896341f)));
      asm("div.full.f32 %0, %1, %2;" : "=f"(act) : "f"(g), "f"(__fadd_rn(1.f, e)));
      unsigned short out;
      asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(out) : "f"(__fmul_rn(bf16_rn(act), bf16_rn(u))));
      y[(size_t)m * ldy + (size_t)blockIdx.x * 32 + r] = out;
    }
    return;
  }
  // the CTA's row 32 h + r is row r of half h's warps (h * WK ..); loops of constant bounds
  const int N = gridDim.x * 32 * H;
  if (SPLIT) {  // this split's sum to part [S][M][N], then the last CTA of the CTA's rows adds up
    for (int h = 0; h < H; ++h)
      for (int i = threadIdx.x; i < 32 * MP; i += blockDim.x) {
        const int r = i / MP, m = i - r * MP;
        if (m >= M) continue;
        float s = 0.f;
        for (int w = h * WK; w < h * WK + WK; ++w) s += wp[(w * 32 + r) * MP + m];
        part[(size_t)(split * M + m) * N + blockIdx.x * 32 * H + 32 * h + r] = s;
      }
    __syncthreads();  // the CTA's partials, seen by thread 0, go before its arrival (a fence)
    __shared__ int last;
    if (threadIdx.x == 0) {
      __threadfence();
      last = atomicAdd(cnt + blockIdx.x, 1) == S - 1;
      if (last) __threadfence();  // ... and the other CTAs' before the reads below
    }
    __syncthreads();
    if (!last) return;
  }
  for (int h = 0; h < H; ++h)
    for (int i = threadIdx.x; i < 32 * MP; i += blockDim.x) {
      const int r = i / MP, m = i - r * MP;
      if (m >= M) continue;
      const int col = blockIdx.x * 32 * H + 32 * h + r;
      float s = 0.f;
      if (!SPLIT) {
        for (int w = h * WK; w < h * WK + WK; ++w) s += wp[(w * 32 + r) * MP + m];
      } else {  // in split order, whichever CTA came last: the sum does not depend on timing
        for (int sp = 0; sp < S; ++sp) s += __ldcg(part + ((size_t)sp * M + m) * N + col);
      }
      y[(size_t)m * ldy + col] = (unsigned short)bf16_bits(s);
    }
  if (SPLIT && threadIdx.x == 0) cnt[blockIdx.x] = 0;  // zero again for the next launch
}
#define ARGS const unsigned short* __restrict__ x, const unsigned char* __restrict__ qs, \
    const unsigned char* __restrict__ qh, const unsigned char* __restrict__ p1, \
    const unsigned char* __restrict__ p2, const unsigned short* __restrict__ p3, \
    const unsigned short* __restrict__ p4, unsigned short* __restrict__ y, int M, int K, int ldq, \
    int ldh, int ld1, int ld2, int ldx, int ldy, float* __restrict__ part, \
    int* __restrict__ cnt
#define PASS x, qs, qh, p1, p2, p3, p4, y, M, K, ldq, ldh, ld1, ld2, ldx, ldy, part, cnt
// kernels/qmma.py appends the line for the kernel it compiles (format, tiles, ONE, H, SPLIT,
// GLU, OCC: CTAs of 256 threads an SM that ptxas fits the registers to, 2 -> 128 a thread),
// e.g. KERNEL(q6_k_mma_m8, Q6_K, 1, 0, 1, 0, 0, 2) or KERNEL(q4_0_mma_m16_glu, Q4_0, 2, 0, 2,
// 0, 1, 2)
#define KERNEL(name, F, NT, ONE, H, SPLIT, GLU, OCC) \
  extern "C" __global__ void __launch_bounds__(256, OCC) name(ARGS) { \
    qmma<F, NT, ONE, H, SPLIT, GLU>(PASS); \
  }
