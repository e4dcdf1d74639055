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
  // The MTP draft layer (--speculative mtp): on the stage that owns the head, its weights (the
  // LoadPlan must have mtp on), its window state, its workspace and the hidden-state buffer.
  bool mtp = false;
  // Extra rows of every per-slot ring (window, compressor inputs): the most speculative tokens a
  // step may write and the next drop (0 without speculation).
  int spec_slack = 0;
  // Prefix caching: extra state slots (after the max_num_seqs sequence slots) that hold snapshots
  // of a slot's per-slot state; no step ever runs a sequence in one.
  int snapshot_slots = 0;
  // Decode steps recorded once per (token count, residual buffer) and replayed as CUDA graphs on
  // a backend that can (--enforce-eager turns it off).
  bool step_graphs = true;
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
// `slack`: StateLimits::spec_slack.
std::vector<StateBuffer> layer_state_layout(const Config& c, int layer, int slack = 0);
// Rows per slot of the window ring and of a compressor's input ring.
int window_ring_rows(const Config& c, int slack);
int compressor_ring_rows(const Config& c, int layer, int slack);

// Per-layer bytes of sequence state (fp32): fixed per sequence and growing per token.
struct StateBytes {
  int64_t per_sequence = 0;
  int64_t per_token = 0;
};
StateBytes layer_state_bytes(const Config& c, int layer, int slack = 0);

// Rotary inverse frequencies for `rope_dim` rotated dims (YaRN ramp where the params ask for it).
std::vector<float> rope_inv_freq(const RopeParams& p, int rope_dim);

// Called with the residual after a layer: (global layer index, X [T, hc * hidden]).
using LayerHook = std::function<void(int layer, Tensor X)>;

class Model {
 public:
  // on_progress (may be empty) is called after each layer's weights are on the backend: the
  // start-up watchdog's sign that an upload is progressing.
  Model(const Config& c, const ModelWeights& w, Backend& be, const StateLimits& lim,
        const std::function<void()>& on_progress = {});

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
  // The state of the layers this model runs, in layer order (tests compare caches through it).
  const std::vector<LayerState>& layer_states() const { return state_; }
  // A buffer for the MTP draft layer's input streams (the drafter gathers the standing rows of the
  // last layer's output into it): [max_num_batched_tokens, hc * hidden]; empty unless limits.mtp
  // on the head's stage.
  Tensor mtp_hidden() const { return ws_mtp_hidden_; }
  // A buffer for the MTP layer's output streams (mtp_forward's X_out, and X_in of a chained draft),
  // `rows` of [max_num_batched_tokens, hc * hidden]; apart from the residual buffers, which belong
  // to the micro-batches in flight. Empty unless has_mtp().
  Tensor mtp_streams(int rows) const { return ws_mtp_out_.slice_rows(0, rows); }

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

  // Whether this model runs the MTP draft layer (the head's stage with StateLimits.mtp).
  bool has_mtp() const { return mtp_on_; }
  // The MTP draft layer over the rows of `b` (positions, chunks, slots and block tables as in a
  // main step; b.token_ids[i] = the token t[p+1] that FOLLOWS row i's position p; b.logit_rows =
  // the rows whose draft logits are wanted). X_in [T, hc*hidden]: the main model's last-layer
  // output streams at those rows (before hc_head), or the MTP layer's own output streams when
  // drafts are chained; X_out [T, hc*hidden] receives the MTP block's output streams (before its
  // hc_head). Calls be.begin_step(b) itself (the caller has finished the main step's head and
  // sampling). Returns the logits [logit_rows, vocab] f32 as head() does.
  Tensor mtp_forward(const BatchView& b, Tensor X_in, Tensor X_out);

 private:
  void upload_weights(const std::function<void()>& on_progress);
  void check_step(const BatchView& b) const;
  // One decoder block (mHC, attention, mHC, MoE) in place on X: the main layers and the MTP layer.
  void decoder_block(const LayerView& L, LayerState& st, const BatchView& b, Tensor X);
  void attention_block(const LayerView& L, LayerState& st, const BatchView& b, Tensor xn, Tensor f);
  void compressor(const LayerView& L, const CompressorView& w, int overlap, int dim,
                  const BatchView& b, Tensor xn, Tensor a, Tensor g, Tensor ring, Tensor entries);
  // logits of b.logit_rows through an hc_head, a final norm and the head.
  Tensor head_rows(const BatchView& b, Tensor X, const HcWeights& hc, const Tensor& norm);

  const Config c_;  // a copy: the model outlives whatever parsed it
  const ModelWeights& w_;
  Backend& be_;
  StateLimits lim_;
  bool mtp_on_ = false;
  int block_tokens_ = 0, num_blocks_ = 0;
  // The weights as the backend keeps them.
  Matrix embed_, head_;
  Tensor final_norm_;
  HcWeights hc_head_;
  std::vector<LayerView> layers_;
  RopeView rope_main_, rope_compress_;
  std::vector<LayerState> state_;  // per owned layer
  // The MTP draft layer: its block (index num_layers), input projections and norms, own hc_head
  // and final norm (the head is the main one), and its state.
  LayerView mtp_layer_;
  Matrix mtp_e_proj_, mtp_h_proj_;
  Tensor mtp_enorm_, mtp_hnorm_, mtp_norm_;  // [1, hidden] f32
  HcWeights mtp_hc_head_;
  LayerState mtp_state_;
  std::vector<StateAlloc> mtp_layout_;
  // What each LayerState of state_ holds (per-slot buffers: rows of all slots), for copy_slot.
  std::vector<std::vector<StateAlloc>> state_layout_;
  int64_t state_bytes_ = 0, slot_bytes_ = 0;
  // Workspace, sized at start-up for max_num_batched_tokens rows.
  std::vector<Tensor> ws_X_;  // one per residual buffer
  Tensor ws_x_, ws_xn_, ws_f_, ws_post_, ws_comb_, ws_qlat_, ws_q_, ws_kv_, ws_a_, ws_g_, ws_o_,
      ws_z_, ws_iq_, ws_iw_, ws_ia_, ws_ig_, ws_sel_, ws_h_, ws_hsel_, ws_logits_, ws_mtp_hidden_;
  // MTP workspace: hnorm of the streams [T, hc * hidden]; a zero embedding row [1, hidden]; ones
  // [T, hc] and identities [T, hc * hc] f32 (hc_post as a broadcast add); mtp_streams() [T, hc *
  // hidden] residual dtype.
  Tensor ws_mtp_hs_, ws_mtp_zero_, ws_mtp_ones_, ws_mtp_eye_, ws_mtp_out_;
};

}  // namespace sp
