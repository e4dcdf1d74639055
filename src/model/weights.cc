#include "model/weights.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

#include "core/checked.h"
#include "core/dummy.h"

namespace sp {

namespace {
int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
}  // namespace

std::string mtp_prefix() {
  return "mtp.0.";
}

std::vector<ExpectedTensor> expected_tensors(const Config& c, bool mtp) {
  std::vector<ExpectedTensor> v;
  const int64_t D = c.hidden_size, hcD = c.hc_dim(), mix = c.hc_mix();
  auto param = [&](std::string n, std::vector<int64_t> s, Part p, int l = -1) {
    v.push_back({std::move(n), TensorRole::kParam, WeightFormat::kFloat, std::move(s), p, l});
  };
  auto matrix = [&](std::string n, WeightFormat f, int64_t out, int64_t in, Part p, int l = -1) {
    v.push_back({std::move(n), TensorRole::kMatrix, f, {out, in}, p, l});
  };
  // One decoder block's tensors under prefix `p` (layers.l. or, for the MTP layer l = num_layers,
  // mtp.0.).
  auto block = [&](const std::string& p, int l, Part part) {
    auto lp = [&](const std::string& n, std::vector<int64_t> s) {
      param(p + n, std::move(s), part, l);
    };
    auto lm = [&](const std::string& n, WeightFormat f, int64_t out, int64_t in) {
      matrix(p + n, f, out, in, part, l);
    };
    const WeightFormat lf = c.linear_format;
    lp("attn_norm.weight", {D});
    lp("ffn_norm.weight", {D});
    for (const char* site : {"attn", "ffn"}) {
      lp(str("hc_", site, "_fn"), {mix, hcD});
      lp(str("hc_", site, "_base"), {mix});
      lp(str("hc_", site, "_scale"), {3});
    }
    const int64_t H = c.num_heads, dh = c.head_dim;
    lm("attn.wq_a.weight", lf, c.q_lora_rank, D);
    lp("attn.q_norm.weight", {c.q_lora_rank});
    lm("attn.wq_b.weight", lf, H * dh, c.q_lora_rank);
    lm("attn.wkv.weight", lf, dh, D);
    lp("attn.kv_norm.weight", {dh});
    lm("attn.wo_a.weight", lf, c.o_groups * c.o_lora_rank, H * dh / c.o_groups);
    lm("attn.wo_b.weight", lf, D, c.o_groups * c.o_lora_rank);
    lp("attn.attn_sink", {H});
    const int ratio = c.layer_ratio(l);
    if (ratio > 0) {
      const int64_t k = c.compressor_overlap(l);
      lm("attn.compressor.wkv.weight", WeightFormat::kFloat, k * dh, D);
      lm("attn.compressor.wgate.weight", WeightFormat::kFloat, k * dh, D);
      lp("attn.compressor.ape", {ratio, k * dh});
      lp("attn.compressor.norm.weight", {dh});
    }
    if (c.layer_kind(l) == AttnKind::kCSA) {
      const int64_t ih = c.index_n_heads, id = c.index_head_dim;
      lm("attn.indexer.wq_b.weight", lf, ih * id, c.q_lora_rank);
      lm("attn.indexer.weights_proj.weight", WeightFormat::kFloat, ih, D);
      lm("attn.indexer.compressor.wkv.weight", WeightFormat::kFloat, 2 * id, D);
      lm("attn.indexer.compressor.wgate.weight", WeightFormat::kFloat, 2 * id, D);
      lp("attn.indexer.compressor.ape", {ratio, 2 * id});
      lp("attn.indexer.compressor.norm.weight", {id});
    }
    const int64_t E = c.n_routed_experts, I = c.moe_inter;
    lm("ffn.gate.weight", WeightFormat::kFloat, E, D);
    if (c.layer_mlp(l) == MlpKind::kHashMoe) {
      v.push_back({p + "ffn.gate.tid2eid",
                   TensorRole::kIndex,
                   WeightFormat::kFloat,
                   {c.vocab_size, c.experts_per_tok},
                   part,
                   l});
    } else {
      lp("ffn.gate.bias", {E});
    }
    for (int64_t e = 0; e < E; ++e) {
      lm(str("ffn.experts.", e, ".w1.weight"), c.expert_format, I, D);
      lm(str("ffn.experts.", e, ".w2.weight"), c.expert_format, D, I);
      lm(str("ffn.experts.", e, ".w3.weight"), c.expert_format, I, D);
    }
    lm("ffn.shared_experts.w1.weight", lf, I, D);
    lm("ffn.shared_experts.w2.weight", lf, D, I);
    lm("ffn.shared_experts.w3.weight", lf, I, D);
  };
  matrix("embed.weight", WeightFormat::kFloat, c.vocab_size, D, Part::kEmbed);
  for (int l = 0; l < c.num_layers; ++l) block(str("layers.", l, "."), l, Part::kLayer);
  param("hc_head_fn", {c.hc_mult, hcD}, Part::kHcHead);
  param("hc_head_base", {c.hc_mult}, Part::kHcHead);
  param("hc_head_scale", {1}, Part::kHcHead);
  param("norm.weight", {D}, Part::kFinalNorm);
  matrix("head.weight", WeightFormat::kFloat, c.vocab_size, D, Part::kHead);
  if (mtp) {
    // The MTP layer (model_spec.md section 7): its input projections and norms, one decoder block
    // (layer index num_layers: sliding-only, learned routing), its own hc_head and final norm.
    const std::string p = mtp_prefix();
    const int l = c.num_layers;
    matrix(p + "e_proj.weight", c.linear_format, D, D, Part::kMtp, l);
    matrix(p + "h_proj.weight", c.linear_format, D, D, Part::kMtp, l);
    param(p + "enorm.weight", {D}, Part::kMtp, l);
    param(p + "hnorm.weight", {D}, Part::kMtp, l);
    block(p, l, Part::kMtp);
    param(p + "hc_head_fn", {c.hc_mult, hcD}, Part::kMtp, l);
    param(p + "hc_head_base", {c.hc_mult}, Part::kMtp, l);
    param(p + "hc_head_scale", {1}, Part::kMtp, l);
    param(p + "norm.weight", {D}, Part::kMtp, l);
  }
  return v;
}

namespace {

// Stored shape of a matrix's values and of its scales in a given format.
std::vector<int64_t> stored_shape(const ExpectedTensor& t) {
  if (t.role == TensorRole::kMatrix && t.format == WeightFormat::kFP4)
    return {t.shape[0], t.shape[1] / 2};
  return t.shape;
}
std::vector<int64_t> scale_shape(const ExpectedTensor& t) {
  if (t.format == WeightFormat::kFP8) return {ceil_div(t.shape[0], 128), ceil_div(t.shape[1], 128)};
  return {t.shape[0], t.shape[1] / 32};
}
int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

}  // namespace

int64_t expected_bytes(const ExpectedTensor& t) {
  switch (t.role) {
    case TensorRole::kParam:
      return numel(t.shape) * 4;
    case TensorRole::kIndex:
      return numel(t.shape) * 4;
    case TensorRole::kMatrix:
      switch (t.format) {
        case WeightFormat::kFloat:
          return numel(t.shape) * 2;
        case WeightFormat::kFP8:
          return numel(t.shape) + numel(scale_shape(t));
        case WeightFormat::kFP4:
          return numel(t.shape) / 2 + numel(scale_shape(t));
      }
  }
  return 0;
}

double decode_bytes_per_token(const Config& c) {
  double bytes = 0, expert = 0;
  for (const ExpectedTensor& t : expected_tensors(c)) {
    const double b = static_cast<double>(expected_bytes(t));
    if (t.name.find(".ffn.experts.") != std::string::npos) {
      if (t.name.find(".ffn.experts.0.") != std::string::npos) expert += b;
    } else if (t.name == "embed.weight") {
      bytes += b / static_cast<double>(c.vocab_size);
    } else {
      bytes += b;
    }
  }
  // `expert`: one routed expert of every layer (expert 0's tensors, all experts alike).
  return bytes + expert * c.experts_per_tok;
}

Status check_mtp_config(const Config& c) {
  if (c.dspark) {
    std::string keys;
    for (const std::string& k : c.dspark_keys) keys += (keys.empty() ? "" : ", ") + k;
    return Status::error(str(
        "--speculative mtp: this checkpoint's draft module is DSpark (config.json has ", keys,
        "; its mtp.0..2.* tensors have main_proj / main_norm / markov_head, no e_proj / enorm / "
        "hnorm): DSpark draft module not supported; run without --speculative (the main "
        "model runs as plain DeepSeek-V4)"));
  }
  if (c.num_mtp_layers < 1)
    return Status::error(
        "--speculative mtp: config.json has num_nextn_predict_layers 0 (or none): the model has no "
        "MTP layer (mtp.0.*); run without --speculative");
  return Status::ok();
}

LoadPlan LoadPlan::stage(const std::vector<int>& partition, int stage, bool mtp) {
  LoadPlan p;
  for (int s = 0; s < stage; ++s) p.first_layer += partition[s];
  p.end_layer = p.first_layer + partition[stage];
  const bool last = stage + 1 == static_cast<int>(partition.size());
  p.embed = stage == 0 || (last && mtp);
  p.head = last;
  p.mtp = last && mtp;
  return p;
}

bool LoadPlan::owns(const ExpectedTensor& t) const {
  switch (t.part) {
    case Part::kEmbed:
      return embed;
    case Part::kLayer:
      return t.layer >= first_layer && t.layer < end_layer;
    case Part::kHcHead:
    case Part::kFinalNorm:
    case Part::kHead:
      return head;
    case Part::kMtp:
      return mtp;
  }
  return false;
}

namespace {

// Where each expected tensor's storage lives once bound (checkpoint or generated).
struct Bound {
  const uint8_t* data = nullptr;
  DType dtype = DType::kF32;
  WeightFormat format = WeightFormat::kFloat;
  const uint8_t* scale = nullptr;
  DType scale_dtype = DType::kE8M0;
  DummyGen gen;  // a described dummy matrix: no bytes (data and scale null)
};

// Builds the ModelWeights structure from bound storage; `get` returns the storage of a name.
class Assembler {
 public:
  Assembler(const Config& c, ModelWeights& w, const std::map<std::string, Bound>& bound)
      : c_(c), w_(w), bound_(bound) {}

  std::vector<float> param(const std::string& name) {
    const Bound& b = at(name);
    int64_t n = numel(shape_of(name));
    std::vector<float> out(static_cast<size_t>(n));
    to_f32(b.dtype, b.data, out.data(), n);
    return out;
  }
  Linear matrix(const std::string& name) {
    const Bound& b = at(name);
    const auto& s = shape_of(name);
    Linear m;
    m.name = name;
    m.format = b.format;
    m.dtype = b.dtype;
    m.out = s[0];
    m.in = s[1];
    m.data = b.data;
    m.scale = b.scale;
    m.scale_dtype = b.scale_dtype;
    m.dummy = b.gen;
    m.scale_cols = b.format == WeightFormat::kFP8 ? ceil_div(m.in, 128) : m.in / 32;
    return m;
  }
  std::vector<int32_t> index(const std::string& name) {
    const Bound& b = at(name);
    int64_t n = numel(shape_of(name));
    std::vector<int32_t> out(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      int64_t v;
      if (b.dtype == DType::kI64)
        std::memcpy(&v, b.data + i * 8, 8);
      else {
        int32_t x;
        std::memcpy(&x, b.data + i * 4, 4);
        v = x;
      }
      out[i] = static_cast<int32_t>(v);
    }
    return out;
  }
  void set_shapes(const std::vector<ExpectedTensor>& ex) {
    for (auto& t : ex) shapes_[t.name] = t.shape;
  }

  void build(const LoadPlan& plan) {
    if (plan.embed) w_.embed = matrix("embed.weight");
    if (plan.head) {
      w_.head = matrix("head.weight");
      w_.final_norm = param("norm.weight");
      w_.hc_head = {param("hc_head_fn"), param("hc_head_base"), param("hc_head_scale")};
    }
    for (int l = plan.first_layer; l < plan.end_layer; ++l)
      w_.layers.push_back(layer(str("layers.", l, "."), l));
    if (plan.mtp) {
      const std::string p = mtp_prefix();
      MtpWeights& m = w_.mtp;
      m.e_proj = matrix(p + "e_proj.weight");
      m.h_proj = matrix(p + "h_proj.weight");
      m.enorm = param(p + "enorm.weight");
      m.hnorm = param(p + "hnorm.weight");
      m.norm = param(p + "norm.weight");
      m.hc_head = {param(p + "hc_head_fn"), param(p + "hc_head_base"), param(p + "hc_head_scale")};
      m.block = layer(p, c_.num_layers);
    }
  }

 private:
  // Decoder block `l` (num_layers: the MTP layer) from the tensors under prefix `p`.
  LayerWeights layer(const std::string& p, int l) {
    LayerWeights L;
    L.index = l;
    L.kind = c_.layer_kind(l);
    L.ratio = c_.layer_ratio(l);
    L.mlp = c_.layer_mlp(l);
    L.attn_norm = param(p + "attn_norm.weight");
    L.ffn_norm = param(p + "ffn_norm.weight");
    L.hc_attn = {param(p + "hc_attn_fn"), param(p + "hc_attn_base"), param(p + "hc_attn_scale")};
    L.hc_ffn = {param(p + "hc_ffn_fn"), param(p + "hc_ffn_base"), param(p + "hc_ffn_scale")};
    L.wq_a = matrix(p + "attn.wq_a.weight");
    L.q_norm = param(p + "attn.q_norm.weight");
    L.wq_b = matrix(p + "attn.wq_b.weight");
    L.wkv = matrix(p + "attn.wkv.weight");
    L.kv_norm = param(p + "attn.kv_norm.weight");
    L.wo_a = matrix(p + "attn.wo_a.weight");
    L.wo_b = matrix(p + "attn.wo_b.weight");
    L.attn_sink = param(p + "attn.attn_sink");
    if (L.ratio > 0) L.compressor = compressor(p + "attn.compressor.");
    if (L.kind == AttnKind::kCSA) {
      L.idx_wq_b = matrix(p + "attn.indexer.wq_b.weight");
      L.idx_weights_proj = matrix(p + "attn.indexer.weights_proj.weight");
      L.idx_compressor = compressor(p + "attn.indexer.compressor.");
    }
    L.gate = matrix(p + "ffn.gate.weight");
    if (L.mlp == MlpKind::kHashMoe)
      L.tid2eid = index(p + "ffn.gate.tid2eid");
    else
      L.gate_bias = param(p + "ffn.gate.bias");
    for (int e = 0; e < c_.n_routed_experts; ++e) {
      L.w1.push_back(matrix(str(p, "ffn.experts.", e, ".w1.weight")));
      L.w2.push_back(matrix(str(p, "ffn.experts.", e, ".w2.weight")));
      L.w3.push_back(matrix(str(p, "ffn.experts.", e, ".w3.weight")));
    }
    L.sw1 = matrix(p + "ffn.shared_experts.w1.weight");
    L.sw2 = matrix(p + "ffn.shared_experts.w2.weight");
    L.sw3 = matrix(p + "ffn.shared_experts.w3.weight");
    return L;
  }
  CompressorWeights compressor(const std::string& p) {
    return {matrix(p + "wkv.weight"), matrix(p + "wgate.weight"), param(p + "ape"),
            param(p + "norm.weight")};
  }
  const Bound& at(const std::string& name) {
    auto it = bound_.find(name);
    SP_CHECK(it != bound_.end(), "tensor not bound: ", name);
    return it->second;
  }
  const std::vector<int64_t>& shape_of(const std::string& name) { return shapes_.at(name); }

  const Config& c_;
  ModelWeights& w_;
  const std::map<std::string, Bound>& bound_;
  std::map<std::string, std::vector<int64_t>> shapes_;
};

std::string list_names(const std::vector<std::string>& names, size_t limit = 20) {
  std::string s;
  for (size_t i = 0; i < names.size() && i < limit; ++i) s += str("\n  ", names[i]);
  if (names.size() > limit) s += str("\n  ... and ", names.size() - limit, " more");
  return s;
}

// Reads each page once so the load really brings the plan's bytes in (and times it).
uint64_t touch(const uint8_t* p, int64_t n) {
  uint64_t acc = 0;
  for (int64_t i = 0; i < n; i += 4096) acc += p[i];
  if (n > 0) acc += p[n - 1];
  return acc;
}

}  // namespace

Result<std::unique_ptr<ModelWeights>> load_weights(const Config& c, const std::string& dir,
                                                   const LoadPlan& plan,
                                                   const ProgressFn& progress) {
  auto t0 = std::chrono::steady_clock::now();
  if (plan.mtp) SP_RETURN_IF_ERROR(check_mtp_config(c));
  SP_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ck, Checkpoint::open(dir));
  if (plan.mtp) {
    bool any = false;
    for (auto& [name, info] : ck->all()) any = any || name.rfind(mtp_prefix(), 0) == 0;
    if (!any)
      return Status::error(str("--speculative mtp: checkpoint ", dir, " has no ", mtp_prefix(),
                               "* tensors (the MTP draft layer: ", mtp_prefix(), "e_proj.weight, ",
                               mtp_prefix(), "h_proj.weight, ...); run without --speculative"));
  }
  auto w = std::make_unique<ModelWeights>();
  w->plan = plan;
  const auto ex = expected_tensors(c, plan.mtp);
  std::set<std::string> known;
  std::vector<std::string> missing, wrong;
  std::map<std::string, Bound> bound;
  int64_t total = 0, done = 0;
  for (auto& t : ex)
    if (plan.owns(t)) total += expected_bytes(t);
  uint64_t sink = 0;
  for (auto& t : ex) {
    known.insert(t.name);
    const TensorInfo* ti = ck->find(t.name);
    if (!ti) {
      missing.push_back(t.name);
      continue;
    }
    Bound b;
    b.dtype = ti->dtype;
    b.data = ti->data;
    const TensorInfo* sc = nullptr;
    std::string problem;
    if (t.role == TensorRole::kParam) {
      if (!dtype_is_float(ti->dtype))
        problem = "expected a float dtype (F32, BF16 or F16)";
      else if (ti->shape != t.shape)
        problem = str("expected shape ", shape_str(t.shape));
    } else if (t.role == TensorRole::kIndex) {
      if (ti->dtype != DType::kI32 && ti->dtype != DType::kI64)
        problem = "expected I32 or I64";
      else if (ti->shape != t.shape)
        problem = str("expected shape ", shape_str(t.shape));
    } else {
      // A quantised matrix may also come as plain floats (exact); a float matrix may not come
      // quantised.
      WeightFormat f = t.format;
      if (f != WeightFormat::kFloat && dtype_is_float(ti->dtype)) f = WeightFormat::kFloat;
      ExpectedTensor as = t;
      as.format = f;
      b.format = f;
      DType want = f == WeightFormat::kFP8 ? DType::kE4M3 : DType::kI8;
      if (f == WeightFormat::kFloat && !dtype_is_float(ti->dtype)) {
        problem =
            t.format == WeightFormat::kFloat
                ? "expected a float dtype (F32, BF16 or F16): the config declares this weight "
                  "unquantised"
                : str("expected ", t.format == WeightFormat::kFP8 ? "F8_E4M3" : "I8 (packed FP4)",
                      " or a float dtype");
      } else if (f != WeightFormat::kFloat && ti->dtype != want) {
        problem = str("expected ", dtype_name(want), " (", weight_format_name(f), ")");
      } else if (ti->shape != stored_shape(as)) {
        problem = str("expected shape ", shape_str(stored_shape(as)), " for logical [", t.shape[0],
                      ", ", t.shape[1], "]");
      } else if (f != WeightFormat::kFloat) {
        known.insert(t.name.substr(0, t.name.size() - 6) + "scale");
        sc = ck->find(t.name.substr(0, t.name.size() - 6) + "scale");
        if (!sc) {
          missing.push_back(t.name.substr(0, t.name.size() - 6) + "scale");
          continue;
        }
        if (sc->dtype != DType::kE8M0 && sc->dtype != DType::kF32)
          problem =
              str("scale ", sc->name, ": expected F8_E8M0 (or F32), got ", dtype_name(sc->dtype));
        else if (sc->shape != scale_shape(as))
          problem = str("scale ", sc->name, ": expected shape ", shape_str(scale_shape(as)),
                        ", got ", shape_str(sc->shape));
        else {
          b.scale = sc->data;
          b.scale_dtype = sc->dtype;
        }
      }
    }
    if (!problem.empty()) {
      wrong.push_back(
          str(t.name, ": ", dtype_name(ti->dtype), " ", shape_str(ti->shape), "; ", problem));
      continue;
    }
    if (!plan.owns(t)) continue;
    // Unaligned storage is copied so decoders can load whole elements.
    if (reinterpret_cast<uintptr_t>(b.data) % dtype_size(b.dtype) != 0) {
      w->owned.emplace_back(ti->data, ti->data + ti->nbytes);
      b.data = w->owned.back().data();
    }
    bound[t.name] = b;
    w->stats.accessed.insert(t.name);
    sink += touch(ti->data, ti->nbytes);
    if (sc) {
      w->stats.accessed.insert(sc->name);
      sink += touch(sc->data, sc->nbytes);
    }
    w->stats.tensors += 1 + (sc ? 1 : 0);
    w->stats.bytes += ti->nbytes + (sc ? sc->nbytes : 0);
    done += expected_bytes(t);
    if (progress) progress(done, total);
  }
  std::vector<std::string> unexpected;
  for (auto& [name, info] : ck->all()) {
    if (known.count(name)) continue;
    if (name.rfind("mtp.", 0) == 0)
      w->stats.mtp_tensors.push_back(name);
    else
      unexpected.push_back(
          str(brief(name), " (", dtype_name(info->dtype), " ", shape_str(info->shape), ")"));
  }
  w->stats.checkpoint_tensors = static_cast<int64_t>(ck->all().size());
  std::string err;
  if (!missing.empty())
    err += str("\nmissing tensors (", missing.size(), "):", list_names(missing));
  if (!wrong.empty())
    err += str("\ntensors with the wrong shape or dtype (", wrong.size(), "):", list_names(wrong));
  if (!unexpected.empty())
    err += str("\nunexpected tensors the config does not describe (", unexpected.size(),
               "):", list_names(unexpected));
  if (!err.empty())
    return Status::error(str("checkpoint ", dir, " does not match its config.json:", err));
  // tid2eid entries must name experts that exist; checked on the stored (possibly I64) values
  // before they are narrowed to int32, so a wide value cannot wrap into range.
  for (auto& t : ex) {
    if (t.role != TensorRole::kIndex || !bound.count(t.name)) continue;
    const Bound& b = bound[t.name];
    const int64_t n = numel(t.shape);
    const int64_t k = c.experts_per_tok;
    std::vector<int64_t> row;  // a token's experts, which must be distinct (as top-k's are)
    for (int64_t i = 0; i < n; ++i) {
      int64_t v;
      if (b.dtype == DType::kI64) {
        std::memcpy(&v, b.data + i * 8, 8);
      } else {
        int32_t x;
        std::memcpy(&x, b.data + i * 4, 4);
        v = x;
      }
      if (v < 0 || v >= c.n_routed_experts)
        return Status::error(str(t.name, "[", i / c.experts_per_tok, "][", i % c.experts_per_tok,
                                 "] = ", v, ": expected an expert index in [0, ",
                                 c.n_routed_experts, ")"));
      if (i % k == 0) row.clear();
      if (std::find(row.begin(), row.end(), v) != row.end())
        return Status::error(str(t.name, "[", i / k, "] names expert ", v, " twice: expected ", k,
                                 " distinct experts per token"));
      row.push_back(v);
    }
  }
  Assembler as(c, *w, bound);
  as.set_shapes(ex);
  as.build(plan);
  w->checkpoint_owner = std::shared_ptr<Checkpoint>(std::move(ck));
  w->stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() +
                     (sink == 1 ? 1e-12 : 0);
  return w;
}

namespace {

// The generator's primitives live in core/dummy.h (the backends make described matrices' bytes
// with them); the per-tensor loops below are the host generator every other path must match.
uint64_t splitmix(uint64_t x) {
  return dummy_splitmix(x);
}
uint64_t name_hash(const std::string& s) {
  return dummy_name_hash(s);
}
// Uniform in [-1, 1).
inline float uniform(uint64_t key, int64_t i) {
  return dummy_uniform(key, i);
}
bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// A matrix's amplitude: std 1/sqrt(in) keeps every projection's output O(1); the embedding rows
// have std 1.
float dummy_amp(const ExpectedTensor& t) {
  return t.part == Part::kEmbed ? std::sqrt(3.0f)
                                : std::sqrt(3.0f / static_cast<float>(t.shape[1]));
}
// The power-of-two scale exponent of an FP8 matrix: the amplitude fits e4m3's 448.
int dummy_fp8_scale_exp(float amp) {
  return static_cast<int>(std::ceil(std::log2(amp / 448.0f)));
}
// Of an FP4 matrix: uniform e2m1 codes have rms ~2.93; the power of two that gives std
// ~1/sqrt(in).
int dummy_fp4_scale_exp(int64_t in) {
  return static_cast<int>(
      std::lround(std::log2(1.0f / (std::sqrt(static_cast<float>(in)) * 2.93f))));
}

// A matrix described by its generator's parameters (no bytes): what dummy_tensor would write.
DummyGen dummy_matrix_gen(const ExpectedTensor& t, uint64_t seed) {
  DummyGen g;
  g.on = true;
  g.key = splitmix(seed ^ name_hash(t.name));
  const float amp = dummy_amp(t);
  if (t.format == WeightFormat::kFloat) {
    g.mul = amp;
  } else if (t.format == WeightFormat::kFP8) {
    g.scale_exp = dummy_fp8_scale_exp(amp);
    g.mul = amp * std::ldexp(1.0f, -g.scale_exp);  // dummy_tensor's (amp * inv), rounded once
  } else {
    g.scale_exp = dummy_fp4_scale_exp(t.shape[1]);
  }
  return g;
}

// One tensor of dummy weights (values from the seed and the tensor's name only, so the order and
// the thread that makes them do not matter); its buffers are appended to `bufs`.
Bound dummy_tensor(const ExpectedTensor& t, const Config& c, uint64_t seed,
                   std::vector<std::vector<uint8_t>>* bufs) {
  const uint8_t* enc8 = bf16_to_e4m3_table();
  auto keep = [&](std::vector<uint8_t>&& v) {
    bufs->push_back(std::move(v));
    return bufs->back().data();
  };
  const uint64_t key = splitmix(seed ^ name_hash(t.name));
  const int64_t n = numel(t.shape);
  Bound b;
  if (t.role == TensorRole::kParam) {
    std::vector<uint8_t> buf(static_cast<size_t>(n) * 4);
    float* f = reinterpret_cast<float*>(buf.data());
    const std::string& nm = t.name;
    for (int64_t i = 0; i < n; ++i) {
      float u = uniform(key, i);
      float v;
      if (ends_with(nm, "_fn"))
        v = u * std::sqrt(3.0f / static_cast<float>(t.shape[1]));
      else if (ends_with(nm, "_base"))
        v = 0.5f * u;
      else if (ends_with(nm, "_scale"))
        v = 1.0f + 0.25f * u;
      else if (ends_with(nm, "norm.weight"))
        v = 1.0f + 0.05f * u;
      else
        v = 0.1f * u;  // attn_sink, ape, gate.bias
      f[i] = v;
    }
    b.dtype = DType::kF32;
    b.data = keep(std::move(buf));
  } else if (t.role == TensorRole::kIndex) {
    std::vector<uint8_t> buf(static_cast<size_t>(n) * 4);
    int32_t* p = reinterpret_cast<int32_t*>(buf.data());
    const int64_t k = t.shape[1];
    for (int64_t r = 0; r < t.shape[0]; ++r) {
      int64_t start =
          static_cast<int64_t>(splitmix(key + r) % static_cast<uint64_t>(c.n_routed_experts));
      for (int64_t j = 0; j < k; ++j)
        p[r * k + j] = static_cast<int32_t>((start + j) % c.n_routed_experts);
    }
    b.dtype = DType::kI32;
    b.data = keep(std::move(buf));
  } else {
    const int64_t out = t.shape[0], in = t.shape[1];
    const float amp = dummy_amp(t);
    b.format = t.format;
    if (t.format == WeightFormat::kFloat) {
      std::vector<uint8_t> buf(static_cast<size_t>(n) * 2);
      uint16_t* p = reinterpret_cast<uint16_t*>(buf.data());
      for (int64_t i = 0; i < n; ++i) p[i] = f32_to_bf16(amp * uniform(key, i));
      b.dtype = DType::kBF16;
      b.data = keep(std::move(buf));
    } else if (t.format == WeightFormat::kFP8) {
      const int sexp = dummy_fp8_scale_exp(amp);
      const float inv = std::ldexp(1.0f, -sexp);
      std::vector<uint8_t> buf(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) buf[i] = enc8[f32_to_bf16(amp * inv * uniform(key, i))];
      std::vector<uint8_t> sbuf(static_cast<size_t>(ceil_div(out, 128) * ceil_div(in, 128)),
                                static_cast<uint8_t>(sexp + 127));
      b.dtype = DType::kE4M3;
      b.data = keep(std::move(buf));
      b.scale = keep(std::move(sbuf));
    } else {
      const int sexp = dummy_fp4_scale_exp(in);
      std::vector<uint8_t> buf(static_cast<size_t>(n / 2));
      for (int64_t i = 0; i < n / 2; ++i) buf[i] = static_cast<uint8_t>(splitmix(key + i) >> 56);
      std::vector<uint8_t> sbuf(static_cast<size_t>(out * (in / 32)),
                                static_cast<uint8_t>(sexp + 127));
      b.dtype = DType::kI8;
      b.data = keep(std::move(buf));
      b.scale = keep(std::move(sbuf));
    }
    b.scale_dtype = DType::kE8M0;
  }
  return b;
}

}  // namespace

void for_each_matrix(const ModelWeights& w, const std::function<void(const Linear&)>& fn) {
  auto layer = [&](const LayerWeights& L) {
    for (const Linear* m :
         {&L.wq_a, &L.wq_b, &L.wkv, &L.wo_a, &L.wo_b, &L.compressor.wkv, &L.compressor.wgate,
          &L.idx_wq_b, &L.idx_weights_proj, &L.idx_compressor.wkv, &L.idx_compressor.wgate, &L.gate,
          &L.sw1, &L.sw2, &L.sw3})
      fn(*m);
    for (const auto* experts : {&L.w1, &L.w2, &L.w3})
      for (const Linear& m : *experts) fn(m);
  };
  fn(w.embed);
  fn(w.head);
  for (const LayerWeights& L : w.layers) layer(L);
  fn(w.mtp.e_proj);
  fn(w.mtp.h_proj);
  layer(w.mtp.block);
}

Result<std::unique_ptr<ModelWeights>> dummy_weights(const Config& c, const LoadPlan& plan,
                                                    uint64_t seed, const ProgressFn& progress,
                                                    DummyMatrices where) {
  auto t0 = std::chrono::steady_clock::now();
  if (plan.mtp) SP_RETURN_IF_ERROR(check_mtp_config(c));
  auto w = std::make_unique<ModelWeights>();
  w->plan = plan;
  const auto ex = expected_tensors(c, plan.mtp);
  std::map<std::string, Bound> bound;
  int64_t total = 0;
  for (auto& t : ex)
    if (plan.owns(t)) total += expected_bytes(t);
  w->owned.reserve(ex.size() * 2);
  // Tensors are made in parallel (each thread takes the next tensor), then bound in order.
  std::vector<const ExpectedTensor*> jobs;
  for (auto& t : ex)
    if (plan.owns(t)) jobs.push_back(&t);
  bf16_to_e4m3_table();  // built once, before the threads share it
  std::vector<Bound> made(jobs.size());
  std::vector<std::vector<std::vector<uint8_t>>> bufs(jobs.size());
  std::atomic<size_t> next{0};
  std::atomic<int64_t> made_bytes{0};
  // The first exception (out of host memory) stops the others and is raised here once every
  // thread has ended.
  std::mutex err_mu;
  std::exception_ptr err;
  auto work = [&](bool report) {
    try {
      for (size_t i; (i = next.fetch_add(1)) < jobs.size();) {
        const ExpectedTensor& t = *jobs[i];
        if (where == DummyMatrices::kAtUpload && t.role == TensorRole::kMatrix) {
          Bound& b = made[i];
          b.format = t.format;
          b.dtype = t.format == WeightFormat::kFloat ? DType::kBF16
                    : t.format == WeightFormat::kFP8 ? DType::kE4M3
                                                     : DType::kI8;
          b.scale_dtype = DType::kE8M0;
          b.gen = dummy_matrix_gen(t, seed);
        } else {
          made[i] = dummy_tensor(t, c, seed, &bufs[i]);
        }
        const int64_t b = expected_bytes(*jobs[i]);
        const int64_t d = made_bytes.fetch_add(b) + b;
        if (report && progress) progress(d, total);
      }
    } catch (...) {
      next = jobs.size();
      std::lock_guard<std::mutex> lock(err_mu);
      if (!err) err = std::current_exception();
    }
  };
  const unsigned hw = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> threads;
  try {
    for (unsigned i = 1; i < hw; ++i) threads.emplace_back(work, false);
  } catch (...) {  // could not start more threads: the ones started and this one do the work
  }
  work(true);  // this thread reports progress (the load watchdog's ticks)
  for (auto& th : threads) th.join();
  if (err) std::rethrow_exception(err);
  if (progress) progress(total, total);
  for (size_t i = 0; i < jobs.size(); ++i) {
    for (auto& v : bufs[i]) w->owned.push_back(std::move(v));
    const ExpectedTensor& t = *jobs[i];
    Bound& b = made[i];
    bound[t.name] = b;
    w->stats.tensors += 1 + (b.scale || (b.gen.on && b.format != WeightFormat::kFloat) ? 1 : 0);
    w->stats.bytes += expected_bytes(t);
    w->stats.accessed.insert(t.name);
  }
  Assembler as(c, *w, bound);
  as.set_shapes(ex);
  as.build(plan);
  w->stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return w;
}

}  // namespace sp
