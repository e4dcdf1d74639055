#include "tools/mtp_check.h"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "tools/driver.h"

namespace sp {

Result<std::vector<const float*>> read_mtp_golden(const SafetensorsFile& g,
                                                  const std::vector<GoldenPrompt>& prompts,
                                                  const Config& c) {
  std::vector<const float*> out;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string name = str("p", i, ".mtp_logits");
    const int64_t n = static_cast<int64_t>(prompts[i].ids.size() + prompts[i].greedy.size()) - 1;
    const std::vector<int64_t> want{n, c.vocab_size};
    auto it = g.tensors().find(name);
    if (it == g.tensors().end())
      return Status::error(str("MTP golden file: tensor ", name, " is missing; expected F32 ",
                               shape_str(want), " (input ids + greedy tokens of prompt ", i,
                               ", minus one)"));
    if (it->second.dtype != DType::kF32 || it->second.shape != want)
      return Status::error(str("MTP golden file: ", name, " is ", dtype_name(it->second.dtype), " ",
                               shape_str(it->second.shape), "; expected F32 ", shape_str(want)));
    out.push_back(reinterpret_cast<const float*>(it->second.data));
  }
  return out;
}

std::vector<std::vector<float>> run_mtp_teacher_forced(
    Model& m, const std::vector<std::vector<int32_t>>& seqs, int chunk) {
  Backend& be = m.backend();
  const int64_t V = m.config().vocab_size;
  const int S = static_cast<int>(seqs.size());
  const int bt = m.block_tokens();
  const int64_t per_seq = blocks_for(m.limits().max_model_len, bt);
  SP_CHECK(m.has_mtp(), "run_mtp_teacher_forced: the model has no MTP layer");
  SP_CHECK(S <= m.limits().max_num_seqs && int64_t{S} * per_seq <= m.num_blocks(),
           "run_mtp_teacher_forced: ", S, " sequences need that many slots and their blocks");
  SP_CHECK(m.limits().residual_buffers >= 2, "run_mtp_teacher_forced needs 2 residual buffers");
  SP_CHECK(chunk >= 1, "chunk must be positive");
  std::vector<std::vector<float>> out(static_cast<size_t>(S));
  for (int i = 0; i < S; ++i) {
    SP_CHECK(seqs[i].size() >= 2, "sequence ", i, " is shorter than 2 tokens");
    out[i].assign((seqs[i].size() - 1) * static_cast<size_t>(V), 0.0f);
  }
  std::vector<int64_t> pos(static_cast<size_t>(S), 0);
  std::vector<float> host;
  struct Rows {
    int seq, main_offset, draft_offset, n;
    int64_t start;
  };
  for (;;) {
    BatchView main, draft;
    std::vector<Rows> rows;
    // Chunk [pos, pos + count) of sequence i; `shift` 1 gives each row the token that follows it.
    auto add = [&](BatchView& b, int i, int count, int shift) {
      SeqChunk ch;
      ch.slot = i;
      ch.n_tokens = count;
      ch.start_pos = pos[i];
      ch.offset = b.num_tokens;
      ch.block_table = static_cast<int32_t>(b.block_tables.size());
      ch.num_blocks = static_cast<int32_t>(blocks_for(pos[i] + count, bt));
      for (int k = 0; k < ch.num_blocks; ++k)
        b.block_tables.push_back(static_cast<int32_t>(i * per_seq + k));
      for (int j = 0; j < count; ++j) {
        b.token_ids.push_back(seqs[i][static_cast<size_t>(pos[i] + j + shift)]);
        b.positions.push_back(static_cast<int32_t>(pos[i] + j));
        b.chunk_of.push_back(static_cast<int32_t>(b.chunks.size()));
      }
      b.chunks.push_back(ch);
      b.num_tokens += count;
    };
    std::vector<int> took(static_cast<size_t>(S), 0);
    for (int i = 0; i < S; ++i) {
      const int64_t N = static_cast<int64_t>(seqs[i].size());
      if (pos[i] >= N) continue;
      const int n = static_cast<int>(std::min<int64_t>(chunk, N - pos[i]));
      const int main_offset = main.num_tokens;
      add(main, i, n, 0);
      took[i] = n;
      // Positions that have a following token (the last position of the sequence has none).
      const int nd = static_cast<int>(std::min<int64_t>(n, N - 1 - pos[i]));
      if (nd > 0) {
        rows.push_back({i, main_offset, draft.num_tokens, nd, pos[i]});
        add(draft, i, nd, 1);
      }
    }
    if (main.num_tokens == 0) break;
    Tensor X = m.residual(0, main.num_tokens);
    m.begin_step(main);
    m.embed(main, X);
    m.run_layers(main, X);
    if (draft.num_tokens > 0) {
      for (int r = 0; r < draft.num_tokens; ++r) draft.logit_rows.push_back(r);
      Tensor x_in = m.residual(1, draft.num_tokens), x_out = m.mtp_streams(draft.num_tokens);
      for (const Rows& r : rows)
        be.copy(X.slice_rows(r.main_offset, r.n), x_in.slice_rows(r.draft_offset, r.n));
      Tensor logits = m.mtp_forward(draft, x_in, x_out);
      host.resize(static_cast<size_t>(draft.num_tokens * V));
      be.to_host(logits, host.data());
      for (const Rows& r : rows)
        std::memcpy(&out[r.seq][static_cast<size_t>(r.start * V)],
                    &host[static_cast<size_t>(r.draft_offset) * V],
                    static_cast<size_t>(r.n * V) * sizeof(float));
    }
    for (int i = 0; i < S; ++i) pos[i] += took[i];
  }
  return out;
}

namespace {

int64_t first_max(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

}  // namespace

Result<std::vector<std::vector<float>>> mtp_logits_one_stage(
    const Flags& f, const Config& c, const std::vector<std::vector<int32_t>>& seqs) {
  SP_RETURN_IF_ERROR(check_mtp_config(c));
  SP_ASSIGN_OR_RETURN(std::string dev, resolve_device(f));
  const LoadPlan plan = LoadPlan::whole(c, /*mtp=*/true);
  SP_ASSIGN_OR_RETURN(
      std::unique_ptr<ModelWeights> w,
      f.str("load-format") == "dummy"
          ? dummy_weights(c, plan, static_cast<uint64_t>(f.i64("seed")), nullptr,
                          dev == "cpu" ? DummyMatrices::kHost : DummyMatrices::kAtUpload)
          : load_weights(c, f.str("model"), plan, nullptr));
  std::unique_ptr<Backend> be;
  if (dev == "cpu") {
    be = make_cpu_backend(static_cast<int>(f.i64("threads")));
  } else {
    SP_ASSIGN_OR_RETURN(
        be, make_cuda_backend(0, f.str("kv-cache-dtype") == "fp32" ? DType::kF32 : DType::kBF16,
                              f.str("activation-dtype") == "bf16" ? DType::kBF16 : DType::kF32));
  }
  int64_t longest = 0;
  for (const auto& s : seqs) {
    if (s.size() < 2)
      return Status::error("the MTP check needs sequences of at least 2 tokens (prompt + greedy)");
    longest = std::max<int64_t>(longest, static_cast<int64_t>(s.size()));
  }
  const int S = static_cast<int>(seqs.size());
  // --max-num-batched-tokens is the step budget, shared by the sequences: smaller budgets carry
  // the MTP window across more steps.
  const int chunk = std::max(1, static_cast<int>(f.i64("max-num-batched-tokens")) / S);
  StateLimits lim;
  lim.max_num_seqs = S;
  lim.max_model_len = longest;
  lim.max_num_batched_tokens = chunk * S;
  lim.max_logit_rows = chunk * S;
  lim.residual_buffers = 2;
  lim.mtp = true;
  Model model(c, *w, *be, lim);
  return run_mtp_teacher_forced(model, seqs, chunk);
}

Status write_mtp_golden(const std::string& path, const std::vector<std::vector<float>>& logits,
                        int64_t vocab) {
  std::vector<TensorInfo> tensors;
  for (size_t i = 0; i < logits.size(); ++i) {
    TensorInfo t;
    t.name = str("p", i, ".mtp_logits");
    t.dtype = DType::kF32;
    t.shape = {static_cast<int64_t>(logits[i].size()) / vocab, vocab};
    t.nbytes = static_cast<int64_t>(logits[i].size() * sizeof(float));
    t.data = reinterpret_cast<const uint8_t*>(logits[i].data());
    tensors.push_back(t);
  }
  const std::string tmp = path + ".tmp";
  Status st = write_safetensors(tmp, tensors);
  if (!st || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return Status::error(str("writing MTP golden file ", path, " failed"));
  }
  return Status::ok();
}

int run_mtp_check(const Flags& f, const Config& c, const std::vector<GoldenPrompt>& prompts,
                  const std::string& mtp_golden_path) {
  auto gfile = SafetensorsFile::open(mtp_golden_path);
  if (!gfile) return fail(gfile.status());
  auto want = read_mtp_golden(**gfile, prompts, c);
  if (!want) return fail(want.status());
  std::vector<std::vector<int32_t>> seqs;
  for (const GoldenPrompt& g : prompts) {
    seqs.push_back(g.ids);
    seqs.back().insert(seqs.back().end(), g.greedy.begin(), g.greedy.end());
  }
  const int S = static_cast<int>(seqs.size());
  auto run = mtp_logits_one_stage(f, c, seqs);
  if (!run) return fail(run.status());
  const auto& got = *run;
  const bool relative = resolve_device(f).value() == "cuda";
  const int64_t V = c.vocab_size;
  const double atol = f.f64("atol");
  bool ok = true;
  std::vector<double> rel;
  int64_t top1 = 0;
  for (int i = 0; i < S; ++i) {
    const int64_t n = static_cast<int64_t>(seqs[i].size()) - 1;
    double err = 0;
    for (int64_t p = 0; p < n; ++p) {
      const float* g = &got[i][static_cast<size_t>(p * V)];
      const float* r = (*want)[i] + p * V;
      double num = 0, den = 0;
      for (int64_t v = 0; v < V; ++v) {
        const double d = static_cast<double>(g[v]) - r[v];
        err = std::max(err, std::fabs(d));
        num += d * d;
        den += static_cast<double>(r[v]) * r[v];
      }
      if (!std::isfinite(num)) err = INFINITY;
      rel.push_back(std::isfinite(num) ? std::sqrt(num / std::max(den, 1e-300)) : INFINITY);
      top1 += first_max(g, V) == first_max(r, V);
    }
    std::printf("mtp prompt %d (%" PRId64 " positions): mtp_logits max_abs_err %.3e\n", i, n, err);
    if (!relative) ok &= err <= atol;
  }
  std::sort(rel.begin(), rel.end());
  const double median = rel.empty() ? 0.0 : rel[rel.size() / 2];
  const double agree = rel.empty() ? 1.0 : static_cast<double>(top1) / rel.size();
  std::printf("mtp positions %zu: top1_agreement %.4f, median_rel_err %.3e, max_rel_err %.3e\n",
              rel.size(), agree, median, rel.empty() ? 0.0 : rel.back());
  if (relative) {
    ok = agree >= f.f64("min-top1") && median <= f.f64("max-median-rel");
    std::printf("mtp verify: %s (top1 >= %.3f, median rel <= %.1e)\n", ok ? "PASS" : "FAIL",
                f.f64("min-top1"), f.f64("max-median-rel"));
  } else {
    std::printf("mtp verify: %s (atol %.1e)\n", ok ? "PASS" : "FAIL", atol);
  }
  return ok ? 0 : 1;
}

}  // namespace sp
