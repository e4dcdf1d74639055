// Parity of the attention-side CUDA kernels (compress, indexer_topk, attention, window_update)
// with the CPU backend. The kernels are called directly (sp::cuda entry points) on device memory
// this file manages, so these tests do not depend on the CUDA backend class. Inputs are rounded
// to bf16 where the GPU may store bf16, so both sides see the same values; outputs are poisoned
// (NaN) before each run; every GPU op runs twice and must give the same bits.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "backend/cuda/kernels.h"
#include "tests/gpu/op_harness.h"

namespace sp::test {
namespace {

#define CU(call) ASSERT_EQ((call), cudaSuccess) << #call

constexpr int kBlockTokens = 256;

// Device allocations, the stream and the workspace of one test.
struct Dev {
  cudaStream_t s = nullptr;
  std::unique_ptr<cuda::Workspace> ws;
  std::vector<void*> ptrs;
  Dev() {
    EXPECT_EQ(cudaStreamCreate(&s), cudaSuccess);
    ws = std::make_unique<cuda::Workspace>(s);
  }
  ~Dev() {
    cudaStreamSynchronize(s);
    ws.reset();
    for (void* p : ptrs) cudaFree(p);
    cudaStreamDestroy(s);
  }
  void* raw(size_t bytes) {
    void* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(bytes, 16)), cudaSuccess);
    ptrs.push_back(p);
    return p;
  }
  Tensor alloc(int64_t rows, int64_t cols, DType dt) {
    Tensor t{raw(static_cast<size_t>(rows * cols * dtype_size(dt))),
             rows,
             cols,
             cols,
             dt,
             Device::kCuda};
    EXPECT_EQ(cudaMemset(t.data, 0, rows * cols * dtype_size(dt)), cudaSuccess);
    return t;
  }
  Tensor upload(const std::vector<float>& v, int64_t rows, int64_t cols, DType dt) {
    Tensor t = alloc(rows, cols, dt);
    write(v, t);
    return t;
  }
  void write(const std::vector<float>& v, Tensor t) {
    if (t.dtype == DType::kF32) {
      EXPECT_EQ(cudaMemcpy(t.data, v.data(), v.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    } else {
      std::vector<uint16_t> b(v.size());
      for (size_t i = 0; i < v.size(); ++i) b[i] = f32_to_bf16(v[i]);
      EXPECT_EQ(cudaMemcpy(t.data, b.data(), b.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
    }
  }
  Tensor upload_i32(const std::vector<int32_t>& v, int64_t rows, int64_t cols) {
    Tensor t = alloc(rows, cols, DType::kI32);
    EXPECT_EQ(cudaMemcpy(t.data, v.data(), v.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    return t;
  }
  // NaN in f32 and bf16; 0x7f7f7f7f in i32.
  void poison(Tensor t) {
    EXPECT_EQ(cudaMemsetAsync(t.data, t.dtype == DType::kI32 ? 0x7f : 0xff,
                              t.rows * t.cols * t.elem_size(), s),
              cudaSuccess);
  }
  std::vector<float> read(Tensor t) {
    EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    std::vector<uint8_t> raw(static_cast<size_t>(t.numel() * t.elem_size()));
    EXPECT_EQ(cudaMemcpy(raw.data(), t.data, raw.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    std::vector<float> out(static_cast<size_t>(t.numel()));
    to_f32(t.dtype, raw.data(), out.data(), t.numel());
    return out;
  }
  std::vector<uint8_t> bits(Tensor t) {
    EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    std::vector<uint8_t> raw(static_cast<size_t>(t.numel() * t.elem_size()));
    EXPECT_EQ(cudaMemcpy(raw.data(), t.data, raw.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    return raw;
  }
  std::vector<int32_t> read_i32(Tensor t) {
    EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    std::vector<int32_t> out(static_cast<size_t>(t.numel()));
    EXPECT_EQ(cudaMemcpy(out.data(), t.data, out.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }
  // The step's metadata on the device; `b` must outlive the returned view.
  cuda::DevBatch batch(const BatchView& b) {
    cuda::DevBatch d;
    d.num_tokens = b.num_tokens;
    d.num_chunks = static_cast<int>(b.chunks.size());
    d.block_tokens = kBlockTokens;
    auto up = [&](const void* src, size_t bytes) {
      void* p = raw(bytes);
      if (bytes) {
        EXPECT_EQ(cudaMemcpy(p, src, bytes, cudaMemcpyHostToDevice), cudaSuccess);
      }
      return p;
    };
    d.token_ids = static_cast<const int32_t*>(up(b.token_ids.data(), b.token_ids.size() * 4));
    d.positions = static_cast<const int32_t*>(up(b.positions.data(), b.positions.size() * 4));
    d.chunk_of = static_cast<const int32_t*>(up(b.chunk_of.data(), b.chunk_of.size() * 4));
    d.chunks =
        static_cast<const SeqChunk*>(up(b.chunks.data(), b.chunks.size() * sizeof(SeqChunk)));
    d.block_tables =
        static_cast<const int32_t*>(up(b.block_tables.data(), b.block_tables.size() * 4));
    d.host = &b;
    return d;
  }
};

Tensor cpu_tensor(Backend& be, const std::vector<float>& v, int64_t rows, int64_t cols) {
  Tensor t = be.alloc(rows, cols, DType::kF32);
  be.from_host(v.data(), t);
  return t;
}

std::unique_ptr<Backend> make_cpu() {
  auto cpu = make_cpu_backend(2, 1);
  BackendLimits l;
  l.max_tokens = 1 << 16;
  l.max_seqs = 64;
  l.max_blocks = 1 << 16;
  l.block_tokens = kBlockTokens;
  cpu->reserve(l);
  return cpu;
}

// One sequence's part of a step.
struct Seq {
  int slot;
  int64_t start;
  int n;
};

// Each slot owns `per_slot` blocks of the pool, in a shuffled (non-identity) order.
struct Blocks {
  int slots, per_slot;
  std::vector<int32_t> ids;  // [slots * per_slot]
  Blocks(int slots_, int max_len, uint64_t seed)
      : slots(slots_), per_slot((max_len + kBlockTokens - 1) / kBlockTokens) {
    ids.resize(static_cast<size_t>(slots * per_slot));
    std::iota(ids.begin(), ids.end(), 0);
    std::mt19937_64 rng(seed);
    std::shuffle(ids.begin(), ids.end(), rng);
  }
  int64_t pool_rows(int ratio) const {
    return static_cast<int64_t>(slots) * per_slot * (kBlockTokens / ratio);
  }
};

BatchView make_batch(const std::vector<Seq>& seqs, const Blocks& bl) {
  BatchView b;
  for (const Seq& q : seqs) {
    SeqChunk ch;
    ch.slot = q.slot;
    ch.n_tokens = q.n;
    ch.start_pos = q.start;
    ch.offset = b.num_tokens;
    ch.block_table = static_cast<int32_t>(b.block_tables.size());
    ch.num_blocks = static_cast<int32_t>((q.start + q.n + kBlockTokens - 1) / kBlockTokens);
    EXPECT_LE(ch.num_blocks, bl.per_slot);
    for (int j = 0; j < ch.num_blocks; ++j)
      b.block_tables.push_back(bl.ids[q.slot * bl.per_slot + j]);
    for (int i = 0; i < q.n; ++i) {
      b.token_ids.push_back(0);
      b.positions.push_back(static_cast<int32_t>(q.start + i));
      b.chunk_of.push_back(static_cast<int32_t>(b.chunks.size()));
    }
    b.num_tokens += q.n;
    b.chunks.push_back(ch);
  }
  return b;
}

// Relative L2 over the finite entries; non-finite entries (the -inf gates) must match exactly.
double state_err(const std::vector<float>& gpu, const std::vector<float>& cpu) {
  EXPECT_EQ(gpu.size(), cpu.size());
  std::vector<float> a, b;
  for (size_t i = 0; i < gpu.size() && i < cpu.size(); ++i) {
    if (std::isfinite(cpu[i])) {
      a.push_back(gpu[i]);
      b.push_back(cpu[i]);
    } else if (!(gpu[i] == cpu[i])) {
      return INFINITY;
    }
  }
  return rel_l2(a, b);
}

std::vector<float> inv_freq(int rope_dim) {
  std::vector<float> f(rope_dim / 2);
  for (int i = 0; i < rope_dim / 2; ++i)
    f[i] = static_cast<float>(1.0 / std::pow(160000.0, 2.0 * i / rope_dim));
  return f;
}

// ---- window_update ----------------------------------------------------------------------------

void run_window_update(int W, int dh, DType kv_dt, DType ring_dt, const std::vector<Seq>& seqs,
                       int slots, int slack = 0) {
  Dev dev;
  auto cpu = make_cpu();
  Blocks bl(slots, 1 << 14, 1);
  BatchView b = make_batch(seqs, bl);
  cuda::DevBatch db = dev.batch(b);
  const int T = b.num_tokens;
  auto kv = round_bf16(random_vec(int64_t{T} * dh, 11));
  const int R = W + slack;
  auto ring0 = round_bf16(random_vec(int64_t{slots} * R * dh, 12));
  Tensor ring_c = cpu_tensor(*cpu, ring0, slots * R, dh);
  cpu->window_update(cpu_tensor(*cpu, kv, T, dh), W, R, b, ring_c);
  Tensor kv_g = dev.upload(kv, T, dh, kv_dt);
  Tensor ring_g = dev.upload(ring0, slots * R, dh, ring_dt);
  cuda::window_update(dev.s, kv_g, W, R, db, ring_g);
  auto want = read_f32(*cpu, ring_c);
  EXPECT_EQ(dev.read(ring_g), want);  // a copy: exact
}

TEST(CudaWindow, UpdateWrapsAndKeepsLastRows) {
  SP_REQUIRE_GPU();
  // Slot 2 wraps (positions past W), slot 0 gets more tokens than W, slot 1 one token.
  std::vector<Seq> seqs{{2, 13, 9}, {0, 0, 21}, {1, 5, 1}};
  run_window_update(8, 72, DType::kF32, DType::kF32, seqs, 3);
  run_window_update(8, 72, DType::kBF16, DType::kBF16, seqs, 3);
  run_window_update(8, 72, DType::kBF16, DType::kF32, seqs, 3);
  run_window_update(128, 512, DType::kBF16, DType::kBF16, {{0, 4000, 1}, {1, 0, 300}}, 2);
  // A ring with slack rows (speculative decoding): positions map modulo W + slack.
  run_window_update(8, 72, DType::kBF16, DType::kBF16, seqs, 3, 3);
}

// ---- compress ---------------------------------------------------------------------------------

struct CompressCase {
  int r, k, d, rope_dim;
  DType cache_dt;
  int slots;
  std::vector<std::vector<Seq>> steps;
  int slack = 0;  // extra ring rows (speculative tokens that may be dropped)
};

void run_compress(const CompressCase& c) {
  Dev dev;
  auto cpu = make_cpu();
  const int r = c.r, k = c.k, d = c.d, kd = k * d;
  int64_t max_len = 0;
  for (auto& st : c.steps)
    for (auto& q : st) max_len = std::max(max_len, q.start + q.n);
  Blocks bl(c.slots, static_cast<int>(max_len), 7);
  const int64_t pool = bl.pool_rows(r);
  // Weights.
  auto ape = random_vec(int64_t{r} * kd, 21, 0.5f);
  auto norm = random_vec(d, 22, 0.2f);
  for (auto& x : norm) x += 1.0f;
  auto freq = inv_freq(c.rope_dim);
  CompressorView wc, wg;
  wc.ape = cpu_tensor(*cpu, ape, r, kd);
  wc.norm = cpu_tensor(*cpu, norm, 1, d);
  wg.ape = dev.upload(ape, r, kd, DType::kF32);
  wg.norm = dev.upload(norm, 1, d, DType::kF32);
  RopeView rc{cpu_tensor(*cpu, freq, 1, c.rope_dim / 2), c.rope_dim};
  RopeView rg{dev.upload(freq, 1, c.rope_dim / 2, DType::kF32), c.rope_dim};
  const int R = k * r + c.slack;  // ring rows per slot
  CompressorArgs ac{&wc, &rc, r, k, d, 1e-6f, R}, ag{&wg, &rg, r, k, d, 1e-6f, R};
  // State: stale random values (as a reused slot would hold); both sides alike.
  auto buf0 = random_vec(int64_t{c.slots} * R * 2 * kd, 23);
  auto cache0 = round_bf16(random_vec(pool * d, 25));
  Tensor buf_c = cpu_tensor(*cpu, buf0, c.slots * R, 2 * kd);
  Tensor cache_c = cpu_tensor(*cpu, cache0, pool, d);
  Tensor buf_g = dev.upload(buf0, c.slots * R, 2 * kd, DType::kF32);
  Tensor cache_g = dev.upload(cache0, pool, d, c.cache_dt);
  const double tol = c.cache_dt == DType::kF32 ? 1e-5 : 1e-2;
  std::vector<BatchView> views;
  views.reserve(c.steps.size());
  for (size_t si = 0; si < c.steps.size(); ++si) {
    views.push_back(make_batch(c.steps[si], bl));
    const BatchView& b = views.back();
    cuda::DevBatch db = dev.batch(b);
    const int T = b.num_tokens;
    auto a = random_vec(int64_t{T} * kd, 100 + si);
    auto g = random_vec(int64_t{T} * kd, 200 + si, 2.0f);
    cpu->compress(cpu_tensor(*cpu, a, T, kd), cpu_tensor(*cpu, g, T, kd), ac, b, buf_c, cache_c);
    Tensor a_g = dev.upload(a, T, kd, DType::kF32), g_g = dev.upload(g, T, kd, DType::kF32);
    // Determinism: the step twice from the same state gives the same bits.
    auto sb = dev.bits(buf_g), sc = dev.bits(cache_g);
    cuda::compress(dev.s, *dev.ws, a_g, g_g, ag, db, buf_g, cache_g);
    auto b1 = dev.bits(buf_g), c1 = dev.bits(cache_g);
    CU(cudaMemcpy(buf_g.data, sb.data(), sb.size(), cudaMemcpyHostToDevice));
    CU(cudaMemcpy(cache_g.data, sc.data(), sc.size(), cudaMemcpyHostToDevice));
    cuda::compress(dev.s, *dev.ws, a_g, g_g, ag, db, buf_g, cache_g);
    EXPECT_EQ(dev.bits(buf_g), b1) << "step " << si;
    EXPECT_EQ(dev.bits(cache_g), c1) << "step " << si;
    const double eb = state_err(dev.read(buf_g), read_f32(*cpu, buf_c));
    const double ec = state_err(dev.read(cache_g), read_f32(*cpu, cache_c));
    EXPECT_LE(eb, 1e-6) << "buf, step " << si;
    EXPECT_LE(ec, tol) << "entries, step " << si;
    std::printf("compress r=%d k=%d d=%d %s step %zu: entries rel_l2 %.2e buf %.2e\n", r, k, d,
                c.cache_dt == DType::kF32 ? "f32" : "bf16", si, ec, eb);
  }
}

// Chunks ending mid-window and mid compression window, one-token steps, several sequences of
// different lengths, a slot reused by a new sequence (start_pos 0 again: the CSA reset).
std::vector<std::vector<Seq>> chunked_steps(int r) {
  return {{{1, 0, 7}, {0, 0, 2}, {3, 0, 3 * r + 1}},
          {{1, 7, 3}, {0, 2, 2 * r + 3}},
          {{1, 10, 1}, {0, 2 * r + 5, 1}, {3, 3 * r + 1, r - 1}},
          {{1, 11, 1}, {2, 0, 1}, {0, 2 * r + 6, 5 * r + 2}},
          {{3, 0, 2}, {2, 1, r + 2}, {1, 12, 4 * r}},
          {{3, 2, r}, {1, 12 + 4 * r, 1}}};
}

TEST(CudaCompress, CsaChunkedSmall) {
  SP_REQUIRE_GPU();
  run_compress({4, 2, 64, 16, DType::kF32, 4, chunked_steps(4)});
  run_compress({4, 2, 64, 16, DType::kBF16, 4, chunked_steps(4)});
}

// Speculative rollback: a sequence's next step starts up to `slack` positions before where the
// previous one ended (its last tokens were dropped), across window completions.
std::vector<std::vector<Seq>> rollback_steps(int r) {
  return {{{0, 0, 2 * r - 1}, {1, 0, r + 1}},
          {{0, 2 * r - 1, 3}, {1, r + 1, 3}},  // completes window 1 / 1, then more
          {{0, 2 * r - 1, 1}, {1, r + 2, 3}},  // drops 2 / 1: window 1 of seq 0 again
          {{0, 2 * r, 3}, {1, r + 4, 2}},
          {{0, 2 * r + 1, 2}, {1, r + 5, 1}}};
}

TEST(CudaCompress, RollbackWithSlack) {
  SP_REQUIRE_GPU();
  run_compress({4, 2, 64, 16, DType::kF32, 2, rollback_steps(4), 3});
  run_compress({8, 1, 48, 16, DType::kF32, 2, rollback_steps(8), 3});
}

TEST(CudaCompress, HcaChunkedSmall) {
  SP_REQUIRE_GPU();
  run_compress({8, 1, 48, 16, DType::kF32, 4, chunked_steps(8)});
  run_compress({8, 1, 48, 16, DType::kBF16, 4, chunked_steps(8)});
}

TEST(CudaCompress, FlashSizes) {
  SP_REQUIRE_GPU();
  // Main CSA compressor (512, ratio 4), indexer compressor (128), HCA (ratio 128).
  std::vector<std::vector<Seq>> csa{
      {{0, 0, 301}, {1, 0, 5}}, {{0, 301, 250}, {1, 5, 1}}, {{0, 551, 1}, {1, 6, 1}}};
  run_compress({4, 2, 512, 64, DType::kF32, 2, csa});
  run_compress({4, 2, 512, 64, DType::kBF16, 2, csa});
  run_compress({4, 2, 128, 64, DType::kBF16, 2, csa});
  std::vector<std::vector<Seq>> hca{
      {{0, 0, 300}, {1, 0, 130}}, {{0, 300, 212}, {1, 130, 1}}, {{0, 512, 1}, {1, 131, 125}}};
  run_compress({128, 1, 512, 64, DType::kF32, 2, hca});
  run_compress({128, 1, 512, 64, DType::kBF16, 2, hca});
}

// ---- indexer_topk -----------------------------------------------------------------------------

struct IndexerCase {
  int heads, dim, ratio, topk;
  DType dt;  // q and keys
  int slots;
  std::vector<Seq> seqs;
};

void run_indexer(const IndexerCase& c) {
  Dev dev;
  auto cpu = make_cpu();
  int64_t max_len = 0;
  for (auto& q : c.seqs) max_len = std::max(max_len, q.start + q.n);
  Blocks bl(c.slots, static_cast<int>(max_len), 9);
  BatchView b = make_batch(c.seqs, bl);
  cuda::DevBatch db = dev.batch(b);
  const int T = b.num_tokens, HD = c.heads * c.dim;
  const int64_t pool = bl.pool_rows(c.ratio);
  auto q = round_bf16(random_vec(int64_t{T} * HD, 31));
  auto keys = round_bf16(random_vec(pool * c.dim, 32));
  auto wt = round_bf16(random_vec(int64_t{T} * c.heads, 33));
  Tensor out_c = cpu->alloc(T, c.topk, DType::kI32);
  cpu->indexer_topk(cpu_tensor(*cpu, q, T, HD), cpu_tensor(*cpu, wt, T, c.heads), c.heads, c.dim,
                    c.ratio, c.topk, b, cpu_tensor(*cpu, keys, pool, c.dim), out_c);
  auto want = read_i32(*cpu, out_c);
  Tensor q_g = dev.upload(q, T, HD, c.dt), k_g = dev.upload(keys, pool, c.dim, c.dt);
  Tensor w_g = dev.upload(wt, T, c.heads, DType::kF32);
  Tensor out_g = dev.alloc(T, c.topk, DType::kI32);
  dev.poison(out_g);
  cuda::indexer_topk(dev.s, *dev.ws, q_g, w_g, c.heads, c.dim, c.ratio, c.topk, db, k_g, out_g);
  auto got = dev.read_i32(out_g);
  dev.poison(out_g);
  cuda::indexer_topk(dev.s, *dev.ws, q_g, w_g, c.heads, c.dim, c.ratio, c.topk, db, k_g, out_g);
  EXPECT_EQ(dev.read_i32(out_g), got) << "not deterministic";
  // Per token: the same count, sorted, -1 padded; set differences only between near-equal scores
  // (scores recomputed here in double).
  int swaps = 0, exact = 0;
  for (int t = 0; t < T; ++t) {
    const int n = (b.positions[t] + 1) / c.ratio, k = std::min(c.topk, n);
    const int32_t* g = &got[static_cast<size_t>(t) * c.topk];
    const int32_t* w = &want[static_cast<size_t>(t) * c.topk];
    for (int i = 0; i < c.topk; ++i) {
      if (i < k) {
        ASSERT_GE(g[i], 0) << "token " << t;
        ASSERT_LT(g[i], n) << "token " << t;
        if (i > 0) {
          ASSERT_LT(g[i - 1], g[i]) << "token " << t << " not ascending";
        }
      } else {
        ASSERT_EQ(g[i], -1) << "token " << t << " padding";
      }
    }
    std::set<int> gs(g, g + k), ws(w, w + k);
    if (gs == ws) {
      ++exact;
      continue;
    }
    const SeqChunk& ch = b.chunks[b.chunk_of[t]];
    std::vector<double> sc(n);
    double mx = 0;
    for (int e = 0; e < n; ++e) {
      const float* kr = &keys[entry_row(b, ch, e, c.ratio, kBlockTokens) * c.dim];
      double s = 0;
      for (int h = 0; h < c.heads; ++h) {
        double dot = 0;
        for (int d = 0; d < c.dim; ++d)
          dot += static_cast<double>(q[static_cast<size_t>(t) * HD + h * c.dim + d]) * kr[d];
        s += std::max(dot, 0.0) / std::sqrt(c.dim) * wt[t * c.heads + h] / std::sqrt(c.heads);
      }
      sc[e] = s;
      mx = std::max(mx, std::abs(s));
    }
    double kth = INFINITY;
    for (int x : ws) kth = std::min(kth, sc[x]);
    for (int x : gs)
      if (!ws.count(x)) {
        EXPECT_LE(std::abs(sc[x] - kth), 1e-6 * mx) << "token " << t << " entry " << x;
        ++swaps;
      }
    for (int x : ws)
      if (!gs.count(x)) {
        EXPECT_LE(std::abs(sc[x] - kth), 1e-6 * mx) << "token " << t;
      }
  }
  std::printf("indexer heads=%d dim=%d ratio=%d topk=%d: %d/%d tokens identical, %d tie swaps\n",
              c.heads, c.dim, c.ratio, c.topk, exact, T, swaps);
}

TEST(CudaIndexer, SmallOddSizes) {
  SP_REQUIRE_GPU();
  // Tokens with zero entries (positions < ratio - 1), top-k larger than the entries, and
  // chunked prefill next to decode tokens.
  run_indexer({3, 40, 4, 8, DType::kF32, 3, {{0, 0, 40}, {2, 2, 1}, {1, 100, 3}}});
  run_indexer({5, 24, 4, 16, DType::kBF16, 3, {{1, 0, 70}, {0, 60, 1}, {2, 3, 2}}});
  run_indexer({70, 32, 8, 5, DType::kF32, 2, {{0, 0, 100}, {1, 500, 1}}});
}

TEST(CudaIndexer, FlashSizes) {
  SP_REQUIRE_GPU();
  // 64 heads x 128, ratio 4, top-512: a prefill chunk at ~3K context plus decode tokens.
  run_indexer(
      {64, 128, 4, 512, DType::kBF16, 4, {{0, 2900, 64}, {1, 4000, 1}, {2, 1500, 1}, {3, 7, 1}}});
  run_indexer({64, 128, 4, 512, DType::kF32, 2, {{0, 3000, 8}, {1, 2200, 1}}});
}

// ---- attention --------------------------------------------------------------------------------

struct AttnCase {
  int H, dh, W, ratio;
  AttnKind kind;
  int topk;
  DType act, state;
  int slots;
  std::vector<Seq> seqs;
};

void run_attention(const AttnCase& c) {
  Dev dev;
  auto cpu = make_cpu();
  int64_t max_len = 0;
  for (auto& q : c.seqs) max_len = std::max(max_len, q.start + q.n);
  Blocks bl(c.slots, static_cast<int>(max_len), 5);
  BatchView b = make_batch(c.seqs, bl);
  cuda::DevBatch db = dev.batch(b);
  const int T = b.num_tokens, HD = c.H * c.dh;
  const int ratio = c.kind == AttnKind::kSliding ? 0 : c.ratio;
  const int64_t pool = ratio > 0 ? bl.pool_rows(ratio) : 0;
  auto q = round_bf16(random_vec(int64_t{T} * HD, 41));
  auto kv = round_bf16(random_vec(int64_t{T} * c.dh, 42));
  auto ring = round_bf16(random_vec(int64_t{c.slots} * c.W * c.dh, 43));
  auto cmp = round_bf16(random_vec(std::max<int64_t>(pool, 1) * c.dh, 44));
  auto sink = random_vec(c.H, 45);
  // CSA selection: sorted distinct visible entries, -1 padded (as the indexer writes it).
  std::vector<int32_t> sel(static_cast<size_t>(T) * std::max(1, c.topk), -1);
  std::mt19937_64 rng(46);
  if (c.kind == AttnKind::kCSA) {
    for (int t = 0; t < T; ++t) {
      const int n = (b.positions[t] + 1) / ratio, k = std::min(c.topk, n);
      std::vector<int32_t> all(n);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      std::sort(all.begin(), all.begin() + k);
      std::copy(all.begin(), all.begin() + k, sel.begin() + static_cast<size_t>(t) * c.topk);
    }
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.dh));
  // CPU.
  LayerState sc;
  sc.window = cpu_tensor(*cpu, ring, c.slots * c.W, c.dh);
  if (ratio > 0) sc.cmp = cpu_tensor(*cpu, cmp, pool, c.dh);
  Tensor sink_c = cpu_tensor(*cpu, sink, 1, c.H);
  Tensor sel_c = cpu->alloc(T, std::max(1, c.topk), DType::kI32);
  cpu->from_host(sel.data(), sel_c);
  Tensor o_c = cpu->alloc(T, HD, DType::kF32);
  AttentionArgs ac{c.H, c.dh, c.W, ratio, c.kind, scale, &sink_c, c.W};
  cpu->attention(cpu_tensor(*cpu, q, T, HD), cpu_tensor(*cpu, kv, T, c.dh), ac, b, sc,
                 c.kind == AttnKind::kCSA ? &sel_c : nullptr, o_c);
  auto want = read_f32(*cpu, o_c);
  // GPU.
  LayerState sg;
  sg.window = dev.upload(ring, c.slots * c.W, c.dh, c.state);
  if (ratio > 0) sg.cmp = dev.upload(cmp, pool, c.dh, c.state);
  Tensor sink_g = dev.upload(sink, 1, c.H, DType::kF32);
  Tensor sel_g = dev.upload_i32(sel, T, std::max(1, c.topk));
  Tensor q_g = dev.upload(q, T, HD, c.act), kv_g = dev.upload(kv, T, c.dh, c.act);
  Tensor o_g = dev.alloc(T, HD, c.act);
  AttentionArgs ag{c.H, c.dh, c.W, ratio, c.kind, scale, &sink_g, c.W};
  const Tensor* selp = c.kind == AttnKind::kCSA ? &sel_g : nullptr;
  dev.poison(o_g);
  cuda::attention(dev.s, *dev.ws, q_g, kv_g, ag, db, sg, selp, o_g);
  auto got = dev.read(o_g);
  auto bits = dev.bits(o_g);
  dev.poison(o_g);
  cuda::attention(dev.s, *dev.ws, q_g, kv_g, ag, db, sg, selp, o_g);
  EXPECT_EQ(dev.bits(o_g), bits) << "not deterministic";
  const double err = rel_l2(got, want);
  const bool all_f32 = c.act == DType::kF32 && c.state == DType::kF32;
  EXPECT_LE(err, all_f32 ? 1e-5 : 1e-2);
  static const char* kinds[] = {"SWA", "CSA", "HCA"};
  std::printf("attention %s H=%d dh=%d W=%d ratio=%d topk=%d act=%s state=%s T=%d: rel_l2 %.2e\n",
              kinds[static_cast<int>(c.kind)], c.H, c.dh, c.W, ratio, c.topk,
              c.act == DType::kF32 ? "f32" : "bf16", c.state == DType::kF32 ? "f32" : "bf16", T,
              err);
}

TEST(CudaAttention, OneToken) {
  SP_REQUIRE_GPU();
  run_attention({4, 64, 8, 0, AttnKind::kSliding, 0, DType::kF32, DType::kF32, 1, {{0, 0, 1}}});
  run_attention({4, 64, 8, 4, AttnKind::kHCA, 0, DType::kF32, DType::kF32, 1, {{0, 0, 1}}});
  run_attention({4, 64, 8, 4, AttnKind::kCSA, 6, DType::kF32, DType::kF32, 1, {{0, 0, 1}}});
}

TEST(CudaAttention, OddSizesWrapAndChunks) {
  SP_REQUIRE_GPU();
  // H not a multiple of 8, head_dim not a multiple of 8, window wrapping, chunks that start
  // mid-window (ring rows and this step's rows mixed), decode tokens beside a prefill chunk.
  const std::vector<Seq> seqs{{0, 0, 19}, {1, 37, 5}, {2, 101, 1}, {3, 3, 2}};
  for (DType act : {DType::kF32, DType::kBF16})
    for (DType st : {DType::kF32, DType::kBF16}) {
      run_attention({5, 72, 7, 0, AttnKind::kSliding, 0, act, st, 4, seqs});
      run_attention({5, 72, 7, 4, AttnKind::kHCA, 0, act, st, 4, seqs});
      run_attention({11, 200, 16, 4, AttnKind::kCSA, 9, act, st, 4, seqs});
    }
  // Zero compressed entries (every position below ratio - 1); top-k larger than the entries.
  run_attention(
      {3, 40, 8, 16, AttnKind::kHCA, 0, DType::kF32, DType::kF32, 2, {{0, 0, 15}, {1, 3, 2}}});
  run_attention(
      {3, 40, 8, 4, AttnKind::kCSA, 64, DType::kF32, DType::kF32, 2, {{0, 0, 30}, {1, 90, 1}}});
}

TEST(CudaAttention, FlashSizes) {
  SP_REQUIRE_GPU();
  // 64 heads x 512, window 128: CSA (ratio 4, top-512) and HCA (ratio 128); decode tokens at
  // different lengths plus a prefill chunk.
  const std::vector<Seq> seqs{{0, 2999, 1}, {1, 700, 1}, {2, 60, 1}, {3, 2048, 40}};
  run_attention({64, 512, 128, 4, AttnKind::kCSA, 512, DType::kBF16, DType::kBF16, 4, seqs});
  run_attention({64, 512, 128, 128, AttnKind::kHCA, 0, DType::kBF16, DType::kBF16, 4, seqs});
  run_attention({64, 512, 128, 4, AttnKind::kCSA, 512, DType::kF32, DType::kF32, 4, seqs});
  run_attention({64, 512, 128, 128, AttnKind::kHCA, 0, DType::kBF16, DType::kF32, 4, seqs});
  run_attention({64, 512, 128, 0, AttnKind::kSliding, 0, DType::kBF16, DType::kBF16, 4, seqs});
}

// Decode tokens whose rows are split over blocks and merged by the combine kernel (132 SMs: about
// 264 blocks): one CSA token of V4-Flash's shapes (20 splits, every one with rows), one HCA token
// at ratio 4 and position 3999 (36 tiles: 33 splits, 15 of them empty), two HCA tokens of very
// different lengths (17 splits, most of the short token's empty), a head_dim below the combine's
// block (72) with 5 splits.
TEST(CudaAttention, DecodeSplitsCombine) {
  SP_REQUIRE_GPU();
  run_attention(
      {64, 512, 128, 4, AttnKind::kCSA, 512, DType::kF32, DType::kF32, 1, {{0, 2999, 1}}});
  run_attention({64, 512, 128, 4, AttnKind::kHCA, 0, DType::kF32, DType::kF32, 1, {{0, 3999, 1}}});
  run_attention({64,
                 512,
                 128,
                 4,
                 AttnKind::kHCA,
                 0,
                 DType::kBF16,
                 DType::kBF16,
                 2,
                 {{0, 3999, 1}, {1, 10, 1}}});
  run_attention({5, 72, 7, 4, AttnKind::kHCA, 0, DType::kF32, DType::kF32, 1, {{0, 500, 1}}});
}

}  // namespace
}  // namespace sp::test
