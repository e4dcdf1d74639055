// Kernel entry points of the CUDA backend. Each family lives in its own .cu file; the backend
// (cuda_backend.cu) owns memory, streams and the step metadata and calls these.
//
// Conventions:
// - Every function enqueues work on `stream` and returns without synchronising; no function
//   allocates device memory (scratch comes from the Workspace the caller passes).
// - Tensors are device views (core/tensor.h): rows x cols with a row stride in elements, dtype
//   f32 or bf16 for activations (the backend's activation dtype is bf16), f32 where the Backend
//   interface says f32, i32 for indices. Arithmetic is fp32 whatever the storage.
// - Matrices (core/matrix.h) keep their upstream storage on the device: kFloat (F32/BF16/F16),
//   kFP8 (e4m3 + 128x128 block scales, E8M0 or F32), kFP4 (e2m1 pairs, low nibble first, + a scale
//   per 32 inputs, E8M0 or F32).
// - Results are deterministic: the same inputs give the same bits run after run (no float atomics
//   whose order varies; reductions in a fixed order).
// - The semantics of every op are those of the CPU backend (backend/cpu/cpu_backend.cc), which is
//   the oracle the parity tests compare against.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "backend/backend.h"

namespace sp::cuda {

// The step's metadata on the device (uploaded once per step by begin_step). Arrays as in
// BatchView; SeqChunk has the same layout on both sides.
struct DevBatch {
  int num_tokens = 0;
  int num_chunks = 0;
  int num_logit_rows = 0;
  int block_tokens = 0;
  // Decode-shaped step (kGraphChunkTokens): launch sizes come from the limits (max_positions
  // positions per sequence), never from this step's positions, so the launches are the same for
  // every such step of num_tokens tokens and can be replayed from a graph.
  int static_shapes = 0;
  int64_t max_positions = 0;
  const int32_t* token_ids = nullptr;     // [num_tokens]
  const int32_t* positions = nullptr;     // [num_tokens]
  const int32_t* chunk_of = nullptr;      // [num_tokens]
  const SeqChunk* chunks = nullptr;       // [num_chunks]
  const int32_t* block_tables = nullptr;  // concatenated per chunk
  const int32_t* logit_rows = nullptr;    // [num_logit_rows]
  // Host copy of the same step (for launch sizing only: never dereference device arrays on the
  // host).
  const BatchView* host = nullptr;
};

// Row of compressed entry w of chunk ch in a per-entry pool (device side of entry_row()).
__device__ __forceinline__ int64_t dev_entry_row(const DevBatch& b, const SeqChunk& ch, int64_t w,
                                                 int ratio) {
  const int64_t per_block = b.block_tokens / ratio;
  return static_cast<int64_t>(b.block_tables[ch.block_table + w / per_block]) * per_block +
         w % per_block;
}

class LtGemm;  // gemm_lt.h

// The default of Workspace::moe_tc_min_tokens, 0: by the step's token count (a one-token step's
// experts stay on the CUDA-core decode kernels, every expert of larger steps takes the tensor
// cores; moe.cu).
constexpr int kMoeTcMinTokens = 0;

// Scratch device memory, reused across ops. get(slot, bytes) returns a buffer of at least `bytes`
// that stays valid until the next get() of the same slot; different slots never overlap. A new
// buffer starts zeroed (a slot may hold counters that its kernels return to zero). It grows
// (cudaMalloc, after synchronising the stream) only when a request is larger than any before, so a
// warmed-up decode step allocates nothing.
struct GraphCaptureAbort {};

// The workspace's slots, one list so that no two ops share a buffer that is live in both. A slot
// is an op's scratch within one call; ops that never run inside one another may share one.
enum WsSlot : int {
  kWsAttnPartials = 0,   // attention.cu: split partials [T, H, splits, dh + 2]
  kWsIndexerScores = 0,  // indexer.cu: scores (the indexer runs before the attention reads)
  kWsSplitK = 8,         // gemm.cu: split-K partials [splits, M, N] f32
  kWsMoeLogits = 9,      // moe.cu: router logits [T, E]
  kWsMoeRoute = 10,      // moe.cu: selected experts and weights [T, 2 K]
  kWsMoeMeta = 11,       // moe.cu: per-expert counts and offsets
  kWsMoePairs = 12,      // moe.cu: (token, expert) pairs sorted by expert
  kWsMoeH = 13,          // moe.cu: expert hidden activations [pairs, I]
  kWsMoeO = 14,          // moe.cu: expert outputs [pairs, D]
  kWsGemmX = 15,         // gemm.cu: activations converted to bf16 (hi, lo)
  kWsMoeStageX = 16,     // moe_decode.cu: staged x (bf16 hi, lo)
  kWsMoeStageH = 17,     // moe_decode.cu: staged hidden activations
  kWsMoeTcClaims = 18,   // moe_decode.cu: the work lists' item counters (8 ints)
  kWsHc = 20,            // elementwise.cu: mHC partial mix sums
  kWsHcCounter = 21,     // elementwise.cu: the one-launch mHC's block counter (0 between calls)
  kWsArgmax = 24,        // elementwise.cu: greedy sampling's per-slice best [rows, slices]
  kWsMoeGatePart = 25,   // moe.cu: the decode gate's partial logits [slices, T, E]
  kWsLtQ = 40,           // gemm_lt.cu: quantised activations
  kWsLtScale = 41,       // gemm_lt.cu: activation scales
  kWsLtWork = 42,        // gemm_lt.cu: cuBLASLt workspace
  kWsLtOut = 43,         // gemm_lt.cu: output before conversion
};

class Workspace {
 public:
  explicit Workspace(cudaStream_t stream) : stream_(stream) {}
  ~Workspace();
  void* get(int slot, size_t bytes);
  template <typename T>
  T* get(int slot, size_t count) {
    return static_cast<T*>(get(slot, count * sizeof(T)));
  }
  // While a step is recorded into a graph nothing may grow (growing waits for the stream): get()
  // throws GraphCaptureAbort instead and the step runs without a graph.
  void set_capturing(bool on) { capturing_ = on; }
  // Counts reallocations: a recorded graph holds the buffers it was recorded with, so the graphs
  // recorded before a reallocation must not be replayed after it.
  int64_t epoch() const { return epoch_; }
  // The FP8 projections through cuBLASLt (--activation-quant fp8), set by the backend that owns
  // both; null: every projection runs on this backend's own kernels.
  LtGemm* fp8_gemm = nullptr;
  // The MoE's experts of at least this many tokens (1..8) take the tensor-core kernels where the
  // layer's formats allow (moe_decode.cu); fewer, the CUDA-core decode kernels (moe.cu); 0 (the
  // default): 2 in a one-token step, 1 otherwise. Set by the backend (set_moe_tc_min_tokens);
  // bench_ops times 1 and 2 side by side.
  int moe_tc_min_tokens = kMoeTcMinTokens;

 private:
  cudaStream_t stream_;
  bool capturing_ = false;
  int64_t epoch_ = 0;
  std::vector<void*> ptr_;
  std::vector<size_t> size_;
};

// Aborts with file:line and the CUDA error (programmer/invariant errors and device faults).
void check_cuda(cudaError_t e, const char* what, const char* file, int line);
#define SP_CUDA(call) ::sp::cuda::check_cuda((call), #call, __FILE__, __LINE__)
// After a launch: checks the launch itself (not a sync).
#define SP_CUDA_LAUNCH() \
  ::sp::cuda::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// Lets `func` (a __global__ function) launch with up to `bytes` of dynamic shared memory on the
// current device: raises its limit to `bytes` when that is above the limit set so far for this
// (function, device), and never lowers it (a recorded graph's launches keep the limit they were
// recorded with; a process-wide "done" flag would miss the other GPUs of a threads pipeline).
// The kernel's static shared memory counts too: without the attribute a block may use 48 KiB of
// static and dynamic together. An error when the two are over the device's maximum.
void allow_dynamic_smem(const void* func, size_t bytes);
// Streaming multiprocessors of the GPU (launch sizing: a fixed count for a given card, so results
// do not depend on the run).
int num_sms();

// ---- gemm.cu: projections --------------------------------------------------------------------
// y = x W^T. x: [M, K] f32 or bf16, y: [M, N] f32 or bf16; fp32 accumulation.
void linear(cudaStream_t s, Workspace& ws, Tensor x, const Matrix& w, Tensor y);
// Block-diagonal grouped projection: y[:, g*N/G:(g+1)*N/G] = x[:, g*K:(g+1)*K] W_g^T with W viewed
// [G, N/G, K] (w.out = N, w.in = K = x.cols / G).
void grouped_linear(cudaStream_t s, Workspace& ws, Tensor x, const Matrix& w, int groups, Tensor y);
// The --activation-quant fp8 path of linear() (gemm_lt.cu): true when it computed y (FP8 weight,
// ws.fp8_gemm set, M large enough and a shape cuBLASLt takes), false with nothing enqueued.
bool fp8_linear(cudaStream_t s, Workspace& ws, Tensor x, const Matrix& w, Tensor y);
// out[t] = table[token_ids[t]] (exact decode, then stored in out's dtype).
void embed(cudaStream_t s, const Matrix& table, const DevBatch& b, Tensor out);

// ---- moe.cu: routing and experts ---------------------------------------------------------------
// Routed experts (sqrtsoftplus scores; hash routing by token id or bias-corrected top-k with ties
// to the lower expert id; weights normalised over the chosen experts times routed_scale) plus the
// shared expert; SwiGLU with clamp. Each token's routed contributions are summed in ascending
// expert order, then the shared expert's output is added (the CPU backend's order).
// x: [T, D] -> y: [T, D].
void moe(cudaStream_t s, Workspace& ws, Tensor x, const MoeArgs& a, const DevBatch& b, Tensor y);
// What moe() needs precomputed once per layer (device pointer tables of the experts), stored in
// moe.table by the backend at upload.
void prepare_moe(MoeWeights& moe, cudaStream_t s);
// Sets the MoE's tensor-core minimum (Workspace::moe_tc_min_tokens, 0..8) of a backend made by
// make_cuda_backend, and drops its recorded step graphs (their launches depend on it). For the
// parity tests and measurements; the results agree with the CPU either way.
void set_moe_tc_min_tokens(Backend& b, int n);

// ---- attention.cu: compressed KV, indexer, attention --------------------------------------------
void compress(cudaStream_t s, Workspace& ws, Tensor a, Tensor g, const CompressorArgs& args,
              const DevBatch& b, Tensor buf, Tensor cache);
void indexer_topk(cudaStream_t s, Workspace& ws, Tensor q, Tensor weights, int heads, int dim,
                  int ratio, int topk, const DevBatch& b, Tensor keys, Tensor out);
void attention(cudaStream_t s, Workspace& ws, Tensor q, Tensor kv, const AttentionArgs& args,
               const DevBatch& b, const LayerState& st, const Tensor* selected, Tensor o);
void window_update(cudaStream_t s, Tensor kv, int window, int ring_rows, const DevBatch& b,
                   Tensor ring);

// ---- elementwise.cu: norms, rope, mHC, copies, sampling ----------------------------------------
void expand_streams(cudaStream_t s, Tensor e, int hc, Tensor X);
void rms_norm(cudaStream_t s, Tensor x, const Tensor* weight, int group, float eps, Tensor y);
void rope(cudaStream_t s, Tensor x, int head_dim, const RopeView& r, const DevBatch& b,
          bool inverse);
void hc_pre(cudaStream_t s, Workspace& ws, Tensor X, const HcWeights& p, int hc, int iters,
            float hc_eps, float norm_eps, Tensor x, Tensor post, Tensor comb);
void hc_post(cudaStream_t s, Tensor f, Tensor post, Tensor comb, int hc, Tensor X);
void hc_head(cudaStream_t s, Workspace& ws, Tensor X, const HcWeights& p, int hc, float hc_eps,
             float norm_eps, Tensor h);
// hc_pre, then xn = rms_norm(x, weight, x.cols, norm_eps); hc_head, then h = rms_norm(h, weight,
// h.cols, norm_eps) in place: one launch where hc_pre / hc_head run in one and the norm takes
// rms_norm's register path (the same bits as the separate calls), else the two calls.
void hc_pre_norm(cudaStream_t s, Workspace& ws, Tensor X, const HcWeights& p, int hc, int iters,
                 float hc_eps, float norm_eps, const Tensor* weight, Tensor x, Tensor xn,
                 Tensor post, Tensor comb);
void hc_head_norm(cudaStream_t s, Workspace& ws, Tensor X, const HcWeights& p, int hc, float hc_eps,
                  float norm_eps, const Tensor* weight, Tensor h);
// hc_pre / hc_head of at most n tokens at hc_mult 4 run in one launch instead of two (default 1:
// on an H200 one launch was faster at T = 1 and slower at T = 2 than two;
// 0: always two, for tests and benchmarks to compare; at most 4). Returns the previous value.
int set_hc_fuse_max_tokens(int n);
void gather_rows(cudaStream_t s, Tensor x, const DevBatch& b, Tensor out);
void copy(cudaStream_t s, Tensor src, Tensor dst);
// Rows [dst_row, +n) of t = rows [src_row, +n): device to device on the stream.
void copy_rows(cudaStream_t s, Tensor t, int64_t src_row, int64_t dst_row, int64_t n);
// One id per spec into ids_dev (device int32 [specs]); specs_dev: device copy of the specs.
void sample(cudaStream_t s, Workspace& ws, Tensor logits, const SampleSpec* specs_dev,
            const SampleSpec* specs_host, int n, int32_t* ids_dev);

// ---- elementwise.cu: the forward pass's non-finite check ---------------------------------------
// Where a non-finite value was first seen, as an order key kept in one device int: the embedding
// is 0, layer i is i + 1, the head kNonFiniteKeyHead; kNonFiniteKeyClean (the value the flag is
// reset to: bytes of 0x7f, so one cudaMemsetAsync resets it) means none. Layers run in order, so
// the smallest key is the first place.
constexpr int32_t kNonFiniteKeyClean = 0x7f7f7f7f, kNonFiniteKeyHead = 1 << 30;
// If the f32 tensor x [rows, cols] holds a NaN or an Inf: *flag = min(*flag, key) (atomicMin).
// One read of x, nothing written but the flag; returns at once when the flag already holds a key
// <= `key` (an earlier place of this step was non-finite).
void note_non_finite(cudaStream_t s, Tensor x, int32_t key, int32_t* flag);

// ---- dummy.cu: --load-format dummy weights made on the device ----------------------------------
// Writes the value bytes of the described matrix m (m.dummy.on: kFloat as bf16, kFP8 as e4m3,
// kFP4 as packed bytes) to `values` (device, value_bytes()), identical to the host generator's
// (core/dummy.h); e4m3_table: the device copy of bf16_to_e4m3_table() (65,536 bytes). The scales
// (every byte dummy_scale_byte) are the caller's memset.
void dummy_values(cudaStream_t s, const Matrix& m, uint8_t* values, const uint8_t* e4m3_table);

}  // namespace sp::cuda
