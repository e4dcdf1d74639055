// Projections: y = x W^T for every weight format, and the embedding gather.
//
// Kernels chosen by M and the weight format (the result may depend on M, never on the run):
// - gemv1 (M = 1, every format): a warp (or a few warps splitting K) streams 4 rows in 16-byte
//   chunks with several loads in flight per lane; warp shuffles reduce.
// - tc_skinny (M = 2..64, weights exact in bf16: BF16, FP8/FP4 with E8M0 scales): the weights are
//   the MMA's M side (mma.sync m16n8k16, fp32 accumulate) and every weight byte is read once;
//   tokens are the N side in tiles of 8. Activations are converted to bf16 by a pre-pass; fp32
//   activations are split x = hi + lo (two bf16) and multiplied as two MMAs into one accumulator,
//   which keeps close to fp32 accuracy.
// - mma (M > 64, weights exact in bf16): a 128-wide tile of weight rows is dequantised to bf16 into
//   shared memory (double-buffered through registers) and multiplied on the tensor cores with a
//   tile of 64 or 128 tokens (fp32 activations: hi and lo tiles, two MMAs). When the M x N tiles
//   would not fill the GPU, K is split; the splits' fp32 partials are summed in split order by a
//   second kernel (no atomics).
// - gemv (M >= 2 with weights not exact in bf16: F32, F16, FP8/FP4 with F32 scales; grouped
//   shapes the others cannot tile): each block owns R = 4 output rows and streams them once,
//   applying each decoded chunk to up to 8 activation rows held in registers.
#include <algorithm>
#include <utility>

#include "backend/cuda/gemm_core.cuh"

namespace sp::cuda {
namespace {

struct GemvArgs {
  DevMat w;
  const void* x = nullptr;  // [M, ldx] f32 or bf16
  int64_t ldx = 0;
  int64_t M = 0;
  void* y = nullptr;  // [M, ldy] f32 or bf16
  int64_t ldy = 0;
  int y_bf16 = 0;
  int xvec = 0;
  int64_t rows_per_group = 0;  // grouped: row n reads x columns [(n / rpg) * gstride, + K)
  int64_t gstride = 0;
};

template <int F, typename XT, int R, int MT>
__global__ void __launch_bounds__(256) gemv_kernel(GemvArgs a) {
  __shared__ float red[32 * R * MT];
  __shared__ float sums[R * MT];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * R;
  const int nv = static_cast<int>(a.w.out - n0 < R ? a.w.out - n0 : R);
  const XT* xb = static_cast<const XT*>(a.x) + (n0 / a.rows_per_group) * a.gstride;
  for (int64_t m0 = 0; m0 < a.M; m0 += MT) {
    const XT* xr[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) xr[m] = m0 + m < a.M ? xb + (m0 + m) * a.ldx : nullptr;
    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
    gemv_accum<F, R, MT, XT>(a.w, n0, nv, xr, a.xvec != 0, acc);
    block_sum<R, MT>(acc, red, sums);
    if (threadIdx.x < R * MT) {
      const int r = threadIdx.x / MT, m = threadIdx.x % MT;
      if (r < nv && m0 + m < a.M) {
        const float v = sums[threadIdx.x];
        if (a.y_bf16)
          static_cast<__nv_bfloat16*>(a.y)[(m0 + m) * a.ldy + n0 + r] = __float2bfloat16_rn(v);
        else
          static_cast<float*>(a.y)[(m0 + m) * a.ldy + n0 + r] = v;
      }
    }
  }
}

template <int F, typename XT, int MT>
void launch_gemv_mt(cudaStream_t s, const GemvArgs& a, bool one_row) {
  const int threads = gemv_threads(a.w.fmt, a.w.in);
  if (one_row) {
    gemv_kernel<F, XT, 1, MT><<<static_cast<unsigned>(a.w.out), threads, 0, s>>>(a);
  } else {
    constexpr int R = 4;
    gemv_kernel<F, XT, R, MT><<<static_cast<unsigned>((a.w.out + R - 1) / R), threads, 0, s>>>(a);
  }
  SP_CUDA_LAUNCH();
}

template <int F, typename XT>
void launch_gemv_x(cudaStream_t s, const GemvArgs& a, bool one_row) {
  if (a.M <= 1)
    launch_gemv_mt<F, XT, 1>(s, a, one_row);
  else if (a.M <= 2)
    launch_gemv_mt<F, XT, 2>(s, a, one_row);
  else if (a.M <= 4)
    launch_gemv_mt<F, XT, 4>(s, a, one_row);
  else
    launch_gemv_mt<F, XT, 8>(s, a, one_row);
}

template <int F>
void launch_gemv_f(cudaStream_t s, const GemvArgs& a, bool x_bf16, bool one_row) {
  if (x_bf16)
    launch_gemv_x<F, __nv_bfloat16>(s, a, one_row);
  else
    launch_gemv_x<F, float>(s, a, one_row);
}

void launch_gemv(cudaStream_t s, const GemvArgs& a, bool x_bf16) {
  // Four rows per block share each activation load unless a block would straddle two groups.
  const bool one_row = a.gstride != 0 && a.rows_per_group % 4 != 0;
  switch (a.w.fmt) {
    case kWF32:
      launch_gemv_f<kWF32>(s, a, x_bf16, one_row);
      break;
    case kWBF16:
      launch_gemv_f<kWBF16>(s, a, x_bf16, one_row);
      break;
    case kWF16:
      launch_gemv_f<kWF16>(s, a, x_bf16, one_row);
      break;
    case kWFP8:
      launch_gemv_f<kWFP8>(s, a, x_bf16, one_row);
      break;
    default:
      launch_gemv_f<kWFP4>(s, a, x_bf16, one_row);
      break;
  }
}

// ---- M = 1: one activation row ------------------------------------------------------------------
//
// A warp (or wk warps splitting K) owns R consecutive rows; every lane takes the 16-byte chunks
// c = t, t + 32 wk, ... of each row (t its index among the row group's lanes) and issues the loads
// of kG1Unroll chunks of all R rows before decoding any. Each chunk's products are summed, then
// scaled by the chunk's scale (E8M0 scales are powers of two, so this equals scaling each weight);
// F32 scales (S32) multiply the weights first, as the CPU does. Warp shuffles reduce; with wk > 1
// the warps' sums are added in warp order through shared memory.
//
// FP8 and FP4 decode with integer ops to f16 (weight_bits.h: e4m3 times 2^-8, e2m1 times 2^-14),
// then f16 -> f32; no conversion instructions on the 8-bit formats and no multiply per value for
// E8M0 scales. The FP8 chunk sum, a sum of products scaled by exactly 2^-8, is multiplied back by
// 2^8 before its scale, so every partial sum has the bits the unscaled decode would give (products
// below 2^-118 aside, where fp32 loses bits either way). A chunk holding an e4m3 NaN code gets a
// NaN scale: its row's output is NaN, as with a NaN decode and as on the CPU.

constexpr int kG1Threads = 256, kG1Unroll = 2;

struct Gemv1Args {
  DevMat w;
  const void* x = nullptr;  // one row, f32 or bf16
  int xvec = 0;
  void* y = nullptr;  // one row, f32 or bf16
  int y_bf16 = 0;
  int wk = 1;  // warps per row group: 1, 2, 4 or 8
  int64_t rows_per_group = 0, gstride = 0;
};

// part[r] += sum over the chunk's values of W[r, k] * x[k], in k order, for one chunk per row.
// S32: the weights are multiplied by the (F32) scale cs[r] first; otherwise the scale is left to
// the caller (FP8: the sum is 2^-8 times the unscaled one).
template <int F, typename XT, int R, bool S32>
__device__ __forceinline__ void gemv1_chunk(const uint4 (&cw)[R], const float (&cs)[R],
                                            const XT* xr, int64_t k0, int64_t K, bool xvec,
                                            float (&part)[R]) {
  if constexpr (F == kWFP8) {
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      float xv[4];
      load_x4(xr, k0 + 4 * p, K, xvec, xv);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float wv[4];
        decode4_e4m3_raw(word_of(cw[r], p), wv);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          // F32 scales: (w 2^-8 * 2^8) * s rounds once, like the CPU's w * s.
          const float wi = S32 ? (wv[i] * 256.0f) * cs[r] : wv[i];
          part[r] = fmaf(wi, xv[i], part[r]);
        }
      }
    }
  } else if constexpr (F == kWFP4) {
    // Word p holds values 8p .. 8p + 7; pair i of its decode holds values i and i + 4.
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      float xa[4], xb[4];
      load_x4(xr, k0 + 8 * p, K, xvec, xa);
      load_x4(xr, k0 + 8 * p + 4, K, xvec, xb);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        uint32_t h[4];
        e2m1x8_to_f16x2_bits(word_of(cw[r], p), h);
        float lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 f = f16x2_bits_to_float2(h[i]);
          lo[i] = S32 ? f.x * cs[r] : f.x;
          hi[i] = S32 ? f.y * cs[r] : f.y;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) part[r] = fmaf(lo[i], xa[i], part[r]);
#pragma unroll
        for (int i = 0; i < 4; ++i) part[r] = fmaf(hi[i], xb[i], part[r]);
      }
    }
  } else {
    constexpr int V = FmtTraits<F>::kVals;
#pragma unroll
    for (int p = 0; p < V / 4; ++p) {
      float xv[4];
      load_x4(xr, k0 + 4 * p, K, xvec, xv);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float wv[4];
        decode4<F>(cw[r], p, 1.0f, wv);
#pragma unroll
        for (int i = 0; i < 4; ++i) part[r] = fmaf(wv[i], xv[i], part[r]);
      }
    }
  }
}

template <int F, typename XT, int R, bool S32>
__global__ void __launch_bounds__(kG1Threads, 2) gemv1_kernel(Gemv1Args a) {
  constexpr int V = FmtTraits<F>::kVals;
  constexpr int kBytesPerVal2 = F == kWF32 ? 8 : F == kWFP8 ? 2 : F == kWFP4 ? 1 : 4;
  constexpr int U = kG1Unroll;
  constexpr bool kDeferred = (F == kWFP8 || F == kWFP4) && !S32;
  __shared__ float red[kG1Threads / 32][R];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wk = a.wk, rg = warp / wk, wki = warp % wk;
  const int gpb = kG1Threads / 32 / wk;  // row groups per block tile
  const int64_t N = a.w.out, K = a.w.in;
  const int64_t nchunks = (K + V - 1) / V;
  const int T = wk * 32, t = wki * 32 + lane;
  // Every warp of a block runs the same sequence of (tile, iteration) units, so the barriers of
  // the wk > 1 reduction are reached by all.
  const int iters = static_cast<int>((nchunks + int64_t{T} * U - 1) / (int64_t{T} * U));
  const int64_t ntiles = (N + int64_t{gpb} * R - 1) / (int64_t{gpb} * R);
  const bool wvec = a.w.vec != 0, xvec = a.xvec != 0;

  uint4 wc[U][R];
  float sc[U][R];
  // Issues the loads of unit (tile, it): chunks t + (it U + u) T of the warp's R rows.
  auto load = [&](int64_t tile, int it) {
    const int64_t n0 = (tile * gpb + rg) * R;
    const int nv = n0 >= N ? 0 : (N - n0 < R ? static_cast<int>(N - n0) : R);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = t + (static_cast<int64_t>(it) * U + u) * T;
      const int64_t k0 = c * V;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const bool ok = c < nchunks && r < nv;
        wc[u][r] = ok ? ld_chunk(a.w.data + (n0 + r) * a.w.row_bytes, k0 * kBytesPerVal2 / 2,
                                 a.w.row_bytes, wvec)
                      : make_uint4(0, 0, 0, 0);
        if constexpr (F == kWFP8) {
          // The R rows (R divides 128, n0 % R == 0) share one 128 x 128 scale block.
          sc[u][r] =
              r == 0 ? (c < nchunks && nv > 0 ? chunk_scale<F>(a.w, n0, k0) : 0.0f) : sc[u][0];
        } else {
          sc[u][r] = ok ? chunk_scale<F>(a.w, n0 + r, k0) : 0.0f;
        }
      }
    }
  };

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  int64_t tile = blockIdx.x;
  int it = 0;
  if (tile < ntiles) load(tile, it);
  while (tile < ntiles) {
    uint4 cw[U][R];
    float cs[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) cw[u][r] = wc[u][r], cs[u][r] = sc[u][r];
    const int64_t ctile = tile;
    const int cit = it;
    if (++it == iters) {
      it = 0;
      tile += gridDim.x;
    }
    if (tile < ntiles) load(tile, it);  // in flight while this unit computes

    const int64_t n0 = (ctile * gpb + rg) * R;
    const int nv = n0 >= N ? 0 : (N - n0 < R ? static_cast<int>(N - n0) : R);
    if (nv > 0) {
      const XT* xr = static_cast<const XT*>(a.x) + (n0 / a.rows_per_group) * a.gstride;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = t + (static_cast<int64_t>(cit) * U + u) * T;
        if (c >= nchunks) break;
        if constexpr (F == kWFP8) {
#pragma unroll
          for (int r = 0; r < R; ++r)
            if (chunk_has_e4m3_nan(cw[u][r])) cs[u][r] = __int_as_float(0x7fc00000);
        }
        float part[R];
#pragma unroll
        for (int r = 0; r < R; ++r) part[r] = 0.0f;
        gemv1_chunk<F, XT, R, S32>(cw[u], cs[u], xr, c * V, K, xvec, part);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if constexpr (kDeferred)
            acc[r] = fmaf(F == kWFP8 ? part[r] * 256.0f : part[r], cs[u][r], acc[r]);
          else
            acc[r] += part[r];
        }
      }
    }
    if (cit != iters - 1) continue;

      // The tile's last unit: reduce and write the R rows.
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
    float v = acc[0];
#pragma unroll
    for (int r = 1; r < R; ++r)
      if (lane == r) v = acc[r];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    if (wk > 1) {
      if (lane < R) red[warp][lane] = v;
      __syncthreads();
      if (wki == 0 && lane < R) {
        v = 0.0f;
        for (int j = 0; j < wk; ++j) v += red[warp + j][lane];
      }
      __syncthreads();
    }
    if (wki == 0 && lane < nv) {
      if (a.y_bf16)
        static_cast<__nv_bfloat16*>(a.y)[n0 + lane] = __float2bfloat16_rn(v);
      else
        static_cast<float*>(a.y)[n0 + lane] = v;
    }
  }
}

// Resident blocks of a kernel on the current device (the grid of the persistent kernels; the
// results do not depend on it).
template <typename Kern>
int resident_blocks(Kern k, int threads) {
  int dev = 0, sms = 0, per_sm = 0;
  SP_CUDA(cudaGetDevice(&dev));
  SP_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  SP_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, threads, 0));
  return std::max(1, sms * std::max(1, per_sm));
}

template <int F, typename XT, bool S32>
void launch_gemv1_x(cudaStream_t s, Gemv1Args a, bool one_row) {
  const int V = F == kWF32 ? 4 : F == kWFP8 ? 16 : F == kWFP4 ? 32 : 8;
  const int R = one_row ? 1 : 4;
  const int64_t chunks = (a.w.in + V - 1) / V, groups = (a.w.out + R - 1) / R;
  // Split K over more warps while a lane would loop more than twice, or while there are few row
  // groups and every lane still gets a chunk (a function of the shape only).
  int wk = 1;
  while (wk < 8 && chunks > int64_t{32} * wk * 2 * kG1Unroll) wk *= 2;
  while (wk < 8 && groups * wk < 4096 && chunks > int64_t{32} * wk) wk *= 2;
  a.wk = wk;
  const int64_t rows_per_block = int64_t{kG1Threads / 32 / wk} * R;
  const int64_t tiles = (a.w.out + rows_per_block - 1) / rows_per_block;
  auto kern = one_row ? gemv1_kernel<F, XT, 1, S32> : gemv1_kernel<F, XT, 4, S32>;
  static const int resident1 = resident_blocks(gemv1_kernel<F, XT, 1, S32>, kG1Threads);
  static const int resident4 = resident_blocks(gemv1_kernel<F, XT, 4, S32>, kG1Threads);
  const unsigned grid =
      static_cast<unsigned>(std::min<int64_t>(tiles, one_row ? resident1 : resident4));
  kern<<<grid, kG1Threads, 0, s>>>(a);
  SP_CUDA_LAUNCH();
}

template <int F, bool S32>
void launch_gemv1_s(cudaStream_t s, const Gemv1Args& a, bool x_bf16, bool one_row) {
  if (x_bf16)
    launch_gemv1_x<F, __nv_bfloat16, S32>(s, a, one_row);
  else
    launch_gemv1_x<F, float, S32>(s, a, one_row);
}

template <int F>
void launch_gemv1_f(cudaStream_t s, const Gemv1Args& a, bool x_bf16, bool one_row) {
  if constexpr (F == kWFP8 || F == kWFP4) {
    if (a.w.scale_f32) {
      launch_gemv1_s<F, true>(s, a, x_bf16, one_row);
      return;
    }
  }
  launch_gemv1_s<F, false>(s, a, x_bf16, one_row);
}

void launch_gemv1(cudaStream_t s, const Gemv1Args& a, bool x_bf16) {
  const bool one_row = a.gstride != 0 && a.rows_per_group % 4 != 0;
  switch (a.w.fmt) {
    case kWF32:
      launch_gemv1_f<kWF32>(s, a, x_bf16, one_row);
      break;
    case kWBF16:
      launch_gemv1_f<kWBF16>(s, a, x_bf16, one_row);
      break;
    case kWF16:
      launch_gemv1_f<kWF16>(s, a, x_bf16, one_row);
      break;
    case kWFP8:
      launch_gemv1_f<kWFP8>(s, a, x_bf16, one_row);
      break;
    default:
      launch_gemv1_f<kWFP4>(s, a, x_bf16, one_row);
      break;
  }
}

// ---- tensor-core tiles --------------------------------------------------------------------------

constexpr int kBN = 128, kBK = 32, kPad = 8, kMmaThreads = 256;

struct MmaArgs {
  DevMat w;
  const __nv_bfloat16* x = nullptr;    // [M, ldx]
  const __nv_bfloat16* xlo = nullptr;  // LO: the low halves, [M, ldx]
  int64_t ldx = 0;
  int64_t M = 0;
  void* y = nullptr;  // [M, ldy] (splits == 1) or partials [splits, M, N] f32
  int64_t ldy = 0;
  int y_bf16 = 0;
  int xvec = 0;  // rows 16-byte aligned
  int64_t rows_per_group = 0, gstride = 0;
  int ktiles_per_split = 0;
  int splits = 1;
};

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One thread's share of a k-tile, raw: 8 activation values per A chunk, 16 weight values of one
// row (the scale with them).
template <int F, int BM, bool LO>
struct TileRegs {
  static constexpr int kAChunks = BM * kBK / 8 / kMmaThreads > 0 ? BM* kBK / 8 / kMmaThreads : 1;
  uint4 a[kAChunks];
  uint4 al[LO ? kAChunks : 1];  // the low halves of split fp32 activations
  uint4 w[2];
  float s;
};

// 8 bf16 activation values at src (k .. k + 8 of a row of K), zeros past K.
__device__ __forceinline__ uint4 load_a8(const __nv_bfloat16* src, int64_t k, int64_t K, bool vec) {
  if (vec && k + 8 <= K) return __ldg(reinterpret_cast<const uint4*>(src));
  uint32_t v[4] = {0, 0, 0, 0};
  for (int j = 0; j < 8; ++j)
    if (k + j < K)
      v[j / 2] |= uint32_t(reinterpret_cast<const uint16_t*>(src)[j]) << (16 * (j % 2));
  return make_uint4(v[0], v[1], v[2], v[3]);
}

template <int F, int BM, bool LO>
__device__ __forceinline__ void load_tile(const MmaArgs& p, int64_t m0, int64_t n0, int64_t kt,
                                          const __nv_bfloat16* xb, const __nv_bfloat16* xlb,
                                          TileRegs<F, BM, LO>& t) {
  const int64_t K = p.w.in;
  const int64_t k0 = kt * kBK;
  constexpr int kChunksA = BM * kBK / 8;
#pragma unroll
  for (int i = 0; i < TileRegs<F, BM, LO>::kAChunks; ++i) {
    const int idx = threadIdx.x + i * kMmaThreads;
    t.a[i] = make_uint4(0, 0, 0, 0);
    if constexpr (LO) t.al[i] = make_uint4(0, 0, 0, 0);
    if (idx >= kChunksA) continue;
    const int64_t m = m0 + idx / 4, k = k0 + (idx % 4) * 8;
    if (m >= p.M) continue;
    t.a[i] = load_a8(xb + m * p.ldx + k, k, K, p.xvec != 0);
    if constexpr (LO) t.al[i] = load_a8(xlb + m * p.ldx + k, k, K, p.xvec != 0);
  }
  const int64_t n = n0 + threadIdx.x / 2;
  const int64_t kw = k0 + (threadIdx.x % 2) * 16;
  t.w[0] = t.w[1] = make_uint4(0, 0, 0, 0);
  t.s = 0.0f;
  if (n < p.w.out && kw < K) {
    const uint8_t* row = p.w.data + n * p.w.row_bytes;
    const bool vec = p.w.vec != 0;
    if constexpr (F == kWBF16) {
      t.w[0] = ld_chunk(row, kw * 2, p.w.row_bytes, vec);
      t.w[1] = ld_chunk(row, kw * 2 + 16, p.w.row_bytes, vec);
    } else if constexpr (F == kWFP8) {
      t.w[0] = ld_chunk(row, kw, p.w.row_bytes, vec);
      t.s = chunk_scale<F>(p.w, n, kw);
    } else {
      // FP4: 16 values are 8 bytes; rows are 16-byte multiples (K % 32 == 0).
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(row + kw / 2));
      t.w[0] = make_uint4(v.x, v.y, 0, 0);
      t.s = chunk_scale<F>(p.w, n, kw);
    }
  }
}

template <int F, int BM, bool LO>
__device__ __forceinline__ void store_tile(const TileRegs<F, BM, LO>& t, __nv_bfloat16* As,
                                           __nv_bfloat16* Al, __nv_bfloat16* Bs) {
  constexpr int kChunksA = BM * kBK / 8;
#pragma unroll
  for (int i = 0; i < TileRegs<F, BM, LO>::kAChunks; ++i) {
    const int idx = threadIdx.x + i * kMmaThreads;
    if (idx < kChunksA) {
      *reinterpret_cast<uint4*>(As + (idx / 4) * (kBK + kPad) + (idx % 4) * 8) = t.a[i];
      if constexpr (LO)
        *reinterpret_cast<uint4*>(Al + (idx / 4) * (kBK + kPad) + (idx % 4) * 8) = t.al[i];
    }
  }
  uint32_t o[8];
  if constexpr (F == kWBF16) {
    o[0] = t.w[0].x, o[1] = t.w[0].y, o[2] = t.w[0].z, o[3] = t.w[0].w;
    o[4] = t.w[1].x, o[5] = t.w[1].y, o[6] = t.w[1].z, o[7] = t.w[1].w;
  } else {
    // Exact: e4m3 and e2m1 times a power of two fit bf16's 8-bit significand.
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      float v[4];
      decode4<F>(t.w[0], p, t.s, v);
      o[2 * p] = pack_bf16(v[0], v[1]);
      o[2 * p + 1] = pack_bf16(v[2], v[3]);
    }
  }
  __nv_bfloat16* dst = Bs + (threadIdx.x / 2) * (kBK + kPad) + (threadIdx.x % 2) * 16;
  reinterpret_cast<uint4*>(dst)[0] = make_uint4(o[0], o[1], o[2], o[3]);
  reinterpret_cast<uint4*>(dst)[1] = make_uint4(o[4], o[5], o[6], o[7]);
}

// Block tile BM x 128 x 32; 8 warps as 2 (M) x 4 (N), each BM/2 x 32. LO: the activations are
// fp32 split as hi + lo (two bf16 tiles), each multiplied into the same fp32 accumulator.
template <int F, int BM, bool LO>
__global__ void __launch_bounds__(kMmaThreads) mma_kernel(MmaArgs p) {
  constexpr int MI = BM / 32;  // m16 tiles per warp
  constexpr int NI = 4;        // n8 tiles per warp
  constexpr int kLd = kBK + kPad;
  __shared__ __align__(16) __nv_bfloat16 As[2][BM * kLd];
  __shared__ __align__(16) __nv_bfloat16 Al[2][LO ? BM * kLd : 8];
  __shared__ __align__(16) __nv_bfloat16 Bs[2][kBN * kLd];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t ktiles = (p.w.in + kBK - 1) / kBK;
  const int64_t kt0 = static_cast<int64_t>(blockIdx.z) * p.ktiles_per_split;
  const int64_t kt1 = ktiles < kt0 + p.ktiles_per_split ? ktiles : kt0 + p.ktiles_per_split;
  const __nv_bfloat16* xb = p.x + (n0 / p.rows_per_group) * p.gstride;
  const __nv_bfloat16* xlb = LO ? p.xlo + (n0 / p.rows_per_group) * p.gstride : nullptr;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / 4, wn = warp % 4, g = lane >> 2, tq = lane & 3;

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  TileRegs<F, BM, LO> regs;
  if (kt0 < kt1) {
    load_tile<F, BM, LO>(p, m0, n0, kt0, xb, xlb, regs);
    store_tile<F, BM, LO>(regs, As[0], Al[0], Bs[0]);
  }
  __syncthreads();
  int cur = 0;
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    const bool more = kt + 1 < kt1;
    if (more) load_tile<F, BM, LO>(p, m0, n0, kt + 1, xb, xlb, regs);
    const __nv_bfloat16* A = As[cur];
    const __nv_bfloat16* AL = Al[cur];
    const __nv_bfloat16* B = Bs[cur];
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[MI][4], al[LO ? MI : 1][4], bfr[NI][2];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        const int off = (wm * (BM / 2) + i * 16 + g) * kLd + ks + 2 * tq;
        const __nv_bfloat16* base = A + off;
        af[i][0] = *reinterpret_cast<const uint32_t*>(base);
        af[i][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kLd);
        af[i][2] = *reinterpret_cast<const uint32_t*>(base + 8);
        af[i][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kLd + 8);
        if constexpr (LO) {
          const __nv_bfloat16* lb = AL + off;
          al[i][0] = *reinterpret_cast<const uint32_t*>(lb);
          al[i][1] = *reinterpret_cast<const uint32_t*>(lb + 8 * kLd);
          al[i][2] = *reinterpret_cast<const uint32_t*>(lb + 8);
          al[i][3] = *reinterpret_cast<const uint32_t*>(lb + 8 * kLd + 8);
        }
      }
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        const __nv_bfloat16* base = B + (wn * 32 + j * 8 + g) * kLd + ks + 2 * tq;
        bfr[j][0] = *reinterpret_cast<const uint32_t*>(base);
        bfr[j][1] = *reinterpret_cast<const uint32_t*>(base + 8);
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) {
          mma_bf16(acc[i][j], af[i], bfr[j]);
          if constexpr (LO) mma_bf16(acc[i][j], al[i], bfr[j]);
        }
    }
    if (more) store_tile<F, BM, LO>(regs, As[cur ^ 1], Al[cur ^ 1], Bs[cur ^ 1]);
    __syncthreads();
    cur ^= 1;
  }

  // Epilogue: the fragment of C[g (+8)][2 tq (+1)] of every (i, j) tile.
  const int64_t N = p.w.out;
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t m = m0 + wm * (BM / 2) + i * 16 + g + (q >= 2 ? 8 : 0);
        const int64_t n = n0 + wn * 32 + j * 8 + 2 * tq + (q & 1);
        if (m >= p.M || n >= N) continue;
        if (p.splits > 1) {
          static_cast<float*>(p.y)[(blockIdx.z * p.M + m) * N + n] = acc[i][j][q];
        } else if (p.y_bf16) {
          static_cast<__nv_bfloat16*>(p.y)[m * p.ldy + n] = __float2bfloat16_rn(acc[i][j][q]);
        } else {
          static_cast<float*>(p.y)[m * p.ldy + n] = acc[i][j][q];
        }
      }
}

// y[m, n] = sum over splits in order of part[s, m, n].
__global__ void splitk_reduce_kernel(const float* part, int splits, int64_t M, int64_t N, void* y,
                                     int64_t ldy, int y_bf16) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  float s = 0.0f;
  for (int k = 0; k < splits; ++k) s += part[k * M * N + i];
  const int64_t m = i / N, n = i % N;
  if (y_bf16)
    static_cast<__nv_bfloat16*>(y)[m * ldy + n] = __float2bfloat16_rn(s);
  else
    static_cast<float*>(y)[m * ldy + n] = s;
}

template <int F, int BM, bool LO>
void launch_mma_bm(cudaStream_t s, const MmaArgs& p, dim3 grid) {
  mma_kernel<F, BM, LO><<<grid, kMmaThreads, 0, s>>>(p);
  SP_CUDA_LAUNCH();
}

// bm: 64 or 128 (64 with split activations, whose two A tiles would not fit 48 KB at 128).
template <int F>
void launch_mma_f(cudaStream_t s, const MmaArgs& p, int bm, dim3 grid) {
  if (p.xlo != nullptr)
    launch_mma_bm<F, 64, true>(s, p, grid);
  else if (bm == 64)
    launch_mma_bm<F, 64, false>(s, p, grid);
  else
    launch_mma_bm<F, 128, false>(s, p, grid);
}

// ---- skinny M (2..64): tensor cores with the weights as the MMA's M side
// -------------------------
//
// Weights exact in bf16 (BF16, FP8/FP4 with E8M0 scales) stream once: a warp owns 32 rows (two
// m16 tiles) and a k-step of 4 chunks per row; lane (g, q) loads the 16-byte chunk q of rows g and
// g + 8 of each tile, dequantises it to bf16 pairs (with the scale) and uses them as the A
// fragments of V / 4 m16n8k16 MMAs. The dot product's k order inside a step is a permutation of the
// step's k: the same lane supplies both the A and the B values of a virtual k, so the activations
// are read at the same real k (V contiguous values of token g at the lane's chunk). Tokens are the
// N side, NT tiles of 8. Activations come as bf16 from a pre-pass (padded rows, zero past the
// columns); fp32 activations as hi = bf16(x) and lo = bf16(x - hi), two MMAs into one fp32
// accumulator. kTcWK warps split a block's steps (warp w takes w, w + kTcWK, ...) and add their
// accumulators in a fixed tree through shared memory; K splits across blocks go through ordered
// fp32 partials.

constexpr int kTcWarps = 8, kTcWK = 4, kTcRT = 2;
constexpr int kTcRows = 16 * kTcRT * (kTcWarps / kTcWK);  // rows per block (64)

struct TcArgs {
  DevMat w;
  const __nv_bfloat16* xh = nullptr;  // [M, ldp]
  const __nv_bfloat16* xl = nullptr;  // LO: [M, ldp]
  int64_t ldp = 0;
  int64_t M = 0;
  void* y = nullptr;  // [M, ldy] (splits == 1) or partials [splits, M, N] f32
  int64_t ldy = 0;
  int y_bf16 = 0;
  int64_t rows_per_group = 0, gstride = 0;
  int64_t steps_per_split = 0;
  int splits = 1;
};

// The V values of a 16-byte chunk as V / 2 bf16 pairs (value 2i in the low half of word i).
template <int F>
__device__ __forceinline__ void dequant_pairs(const uint4& c, float s,
                                              uint32_t (&o)[FmtTraits<F>::kVals / 2]) {
  if constexpr (F == kWBF16) {
    o[0] = c.x, o[1] = c.y, o[2] = c.z, o[3] = c.w;
  } else {
#pragma unroll
    for (int p = 0; p < FmtTraits<F>::kVals / 4; ++p) {
      float v[4];
      decode4<F>(c, p, s, v);
      o[2 * p] = pack_bf16(v[0], v[1]);
      o[2 * p + 1] = pack_bf16(v[2], v[3]);
    }
  }
}

template <int F, int NT, bool LO>
__global__ void __launch_bounds__(kTcWarps * 32, NT <= 2 ? 2 : 1) tc_skinny_kernel(TcArgs a) {
  constexpr int V = FmtTraits<F>::kVals, KS = 4 * V;
  constexpr int kBytesPerVal2 = F == kWFP8 ? 2 : F == kWFP4 ? 1 : 4;
  constexpr int U = NT == 1 && F != kWFP4 ? 2 : 1;  // k-steps loaded together (registers)
  constexpr int kAcc = kTcRT * NT * 4;
  __shared__ float red[(kTcWarps / 2) * kAcc * 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int rb = warp / kTcWK, wk = warp % kTcWK;
  const int64_t N = a.w.out, K = a.w.in;
  const int64_t steps = (K + KS - 1) / KS;
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * a.steps_per_split;
  const int64_t s1 = steps < s0 + a.steps_per_split ? steps : s0 + a.steps_per_split;
  const int64_t tiles = (N + kTcRows - 1) / kTcRows;
  // Every warp of the block runs the same (tile, iteration) units: iteration it covers the
  // warp's steps s0 + wk + (it U + u) kTcWK (those at or past s1 load and add nothing).
  const int iters = static_cast<int>((s1 - s0 + int64_t{kTcWK} * U - 1) / (int64_t{kTcWK} * U));
  const bool wvec = a.w.vec != 0;

  uint4 raw[U][kTcRT][2];
  float sc[U][kTcRT][2];
  auto load = [&](int64_t tile, int it) {
    const int64_t nb = tile * kTcRows + rb * 16 * kTcRT;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t st = s0 + wk + (static_cast<int64_t>(it) * U + u) * kTcWK;
      const int64_t k0 = st * KS + tq * V;
#pragma unroll
      for (int rt = 0; rt < kTcRT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t n = nb + rt * 16 + g + 8 * h;
          const bool ok = st < s1 && n < N && k0 < K;
          raw[u][rt][h] = ok ? ld_chunk(a.w.data + n * a.w.row_bytes, k0 * kBytesPerVal2 / 2,
                                        a.w.row_bytes, wvec)
                             : make_uint4(0, 0, 0, 0);
          sc[u][rt][h] = ok ? chunk_scale<F>(a.w, n, k0) : 0.0f;
        }
    }
  };

  float acc[kTcRT][NT][4];
#pragma unroll
  for (int rt = 0; rt < kTcRT; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[rt][nt][q] = 0.0f;

  int64_t tile = blockIdx.x;
  int it = 0;
  if (tile < tiles && iters > 0) load(tile, it);
  while (tile < tiles && iters > 0) {
    uint4 cur[U][kTcRT][2];
    float cs[U][kTcRT][2];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int rt = 0; rt < kTcRT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) cur[u][rt][h] = raw[u][rt][h], cs[u][rt][h] = sc[u][rt][h];
    const int64_t ctile = tile;
    const int cit = it;
    if (++it == iters) {
      it = 0;
      tile += gridDim.x;
    }
    if (tile < tiles) load(tile, it);  // in flight while this unit computes

    // Activations of this lane's tokens at the tile's group.
    const int64_t col0 = (ctile * kTcRows / a.rows_per_group) * a.gstride + tq * V;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t su = s0 + wk + (static_cast<int64_t>(cit) * U + u) * kTcWK;
      if (su >= s1) break;
      uint32_t aw[kTcRT][2][V / 2];
#pragma unroll
      for (int rt = 0; rt < kTcRT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) dequant_pairs<F>(cur[u][rt][h], cs[u][rt][h], aw[rt][h]);
      const int64_t xo = col0 + su * KS;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int64_t m = nt * 8 + g;
#pragma unroll
        for (int q = 0; q < V / 8; ++q) {
          uint4 bh = make_uint4(0, 0, 0, 0), bl = make_uint4(0, 0, 0, 0);
          if (m < a.M) {
            bh = __ldg(reinterpret_cast<const uint4*>(a.xh + m * a.ldp + xo + 8 * q));
            if constexpr (LO)
              bl = __ldg(reinterpret_cast<const uint4*>(a.xl + m * a.ldp + xo + 8 * q));
          }
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            const int j = 2 * q + jj;
            const uint32_t b[2] = {jj ? bh.z : bh.x, jj ? bh.w : bh.y};
            const uint32_t bb[2] = {jj ? bl.z : bl.x, jj ? bl.w : bl.y};
#pragma unroll
            for (int rt = 0; rt < kTcRT; ++rt) {
              const uint32_t af[4] = {aw[rt][0][2 * j], aw[rt][1][2 * j], aw[rt][0][2 * j + 1],
                                      aw[rt][1][2 * j + 1]};
              mma_bf16(acc[rt][nt], af, b);
              if constexpr (LO) mma_bf16(acc[rt][nt], af, bb);
            }
          }
        }
      }
    }
    if (cit != iters - 1) continue;

      // The tile's last unit. The kTcWK warps of a row group add up: in each round the upper half
      // hands its accumulators to the lower half.
#pragma unroll
    for (int hh = kTcWK / 2; hh >= 1; hh /= 2) {
      if (wk >= hh && wk < 2 * hh) {
        float* dst = red + (rb * (kTcWK / 2) + (wk - hh)) * kAcc * 32;
#pragma unroll
        for (int rt = 0; rt < kTcRT; ++rt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) dst[((rt * NT + nt) * 4 + q) * 32 + lane] = acc[rt][nt][q];
      }
      __syncthreads();
      if (wk < hh) {
        const float* src = red + (rb * (kTcWK / 2) + wk) * kAcc * 32;
#pragma unroll
        for (int rt = 0; rt < kTcRT; ++rt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[rt][nt][q] += src[((rt * NT + nt) * 4 + q) * 32 + lane];
      }
      __syncthreads();
    }
    const int64_t nb = ctile * kTcRows + rb * 16 * kTcRT;
#pragma unroll
    for (int rt = 0; rt < kTcRT; ++rt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t n = nb + rt * 16 + g + (q >= 2 ? 8 : 0);
          const int64_t m = nt * 8 + 2 * tq + (q & 1);
          const float v = acc[rt][nt][q];
          acc[rt][nt][q] = 0.0f;
          if (wk != 0 || n >= N || m >= a.M) continue;
          if (a.splits > 1)
            static_cast<float*>(a.y)[(blockIdx.y * a.M + m) * N + n] = v;
          else if (a.y_bf16)
            static_cast<__nv_bfloat16*>(a.y)[m * a.ldy + n] = __float2bfloat16_rn(v);
          else
            static_cast<float*>(a.y)[m * a.ldy + n] = v;
        }
  }
}

template <int F, int NT, bool LO>
void launch_tc_k(cudaStream_t s, const TcArgs& a, dim3 grid) {
  // Persistent: at most the resident blocks (split evenly over the K splits) walk the row tiles.
  static const int resident = resident_blocks(tc_skinny_kernel<F, NT, LO>, kTcWarps * 32);
  const unsigned per_split = std::max(1u, static_cast<unsigned>(resident) / grid.y);
  grid.x = std::min(grid.x, per_split);
  tc_skinny_kernel<F, NT, LO><<<grid, kTcWarps * 32, 0, s>>>(a);
  SP_CUDA_LAUNCH();
}

template <int F, int NT>
void launch_tc_nt(cudaStream_t s, const TcArgs& a, dim3 grid) {
  if (a.xl != nullptr)
    launch_tc_k<F, NT, true>(s, a, grid);
  else
    launch_tc_k<F, NT, false>(s, a, grid);
}

template <int F>
void launch_tc_f(cudaStream_t s, const TcArgs& a, dim3 grid) {
  if (a.M <= 8)
    launch_tc_nt<F, 1>(s, a, grid);
  else if (a.M <= 16)
    launch_tc_nt<F, 2>(s, a, grid);
  else if (a.M <= 32)
    launch_tc_nt<F, 4>(s, a, grid);
  else
    launch_tc_nt<F, 8>(s, a, grid);
}

// xh[m, c] = bf16(x[m, c]) (and xl = bf16(x - xh) when xl is set) for c < cols, zero up to ldp.
template <typename XT>
__global__ void split_x_kernel(const XT* x, int64_t ldx, int64_t cols, int64_t M, int64_t ldp,
                               __nv_bfloat16* xh, __nv_bfloat16* xl) {
  const int64_t total = M * ldp;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / ldp, c = i - m * ldp;
    const float v = c < cols ? to_float(x[m * ldx + c]) : 0.0f;
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    xh[i] = h;
    if (xl != nullptr) xl[i] = __float2bfloat16_rn(v - __bfloat162float(h));
  }
}

// Converts x to bf16 rows of ldp (a multiple of 8) elements in the workspace: hi only for bf16 x,
// hi and lo for f32 x. Returns {xh, xl (nullptr for bf16 x)}.
std::pair<const __nv_bfloat16*, const __nv_bfloat16*> split_x(cudaStream_t s, Workspace& ws,
                                                              const Tensor& x, int64_t ldp) {
  const bool lo = x.dtype == DType::kF32;
  const int64_t n = x.rows * ldp;
  __nv_bfloat16* xh = ws.get<__nv_bfloat16>(kWsGemmX, static_cast<size_t>((lo ? 2 : 1) * n));
  __nv_bfloat16* xl = lo ? xh + n : nullptr;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 2048));
  if (lo)
    split_x_kernel<float><<<grid, 256, 0, s>>>(static_cast<const float*>(x.data), x.stride, x.cols,
                                               x.rows, ldp, xh, xl);
  else
    split_x_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(static_cast<const __nv_bfloat16*>(x.data),
                                                       x.stride, x.cols, x.rows, ldp, xh, xl);
  SP_CUDA_LAUNCH();
  return {xh, xl};
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

void run_linear(cudaStream_t s, Workspace& ws, Tensor x, const Matrix& w, Tensor y,
                int64_t rows_per_group, int64_t gstride) {
  SP_CHECK(x.device == Device::kCuda && y.device == Device::kCuda && w.device == Device::kCuda,
           w.name, ": linear needs device tensors");
  SP_CHECK(x.dtype == DType::kF32 || x.dtype == DType::kBF16, w.name, ": x dtype");
  SP_CHECK(y.dtype == DType::kF32 || y.dtype == DType::kBF16, w.name, ": y dtype");
  SP_CHECK(w.scale_dtype == DType::kE8M0 || w.scale_dtype == DType::kF32 ||
               w.format == WeightFormat::kFloat,
           w.name, ": scale dtype");
  const int64_t M = x.rows, N = w.out, K = w.in;
  if (M == 0 || N == 0) return;
  if (gstride == 0 && fp8_linear(s, ws, x, w, y)) return;  // --activation-quant fp8 (gemm_lt.cu)
  const DevMat dm = dev_mat(w);
  const bool x_bf16 = x.dtype == DType::kBF16;
  const bool y_bf16 = y.dtype == DType::kBF16;
  // Activations are read 4 elements at a time (16 bytes f32, 8 bytes bf16).
  const int xvec4 = (x.stride % 4 == 0 && gstride % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(x.data) % (4 * x.elem_size()) == 0)
                        ? 1
                        : 0;
  if (M == 1) {
    Gemv1Args a;
    a.w = dm;
    a.x = x.data;
    a.xvec = xvec4;
    a.y = y.data;
    a.y_bf16 = y_bf16 ? 1 : 0;
    a.rows_per_group = rows_per_group;
    a.gstride = gstride;
    launch_gemv1(s, a, x_bf16);
    return;
  }
  // Weights exact in bf16 go to the tensor cores (fp32 activations as two bf16 halves).
  const bool exact_w = dm.fmt == kWBF16 || ((dm.fmt == kWFP8 || dm.fmt == kWFP4) && !dm.scale_f32);
  const bool skinny_ok =
      exact_w && M <= 64 && (gstride == 0 || (rows_per_group % kTcRows == 0 && gstride % 8 == 0));
  const bool mma_ok = exact_w && M > 64 && (gstride == 0 || rows_per_group % kBN == 0) &&
                      (dm.fmt != kWFP4 || dm.vec);
  if (skinny_ok) {
    const int V = dm.fmt == kWFP8 ? 16 : dm.fmt == kWFP4 ? 32 : 8;
    const int64_t ks = 4 * V, steps = (K + ks - 1) / ks;
    const int64_t ldp = (x.cols + ks + 7) / 8 * 8;
    const auto xs = split_x(s, ws, x, ldp);
    TcArgs a;
    a.w = dm;
    a.xh = xs.first;
    a.xl = xs.second;
    a.ldp = ldp;
    a.M = M;
    a.ldy = y.stride;
    a.y_bf16 = y_bf16 ? 1 : 0;
    a.rows_per_group = rows_per_group;
    a.gstride = gstride;
    // Split K across blocks while the grid stays within two blocks per SM of an H100 (a fixed
    // target: the summation order depends on the shape only), each warp keeping a step.
    const int64_t gx = (N + kTcRows - 1) / kTcRows;
    constexpr int64_t kTargetBlocks = 264;
    int64_t splits =
        std::clamp<int64_t>(kTargetBlocks / gx, 1, std::max<int64_t>(1, steps / kTcWK));
    const int64_t per = (steps + splits - 1) / splits;
    splits = (steps + per - 1) / per;
    a.steps_per_split = per;
    a.splits = static_cast<int>(splits);
    float* part = nullptr;
    if (splits > 1) {
      part = ws.get<float>(kWsSplitK, static_cast<size_t>(splits * M * N));
      a.y = part;
    } else {
      a.y = y.data;
    }
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(splits));
    switch (dm.fmt) {
      case kWBF16:
        launch_tc_f<kWBF16>(s, a, grid);
        break;
      case kWFP8:
        launch_tc_f<kWFP8>(s, a, grid);
        break;
      default:
        launch_tc_f<kWFP4>(s, a, grid);
        break;
    }
    if (splits > 1) {
      const int64_t total = M * N;
      splitk_reduce_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, s>>>(
          part, static_cast<int>(splits), M, N, y.data, y.stride, y_bf16 ? 1 : 0);
      SP_CUDA_LAUNCH();
    }
    return;
  }
  if (!mma_ok) {
    GemvArgs a;
    a.w = dm;
    a.x = x.data;
    a.ldx = x.stride;
    a.M = M;
    a.y = y.data;
    a.ldy = y.stride;
    a.y_bf16 = y_bf16 ? 1 : 0;
    a.xvec = xvec4;
    a.rows_per_group = rows_per_group;
    a.gstride = gstride;
    launch_gemv(s, a, x_bf16);
    return;
  }
  MmaArgs p;
  p.w = dm;
  if (x_bf16) {
    p.x = static_cast<const __nv_bfloat16*>(x.data);
    p.ldx = x.stride;
    p.xvec = (x.stride % 8 == 0 && gstride % 8 == 0 && aligned16(x.data)) ? 1 : 0;
  } else {
    const int64_t ldp = (x.cols + 7) / 8 * 8;
    const auto xs = split_x(s, ws, x, ldp);
    p.x = xs.first;
    p.xlo = xs.second;
    p.ldx = ldp;
    p.xvec = gstride % 8 == 0 ? 1 : 0;
  }
  p.M = M;
  p.ldy = y.stride;
  p.y_bf16 = y_bf16 ? 1 : 0;
  p.rows_per_group = rows_per_group;
  p.gstride = gstride;
  const int bm = (M <= 64 || !x_bf16) ? 64 : 128;
  const int64_t gx = (N + kBN - 1) / kBN, gy = (M + bm - 1) / bm;
  const int64_t ktiles = (K + kBK - 1) / kBK;
  // Split K until the grid has about two blocks per SM of an H100 (a fixed target, so the
  // summation order does not depend on the device), keeping at least 4 k-tiles per split.
  constexpr int64_t kTargetBlocks = 264;
  int64_t splits = std::clamp<int64_t>((kTargetBlocks + gx * gy - 1) / (gx * gy), 1,
                                       std::max<int64_t>(1, ktiles / 4));
  splits = std::min<int64_t>(splits, 64);
  const int64_t per = (ktiles + splits - 1) / splits;
  splits = (ktiles + per - 1) / per;
  p.ktiles_per_split = static_cast<int>(per);
  p.splits = static_cast<int>(splits);
  float* part = nullptr;
  if (splits > 1) {
    part = ws.get<float>(kWsSplitK, static_cast<size_t>(splits * M * N));
    p.y = part;
  } else {
    p.y = y.data;
  }
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                  static_cast<unsigned>(splits));
  switch (dm.fmt) {
    case kWBF16:
      launch_mma_f<kWBF16>(s, p, bm, grid);
      break;
    case kWFP8:
      launch_mma_f<kWFP8>(s, p, bm, grid);
      break;
    default:
      launch_mma_f<kWFP4>(s, p, bm, grid);
      break;
  }
  if (splits > 1) {
    const int64_t total = M * N;
    splitk_reduce_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, s>>>(
        part, static_cast<int>(splits), M, N, y.data, y.stride, y.dtype == DType::kBF16 ? 1 : 0);
    SP_CUDA_LAUNCH();
  }
}

// ---- embedding ----------------------------------------------------------------------------------

template <int F>
__global__ void embed_kernel(DevMat w, const int32_t* ids, void* out, int64_t ldo, int out_bf16) {
  constexpr int V = FmtTraits<F>::kVals;
  constexpr int kBytesPerVal2 = F == kWF32 ? 8 : F == kWFP8 ? 2 : F == kWFP4 ? 1 : 4;
  const int64_t t = blockIdx.x;
  const int64_t n = ids[t];
  const int64_t K = w.in;
  const uint8_t* row = w.data + n * w.row_bytes;
  for (int64_t c = threadIdx.x; c * V < K; c += blockDim.x) {
    const int64_t k0 = c * V;
    const uint4 ch = ld_chunk(row, k0 * kBytesPerVal2 / 2, w.row_bytes, w.vec != 0);
    const float sc = chunk_scale<F>(w, n, k0);
#pragma unroll
    for (int p = 0; p < V / 4; ++p) {
      float v[4];
      decode4<F>(ch, p, sc, v);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t k = k0 + 4 * p + i;
        if (k >= K) break;
        if (out_bf16)
          static_cast<__nv_bfloat16*>(out)[t * ldo + k] = __float2bfloat16_rn(v[i]);
        else
          static_cast<float*>(out)[t * ldo + k] = v[i];
      }
    }
  }
}

}  // namespace

void linear(cudaStream_t s, Workspace& ws, Tensor x, const Matrix& w, Tensor y) {
  SP_CHECK(x.cols == w.in && y.cols == w.out && x.rows == y.rows, w.name, ": x ", x.rows, "x",
           x.cols, " y ", y.rows, "x", y.cols, " W ", w.out, "x", w.in);
  run_linear(s, ws, x, w, y, w.out, 0);
}

void grouped_linear(cudaStream_t s, Workspace& ws, Tensor x, const Matrix& w, int groups,
                    Tensor y) {
  const int64_t kin = x.cols / groups;
  SP_CHECK(groups > 0 && x.cols % groups == 0 && w.out % groups == 0 && w.in == kin &&
               y.cols == w.out && x.rows == y.rows,
           w.name, ": grouped x ", x.rows, "x", x.cols, " groups ", groups, " W ", w.out, "x",
           w.in);
  run_linear(s, ws, x, w, y, w.out / groups, kin);
}

void embed(cudaStream_t s, const Matrix& table, const DevBatch& b, Tensor out) {
  const int64_t T = b.num_tokens;
  SP_CHECK(out.rows >= T && out.cols == table.in, table.name, ": embed out ", out.rows, "x",
           out.cols);
  SP_CHECK(out.dtype == DType::kF32 || out.dtype == DType::kBF16, table.name, ": embed dtype");
  if (T == 0) return;
  const DevMat dm = dev_mat(table);
  const int threads = gemv_threads(dm.fmt, dm.in);
  const int ob = out.dtype == DType::kBF16 ? 1 : 0;
  const unsigned grid = static_cast<unsigned>(T);
  switch (dm.fmt) {
    case kWF32:
      embed_kernel<kWF32><<<grid, threads, 0, s>>>(dm, b.token_ids, out.data, out.stride, ob);
      break;
    case kWBF16:
      embed_kernel<kWBF16><<<grid, threads, 0, s>>>(dm, b.token_ids, out.data, out.stride, ob);
      break;
    case kWF16:
      embed_kernel<kWF16><<<grid, threads, 0, s>>>(dm, b.token_ids, out.data, out.stride, ob);
      break;
    case kWFP8:
      embed_kernel<kWFP8><<<grid, threads, 0, s>>>(dm, b.token_ids, out.data, out.stride, ob);
      break;
    default:
      embed_kernel<kWFP4><<<grid, threads, 0, s>>>(dm, b.token_ids, out.data, out.stride, ob);
      break;
  }
  SP_CUDA_LAUNCH();
}

}  // namespace sp::cuda
