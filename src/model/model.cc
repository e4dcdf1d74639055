#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace sp {

std::vector<StateBuffer> layer_state_layout(const Config& c, int l, int slack) {
  const int64_t dh = c.head_dim, r = c.layer_ratio(l);
  // The window ring; per compressed entry a head_dim row; the compressor's input ring (values then
  // gates of the positions a completing window pools); for CSA the same again for the indexer's
  // keys at index_head_dim. Rings keep `slack` more rows: the positions of speculative tokens that
  // may be dropped (backend.h LayerState).
  std::vector<StateBuffer> v{{&LayerState::window, window_ring_rows(c, slack), dh, false}};
  if (r > 0) {
    const int64_t k = c.compressor_overlap(l);
    v.push_back({&LayerState::cmp, 0, dh, true});
    v.push_back({&LayerState::cmp_buf, compressor_ring_rows(c, l, slack), 2 * k * dh, false});
    if (c.layer_kind(l) == AttnKind::kCSA) {
      const int64_t id = c.index_head_dim;
      v.push_back({&LayerState::idx, 0, id, true});
      v.push_back({&LayerState::idx_buf, compressor_ring_rows(c, l, slack), 2 * 2 * id, false});
    }
  }
  return v;
}

int window_ring_rows(const Config& c, int slack) {
  return c.sliding_window + slack;
}

int compressor_ring_rows(const Config& c, int l, int slack) {
  return c.compressor_overlap(l) * c.layer_ratio(l) + slack;
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

StateBytes layer_state_bytes(const Config& c, int l, int slack) {
  StateBytes s;
  int64_t entry = 0;  // bytes per compressed entry
  for (const StateBuffer& b : layer_state_layout(c, l, slack))
    (b.per_entry ? entry : s.per_sequence) += (b.per_entry ? 1 : b.rows) * b.cols * 4;
  const int64_t r = c.layer_ratio(l);
  if (r > 0) s.per_token = (entry + r - 1) / r;  // rounded up
  return s;
}

namespace {

// A host f32 parameter vector as a [1, n] tensor view (for upload).
Tensor host_row(const std::vector<float>& v) {
  return Tensor::of(const_cast<float*>(v.data()), 1, static_cast<int64_t>(v.size()));
}

}  // namespace

Model::Model(const Config& c, const ModelWeights& w, Backend& be, const StateLimits& lim,
             const std::function<void()>& on_progress)
    : c_(c), w_(w), be_(be), lim_(lim), mtp_on_(lim.mtp && w.plan.head) {
  SP_CHECK(!mtp_on_ || w.plan.mtp,
           "StateLimits.mtp on the head's stage needs the MTP weights (LoadPlan.mtp)");
  SP_CHECK(!mtp_on_ || w.plan.embed, "the MTP layer needs the embedding on the head's stage");
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
  bl.max_model_len = lim.max_model_len;
  bl.step_graphs = lim.step_graphs;
  be_.reserve(bl);
  upload_weights(on_progress);
  int64_t bytes = 0;
  const int64_t slots = S + lim.snapshot_slots;
  auto alloc_layer_state = [&](const LayerView& L, std::vector<StateAlloc>* kept) {
    std::vector<StateAlloc> layout;
    for (const StateBuffer& sb : layer_state_layout(c, L.index, lim.spec_slack)) {
      StateAlloc a{sb.field, slots * sb.rows, sb.cols, StateKind::kWindow};
      if (sb.per_entry) {
        a.rows = int64_t{num_blocks_} * (block_tokens_ / L.ratio);
        a.kind = StateKind::kEntries;
      } else if (sb.field != &LayerState::window) {
        a.kind = StateKind::kCompressorBuf;
      }
      layout.push_back(a);
    }
    LayerState st = be_.alloc_state(layout);
    if (on_progress) on_progress();
    for (const StateAlloc& a : layout) {
      const Tensor& t = st.*a.field;
      bytes += t.span_bytes();
      if (a.kind != StateKind::kEntries) slot_bytes_ += t.span_bytes() / slots;
    }
    *kept = std::move(layout);
    return st;
  };
  for (const LayerView& L : layers_) {
    state_layout_.emplace_back();
    state_.push_back(alloc_layer_state(L, &state_layout_.back()));
  }
  // The MTP layer's own state (its window ring per slot), described like any layer's.
  if (mtp_on_) mtp_state_ = alloc_layer_state(mtp_layer_, &mtp_layout_);
  state_bytes_ = bytes;
  // The workspace below (zero-filled, ~0.5 GB for a large model): one tick at its end.
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
  if (mtp_on_) {
    const int hc = c.hc_mult;
    ws_mtp_hs_ = be_.alloc(T, c.hc_dim(), act);
    ws_mtp_out_ = be_.alloc(T, c.hc_dim(), be_.residual_dtype());
    ws_mtp_zero_ = be_.alloc(1, D, act);  // zero-initialised, stays zero
    // post = 1 and comb = identity: hc_post then adds its sublayer input to every stream.
    std::vector<float> ones(static_cast<size_t>(T * hc), 1.0f),
        eye(static_cast<size_t>(T * hc * hc), 0.0f);
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < hc; ++j) eye[static_cast<size_t>((t * hc + j) * hc + j)] = 1.0f;
    ws_mtp_ones_ = be_.alloc(T, hc, f32);
    ws_mtp_eye_ = be_.alloc(T, int64_t{hc} * hc, f32);
    be_.from_host(ones.data(), ws_mtp_ones_);
    be_.from_host(eye.data(), ws_mtp_eye_);
  }
  if (on_progress) on_progress();
}

void Model::upload_weights(const std::function<void()>& on_progress) {
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
  auto layer_view = [&](const LayerWeights& L) {
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
    if (on_progress) on_progress();
    return v;
  };
  for (const LayerWeights& L : w_.layers) layers_.push_back(layer_view(L));
  if (mtp_on_) {
    // The MTP block is a decoder layer like the others (index num_layers); its extras beside it.
    const MtpWeights& mw = w_.mtp;
    mtp_layer_ = layer_view(mw.block);
    mtp_e_proj_ = m(mw.e_proj);
    mtp_h_proj_ = m(mw.h_proj);
    mtp_enorm_ = t(mw.enorm);
    mtp_hnorm_ = t(mw.hnorm);
    mtp_norm_ = t(mw.norm);
    mtp_hc_head_ = hc(mw.hc_head);
  }
}

void Model::copy_slot(int src, int dst) {
  SP_CHECK(src >= 0 && dst >= 0 && src != dst && src < num_state_slots() && dst < num_state_slots(),
           "slot copy ", src, " -> ", dst, " outside the ", num_state_slots(), " state slots");
  const int64_t slots = num_state_slots();
  auto copy = [&](LayerState& st, const std::vector<StateAlloc>& layout) {
    for (const StateAlloc& a : layout) {
      if (a.kind == StateKind::kEntries) continue;  // paged, shared through block tables
      const int64_t rows = a.rows / slots;
      be_.copy_rows(st.*a.field, src * rows, dst * rows, rows);
    }
  };
  for (size_t i = 0; i < state_.size(); ++i) copy(state_[i], state_layout_[i]);
  if (mtp_on_) copy(mtp_state_, mtp_layout_);  // the MTP layer's window ring too
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

// One compressor (the attention's, or the indexer's): projections, then the backend's pooling into
// the slot's input ring and the entry pool.
void Model::compressor(const LayerView& L, const CompressorView& w, int overlap, int dim,
                       const BatchView& b, Tensor xn, Tensor a, Tensor g, Tensor ring,
                       Tensor entries) {
  be_.linear(xn, w.wkv, a);
  be_.linear(xn, w.wgate, g);
  const CompressorArgs ca{&w,
                          &rope_compress_,
                          L.ratio,
                          overlap,
                          dim,
                          c_.rms_norm_eps,
                          compressor_ring_rows(c_, L.index, lim_.spec_slack)};
  be_.compress(a, g, ca, b, ring, entries);
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
    compressor(L, L.compressor, k, dh, b, xn, a, g, st.cmp_buf, st.cmp);
  }
  const Tensor* sel = nullptr;
  Tensor selected;
  if (L.kind == AttnKind::kCSA) {
    const int id = c_.index_head_dim, ih = c_.index_n_heads;
    Tensor ia = ws_ia_.slice_rows(0, T), ig = ws_ig_.slice_rows(0, T);
    compressor(L, L.idx_compressor, 2, id, b, xn, ia, ig, st.idx_buf, st.idx);
    Tensor iq = ws_iq_.slice_rows(0, T), iw = ws_iw_.slice_rows(0, T);
    be_.linear(qlat, L.idx_wq_b, iq);
    be_.rope(iq, id, rope_compress_, b, false);
    be_.linear(xn, L.idx_weights_proj, iw);
    selected = ws_sel_.slice_rows(0, T);
    be_.indexer_topk(iq, iw, ih, id, L.ratio, c_.index_topk, b, st.idx, selected);
    sel = &selected;
  }
  Tensor o = ws_o_.slice_rows(0, T);
  const int ring = window_ring_rows(c_, lim_.spec_slack);
  AttentionArgs aa{c_.num_heads, dh,     c_.sliding_window,
                   L.ratio,      L.kind, 1.0f / std::sqrt(static_cast<float>(dh)),
                   &L.attn_sink, ring};
  be_.attention(q, kv, aa, b, st, sel, o);
  be_.window_update(kv, c_.sliding_window, ring, b, st.window);
  // De-rotate with the query position, grouped low-rank output projection.
  be_.rope(o, dh, rope, b, true);
  Tensor z = ws_z_.slice_rows(0, T);
  be_.grouped_linear(o, L.wo_a, c_.o_groups, z);
  be_.linear(z, L.wo_b, f);
}

void Model::decoder_block(const LayerView& L, LayerState& st, const BatchView& b, Tensor X) {
  const int T = b.num_tokens;
  Tensor x = ws_x_.slice_rows(0, T), xn = ws_xn_.slice_rows(0, T), f = ws_f_.slice_rows(0, T);
  Tensor post = ws_post_.slice_rows(0, T), comb = ws_comb_.slice_rows(0, T);
  const int hc = c_.hc_mult;
  const float eps = c_.rms_norm_eps;
  be_.hc_pre_norm(X, L.hc_attn, hc, c_.hc_sinkhorn_iters, c_.hc_eps, eps, &L.attn_norm, x, xn, post,
                  comb);
  attention_block(L, st, b, xn, f);
  be_.hc_post(f, post, comb, hc, X);
  be_.hc_pre_norm(X, L.hc_ffn, hc, c_.hc_sinkhorn_iters, c_.hc_eps, eps, &L.ffn_norm, x, xn, post,
                  comb);
  be_.moe(xn,
          MoeArgs{&L.moe, c_.experts_per_tok, static_cast<float>(c_.routed_scaling_factor),
                  c_.swiglu_limit},
          b, f);
  be_.hc_post(f, post, comb, hc, X);
  be_.note_non_finite(X, L.index);
}

void Model::check_step(const BatchView& b) const {
  SP_CHECK(b.num_tokens <= lim_.max_num_batched_tokens, "step of ", b.num_tokens,
           " tokens over the budget ", lim_.max_num_batched_tokens);
  for (const SeqChunk& ch : b.chunks)
    SP_CHECK(ch.start_pos + ch.n_tokens <= lim_.max_model_len, "sequence over max_model_len");
}

void Model::run_layers(const BatchView& b, Tensor X, const LayerHook& hook) {
  check_step(b);
  auto layers = [&] {
    for (size_t li = 0; li < layers_.size(); ++li) {
      decoder_block(layers_[li], state_[li], b, X);
      if (hook) hook(layers_[li].index, X);
    }
  };
  // A decode-shaped step (every chunk the same few tokens: one, or a verify group of speculative
  // decoding) launches the same kernels with the same arguments as every other such step of its
  // shape on this residual buffer: the backend may replay it.
  const int n = decode_shaped_chunk(b);
  if (n > 0 && !hook && !layers_.empty())
    be_.run_graph(StepGraphKey{0, b.num_tokens, n, X.data}, layers);
  else
    layers();
}

Tensor Model::head_rows(const BatchView& b, Tensor X, const HcWeights& hc, const Tensor& norm) {
  SP_CHECK(w_.plan.head, "head called on a stage without the head");
  const int n = static_cast<int>(b.logit_rows.size());
  SP_CHECK(n <= lim_.max_logit_rows, n, " logit rows over the limit ", lim_.max_logit_rows);
  Tensor xs = ws_hsel_.slice_rows(0, n), h = ws_h_.slice_rows(0, n),
         logits = ws_logits_.slice_rows(0, n);
  be_.gather_logit_rows(X, b, xs);
  be_.hc_head_norm(xs, hc, c_.hc_mult, c_.hc_eps, c_.rms_norm_eps, &norm, h);
  be_.linear(h, head_, logits);
  be_.note_non_finite(logits, Backend::kNonFiniteHead);
  return logits;
}

Tensor Model::head(const BatchView& b, Tensor X) {
  return head_rows(b, X, hc_head_, final_norm_);
}

Tensor Model::mtp_forward(const BatchView& b, Tensor X_in, Tensor X_out) {
  SP_CHECK(mtp_on_, "mtp_forward on a model without the MTP layer (StateLimits.mtp, head stage)");
  const int T = b.num_tokens, hc = c_.hc_mult, D = static_cast<int>(c_.hidden_size);
  const int64_t W = c_.hc_dim();
  SP_CHECK(X_in.rows == T && X_in.cols == W && X_out.rows == T && X_out.cols == W,
           "mtp_forward: X_in / X_out must be [", T, ", ", W, "]");
  SP_CHECK(X_out.stride == X_out.cols, "mtp_forward: X_out must be contiguous");
  check_step(b);
  begin_step(b);
  const float eps = c_.rms_norm_eps;
  // e_proj(enorm(embed(t[p+1]))), the embedding zeroed at position 0 (vLLM's convention, which
  // the goldens follow). Rows at position 0 are rare (a sequence's first chunk), so they are
  // cleared one by one with a copy rather than with an op of their own.
  Tensor e = ws_x_.slice_rows(0, T), en = ws_xn_.slice_rows(0, T), f = ws_f_.slice_rows(0, T);
  be_.embed(embed_, b, e);
  for (int i = 0; i < T; ++i)
    if (b.positions[i] == 0) be_.copy(ws_mtp_zero_, e.slice_rows(i, 1));
  be_.rms_norm(e, &mtp_enorm_, D, eps, en);
  be_.linear(en, mtp_e_proj_, f);
  // h_proj(hnorm(stream)) for every stream: T * hc rows of width D. X_in is read completely
  // before X_out is written, so the two may be the same buffer (chained drafts).
  Tensor hs = ws_mtp_hs_.slice_rows(0, T);
  be_.rms_norm(X_in, &mtp_hnorm_, D, eps, hs);
  be_.linear(hs.view(int64_t{T} * hc, D), mtp_h_proj_, X_out.view(int64_t{T} * hc, D));
  // Broadcast the embedding term over the streams: hc_post with post = 1 and comb = identity is
  // exactly X_out[k] = f + X_out[k] (the other products are zeros).
  be_.hc_post(f, ws_mtp_ones_.slice_rows(0, T), ws_mtp_eye_.slice_rows(0, T), hc, X_out);
  decoder_block(mtp_layer_, mtp_state_, b, X_out);
  return head_rows(b, X_out, mtp_hc_head_, mtp_norm_);
}

}  // namespace sp
