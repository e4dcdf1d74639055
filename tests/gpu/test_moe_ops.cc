// Parity of the CUDA MoE (routing, routed experts, shared expert) against the CPU backend: hash and
// learned routing, small and V4-Flash shapes, f32 / bf16 activations, and bitwise determinism.
// Every expert path runs. Layers of FP4 routed / FP8 shared experts with E8M0 scales (V4-Flash's
// formats) have the tensor-core kernels on: by default the CUDA-core decode kernels take the
// experts of one token (all of them at T = 1), the tensor-core kernels (moe_decode.cu) those of
// 2..8 tokens (one n tile), of 9..64 tokens (up to 8 n tiles: the shared expert, which has every
// token, from T = 9 to 64; in steps of more than 64 tokens the prefill kernel's 64-token tiles)
// and of more (the prefill kernel, 128 x 128 block tiles: the shared
// expert from T = 65 on, routed experts at the small shape's T = 300, in FlashMixedPaths, whose
// gate bias sends every token to three hot experts, and in FlashPrefillTiles / FlashPrefill). With
// the tensor-core minimum at 1 (set_moe_tc_min_tokens) the experts of one token take the tensor
// cores too: the tests marked tc_min run both settings against the one CPU result (FlashWorkList
// and FlashPrefill: V4-Flash shapes with one hot expert, so one expert has every token while most
// others have one). ScaleRoutes gives some experts E8M0 scales outside the range of the bf16 scale
// multiply, so the fp32 route of the decode runs too. WithoutTensorCores gives the shared expert
// F32 scales, which leaves the layer to the decode kernels (up to 8 tokens) and the general
// kernels. Routing decisions are compared through the output: a different expert choice moves a
// token's output far beyond the bound (random scores have no ties within 1e-6 at these sizes).
#include <algorithm>
#include <cstdio>
#include <thread>

#include "backend/cuda/kernels.h"
#include "core/dtype.h"
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
  std::vector<float> f32_scales[3];  // the shared expert's scales as F32 (tc_off)
  std::vector<float> bias;
  std::vector<int32_t> tid2eid;
  MoeWeights cpu, gpu;
};

// hot: experts 0..hot-1 get a gate bias of 100 (learned routing picks them for every token).
// odd_scales: experts 1, 3, 5 and 7 (of the first 8) get scales of 2^-126, 2^1, 2^2 and 2^-125
// (E8M0 1, 128, 129, 2: both sides of each end of the bf16 multiply's exact range).
// tc_off: the shared expert's scales as F32 (the same values), which turns the tensor-core kernels
// off for the layer: the decode kernels take up to 8 tokens, the general kernels the rest.
// fp8_odd: the shared (FP8) expert's W2 scale blocks of rows 0..127, 128..255, 256.. get 2^7, 2^8
// and 2^9 (E8M0 134, 135, 136: the top of the bf16 multiply's exact range and past it), its W1
// column blocks 1 and 2 get 2^-117 and 2^-118 (E8M0 10, 9: the bottom of the range and past it).
// gate_dtype: the gate's storage (BF16 as released; F32 takes the decode gate's F32 variant).
// float_experts: BF16 routed experts (neither the decode nor the tensor-core kernels: the general
// ones), which allows a D that is not a multiple of 32 (or of 4: the combine's scalar path).
void build_layer(Backends& be, const MoeShape& s, uint64_t seed, int pool, MoeLayer& L, int hot = 0,
                 bool odd_scales = false, bool tc_off = false, bool fp8_odd = false,
                 DType gate_dtype = DType::kBF16, bool float_experts = false) {
  std::mt19937_64 rng(seed);
  const WeightFormat ef = float_experts ? WeightFormat::kFloat : WeightFormat::kFP4;
  for (int i = 0; i < pool; ++i) {
    L.pool_w13.push_back(random_matrix(ef, s.I, s.D, seed + 10 + i));
    L.pool_w2.push_back(random_matrix(ef, s.D, s.I, seed + 1000 + i));
  }
  L.gate = random_matrix(WeightFormat::kFloat, s.E, s.D, seed + 1, gate_dtype, 0.05f);
  L.sw1 = random_matrix(WeightFormat::kFP8, s.I, s.D, seed + 2);
  L.sw2 = random_matrix(WeightFormat::kFP8, s.D, s.I, seed + 3);
  L.sw3 = random_matrix(WeightFormat::kFP8, s.I, s.D, seed + 4);
  if (fp8_odd) {
    const uint8_t top[3] = {134, 135, 136}, bottom[2] = {10, 9};
    for (size_t i = 0; i < L.sw2.scale.size(); ++i)  // [ceil(D / 128), ceil(I / 128)]
      L.sw2.scale[i] = top[std::min<size_t>(i / L.sw2.m.scale_cols, 2)];
    for (size_t i = 0; i < L.sw1.scale.size(); ++i) {  // [ceil(I / 128), ceil(D / 128)]
      const size_t col = i % L.sw1.m.scale_cols;
      if (col >= 1) L.sw1.scale[i] = bottom[std::min<size_t>(col - 1, 1)];
    }
  }
  if (tc_off) {
    HostMatrix* sw[3] = {&L.sw1, &L.sw2, &L.sw3};
    for (int i = 0; i < 3; ++i) {
      for (uint8_t b : sw[i]->scale) L.f32_scales[i].push_back(e8m0_to_f32(b));
      sw[i]->m.scale = reinterpret_cast<const uint8_t*>(L.f32_scales[i].data());
      sw[i]->m.scale_dtype = DType::kF32;
    }
  }
  L.bias = random_vec(s.E, seed + 5, 0.05f);
  for (int e = 0; e < hot; ++e) L.bias[e] = 100.0f;
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
  if (odd_scales) {
    const uint8_t odd[4] = {1, 128, 129, 2};
    for (int i = 0; i < 4 && 2 * i + 1 < s.E; ++i)
      for (int m = 0; m < 3; ++m)
        for (size_t j = 0; j < L.scales[3 * (2 * i + 1) + m].size(); j += 3)
          L.scales[3 * (2 * i + 1) + m][j] = odd[i];  // every third group: mixed with normal ones
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
      if (!float_experts) {
        w1.scale = L.scales[3 * e].data();
        w2.scale = L.scales[3 * e + 1].data();
        w3.scale = L.scales[3 * e + 2].data();
      }
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

// tc_mins: the GPU runs once per entry with that tensor-core minimum (set_moe_tc_min_tokens), each
// against the one CPU result; empty: once with the backend's setting. gpu_out: the outputs of the
// GPU runs one after another.
double check_moe(Backends& be, MoeLayer& L, const MoeShape& s, int T, DType xd, DType yd,
                 uint64_t seed, std::vector<float>* gpu_out = nullptr,
                 std::vector<int> tc_mins = {}) {
  BatchView b = batch_of(T, s.vocab, seed);
  be.cpu->begin_step(b);
  be.gpu->begin_step(b);
  auto xv = random_vec(int64_t{T} * s.D, seed + 1, 1.0f);
  if (xd == DType::kBF16) xv = round_bf16(xv);
  Tensor xc = make_tensor(*be.cpu, xv, T, s.D, DType::kF32);
  Tensor xg = make_tensor(*be.gpu, xv, T, s.D, xd);
  Tensor yc = be.cpu->alloc(T, s.D, DType::kF32);
  const float routed_scale = 1.5f, limit = 10.0f;
  MoeArgs ac{&L.cpu, s.K, routed_scale, limit};
  MoeArgs ag{&L.gpu, s.K, routed_scale, limit};
  be.cpu->moe(xc, ac, b, yc);
  auto ref = read_f32(*be.cpu, yc);
  if (yd == DType::kBF16) ref = round_bf16(ref);
  if (tc_mins.empty()) tc_mins.push_back(0);
  if (gpu_out) gpu_out->clear();
  double worst = 0.0;
  for (int tc_min : tc_mins) {
    if (tc_min > 0) cuda::set_moe_tc_min_tokens(*be.gpu, tc_min);
    Tensor yg =
        make_tensor(*be.gpu, std::vector<float>(static_cast<size_t>(T) * s.D, NAN), T, s.D, yd);
    be.gpu->moe(xg, ag, b, yg);
    be.gpu->synchronize();
    auto got = read_f32(*be.gpu, yg);
    int64_t unwritten = 0;
    for (float v : got) unwritten += std::isfinite(v) ? 0 : 1;
    const double err = rel_l2(got, ref);
    // fp32 output: experts of two or more tokens run on the tensor cores with each fp32
    // activation split into bf16 hi + lo (about 2^-17 relative), through two chained projections
    // and SwiGLU: up to ~2e-5 measured on an H200 at awkward scales, so 3e-5 here (fp32 ops
    // elsewhere: 1e-5).
    const double tol = yd == DType::kBF16 ? 1e-2 : 3e-5;
    std::printf("  moe E=%d D=%d I=%d K=%d %s T=%-4d x=%s y=%s tc_min=%d  rel_l2=%.3g\n", s.E, s.D,
                s.I, s.K, s.hash ? "hash   " : "learned", T, dtype_name(xd), dtype_name(yd), tc_min,
                err);
    EXPECT_EQ(unwritten, 0) << "T=" << T << " tc_min=" << tc_min;
    EXPECT_LE(err, tol) << (s.hash ? "hash" : "learned") << " T=" << T << " x=" << dtype_name(xd)
                        << " y=" << dtype_name(yd) << " tc_min=" << tc_min;
    worst = std::max(worst, err);
    if (gpu_out) gpu_out->insert(gpu_out->end(), got.begin(), got.end());
  }
  if (tc_mins.back() > 0) cuda::set_moe_tc_min_tokens(*be.gpu, cuda::kMoeTcMinTokens);
  return worst;
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
        for (DType yd : {DType::kF32, DType::kBF16})
          check_moe(be, L, s, T, xd, yd, seed++, nullptr, {2, 1});
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

// Experts above the tensor-core kernels' 64 tokens next to experts below it, at V4-Flash shapes:
// three hot experts take every token (T of them each), the other three choices spread over the
// remaining 253 experts (1, 2..8 or a few more tokens each).
TEST(CudaMoe, FlashMixedPaths) {
  SP_REQUIRE_GPU();
  Backends be;
  use_fast_cpu(be);
  MoeShape s{256, 4096, 2048, 6, false, 4096};
  MoeLayer L;
  build_layer(be, s, 23, 8, L, 3);
  for (int T : {9, 40, 64, 65, 100}) {
    check_moe(be, L, s, T, DType::kF32, DType::kF32, 900 + T);
    check_moe(be, L, s, T, DType::kBF16, DType::kBF16, 1000 + T);
  }
}

// The work list of the tensor-core kernels at V4-Flash shapes with a skewed gate (expert 0 takes
// every token; the other five choices spread over 255 experts: mostly one token each, a few more
// at T = 300), each T with the one-token experts on the decode kernels (tc_min 2) and on the
// tensor cores (1), against one CPU result: T = 1 (the tensor cores at one token), 2 and 3 (one n
// tile), 17 (the hot and the shared expert: 3 n tiles), 64, 65 (two token groups of the hot and
// the shared expert, the second of one token), 300 (five groups, the last of 44 tokens; routed
// experts in all three ranges); then the bits of T = 300, two runs with each minimum.
TEST(CudaMoe, FlashWorkList) {
  SP_REQUIRE_GPU();
  Backends be;
  use_fast_cpu(be);
  MoeShape s{256, 4096, 2048, 6, false, 4096};
  MoeLayer L;
  build_layer(be, s, 24, 8, L, 1);
  for (int T : {1, 2, 3, 17, 64, 65, 300})
    check_moe(be, L, s, T, DType::kF32, DType::kF32, 1500 + T, nullptr, {2, 1});
  for (int T : {1, 3, 65, 300})
    check_moe(be, L, s, T, DType::kBF16, DType::kBF16, 1600 + T, nullptr, {2, 1});
  std::vector<float> r;  // four runs: tc_min 2 twice, then 1 twice
  check_moe(be, L, s, 300, DType::kBF16, DType::kF32, 1700, &r, {2, 2, 1, 1});
  const size_t n = size_t{300} * s.D;
  ASSERT_EQ(r.size(), 4 * n);
  EXPECT_EQ(std::memcmp(r.data(), r.data() + n, n * sizeof(float)), 0) << "tc_min 2";
  EXPECT_EQ(std::memcmp(r.data() + 2 * n, r.data() + 3 * n, n * sizeof(float)), 0) << "tc_min 1";
}

// A prefill step of 4,096 tokens at V4-Flash shapes (four chunks of 1,024 tokens): the hot expert
// and the shared expert take 16 groups of 64 tokens each per chunk, spread with the other experts'
// items over the persistent blocks; bf16 activations, both minimums, and the bits twice.
TEST(CudaMoe, FlashPrefill) {
  SP_REQUIRE_GPU();
  Backends be;
  use_fast_cpu(be);
  MoeShape s{256, 4096, 2048, 6, false, 4096};
  MoeLayer L;
  build_layer(be, s, 25, 8, L, 1);
  std::vector<float> r;  // three runs: tc_min 2, then 1 twice
  check_moe(be, L, s, 4096, DType::kBF16, DType::kBF16, 1800, &r, {2, 1, 1});
  const size_t n = size_t{4096} * s.D;
  ASSERT_EQ(r.size(), 3 * n);
  EXPECT_EQ(std::memcmp(r.data() + n, r.data() + 2 * n, n * sizeof(float)), 0);
}

// The prefill kernel (experts of more than 64 tokens: 128-row x 128-token block tiles) at V4-Flash
// shapes with a skewed gate (expert 0 and the shared expert take every token, most others one):
// T = 65 (one partial token group), 129 (two, the second of one token), 300 (three, the last of
// 44), f32 / bf16 activations and outputs (every pairing at T = 129), tc_min 2 and 1 (the work
// lists of the other ranges beside it); a layer without a hot expert at T = 600 (the routed experts
// of 9..64 tokens in the 64-token tiles of a prefill step); then the bits of T = 129 with f32
// tokens (the hi + lo MMAs), twice.
TEST(CudaMoe, FlashPrefillTiles) {
  SP_REQUIRE_GPU();
  Backends be;
  use_fast_cpu(be);
  MoeShape s{256, 4096, 2048, 6, false, 4096};
  MoeLayer L;
  build_layer(be, s, 26, 8, L, 1);
  uint64_t seed = 2000;
  for (int T : {65, 129, 300})
    for (DType xd : {DType::kF32, DType::kBF16})
      for (DType yd : {DType::kF32, DType::kBF16})
        if (T == 129 || xd == yd) check_moe(be, L, s, T, xd, yd, seed++, nullptr, {2, 1});
  // No hot expert at T = 600: ~14 tokens per routed expert, most of them in 64-token tiles.
  MoeLayer L2;
  build_layer(be, s, 28, 8, L2);
  check_moe(be, L2, s, 600, DType::kF32, DType::kF32, 2050, nullptr, {2, 1});
  check_moe(be, L2, s, 600, DType::kBF16, DType::kBF16, 2051, nullptr, {2, 1});
  std::vector<float> r;
  check_moe(be, L, s, 129, DType::kF32, DType::kF32, 2100, &r, {1, 1});
  const size_t n = size_t{129} * s.D;
  ASSERT_EQ(r.size(), 2 * n);
  EXPECT_EQ(std::memcmp(r.data(), r.data() + n, n * sizeof(float)), 0);
}

// The 4,096-token prefill step with f32 activations and output (the prefill kernel's hi + lo
// MMAs at the fp32 bound), both minimums.
TEST(CudaMoe, FlashPrefillF32) {
  SP_REQUIRE_GPU();
  Backends be;
  use_fast_cpu(be);
  MoeShape s{256, 4096, 2048, 6, false, 4096};
  MoeLayer L;
  build_layer(be, s, 27, 8, L, 1);
  check_moe(be, L, s, 4096, DType::kF32, DType::kF32, 2200, nullptr, {2, 1});
}

// Scales outside the exact range of the bf16 scale multiply take the fp32 route of the decode (the
// CUDA-core kernels and the tensor-core kernels both): T = 1 (decode kernels), 3 and 12 (tensor
// cores, one and two n tiles; T = 1 on the tensor cores too with the minimum at 1: tc_min), 70
// and 140 (the prefill kernel: one and two token groups); every token goes to the odd experts
// through hash routing.
TEST(CudaMoe, ScaleRoutes) {
  SP_REQUIRE_GPU();
  Backends be;
  MoeShape s{16, 320, 96, 4, true, 500};
  MoeLayer L;
  build_layer(be, s, 41, 4, L, 0, true);
  for (int v = 0; v < s.vocab; ++v)
    for (int j = 0; j < s.K; ++j) L.tid2eid[static_cast<size_t>(v) * s.K + j] = 2 * j + 1;
  for (MoeWeights* mw : {&L.cpu, &L.gpu}) {
    Backend& b = mw == &L.cpu ? *be.cpu : *be.gpu;
    mw->tid2eid = b.upload(Tensor::of(L.tid2eid.data(), s.vocab, s.K, DType::kI32));
  }
  uint64_t seed = 1100;
  for (int T : {1, 3, 12, 70, 140})
    for (DType xd : {DType::kF32, DType::kBF16})
      check_moe(be, L, s, T, xd, DType::kF32, seed++, nullptr, {2, 1});
}

// The FP8 (shared) expert's scales outside the bf16 multiply's exact range take the fp32 route too
// (its output, scaled up by 2^7..2^9, dominates the layer's here): T = 1 (decode kernels), 3, 12
// and 70 (tensor cores: one n tile, two, and more than 64 tokens); tc_min 2 and 1.
TEST(CudaMoe, ScaleRoutesFp8) {
  SP_REQUIRE_GPU();
  Backends be;
  MoeShape s{16, 320, 96, 4, false, 500};
  MoeLayer L;
  build_layer(be, s, 61, 4, L, 0, false, false, true);
  uint64_t seed = 1300;
  for (int T : {1, 3, 12, 70})
    for (DType xd : {DType::kF32, DType::kBF16})
      check_moe(be, L, s, T, xd, DType::kF32, seed++, nullptr, {2, 1});
}

// A layer the tensor-core kernels do not take (F32 scales on the shared expert): the decode kernels
// up to 8 tokens, the general kernels beyond, as before them.
TEST(CudaMoe, WithoutTensorCores) {
  SP_REQUIRE_GPU();
  Backends be;
  MoeShape s{16, 320, 96, 4, false, 500};
  MoeLayer L;
  build_layer(be, s, 51, 4, L, 0, false, true);
  uint64_t seed = 1200;
  for (int T : {1, 3, 9, 64, 300})
    for (DType xd : {DType::kF32, DType::kBF16}) check_moe(be, L, s, T, xd, DType::kF32, seed++);
  std::vector<float> a, b;  // the general kernels' bits, twice
  check_moe(be, L, s, 64, DType::kBF16, DType::kF32, 5, &a);
  check_moe(be, L, s, 64, DType::kBF16, DType::kF32, 5, &b);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
}

TEST(CudaMoe, Deterministic) {
  SP_REQUIRE_GPU();
  Backends be;
  MoeShape s{32, 256, 128, 6, false, 100};
  MoeLayer L;
  build_layer(be, s, 31, 4, L);
  // Tensor cores: 2..8, 9..64 and > 64 tokens (the prefill kernel; at 200 the shared expert in
  // two token groups).
  for (int T : {3, 33, 64, 100, 200}) {
    std::vector<float> a, b;
    check_moe(be, L, s, T, DType::kBF16, DType::kF32, 5, &a);
    check_moe(be, L, s, T, DType::kBF16, DType::kF32, 5, &b);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "T=" << T;
  }
  for (int T : {1, 3, 100}) {  // one-token experts on the tensor cores too: two runs
    std::vector<float> r;
    check_moe(be, L, s, T, DType::kBF16, DType::kF32, 6, &r, {1, 1});
    const size_t n = static_cast<size_t>(T) * s.D;
    ASSERT_EQ(r.size(), 2 * n);
    EXPECT_EQ(std::memcmp(r.data(), r.data() + n, n * sizeof(float)), 0) << "T=" << T;
  }
}

// The decode gate (T <= 8: the gate GEMV over (row groups of 8, K slices of at most 128 chunks),
// the routing and the sort in its last block) at the shapes that change its grid, next to the
// T > 8 paths: V4-Flash's gate in F32 (1,024 chunks a row: 8 slices), V4-Pro's E and D (384 x
// 7168 bf16: 7 slices of 128 chunks, 48 row groups), E = 20 (a last row group of 4 rows), a
// one-slice gate and two gates whose last K slice is short; learned and hash routing; identical
// bits run twice.
TEST(CudaMoe, DecodeGateSlices) {
  SP_REQUIRE_GPU();
  Backends be;
  use_fast_cpu(be);
  struct Case {
    MoeShape s;
    DType gate;
  };
  const Case cases[] = {
      {{256, 4096, 256, 6, false, 4096}, DType::kF32},
      {{256, 4096, 256, 6, true, 4096}, DType::kF32},
      {{384, 7168, 256, 6, false, 4096}, DType::kBF16},
      {{20, 320, 96, 4, false, 500}, DType::kBF16},
      {{20, 320, 96, 4, true, 500}, DType::kF32},
      {{16, 64, 64, 2, false, 100}, DType::kBF16},
      {{32, 2080, 96, 4, false, 500}, DType::kBF16},  // 260 chunks: slices of 87, 87, 86
      {{32, 4160, 96, 4, true, 500}, DType::kF32},    // 1,040 chunks: 9 of 116, the last 112
  };
  uint64_t seed = 1400;
  for (const Case& c : cases) {
    MoeLayer L;
    build_layer(be, c.s, seed, 4, L, 0, false, false, false, c.gate);
    for (int T : {1, 2, 3, 8, 17, 64, 300}) {
      check_moe(be, L, c.s, T, DType::kF32, DType::kF32, seed + T);
      check_moe(be, L, c.s, T, DType::kBF16, DType::kBF16, seed + 1000 + T);
    }
    for (int T : {1, 8}) {  // bits run twice
      std::vector<float> a, b;
      check_moe(be, L, c.s, T, DType::kBF16, DType::kF32, seed + 7, &a);
      check_moe(be, L, c.s, T, DType::kBF16, DType::kF32, seed + 7, &b);
      ASSERT_EQ(a.size(), b.size());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "T=" << T;
    }
    seed += 100;
  }
}

// The combine's scalar path (D = 90, not a multiple of 4: BF16 routed experts on the general
// kernels; the gate rows are not 16-byte aligned either, so up to 64 tokens the gate is linear()
// and the one-block route and sort) next to its vector path at D = 96 (where the decode gate
// takes T <= 8).
TEST(CudaMoe, CombineScalarAndVectorColumns) {
  SP_REQUIRE_GPU();
  Backends be;
  uint64_t seed = 1700;
  for (int D : {90, 96, 1030, 1056}) {  // 1030 / 1056: three column tiles, the last one short
    MoeShape s{12, D, 40, 3, false, 300};
    MoeLayer L;
    build_layer(be, s, seed, 3, L, 0, false, false, false, DType::kBF16, true);
    for (int T : {1, 2, 3, 17, 64, 300})
      for (DType yd : {DType::kF32, DType::kBF16})
        check_moe(be, L, s, T, DType::kF32, yd, seed + T);
    std::vector<float> a, b;
    check_moe(be, L, s, 3, DType::kBF16, DType::kF32, seed + 5, &a);
    check_moe(be, L, s, 3, DType::kBF16, DType::kF32, seed + 5, &b);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
    seed += 100;
  }
}

}  // namespace
}  // namespace sp::test
