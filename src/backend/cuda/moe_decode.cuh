// The MoE's tensor-core expert kernels (moe_decode.cu), called by moe() (moe.cu) after routing
// and the sort. Device code only; included by .cu files.
#pragma once

#include "backend/cuda/gemm_core.cuh"

namespace sp::cuda {

// The per-expert descriptors prepare_moe uploads; expert E (the last) is the shared expert.
struct DevExpert {
  DevMat w1, w2, w3;
};

// Experts of min_tok tokens or more (MoeTcStep::min_tok: 1 or 2, the workspace's
// moe_tc_min_tokens) take the tensor-core kernels (8 NT tokens at a time) when every expert of the
// layer is FP4 / FP8 with E8M0 scales, the intermediate sizes are multiples of 16 and the layer
// has at most kTcMaxExperts experts with the shared one (tc_experts_ok); fewer tokens take the
// CUDA-core decode kernels of moe.cu, other formats the decode and general kernels. Whether one
// token is better served by the CUDA-core kernel (which applies the decoded weights straight from
// registers) or by the tensor cores (an m16n8k16 MMA spends 7 of its 8 token columns on nothing
// there, but the decode is cheaper) is a measurement: bench_ops times both.
constexpr int kTcMaxTok = 64, kTcSmallTok = 8;
constexpr int kTcMaxExperts = 1024;  // routed + shared: the work list of a launch (shared memory)

bool tc_experts_ok(const DevExpert* h, int64_t n);

struct MoeTcStep {
  const DevExpert* tab = nullptr;  // [E + 1] (device)
  const int* meta = nullptr;       // cnt | off | act | nact (moe.cu's sort_pairs)
  const int* pairs = nullptr;
  int T = 0, K = 0, E = 0;  // tokens of the chunk, top-k, routed experts
  int min_tok = 2;          // experts of fewer tokens are left to the decode kernels (1..8)
  const void* x = nullptr;  // [T, ldx] the chunk's tokens, f32 or bf16
  int64_t ldx = 0;
  bool x_bf16 = false;
  int64_t D = 0, Imax = 0;  // hidden size; the largest intermediate size (routed, shared)
  int64_t I = 0, Is = 0;    // the routed experts' intermediate size (all alike), the shared one's
  float limit = 0.0f;       // SwiGLU clamp
  float* o = nullptr;       // [pairs, D] f32: the rows of the experts this path takes
};

// Enqueues the staging of the tokens, the up kernels (h = SwiGLU(W1 x, W3 x), kept as bf16 hi + lo)
// and the down kernels (o = W2 h) for the experts of min_tok tokens or more (the split-K kernel,
// or the prefill kernel's shared-memory block tiles above 64 tokens, and from 9 tokens in steps of
// more than 64). Launch sizes depend on T, K, E, D, Imax and min_tok only.
void moe_tc(cudaStream_t s, Workspace& ws, const MoeTcStep& st);

}  // namespace sp::cuda
