// Exploration, not in the engine (bench/q4_mma_explore.py compiles it by NVRTC and times it).
// Q4_0 GEMV for one row of x on the tensor cores (mma.sync m16n8k16: bf16 codes and x, fp32 sums).
// x [K] bf16; qs [N, ldq] 32-bit words of Q4_0 codes (per 32-group 4 words; byte i holds column i
// in its low nibble and column 16 + i in its high one); d [N, ldd] fp16; y [N] bf16.
// A CTA takes 32 rows (two 16-row mma blocks per warp); its W warps split K's groups in quads.
// Lane (g, t) = (lane / 4, lane % 4) feeds rows g, g + 8 (+ 16) with word t of a group: columns
// 4t..4t+3 as the low nibbles (first mma, k = 2t, 2t+1, 2t+8, 2t+9) and 16+4t.. as the high ones
// (second mma); B holds x's same columns in all 8 of its columns, so every lane's c0 / c2 is the
// sum of its rows. Codes enter as bf16 128 + q (exact); a group adds d * (C - 136 * sum x).
#define MAXW 8
__device__ __forceinline__ unsigned lo2(unsigned w) {  // bytes 0, 1 -> bf16x2 128 + byte
  unsigned d; asm("prmt.b32 %0, %1, 0x43434343, 0x4140;" : "=r"(d) : "r"(w)); return d;
}
__device__ __forceinline__ unsigned hi2(unsigned w) {  // bytes 2, 3 -> bf16x2 128 + byte
  unsigned d; asm("prmt.b32 %0, %1, 0x43434343, 0x4342;" : "=r"(d) : "r"(w)); return d;
}
__device__ __forceinline__ float bf_lo(unsigned v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(unsigned v) { return __uint_as_float(v & 0xFFFF0000u); }
__device__ __forceinline__ float h2f(unsigned short h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
// c (+)= A (rows g, g+8 of words w0, w1; nibbles picked by SHIFT) x B (b0, b1)
template <int SHIFT>
__device__ __forceinline__ void mma(float* c, unsigned w0, unsigned w1, unsigned b0, unsigned b1) {
  const unsigned l0 = (w0 >> SHIFT) & 0x0F0F0F0Fu, l1 = (w1 >> SHIFT) & 0x0F0F0F0Fu;
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(lo2(l0)), "r"(lo2(l1)), "r"(hi2(l0)), "r"(hi2(l1)), "r"(b0), "r"(b1));
}
extern "C" __global__ void __launch_bounds__(256) q4_0_mma_gemv(
    const unsigned short* __restrict__ x, const unsigned* __restrict__ qs,
    const unsigned short* __restrict__ d, unsigned short* __restrict__ y,
    int N, int K, int ldq, int ldd) {
  extern __shared__ float sx[];  // [K / 32] sums of x per group
  __shared__ float part[MAXW][32];
  const int G = K >> 5, W = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int gi = threadIdx.x; gi < G; gi += blockDim.x) {
    const uint4* xp = reinterpret_cast<const uint4*>(x + gi * 32);
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint4 v = __ldg(xp + j);
      s += bf_lo(v.x) + bf_hi(v.x) + bf_lo(v.y) + bf_hi(v.y) + bf_lo(v.z) + bf_hi(v.z)
           + bf_lo(v.w) + bf_hi(v.w);
    }
    sx[gi] = s;
  }
  __syncthreads();
  const int gq = lane >> 2, t = lane & 3;
  const int r0 = blockIdx.x * 32 + gq;  // rows r0, r0 + 8, r0 + 16, r0 + 24
  const int q_lo = (G >> 2) * warp / W, q_hi = (G >> 2) * (warp + 1) / W;  // quads of groups
  const unsigned* qp = qs + (size_t)r0 * ldq + t + q_lo * 16;
  const size_t q8 = (size_t)8 * ldq;
  const uint2* dp = reinterpret_cast<const uint2*>(d + (size_t)r0 * ldd) + q_lo;
  const size_t d8 = (size_t)2 * ldd;  // 8 rows of d in uint2
  const uint2* xw = reinterpret_cast<const uint2*>(x) + t + q_lo * 32;
  const float* sp = sx + q_lo * 4;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  for (int q = q_lo; q < q_hi; ++q) {
    uint2 dv[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) dv[r] = __ldg(dp + r * d8);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // the quad's groups
      const unsigned w0 = __ldg(qp + 4 * j), w1 = __ldg(qp + 4 * j + q8);
      const unsigned w2 = __ldg(qp + 4 * j + 2 * q8), w3 = __ldg(qp + 4 * j + 3 * q8);
      const uint2 xl = __ldg(xw + 8 * j), xh = __ldg(xw + 8 * j + 4);
      float c[4] = {0.f, 0.f, 0.f, 0.f}, e[4] = {0.f, 0.f, 0.f, 0.f};
      mma<0>(c, w0, w1, xl.x, xl.y);
      mma<0>(e, w2, w3, xl.x, xl.y);
      mma<4>(c, w0, w1, xh.x, xh.y);
      mma<4>(e, w2, w3, xh.x, xh.y);
      const float s = 136.f * sp[j];
      const unsigned sh = (j & 1) * 16;
      a0 = fmaf(h2f((unsigned short)(((j < 2) ? dv[0].x : dv[0].y) >> sh)), c[0] - s, a0);
      a1 = fmaf(h2f((unsigned short)(((j < 2) ? dv[1].x : dv[1].y) >> sh)), c[2] - s, a1);
      a2 = fmaf(h2f((unsigned short)(((j < 2) ? dv[2].x : dv[2].y) >> sh)), e[0] - s, a2);
      a3 = fmaf(h2f((unsigned short)(((j < 2) ? dv[3].x : dv[3].y) >> sh)), e[2] - s, a3);
    }
    qp += 16;
    dp += 1;
    xw += 32;
    sp += 4;
  }
  if (t == 0) {
    part[warp][gq] = a0;
    part[warp][gq + 8] = a1;
    part[warp][gq + 16] = a2;
    part[warp][gq + 24] = a3;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = 0.f;
    for (int w = 0; w < W; ++w) s += part[w][threadIdx.x];
    const unsigned u = __float_as_uint(s);
    y[blockIdx.x * 32 + threadIdx.x] = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}
