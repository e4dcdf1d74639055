#include "model/model.h"

#include <algorithm>
#include <cmath>

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

StateBytes layer_state_bytes(const Config& c, int l) {
  StateBytes s;
  int64_t entry = 0;  // bytes per compressed entry
  for (const StateBuffer& b : layer_state_layout(c, l))
    (b.per_entry ? entry : s.per_sequence) += (b.per_entry ? 1 : b.rows) * b.cols * 4;
  const int64_t r = c.compress_ratio[l];
  if (r > 0) s.per_token = (entry + r - 1) / r;  // rounded up
  return s;
}

Model::Model(const Config& c, const ModelWeights& w, Backend& be, const StateLimits& lim)
    : c_(c), w_(w), be_(be), lim_(lim) {
  rope_main_ = RopeTable::build(c.rope_main, c.rope_dim);
  rope_compress_ = RopeTable::build(c.rope_compress, c.rope_dim);
  const int64_t S = lim.max_num_seqs, T = lim.max_num_batched_tokens, D = c.hidden_size;
  const int64_t dh = c.head_dim, H = c.num_heads, id = c.index_head_dim, ih = c.index_n_heads;
  int64_t bytes = 0;
  auto alloc = [&](int64_t rows, int64_t cols) {
    bytes += rows * cols * 4;
    return be_.alloc(rows, cols);
  };
  for (const LayerWeights& L : w.layers) {
    LayerState st;
    if (L.ratio > 0) st.max_entries = lim.max_model_len / L.ratio + 1;
    for (const StateBuffer& sb : layer_state_layout(c, L.index))
      st.*sb.field = alloc(S * (sb.per_entry ? st.max_entries : sb.rows), sb.cols);
    state_.push_back(st);
  }
  state_bytes_ = bytes;
  ws_X_ = be_.alloc(T, c.hc_dim());
  ws_x_ = be_.alloc(T, D);
  ws_xn_ = be_.alloc(T, D);
  ws_f_ = be_.alloc(T, D);
  ws_post_ = be_.alloc(T, c.hc_mult);
  ws_comb_ = be_.alloc(T, c.hc_mult * c.hc_mult);
  ws_qlat_ = be_.alloc(T, c.q_lora_rank);
  ws_q_ = be_.alloc(T, H * dh);
  ws_kv_ = be_.alloc(T, dh);
  ws_a_ = be_.alloc(T, 2 * dh);
  ws_g_ = be_.alloc(T, 2 * dh);
  ws_o_ = be_.alloc(T, H * dh);
  ws_z_ = be_.alloc(T, c.o_groups * c.o_lora_rank);
  ws_iq_ = be_.alloc(T, ih * id);
  ws_iw_ = be_.alloc(T, ih);
  ws_ia_ = be_.alloc(T, 2 * id);
  ws_ig_ = be_.alloc(T, 2 * id);
  if (w.plan.head) {
    ws_h_ = be_.alloc(lim.max_logit_rows, D);
    ws_hsel_ = be_.alloc(lim.max_logit_rows, c.hc_dim());
    ws_logits_ = be_.alloc(lim.max_logit_rows, c.vocab_size);
    if (lim.mtp) ws_mtp_hidden_ = be_.alloc(T, c.hc_dim());
  }
}

void Model::embed(const BatchView& b, Tensor X) {
  SP_CHECK(w_.plan.embed, "embed called on a stage without the embedding");
  Tensor e = ws_x_.slice_rows(0, b.num_tokens);
  be_.embed(w_.embed, b, e);
  be_.expand_streams(e, c_.hc_mult, X);
}

void Model::attention_block(const LayerWeights& L, LayerState& st, const BatchView& b, Tensor xn,
                            Tensor f) {
  const int T = b.num_tokens, dh = c_.head_dim;
  const RopeTable& rope = L.kind == AttnKind::kSliding ? rope_main_ : rope_compress_;
  const float eps = c_.rms_norm_eps;
  // Query path.
  Tensor qlat = ws_qlat_.slice_rows(0, T), q = ws_q_.slice_rows(0, T);
  be_.linear(xn, L.wq_a, qlat);
  be_.rms_norm(qlat, L.q_norm.data(), c_.q_lora_rank, eps, qlat);
  be_.linear(qlat, L.wq_b, q);
  be_.rms_norm(q, nullptr, dh, eps, q);
  be_.rope(q, dh, rope, b, false);
  // Window KV (one latent head, K = V).
  Tensor kv = ws_kv_.slice_rows(0, T);
  be_.linear(xn, L.wkv, kv);
  be_.rms_norm(kv, L.kv_norm.data(), dh, eps, kv);
  be_.rope(kv, dh, rope, b, false);
  // Compressed entries.
  if (L.ratio > 0) {
    const int k = c_.compressor_overlap(L.index);
    Tensor a = ws_a_.slice_rows(0, T), g = ws_g_.slice_rows(0, T);
    a.cols = g.cols = int64_t{k} * dh;
    be_.linear(xn, L.compressor.wkv, a);
    be_.linear(xn, L.compressor.wgate, g);
    CompressorArgs ca{&L.compressor, &rope_compress_, L.ratio, k, dh, eps};
    be_.compress(a, g, ca, b, st.cmp_buf, st.cmp_prev, st.cmp, st.max_entries);
  }
  const std::vector<int32_t>* sel = nullptr;
  if (L.kind == AttnKind::kCSA) {
    const int id = c_.index_head_dim, ih = c_.index_n_heads;
    Tensor ia = ws_ia_.slice_rows(0, T), ig = ws_ig_.slice_rows(0, T);
    be_.linear(xn, L.idx_compressor.wkv, ia);
    be_.linear(xn, L.idx_compressor.wgate, ig);
    CompressorArgs ca{&L.idx_compressor, &rope_compress_, L.ratio, 2, id, eps};
    be_.compress(ia, ig, ca, b, st.idx_buf, st.idx_prev, st.idx, st.max_entries);
    Tensor iq = ws_iq_.slice_rows(0, T), iw = ws_iw_.slice_rows(0, T);
    be_.linear(qlat, L.idx_wq_b, iq);
    be_.rope(iq, id, rope_compress_, b, false);
    be_.linear(xn, L.idx_weights_proj, iw);
    be_.indexer_topk(iq, iw, ih, id, L.ratio, c_.index_topk, b, st.idx, st.max_entries, selected_);
    sel = &selected_;
  }
  Tensor o = ws_o_.slice_rows(0, T);
  AttentionArgs aa{c_.num_heads,      dh,     c_.sliding_window,
                   L.ratio,           L.kind, 1.0f / std::sqrt(static_cast<float>(dh)),
                   L.attn_sink.data()};
  be_.attention(q, kv, aa, b, st, sel, c_.index_topk, o);
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
  const int hc = c_.hc_mult;
  for (size_t li = 0; li < w_.layers.size(); ++li) {
    const LayerWeights& L = w_.layers[li];
    be_.hc_pre(X, L.hc_attn, hc, c_.hc_sinkhorn_iters, c_.hc_eps, c_.rms_norm_eps, x, post, comb);
    be_.rms_norm(x, L.attn_norm.data(), static_cast<int>(c_.hidden_size), c_.rms_norm_eps, xn);
    attention_block(L, state_[li], b, xn, f);
    be_.hc_post(f, post, comb, hc, X);
    be_.hc_pre(X, L.hc_ffn, hc, c_.hc_sinkhorn_iters, c_.hc_eps, c_.rms_norm_eps, x, post, comb);
    be_.rms_norm(x, L.ffn_norm.data(), static_cast<int>(c_.hidden_size), c_.rms_norm_eps, xn);
    be_.moe(xn,
            MoeArgs{&L, c_.experts_per_tok, static_cast<float>(c_.routed_scaling_factor),
                    c_.swiglu_limit},
            b, f);
    be_.hc_post(f, post, comb, hc, X);
    if (hook) hook(L.index, X);
  }
  // The MTP layer reads the pre-hc_head streams: keep them where the draft can find them.
  if (ws_mtp_hidden_.data && w_.plan.end_layer == c_.num_layers)
    std::copy(X.data, X.data + X.rows * X.cols, ws_mtp_hidden_.data);
}

Tensor Model::head(Tensor X, const std::vector<int32_t>& rows) {
  SP_CHECK(w_.plan.head, "head called on a stage without the head");
  const int n = static_cast<int>(rows.size());
  SP_CHECK(n <= lim_.max_logit_rows, n, " logit rows over the limit ", lim_.max_logit_rows);
  Tensor xs = ws_hsel_.slice_rows(0, n), h = ws_h_.slice_rows(0, n),
         logits = ws_logits_.slice_rows(0, n);
  be_.gather_rows(X, rows, xs);
  be_.hc_head(xs, w_.hc_head, c_.hc_mult, c_.hc_eps, c_.rms_norm_eps, h);
  be_.rms_norm(h, w_.final_norm.data(), static_cast<int>(c_.hidden_size), c_.rms_norm_eps, h);
  be_.linear(h, w_.head, logits);
  return logits;
}

}  // namespace sp
