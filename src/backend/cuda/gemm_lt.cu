// FP8 projections through cuBLASLt's block-scaled FP8 GEMM (--activation-quant fp8); see
// gemm_lt.h for the layouts and the rule.
//
// Determinism: the algorithm of a shape is the first heuristic result for its M bucket (the same
// on every run of a given library and device) and cuBLASLt's block-scaled kernels reduce in a
// fixed order; the quantiser is one warp per (row, group) with a fixed shuffle reduction.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <stdexcept>
#include <string>

#include "backend/cuda/gemm_lt.h"
#include "core/dynlib.h"

namespace sp::cuda {
namespace {

// cuBLASLt is opened at run time (dlopen), not linked: its library maps several hundred MB at
// start-up, which every process would pay (one under a small `ulimit -v` could not even start),
// although only --activation-quant fp8 uses it.
struct LtApi {
  decltype(&cublasLtCreate) Create = nullptr;
  decltype(&cublasLtDestroy) Destroy = nullptr;
  decltype(&cublasLtGetStatusName) StatusName = nullptr;
  decltype(&cublasLtGetStatusString) StatusString = nullptr;
  decltype(&cublasLtMatmul) Matmul = nullptr;
  decltype(&cublasLtMatmulAlgoCheck) AlgoCheck = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) Heuristic = nullptr;
  decltype(&cublasLtMatmulDescInit_internal) DescInit = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) DescSetAttribute = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) PrefCreate = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) PrefDestroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) PrefSetAttribute = nullptr;
  decltype(&cublasLtMatrixLayoutInit_internal) LayoutInit = nullptr;
  std::string error;  // why it could not be opened (empty: usable)
};

const LtApi& lt() {
  static const LtApi api = [] {
    LtApi a;
    const std::string major = std::to_string(CUBLAS_VER_MAJOR);
    // Never closed: its functions may be called until the process ends.
    DynLib& lib = *new DynLib({"libcublasLt.so." + major, "libcublasLt.so"});
    if (!lib.loaded()) {
      a.error = str("cannot load libcublasLt.so.", major, " (", lib.load_error(),
                    "): --activation-quant fp8 needs the CUDA toolkit's cuBLASLt ", major,
                    " on the loader's path");
      return a;
    }
    lib.get(a.Create, "cublasLtCreate");
    lib.get(a.Destroy, "cublasLtDestroy");
    lib.get(a.StatusName, "cublasLtGetStatusName");
    lib.get(a.StatusString, "cublasLtGetStatusString");
    lib.get(a.Matmul, "cublasLtMatmul");
    lib.get(a.AlgoCheck, "cublasLtMatmulAlgoCheck");
    lib.get(a.Heuristic, "cublasLtMatmulAlgoGetHeuristic");
    lib.get(a.DescInit, "cublasLtMatmulDescInit_internal");
    lib.get(a.DescSetAttribute, "cublasLtMatmulDescSetAttribute");
    lib.get(a.PrefCreate, "cublasLtMatmulPreferenceCreate");
    lib.get(a.PrefDestroy, "cublasLtMatmulPreferenceDestroy");
    lib.get(a.PrefSetAttribute, "cublasLtMatmulPreferenceSetAttribute");
    lib.get(a.LayoutInit, "cublasLtMatrixLayoutInit_internal");
    if (!lib.missing().empty()) a.error = str("libcublasLt.so.", major, " lacks ", lib.missing());
    return a;
  }();
  return api;
}

// Workspace slots of this path (gemm.cu uses 8, moe.cu 10-14).

void check_lt(cublasStatus_t st, const char* what, const char* file, int line) {
  if (st == CUBLAS_STATUS_SUCCESS) return;
  int dev = -1;
  cudaGetDevice(&dev);
  throw std::runtime_error(str("cuBLASLt error on GPU ", dev, ": ", lt().StatusName(st), " (",
                               lt().StatusString(st), ") in ", what, " at ", file, ":", line));
}
#define SP_LT(call) check_lt((call), #call, __FILE__, __LINE__)

template <typename T>
void set_attr(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a, const T& v) {
  SP_LT(lt().DescSetAttribute(d, a, &v, sizeof(v)));
}

__device__ __forceinline__ float load_f(const float* p) {
  return *p;
}
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

// 16 lanes per (row, 128-column group), 8 consecutive columns per lane (one 16-byte load of bf16,
// two of f32; one 8-byte store); a block of 256 threads covers 16 groups of one row.
// grid: (Mg, ceil(groups / 16)).
template <typename XT>
__global__ void __launch_bounds__(256)
    quant_kernel(const XT* x, int64_t ldx, int64_t M, int64_t K, int64_t Mg, int vec, uint8_t* q,
                 float* scales) {
  const int64_t g = static_cast<int64_t>(blockIdx.y) * 16 + threadIdx.x / 16;
  const int64_t m = blockIdx.x;
  const int64_t k0 = g * 128 + (threadIdx.x % 16) * 8;
  float v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = 0.0f;
  if (m < M && k0 < K) {
    const XT* p = x + m * ldx + k0;
    if (vec && k0 + 8 <= K) {
      if constexpr (sizeof(XT) == 4) {
        const float4 a = reinterpret_cast<const float4*>(p)[0];
        const float4 b = reinterpret_cast<const float4*>(p)[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z,
        v[7] = b.w;
      } else {
        const uint4 t = *reinterpret_cast<const uint4*>(p);
        const uint32_t w[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          v[2 * j] = __uint_as_float(w[j] << 16);
          v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (k0 + j < K) v[j] = load_f(p + j);
    }
  }
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
    // Within the 16 lanes of the group (xor offsets below 16 stay in the half-warp).
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (g * 128 >= K) return;  // after the shuffles: every lane of the warp took part
  float s = 1.0f, inv = 1.0f;
  if (m < M) {
    // s = 2^ceil(log2(a / 448)) with a / 448 rounded to fp32 first (the reference's order).
    const float r = fmaxf(amax, 1e-4f) / 448.0f;
    const uint32_t b = __float_as_uint(r);
    int e = static_cast<int>((b >> 23) & 0xff) - 127 + ((b & 0x7fffff) != 0 ? 1 : 0);
    e = e < -126 ? -126 : e > 126 ? 126 : e;
    s = __uint_as_float(static_cast<uint32_t>(e + 127) << 23);
    inv = __uint_as_float(static_cast<uint32_t>(127 - e) << 23);
  }
  uint32_t packed[2] = {0, 0};
#pragma unroll
  for (int j = 0; j < 8; ++j)
    packed[j / 4] |=
        static_cast<uint32_t>(__nv_cvt_float_to_fp8(v[j] * inv, __NV_SATFINITE, __NV_E4M3))
        << (8 * (j % 4));
  uint8_t* dst = q + m * K + k0;
  if (k0 + 8 <= K && (K % 8) == 0) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
  } else {
    for (int j = 0; j < 8 && k0 + j < K; ++j)
      dst[j] = static_cast<uint8_t>(packed[j / 4] >> (8 * (j % 4)));
  }
  if (threadIdx.x % 16 == 0) scales[g * Mg + m] = s;
}

__device__ __forceinline__ float e8m0_f(uint8_t v) {
  const uint32_t bits = v == 0 ? 0x00400000u : v == 255 ? 0x7fc00000u : uint32_t(v) << 23;
  return __uint_as_float(bits);
}

// out [rows, ld_out] fp32 (columns [0, cols) of each row) = the weight's block scales.
__global__ void weight_scale_kernel(const uint8_t* s, int f32, int64_t rows, int64_t cols,
                                    int64_t ld_in, int64_t ld_out, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i % cols;
  out[r * ld_out + c] =
      f32 ? reinterpret_cast<const float*>(s)[r * ld_in + c] : e8m0_f(s[r * ld_in + c]);
}

// y [M, N] (y's dtype, row stride ldy) = d [M, N] (bf16 or f32, row stride ldd).
__global__ void copy_out_kernel(const void* d, int d_bf16, int64_t ldd, void* y, int y_bf16,
                                int64_t ldy, int64_t M, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N, n = i % N;
  const float v = d_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(d)[m * ldd + n])
                         : static_cast<const float*>(d)[m * ldd + n];
  if (y_bf16)
    static_cast<__nv_bfloat16*>(y)[m * ldy + n] = __float2bfloat16_rn(v);
  else
    static_cast<float*>(y)[m * ldy + n] = v;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

int64_t round_up(int64_t a, int64_t b) {
  return (a + b - 1) / b * b;
}

}  // namespace

void quantize_act_fp8(cudaStream_t s, Tensor x, int64_t Mg, uint8_t* q, float* scales) {
  SP_CHECK(x.dtype == DType::kF32 || x.dtype == DType::kBF16, "quantize_act_fp8: x dtype ",
           dtype_name(x.dtype));
  SP_CHECK(Mg >= x.rows, "quantize_act_fp8: Mg ", Mg, " < rows ", x.rows);
  if (Mg == 0 || x.cols == 0) return;
  const int64_t groups = (x.cols + 127) / 128;
  const int esz = static_cast<int>(x.elem_size());
  // 16-byte loads: 8 bf16 or 4 f32 per load, from 16-byte aligned rows.
  const int vec =
      (x.stride % (16 / esz) == 0 && reinterpret_cast<uintptr_t>(x.data) % 16 == 0) ? 1 : 0;
  const dim3 grid(static_cast<unsigned>(Mg), static_cast<unsigned>((groups + 15) / 16));
  if (x.dtype == DType::kF32)
    quant_kernel<float><<<grid, 256, 0, s>>>(static_cast<const float*>(x.data), x.stride, x.rows,
                                             x.cols, Mg, vec, q, scales);
  else
    quant_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(static_cast<const __nv_bfloat16*>(x.data),
                                                     x.stride, x.rows, x.cols, Mg, vec, q, scales);
  SP_CUDA_LAUNCH();
}

LtGemm::LtGemm(int device) {
  if (!lt().error.empty()) throw std::runtime_error(lt().error);
  SP_CUDA(cudaSetDevice(device));
  SP_LT(lt().Create(&handle_));
  SP_CUDA(cudaMalloc(&dummy_scales_, 256));
  SP_CUDA(cudaMemset(dummy_scales_, 0, 256));
}

LtGemm::~LtGemm() {
  for (auto& kv : wscale_) cudaFree(kv.second);
  cudaFree(dummy_scales_);
  if (handle_) lt().Destroy(handle_);
}

const float* LtGemm::prepare(cudaStream_t s, const Matrix& w) {
  SP_CHECK(w.format == WeightFormat::kFP8 && w.device == Device::kCuda && w.scale != nullptr,
           w.name, ": fp8 weight scales");
  auto it = wscale_.find(w.scale);
  if (it != wscale_.end()) return it->second;
  // cuBLASLt reads 128x128 block scales with a row stride of ceil(K/128) rounded up to 4 (16
  // bytes); the padding columns are zero.
  const int64_t rows = (w.out + 127) / 128, cols = (w.in + 127) / 128, ld = round_up(cols, 4);
  float* p = nullptr;
  SP_CUDA(cudaMalloc(&p, static_cast<size_t>(rows * ld) * sizeof(float)));
  SP_CUDA(cudaMemsetAsync(p, 0, static_cast<size_t>(rows * ld) * sizeof(float), s));
  const int64_t n = rows * cols;
  weight_scale_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(
      w.scale, w.scale_dtype == DType::kF32 ? 1 : 0, rows, cols, w.scale_cols, ld, p);
  SP_CUDA_LAUNCH();
  wscale_.emplace(w.scale, p);
  return p;
}

LtGemm::Plan& LtGemm::plan(int64_t bucket, int64_t N, int64_t K, bool y_bf16) {
  const Key key{bucket, N, K, y_bf16 ? 1 : 0};
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  Plan& p = plans_[key];
  // D in y's dtype, else bf16 (the reference's output dtype) converted afterwards.
  const cudaDataType_t types[2] = {y_bf16 ? CUDA_R_16BF : CUDA_R_32F, CUDA_R_16BF};
  for (int t = 0; t < (y_bf16 ? 1 : 2); ++t) {
    const cudaDataType_t dt = types[t];
    cublasLtMatmulDesc_t desc = &p.desc;
    SP_LT(lt().DescInit(desc, sizeof(*desc), CUBLAS_COMPUTE_32F, CUDA_R_32F));
    set_attr(desc, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(CUBLAS_OP_T));
    set_attr(desc, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(CUBLAS_OP_N));
    set_attr(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
             static_cast<int32_t>(CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F));
    set_attr(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
             static_cast<int32_t>(CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F));
    // The heuristic sees aligned scale pointers; each call sets the real ones.
    set_attr(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(dummy_scales_));
    set_attr(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(dummy_scales_));
    cublasLtMatrixLayoutOpaque_t a, b, d;
    SP_LT(lt().LayoutInit(&a, sizeof(a), CUDA_R_8F_E4M3, K, N, K));
    SP_LT(lt().LayoutInit(&b, sizeof(b), CUDA_R_8F_E4M3, K, bucket, K));
    SP_LT(lt().LayoutInit(&d, sizeof(d), dt, N, bucket, N));
    cublasLtMatmulPreference_t pref = nullptr;
    SP_LT(lt().PrefCreate(&pref));
    const uint64_t wsb = kLtWorkspaceBytes;
    SP_LT(lt().PrefSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof(wsb)));
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    const cublasStatus_t st = lt().Heuristic(handle_, desc, &a, &b, &d, &d, pref, 1, &res, &found);
    lt().PrefDestroy(pref);
    if (st == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS) {
      p.algo = res.algo;
      p.d_type = dt;
      p.ok = true;
      break;
    }
  }
  return p;
}

bool LtGemm::run(cudaStream_t s, Workspace& ws, Tensor x, const Matrix& w, Tensor y,
                 int64_t min_rows) {
  if (w.format != WeightFormat::kFP8) return false;
  const int64_t M = x.rows, N = w.out, K = w.in;
  if (M < min_rows || M == 0 || N == 0) return false;
  // The reference keeps the compressors' projections unquantised (they are BF16 upstream; this
  // keeps it so for checkpoints that store them FP8).
  if (w.name.find("compressor") != std::string::npos) return false;
  const int64_t ye = y.elem_size();
  const bool shape_ok = K % 16 == 0 && N % 16 == 0 && aligned16(w.data) && aligned16(y.data) &&
                        (y.stride * ye) % 16 == 0 && w.scale != nullptr &&
                        (w.scale_dtype == DType::kE8M0 || w.scale_dtype == DType::kF32) &&
                        (x.dtype == DType::kF32 || x.dtype == DType::kBF16) &&
                        (y.dtype == DType::kF32 || y.dtype == DType::kBF16);
  if (!shape_ok) {
    ++declined_;
    return false;
  }
  const int64_t Mg = round_up(M, 4);
  int64_t bucket = 128;
  while (bucket < Mg) bucket *= 2;
  const bool y_bf16 = y.dtype == DType::kBF16;
  Plan& p = plan(bucket, N, K, y_bf16);
  if (!p.ok) {
    ++declined_;
    return false;
  }
  const bool d_bf16 = p.d_type == CUDA_R_16BF;
  const bool direct = Mg == M && d_bf16 == y_bf16;
  const int64_t groups = (K + 127) / 128;
  const float* wsc = prepare(s, w);
  uint8_t* q = ws.get<uint8_t>(kWsLtQ, static_cast<size_t>(Mg * K));
  float* sc = ws.get<float>(kWsLtScale, static_cast<size_t>(groups * Mg));
  void* lws = ws.get(kWsLtWork, kLtWorkspaceBytes);
  void* d = direct ? y.data : ws.get(kWsLtOut, static_cast<size_t>(Mg * N * (d_bf16 ? 2 : 4)));
  const int64_t ldd = direct ? y.stride : N;
  cublasLtMatmulDesc_t desc = &p.desc;
  set_attr(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(wsc));
  set_attr(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(sc));
  cublasLtMatrixLayoutOpaque_t a, b, dl;
  SP_LT(lt().LayoutInit(&a, sizeof(a), CUDA_R_8F_E4M3, K, N, K));
  SP_LT(lt().LayoutInit(&b, sizeof(b), CUDA_R_8F_E4M3, K, Mg, K));
  SP_LT(lt().LayoutInit(&dl, sizeof(dl), p.d_type, N, Mg, ldd));
  // The bucket's algorithm on this exact shape: checked once per shape (a host-side check that
  // costs about as much as a small GEMM), remembered.
  const CheckKey ck{Mg, N, K, ldd, static_cast<int>(p.d_type)};
  auto ci = checked_.find(ck);
  if (ci == checked_.end()) {
    cublasLtMatmulHeuristicResult_t chk{};
    const bool ok =
        lt().AlgoCheck(handle_, desc, &a, &b, &dl, &dl, &p.algo, &chk) == CUBLAS_STATUS_SUCCESS &&
        chk.workspaceSize <= kLtWorkspaceBytes;
    ci = checked_.emplace(ck, ok).first;
  }
  if (!ci->second) {
    ++declined_;
    return false;
  }
  quantize_act_fp8(s, x, Mg, q, sc);
  const float alpha = 1.0f, beta = 0.0f;
  SP_LT(lt().Matmul(handle_, desc, &alpha, w.data, &a, q, &b, &beta, d, &dl, d, &dl, &p.algo, lws,
                    kLtWorkspaceBytes, s));
  if (!direct) {
    const int64_t total = M * N;
    copy_out_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, s>>>(
        d, d_bf16 ? 1 : 0, ldd, y.data, y_bf16 ? 1 : 0, y.stride, M, N);
    SP_CUDA_LAUNCH();
  }
  ++taken_;
  return true;
}

bool fp8_linear(cudaStream_t s, Workspace& ws, Tensor x, const Matrix& w, Tensor y) {
  return ws.fp8_gemm != nullptr && ws.fp8_gemm->run(s, ws, x, w, y);
}

std::string lt_unavailable() {
  return lt().error;
}

}  // namespace sp::cuda
