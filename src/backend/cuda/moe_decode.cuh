// The MoE's tensor-core expert kernels (moe_decode.cu), called by moe() (moe.cu) after routing
// and the sort. Device code only; included by .cu files.
#pragma once

#include "backend/cuda/gemm_core.cuh"

namespace sp::cuda {

// The per-expert descriptors prepare_moe uploads; expert E (the last) is the shared expert.
struct DevExpert {
  DevMat w1, w2, w3;
};

// Experts of kTcMinTok tokens or more take the tensor-core kernels (kTcMaxTok at a time) when
// every expert of the layer is FP4 / FP8 with E8M0 scales and an intermediate size that is a
// multiple of 16 (tc_experts_ok); fewer tokens take the CUDA-core decode kernels of moe.cu, other
// formats the decode and general kernels. One token stays on the CUDA-core kernel by default (an
// m16n8k16 MMA spends 7 of its 8 token columns on nothing there, and that kernel applies the
// decoded weights straight from registers); whether the tensor cores' cheaper decode wins at one
// token too is a measurement (build with -DSP_MOE_TC_MIN_TOKENS=1 to route single tokens to the
// tensor cores).
#ifndef SP_MOE_TC_MIN_TOKENS
#define SP_MOE_TC_MIN_TOKENS 2
#endif
constexpr int kTcMinTok = SP_MOE_TC_MIN_TOKENS, kTcMaxTok = 64;
static_assert(kTcMinTok >= 1 && kTcMinTok <= 8,
              "the first tensor-core launch takes up to 8 tokens");

bool tc_experts_ok(const DevExpert* h, int64_t n);

struct MoeTcStep {
  const DevExpert* tab = nullptr;  // [E + 1] (device)
  const int* meta = nullptr;       // cnt | off | act | nact (moe.cu's sort_pairs)
  const int* pairs = nullptr;
  int T = 0, K = 0, E = 0;  // tokens of the chunk, top-k, routed experts
  const void* x = nullptr;  // [T, ldx] the chunk's tokens, f32 or bf16
  int64_t ldx = 0;
  bool x_bf16 = false;
  int64_t D = 0, Imax = 0;  // hidden size; the largest intermediate size (routed, shared)
  float limit = 0.0f;       // SwiGLU clamp
  float* o = nullptr;       // [pairs, D] f32: the rows of the experts this path takes
};

// Enqueues the staging of the tokens, the up kernels (h = SwiGLU(W1 x, W3 x), kept as bf16 hi + lo)
// and the down kernels (o = W2 h) for the experts of kTcMinTok tokens or more. Launch sizes depend
// on T, K, E, D and Imax only.
void moe_tc(cudaStream_t s, Workspace& ws, const MoeTcStep& st);

}  // namespace sp::cuda
