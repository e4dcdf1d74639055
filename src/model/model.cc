#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace sp {

std::vector<StateBuffer> layer_state_layout(const Config& c, int l) {
  const int64_t dh = c.head_dim, r = c.compress_ratio[l];
  // The window ring; per compressed entry a head_dim row; the compressor's pending windows
  // (values, then gates; CSA keeps the previous window's A-halves too); for CSA the same again for
  // the indexer's keys at index_head_dim.
  std::vector<StateBuffer> v{{&LayerState::window, c.sliding_window, dh, false}};
  if (r > 0) {
    const int64_t k = c.compressor_overlap(l);
    v.push_back({&LayerState::cmp, 0, dh, true});
    v.push_back({&LayerState::cmp_buf, 2 * r, k * dh, false});
    if (k == 2) v.push_back({&LayerState::cmp_prev, 2 * r, dh, false});
    if (c.attn_kinds[l] == AttnKind::kCSA) {
      const int64_t id = c.index_head_dim;
      v.push_back({&LayerState::idx, 0, id, true});
      v.push_back({&LayerState::idx_buf, 2 * r, 2 * id, false});
      v.push_back({&LayerState::idx_prev, 2 * r, id, false});
    }
  }
  return v;
}

int state_block_tokens(const Config& c) {
  int64_t l = 1;
  for (int r : c.compress_ratio)
    if (r > 0) l = std::lcm(l, static_cast<int64_t>(r));
  const int64_t n = (256 + l - 1) / l * l;
  SP_CHECK(n <= (int64_t{1} << 30), "compression ratios ", l, " give too large a state block");
  return static_cast<int>(n);
}

int64_t blocks_for(int64_t len, int block_tokens) {
  return (len + block_tokens - 1) / block_tokens;
}

std::vector<float> rope_inv_freq(const RopeParams& p, int rope_dim) {
  const int half = rope_dim / 2;
  std::vector<float> out(half);
  std::vector<double> extrap(half), interp(half);
  for (int i = 0; i < half; ++i) {
    double pos_freq = std::pow(p.theta, static_cast<double>(2 * i) / rope_dim);
    extrap[i] = 1.0 / pos_freq;
    interp[i] = 1.0 / (p.factor * pos_freq);
  }
  if (!p.yarn) {
    for (int i = 0; i < half; ++i) out[i] = static_cast<float>(extrap[i]);
    return out;
  }
  // YaRN ramp (floor/ceil-truncated correction range), no attention scaling.
  auto corr = [&](double rotations) {
    return rope_dim * std::log(p.original_max_position / (rotations * 2 * M_PI)) /
           (2 * std::log(p.theta));
  };
  double lo = std::max(std::floor(corr(p.beta_fast)), 0.0);
  double hi = std::min(std::ceil(corr(p.beta_slow)), static_cast<double>(rope_dim - 1));
  if (lo == hi) hi += 0.001;
  for (int i = 0; i < half; ++i) {
    double ramp = std::clamp((i - lo) / (hi - lo), 0.0, 1.0);
    double keep = 1.0 - ramp;
    out[i] = static_cast<float>(interp[i] * (1 - keep) + extrap[i] * keep);
  }
  return out;
}

StateBytes layer_state_bytes(const Config& c, int l) {
  StateBytes s;
  int64_t entry = 0;  // bytes per compressed entry
  for (const StateBuffer& b : layer_state_layout(c, l))
    (b.per_entry ? entry : s.per_sequence) += (b.per_entry ? 1 : b.rows) * b.cols * 4;
  const int64_t r = c.compress_ratio[l];
  if (r > 0) s.per_token = (entry + r - 1) / r;  // rounded up
  return s;
}

namespace {

// A host f32 parameter vector as a [1, n] tensor view (for upload).
Tensor host_row(const std::vector<float>& v) {
  return Tensor::of(const_cast<float*>(v.data()), 1, static_cast<int64_t>(v.size()));
}

}  // namespace

Model::Model(const Config& c, const ModelWeights& w, Backend& be, const StateLimits& lim)
    : c_(c), w_(w), be_(be), lim_(lim) {
  const int64_t S = lim.max_num_seqs, T = lim.max_num_batched_tokens, D = c.hidden_size;
  const int64_t dh = c.head_dim, H = c.num_heads, id = c.index_head_dim, ih = c.index_n_heads;
  block_tokens_ = state_block_tokens(c);
  const int64_t per_seq_blocks = blocks_for(lim.max_model_len, block_tokens_);
  num_blocks_ = lim.num_blocks > 0 ? lim.num_blocks : static_cast<int>(S * per_seq_blocks);
  BackendLimits bl;
  bl.max_tokens = lim.max_num_batched_tokens;
  bl.max_seqs = lim.max_num_seqs;
  bl.max_logit_rows = lim.max_logit_rows;
  bl.max_blocks = static_cast<int>(S * per_seq_blocks);
  bl.vocab = c.vocab_size;
  bl.block_tokens = block_tokens_;
  be_.reserve(bl);
  upload_weights();
  int64_t bytes = 0;
  const int64_t slots = S + lim.snapshot_slots;
  for (const LayerView& L : layers_) {
    std::vector<StateAlloc> layout;
    for (const StateBuffer& sb : layer_state_layout(c, L.index)) {
      StateAlloc a{sb.field, slots * sb.rows, sb.cols, StateKind::kWindow};
      if (sb.per_entry) {
        a.rows = int64_t{num_blocks_} * (block_tokens_ / L.ratio);
        a.kind = StateKind::kEntries;
      } else if (sb.field != &LayerState::window) {
        a.kind = StateKind::kCompressorBuf;
      }
      layout.push_back(a);
    }
    state_.push_back(be_.alloc_state(layout));
    for (const StateAlloc& a : layout) {
      const Tensor& t = (state_.back()).*a.field;
      bytes += t.span_bytes();
      if (a.kind != StateKind::kEntries) slot_bytes_ += t.span_bytes() / slots;
    }
    state_layout_.push_back(std::move(layout));
  }
  state_bytes_ = bytes;
  const DType act = be_.act_dtype(), f32 = DType::kF32;
  for (int i = 0; i < std::max(1, lim.residual_buffers); ++i)
    ws_X_.push_back(be_.alloc(T, c.hc_dim(), be_.residual_dtype()));
  ws_x_ = be_.alloc(T, D, act);
  ws_xn_ = be_.alloc(T, D, act);
  ws_f_ = be_.alloc(T, D, act);
  ws_post_ = be_.alloc(T, c.hc_mult, f32);
  ws_comb_ = be_.alloc(T, c.hc_mult * c.hc_mult, f32);
  ws_qlat_ = be_.alloc(T, c.q_lora_rank, act);
  ws_q_ = be_.alloc(T, H * dh, act);
  ws_kv_ = be_.alloc(T, dh, act);
  ws_a_ = be_.alloc(T, 2 * dh, f32);
  ws_g_ = be_.alloc(T, 2 * dh, f32);
  ws_o_ = be_.alloc(T, H * dh, act);
  ws_z_ = be_.alloc(T, c.o_groups * c.o_lora_rank, act);
  ws_iq_ = be_.alloc(T, ih * id, act);
  ws_iw_ = be_.alloc(T, ih, f32);
  ws_ia_ = be_.alloc(T, 2 * id, f32);
  ws_ig_ = be_.alloc(T, 2 * id, f32);
  ws_sel_ = be_.alloc(T, c.index_topk, DType::kI32);
  if (w.plan.head) {
    ws_h_ = be_.alloc(lim.max_logit_rows, D, act);
    ws_hsel_ = be_.alloc(lim.max_logit_rows, c.hc_dim(), be_.residual_dtype());
    ws_logits_ = be_.alloc(lim.max_logit_rows, c.vocab_size, f32);
    if (lim.mtp) ws_mtp_hidden_ = be_.alloc(T, c.hc_dim(), be_.residual_dtype());
  }
}

void Model::upload_weights() {
  auto t = [&](const std::vector<float>& v) {
    return v.empty() ? Tensor{} : be_.upload(host_row(v));
  };
  auto m = [&](const Matrix& x) { return x.valid() ? be_.upload(x) : Matrix{}; };
  auto hc = [&](const HcParams& p) {
    HcWeights h;
    h.fn = be_.upload(
        Tensor::of(const_cast<float*>(p.fn.data()), static_cast<int64_t>(p.base.size()),
                   static_cast<int64_t>(p.fn.size() / std::max<size_t>(1, p.base.size()))));
    h.base = t(p.base);
    h.scale = t(p.scale);
    return h;
  };
  auto comp = [&](const CompressorWeights& cw, int64_t ratio) {
    CompressorView v;
    v.wkv = m(cw.wkv);
    v.wgate = m(cw.wgate);
    if (!cw.ape.empty())
      v.ape = be_.upload(Tensor::of(const_cast<float*>(cw.ape.data()), ratio,
                                    static_cast<int64_t>(cw.ape.size()) / ratio));
    v.norm = t(cw.norm);
    return v;
  };
  rope_main_ = {be_.upload(host_row(rope_inv_freq(c_.rope_main, c_.rope_dim))), c_.rope_dim};
  rope_compress_ = {be_.upload(host_row(rope_inv_freq(c_.rope_compress, c_.rope_dim))),
                    c_.rope_dim};
  if (w_.plan.embed) embed_ = m(w_.embed);
  if (w_.plan.head) {
    head_ = m(w_.head);
    final_norm_ = t(w_.final_norm);
    hc_head_ = hc(w_.hc_head);
  }
  for (const LayerWeights& L : w_.layers) {
    LayerView v;
    v.index = L.index;
    v.kind = L.kind;
    v.ratio = L.ratio;
    v.attn_norm = t(L.attn_norm);
    v.ffn_norm = t(L.ffn_norm);
    v.hc_attn = hc(L.hc_attn);
    v.hc_ffn = hc(L.hc_ffn);
    v.wq_a = m(L.wq_a);
    v.wq_b = m(L.wq_b);
    v.wkv = m(L.wkv);
    v.wo_a = m(L.wo_a);
    v.wo_b = m(L.wo_b);
    v.q_norm = t(L.q_norm);
    v.kv_norm = t(L.kv_norm);
    v.attn_sink = t(L.attn_sink);
    if (L.ratio > 0) v.compressor = comp(L.compressor, L.ratio);
    if (L.kind == AttnKind::kCSA) {
      v.idx_wq_b = m(L.idx_wq_b);
      v.idx_weights_proj = m(L.idx_weights_proj);
      v.idx_compressor = comp(L.idx_compressor, L.ratio);
    }
    MoeWeights& e = v.moe;
    e.kind = L.mlp;
    e.gate = m(L.gate);
    e.gate_bias = t(L.gate_bias);
    if (!L.tid2eid.empty())
      e.tid2eid = be_.upload(Tensor::of(const_cast<int32_t*>(L.tid2eid.data()), c_.vocab_size,
                                        static_cast<int64_t>(L.tid2eid.size()) / c_.vocab_size,
                                        DType::kI32));
    for (size_t x = 0; x < L.w1.size(); ++x) {
      e.w1.push_back(m(L.w1[x]));
      e.w2.push_back(m(L.w2[x]));
      e.w3.push_back(m(L.w3[x]));
    }
    e.sw1 = m(L.sw1);
    e.sw2 = m(L.sw2);
    e.sw3 = m(L.sw3);
    be_.prepare_moe(e);
    layers_.push_back(std::move(v));
  }
}

void Model::copy_slot(int src, int dst) {
  SP_CHECK(src >= 0 && dst >= 0 && src != dst && src < num_state_slots() && dst < num_state_slots(),
           "slot copy ", src, " -> ", dst, " outside the ", num_state_slots(), " state slots");
  const int64_t slots = num_state_slots();
  for (size_t i = 0; i < state_.size(); ++i)
    for (const StateAlloc& a : state_layout_[i]) {
      if (a.kind == StateKind::kEntries) continue;  // paged, shared through block tables
      const int64_t rows = a.rows / slots;
      be_.copy_rows(state_[i].*a.field, src * rows, dst * rows, rows);
    }
}

void Model::begin_step(const BatchView& b) {
  for (int32_t id : b.block_tables)
    SP_CHECK(id >= 0 && id < num_blocks_, "state block ", id, " outside the pool of ", num_blocks_);
  be_.begin_step(b);
}

void Model::embed(const BatchView& b, Tensor X) {
  SP_CHECK(w_.plan.embed, "embed called on a stage without the embedding");
  Tensor e = ws_x_.slice_rows(0, b.num_tokens);
  be_.embed(embed_, b, e);
  be_.expand_streams(e, c_.hc_mult, X);
  be_.note_non_finite(X, Backend::kNonFiniteEmbedding);
}

void Model::attention_block(const LayerView& L, LayerState& st, const BatchView& b, Tensor xn,
                            Tensor f) {
  const int T = b.num_tokens, dh = c_.head_dim;
  const RopeView& rope = L.kind == AttnKind::kSliding ? rope_main_ : rope_compress_;
  const float eps = c_.rms_norm_eps;
  // Query path.
  Tensor qlat = ws_qlat_.slice_rows(0, T), q = ws_q_.slice_rows(0, T);
  be_.linear(xn, L.wq_a, qlat);
  be_.rms_norm(qlat, &L.q_norm, c_.q_lora_rank, eps, qlat);
  be_.linear(qlat, L.wq_b, q);
  be_.rms_norm(q, nullptr, dh, eps, q);
  be_.rope(q, dh, rope, b, false);
  // Window KV (one latent head, K = V).
  Tensor kv = ws_kv_.slice_rows(0, T);
  be_.linear(xn, L.wkv, kv);
  be_.rms_norm(kv, &L.kv_norm, dh, eps, kv);
  be_.rope(kv, dh, rope, b, false);
  // Compressed entries.
  if (L.ratio > 0) {
    const int k = c_.compressor_overlap(L.index);
    Tensor a = ws_a_.view(T, int64_t{k} * dh), g = ws_g_.view(T, int64_t{k} * dh);
    be_.linear(xn, L.compressor.wkv, a);
    be_.linear(xn, L.compressor.wgate, g);
    CompressorArgs ca{&L.compressor, &rope_compress_, L.ratio, k, dh, eps};
    be_.compress(a, g, ca, b, st.cmp_buf, st.cmp_prev, st.cmp);
  }
  const Tensor* sel = nullptr;
  Tensor selected;
  if (L.kind == AttnKind::kCSA) {
    const int id = c_.index_head_dim, ih = c_.index_n_heads;
    Tensor ia = ws_ia_.slice_rows(0, T), ig = ws_ig_.slice_rows(0, T);
    be_.linear(xn, L.idx_compressor.wkv, ia);
    be_.linear(xn, L.idx_compressor.wgate, ig);
    CompressorArgs ca{&L.idx_compressor, &rope_compress_, L.ratio, 2, id, eps};
    be_.compress(ia, ig, ca, b, st.idx_buf, st.idx_prev, st.idx);
    Tensor iq = ws_iq_.slice_rows(0, T), iw = ws_iw_.slice_rows(0, T);
    be_.linear(qlat, L.idx_wq_b, iq);
    be_.rope(iq, id, rope_compress_, b, false);
    be_.linear(xn, L.idx_weights_proj, iw);
    selected = ws_sel_.slice_rows(0, T);
    be_.indexer_topk(iq, iw, ih, id, L.ratio, c_.index_topk, b, st.idx, selected);
    sel = &selected;
  }
  Tensor o = ws_o_.slice_rows(0, T);
  AttentionArgs aa{c_.num_heads, dh,     c_.sliding_window,
                   L.ratio,      L.kind, 1.0f / std::sqrt(static_cast<float>(dh)),
                   &L.attn_sink};
  be_.attention(q, kv, aa, b, st, sel, o);
  be_.window_update(kv, c_.sliding_window, b, st.window);
  // De-rotate with the query position, grouped low-rank output projection.
  be_.rope(o, dh, rope, b, true);
  Tensor z = ws_z_.slice_rows(0, T);
  be_.grouped_linear(o, L.wo_a, c_.o_groups, z);
  be_.linear(z, L.wo_b, f);
}

void Model::run_layers(const BatchView& b, Tensor X, const LayerHook& hook) {
  const int T = b.num_tokens;
  SP_CHECK(T <= lim_.max_num_batched_tokens, "step of ", T, " tokens over the budget ",
           lim_.max_num_batched_tokens);
  for (const SeqChunk& ch : b.chunks)
    SP_CHECK(ch.start_pos + ch.n_tokens <= lim_.max_model_len, "sequence over max_model_len");
  Tensor x = ws_x_.slice_rows(0, T), xn = ws_xn_.slice_rows(0, T), f = ws_f_.slice_rows(0, T);
  Tensor post = ws_post_.slice_rows(0, T), comb = ws_comb_.slice_rows(0, T);
  const int hc = c_.hc_mult, D = static_cast<int>(c_.hidden_size);
  const float eps = c_.rms_norm_eps;
  for (size_t li = 0; li < layers_.size(); ++li) {
    const LayerView& L = layers_[li];
    be_.hc_pre(X, L.hc_attn, hc, c_.hc_sinkhorn_iters, c_.hc_eps, eps, x, post, comb);
    be_.rms_norm(x, &L.attn_norm, D, eps, xn);
    attention_block(L, state_[li], b, xn, f);
    be_.hc_post(f, post, comb, hc, X);
    be_.hc_pre(X, L.hc_ffn, hc, c_.hc_sinkhorn_iters, c_.hc_eps, eps, x, post, comb);
    be_.rms_norm(x, &L.ffn_norm, D, eps, xn);
    be_.moe(xn,
            MoeArgs{&L.moe, c_.experts_per_tok, static_cast<float>(c_.routed_scaling_factor),
                    c_.swiglu_limit},
            b, f);
    be_.hc_post(f, post, comb, hc, X);
    be_.note_non_finite(X, L.index);
    if (hook) hook(L.index, X);
  }
  // The MTP layer reads the pre-hc_head streams: keep them where the draft can find them.
  if (ws_mtp_hidden_.data && w_.plan.end_layer == c_.num_layers)
    be_.copy(X, ws_mtp_hidden_.slice_rows(0, T));
}

Tensor Model::head(const BatchView& b, Tensor X) {
  SP_CHECK(w_.plan.head, "head called on a stage without the head");
  const int n = static_cast<int>(b.logit_rows.size());
  SP_CHECK(n <= lim_.max_logit_rows, n, " logit rows over the limit ", lim_.max_logit_rows);
  Tensor xs = ws_hsel_.slice_rows(0, n), h = ws_h_.slice_rows(0, n),
         logits = ws_logits_.slice_rows(0, n);
  be_.gather_logit_rows(X, b, xs);
  be_.hc_head(xs, hc_head_, c_.hc_mult, c_.hc_eps, c_.rms_norm_eps, h);
  be_.rms_norm(h, &final_norm_, static_cast<int>(c_.hidden_size), c_.rms_norm_eps, h);
  be_.linear(h, head_, logits);
  be_.note_non_finite(logits, Backend::kNonFiniteHead);
  return logits;
}

}  // namespace sp
