// Parity of the CUDA MoE (routing, routed experts, shared expert) against the CPU backend: hash and
// learned routing, small and V4-Flash shapes, f32 / bf16 activations, and bitwise determinism.
// Both expert paths run: the decode kernels take every expert of at most 8 tokens (all of them at
// T <= 8), the general kernels the rest (the shared expert, which has every token, from T = 9 on;
// routed experts too at the small shape's T = 64 and 300).
// Routing decisions are compared through the output: a different expert choice moves a token's
// output far beyond the bound (random scores have no ties within 1e-6 at these sizes).
#include <algorithm>
#include <cstdio>
#include <thread>

#include "tests/gpu/op_harness.h"

namespace sp::test {
namespace {

struct MoeShape {
  int E, D, I, K;
  bool hash;
  int vocab;
};

// Host weights of one MoE layer and their uploads to both backends. Routed experts are FP4 (E8M0)
// and the shared expert FP8, as in V4-Flash. Value bytes of the routed experts come from a pool of
// `pool` buffers (cheap at Flash sizes); every expert has its own scales, so experts differ.
struct MoeLayer {
  std::vector<HostMatrix> pool_w13, pool_w2;
  std::vector<std::vector<uint8_t>> scales;  // per expert: w1, w2, w3
  HostMatrix gate, sw1, sw2, sw3;
  std::vector<float> bias;
  std::vector<int32_t> tid2eid;
  MoeWeights cpu, gpu;
};

void build_layer(Backends& be, const MoeShape& s, uint64_t seed, int pool, MoeLayer& L) {
  std::mt19937_64 rng(seed);
  for (int i = 0; i < pool; ++i) {
    L.pool_w13.push_back(random_matrix(WeightFormat::kFP4, s.I, s.D, seed + 10 + i));
    L.pool_w2.push_back(random_matrix(WeightFormat::kFP4, s.D, s.I, seed + 1000 + i));
  }
  L.gate = random_matrix(WeightFormat::kFloat, s.E, s.D, seed + 1, DType::kBF16, 0.05f);
  L.sw1 = random_matrix(WeightFormat::kFP8, s.I, s.D, seed + 2);
  L.sw2 = random_matrix(WeightFormat::kFP8, s.D, s.I, seed + 3);
  L.sw3 = random_matrix(WeightFormat::kFP8, s.I, s.D, seed + 4);
  L.bias = random_vec(s.E, seed + 5, 0.05f);
  L.tid2eid.resize(static_cast<size_t>(s.vocab) * s.K);
  for (int v = 0; v < s.vocab; ++v) {
    std::vector<int> perm(s.E);
    for (int e = 0; e < s.E; ++e) perm[e] = e;
    for (int j = 0; j < s.K; ++j) {
      std::swap(perm[j], perm[j + rng() % (s.E - j)]);
      L.tid2eid[static_cast<size_t>(v) * s.K + j] = perm[j];
    }
  }
  L.scales.resize(static_cast<size_t>(s.E) * 3);
  for (auto& sc : L.scales) {
    sc.resize(static_cast<size_t>(s.I) * s.D / 32);  // w1, w3: [I, D/32]; w2: [D, I/32]
    for (auto& b : sc) b = static_cast<uint8_t>(127 - 6 + rng() % 3);
  }
  for (MoeWeights* mw : {&L.cpu, &L.gpu}) {
    Backend& b = mw == &L.cpu ? *be.cpu : *be.gpu;
    mw->kind = s.hash ? MlpKind::kHashMoe : MlpKind::kMoe;
    mw->gate = b.upload(L.gate.m);
    mw->gate_bias = b.upload(Tensor::of(L.bias.data(), 1, s.E));
    mw->tid2eid = b.upload(Tensor::of(L.tid2eid.data(), s.vocab, s.K, DType::kI32));
    for (int e = 0; e < s.E; ++e) {
      Matrix w1 = L.pool_w13[e % pool].m, w3 = L.pool_w13[(e + 1) % pool].m,
             w2 = L.pool_w2[e % pool].m;
      w1.scale = L.scales[3 * e].data();
      w2.scale = L.scales[3 * e + 1].data();
      w3.scale = L.scales[3 * e + 2].data();
      mw->w1.push_back(b.upload(w1));
      mw->w2.push_back(b.upload(w2));
      mw->w3.push_back(b.upload(w3));
    }
    mw->sw1 = b.upload(L.sw1.m);
    mw->sw2 = b.upload(L.sw2.m);
    mw->sw3 = b.upload(L.sw3.m);
    b.prepare_moe(*mw);
  }
}

// The CPU oracle with the machine's threads (its results do not depend on the thread count): the
// V4-Flash cases are ~100 G multiply-adds.
void use_fast_cpu(Backends& be) {
  const int n = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 2, 16);
  be.cpu = make_cpu_backend(n);
  be.cpu->reserve(Backends::default_limits());
}

BatchView batch_of(int T, int vocab, uint64_t seed) {
  BatchView b;
  b.num_tokens = T;
  std::mt19937_64 rng(seed);
  for (int t = 0; t < T; ++t) {
    b.token_ids.push_back(static_cast<int32_t>(rng() % vocab));
    b.positions.push_back(t);
    b.chunk_of.push_back(0);
  }
  SeqChunk ch;
  ch.n_tokens = T;
  ch.num_blocks = 1;
  b.chunks.push_back(ch);
  b.block_tables.push_back(0);
  return b;
}

double check_moe(Backends& be, MoeLayer& L, const MoeShape& s, int T, DType xd, DType yd,
                 uint64_t seed, std::vector<float>* gpu_out = nullptr) {
  BatchView b = batch_of(T, s.vocab, seed);
  be.cpu->begin_step(b);
  be.gpu->begin_step(b);
  auto xv = random_vec(int64_t{T} * s.D, seed + 1, 1.0f);
  if (xd == DType::kBF16) xv = round_bf16(xv);
  Tensor xc = make_tensor(*be.cpu, xv, T, s.D, DType::kF32);
  Tensor xg = make_tensor(*be.gpu, xv, T, s.D, xd);
  Tensor yc = be.cpu->alloc(T, s.D, DType::kF32);
  Tensor yg =
      make_tensor(*be.gpu, std::vector<float>(static_cast<size_t>(T) * s.D, NAN), T, s.D, yd);
  const float routed_scale = 1.5f, limit = 10.0f;
  MoeArgs ac{&L.cpu, s.K, routed_scale, limit};
  MoeArgs ag{&L.gpu, s.K, routed_scale, limit};
  be.cpu->moe(xc, ac, b, yc);
  be.gpu->moe(xg, ag, b, yg);
  be.gpu->synchronize();
  auto ref = read_f32(*be.cpu, yc);
  auto got = read_f32(*be.gpu, yg);
  if (yd == DType::kBF16) ref = round_bf16(ref);
  int64_t unwritten = 0;
  for (float v : got) unwritten += std::isfinite(v) ? 0 : 1;
  const double err = rel_l2(got, ref);
  const double tol = yd == DType::kBF16 ? 1e-2 : 1e-5;
  std::printf("  moe E=%d D=%d I=%d K=%d %s T=%-4d x=%s y=%s  rel_l2=%.3g\n", s.E, s.D, s.I, s.K,
              s.hash ? "hash   " : "learned", T, dtype_name(xd), dtype_name(yd), err);
  EXPECT_EQ(unwritten, 0) << "T=" << T;
  EXPECT_LE(err, tol) << (s.hash ? "hash" : "learned") << " T=" << T << " x=" << dtype_name(xd)
                      << " y=" << dtype_name(yd);
  if (gpu_out) *gpu_out = std::move(got);
  return err;
}

TEST(CudaMoe, SmallHashAndLearned) {
  SP_REQUIRE_GPU();
  Backends be;
  // D and I not multiples of 128 (the FP8 shared expert has partial blocks); D = 320 is 10 FP4
  // chunks a row, so most lanes of the decode kernels' warps have no chunk.
  for (bool hash : {false, true}) {
    MoeShape s{16, 320, 96, 4, hash, 500};
    MoeLayer L;
    build_layer(be, s, hash ? 11 : 12, 4, L);
    uint64_t seed = 100;
    for (int T : {1, 2, 3, 5, 9, 64, 300})
      for (DType xd : {DType::kF32, DType::kBF16})
        for (DType yd : {DType::kF32, DType::kBF16}) check_moe(be, L, s, T, xd, yd, seed++);
  }
}

TEST(CudaMoe, FlashSized) {
  SP_REQUIRE_GPU();
  Backends be;
  use_fast_cpu(be);
  for (bool hash : {false, true}) {
    MoeShape s{256, 4096, 2048, 6, hash, 4096};
    MoeLayer L;
    build_layer(be, s, hash ? 21 : 22, 8, L);
    for (int T : {1, 2, 3, 8, 33, 64}) {
      check_moe(be, L, s, T, DType::kF32, DType::kF32, 600 + T);
      check_moe(be, L, s, T, DType::kBF16, DType::kBF16, 700 + T);
    }
    check_moe(be, L, s, 1, DType::kBF16, DType::kF32, 801);
    check_moe(be, L, s, 8, DType::kF32, DType::kBF16, 808);
  }
}

TEST(CudaMoe, Deterministic) {
  SP_REQUIRE_GPU();
  Backends be;
  MoeShape s{32, 256, 128, 6, false, 100};
  MoeLayer L;
  build_layer(be, s, 31, 4, L);
  for (int T : {3, 64}) {  // decode kernels only; both paths
    std::vector<float> a, b;
    check_moe(be, L, s, T, DType::kBF16, DType::kF32, 5, &a);
    check_moe(be, L, s, T, DType::kBF16, DType::kF32, 5, &b);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "T=" << T;
  }
}

}  // namespace
}  // namespace sp::test
