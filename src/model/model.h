// The DeepSeek-V4 forward pass, written once against Backend. A Model runs the layers its
// weights hold (a pipeline stage may hold a subset), plus the embedding if it owns it and the
// head if it owns it. The residual between layers is X [tokens, hc_mult * hidden], the exact
// tensor that crosses a pipeline stage boundary.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "model/weights.h"

namespace sp {

// Start-up sizing (vLLM's names): state slots, longest sequence, tokens per step, logit rows.
struct StateLimits {
  int max_num_seqs = 1;
  int64_t max_model_len = 0;
  int max_num_batched_tokens = 0;
  int max_logit_rows = 0;
  // Residual buffers: one per micro-batch in flight, so an asynchronous send of one step's
  // boundary tensor never sees it overwritten by the next.
  int residual_buffers = 1;
  // State blocks in the pool (0: enough for every slot at max_model_len).
  int num_blocks = 0;
  // Reserve the MTP hidden-state buffer on the stage that owns the head (only when MTP is on; MTP
  // itself is not built yet, nothing turns this on).
  bool mtp = false;
  // Prefix caching: extra state slots (after the max_num_seqs sequence slots) that hold snapshots
  // of a slot's per-slot state; no step ever runs a sequence in one.
  int snapshot_slots = 0;
};

// One buffer of a layer's sequence state, for one sequence: `rows` x `cols`, or, when `per_entry`,
// one row per compressed entry (one entry per `ratio` tokens), kept in the block pool.
struct StateBuffer {
  Tensor LayerState::*field;
  int64_t rows = 0;
  int64_t cols = 0;
  bool per_entry = false;
};

// Positions per state block: a multiple of every compression ratio (so a block holds whole
// entries of every layer) and at least 256.
int state_block_tokens(const Config& c);
// Blocks one sequence of `len` positions needs.
int64_t blocks_for(int64_t len, int block_tokens);
// The one description of a layer's state layout: the Model allocates it, the estimates sum it.
std::vector<StateBuffer> layer_state_layout(const Config& c, int layer);

// Per-layer bytes of sequence state (fp32): fixed per sequence and growing per token.
struct StateBytes {
  int64_t per_sequence = 0;
  int64_t per_token = 0;
};
StateBytes layer_state_bytes(const Config& c, int layer);

// Rotary inverse frequencies for `rope_dim` rotated dims (YaRN ramp where the params ask for it).
std::vector<float> rope_inv_freq(const RopeParams& p, int rope_dim);

// Called with the residual after a layer: (global layer index, X [T, hc * hidden]).
using LayerHook = std::function<void(int layer, Tensor X)>;

class Model {
 public:
  Model(const Config& c, const ModelWeights& w, Backend& be, const StateLimits& lim);

  const Config& config() const { return c_; }
  const StateLimits& limits() const { return lim_; }
  Backend& backend() { return be_; }
  int first_layer() const { return w_.plan.first_layer; }
  int end_layer() const { return w_.plan.end_layer; }
  int block_tokens() const { return block_tokens_; }
  int num_blocks() const { return num_blocks_; }
  // Residual buffer `buffer` (of limits().residual_buffers) for `rows` rows.
  Tensor residual(int buffer, int rows) {
    return ws_X_[static_cast<size_t>(buffer % ws_X_.size())].slice_rows(0, rows);
  }
  int64_t state_bytes() const { return state_bytes_; }
  // The last layer's output streams, kept for the MTP draft layer: [tokens, hc * hidden]
  // (allocated for max_num_batched_tokens rows; empty unless limits.mtp on the head's stage).
  Tensor mtp_hidden() const { return ws_mtp_hidden_; }

  // State slots: max_num_seqs sequence slots, then snapshot_slots snapshot slots.
  int num_state_slots() const { return lim_.max_num_seqs + lim_.snapshot_slots; }
  // Copies every per-slot state buffer (window rings, compressors' pending windows) of every layer
  // this model holds from slot `src` to slot `dst`, in stream order with the steps around it. The
  // paged state (compressed entries, indexer keys) is not per slot and is not copied.
  void copy_slot(int src, int dst);
  // Bytes of per-slot state of one slot, on this model's backend (what a snapshot costs).
  int64_t slot_bytes() const { return slot_bytes_; }

  // Hands the step's metadata to the backend; call once per step before embed / run_layers / head.
  void begin_step(const BatchView& b);
  // X = the token embeddings expanded to hc_mult streams (first stage only).
  void embed(const BatchView& b, Tensor X);
  // Runs this model's layers in place on X.
  void run_layers(const BatchView& b, Tensor X, const LayerHook& hook = nullptr);
  // logits[i] = head(norm(hc_head(X[b.logit_rows[i]]))) (last stage only).  [rows, vocab] f32
  Tensor head(const BatchView& b, Tensor X);

 private:
  void upload_weights();
  void attention_block(const LayerView& L, LayerState& st, const BatchView& b, Tensor xn, Tensor f);

  const Config c_;  // a copy: the model outlives whatever parsed it
  const ModelWeights& w_;
  Backend& be_;
  StateLimits lim_;
  int block_tokens_ = 0, num_blocks_ = 0;
  // The weights as the backend keeps them.
  Matrix embed_, head_;
  Tensor final_norm_;
  HcWeights hc_head_;
  std::vector<LayerView> layers_;
  RopeView rope_main_, rope_compress_;
  std::vector<LayerState> state_;  // per owned layer
  // What each LayerState of state_ holds (per-slot buffers: rows of all slots), for copy_slot.
  std::vector<std::vector<StateAlloc>> state_layout_;
  int64_t state_bytes_ = 0, slot_bytes_ = 0;
  // Workspace, sized at start-up for max_num_batched_tokens rows.
  std::vector<Tensor> ws_X_;  // one per residual buffer
  Tensor ws_x_, ws_xn_, ws_f_, ws_post_, ws_comb_, ws_qlat_, ws_q_, ws_kv_, ws_a_, ws_g_, ws_o_,
      ws_z_, ws_iq_, ws_iw_, ws_ia_, ws_ig_, ws_sel_, ws_h_, ws_hsel_, ws_logits_, ws_mtp_hidden_;
};

}  // namespace sp
