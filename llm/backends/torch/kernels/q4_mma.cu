// Q4_0 / Q4_K weights times 1..16 rows of x on the tensor cores (mma.sync m16n8k16: bf16 codes and
// x, fp32 sums), compiled at first use by NVRTC (kernels/q4_mma.py launches it; the engine uses the
// `_m8` kernels for 2..8 rows, the others are timed by bench/q4_mma_explore.py). x [M, K] bf16 (row
// stride ldx); qs [N, ldq] 32-bit words of 4-bit codes (per 32-group 4 words; byte i holds column i
// in its low nibble and column 16 + i in its high one: the engine's planes of both formats); Q4_0:
// p1 = d [N, K / 32] fp16 (row stride ld1 bytes); Q4_K: p1 = scales, p2 = mins [N, K / 32] u8 (row
// stride ld1 bytes), p3 = d, p4 = dmin [N, K / 256] fp16 (row stride ld2 elements), a weight (d *
// scale) * q - dmin * min; y [M, N] bf16 (row stride ldy). A CTA takes 32 rows of w (two 16-row mma
// blocks); its W warps split K's quads of groups. Lane (g, t) = (lane / 4, lane % 4) feeds rows g,
// g + 8 (+ 16, + 24) with word t of a group: columns 4t..4t+3 as its low nibbles (first mma, k =
// 2t, 2t+1, 2t+8, 2t+9) and 16+4t..16+4t+3 as its high ones (second mma); B's column n holds row 8
// * tile + n of x at the same columns (ONE: row 0 in all 8, so every lane's c0 / c2 is its rows'
// sum). Codes enter as bf16 128 + q (exact: the products are exact in fp32); a group adds d * (C -
// 136 * sum x) (Q4_0) or s * C - (128 s + o) * sum x with s = d * scale, o = dmin * min (Q4_K).
// Each warp streams its quads' codes and scales into its own ring of STAGES shared-memory buffers
// by cp.async (16-byte copies: a warp instruction takes 64 contiguous bytes of each of 8 rows) and
// reads its words from there (rows padded to 80 bytes: no bank conflicts). The warps' sums meet in
// shared memory in warp order: the result does not depend on timing. With PDL the first quads'
// copies start before the kernel before it has finished.
__device__ __forceinline__ unsigned lo2(unsigned w) {  // bytes 0, 1 -> bf16x2 128 + byte
  unsigned d; asm("prmt.b32 %0, %1, 0x43434343, 0x4140;" : "=r"(d) : "r"(w)); return d;
}
__device__ __forceinline__ unsigned hi2(unsigned w) {  // bytes 2, 3 -> bf16x2 128 + byte
  unsigned d; asm("prmt.b32 %0, %1, 0x43434343, 0x4342;" : "=r"(d) : "r"(w)); return d;
}
__device__ __forceinline__ float bf_lo(unsigned v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(unsigned v) { return __uint_as_float(v & 0xFFFF0000u); }
// PDL: wait for the kernel before (x is its output), then let the next one launch; both are
// no-ops in a launch without the programmatic attribute (and below sm_90)
__device__ __forceinline__ void wait_then_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ float h2f(unsigned h) {
  float f; asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "r"(h));
  return f;
}
// c (+)= A (rows g, g+8 of words w0, w1; nibbles by SHIFT) x B (b0, b1)
template <int SHIFT>
__device__ __forceinline__ void mma(float* c, unsigned w0, unsigned w1, unsigned b0, unsigned b1) {
  const unsigned l0 = (w0 >> SHIFT) & 0x0F0F0F0Fu, l1 = (w1 >> SHIFT) & 0x0F0F0F0Fu;
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(lo2(l0)), "r"(lo2(l1)), "r"(hi2(l0)), "r"(hi2(l1)), "r"(b0), "r"(b1));
}
#ifndef STAGES_N
#define STAGES_N 4
#endif
constexpr int STAGES = STAGES_N;  // quads a warp has in flight + 1 (at least 2)
constexpr int ROWB = 80;        // bytes a row of a stage's codes (64 + 16 of padding)
constexpr int STAGE = 32 * ROWB + 32 * 8;  // codes [32 rows][ROWB], scales [32 rows][8 bytes]
struct Quad {  // one lane's share of a quad of groups: words [group][row g + 8r], scales [r]
  unsigned w[4][4];
  uint2 d[4];  // Q4_0: 4 fp16 d; Q4_K: 4 u8 scales (x), 4 u8 mins (y)
  float dk[4], mk[4];  // Q4_K: the super-block's d and dmin
};
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
// the copies of quad q of the CTA's 32 rows (qs0, a0, b0: their row 0) into the stage at `dst`
template <int FMT>
__device__ __forceinline__ void issue_quad(unsigned dst, const unsigned char* qs0, size_t qrow,
                                           const unsigned char* a0, const unsigned char* b0,
                                           size_t srow, int q, int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // chunk 32i + lane: row (32i + lane) / 4, group lane % 4
    const int c = 32 * i + lane, row = c >> 2, part = c & 3;
    cp_async(dst + row * ROWB + part * 16, qs0 + row * qrow + q * 64 + part * 16, 16);
  }
  if (FMT == 0) {  // row lane's 4 scales
    cp_async(dst + 32 * ROWB + lane * 8, a0 + lane * srow + q * 8, 8);
  } else {  // row lane's 4 scales, then its 4 mins
    cp_async(dst + 32 * ROWB + lane * 8, a0 + lane * srow + q * 4, 4);
    cp_async(dst + 32 * ROWB + lane * 8 + 4, b0 + lane * srow + q * 4, 4);
  }
}
__device__ __forceinline__ void read_quad(Quad& f, const unsigned char* src, int gq, int t) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    f.d[r] = *reinterpret_cast<const uint2*>(src + 32 * ROWB + (gq + 8 * r) * 8);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      f.w[j][r] = *reinterpret_cast<const unsigned*>(src + (gq + 8 * r) * ROWB + j * 16 + t * 4);
  }
}
// acc += the quad's four groups (gi0..gi0+3) times x; xw[nt] points at the quad's x of tile nt
template <int FMT, int NT, bool ONE>
__device__ __forceinline__ void step(float (&acc)[2][NT][4], const Quad& f,
                                     const uint2* const (&xw)[NT], const bool (&live)[NT],
                                     const float* sx, int gi0, int G, int t) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int gi = gi0 + j;
    float dd[4], ee[4];  // Q4_K: s and 128 s + o of the group's rows
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (FMT == 0) {
        dd[r] = h2f(((j < 2) ? f.d[r].x : f.d[r].y) >> ((j & 1) * 16));
      } else {
        dd[r] = f.dk[r] * (float)((f.d[r].x >> (8 * j)) & 0xFFu);
        ee[r] = fmaf(128.f, dd[r], f.mk[r] * (float)((f.d[r].y >> (8 * j)) & 0xFFu));
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint2 xl = make_uint2(0u, 0u), xh = make_uint2(0u, 0u);
      if (live[nt]) {
        xl = __ldg(xw[nt] + 8 * j);
        xh = __ldg(xw[nt] + 8 * j + 4);
      }
      float c[4] = {0.f, 0.f, 0.f, 0.f}, e[4] = {0.f, 0.f, 0.f, 0.f};
      mma<0>(c, f.w[j][0], f.w[j][1], xl.x, xl.y);
      mma<0>(e, f.w[j][2], f.w[j][3], xl.x, xl.y);
      mma<4>(c, f.w[j][0], f.w[j][1], xh.x, xh.y);
      mma<4>(e, f.w[j][2], f.w[j][3], xh.x, xh.y);
      if (FMT == 1) {  // acc += s * C - (128 s + o) * sum x
        if (ONE) {
          const float s = sx[gi];
          acc[0][nt][0] = fmaf(dd[0], c[0], fmaf(-ee[0], s, acc[0][nt][0]));
          acc[0][nt][2] = fmaf(dd[1], c[2], fmaf(-ee[1], s, acc[0][nt][2]));
          acc[1][nt][0] = fmaf(dd[2], e[0], fmaf(-ee[2], s, acc[1][nt][0]));
          acc[1][nt][2] = fmaf(dd[3], e[2], fmaf(-ee[3], s, acc[1][nt][2]));
        } else {
          const float s0 = sx[(8 * nt + 2 * t) * G + gi];
          const float s1 = sx[(8 * nt + 2 * t + 1) * G + gi];
          acc[0][nt][0] = fmaf(dd[0], c[0], fmaf(-ee[0], s0, acc[0][nt][0]));
          acc[0][nt][1] = fmaf(dd[0], c[1], fmaf(-ee[0], s1, acc[0][nt][1]));
          acc[0][nt][2] = fmaf(dd[1], c[2], fmaf(-ee[1], s0, acc[0][nt][2]));
          acc[0][nt][3] = fmaf(dd[1], c[3], fmaf(-ee[1], s1, acc[0][nt][3]));
          acc[1][nt][0] = fmaf(dd[2], e[0], fmaf(-ee[2], s0, acc[1][nt][0]));
          acc[1][nt][1] = fmaf(dd[2], e[1], fmaf(-ee[2], s1, acc[1][nt][1]));
          acc[1][nt][2] = fmaf(dd[3], e[2], fmaf(-ee[3], s0, acc[1][nt][2]));
          acc[1][nt][3] = fmaf(dd[3], e[3], fmaf(-ee[3], s1, acc[1][nt][3]));
        }
      } else if (ONE) {
        const float s = sx[gi];
        acc[0][nt][0] = fmaf(dd[0], c[0] - s, acc[0][nt][0]);
        acc[0][nt][2] = fmaf(dd[1], c[2] - s, acc[0][nt][2]);
        acc[1][nt][0] = fmaf(dd[2], e[0] - s, acc[1][nt][0]);
        acc[1][nt][2] = fmaf(dd[3], e[2] - s, acc[1][nt][2]);
      } else {  // c0 / c2: column 2t of the tile, c1 / c3: 2t + 1
        const float s0 = sx[(8 * nt + 2 * t) * G + gi], s1 = sx[(8 * nt + 2 * t + 1) * G + gi];
        acc[0][nt][0] = fmaf(dd[0], c[0] - s0, acc[0][nt][0]);
        acc[0][nt][1] = fmaf(dd[0], c[1] - s1, acc[0][nt][1]);
        acc[0][nt][2] = fmaf(dd[1], c[2] - s0, acc[0][nt][2]);
        acc[0][nt][3] = fmaf(dd[1], c[3] - s1, acc[0][nt][3]);
        acc[1][nt][0] = fmaf(dd[2], e[0] - s0, acc[1][nt][0]);
        acc[1][nt][1] = fmaf(dd[2], e[1] - s1, acc[1][nt][1]);
        acc[1][nt][2] = fmaf(dd[3], e[2] - s0, acc[1][nt][2]);
        acc[1][nt][3] = fmaf(dd[3], e[3] - s1, acc[1][nt][3]);
      }
    }
  }
}
template <int FMT, int NT, bool ONE>
__device__ __forceinline__ void q4_mma(
    const unsigned short* __restrict__ x, const unsigned* __restrict__ qs,
    const unsigned char* __restrict__ p1, const unsigned char* __restrict__ p2,
    const unsigned short* __restrict__ p3, const unsigned short* __restrict__ p4,
    unsigned short* __restrict__ y, int M, int K, int ldq, int ld1, int ld2, int ldx, int ldy) {
  extern __shared__ __align__(16) float smem[];  // sx [8 * NT][K / 32]: the sum of x per row and
  // group (Q4_0: times 136), then the warps' partials [W][32][8 * NT]; from `ring`:
  // [W][STAGES][STAGE]
  const int W = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int G = K >> 5, Q = K >> 7;
  const int MP = ONE ? 1 : 8 * NT;
  const int gq = lane >> 2, t = lane & 3;
  const int q_lo = Q * warp / W, q_hi = Q * (warp + 1) / W, n = q_hi - q_lo;
  const int SX = (4 * (MP * G > W * 32 * MP ? MP * G : W * 32 * MP) + 15) & ~15;
  unsigned char* ring = reinterpret_cast<unsigned char*>(smem) + SX + warp * STAGES * STAGE;
  const unsigned ring_s = (unsigned)__cvta_generic_to_shared(ring);
  const unsigned char* qs0 =
      reinterpret_cast<const unsigned char*>(qs + (size_t)blockIdx.x * 32 * ldq);
  const unsigned char* a0 = p1 + (size_t)blockIdx.x * 32 * ld1;  // Q4_0 d, Q4_K scales
  const unsigned char* b0 = p2 + (size_t)blockIdx.x * 32 * ld1;  // Q4_K mins
  const size_t qrow = (size_t)4 * ldq, srow = ld1;
  const unsigned short* dk0 = p3 + (size_t)(blockIdx.x * 32 + gq) * ld2;  // Q4_K row g's d
  const unsigned short* mk0 = p4 + (size_t)(blockIdx.x * 32 + gq) * ld2;  // ... and dmin
  // the weights are no other kernel's output: their first quads are fetched before the wait
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < n) issue_quad<FMT>(ring_s + i * STAGE, qs0, qrow, a0, b0, srow, q_lo + i, lane);
    cp_commit();
  }
  wait_then_release();
  float* sx = smem;
  for (int i = threadIdx.x; i < MP * G; i += blockDim.x) {
    const int m = i / G, gi = i - m * G;
    float s = 0.f;
    if (m < M) {
      const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)m * ldx + gi * 32);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint4 v = __ldg(xp + j);
        s += bf_lo(v.x) + bf_hi(v.x) + bf_lo(v.y) + bf_hi(v.y) + bf_lo(v.z) + bf_hi(v.z)
             + bf_lo(v.w) + bf_hi(v.w);
      }
    }
    sx[i] = FMT == 0 ? 136.f * s : s;
  }
  __syncthreads();
  // B: lane (g, t) gives column g of each tile: row 8 * tile + g of x (ONE: row 0)
  const uint2* xw[NT];
  bool live[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = ONE ? 0 : 8 * nt + gq;
    live[nt] = m < M;
    xw[nt] = reinterpret_cast<const uint2*>(x + (size_t)(live[nt] ? m : 0) * ldx) + t + q_lo * 32;
  }
  // sums of C: [block of 16 rows][tile][c0..c3]; c1 / c3 unused with ONE
  float acc[2][NT][4];
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[b][nt][e] = 0.f;
  for (int i = 0; i < n; ++i) {
    cp_wait<STAGES - 2>();  // quad i's copies (this lane's) are done
    __syncwarp();           // ... and the other lanes'; stage (i - 1) % STAGES is read by all
    if (i + STAGES - 1 < n)
      issue_quad<FMT>(ring_s + ((i + STAGES - 1) % STAGES) * STAGE, qs0, qrow, a0, b0, srow,
                      q_lo + i + STAGES - 1, lane);
    cp_commit();
    Quad f;
    if (FMT == 1) {  // the quad's super-block (256 columns: two quads) of rows g + 8r
      const int sb = (q_lo + i) >> 1;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        f.dk[r] = h2f(__ldg(dk0 + (size_t)8 * r * ld2 + sb));
        f.mk[r] = h2f(__ldg(mk0 + (size_t)8 * r * ld2 + sb));
      }
    }
    read_quad(f, ring + (i % STAGES) * STAGE, gq, t);
    step<FMT, NT, ONE>(acc, f, xw, live, sx, 4 * (q_lo + i), G, t);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xw[nt] += 32;
  }
  cp_wait<0>();
  __syncthreads();  // sx is read no more: its space takes the partials
  float* wp = smem;  // [W][32 rows][MP]
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
  for (int i = threadIdx.x; i < 32 * MP; i += blockDim.x) {
    const int row = i / MP, m = i - row * MP;
    if (m >= M) continue;
    float s = 0.f;
    for (int w = 0; w < W; ++w) s += wp[(w * 32 + row) * MP + m];
    const unsigned u = __float_as_uint(s);
    y[(size_t)m * ldy + blockIdx.x * 32 + row] =
        (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // to nearest even (finite)
  }
}
#define ARGS const unsigned short* __restrict__ x, const unsigned* __restrict__ qs, \
    const unsigned char* __restrict__ p1, const unsigned char* __restrict__ p2, \
    const unsigned short* __restrict__ p3, const unsigned short* __restrict__ p4, \
    unsigned short* __restrict__ y, int M, int K, int ldq, int ld1, int ld2, int ldx, int ldy
#define PASS x, qs, p1, p2, p3, p4, y, M, K, ldq, ld1, ld2, ldx, ldy
#define KERNEL(name, FMT, NT, ONE) \
  extern "C" __global__ void __launch_bounds__(256, 2) name(ARGS) { q4_mma<FMT, NT, ONE>(PASS); }
KERNEL(q4_0_mma_m1, 0, 1, true)
KERNEL(q4_0_mma_m8, 0, 1, false)
KERNEL(q4_0_mma_m16, 0, 2, false)
KERNEL(q4_k_mma_m1, 1, 1, true)
KERNEL(q4_k_mma_m8, 1, 1, false)
KERNEL(q4_k_mma_m16, 1, 2, false)
