// config.json -> immutable Config. Both styles that exist are parsed:
//  * Hugging Face style (as transformers writes it): layer_types, mlp_layer_types, compress_rates,
//    partial_rotary_factor, rope_parameters.{main,compress};
//  * upstream style (as the released checkpoints ship): compress_ratios (layers + 1 entries),
//    num_hash_layers, qk_rope_head_dim, rope_scaling (YaRN, compressed rope only).
// docs/config.md lists the fields each style requires.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/kinds.h"
#include "core/status.h"

namespace sp {

enum class ConfigStyle { kHuggingFace, kUpstream };

const char* attn_kind_name(AttnKind k);
const char* attn_kind_abbrev(AttnKind k);  // SWA, CSA, HCA
const char* weight_format_name(WeightFormat f);

struct RopeParams {
  double theta = 10000.0;
  bool yarn = false;
  double factor = 1.0;
  double original_max_position = 0.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
};

struct Config {
  ConfigStyle style = ConfigStyle::kHuggingFace;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int head_dim = 0;
  int rope_dim = 0;  // qk_rope_head_dim: rotated trailing dims of every head / entry
  int q_lora_rank = 0;
  int o_groups = 0;
  int o_lora_rank = 0;
  int sliding_window = 0;            // window length counted including the query token
  std::vector<AttnKind> attn_kinds;  // [num_layers]
  std::vector<int> compress_ratio;   // [num_layers]; 0 for sliding-only layers
  std::vector<MlpKind> mlp_kinds;    // [num_layers]
  int index_n_heads = 0;
  int index_head_dim = 0;
  int index_topk = 0;
  int n_routed_experts = 0;
  int n_shared_experts = 0;
  int experts_per_tok = 0;
  int moe_inter = 0;
  double routed_scaling_factor = 1.0;
  float swiglu_limit = 0.0f;
  int hc_mult = 0;
  int hc_sinkhorn_iters = 0;
  float hc_eps = 0.0f;
  float rms_norm_eps = 0.0f;
  RopeParams rope_main;      // sliding-only layers (and MTP): never YaRN
  RopeParams rope_compress;  // CSA / HCA layers
  int num_mtp_layers = 0;
  // DeepSeek-V4 releases with a DSpark draft module (V4-Flash-0731, V4-Pro-0813): config.json has
  // dspark_* keys and compress_ratios ends with one entry per DSpark block. The main model is plain
  // V4; the draft module (mtp.0..2.* with main_proj / main_norm / markov_head) is not supported and
  // its tensors are ignored.
  bool dspark = false;
  std::vector<std::string> dspark_keys;               // the dspark_* keys present, sorted
  WeightFormat linear_format = WeightFormat::kFloat;  // attention / shared-expert / mtp projections
  WeightFormat expert_format = WeightFormat::kFloat;  // routed experts
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;
  int64_t max_position_embeddings = 0;
  std::vector<std::string> ignored_keys;  // keys present in config.json that the model does not use

  int hc_dim() const { return hc_mult * static_cast<int>(hidden_size); }
  int hc_mix() const { return (2 + hc_mult) * hc_mult; }
  // Layer kinds for l in [0, num_layers]: index num_layers is the MTP layer, a sliding-only layer
  // with learned routing (its compress_ratios entry is 0 in every config that has one).
  AttnKind layer_kind(int l) const { return l == num_layers ? AttnKind::kSliding : attn_kinds[l]; }
  int layer_ratio(int l) const { return l == num_layers ? 0 : compress_ratio[l]; }
  MlpKind layer_mlp(int l) const { return l == num_layers ? MlpKind::kMoe : mlp_kinds[l]; }
  // Compressor overlap factor k: 2 for CSA (overlapping windows), 1 for HCA.
  int compressor_overlap(int layer) const { return layer_kind(layer) == AttnKind::kCSA ? 2 : 1; }
  int num_layers_of(AttnKind k) const;
};

// config.json larger than this is refused unread (a real one is a few KiB).
constexpr int64_t kMaxConfigBytes = int64_t{1} << 20;

// Parses config.json text; `source` names the file in error messages.
Result<Config> parse_config(const std::string& text, const std::string& source);
// Reads <model_dir>/config.json: only a regular file (after following links) of at most
// kMaxConfigBytes.
Result<Config> load_config(const std::string& model_dir);
// Multi-line human summary (inspect).
std::string describe_config(const Config& c);

}  // namespace sp
