// The checkpoint name table of DeepSeek-V4 and the weights of (part of) a model.
// Quantised weights stay quantised in memory: a Linear holds its stored values and scales and
// decodes rows exactly on demand. Small fp32 parameters (norms, mHC, sinks, ape, biases) are
// converted to fp32 at load; conversion from F32/BF16/F16 is exact, never a rounding.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/matrix.h"
#include "core/status.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace sp {

// Which part of the model a tensor belongs to; pipeline stages load parts by this.
enum class Part { kEmbed, kLayer, kHcHead, kFinalNorm, kHead, kMtp };

enum class TensorRole {
  kParam,   // small float tensor converted to fp32 at load
  kMatrix,  // [out, in] matrix decoded on the fly, stored in the format given
  kIndex,   // integer table (tid2eid), I32 or I64
};

struct ExpectedTensor {
  std::string name;
  TensorRole role;
  WeightFormat format = WeightFormat::kFloat;  // kMatrix only
  std::vector<int64_t> shape;
  Part part;
  int layer = -1;  // global layer index for Part::kLayer
};

// Every tensor of the main model the config implies, in a fixed order; with `mtp`, then the MTP
// draft layer's (mtp.0.*: Part::kMtp, layer = num_layers).
std::vector<ExpectedTensor> expected_tensors(const Config& c, bool mtp = false);
// Whether --speculative mtp can run this config: an error naming what is missing (no MTP layer:
// num_nextn_predict_layers 0 or absent) or what is there instead (a DSpark draft module).
Status check_mtp_config(const Config& c);
// Name prefix of the MTP layer's tensors: "mtp.0.".
std::string mtp_prefix();
// Storage bytes of one expected tensor including its scales.
int64_t expected_bytes(const ExpectedTensor& t);
// Weight bytes one decode token reads (batch 1): every tensor of the main model except the routed
// experts, plus experts_per_tok routed experts per layer and one row of the embedding. Over the
// copy bandwidth of one GPU this is a decode step's floor at any pipeline split.
double decode_bytes_per_token(const Config& c);

// A weight matrix [out, in] as stored (the checkpoint's bytes).
using Linear = Matrix;

struct HcParams {
  std::vector<float> fn;     // [mix, hc_mult * hidden] fp32 (mix = (2 + hc) * hc; hc for hc_head)
  std::vector<float> base;   // [mix]
  std::vector<float> scale;  // [3] (hc_head: [1])
};

struct CompressorWeights {
  Linear wkv, wgate;        // [k * d, hidden], run in fp32
  std::vector<float> ape;   // [ratio, k * d]
  std::vector<float> norm;  // [d]
};

struct LayerWeights {
  int index = -1;  // global layer index
  AttnKind kind = AttnKind::kSliding;
  int ratio = 0;
  MlpKind mlp = MlpKind::kMoe;
  std::vector<float> attn_norm, ffn_norm;  // [hidden]
  HcParams hc_attn, hc_ffn;
  Linear wq_a, wq_b, wkv, wo_a, wo_b;
  std::vector<float> q_norm;          // [q_lora]
  std::vector<float> kv_norm;         // [head_dim]
  std::vector<float> attn_sink;       // [heads]
  CompressorWeights compressor;       // ratio > 0
  Linear idx_wq_b, idx_weights_proj;  // CSA: [ih * id, q_lora], [ih, hidden]
  CompressorWeights idx_compressor;   // CSA, at index_head_dim
  Linear gate;                        // [experts, hidden]
  std::vector<float> gate_bias;       // [experts] (learned routing)
  std::vector<int32_t> tid2eid;       // [vocab, top_k] (hash routing)
  std::vector<Linear> w1, w2, w3;     // routed experts
  Linear sw1, sw2, sw3;               // shared expert
};

// What a process loads: which layers and which end-of-model parts.
struct LoadPlan {
  int first_layer = 0;
  int end_layer = 0;  // exclusive
  bool embed = true;  // the first stage; with MTP on, the last stage too (the draft embeds tokens)
  bool head = true;   // hc_head, final norm, head
  bool mtp = false;   // the MTP draft layer (mtp.0.*): on the last stage, with --speculative mtp
  bool owns(const ExpectedTensor& t) const;
  static LoadPlan whole(const Config& c, bool mtp = false) {
    return LoadPlan{0, c.num_layers, true, true, mtp};
  }
  // Stage `stage` of `partition`'s pipeline.
  static LoadPlan stage(const std::vector<int>& partition, int stage, bool mtp);
};

// The MTP draft layer (model_spec.md section 7).
struct MtpWeights {
  Linear e_proj, h_proj;                  // [hidden, hidden]
  std::vector<float> enorm, hnorm, norm;  // [hidden]
  HcParams hc_head;                       // its own hc_head
  LayerWeights block;                     // index num_layers: sliding-only, learned routing
};

struct LoadStats {
  int64_t tensors = 0;  // tensors this process took
  int64_t bytes = 0;    // their storage bytes (incl. scales)
  int64_t checkpoint_tensors = 0;
  // mtp.* tensors accepted but not used: all of them without --speculative mtp; with it, those
  // outside the first MTP layer's table (extra MTP layers, duplicated embed / head copies).
  std::vector<std::string> mtp_tensors;
  std::set<std::string> accessed;  // names whose bytes were touched
  double seconds = 0;
};

struct ModelWeights {
  Linear embed;                   // [vocab, hidden]
  Linear head;                    // [vocab, hidden]
  std::vector<float> final_norm;  // [hidden]
  HcParams hc_head;
  std::vector<LayerWeights> layers;  // the plan's layers, in order
  MtpWeights mtp;                    // when plan.mtp
  LoadPlan plan;
  LoadStats stats;
  // Keeps mapped files / generated buffers alive.
  std::shared_ptr<void> checkpoint_owner;
  std::vector<std::vector<uint8_t>> owned;
  const LayerWeights& layer(int global) const { return layers[global - plan.first_layer]; }
};

// Calls fn on every matrix the weights hold (valid or not: absent ones have out == 0), in a fixed
// order: embed, head, each layer's, then the MTP layer's.
void for_each_matrix(const ModelWeights& w, const std::function<void(const Linear&)>& fn);

using ProgressFn = std::function<void(int64_t done_bytes, int64_t total_bytes)>;

// Validates the checkpoint against the config (missing, unexpected, wrong shape or dtype: errors
// that list the tensors) and binds the plan's tensors.
Result<std::unique_ptr<ModelWeights>> load_weights(const Config& c, const std::string& dir,
                                                   const LoadPlan& plan,
                                                   const ProgressFn& progress);
// Where dummy_weights makes the matrices' bytes. kHost: here, in host buffers the weights own.
// kAtUpload: matrices only carry their generator's parameters (Matrix::dummy, no bytes) and each
// backend's upload makes the bytes where they live (the CUDA backend on the device: a stage needs
// no host memory for them); f32 parameters and index tables, which are small, are made here.
// Both give the same bytes.
enum class DummyMatrices { kHost, kAtUpload };

// Weights of the config's shapes and upstream formats generated from a seed (--load-format dummy).
// Values are scaled so activations stay O(1).
Result<std::unique_ptr<ModelWeights>> dummy_weights(const Config& c, const LoadPlan& plan,
                                                    uint64_t seed, const ProgressFn& progress,
                                                    DummyMatrices where = DummyMatrices::kHost);

}  // namespace sp
