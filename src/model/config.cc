#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/checked.h"
#include "model/strict_json.h"

namespace sp {

using nlohmann::json;

const char* attn_kind_name(AttnKind k) {
  switch (k) {
    case AttnKind::kSliding:
      return "sliding_attention";
    case AttnKind::kCSA:
      return "compressed_sparse_attention";
    case AttnKind::kHCA:
      return "heavily_compressed_attention";
  }
  return "?";
}

const char* attn_kind_abbrev(AttnKind k) {
  switch (k) {
    case AttnKind::kSliding:
      return "SWA";
    case AttnKind::kCSA:
      return "CSA";
    case AttnKind::kHCA:
      return "HCA";
  }
  return "?";
}

const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::kFloat:
      return "float";
    case WeightFormat::kFP8:
      return "fp8 e4m3 (ue8m0 128x128 block scales)";
    case WeightFormat::kFP4:
      return "fp4 e2m1 (ue8m0 scales per 32 inputs)";
  }
  return "?";
}

int Config::num_layers_of(AttnKind k) const {
  int n = 0;
  for (auto a : attn_kinds) n += a == k;
  return n;
}

namespace {

// Plausible ranges (docs/config.md): each is at least 8x the largest released DeepSeek-V4 value,
// and small enough that every size derived from a config fits int64 with room to spare (the widest
// product, experts x moe_intermediate_size x hidden_size x layers, stays below 2^55).
constexpr int64_t kMaxVocab = int64_t{1} << 24;
constexpr int64_t kMaxWidth = 65536;  // hidden_size, q_lora_rank, o_lora_rank, moe_intermediate
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxHeads = 1024;
constexpr int64_t kMaxHeadDim = 4096;
constexpr int64_t kMaxWindow = 65536;
constexpr int64_t kMaxIndexTopk = 65536;
constexpr int64_t kMaxExperts = 4096;
constexpr int64_t kMaxExpertsPerTok = 64;
constexpr int64_t kMaxHcMult = 16;
constexpr int64_t kMaxSinkhornIters = 1000;
constexpr int64_t kMaxCompressRate = 4096;
constexpr int64_t kMaxMtpLayers = 16;
// Blocks of the DSpark draft module (mtp.0..2), each with a compress_ratios entry.
constexpr int kDSparkBlocks = 3;
constexpr int64_t kMaxPositions = int64_t{1} << 30;
constexpr double kMaxRopeTheta = 1e12;
constexpr double kMinEps = 1e-12, kMaxEps = 0.1;
// What the config may describe in all: tensors in the table (the table is built from the config
// before any checkpoint is read) and weight elements.
constexpr int64_t kMaxTensors = int64_t{1} << 20;
constexpr int64_t kMaxWeightElements = int64_t{1} << 46;

// Reads fields from the top-level object, remembering which keys the model used so the rest can
// be reported as ignored. Every failure names the field and what was expected.
class Reader {
 public:
  Reader(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  bool has(const std::string& k) const { return j_.contains(k) && !j_[k].is_null(); }
  const json& raw(const std::string& k) {
    used_.insert(k);
    return j_[k];
  }
  void mark(const std::string& k) { used_.insert(k); }

  Status fail(const std::string& field, const std::string& expected, const json* got) const {
    std::string msg = str(source_, ": field '", field, "': expected ", expected);
    if (got)
      msg += str(", got ", json_brief(*got));
    else
      msg += ", but it is missing";
    return Status::error(msg);
  }

  // An integer in [lo, hi]. JSON integers beyond int64 (unsigned) are out of range, never wrapped.
  Result<int64_t> integer(const std::string& k, int64_t lo, int64_t hi) {
    const std::string expected = range_text(lo, hi);
    if (!has(k)) return fail(k, expected, nullptr);
    const json& v = raw(k);
    auto got = integer_value(v, lo, hi);
    if (!got) return fail(k, expected, &v);
    return *got;
  }
  // A number in [lo, hi], or (lo, hi] when lo_open.
  Result<double> number(const std::string& k, double lo, double hi, bool lo_open) {
    const std::string expected = range_text(lo, hi, lo_open);
    if (!has(k)) return fail(k, expected, nullptr);
    const json& v = raw(k);
    if (!number_in(v, lo, hi, lo_open)) return fail(k, expected, &v);
    return v.get<double>();
  }
  static std::optional<int64_t> integer_value(const json& v, int64_t lo, int64_t hi) {
    if (!v.is_number_integer()) return std::nullopt;
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      return std::nullopt;
    const int64_t x = v.get<int64_t>();
    if (x < lo || x > hi) return std::nullopt;
    return x;
  }
  static bool number_in(const json& v, double lo, double hi, bool lo_open) {
    if (!v.is_number()) return false;
    const double x = v.get<double>();
    return std::isfinite(x) && (lo_open ? x > lo : x >= lo) && x <= hi;
  }
  static std::string range_text(int64_t lo, int64_t hi) {
    return str("an integer in [", lo, ", ", hi, "]");
  }
  static std::string range_text(double lo, double hi, bool lo_open) {
    return str("a number in ", lo_open ? "(" : "[", lo, ", ", hi, "]");
  }
  // Optional key that, if present, must equal one of the allowed strings.
  Status optional_enum(const std::string& k, const std::vector<std::string>& allowed) {
    if (!has(k)) return Status::ok();
    const json& v = raw(k);
    for (auto& a : allowed)
      if (v.is_string() && v.get<std::string>() == a) return Status::ok();
    return fail(k, one_of(allowed), &v);
  }
  static std::string one_of(const std::vector<std::string>& allowed) {
    std::string s = "one of";
    for (size_t i = 0; i < allowed.size(); ++i) s += str(i ? ", " : " ", "\"", allowed[i], "\"");
    return s;
  }
  std::vector<std::string> unused() const {
    std::vector<std::string> out;
    for (auto it = j_.begin(); it != j_.end(); ++it)
      if (!used_.count(it.key())) out.push_back(it.key());
    return out;
  }
  const std::string& source() const { return source_; }

 private:
  const json& j_;
  std::string source_;
  std::set<std::string> used_;
};

// The ranges keep every derived size far from overflow (docs/config.md lists them); the cast to
// the field's type is exact because the range fits it.
#define SP_READ_INT(dst, key, lo, hi)                        \
  do {                                                       \
    SP_ASSIGN_OR_RETURN(int64_t _v, r.integer(key, lo, hi)); \
    dst = static_cast<decltype(dst)>(_v);                    \
  } while (0)
#define SP_READ_NUM(dst, key, lo, hi, lo_open)                      \
  do {                                                              \
    SP_ASSIGN_OR_RETURN(double _v, r.number(key, lo, hi, lo_open)); \
    dst = static_cast<decltype(dst)>(_v);                           \
  } while (0)

Result<RopeParams> parse_yarn(Reader& r, const json& obj, const std::string& where, double theta) {
  RopeParams p;
  p.theta = theta;
  p.yarn = true;
  auto num = [&](const char* k, bool required, double def, double lo, double hi,
                 double* out) -> Status {
    if (!obj.contains(k) || obj[k].is_null()) {
      if (required) return r.fail(where + "." + k, Reader::range_text(lo, hi, true), nullptr);
      *out = def;
      return Status::ok();
    }
    if (!Reader::number_in(obj[k], lo, hi, /*lo_open=*/true))
      return r.fail(where + "." + k, Reader::range_text(lo, hi, true), &obj[k]);
    *out = obj[k].get<double>();
    return Status::ok();
  };
  SP_RETURN_IF_ERROR(num("factor", true, 1.0, 0, 1024, &p.factor));
  SP_RETURN_IF_ERROR(
      num("original_max_position_embeddings", true, 0, 0, 1 << 30, &p.original_max_position));
  SP_RETURN_IF_ERROR(num("beta_fast", false, 32.0, 0, 1e4, &p.beta_fast));
  SP_RETURN_IF_ERROR(num("beta_slow", false, 1.0, 0, 1e4, &p.beta_slow));
  // No YaRN attention scale anywhere in DeepSeek-V4 (transformers forces 1.0, vLLM mscale 0).
  for (const char* k : {"attention_factor", "mscale"}) {
    if (obj.contains(k) && !obj[k].is_null() &&
        !(obj[k].is_number() && obj[k].get<double>() == 1.0))
      return r.fail(where + "." + k, "1.0 (DeepSeek-V4 applies no YaRN attention scaling)",
                    &obj[k]);
  }
  return p;
}

Status parse_hf_style(Reader& r, Config& c) {
  const json& lt = r.raw("layer_types");
  if (!lt.is_array() || static_cast<int>(lt.size()) != c.num_layers)
    return r.fail("layer_types",
                  str("an array of num_hidden_layers = ", c.num_layers, " layer types"), &lt);
  if (!r.has("compress_rates"))
    return r.fail("compress_rates", "an object mapping layer types to rates", nullptr);
  const json& rates = r.raw("compress_rates");
  if (!rates.is_object())
    return r.fail("compress_rates", "an object mapping layer types to rates", &rates);
  for (int l = 0; l < c.num_layers; ++l) {
    std::string f = str("layer_types[", l, "]");
    if (!lt[l].is_string())
      return r.fail(f,
                    Reader::one_of({"sliding_attention", "compressed_sparse_attention",
                                    "heavily_compressed_attention"}),
                    &lt[l]);
    std::string t = lt[l].get<std::string>();
    if (t == "sliding_attention") {
      c.attn_kinds.push_back(AttnKind::kSliding);
      c.compress_ratio.push_back(0);
      continue;
    }
    if (t != "compressed_sparse_attention" && t != "heavily_compressed_attention")
      return r.fail(f,
                    Reader::one_of({"sliding_attention", "compressed_sparse_attention",
                                    "heavily_compressed_attention"}),
                    &lt[l]);
    std::string rf = "compress_rates." + t;
    if (!rates.contains(t))
      return r.fail(rf, "a positive integer rate for a layer type in use", nullptr);
    auto rate = Reader::integer_value(rates[t], 1, kMaxCompressRate);
    if (!rate) return r.fail(rf, Reader::range_text(1, kMaxCompressRate), &rates[t]);
    c.attn_kinds.push_back(t == "compressed_sparse_attention" ? AttnKind::kCSA : AttnKind::kHCA);
    c.compress_ratio.push_back(static_cast<int>(*rate));
  }
  if (!r.has("mlp_layer_types"))
    return r.fail("mlp_layer_types", "an array of \"hash_moe\" / \"moe\"", nullptr);
  const json& mt = r.raw("mlp_layer_types");
  if (!mt.is_array() || static_cast<int>(mt.size()) != c.num_layers)
    return r.fail("mlp_layer_types",
                  str("an array of num_hidden_layers = ", c.num_layers, " entries"), &mt);
  for (int l = 0; l < c.num_layers; ++l) {
    if (mt[l] == "hash_moe")
      c.mlp_kinds.push_back(MlpKind::kHashMoe);
    else if (mt[l] == "moe")
      c.mlp_kinds.push_back(MlpKind::kMoe);
    else
      return r.fail(str("mlp_layer_types[", l, "]"), Reader::one_of({"hash_moe", "moe"}), &mt[l]);
  }
  // Rope width: partial_rotary_factor (transformers) or qk_rope_head_dim; both must agree.
  if (r.has("partial_rotary_factor")) {
    double f;
    SP_READ_NUM(f, "partial_rotary_factor", 0, 1, true);
    double dims = f * c.head_dim;
    if (std::fabs(dims - std::round(dims)) > 1e-9)
      return r.fail("partial_rotary_factor",
                    str("a factor giving whole rope dims of head_dim ", c.head_dim),
                    &r.raw("partial_rotary_factor"));
    c.rope_dim = static_cast<int>(std::lround(dims));
    if (r.has("qk_rope_head_dim")) {
      int q;
      SP_READ_INT(q, "qk_rope_head_dim", 1, kMaxHeadDim);
      if (q != c.rope_dim)
        return r.fail("qk_rope_head_dim", str(c.rope_dim, " (head_dim x partial_rotary_factor)"),
                      &r.raw("qk_rope_head_dim"));
    }
  } else {
    SP_READ_INT(c.rope_dim, "qk_rope_head_dim", 1, kMaxHeadDim);
  }
  if (!r.has("rope_parameters"))
    return r.fail("rope_parameters", "an object with \"main\" and \"compress\"", nullptr);
  const json& rp = r.raw("rope_parameters");
  for (const char* part : {"main", "compress"}) {
    std::string where = str("rope_parameters.", part);
    if (!rp.is_object() || !rp.contains(part) || !rp[part].is_object())
      return r.fail(where, "an object with rope_theta and rope_type",
                    rp.is_object() && rp.contains(part) ? &rp[part] : nullptr);
    const json& o = rp[part];
    if (!o.contains("rope_theta") || !Reader::number_in(o["rope_theta"], 1, kMaxRopeTheta, false))
      return r.fail(where + ".rope_theta", Reader::range_text(1, kMaxRopeTheta, false),
                    o.contains("rope_theta") ? &o["rope_theta"] : nullptr);
    double theta = o["rope_theta"].get<double>();
    std::string type = o.contains("rope_type") ? o["rope_type"].get<std::string>() : "default";
    if (o.contains("partial_rotary_factor") && o["partial_rotary_factor"].is_number()) {
      if (!Reader::number_in(o["partial_rotary_factor"], 0, 1, true))
        return r.fail(where + ".partial_rotary_factor", Reader::range_text(0, 1, true),
                      &o["partial_rotary_factor"]);
      double dims = o["partial_rotary_factor"].get<double>() * c.head_dim;
      if (std::lround(dims) != c.rope_dim)
        return r.fail(where + ".partial_rotary_factor",
                      str("a factor giving ", c.rope_dim, " rope dims"),
                      &o["partial_rotary_factor"]);
    }
    RopeParams p;
    if (type == "default") {
      p.theta = theta;
    } else if (type == "yarn") {
      if (std::string(part) == "main")
        return r.fail(where + ".rope_type",
                      "\"default\" (the main rope of sliding-only layers never uses YaRN)",
                      &o["rope_type"]);
      SP_ASSIGN_OR_RETURN(p, parse_yarn(r, o, where, theta));
    } else {
      return r.fail(where + ".rope_type", Reader::one_of({"default", "yarn"}), &o["rope_type"]);
    }
    (std::string(part) == "main" ? c.rope_main : c.rope_compress) = p;
  }
  for (const char* k : {"rope_theta", "compress_rope_theta"})
    r.mark(k);  // mirrored in rope_parameters
  return Status::ok();
}

Status parse_upstream_style(Reader& r, Config& c) {
  const json& cr = r.raw("compress_ratios");
  // One entry per layer plus the MTP layer; a DSpark release has one per DSpark block instead.
  const int extra = c.dspark ? kDSparkBlocks : 1;
  if (!cr.is_array() || static_cast<int>(cr.size()) != c.num_layers + extra)
    return r.fail("compress_ratios",
                  c.dspark ? str("an array of num_hidden_layers + ", kDSparkBlocks, " = ",
                                 c.num_layers + extra,
                                 " ratios (one per layer plus one per DSpark draft block, as "
                                 "the dspark_* keys say)")
                           : str("an array of num_hidden_layers + 1 = ", c.num_layers + 1,
                                 " ratios (one per layer plus the MTP layer)"),
                  &cr);
  for (int l = 0; l < c.num_layers + extra; ++l) {
    const json& v = cr[l];
    // Read as int64: a JSON 4294967300 must not become 4.
    const int64_t ratio = Reader::integer_value(v, 0, 128).value_or(-1);
    std::string f = str("compress_ratios[", l, "]");
    if (ratio != 0 && ratio != 4 && ratio != 128)
      return r.fail(f, "0 (sliding-only), 4 (CSA with indexer) or 128 (HCA)", &v);
    if (l >= c.num_layers) {
      // The draft module's entries: the MTP layer is sliding-only; DSpark's are not used.
      if (!c.dspark && ratio != 0) return r.fail(f, "0 (the MTP layer is sliding-only)", &v);
      continue;
    }
    c.attn_kinds.push_back(ratio == 0   ? AttnKind::kSliding
                           : ratio == 4 ? AttnKind::kCSA
                                        : AttnKind::kHCA);
    c.compress_ratio.push_back(ratio);
  }
  int num_hash;
  SP_READ_INT(num_hash, "num_hash_layers", 0, c.num_layers);
  if (num_hash > c.num_layers)
    return r.fail("num_hash_layers", str("at most num_hidden_layers = ", c.num_layers),
                  &r.raw("num_hash_layers"));
  for (int l = 0; l < c.num_layers; ++l)
    c.mlp_kinds.push_back(l < num_hash ? MlpKind::kHashMoe : MlpKind::kMoe);
  SP_READ_INT(c.rope_dim, "qk_rope_head_dim", 1, kMaxHeadDim);
  SP_READ_NUM(c.rope_main.theta, "rope_theta", 1, kMaxRopeTheta, false);
  double ctheta;
  SP_READ_NUM(ctheta, "compress_rope_theta", 1, kMaxRopeTheta, false);
  c.rope_compress.theta = ctheta;
  if (r.has("rope_scaling")) {
    const json& rs = r.raw("rope_scaling");
    if (!rs.is_object()) return r.fail("rope_scaling", "an object", &rs);
    std::string type = rs.contains("type")        ? rs["type"].get<std::string>()
                       : rs.contains("rope_type") ? rs["rope_type"].get<std::string>()
                                                  : "";
    if (type != "yarn")
      return r.fail("rope_scaling.type", "\"yarn\"", rs.contains("type") ? &rs["type"] : nullptr);
    // Upstream applies YaRN to the compressed rope only.
    SP_ASSIGN_OR_RETURN(c.rope_compress, parse_yarn(r, rs, "rope_scaling", ctheta));
  }
  return Status::ok();
}

Status parse_quantization(Reader& r, Config& c) {
  if (r.has("quantization_config")) {
    const json& q = r.raw("quantization_config");
    if (!q.is_object()) return r.fail("quantization_config", "an object", &q);
    auto expect = [&](const char* k, const std::vector<std::string>& allowed,
                      bool required) -> Status {
      if (!q.contains(k))
        return required ? r.fail(str("quantization_config.", k), Reader::one_of(allowed), nullptr)
                        : Status::ok();
      for (auto& a : allowed)
        if (q[k].is_string() && q[k].get<std::string>() == a) return Status::ok();
      return r.fail(str("quantization_config.", k), Reader::one_of(allowed), &q[k]);
    };
    SP_RETURN_IF_ERROR(expect("quant_method", {"fp8"}, true));
    SP_RETURN_IF_ERROR(expect("fmt", {"e4m3"}, false));
    SP_RETURN_IF_ERROR(expect("activation_scheme", {"dynamic"}, false));
    if (q.contains("weight_block_size") && q["weight_block_size"] != json::array({128, 128}))
      return r.fail("quantization_config.weight_block_size", "[128, 128]", &q["weight_block_size"]);
    c.linear_format = WeightFormat::kFP8;
    c.expert_format =
        WeightFormat::kFP8;  // upstream: experts follow dtype unless expert_dtype says
  }
  if (r.has("expert_dtype")) {
    const json& e = r.raw("expert_dtype");
    if (e == "fp4")
      c.expert_format = WeightFormat::kFP4;
    else if (e == "fp8")
      c.expert_format = WeightFormat::kFP8;
    else
      return r.fail("expert_dtype", Reader::one_of({"fp4", "fp8"}), &e);
    if (c.linear_format == WeightFormat::kFloat)
      return r.fail("expert_dtype",
                    "no expert_dtype without a quantization_config (quantized experts need the fp8 "
                    "quantization settings)",
                    &e);
  }
  return Status::ok();
}

// The tensor table and the weights the config implies, counted in checked arithmetic before
// anything is built from them.
Status check_totals(const Config& c, const std::string& source) {
  const CheckedI64 D = c.hidden_size, E = c.n_routed_experts, I = c.moe_inter, L = c.num_layers;
  const CheckedI64 tensors = L * (E * 3 + 64) + 16;
  const CheckedI64 hd = CheckedI64(c.num_heads) * c.head_dim;
  const CheckedI64 hc_dim = CheckedI64(c.hc_mult) * D;
  const CheckedI64 mix = CheckedI64(c.hc_mult + 2) * c.hc_mult;
  const CheckedI64 per_layer = (E + 1) * 3 * I * D + D * c.q_lora_rank + hd * c.q_lora_rank +
                               CheckedI64(c.head_dim) * D + hd * c.o_lora_rank +
                               D * c.o_groups * c.o_lora_rank + mix * hc_dim * 2 + E * D +
                               CheckedI64(c.vocab_size) * c.experts_per_tok +
                               CheckedI64(c.index_n_heads) * c.index_head_dim * c.q_lora_rank +
                               CheckedI64(4) * (c.head_dim + c.index_head_dim) * D;
  const CheckedI64 elements = L * per_layer + CheckedI64(2) * c.vocab_size * D;
  if (!tensors.ok() || tensors.value() > kMaxTensors)
    return Status::error(str(source, ": num_hidden_layers = ", c.num_layers,
                             " x n_routed_experts = ", c.n_routed_experts, " describe more than ",
                             kMaxTensors, " tensors; expected fewer"));
  if (!elements.ok() || elements.value() > kMaxWeightElements)
    return Status::error(
        str(source, ": the config describes ",
            elements.ok() ? str(elements.value()) : std::string("over 2^63"),
            " weight elements; expected at most 2^46 (the released Pro has 2^40)"));
  return Status::ok();
}

}  // namespace

Result<Config> parse_config_impl(const std::string& text, const std::string& source) {
  SP_ASSIGN_OR_RETURN(json j, parse_json_strict(text, source));
  if (!j.is_object())
    return Status::error(str(source, ": expected a JSON object at the top level"));
  Reader r(j, source);
  Config c;
  SP_RETURN_IF_ERROR(r.optional_enum("model_type", {"deepseek_v4"}));
  if (r.has("architectures")) r.mark("architectures");
  SP_READ_INT(c.vocab_size, "vocab_size", 1, kMaxVocab);
  SP_READ_INT(c.hidden_size, "hidden_size", 1, kMaxWidth);
  SP_READ_INT(c.num_layers, "num_hidden_layers", 1, kMaxLayers);
  SP_READ_INT(c.num_heads, "num_attention_heads", 1, kMaxHeads);
  SP_READ_INT(c.head_dim, "head_dim", 1, kMaxHeadDim);
  SP_READ_INT(c.q_lora_rank, "q_lora_rank", 1, kMaxWidth);
  SP_READ_INT(c.o_groups, "o_groups", 1, kMaxHeads);
  SP_READ_INT(c.o_lora_rank, "o_lora_rank", 1, kMaxWidth);
  SP_READ_INT(c.sliding_window, "sliding_window", 1, kMaxWindow);
  SP_READ_INT(c.index_n_heads, "index_n_heads", 1, kMaxHeads);
  SP_READ_INT(c.index_head_dim, "index_head_dim", 1, kMaxHeadDim);
  SP_READ_INT(c.index_topk, "index_topk", 1, kMaxIndexTopk);
  SP_READ_INT(c.n_routed_experts, "n_routed_experts", 1, kMaxExperts);
  SP_READ_INT(c.n_shared_experts, "n_shared_experts", 1, 1);
  SP_READ_INT(c.experts_per_tok, "num_experts_per_tok", 1, kMaxExpertsPerTok);
  SP_READ_INT(c.moe_inter, "moe_intermediate_size", 1, kMaxWidth);
  SP_READ_NUM(c.routed_scaling_factor, "routed_scaling_factor", 0, 100, true);
  SP_READ_NUM(c.swiglu_limit, "swiglu_limit", 0, 1e4, true);
  // hc_mult > 16 would also overflow fixed per-stream arrays of the CPU backend.
  SP_READ_INT(c.hc_mult, "hc_mult", 1, kMaxHcMult);
  SP_READ_INT(c.hc_sinkhorn_iters, "hc_sinkhorn_iters", 1, kMaxSinkhornIters);
  // Both are stored as float: 1e-12 is far above float's smallest normal; 0.1 far above any real.
  SP_READ_NUM(c.hc_eps, "hc_eps", kMinEps, kMaxEps, false);
  SP_READ_NUM(c.rms_norm_eps, "rms_norm_eps", kMinEps, kMaxEps, false);
  if (!r.has("scoring_func")) return r.fail("scoring_func", "\"sqrtsoftplus\"", nullptr);
  SP_RETURN_IF_ERROR(r.optional_enum("scoring_func", {"sqrtsoftplus"}));
  SP_RETURN_IF_ERROR(r.optional_enum("hidden_act", {"silu"}));
  SP_RETURN_IF_ERROR(r.optional_enum("topk_method", {"noaux_tc"}));
  if (r.has("num_key_value_heads")) {
    int kvh;
    SP_READ_INT(kvh, "num_key_value_heads", 1, kMaxHeads);
    if (kvh != 1)
      return r.fail("num_key_value_heads", "1 (one shared latent K=V head)",
                    &r.raw("num_key_value_heads"));
  }
  if (r.has("tie_word_embeddings") && r.raw("tie_word_embeddings") != false)
    return r.fail("tie_word_embeddings", "false (DeepSeek-V4 has a separate head)",
                  &r.raw("tie_word_embeddings"));
  if (r.has("norm_topk_prob") && r.raw("norm_topk_prob") != true)
    return r.fail("norm_topk_prob", "true", &r.raw("norm_topk_prob"));
  for (const char* b : {"attention_bias", "mlp_bias"})
    if (r.has(b) && r.raw(b) != false) return r.fail(b, "false", &r.raw(b));
  if (r.has("num_nextn_predict_layers"))
    SP_READ_INT(c.num_mtp_layers, "num_nextn_predict_layers", 0, kMaxMtpLayers);
  if (r.has("bos_token_id")) SP_READ_INT(c.bos_token_id, "bos_token_id", 0, c.vocab_size - 1);
  if (r.has("eos_token_id")) SP_READ_INT(c.eos_token_id, "eos_token_id", 0, c.vocab_size - 1);
  if (r.has("max_position_embeddings"))
    SP_READ_INT(c.max_position_embeddings, "max_position_embeddings", 1, kMaxPositions);

  // A DSpark release (dspark_* keys): the main model loads as plain V4, the draft module is not
  // supported (refused by --speculative mtp, its tensors ignored).
  for (auto it = j.begin(); it != j.end(); ++it)
    if (it.key().rfind("dspark_", 0) == 0) {
      c.dspark = true;
      c.dspark_keys.push_back(it.key());
      r.mark(it.key());
    }
  std::sort(c.dspark_keys.begin(), c.dspark_keys.end());
  bool hf = r.has("layer_types"), up = r.has("compress_ratios");
  if (hf && up)
    return Status::error(str(source,
                             ": both 'layer_types' (Hugging Face style) and 'compress_ratios' "
                             "(upstream style) are present; expected exactly one"));
  if (!hf && !up)
    return Status::error(str(source,
                             ": field 'layer_types' (Hugging Face style) or 'compress_ratios' "
                             "(upstream style): expected one of them, but both are missing"));
  c.style = hf ? ConfigStyle::kHuggingFace : ConfigStyle::kUpstream;
  SP_RETURN_IF_ERROR(hf ? parse_hf_style(r, c) : parse_upstream_style(r, c));
  SP_RETURN_IF_ERROR(parse_quantization(r, c));

  // Cross-field consistency.
  auto bad = [&](const std::string& field, const std::string& expected) {
    return Status::error(str(source, ": field '", field, "': expected ", expected));
  };
  if (c.n_shared_experts != 1)
    return bad("n_shared_experts",
               str("1 (DeepSeek-V4 has one shared expert), got ", c.n_shared_experts));
  if (c.experts_per_tok > c.n_routed_experts)
    return bad("num_experts_per_tok",
               str("at most n_routed_experts = ", c.n_routed_experts, ", got ", c.experts_per_tok));
  if (c.rope_dim % 2 || c.rope_dim > c.head_dim)
    return bad("qk_rope_head_dim",
               str("an even number <= head_dim = ", c.head_dim, ", got ", c.rope_dim));
  if (c.rope_dim > c.index_head_dim)
    return bad("index_head_dim",
               str("at least qk_rope_head_dim = ", c.rope_dim, ", got ", c.index_head_dim));
  if (c.num_heads % c.o_groups)
    return bad("o_groups",
               str("a divisor of num_attention_heads = ", c.num_heads, ", got ", c.o_groups));
  if (c.mlp_kinds.size() != static_cast<size_t>(c.num_layers))
    return bad("mlp_layer_types", "one entry per layer");
  if (c.expert_format == WeightFormat::kFP4 && (c.hidden_size % 32 || c.moe_inter % 32))
    return bad(
        "expert_dtype",
        str("fp8, or hidden_size and moe_intermediate_size multiples of 32 for fp4 groups (got ",
            c.hidden_size, " and ", c.moe_inter, ")"));
  SP_RETURN_IF_ERROR(check_totals(c, source));
  c.ignored_keys = r.unused();
  return c;
}

Result<Config> parse_config(const std::string& text, const std::string& source) {
  // Field readers check types before reading; this catches the odd nested value of a wrong type.
  try {
    return parse_config_impl(text, source);
  } catch (const std::exception& e) {
    return Status::error(str(source, ": a field has the wrong JSON type: ", e.what()));
  }
}

Result<Config> load_config(const std::string& model_dir) {
  std::string path = model_dir + "/config.json";
  SP_ASSIGN_OR_RETURN(FileKind kind, probe_file(path));
  if (kind == FileKind::kMissing)
    return Status::error(str("cannot open ", brief(path),
                             ": expected a DeepSeek-V4 model directory with config.json"));
  SP_ASSIGN_OR_RETURN(std::string text, read_regular_file(path, kMaxConfigBytes, "config.json"));
  return parse_config(text, path);
}

std::string describe_config(const Config& c) {
  std::ostringstream os;
  os << "config style: " << (c.style == ConfigStyle::kUpstream ? "upstream" : "Hugging Face")
     << "\n"
     << "vocab " << c.vocab_size << ", hidden " << c.hidden_size << ", layers " << c.num_layers
     << ", heads " << c.num_heads << " x " << c.head_dim << " (rope " << c.rope_dim << ")\n"
     << "q_lora " << c.q_lora_rank << ", o_groups " << c.o_groups << ", o_lora " << c.o_lora_rank
     << ", window " << c.sliding_window << "\n"
     << "indexer " << c.index_n_heads << " heads x " << c.index_head_dim << ", top-" << c.index_topk
     << "\n"
     << "experts " << c.n_routed_experts << " routed (top-" << c.experts_per_tok << ", inter "
     << c.moe_inter << ", scale " << c.routed_scaling_factor << ") + " << c.n_shared_experts
     << " shared, swiglu limit " << c.swiglu_limit << "\n"
     << "hc_mult " << c.hc_mult << ", sinkhorn " << c.hc_sinkhorn_iters << ", hc_eps " << c.hc_eps
     << ", rms eps " << c.rms_norm_eps << "\n"
     << "rope main theta " << c.rope_main.theta << "; compress theta " << c.rope_compress.theta;
  if (c.rope_compress.yarn)
    os << " yarn(factor " << c.rope_compress.factor << ", orig "
       << c.rope_compress.original_max_position << ", beta " << c.rope_compress.beta_fast << "/"
       << c.rope_compress.beta_slow << ")";
  os << "\nweights: linear " << weight_format_name(c.linear_format) << ", experts "
     << weight_format_name(c.expert_format) << "; mtp layers " << c.num_mtp_layers << "\n";
  if (c.dspark) {
    os << "draft module: DSpark (";
    for (size_t i = 0; i < c.dspark_keys.size(); ++i) os << (i ? ", " : "") << c.dspark_keys[i];
    os << "): not supported, its mtp.* tensors are ignored; the main model runs as plain V4\n";
  }
  os << "layers:";
  for (int l = 0; l < c.num_layers; ++l) {
    os << " " << l << ":" << attn_kind_abbrev(c.attn_kinds[l]);
    if (c.compress_ratio[l]) os << "/" << c.compress_ratio[l];
    os << (c.mlp_kinds[l] == MlpKind::kHashMoe ? "+hash" : "");
  }
  os << "\n";
  return os.str();
}

}  // namespace sp
