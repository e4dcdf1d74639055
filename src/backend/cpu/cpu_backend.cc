// The CPU reference backend: plain fp32 loops, multithreaded over independent outputs.
// Batch invariance: every output element is computed by one thread with a reduction order that
// depends only on that row's own data (never on the batch size, the other rows or the thread
// count), so a row's bits are the same whether it runs alone or in any batch or pipeline split.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <list>

#include "backend/backend.h"
#include "core/dummy.h"
#include "core/thread_pool.h"

namespace sp {

namespace {

// Dot product with eight fixed partial sums (one 8-lane vector): its order depends only on n, so
// a row's result never depends on what else is computed, and every ISA gives the same bits (lane
// j always accumulates elements j, j + 8, ... with a separate multiply and add; no FMA contraction
// in ISO C++ mode).
typedef float v8f __attribute__((vector_size(32)));

inline float reduce8(v8f a, float tail) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) + tail;
}

inline v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline float dot(const float* a, const float* b, int64_t n) {
  v8f acc = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) acc += load8(a + k) * load8(b + k);
  float tail = 0;
  for (; k < n; ++k) tail += a[k] * b[k];
  return reduce8(acc, tail);
}

// Runtime ISA dispatch (an ifunc). ThreadSanitizer cannot run an ifunc resolver before it starts,
// so a TSan build uses the baseline code (same results: same arithmetic per lane).
#if defined(__SANITIZE_THREAD__)
#define SP_TARGET_CLONES
#else
#define SP_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#endif

// y[m, j] = dot(x[m], w[j]) for up to 4 weight rows at once, each with exactly dot()'s arithmetic.
SP_TARGET_CLONES void dot4_rows(const float* x, int64_t ldx, int64_t M, const float* w, int64_t K,
                                int nw, float* y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    v8f a0 = {0, 0, 0, 0, 0, 0, 0, 0}, a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      v8f xv = load8(xm + k);
      a0 += xv * load8(w + k);
      if (nw > 1) a1 += xv * load8(w + K + k);
      if (nw > 2) a2 += xv * load8(w + 2 * K + k);
      if (nw > 3) a3 += xv * load8(w + 3 * K + k);
    }
    v8f acc[4] = {a0, a1, a2, a3};
    for (int j = 0; j < nw; ++j) {
      float tail = 0;
      for (int64_t kk = k; kk < K; ++kk) tail += xm[kk] * w[j * K + kk];
      y[m * ldy + j] = reduce8(acc[j], tail);
    }
  }
}

inline float sigmoid(float x) {
  return 1.0f / (1.0f + std::exp(-x));
}
// torch.nn.functional.softplus (beta 1, threshold 20)
inline float softplus(float x) {
  return x > 20.0f ? x : std::log1p(std::exp(x));
}

// Indices of the k largest values, ties to the lower index, in selection order.
void topk_lower_index(const float* v, int n, int k, std::vector<int>& idx) {
  idx.resize(n);
  for (int i = 0; i < n; ++i) idx[i] = i;
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int a, int b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  idx.resize(k);
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(int threads, int64_t min_work) : pool_(threads), min_work_(min_work) {}
  std::string name() const override { return "cpu"; }
  int num_threads() const override { return pool_.num_threads(); }
  Device device() const override { return Device::kHost; }
  DType act_dtype() const override { return DType::kF32; }

  void reserve(const BackendLimits& lim) override { lim_ = lim; }

  Tensor alloc(int64_t rows, int64_t cols, DType dtype) override {
    const int64_t bytes = std::max<int64_t>(rows * cols * dtype_size(dtype), 1);
    storage_.emplace_back(static_cast<size_t>((bytes + 3) / 4), 0.0f);
    return Tensor::of(storage_.back().data(), rows, cols, dtype, Device::kHost);
  }

  LayerState alloc_state(const std::vector<StateAlloc>& layout) override {
    LayerState st;
    for (const StateAlloc& a : layout) st.*a.field = alloc(a.rows, a.cols, DType::kF32);
    return st;
  }

  // Matrices stay where the loader put them (mapped checkpoint or generated buffers); a described
  // dummy matrix (Matrix::dummy) gets its bytes made here by the host generator, on the pool's
  // threads. Small tensors are copied, so the caller's buffer may go away.
  Matrix upload(const Matrix& host) override {
    if (!host.dummy.on || host.data) return host;
    Matrix m = host;
    const int64_t units = dummy_value_units(host);
    std::vector<uint8_t>& v = matrices_.emplace_back(static_cast<size_t>(host.value_bytes()));
    const int64_t unit_bytes = host.format == WeightFormat::kFloat ? 2 : 1;
    pool_.parallel_for(
        units,
        [&](int64_t b, int64_t e) { fill_dummy_values(host, b, e, v.data() + b * unit_bytes); },
        1 << 16);
    m.data = v.data();
    if (host.format != WeightFormat::kFloat)
      m.scale =
          matrices_
              .emplace_back(static_cast<size_t>(host.scale_bytes()), dummy_scale_byte(host.dummy))
              .data();
    m.dummy = DummyGen{};
    return m;
  }
  Tensor upload(const Tensor& host) override {
    Tensor t = alloc(host.rows, host.cols, host.dtype);
    copy(host, t);
    return t;
  }
  void prepare_moe(MoeWeights&) override {}
  void begin_step(const BatchView&) override { non_finite_where_ = kAllFinite; }
  void synchronize() override {}
  // The largest magnitude's bits, per row: an exponent of all ones is a NaN or an Inf. Integer max
  // vectorises (a float compare chain would not without -ffast-math).
  void note_non_finite(Tensor x, int where) override {
    if (non_finite_where_ != kAllFinite || x.dtype != DType::kF32) return;
    for (int64_t r = 0; r < x.rows; ++r) {
      const float* p = static_cast<const float*>(x.data) + r * x.stride;
      uint32_t m = 0;
      for (int64_t c = 0; c < x.cols; ++c)
        m = std::max(m, std::bit_cast<uint32_t>(p[c]) & 0x7fffffffu);
      if (m >= 0x7f800000u) {
        non_finite_where_ = where;
        return;
      }
    }
  }
  int non_finite_where() override { return non_finite_where_; }

  void embed(const Matrix& table, const BatchView& b, Tensor out) override {
    pool_.parallel_for(
        b.num_tokens,
        [&](int64_t lo, int64_t hi) {
          for (int64_t t = lo; t < hi; ++t) table.decode_row(b.token_ids[t], out.row(t));
        },
        grain(table.in));
  }

  void expand_streams(Tensor e, int hc, Tensor X) override {
    for (int64_t t = 0; t < e.rows; ++t)
      for (int j = 0; j < hc; ++j)
        std::memcpy(X.row(t) + j * e.cols, e.row(t), e.cols * sizeof(float));
  }

  void linear(Tensor x, const Matrix& w, Tensor y) override {
    SP_CHECK(x.cols == w.in && y.cols == w.out && x.rows == y.rows, w.name, ": x ", x.rows, "x",
             x.cols, " y ", y.rows, "x", y.cols, " W ", w.out, "x", w.in);
    matmul(x.f32(), x.stride, x.rows, w, 0, w.in, w.out, y.f32(), y.stride);
  }

  void grouped_linear(Tensor x, const Matrix& w, int groups, Tensor y) override {
    const int64_t kin = x.cols / groups;
    SP_CHECK(w.in == kin && y.cols == w.out && x.rows == y.rows, w.name);
    matmul(x.f32(), x.stride, x.rows, w, kin, kin, w.out / groups, y.f32(), y.stride);
  }

  void rms_norm(Tensor x, const Tensor* weight_t, int group, float eps, Tensor y) override {
    const float* weight = weight_t ? weight_t->f32() : nullptr;
    const int64_t groups = x.cols / group;
    pool_.parallel_for(
        x.rows * groups,
        [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) {
            const float* src = x.row(i / groups) + (i % groups) * group;
            float* dst = y.row(i / groups) + (i % groups) * group;
            float ss = dot(src, src, group);
            float r = 1.0f / std::sqrt(ss / static_cast<float>(group) + eps);
            for (int k = 0; k < group; ++k) dst[k] = weight ? weight[k] * (src[k] * r) : src[k] * r;
          }
        },
        grain(2 * group));
  }

  void rope(Tensor x, int head_dim, const RopeView& t, const BatchView& b, bool inverse) override {
    const int heads = static_cast<int>(x.cols / head_dim), half = t.rope_dim / 2;
    const float* inv_freq = t.inv_freq.f32();
    pool_.parallel_for(
        x.rows,
        [&](int64_t lo, int64_t hi) {
          std::vector<float> cs(half), sn(half);
          for (int64_t r = lo; r < hi; ++r) {
            const float pos = static_cast<float>(b.positions[r]);
            for (int i = 0; i < half; ++i) {
              float ang = inv_freq[i] * pos;
              cs[i] = static_cast<float>(std::cos(static_cast<double>(ang)));
              sn[i] = static_cast<float>(std::sin(static_cast<double>(ang)));
              if (inverse) sn[i] = -sn[i];
            }
            for (int h = 0; h < heads; ++h) {
              float* v = x.row(r) + h * head_dim + (head_dim - t.rope_dim);
              for (int i = 0; i < half; ++i) {
                float a = v[2 * i], c = v[2 * i + 1];
                v[2 * i] = a * cs[i] - c * sn[i];
                v[2 * i + 1] = c * cs[i] + a * sn[i];
              }
            }
          }
        },
        grain(heads * t.rope_dim * 4));
  }

  void hc_pre(Tensor X, const HcWeights& p, int hc, int iters, float hc_eps, float norm_eps,
              Tensor x, Tensor post, Tensor comb) override {
    const int64_t W = X.cols, D = W / hc;
    const int mix = (2 + hc) * hc;
    const float *fn = p.fn.f32(), *base = p.base.f32(), *scale = p.scale.f32();
    pool_.parallel_for(
        X.rows,
        [&](int64_t lo, int64_t hi) {
          std::vector<float> flat(static_cast<size_t>(W)), m(mix), c(hc * hc);
          for (int64_t t = lo; t < hi; ++t) {
            const float* u = X.row(t);
            float r = 1.0f / std::sqrt(dot(u, u, W) / static_cast<float>(W) + norm_eps);
            for (int64_t k = 0; k < W; ++k) flat[k] = u[k] * r;
            for (int j = 0; j < mix; ++j) m[j] = dot(flat.data(), fn + j * W, W);
            float pre[16];
            for (int j = 0; j < hc; ++j) {
              pre[j] = sigmoid(m[j] * scale[0] + base[j]) + hc_eps;
              post.row(t)[j] = 2.0f * sigmoid(m[hc + j] * scale[1] + base[hc + j]);
            }
            for (int j = 0; j < hc; ++j) {  // row softmax over the last index, then Sinkhorn
              float* row = c.data() + j * hc;
              float mx = -std::numeric_limits<float>::infinity();
              for (int k = 0; k < hc; ++k) {
                row[k] = m[2 * hc + j * hc + k] * scale[2] + base[2 * hc + j * hc + k];
                mx = std::max(mx, row[k]);
              }
              float s = 0;
              for (int k = 0; k < hc; ++k) s += (row[k] = std::exp(row[k] - mx));
              for (int k = 0; k < hc; ++k) row[k] = row[k] / s + hc_eps;
            }
            auto col_norm = [&] {
              for (int k = 0; k < hc; ++k) {
                float s = 0;
                for (int j = 0; j < hc; ++j) s += c[j * hc + k];
                for (int j = 0; j < hc; ++j) c[j * hc + k] /= s + hc_eps;
              }
            };
            auto row_norm = [&] {
              for (int j = 0; j < hc; ++j) {
                float s = 0;
                for (int k = 0; k < hc; ++k) s += c[j * hc + k];
                for (int k = 0; k < hc; ++k) c[j * hc + k] /= s + hc_eps;
              }
            };
            col_norm();
            for (int it = 0; it < iters - 1; ++it) {
              row_norm();
              col_norm();
            }
            std::memcpy(comb.row(t), c.data(), hc * hc * sizeof(float));
            float* out = x.row(t);
            for (int64_t d = 0; d < D; ++d) {
              float s = 0;
              for (int j = 0; j < hc; ++j) s += pre[j] * u[j * D + d];
              out[d] = s;
            }
          }
        },
        grain(W * (mix + 2)));
  }

  void hc_post(Tensor f, Tensor post, Tensor comb, int hc, Tensor X) override {
    const int64_t D = f.cols;
    pool_.parallel_for(
        X.rows,
        [&](int64_t lo, int64_t hi) {
          std::vector<float> res(static_cast<size_t>(hc * D));
          for (int64_t t = lo; t < hi; ++t) {
            float* x = X.row(t);
            const float* c = comb.row(t);
            for (int k = 0; k < hc; ++k)
              for (int64_t d = 0; d < D; ++d) {
                float s = 0;
                for (int j = 0; j < hc; ++j) s += c[j * hc + k] * x[j * D + d];
                res[k * D + d] = post.row(t)[k] * f.row(t)[d] + s;
              }
            std::memcpy(x, res.data(), res.size() * sizeof(float));
          }
        },
        grain(hc * D * (hc + 1)));
  }

  void hc_head(Tensor X, const HcWeights& p, int hc, float hc_eps, float norm_eps,
               Tensor h) override {
    const int64_t W = X.cols, D = W / hc;
    const float *fn = p.fn.f32(), *base = p.base.f32(), *scale = p.scale.f32();
    pool_.parallel_for(
        X.rows,
        [&](int64_t lo, int64_t hi) {
          std::vector<float> flat(static_cast<size_t>(W));
          for (int64_t t = lo; t < hi; ++t) {
            const float* u = X.row(t);
            float r = 1.0f / std::sqrt(dot(u, u, W) / static_cast<float>(W) + norm_eps);
            for (int64_t k = 0; k < W; ++k) flat[k] = u[k] * r;
            float pre[16];
            for (int j = 0; j < hc; ++j)
              pre[j] = sigmoid(dot(flat.data(), fn + j * W, W) * scale[0] + base[j]) + hc_eps;
            for (int64_t d = 0; d < D; ++d) {
              float s = 0;
              for (int j = 0; j < hc; ++j) s += pre[j] * u[j * D + d];
              h.row(t)[d] = s;
            }
          }
        },
        grain(W * (hc + 2)));
  }

  void compress(Tensor a, Tensor g, const CompressorArgs& args, const BatchView& b, Tensor buf,
                Tensor cache) override {
    const int r = args.ratio, k = args.overlap, d = args.dim, R = args.ring;
    const int64_t kd = static_cast<int64_t>(k) * d;
    SP_CHECK(R >= k * r && buf.cols == 2 * kd, "compressor ring of ", R, " rows x ", buf.cols,
             " for ratio ", r, " overlap ", k);
    const float *ape = args.w->ape.f32(), *norm = args.w->norm.f32();
    // Sequences are independent: one task per chunk; tokens of a chunk go in order.
    pool_.parallel_for(static_cast<int64_t>(b.chunks.size()), [&](int64_t lo, int64_t hi) {
      std::vector<float> pooled(static_cast<size_t>(d)), wts(2 * r);
      std::vector<const float*> src(2 * r);  // per slot of the pooled windows: values, gates + kd
      for (int64_t ci = lo; ci < hi; ++ci) {
        const SeqChunk& ch = b.chunks[ci];
        // Position q's values then gates (ape included): row slot * R + q % R of the ring.
        auto ring = [&](int64_t q) { return buf.row(static_cast<int64_t>(ch.slot) * R + q % R); };
        for (int i = 0; i < ch.n_tokens; ++i) {
          const int64_t t = ch.offset + i, p = ch.start_pos + i, s = p % r;
          float* row = ring(p);
          std::memcpy(row, a.row(t), kd * sizeof(float));
          for (int64_t c = 0; c < kd; ++c) row[kd + c] = g.row(t)[c] + ape[s * kd + c];
          if (s != r - 1) continue;
          const int64_t w = p / r;
          SP_CHECK(w * r / lim_.block_tokens < ch.num_blocks, "compressed entry ", w, " of slot ",
                   ch.slot, " outside its ", ch.num_blocks, " state blocks");
          // The pooled slots: CSA the previous window's A-halves (none before window 0) then this
          // window's B-halves; HCA this window.
          const int n = k == 2 ? 2 * r : r;
          for (int j = 0; j < n; ++j) {
            const bool prev = k == 2 && j < r;
            const int64_t q = prev ? (w - 1) * r + j : w * r + (k == 2 ? j - r : j);
            src[j] = q < 0 ? nullptr : ring(q) + (k == 2 && !prev ? d : 0);
          }
          // Per channel: softmax over the window's slots.
          for (int c = 0; c < d; ++c) {
            float mx = -std::numeric_limits<float>::infinity();
            for (int j = 0; j < n; ++j) {
              float gv = src[j] ? src[j][kd + c] : -std::numeric_limits<float>::infinity();
              wts[j] = gv;
              mx = std::max(mx, gv);
            }
            float sum = 0;
            for (int j = 0; j < n; ++j) sum += (wts[j] = std::exp(wts[j] - mx));
            float acc = 0;
            for (int j = 0; j < n; ++j) {
              float v = src[j] ? src[j][c] : 0.0f;
              acc += v * (wts[j] / sum);
            }
            pooled[c] = acc;
          }
          float* e = cache.row(entry_row(b, ch, w, r, lim_.block_tokens));
          float ss = dot(pooled.data(), pooled.data(), d);
          float rn = 1.0f / std::sqrt(ss / static_cast<float>(d) + args.eps);
          for (int c = 0; c < d; ++c) e[c] = norm[c] * (pooled[c] * rn);
          rotate(e, d, *args.rope, static_cast<float>(w * r));
        }
      }
    });
  }

  void indexer_topk(Tensor q, Tensor weights, int heads, int dim, int ratio, int topk,
                    const BatchView& b, Tensor keys, Tensor out) override {
    SP_CHECK(out.cols == topk && out.rows == b.num_tokens, "indexer output ", out.rows, "x",
             out.cols);
    const float qscale = 1.0f / std::sqrt(static_cast<float>(dim));
    const float wscale = 1.0f / std::sqrt(static_cast<float>(heads));
    pool_.parallel_for(
        b.num_tokens,
        [&](int64_t lo, int64_t hi) {
          std::vector<float> score;
          std::vector<int> idx;
          for (int64_t t = lo; t < hi; ++t) {
            int32_t* sel = out.ptr<int32_t>(t);
            std::fill(sel, sel + topk, -1);
            const SeqChunk& ch = b.chunks[b.chunk_of[t]];
            const int n = (b.positions[t] + 1) / ratio;
            if (n == 0) continue;
            score.assign(n, 0.0f);
            for (int w = 0; w < n; ++w) {
              const float* kw = keys.row(entry_row(b, ch, w, ratio, lim_.block_tokens));
              float s = 0;
              for (int h = 0; h < heads; ++h) {
                float z = std::max(dot(q.row(t) + h * dim, kw, dim), 0.0f) * qscale;
                s += z * (weights.row(t)[h] * wscale);
              }
              score[w] = s;
            }
            const int k = std::min(topk, n);
            topk_lower_index(score.data(), n, k, idx);
            std::sort(idx.begin(), idx.end());
            for (int i = 0; i < k; ++i) sel[i] = idx[i];
          }
        },
        grain(static_cast<int64_t>(heads) * dim * 64));
  }

  void attention(Tensor q, Tensor kv, const AttentionArgs& a, const BatchView& b,
                 const LayerState& st, const Tensor* selected, Tensor o) override {
    const int H = a.num_heads, dh = a.head_dim, W = a.window;
    const int topk = selected ? static_cast<int>(selected->cols) : 0;
    const float* sink = a.sink->f32();
    pool_.parallel_for(
        static_cast<int64_t>(b.num_tokens) * H,
        [&](int64_t lo, int64_t hi) {
          std::vector<const float*> rows;
          std::vector<float> z;
          for (int64_t i = lo; i < hi; ++i) {
            const int64_t t = i / H;
            const int h = static_cast<int>(i % H);
            const SeqChunk& ch = b.chunks[b.chunk_of[t]];
            const int64_t p = b.positions[t];
            rows.clear();
            for (int64_t pp = std::max<int64_t>(0, p - W + 1); pp <= p; ++pp)
              rows.push_back(
                  pp < ch.start_pos
                      ? st.window.row(static_cast<int64_t>(ch.slot) * a.ring + pp % a.ring)
                      : kv.row(ch.offset + (pp - ch.start_pos)));
            auto entry = [&](int64_t w) {
              return st.cmp.row(entry_row(b, ch, w, a.ratio, lim_.block_tokens));
            };
            if (a.kind == AttnKind::kHCA) {
              for (int64_t w = 0; w < (p + 1) / a.ratio; ++w) rows.push_back(entry(w));
            } else if (a.kind == AttnKind::kCSA) {
              const int32_t* sel = selected->ptr<int32_t>(t);
              for (int j = 0; j < topk; ++j)
                if (sel[j] >= 0) rows.push_back(entry(sel[j]));
            }
            const float* qh = q.row(t) + h * dh;
            z.resize(rows.size());
            float mx = sink[h];
            for (size_t j = 0; j < rows.size(); ++j) {
              z[j] = dot(qh, rows[j], dh) * a.scale;
              mx = std::max(mx, z[j]);
            }
            float denom = std::exp(sink[h] - mx);
            for (size_t j = 0; j < rows.size(); ++j) denom += (z[j] = std::exp(z[j] - mx));
            float* oh = o.row(t) + h * dh;
            std::fill(oh, oh + dh, 0.0f);
            for (size_t j = 0; j < rows.size(); ++j) {
              const float pj = z[j] / denom;
              for (int c = 0; c < dh; ++c) oh[c] += pj * rows[j][c];
            }
          }
        },
        grain(static_cast<int64_t>(2) * (W + topk) * dh));
  }

  void window_update(Tensor kv, int window, int ring_rows, const BatchView& b,
                     Tensor ring) override {
    SP_CHECK(ring_rows >= window, "window ring of ", ring_rows, " rows for a window of ", window);
    for (const SeqChunk& ch : b.chunks) {
      // The last ring_rows positions: a verify chunk longer than the window must still leave its
      // first positions (which may be all that stands after the rollback) in the ring.
      for (int i = std::max(0, ch.n_tokens - ring_rows); i < ch.n_tokens; ++i) {
        const int64_t p = ch.start_pos + i;
        std::memcpy(ring.row(static_cast<int64_t>(ch.slot) * ring_rows + p % ring_rows),
                    kv.row(ch.offset + i), kv.cols * sizeof(float));
      }
    }
  }

  void moe(Tensor x, const MoeArgs& a, const BatchView& b, Tensor y) override {
    const MoeWeights& L = *a.w;
    const float* gate_bias = L.gate_bias.f32();
    const int32_t* tid2eid = L.tid2eid.ptr<int32_t>();
    const int64_t T = x.rows, D = x.cols, E = L.gate.out, K = a.experts_per_tok, I = L.w1[0].out;
    std::vector<float> logits(static_cast<size_t>(T * E));
    linear(x, L.gate, Tensor::of(logits.data(), T, E));
    // Routing: per token, independent of the batch.
    std::vector<int32_t> eidx(static_cast<size_t>(T * K));
    std::vector<float> ew(static_cast<size_t>(T * K));
    pool_.parallel_for(
        T,
        [&](int64_t lo, int64_t hi) {
          std::vector<float> s(E), biased(E);
          std::vector<int> idx;
          for (int64_t t = lo; t < hi; ++t) {
            for (int64_t e = 0; e < E; ++e) s[e] = std::sqrt(softplus(logits[t * E + e]));
            if (L.kind == MlpKind::kHashMoe) {
              idx.assign(tid2eid + b.token_ids[t] * K, tid2eid + (b.token_ids[t] + 1) * K);
            } else {
              for (int64_t e = 0; e < E; ++e) biased[e] = s[e] + gate_bias[e];
              topk_lower_index(biased.data(), static_cast<int>(E), static_cast<int>(K), idx);
            }
            float sum = 0;
            for (int j = 0; j < K; ++j) sum += s[idx[j]];
            for (int j = 0; j < K; ++j) {
              eidx[t * K + j] = idx[j];
              ew[t * K + j] = s[idx[j]] / (sum + 1e-20f) * a.routed_scale;
            }
          }
        },
        grain(E * 4));
    // Tokens per expert; each token's contributions are added in ascending expert order.
    std::vector<std::vector<std::pair<int64_t, float>>> by_expert(E);
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < K; ++j) by_expert[eidx[t * K + j]].push_back({t, ew[t * K + j]});
    std::vector<float> acc(static_cast<size_t>(T * D), 0.0f);
    std::vector<float> xs, h1, h3, out;
    auto expert = [&](const Matrix& w1, const Matrix& w2, const Matrix& w3,
                      const std::vector<int64_t>& toks, std::vector<float>& result) {
      const int64_t n = static_cast<int64_t>(toks.size());
      xs.resize(n * D);
      for (int64_t i = 0; i < n; ++i) std::memcpy(&xs[i * D], x.row(toks[i]), D * sizeof(float));
      h1.resize(n * I);
      h3.resize(n * I);
      linear(Tensor::of(xs.data(), n, D), w1, Tensor::of(h1.data(), n, I));
      linear(Tensor::of(xs.data(), n, D), w3, Tensor::of(h3.data(), n, I));
      for (int64_t i = 0; i < n * I; ++i) {
        float gt = std::min(h1[i], a.swiglu_limit);
        float up = std::clamp(h3[i], -a.swiglu_limit, a.swiglu_limit);
        h1[i] = gt * sigmoid(gt) * up;
      }
      result.resize(n * D);
      linear(Tensor::of(h1.data(), n, I), w2, Tensor::of(result.data(), n, D));
    };
    std::vector<int64_t> toks;
    for (int64_t e = 0; e < E; ++e) {
      if (by_expert[e].empty()) continue;
      toks.clear();
      for (auto& [t, wt] : by_expert[e]) toks.push_back(t);
      expert(L.w1[e], L.w2[e], L.w3[e], toks, out);
      for (size_t i = 0; i < toks.size(); ++i) {
        const float wt = by_expert[e][i].second;
        float* dst = &acc[toks[i] * D];
        for (int64_t d = 0; d < D; ++d) dst[d] += out[i * D + d] * wt;
      }
    }
    toks.resize(T);
    for (int64_t t = 0; t < T; ++t) toks[t] = t;
    expert(L.sw1, L.sw2, L.sw3, toks, out);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = 0; d < D; ++d) y.row(t)[d] = acc[t * D + d] + out[t * D + d];
  }

  void gather_logit_rows(Tensor x, const BatchView& b, Tensor out) override {
    for (size_t i = 0; i < b.logit_rows.size(); ++i)
      std::memcpy(out.row(static_cast<int64_t>(i)), x.row(b.logit_rows[i]), x.cols * sizeof(float));
  }
  void copy(Tensor src, Tensor dst) override {
    SP_CHECK(src.rows == dst.rows && src.cols == dst.cols && src.dtype == dst.dtype, "copy ",
             src.rows, "x", src.cols, " to ", dst.rows, "x", dst.cols);
    const int64_t row_bytes = src.cols * src.elem_size();
    for (int64_t r = 0; r < src.rows; ++r)
      std::memcpy(static_cast<uint8_t*>(dst.data) + r * dst.stride * dst.elem_size(),
                  static_cast<const uint8_t*>(src.data) + r * src.stride * src.elem_size(),
                  row_bytes);
  }
  void copy_rows(Tensor t, int64_t src_row, int64_t dst_row, int64_t n) override {
    SP_CHECK(n >= 0 && src_row >= 0 && dst_row >= 0 && src_row + n <= t.rows &&
                 dst_row + n <= t.rows && (src_row + n <= dst_row || dst_row + n <= src_row),
             "copy_rows ", src_row, " -> ", dst_row, " x ", n, " in ", t.rows, " rows");
    if (n == 0) return;
    const int64_t es = t.elem_size();
    auto* base = static_cast<uint8_t*>(t.data);
    if (t.contiguous()) {
      std::memcpy(base + dst_row * t.stride * es, base + src_row * t.stride * es,
                  static_cast<size_t>(n * t.cols * es));
      return;
    }
    for (int64_t r = 0; r < n; ++r)
      std::memcpy(base + (dst_row + r) * t.stride * es, base + (src_row + r) * t.stride * es,
                  static_cast<size_t>(t.cols * es));
  }
  void sample(Tensor logits, const std::vector<SampleSpec>& specs, int32_t* ids,
              TokenLogprobs* lps) override {
    for (size_t i = 0; i < specs.size(); ++i)
      ids[i] = sample_logits_row(specs[i], logits.row(specs[i].row), logits.cols,
                                 lps ? &lps[i] : nullptr);
  }
  void to_host(Tensor src, void* dst) override {
    SP_CHECK(src.contiguous(), "to_host of a strided tensor");
    if (src.numel() > 0) std::memcpy(dst, src.data, src.numel() * src.elem_size());
  }
  void from_host(const void* src, Tensor dst) override {
    SP_CHECK(dst.contiguous(), "from_host into a strided tensor");
    if (dst.numel() > 0) std::memcpy(dst.data, src, dst.numel() * dst.elem_size());
  }

 private:
  int non_finite_where_ = kAllFinite;
  // Items per thread so that each thread gets at least min_work_ multiply-adds: small ops stay on
  // one thread (waking the pool costs more than they do). Results do not depend on the split.
  int64_t grain(int64_t work_per_item) const {
    return std::max<int64_t>(1, min_work_ / std::max<int64_t>(1, work_per_item));
  }

  // y[m, n] = x[m, g(n) * group_stride : + K] . W[n] for every m, n, where g(n) = n /
  // rows_per_group. Threads split the weight rows; each is decoded once per call, four at a time.
  void matmul(const float* x, int64_t ldx, int64_t M, const Matrix& w, int64_t group_stride,
              int64_t K, int64_t rows_per_group, float* y, int64_t ldy) {
    if (M == 0) return;
    const int64_t N = w.out, blocks = (N + 3) / 4;
    pool_.parallel_for(
        blocks,
        [&](int64_t lo, int64_t hi) {
          std::vector<float> rows(static_cast<size_t>(4 * K));
          for (int64_t b = lo; b < hi; ++b) {
            const int64_t n0 = b * 4;
            const int nw = static_cast<int>(std::min<int64_t>(4, N - n0));
            // A block may straddle two groups: split it at the boundary.
            for (int j0 = 0; j0 < nw;) {
              const int64_t g = (n0 + j0) / rows_per_group;
              int j1 = j0;
              while (j1 < nw && (n0 + j1) / rows_per_group == g) ++j1;
              for (int j = j0; j < j1; ++j) w.decode_row(n0 + j, rows.data() + (j - j0) * K);
              dot4_rows(x + g * group_stride, ldx, M, rows.data(), K, j1 - j0, y + n0 + j0, ldy);
              j0 = j1;
            }
          }
        },
        grain(4 * M * K));
  }

  static void rotate(float* v, int dim, const RopeView& t, float pos) {
    float* r = v + (dim - t.rope_dim);
    const float* inv_freq = t.inv_freq.f32();
    for (int i = 0; i < t.rope_dim / 2; ++i) {
      float ang = inv_freq[i] * pos;
      float cs = static_cast<float>(std::cos(static_cast<double>(ang)));
      float sn = static_cast<float>(std::sin(static_cast<double>(ang)));
      float a = r[2 * i], c = r[2 * i + 1];
      r[2 * i] = a * cs - c * sn;
      r[2 * i + 1] = c * cs + a * sn;
    }
  }

  ThreadPool pool_;
  int64_t min_work_;
  BackendLimits lim_;
  std::list<std::vector<float>> storage_;
  std::list<std::vector<uint8_t>> matrices_;  // described dummy matrices' bytes and scales
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads, int64_t min_work_per_thread) {
  return std::make_unique<CpuBackend>(num_threads, min_work_per_thread);
}

}  // namespace sp
