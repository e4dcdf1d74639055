// Projections: y = x W^T for every weight format, and the embedding gather.
//
// Two kernels, chosen by M (the result may depend on M, never on the run):
// - gemv (M <= 8, and every case the tensor-core path cannot do exactly): each block owns R = 4
//   output rows and streams them once in 16-byte chunks (all threads of the block along K),
//   applying each decoded chunk to up to 8 activation rows held in registers; warp shuffles then
//   the warps in order reduce. Larger M loops over tiles of 8 rows inside the block.
// - mma (M > 8, bf16 activations, weights exact in bf16: BF16, or FP8/FP4 with E8M0 scales): a
//   128-wide tile of weight rows is dequantised to bf16 into shared memory (double-buffered through
//   registers) and multiplied on the tensor cores (mma.sync m16n8k16, fp32 accumulate). Since both
//   operands are exact in bf16, only the accumulation order differs from the CPU. When the M x N
//   tiles would not fill the GPU, K is split; the splits' fp32 partials are summed in split order
//   by a second kernel (no atomics).
#include <algorithm>

#include "backend/cuda/gemm_core.cuh"

namespace sp::cuda {
namespace {

constexpr int kWsSplitK = 8;  // workspace slot: split-K partials [splits, M, N] f32

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

// ---- tensor-core tiles --------------------------------------------------------------------------

constexpr int kBN = 128, kBK = 32, kPad = 8, kMmaThreads = 256;

struct MmaArgs {
  DevMat w;
  const __nv_bfloat16* x = nullptr;  // [M, ldx]
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
template <int F, int BM>
struct TileRegs {
  static constexpr int kAChunks = BM * kBK / 8 / kMmaThreads > 0 ? BM* kBK / 8 / kMmaThreads : 1;
  uint4 a[kAChunks];
  uint4 w[2];
  float s;
};

template <int F, int BM>
__device__ __forceinline__ void load_tile(const MmaArgs& p, int64_t m0, int64_t n0, int64_t kt,
                                          const __nv_bfloat16* xb, TileRegs<F, BM>& t) {
  const int64_t K = p.w.in;
  const int64_t k0 = kt * kBK;
  constexpr int kChunksA = BM * kBK / 8;
#pragma unroll
  for (int i = 0; i < TileRegs<F, BM>::kAChunks; ++i) {
    const int idx = threadIdx.x + i * kMmaThreads;
    t.a[i] = make_uint4(0, 0, 0, 0);
    if (idx >= kChunksA) continue;
    const int64_t m = m0 + idx / 4, k = k0 + (idx % 4) * 8;
    if (m >= p.M) continue;
    const __nv_bfloat16* src = xb + m * p.ldx + k;
    if (p.xvec && k + 8 <= K) {
      t.a[i] = __ldg(reinterpret_cast<const uint4*>(src));
    } else {
      uint32_t v[4] = {0, 0, 0, 0};
      for (int j = 0; j < 8; ++j)
        if (k + j < K)
          v[j / 2] |= uint32_t(reinterpret_cast<const uint16_t*>(src)[j]) << (16 * (j % 2));
      t.a[i] = make_uint4(v[0], v[1], v[2], v[3]);
    }
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

template <int F, int BM>
__device__ __forceinline__ void store_tile(const TileRegs<F, BM>& t, __nv_bfloat16* As,
                                           __nv_bfloat16* Bs) {
  constexpr int kChunksA = BM * kBK / 8;
#pragma unroll
  for (int i = 0; i < TileRegs<F, BM>::kAChunks; ++i) {
    const int idx = threadIdx.x + i * kMmaThreads;
    if (idx < kChunksA)
      *reinterpret_cast<uint4*>(As + (idx / 4) * (kBK + kPad) + (idx % 4) * 8) = t.a[i];
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

// Block tile BM x 128 x 32; 8 warps as 2 (M) x 4 (N), each BM/2 x 32.
template <int F, int BM>
__global__ void __launch_bounds__(kMmaThreads) mma_kernel(MmaArgs p) {
  constexpr int MI = BM / 32;  // m16 tiles per warp
  constexpr int NI = 4;        // n8 tiles per warp
  constexpr int kLd = kBK + kPad;
  __shared__ __align__(16) __nv_bfloat16 As[2][BM * kLd];
  __shared__ __align__(16) __nv_bfloat16 Bs[2][kBN * kLd];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t ktiles = (p.w.in + kBK - 1) / kBK;
  const int64_t kt0 = static_cast<int64_t>(blockIdx.z) * p.ktiles_per_split;
  const int64_t kt1 = ktiles < kt0 + p.ktiles_per_split ? ktiles : kt0 + p.ktiles_per_split;
  const __nv_bfloat16* xb = p.x + (n0 / p.rows_per_group) * p.gstride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / 4, wn = warp % 4, g = lane >> 2, tq = lane & 3;

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  TileRegs<F, BM> regs;
  if (kt0 < kt1) {
    load_tile<F, BM>(p, m0, n0, kt0, xb, regs);
    store_tile<F, BM>(regs, As[0], Bs[0]);
  }
  __syncthreads();
  int cur = 0;
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    const bool more = kt + 1 < kt1;
    if (more) load_tile<F, BM>(p, m0, n0, kt + 1, xb, regs);
    const __nv_bfloat16* A = As[cur];
    const __nv_bfloat16* B = Bs[cur];
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[MI][4], bfr[NI][2];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        const __nv_bfloat16* base = A + (wm * (BM / 2) + i * 16 + g) * kLd + ks + 2 * tq;
        af[i][0] = *reinterpret_cast<const uint32_t*>(base);
        af[i][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kLd);
        af[i][2] = *reinterpret_cast<const uint32_t*>(base + 8);
        af[i][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kLd + 8);
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
        for (int j = 0; j < NI; ++j) mma_bf16(acc[i][j], af[i], bfr[j]);
    }
    if (more) store_tile<F, BM>(regs, As[cur ^ 1], Bs[cur ^ 1]);
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

template <int F, int BM>
void launch_mma_bm(cudaStream_t s, const MmaArgs& p, dim3 grid) {
  mma_kernel<F, BM><<<grid, kMmaThreads, 0, s>>>(p);
  SP_CUDA_LAUNCH();
}

template <int F>
void launch_mma_f(cudaStream_t s, const MmaArgs& p, int bm, dim3 grid) {
  if (bm == 32)
    launch_mma_bm<F, 32>(s, p, grid);
  else if (bm == 64)
    launch_mma_bm<F, 64>(s, p, grid);
  else
    launch_mma_bm<F, 128>(s, p, grid);
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
  const bool exact_bf16 =
      x_bf16 && (dm.fmt == kWBF16 || ((dm.fmt == kWFP8 || dm.fmt == kWFP4) && !dm.scale_f32));
  const bool mma_ok = exact_bf16 && M > 8 && (gstride == 0 || rows_per_group % kBN == 0) &&
                      (dm.fmt != kWFP4 || dm.vec);
  if (!mma_ok) {
    GemvArgs a;
    a.w = dm;
    a.x = x.data;
    a.ldx = x.stride;
    a.M = M;
    a.y = y.data;
    a.ldy = y.stride;
    a.y_bf16 = y.dtype == DType::kBF16;
    // Activations are read 4 elements at a time (16 bytes f32, 8 bytes bf16).
    a.xvec = (x.stride % 4 == 0 && gstride % 4 == 0 &&
              reinterpret_cast<uintptr_t>(x.data) % (4 * x.elem_size()) == 0)
                 ? 1
                 : 0;
    a.rows_per_group = rows_per_group;
    a.gstride = gstride;
    launch_gemv(s, a, x_bf16);
    return;
  }
  MmaArgs p;
  p.w = dm;
  p.x = static_cast<const __nv_bfloat16*>(x.data);
  p.ldx = x.stride;
  p.M = M;
  p.ldy = y.stride;
  p.y_bf16 = y.dtype == DType::kBF16;
  p.xvec = (x.stride % 8 == 0 && gstride % 8 == 0 && aligned16(x.data)) ? 1 : 0;
  p.rows_per_group = rows_per_group;
  p.gstride = gstride;
  const int bm = M <= 32 ? 32 : M <= 64 ? 64 : 128;
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
