#include "parallel/topology.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "model/model.h"
#include "model/weights.h"

namespace sp {

int Topology::first_layer(int stage) const {
  int f = 0;
  for (int s = 0; s < stage; ++s) f += layers[s];
  return f;
}
int Topology::end_layer(int stage) const {
  return first_layer(stage) + layers[stage];
}

std::string Topology::partition_string() const {
  std::string s;
  for (size_t i = 0; i < layers.size(); ++i) s += (i ? "," : "") + std::to_string(layers[i]);
  return s;
}

std::vector<int> vllm_partition(int num_layers, int pp) {
  std::vector<int> p(pp, num_layers / pp);
  const int rem = num_layers % pp;
  for (int i = 2; i < rem + 2; ++i) p[pp - i] += 1;
  return p;
}

Result<std::vector<int>> parse_partition(const std::string& text, int num_layers, int pp) {
  std::vector<int> p;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    long v = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end || v < 1)
      return Status::error(str(
          "--pp-partition: '", item,
          "' is not a layer count; expected vllm, auto, or positive integers like 11,11,11,10"));
    p.push_back(static_cast<int>(v));
  }
  if (static_cast<int>(p.size()) != pp)
    return Status::error(
        str("--pp-partition '", text, "' has ", p.size(), " stages; expected --pp = ", pp));
  int sum = 0;
  for (int v : p) sum += v;
  if (sum != num_layers)
    return Status::error(str("--pp-partition '", text, "' covers ", sum,
                             " layers; expected the model's ", num_layers));
  return p;
}

namespace {

// Weight bytes of each layer, split into routed experts and the rest (computed once per call).
struct LayerBytes {
  double dense = 0;       // attention, compressors, indexer, gate, shared expert, norms, mHC
  double per_expert = 0;  // one routed expert (w1 + w2 + w3)
  int experts = 0;
};

std::vector<LayerBytes> layer_bytes(const Config& c) {
  std::vector<LayerBytes> v(c.num_layers);
  for (const ExpectedTensor& t : expected_tensors(c)) {
    if (t.part != Part::kLayer) continue;
    LayerBytes& b = v[t.layer];
    if (t.name.find(".ffn.experts.") != std::string::npos) {
      if (t.name.find(".w1.") != std::string::npos) b.experts++;
      b.per_expert += static_cast<double>(expected_bytes(t));
    } else {
      b.dense += static_cast<double>(expected_bytes(t));
    }
  }
  for (auto& b : v)
    if (b.experts) b.per_expert /= b.experts;
  return v;
}

double layer_time(const Config& c, int l, const LayerBytes& b, const CostModelOptions& o) {
  // Decode is memory-bound: a layer costs the bytes it reads per step. Attention, indexer and
  // shared-expert weights are read once per step, routed experts once per distinct expert hit (at
  // most all of them), the caches once per sequence: window rows, plus every compressed entry
  // (HCA) or the top-k picks and the indexer's scan of every key (CSA).
  const double hit = std::min<double>(b.experts, static_cast<double>(o.batch) * c.experts_per_tok);
  const double dh = c.head_dim * 4.0, ctx = static_cast<double>(o.context);
  double kv = c.sliding_window * dh;
  if (c.attn_kinds[l] == AttnKind::kHCA) kv += ctx / c.compress_ratio[l] * dh;
  if (c.attn_kinds[l] == AttnKind::kCSA)
    kv += std::min<double>(c.index_topk, ctx / c.compress_ratio[l]) * dh +
          ctx / c.compress_ratio[l] * c.index_head_dim * 4.0;
  return b.dense + b.per_expert * hit + kv * o.batch;
}

// hc_head, the final norm and the head's bytes (the MTP layer aside).
double head_bytes(const Config& c) {
  return static_cast<double>(c.vocab_size) * c.hidden_size * 2.0 + c.hc_mult * c.hc_dim() * 4.0;
}

}  // namespace

double layer_time_cost(const Config& c, int l, const CostModelOptions& o) {
  return layer_time(c, l, layer_bytes(c)[l], o);
}

double embed_time_cost(const Config& c, const CostModelOptions& o) {
  return static_cast<double>(o.batch) * c.hidden_size * 2.0;  // one row per token
}

double head_time_cost(const Config& c, const CostModelOptions& o) {
  double t = o.head_cost * head_bytes(c);
  if (o.mtp) {  // the draft layer: a sliding-window layer of the same width
    Config m = c;
    m.attn_kinds[0] = AttnKind::kSliding;
    m.compress_ratio[0] = 0;
    t += layer_time_cost(m, 0, CostModelOptions{o.batch, o.context, false});
  }
  return t;
}

std::vector<StageCost> stage_costs(const Config& c, const std::vector<int>& partition,
                                   const CostModelOptions& o) {
  std::vector<StageCost> out;
  const auto ex = expected_tensors(c, o.mtp);
  const auto lb = layer_bytes(c);
  int first = 0;
  for (size_t s = 0; s < partition.size(); ++s) {
    StageCost sc;
    sc.first_layer = first;
    sc.end_layer = first + partition[s];
    // With MTP the last stage also holds the draft layer, its state and a copy of the embedding.
    LoadPlan plan = LoadPlan::stage(partition, static_cast<int>(s), o.mtp);
    for (const ExpectedTensor& t : ex)
      if (plan.owns(t)) sc.weight_bytes += expected_bytes(t);
    if (plan.mtp) {
      StateBytes b = layer_state_bytes(c, c.num_layers);
      sc.state_per_token += b.per_token;
      sc.state_per_seq += b.per_sequence;
    }
    for (int l = sc.first_layer; l < sc.end_layer; ++l) {
      StateBytes b = layer_state_bytes(c, l);
      sc.state_per_token += b.per_token;
      sc.state_per_seq += b.per_sequence;
      sc.time += layer_time(c, l, lb[l], o);
    }
    if (plan.embed) sc.time += embed_time_cost(c, o);
    if (plan.head) sc.time += head_time_cost(c, o);
    out.push_back(sc);
    first = sc.end_layer;
  }
  return out;
}

std::vector<int> auto_partition(const Config& c, int pp, const CostModelOptions& o) {
  const int L = c.num_layers;
  // Per-layer time and memory, plus the end stages' extras.
  std::vector<double> t(L), m(L);
  const auto lb = layer_bytes(c);
  const double embed_t = embed_time_cost(c, o), head_t = head_time_cost(c, o);
  double embed_m = 0, head_m = 0;
  for (const ExpectedTensor& e : expected_tensors(c, o.mtp)) {
    if (e.part == Part::kEmbed) embed_m += static_cast<double>(expected_bytes(e));
    // With MTP the last stage holds the draft layer and a copy of the embedding.
    if (e.part == Part::kHead || e.part == Part::kHcHead || e.part == Part::kFinalNorm ||
        e.part == Part::kMtp || (o.mtp && e.part == Part::kEmbed))
      head_m += static_cast<double>(expected_bytes(e));
  }
  double T = embed_t + head_t, M = embed_m + head_m;
  for (int l = 0; l < L; ++l) {
    StateBytes b = layer_state_bytes(c, l);
    t[l] = layer_time(c, l, lb[l], o);
    m[l] = lb[l].dense + lb[l].per_expert * lb[l].experts +
           static_cast<double>(o.batch) *
               (static_cast<double>(b.per_sequence) + static_cast<double>(b.per_token) * o.context);
    T += t[l];
    M += m[l];
  }
  auto share = [&](int a, int b, bool first, bool last) {
    double ts = 0, ms = 0;
    for (int l = a; l < b; ++l) ts += t[l], ms += m[l];
    if (first) ts += embed_t, ms += embed_m;
    if (last) ts += head_t, ms += head_m;
    return std::max(ts / T, ms / M);
  };
  // best[s][i]: smallest achievable max share placing layers [0, i) on stages [0, s).
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(pp + 1, std::vector<double>(L + 1, inf));
  std::vector<std::vector<int>> cut(pp + 1, std::vector<int>(L + 1, -1));
  best[0][0] = 0;
  for (int s = 1; s <= pp; ++s)
    for (int i = s; i <= L - (pp - s); ++i)
      for (int j = s - 1; j < i; ++j) {
        if (best[s - 1][j] == inf) continue;
        double v = std::max(best[s - 1][j], share(j, i, s == 1, s == pp));
        if (v < best[s][i] - 1e-15) {
          best[s][i] = v;
          cut[s][i] = j;
        }
      }
  std::vector<int> p(pp);
  for (int s = pp, i = L; s > 0; --s) {
    p[s - 1] = i - cut[s][i];
    i = cut[s][i];
  }
  return p;
}

Result<double> fit_head_cost(const Config& c, const std::vector<int>& partition,
                             const std::vector<double>& stage_ms, const CostModelOptions& o) {
  const size_t P = partition.size();
  if (P < 2)
    return Status::error("--stage-ms: fitting the head's cost needs at least 2 stages (--pp 2)");
  if (stage_ms.size() != P)
    return Status::error(str("--stage-ms: ", stage_ms.size(), " times for ", P,
                             " stages; expected one per stage, in stage order"));
  for (size_t s = 0; s < P; ++s)
    if (!(stage_ms[s] > 0) || !std::isfinite(stage_ms[s]))
      return Status::error(str("--stage-ms: stage ", s, "'s time ", stage_ms[s],
                               " is not a positive number of milliseconds"));
  CostModelOptions bytes = o;
  bytes.head_cost = 1.0;
  const double head = head_bytes(c);
  std::vector<StageCost> sc = stage_costs(c, partition, bytes);
  sc.back().time -= head;  // the last stage's layers (and MTP layer) alone
  double ms = 0, cost = 0;
  for (size_t s = 0; s + 1 < P; ++s) ms += stage_ms[s], cost += sc[s].time;
  const double per_cost = ms / cost;  // measured ms per predicted byte of the layers
  const double layers_last = per_cost * sc.back().time;
  const double head_ms = stage_ms.back() - layers_last;
  if (!(head_ms > 0))
    return Status::error(str("--stage-ms: the last stage (", stage_ms.back(),
                             " ms) is no slower than its layers alone predict from the other "
                             "stages (",
                             layers_last, " ms), so the head's cost cannot be measured this way"));
  return head_ms / (per_cost * head);
}

Result<Topology> make_topology(const Config& c, int pp, int rank, const std::string& partition,
                               const CostModelOptions& o) {
  if (pp < 1) return Status::error(str("--pp: expected at least 1 stage, got ", pp));
  if (pp > c.num_layers)
    return Status::error(str("--pp ", pp, ": more stages than the model's ", c.num_layers,
                             " layers; every stage needs at least one layer"));
  Topology t;
  t.world = pp;
  t.rank = rank;
  if (partition.empty()) {
    t.layers = vllm_partition(c.num_layers, pp);
  } else if (partition == "auto") {
    t.layers = auto_partition(c, pp, o);
  } else {
    SP_ASSIGN_OR_RETURN(t.layers, parse_partition(partition, c.num_layers, pp));
  }
  return t;
}

}  // namespace sp
