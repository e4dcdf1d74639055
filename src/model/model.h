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
  // Reserve the MTP hidden-state buffer on the stage that owns the head (only when MTP is on; MTP
  // itself is not built yet, nothing turns this on).
  bool mtp = false;
};

// One buffer of a layer's sequence state (fp32), for one sequence: `rows` x `cols`, or, when
// `per_entry`, one row per compressed entry (one entry per `ratio` tokens, up to max_model_len).
struct StateBuffer {
  Tensor LayerState::*field;
  int64_t rows = 0;
  int64_t cols = 0;
  bool per_entry = false;
};
// The one description of a layer's state layout: the Model allocates it, the estimates sum it.
std::vector<StateBuffer> layer_state_layout(const Config& c, int layer);

// Per-layer bytes of sequence state: fixed per sequence and growing per token.
struct StateBytes {
  int64_t per_sequence = 0;
  int64_t per_token = 0;
};
StateBytes layer_state_bytes(const Config& c, int layer);

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
  // Residual workspace for up to max_num_batched_tokens rows.
  Tensor residual(int rows) { return ws_X_.slice_rows(0, rows); }
  int64_t state_bytes() const { return state_bytes_; }
  // The last layer's output streams, kept for the MTP draft layer: [tokens, hc * hidden]
  // (allocated for max_num_batched_tokens rows; empty unless limits.mtp on the head's stage).
  Tensor mtp_hidden() const { return ws_mtp_hidden_; }

  // X = the token embeddings expanded to hc_mult streams (first stage only).
  void embed(const BatchView& b, Tensor X);
  // Runs this model's layers in place on X.
  void run_layers(const BatchView& b, Tensor X, const LayerHook& hook = nullptr);
  // logits[i] = head(norm(hc_head(X[rows[i]]))) (last stage only).   logits: [rows, vocab]
  Tensor head(Tensor X, const std::vector<int32_t>& rows);

 private:
  void attention_block(const LayerWeights& L, LayerState& st, const BatchView& b, Tensor xn,
                       Tensor f);

  const Config c_;  // a copy: the model outlives whatever parsed it
  const ModelWeights& w_;
  Backend& be_;
  StateLimits lim_;
  RopeTable rope_main_, rope_compress_;
  std::vector<LayerState> state_;  // per owned layer
  int64_t state_bytes_ = 0;
  // Workspace, sized at start-up for max_num_batched_tokens rows.
  Tensor ws_X_, ws_x_, ws_xn_, ws_f_, ws_post_, ws_comb_, ws_qlat_, ws_q_, ws_kv_, ws_a_, ws_g_,
      ws_o_, ws_z_, ws_iq_, ws_iw_, ws_ia_, ws_ig_, ws_h_, ws_hsel_, ws_logits_, ws_mtp_hidden_;
  std::vector<int32_t> selected_;
};

}  // namespace sp
