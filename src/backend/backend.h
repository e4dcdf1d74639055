// The DeepSeek-V4 op set. The forward pass (model/forward.cc) is written once against this
// interface; the CPU backend is the numerical oracle, later backends must match it.
//
// Activations are row-major fp32 matrices (Tensor); a row is a token unless said otherwise.
// Per-sequence state (window ring, compressed entries, indexer keys, compressor windows) lives in
// backend memory (StateTensors) addressed by a sequence slot. Host-side step metadata (positions,
// token ids, which tokens belong to which sequence) travels in a BatchView.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/weights.h"

namespace sp {

struct Tensor {
  float* data = nullptr;
  int64_t rows = 0, cols = 0;
  float* row(int64_t r) const { return data + r * cols; }
  Tensor slice_rows(int64_t begin, int64_t n) const { return {data + begin * cols, n, cols}; }
};

// One sequence's tokens inside a step: batch rows [offset, offset + n_tokens) at positions
// [start_pos, start_pos + n_tokens) of the sequence in state slot `slot`.
struct SeqChunk {
  int slot = 0;
  int64_t start_pos = 0;
  int n_tokens = 0;
  int offset = 0;
};

// Host metadata of one step; every pipeline stage has it (token ids too: hash-MoE routes by them).
struct BatchView {
  int num_tokens = 0;
  std::vector<int32_t> token_ids;  // [num_tokens]
  std::vector<int32_t> positions;  // [num_tokens]
  std::vector<int32_t> chunk_of;   // [num_tokens] index into chunks
  std::vector<SeqChunk> chunks;
};

// cos/sin per position for the rotated trailing dims (interleaved pairs).
struct RopeTable {
  std::vector<float> inv_freq;  // [rope_dim / 2]
  int rope_dim = 0;
  static RopeTable build(const RopeParams& p, int rope_dim);
};

// One attention layer's per-sequence state, [slots, ...] each.
struct LayerState {
  Tensor window;    // [slots * W, head_dim]       ring: position p at row slot*W + p % W
  Tensor cmp;       // [slots * max_entries, head_dim] compressed entries (ratio > 0)
  Tensor cmp_buf;   // [slots * 2 * ratio, k * head_dim] compressor: rows [0, ratio) pending window
                    // values, rows [ratio, 2 ratio) their gates (ape included)
  Tensor cmp_prev;  // [slots * 2 * ratio, head_dim] CSA: previous window's A-halves (values, gates)
  Tensor idx;       // [slots * max_entries, index_head_dim] indexer keys (CSA)
  Tensor idx_buf, idx_prev;  // the indexer compressor's windows, as above at index_head_dim
  int64_t max_entries = 0;
};

struct CompressorArgs {
  const CompressorWeights* w;
  const RopeTable* rope;
  int ratio, overlap, dim;  // overlap k: 2 for CSA, 1 for HCA; dim: entry width
  float eps;
};

struct AttentionArgs {
  int num_heads, head_dim, window, ratio;  // ratio 0: sliding only
  AttnKind kind;
  float scale;
  const float* sink;  // [num_heads]
};

struct MoeArgs {
  const LayerWeights* w;
  int experts_per_tok;
  float routed_scale, swiglu_limit;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual int num_threads() const = 0;
  // Zero-initialised storage owned by the backend, alive until the backend is destroyed.
  virtual Tensor alloc(int64_t rows, int64_t cols) = 0;

  // out[t] = table[ids[t]]  (exact upcast)            out: [T, hidden]
  virtual void embed(const Linear& table, const BatchView& b, Tensor out) = 0;
  // X[t, j, :] = e[t, :] for every stream j          e: [T, D]  X: [T, hc * D]
  virtual void expand_streams(Tensor e, int hc, Tensor X) = 0;
  // y = x W^T, fp32 accumulate in a fixed order       x: [M, K]  y: [M, N]
  virtual void linear(Tensor x, const Linear& w, Tensor y) = 0;
  // Block-diagonal grouped projection: y[:, g] = x[:, g] W_g^T with W viewed [G, N/G, K/G]
  virtual void grouped_linear(Tensor x, const Linear& w, int groups, Tensor y) = 0;
  // RMS norm over each group of `group` columns; weight [group] or null (unweighted). In place OK.
  virtual void rms_norm(Tensor x, const float* weight, int group, float eps, Tensor y) = 0;
  // Rotates the trailing rope dims of each `head_dim` group at the row's position (inverse:
  // -theta).
  virtual void rope(Tensor x, int head_dim, const RopeTable& t, const BatchView& b,
                    bool inverse) = 0;
  // mHC: collapse before a sublayer. X: [T, hc*D] -> x: [T, D], post: [T, hc], comb: [T, hc*hc]
  virtual void hc_pre(Tensor X, const HcParams& p, int hc, int sinkhorn_iters, float hc_eps,
                      float norm_eps, Tensor x, Tensor post, Tensor comb) = 0;
  // mHC: expand after a sublayer. X[k] = post_k f + sum_j comb[j,k] X[j] (in place on X)
  virtual void hc_post(Tensor f, Tensor post, Tensor comb, int hc, Tensor X) = 0;
  // Final collapse: h = sum_j (sigmoid(mix_j scale + base_j) + eps) X[j]     h: [T, D]
  virtual void hc_head(Tensor X, const HcParams& p, int hc, float hc_eps, float norm_eps,
                       Tensor h) = 0;
  // Compressor: feeds projected values a and gates g ([T, k*dim]) of every chunk's tokens into
  // the slot's window state and appends an entry (norm + rope at the window's first position)
  // to `cache` for every window that completes. buf/prev: the slot's compressor state.
  virtual void compress(Tensor a, Tensor g, const CompressorArgs& args, const BatchView& b,
                        Tensor buf, Tensor prev, Tensor cache, int64_t max_entries) = 0;
  // Lightning indexer: for each token the top-k visible compressed entries by
  // sum_h relu(q_h . k_w) * scale_q * weights_h, ties to the lower index; sorted ascending,
  // padded with -1.    q: [T, ih*id]  weights: [T, ih]  out: [T, topk] (int32 stored in floats'
  // bits)
  virtual void indexer_topk(Tensor q, Tensor weights, int heads, int dim, int ratio, int topk,
                            const BatchView& b, Tensor keys, int64_t max_entries,
                            std::vector<int32_t>& out) = 0;
  // Attention with sink over the window (ring + this step's kv rows) and compressed entries
  // (HCA: all visible; CSA: `selected`).   q: [T, H*dh]  kv: [T, dh]  o: [T, H*dh]
  virtual void attention(Tensor q, Tensor kv, const AttentionArgs& args, const BatchView& b,
                         const LayerState& st, const std::vector<int32_t>* selected, int topk,
                         Tensor o) = 0;
  // Writes this step's kv rows into the slots' window rings (after attention read them).
  virtual void window_update(Tensor kv, int window, const BatchView& b, Tensor ring) = 0;
  // Routed + shared experts.   x: [T, D] -> y: [T, D]
  virtual void moe(Tensor x, const MoeArgs& args, const BatchView& b, Tensor y) = 0;
  // out[i] = x[rows[i]]
  virtual void gather_rows(Tensor x, const std::vector<int32_t>& rows, Tensor out) = 0;
  // Host copies (transports and tests); no-ops on the CPU backend beyond memcpy.
  virtual void to_host(Tensor src, float* dst) = 0;
  virtual void from_host(const float* src, Tensor dst) = 0;
};

// min_work_per_thread: the least work (multiply-adds) worth handing to another thread; tests set 1
// to split every op.
std::unique_ptr<Backend> make_cpu_backend(int num_threads,
                                          int64_t min_work_per_thread = int64_t{1} << 16);

}  // namespace sp
