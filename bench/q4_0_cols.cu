// One row of x times Q4_0 planes as stored, on the tensor cores, each 32-group a column of B
// (an exploration outside the engine: bench/q4_cols_explore.py compiles it by NVRTC, checks it
// and times it against qgemv's one-row Triton kernel).
//
// Planes (llm.model.quant): x [K] bf16; qs [N, ldq bytes] (per 32-group 16 bytes; byte i holds
// column i in its low nibble and column 16 + i in its high one); d [N, ld1 elements] fp16, one a
// group; y [N] bf16.
//
// Why: at one row of x, an m16n8k16 mma whose B holds x in all 8 columns wastes 7 of them, and
// each group's scale then needs the mma's sum alone (a fresh C a group). Here B's column n is
// group n of a 256-column chunk instead: lane (g, t) = (lane / 4, lane % 4) loads the chunk's
// 16-byte units t and t + 4 (groups t and t + 4, contiguous 64 bytes for the four lanes of a
// row) of rows g and g + 8, and feeds the mma's k slots 2t, 2t + 1, 2t + 8, 2t + 9 with them:
// the "low" mmas take group t from every lane t, the "high" ones group t + 4. B[k][n] is x at
// that slot's column where the slot's group is n, else 0: lane (g, t) holds B[k][g] for its own
// slots, x of group g where g == t (low) or g == t + 4 (high). So C[row][n] sums group n over
// the chunk's 16 mmas (8 a half), and lane (g, t) ends the chunk with groups 2t, 2t + 1 of rows
// g, g + 8 in its four C registers: two scale multiply-adds each. A word w of codes (bytes 4i..
// 4i+3 of a group) gives four bf16 pairs 128 + q by one mask-or each ((w >> s) & 0x000F000F |
// 0x43004300, s = 0, 8, 4, 12: columns (4i, 4i+2), (4i+1, 4i+3), (16+4i, 16+4i+2), (16+4i+1,
// 16+4i+3)); x's pairs are built to match by byte permutes. The codes' offset 136 is taken off
// each group's sum through the group's sum of x (an mma of ones with the same B):
//   y[row] = sum over groups of d * (C - 136 S).
// About 1.4-1.9 instructions a weight (RB row blocks of 16 a warp share x's pairs), against the
// one-row Triton kernel's 3.6. A CTA of W warps takes 16 RB rows; its warps split K's chunks
// (warp w: chunks w, w + W, ...), each loading its next chunk's codes before using the current
// ones (XP: x's next chunk too); the warps' sums meet in shared memory in warp order. With PDL
// (a launch attribute) the first chunk's codes are loaded before the wait for the kernel before.
// NA: independent mma accumulators a chunk (shorter chains of dependent mmas). SA: the groups'
// sums of x by FADDs and shuffles (each lane 8 columns) instead of the mmas of ones, which at
// one row block a warp double the tensor cores' work.
// GLU: a fused [2I, K] gate/up weight; a CTA's first W / 2 warps take its 16 RB gate rows (K's
// chunks split among them), the others the matching up rows; y [I] = silu(gate) * up, rounded as
// kernels/silu_mul.py.

__device__ __forceinline__ void ldg_w(const unsigned char* p, unsigned (&v)[4]) {
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
}
// x is the kernel before's output: volatile with a memory clobber, so that no x load moves above
// `pdl_wait` (itself volatile, with a memory clobber); the weights' loads are free to move
__device__ __forceinline__ void ldg_x(const unsigned short* p, unsigned (&v)[4]) {
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p) : "memory");
}
__device__ __forceinline__ unsigned ldg_d(const unsigned short* p) {
  unsigned v;
  asm("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned s) {
  unsigned d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
}
// (w & 0x000F000F) | 0x43004300 as one LOP3 (written as two, ptxas emits two)
__device__ __forceinline__ unsigned code_pair(unsigned w) {
  unsigned d;
  asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(d) : "r"(w));
  return d;
}
__device__ __forceinline__ void mma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2,
                                    unsigned a3, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float h2f(unsigned h) {
  float f;
  asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "r"(h));
  return f;
}
__device__ __forceinline__ unsigned short bf16_rn(float v) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// a chunk's codes for lane (g, t): [r][0] row g unit t, [1] row g unit t + 4, [2] / [3] the
// same of row g + 8; and its scales, groups 2t, 2t + 1 of rows g, g + 8
template <int RB>
struct Chunk {
  unsigned w[RB][4][4];
  unsigned s[RB][2];
};

// this lane's code and scale pointers of its chunk: [r][0] row 16 r + g, [r][1] row 16 r + g + 8
template <int RB>
struct Rows {
  const unsigned char* w[RB][2];
  const unsigned short* s[RB][2];
};

template <int RB>
__device__ __forceinline__ void load_chunk(Chunk<RB>& ch, const Rows<RB>& at, int off_w,
                                           int off_s) {
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    ldg_w(at.w[r][0] + off_w, ch.w[r][0]);
    ldg_w(at.w[r][0] + off_w + 64, ch.w[r][1]);
    ldg_w(at.w[r][1] + off_w, ch.w[r][2]);
    ldg_w(at.w[r][1] + off_w + 64, ch.w[r][3]);
    ch.s[r][0] = ldg_d(at.s[r][0] + off_s);
    ch.s[r][1] = ldg_d(at.s[r][1] + off_s);
  }
}

template <int RB>
__device__ __forceinline__ void advance(Rows<RB>& at, int by_w, int by_s) {
#pragma unroll
  for (int r = 0; r < RB; ++r) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      at.w[r][e] += by_w;
      at.s[r][e] += by_s;
    }
  }
}

// x's group g of a chunk (columns 8j..8j+7 in xv[j]) where this lane holds it in B, else zeros;
// SA: also columns 8t..8t+7 of group g in xv[4] (every lane: the group sums by ALU)
template <bool SA>
__device__ __forceinline__ void load_x(unsigned (&xv)[5][4], const unsigned short* xp, bool own,
                                       int t) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (own) {
      ldg_x(xp + 8 * j, xv[j]);
    } else {
      xv[j][0] = xv[j][1] = xv[j][2] = xv[j][3] = 0u;
    }
  }
  if (SA) ldg_x(xp + 8 * t, xv[4]);
}
__device__ __forceinline__ float lo_bf(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf(unsigned w) { return __uint_as_float(w & 0xFFFF0000u); }

// one chunk: acc += this lane's share of the chunk whose codes and scales are in `use` and whose
// x (`load_x`) is xv
template <int RB, int NA, bool SA>
__device__ __forceinline__ void chunk_step(float (&acc)[RB][2], const Chunk<RB>& use,
                                           const unsigned (&xv)[5][4], bool low, int t) {
  // B pairs of mma (i, h): bx = x columns (16h + 4i, 16h + 4i + 2), by = (.. + 1, .. + 3)
  unsigned bx[4][2], by[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = 8 * h + 2 * i;  // x's word m holds columns 2m, 2m + 1
      const unsigned a = xv[m >> 2][m & 3], b = xv[(m + 1) >> 2][(m + 1) & 3];
      bx[i][h] = prmt(a, b, 0x5410u);
      by[i][h] = prmt(a, b, 0x7632u);
    }
  }
  // NA independent accumulators (mma (i, h) into the (2i + h) % NA-th), summed at the end: the
  // chunk's 16 mmas a row block are then NA chains of 16 / NA, not one chain of 16
  float C[RB][NA][4], S[NA][4];
#pragma unroll
  for (int a = 0; a < NA; ++a) {
    S[a][0] = S[a][1] = S[a][2] = S[a][3] = 0.f;
#pragma unroll
    for (int r = 0; r < RB; ++r) C[r][a][0] = C[r][a][1] = C[r][a][2] = C[r][a][3] = 0.f;
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const bool on = (half == 0) == low;  // this lane's B is x in this half's mmas, else 0
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int a = (2 * i + h) % NA;
        const unsigned b0 = on ? bx[i][h] : 0u, b1 = on ? by[i][h] : 0u;
        if (!SA) mma(S[a], 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u, b0, b1);
#pragma unroll
        for (int r = 0; r < RB; ++r) {
          const unsigned u = use.w[r][half][i], v = use.w[r][2 + half][i];
          const int s0 = h ? 4 : 0, s1 = h ? 12 : 8;
          mma(C[r][a], code_pair(u >> s0), code_pair(v >> s0), code_pair(u >> s1),
              code_pair(v >> s1), b0, b1);
        }
      }
    }
  }
#pragma unroll
  for (int a = 1; a < NA; ++a) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      S[0][e] += S[a][e];
#pragma unroll
      for (int r = 0; r < RB; ++r) C[r][0][e] += C[r][a][e];
    }
  }
  if (SA) {  // group g's sum in lanes 4g..4g+3 (8 columns each), then groups 2t, 2t + 1 here
    float v = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) v += lo_bf(xv[4][j]) + hi_bf(xv[4][j]);
    v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
    v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
    S[0][0] = S[0][2] = __shfl_sync(0xFFFFFFFFu, v, 8 * t);
    S[0][1] = S[0][3] = __shfl_sync(0xFFFFFFFFu, v, 8 * t + 4);
  }
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    const unsigned sg = use.s[r][0], sg8 = use.s[r][1];
    acc[r][0] += h2f(sg & 0xFFFFu) * (C[r][0][0] - 136.f * S[0][0])
                 + h2f(sg >> 16) * (C[r][0][1] - 136.f * S[0][1]);
    acc[r][1] += h2f(sg8 & 0xFFFFu) * (C[r][0][2] - 136.f * S[0][2])
                 + h2f(sg8 >> 16) * (C[r][0][3] - 136.f * S[0][3]);
  }
}

template <int RB, int W, bool XP, bool GLU, int NA, bool SA>
__device__ __forceinline__ void q4_0_cols_body(const unsigned short* __restrict__ x,
                                               const unsigned char* __restrict__ qs,
                                               const unsigned short* __restrict__ d,
                                               unsigned short* __restrict__ y, int K, int ldq,
                                               int ld1) {
  __shared__ float red[W][16 * RB];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  // GLU: warps [0, W / 2) take the CTA's gate rows, [W / 2, W) the up rows I + the same
  constexpr int WK = GLU ? W / 2 : W;  // warps splitting K's chunks
  const int half = warp / WK, wk = warp - half * WK;
  const int row0 = blockIdx.x * 16 * RB;
  const size_t base = half ? (size_t)gridDim.x * 16 * RB : 0;  // 0, or I for the up half
  const int chunks = K >> 8;
  const bool own = (g & 3) == t, low = g < 4;
  Rows<RB> at;
#pragma unroll
  for (int r = 0; r < RB; ++r) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const size_t row = base + row0 + 16 * r + 8 * e + g;
      at.w[r][e] = qs + row * ldq + 16 * t + 128 * wk;
      at.s[r][e] = d + row * ld1 + 2 * t + 8 * wk;
    }
  }
  const unsigned short* xp = x + 32 * g + 256 * wk;
  float acc[RB][2];
#pragma unroll
  for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = 0.f;
  Chunk<RB> a, b;  // two buffers: one multiplied while the other is loaded
  unsigned xa[5][4], xb[5][4];  // x too where XP (else loaded at the chunk's start)
  if (wk < chunks) load_chunk<RB>(a, at, 0, 0);
  pdl_wait();  // x is the kernel before's output; y is written after
  if (XP && wk < chunks) load_x<SA>(xa, xp, own, t);
  for (int c = wk; c < chunks; c += 2 * WK) {
    if (c + WK < chunks) {
      load_chunk<RB>(b, at, 128 * WK, 8 * WK);
      if (XP) load_x<SA>(xb, xp + 256 * WK, own, t);
    }
    if (!XP) load_x<SA>(xa, xp, own, t);
    chunk_step<RB, NA, SA>(acc, a, xa, low, t);
    if (c + WK >= chunks) break;
    if (c + 2 * WK < chunks) {
      load_chunk<RB>(a, at, 256 * WK, 16 * WK);
      if (XP) load_x<SA>(xa, xp + 512 * WK, own, t);
    }
    if (!XP) load_x<SA>(xb, xp + 256 * WK, own, t);
    chunk_step<RB, NA, SA>(acc, b, xb, low, t);
    advance<RB>(at, 256 * WK, 16 * WK);
    xp += 512 * WK;
  }
#pragma unroll
  for (int r = 0; r < RB; ++r) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = acc[r][e];
      v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
      v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
      if (t == 0) red[warp][16 * r + 8 * e + g] = v;
    }
  }
  __syncthreads();
  if (GLU) {  // y [I] = silu(gate) * up rounded as kernels/silu_mul.py rounds it (its ex2.approx
    // of -g log2 e and div.full, as qmma.cu's epilogue)
    for (int i = threadIdx.x; i < 16 * RB; i += 32 * W) {  // (fewer threads than rows: loop)
      float gs = 0.f, us = 0.f;
#pragma unroll
      for (int w = 0; w < WK; ++w) {
        gs += red[w][i];
        us += red[WK + w][i];
      }
      const float gr = __uint_as_float((unsigned)bf16_rn(gs) << 16);
      const float ur = __uint_as_float((unsigned)bf16_rn(us) << 16);
      float e, act;
      asm("ex2.approx.f32 %0, %1;" : "=f"(e) : "f"(__fmul_rn(gr, -1.44269504088896341f)));
      asm("div.full.f32 %0, %1, %2;" : "=f"(act) : "f"(gr), "f"(__fadd_rn(1.f, e)));
      const float ar = __uint_as_float((unsigned)bf16_rn(act) << 16);
      y[row0 + i] = bf16_rn(__fmul_rn(ar, ur));
    }
    return;
  }
  for (int i = threadIdx.x; i < 16 * RB; i += 32 * W) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) v += red[w][i];
    y[row0 + i] = bf16_rn(v);
  }
}

#define COLS_KERNEL(NAME, RB, W, XP, GLU, NA, SA)                                                               \
  extern "C" __global__ void __launch_bounds__(32 * W)                                       \
      NAME(const unsigned short* __restrict__ x, const unsigned char* __restrict__ qs,        \
           const unsigned short* __restrict__ d, unsigned short* __restrict__ y, int K,       \
           int ldq, int ld1) {                                                               \
    q4_0_cols_body<RB, W, XP, GLU, NA, SA>(x, qs, d, y, K, ldq, ld1);                                          \
  }
