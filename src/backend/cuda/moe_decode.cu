// Tensor-core kernels for the routed and shared experts of min_tok tokens and more (decode steps,
// speculative verify steps, prefill). Two kernels: the split-K kernel below (moe_tc_kernel, for
// the experts of a few tokens: bandwidth) and the prefill kernel (moe_pf_kernel, "The prefill
// kernel" further down: shared-memory block tiles of 128 rows x 128 or 64 tokens) for the experts
// of more than 64 tokens, and of 9..64 in steps of more than 64 tokens.
//
// The expert's weight rows are the M side of mma.sync m16n8k16 (bf16 operands, fp32 accumulate),
// its tokens the N side in tiles of 8 (up to 8 tiles; more tokens go 64 at a time, the weight
// tile re-read from L2 for each group). A warp owns a 16-row tile (of W1 and W3 for the up kernel,
// of W2 for the down kernel) and half of K; lane (g, q) streams the 16-byte chunks q, q + 4, ... of
// rows g and g + 8 (FP4: 32 values, FP8: 16 values, one scale each) with the next step's chunks in
// flight, decodes them to bf16 pairs by integer bit moves and one bf16x2 multiply by the scale
// (fp_bits.h), and uses them as the A fragments of 8 (FP4) or 4 (FP8) MMAs. The k order inside a
// step is a permutation of the real k: every lane supplies the A and the B values of the same
// virtual k, so the activations are read at the lane's own chunk, staged in the decoders' pair
// order (stage_pos). Each weight byte is read from memory once per step.
//
// Activations are exact through the split x = hi + lo (two bf16, two MMAs into one fp32
// accumulator; about 2.5e-6 relative, as the projections' skinny kernel): the tokens are staged
// once per step (tc_stage_kernel), h is written by the up kernel as hi + lo directly.
//
// Fixed reduction order: the two warps of a row tile (the two halves of K's steps, interleaved)
// add through shared memory, lower half first; no float atomics.
//
// Work list: a launch takes the experts whose token count is in its range (min_tok..8: one n
// tile; 9..64: up to 8; more: the prefill kernel's) and cuts each into items of one 64-row tile x
// one group of up to 8 NT tokens, ordered (expert, row tile, token group), so the token groups of
// one weight tile are neighbours (blocks running at once share its reads through L2). Each block
// builds the list from the sorted step metadata on the device (the in-range experts in ascending
// id with the index of their first item: a scan in shared memory). Persistent blocks (as many as
// are resident at once) take item blockIdx.x first, then the next unclaimed one (an integer
// counter per launch, zeroed by the staging kernel of the same call), so a block that starts late
// (SMs busy with other work) or gets cheap items takes fewer; a binary search over the list finds
// an item's expert. The grid depends on T and the shapes only (CUDA graphs replay it) and every
// item does the same arithmetic in whichever block runs it, so the bits depend neither on the
// routing's spread nor on the claiming order.
#include <algorithm>
#include <limits>

#include "backend/cuda/fp_bits.h"
#include "backend/cuda/moe_decode.cuh"

namespace sp::cuda {
namespace {

constexpr int kTcThreads = 256, kTcWarps = kTcThreads / 32;
constexpr int kTcKParts = 2;                              // warps splitting a row tile's K
constexpr int kTcTileRows = 16 * (kTcWarps / kTcKParts);  // rows of a block tile (64)
constexpr int kTcAhead = 8;   // steps a warp prefetches into L2 ahead of its loads (even: its own)
constexpr int kTcClaims = 8;  // work-list counters of one moe_tc call (2 passes x 3 ranges used)

struct TcArgs {
  const DevExpert* tab = nullptr;
  const int* meta = nullptr;
  const int* pairs = nullptr;
  int T = 0, K = 0, E = 0;
  int cmin = 0, cmax = 0;  // the experts this launch takes: cmin <= count <= cmax
  // up: the staged tokens [T, ldx]; down: h [pairs, ldx]; bf16 in stage order (xl: the lo halves,
  // null for bf16 tokens)
  const __nv_bfloat16* xh = nullptr;
  const __nv_bfloat16* xl = nullptr;
  int64_t ldx = 0;
  __nv_bfloat16* hh = nullptr;  // up: h [pairs, ldh] hi, stage order
  __nv_bfloat16* hl = nullptr;  // up: its lo halves
  int64_t ldh = 0;
  float* o = nullptr;  // down: [pairs, ldo]
  int64_t ldo = 0;
  float limit = 0.0f;
  // Rows of the launch's matrices (W1 / W3 for up, W2 for down): the routed experts' (all of one
  // shape, as moe() sizes h by the first) and the shared expert's.
  int64_t rows_routed = 0, rows_shared = 0;
  int* claim = nullptr;  // the launch's item counter (0 at launch): items claimed past the first
};

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                               uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// a * b per bf16 half, round to nearest (exact here: b is a power of two and the product normal).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}

// The fp32 route for scales outside the bf16 multiply's exact range: each half times 2^shift
// (the format's value, exact in fp32), times the scale, rounded to bf16.
__device__ __forceinline__ uint32_t bf16x2_scale_f32(uint32_t p, float f1, float f2) {
  const float lo = __uint_as_float(p << 16) * f1 * f2;
  const float hi = __uint_as_float(p & 0xffff0000u) * f1 * f2;
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Starts moving [p, p + bytes) into L2 (no registers held). p and bytes: multiples of 16.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}

// The scale of one (row, chunk): the bf16 pair factor of the fast route, or 0 for the fp32 route.
template <int F>
__device__ __forceinline__ uint32_t fast_factor(uint32_t s) {
  if constexpr (F == kWFP4)
    return fpbits::fp4_scale_fast(s) ? fpbits::pair_scale(s, fpbits::kFp4Shift) : 0u;
  else
    return fpbits::fp8_scale_fast(s) ? fpbits::pair_scale(s, fpbits::kFp8Shift) : 0u;
}

// Pairs of the 8-value group j of a chunk (FP4: word j; FP8: words 2j, 2j + 1), scaled.
template <int F>
__device__ __forceinline__ void dec_group(const uint4& c, int j, uint32_t s, uint32_t fac,
                                          uint32_t (&o)[4]) {
  if constexpr (F == kWFP4)
    fpbits::e2m1x8_to_bf16(word_of(c, j), o);
  else
    fpbits::e4m3x8_to_bf16(word_of(c, 2 * j), word_of(c, 2 * j + 1), o);
  if (fac != 0u) {
#pragma unroll
    for (int p = 0; p < 4; ++p) o[p] = bf16x2_mul(o[p], fac);
  } else {
    const float f1 = F == kWFP4 ? 0x1p126f : 0x1p120f;
    const float f2 = e8m0_dev(static_cast<uint8_t>(s));
#pragma unroll
    for (int p = 0; p < 4; ++p) o[p] = bf16x2_scale_f32(o[p], f1, f2);
  }
}

// Items of expert e (count tokens) in a launch of TR-row tiles and TG-token groups: its row tiles
// x token groups.
template <int TR, int TG>
__device__ __forceinline__ int tc_items(const TcArgs& a, int e, int count) {
  const int64_t rows = e == a.E ? a.rows_shared : a.rows_routed;
  const int tiles = static_cast<int>((rows + TR - 1) / TR);
  return tiles * ((count + TG - 1) / TG);
}

// The launch's work list, built by every block: ex[0, n) the experts with cmin <= count <= cmax in
// ascending id, first[j] the index of ex[j]'s first item (first[n]: the total). Returns n; every
// thread gets n and the total (*total). TR, TG: the launch's row tile and token group.
template <int TR, int TG>
__device__ int tc_work_list(const TcArgs& a, int* ex, int* first, int* total) {
  __shared__ int wcnt[kTcWarps], wsum[kTcWarps];
  const int E1 = a.E + 1, nact = a.meta[3 * E1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int base_n = 0, base_items = 0;
  for (int i0 = 0; i0 < nact; i0 += kTcThreads) {
    const int i = i0 + static_cast<int>(threadIdx.x);
    int e = -1, items = 0;
    bool in = false;
    if (i < nact) {
      e = a.meta[2 * E1 + i];
      const int c = a.meta[e];
      in = c >= a.cmin && c <= a.cmax;
      if (in) items = tc_items<TR, TG>(a, e, c);
    }
    const unsigned bal = __ballot_sync(0xffffffffu, in);
    int incl = items;  // inclusive scan of the items over the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) wsum[warp] = incl;
    if (lane == 0) wcnt[warp] = __popc(bal);
    __syncthreads();
    int before_n = 0, before_items = 0, tot_n = 0, tot_items = 0;
    for (int w = 0; w < kTcWarps; ++w) {
      before_n += w < warp ? wcnt[w] : 0;
      before_items += w < warp ? wsum[w] : 0;
      tot_n += wcnt[w];
      tot_items += wsum[w];
    }
    if (in) {
      const int pos = base_n + before_n + __popc(bal & ((1u << lane) - 1u));
      ex[pos] = e;
      first[pos] = base_items + before_items + incl - items;
    }
    base_n += tot_n;  // uniform: every thread has the same sums
    base_items += tot_items;
    __syncthreads();  // wcnt / wsum are rewritten by the next round
  }
  if (threadIdx.x == 0) first[base_n] = base_items;
  __syncthreads();
  *total = base_items;
  return base_n;
}

// Rows [n_begin, n_end) of one expert's W1 and W3 (kUp: SwiGLU fused, h written as hi + lo) or W2,
// for its tokens [m_begin, m_end) (m_begin a multiple of 8 NT; count: all its tokens).
template <int F, bool kUp, int NT, bool LO>
__device__ __forceinline__ void tc_expert(const TcArgs& a, const DevExpert& ex, int count,
                                          int start, int64_t n_begin, int64_t n_end, int m_begin,
                                          int m_end, float* red) {
  constexpr int G = kUp ? 2 : 1;
  constexpr int V = FmtTraits<F>::kVals, NG = V / 8;  // values and 8-value groups per chunk
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int rt = warp / kTcKParts, kp = warp % kTcKParts;
  const DevMat& wa = kUp ? ex.w1 : ex.w2;
  const DevMat& wb = kUp ? ex.w3 : ex.w2;
  const int64_t N = wa.out;
  const int64_t nchunks = (wa.in + V - 1) / V, steps = (nchunks + 3) / 4;
  const int TK = a.T * a.K;

  for (int64_t tb = n_begin; tb < n_end; tb += kTcTileRows)
    for (int m0 = m_begin; m0 < m_end; m0 += 8 * NT) {  // > 8 NT tokens: weights again from L2
      const int64_t r0 = tb + rt * 16;
      const int nts = (count - m0 + 7) / 8 < NT ? (count - m0 + 7) / 8 : NT;
      // This lane's token of each n tile: its activation row offset, or -1 past the expert's
      // tokens.
      int64_t xo[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int m = m0 + nt * 8 + g;
        xo[nt] = -1;
        if (m < count) {
          if constexpr (kUp) {
            const int p = a.pairs[start + m];
            xo[nt] = (p < TK ? p / a.K : p - TK) * a.ldx;
          } else {
            xo[nt] = static_cast<int64_t>(start + m) * a.ldx;
          }
        }
      }
      float acc[G][NT][4];
#pragma unroll
      for (int gi = 0; gi < G; ++gi)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[gi][nt][q] = 0.0f;

      uint4 raw[G][2];
      uint32_t rsc[G][2];
      auto load = [&](int64_t st) {
        const int64_t c = st * 4 + tq;
#pragma unroll
        for (int gi = 0; gi < G; ++gi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const DevMat& w = gi == 0 ? wa : wb;
            const int64_t n = r0 + g + 8 * h;
            const bool ok = st < steps && c < nchunks && n < N;
            raw[gi][h] = make_uint4(0, 0, 0, 0);
            rsc[gi][h] = 127;  // any fast-route scale: the values are zero
            if (ok) {
              raw[gi][h] = ld_chunk(w.data + n * w.row_bytes, c * 16, w.row_bytes, w.vec != 0);
              const int64_t si =
                  F == kWFP4 ? n * w.scale_cols + c : (n / 128) * w.scale_cols + c / 8;
              rsc[gi][h] = __ldg(w.scale + si);
            }
          }
      };
      // L2 prefetch kTcAhead steps ahead of the loads (a step is 64 bytes of a row in every
      // format): lane l < 16 G takes row r0 + l % 16 of matrix l / 16.
      auto prefetch = [&](int64_t s0, int64_t ns) {
        if (lane >= 16 * G) return;
        const DevMat& w = lane < 16 ? wa : wb;
        const int64_t n = r0 + (lane & 15), b0 = s0 * 64;
        const int64_t b1 = b0 + ns * 64 < w.row_bytes ? b0 + ns * 64 : w.row_bytes;
        if (w.vec != 0 && n < N && b0 < b1)
          prefetch_l2(w.data + n * w.row_bytes + b0, static_cast<uint32_t>(b1 - b0));
      };
      if (kp == 0) prefetch(0, kTcAhead);
      load(kp);
      for (int64_t st = kp; st < steps; st += kTcKParts) {
        prefetch(st + kTcAhead, 1);
        uint4 cur[G][2];
        uint32_t cs[G][2];
#pragma unroll
        for (int gi = 0; gi < G; ++gi)
#pragma unroll
          for (int h = 0; h < 2; ++h) cur[gi][h] = raw[gi][h], cs[gi][h] = rsc[gi][h];
        if (st + kTcKParts < steps) load(st + kTcKParts);  // in flight while this step computes
        const int64_t c = st * 4 + tq;
        const bool cok = c < nchunks;
        uint32_t fac[G][2];
#pragma unroll
        for (int gi = 0; gi < G; ++gi)
#pragma unroll
          for (int h = 0; h < 2; ++h) fac[gi][h] = fast_factor<F>(cs[gi][h]);
#pragma unroll
        for (int j = 0; j < NG; ++j) {
          uint32_t A[G][2][4];
#pragma unroll
          for (int gi = 0; gi < G; ++gi)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              dec_group<F>(cur[gi][h], j, cs[gi][h], fac[gi][h], A[gi][h]);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if (nt >= nts) break;  // uniform over the block
            uint4 bh = make_uint4(0, 0, 0, 0), bl = make_uint4(0, 0, 0, 0);
            if (cok && xo[nt] >= 0) {
              const int64_t off = xo[nt] + c * V + 8 * j;
              bh = __ldg(reinterpret_cast<const uint4*>(a.xh + off));
              if constexpr (LO) bl = __ldg(reinterpret_cast<const uint4*>(a.xl + off));
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const uint32_t b0 = i ? bh.z : bh.x, b1 = i ? bh.w : bh.y;
              const uint32_t l0 = i ? bl.z : bl.x, l1 = i ? bl.w : bl.y;
#pragma unroll
              for (int gi = 0; gi < G; ++gi) {
                mma_bf16_16816(acc[gi][nt], A[gi][0][2 * i], A[gi][1][2 * i], A[gi][0][2 * i + 1],
                               A[gi][1][2 * i + 1], b0, b1);
                if constexpr (LO)
                  mma_bf16_16816(acc[gi][nt], A[gi][0][2 * i], A[gi][1][2 * i], A[gi][0][2 * i + 1],
                                 A[gi][1][2 * i + 1], l0, l1);
              }
            }
          }
        }
      }

      // The K halves of a row tile: the upper hands its sums to the lower (fixed order).
      constexpr int kAcc = G * NT * 4;
      float* slot = red + rt * kAcc * 32;
      if (kp == 1) {
#pragma unroll
        for (int gi = 0; gi < G; ++gi)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) slot[((gi * NT + nt) * 4 + q) * 32 + lane] = acc[gi][nt][q];
      }
      __syncthreads();
      if (kp == 0) {
#pragma unroll
        for (int gi = 0; gi < G; ++gi)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q)
              acc[gi][nt][q] += slot[((gi * NT + nt) * 4 + q) * 32 + lane];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if (nt >= nts) break;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int64_t n = r0 + g + (q >= 2 ? 8 : 0);
            const int m = m0 + nt * 8 + 2 * tq + (q & 1);
            if (n >= N || m >= count) continue;
            if constexpr (kUp) {
              const float gt = fminf(acc[0][nt][q], a.limit);
              const float up = fminf(fmaxf(acc[1][nt][q], -a.limit), a.limit);
              const float hv = gt * (1.0f / (1.0f + expf(-gt))) * up;
              const int64_t at = static_cast<int64_t>(start + m) * a.ldh +
                                 ((n & ~int64_t{7}) | fpbits::stage_pos(static_cast<int>(n & 7)));
              const __nv_bfloat16 hi = __float2bfloat16_rn(hv);
              a.hh[at] = hi;
              a.hl[at] = __float2bfloat16_rn(hv - __bfloat162float(hi));
            } else {
              a.o[static_cast<int64_t>(start + m) * a.ldo + n] = acc[0][nt][q];
            }
          }
        }
      }
      __syncthreads();  // red is reused by the next tile
    }
}

// Persistent blocks over the launch's work list (the file's header): item it of expert ex[j]
// (first[j] <= it < first[j + 1]) is row tile (it - first[j]) / groups, token group
// (it - first[j]) % groups of that expert. A block's first item is blockIdx.x, each next one
// gridDim.x + a claim on a.claim (made while the current item runs).
template <bool kUp, int NT, bool LO>
__global__ void __launch_bounds__(kTcThreads, NT <= 2 ? 2 : 1) moe_tc_kernel(TcArgs a) {
  constexpr int G = kUp ? 2 : 1;
  __shared__ float red[(kTcWarps / kTcKParts) * G * NT * 4 * 32];
  __shared__ int ex_s[kTcMaxExperts], first_s[kTcMaxExperts + 1];
  int total = 0;
  const int n = tc_work_list<kTcTileRows, 8 * NT>(a, ex_s, first_s, &total);
  const int E1 = a.E + 1;
  __shared__ int next_s;
  int it = static_cast<int>(blockIdx.x);
  while (it < total) {
    int claimed = 0;  // thread 0: the claim, awaited only after the item
    if (threadIdx.x == 0) claimed = atomicAdd(a.claim, 1);
    int lo = 0, hi = n - 1;  // the last j with first_s[j] <= it (first_s increases strictly)
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (first_s[mid] <= it)
        lo = mid;
      else
        hi = mid - 1;
    }
    const int e = ex_s[lo], local = it - first_s[lo];
    const int count = a.meta[e], start = a.meta[E1 + e];
    const int groups = (count + 8 * NT - 1) / (8 * NT);
    const int tile = local / groups, grp = local - tile * groups;
    const DevExpert& ex = a.tab[e];
    const DevMat& w = kUp ? ex.w1 : ex.w2;
    const int64_t n_begin = static_cast<int64_t>(tile) * kTcTileRows;
    const int64_t n_end = n_begin + kTcTileRows < w.out ? n_begin + kTcTileRows : w.out;
    const int m_begin = grp * 8 * NT;
    const int m_end = m_begin + 8 * NT < count ? m_begin + 8 * NT : count;
    if (w.fmt == kWFP4)
      tc_expert<kWFP4, kUp, NT, LO>(a, ex, count, start, n_begin, n_end, m_begin, m_end, red);
    else
      tc_expert<kWFP8, kUp, NT, LO>(a, ex, count, start, n_begin, n_end, m_begin, m_end, red);
    if (threadIdx.x == 0) next_s = static_cast<int>(gridDim.x) + claimed;
    __syncthreads();
    it = next_s;
    __syncthreads();  // every thread has read next_s before thread 0 writes it again
  }
}

// The prefill kernel (moe_pf_kernel): experts of more than kTcMaxTok tokens in 128-token tiles,
// and in steps of more than kTcMaxTok tokens those of 9..64 in 64-token tiles.
//
// A block tile of 128 weight rows (up: 64 rows of W1 and the same 64 of W3, so SwiGLU has both in
// one thread; down: 128 rows of W2) x 128 (or 64) tokens, K stepped 64 values at a time. Each step
// the block decodes its weight tile ONCE into shared memory as bf16 (each thread one FP4 chunk or
// two FP8 chunks, loaded from global memory during the previous step's MMAs), while the next step's
// activation tile (the staged hi, and lo for fp32 tokens, 8 values per 16-byte piece) lands in the
// other of two shared buffers through cp.async (zeros past the tokens and past K). Warps 2 (rows)
// x 4 (32 tokens each; 4 x 2 for 64-token tiles), n tiles past the item's tokens skipped; a warp's
// fragments come from shared memory by ldmatrix and go to mma.sync m16n8k16 (bf16, fp32
// accumulate; two MMAs, hi and lo, for fp32 activations). Both operands sit in the decoders' pair
// order inside each 8 values (stage_pos), the k permutation of the decode kernels. Shared rows
// are 64 values (eight 16-byte pieces), piece j stored at j ^ (row & 7): the eight rows an
// ldmatrix reads at once fall in eight different bank groups. Each output is one thread's sum in
// a fixed K order (deterministic).
constexpr int kPfRows = 128, kPfK = 64;           // block tile: weight rows; K step (values)
constexpr int kPfTileBytes = kPfRows * kPfK * 2;  // the bf16 weight tile (128 rows x 64)

// Shared bytes of a prefill block of TOK tokens: the weight tile, then two activation buffers
// (hi, and lo) of TOK rows x 64.
constexpr size_t pf_smem_bytes(int tok, bool lo) {
  return static_cast<size_t>(kPfTileBytes) + size_t{2} * (lo ? 2 : 1) * tok * kPfK * 2;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; src_bytes 0 writes zeros (src must still be a valid address).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Byte offset of 16-byte piece j (0..7) of row r in a shared tile.
__device__ __forceinline__ uint32_t pf_piece(int r, int j) {
  return static_cast<uint32_t>((r * 8 + (j ^ (r & 7))) * 16);
}

// One item: weight rows [n0, n0 + 64 (up) or 128 (down)) of one expert for its tokens
// [m0, min(m0 + TOK, count)). Warps: 8 / WN (rows) x WN (32 tokens each), WN = TOK / 32; a warp
// has MT = WN m tiles (up: MT / 2 of W1 and the same rows of W3).
template <int F, bool kUp, bool LO, int TOK>
__device__ __forceinline__ void pf_item(const TcArgs& a, const DevExpert& ex, int count, int start,
                                        int64_t n0, int m0, uint8_t* smem) {
  constexpr int V = FmtTraits<F>::kVals, NG = V / 8;  // values, 8-value groups of a chunk
  constexpr int CPR = kPfK / V;                       // chunks of a row per K step (2 or 4)
  constexpr int CH = kPfRows * CPR / kTcThreads;      // chunks a thread decodes (1 or 2)
  static_assert(CH * kTcThreads == kPfRows * CPR, "chunks of a step over the threads");
  constexpr int WN = TOK / 32, WR = kTcWarps / WN, MT = WN, RW = kPfRows / WR;  // RW: warp rows
  constexpr int ARows = TOK / 32;  // activation rows a thread stages per K step
  constexpr int kBTile = TOK * kPfK * 2;
  static_assert((TOK == 64 || TOK == 128) && MT * 16 == RW, "warp tiles");
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wr = warp / WN, wn = warp % WN;  // warp tile: rows (WR) x tokens (WN x 32)
  const DevMat& wa = kUp ? ex.w1 : ex.w2;
  const int64_t N = wa.out, Kin = wa.in;
  const int64_t nchunks = (Kin + V - 1) / V;
  const int nk = static_cast<int>((Kin + kPfK - 1) / kPfK);
  const int64_t kval = (Kin + 7) / 8 * 8;  // activation columns read (zero past it)
  const int TK = a.T * a.K;
  const int mcount = count - m0 < TOK ? count - m0 : TOK;

  // The decode: thread tid takes shared row tid / 2 (up: rows 0..63 of W1, 64..127 of W3) and its
  // chunks (tid & 1) * CH + i of each K step.
  const int drow = tid >> 1;
  const DevMat& dw = (kUp && drow >= 64) ? ex.w3 : wa;
  const int64_t dn = n0 + (kUp ? (drow & 63) : drow);
  const bool drow_ok = dn < N;
  const uint8_t* dptr = dw.data + (drow_ok ? dn : 0) * dw.row_bytes;
  const bool dvec = dw.vec != 0;

  // The activations: thread tid stages piece tid & 7 of token rows tid / 8 + 32 i (i < ARows).
  const int apiece = tid & 7;
  int arow[ARows];  // activation rows (tokens or pairs), -1 past the item's tokens
#pragma unroll
  for (int i = 0; i < ARows; ++i) {
    const int r = (tid >> 3) + 32 * i;
    arow[i] = -1;
    if (r < mcount) {
      const int m = m0 + r;
      if constexpr (kUp) {
        const int p = a.pairs[start + m];
        arow[i] = p < TK ? p / a.K : p - TK;
      } else {
        arow[i] = start + m;
      }
    }
  }

  uint8_t* sA = smem;
  uint8_t* sB = smem + kPfTileBytes;  // [buffer][hi, lo]
  constexpr int kBufBytes = kBTile * (LO ? 2 : 1);

  uint4 raw[CH];
  uint32_t rsc[CH];
  auto gload = [&](int kc) {
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int64_t c = int64_t{kc} * CPR + (tid & 1) * CH + i;
      raw[i] = make_uint4(0, 0, 0, 0);
      rsc[i] = 127;  // any fast-route scale: the values are zero
      if (drow_ok && c < nchunks) {
        raw[i] = ld_chunk(dptr, c * 16, dw.row_bytes, dvec);
        const int64_t si = F == kWFP4 ? dn * dw.scale_cols + c : (dn / 128) * dw.scale_cols + c / 8;
        rsc[i] = __ldg(dw.scale + si);
      }
    }
  };
  // L2 prefetch of a later step's row bytes (64 values: 32 bytes FP4, 64 FP8), one row a thread.
  auto prefetch = [&](int kc) {
    if ((tid & 1) != 0 || !drow_ok || !dvec || kc >= nk) return;
    const int64_t b0 = int64_t{kc} * (kPfK * 16 / V);
    int64_t b1 = b0 + kPfK * 16 / V;
    b1 = (b1 < dw.row_bytes ? b1 : dw.row_bytes) & ~int64_t{15};
    if (b1 > b0) prefetch_l2(dptr + b0, static_cast<uint32_t>(b1 - b0));
  };
  auto bload = [&](int kc, int buf) {
    const int64_t k = int64_t{kc} * kPfK + apiece * 8;
    uint8_t* dst = sB + buf * kBufBytes;
#pragma unroll
    for (int i = 0; i < ARows; ++i) {
      const int r = (tid >> 3) + 32 * i;
      const bool ok = arow[i] >= 0 && k < kval;
      const int64_t off = ok ? static_cast<int64_t>(arow[i]) * a.ldx + k : 0;
      const uint32_t d = smem_u32(dst + pf_piece(r, apiece));
      cp_async16(d, a.xh + off, ok ? 16u : 0u);
      if constexpr (LO) cp_async16(d + kBTile, a.xl + off, ok ? 16u : 0u);
    }
  };

  float acc[MT][4][4];  // [m tile][n tile][fragment]
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
  // The warp's m tiles (shared rows): up W1 rows wr * RW / 2 + 16 i (i < MT / 2), W3 64 + the
  // same; down wr * RW + 16 i. Its tokens: shared rows wn * 32 + [0, 32), of which the first ntv
  // n tiles hold real ones (uniform per warp: the others' MMAs are skipped; none: no MMAs).
  const int ntv = (mcount - wn * 32 + 7) / 8;
  const bool wact = ntv > 0;
  const int lr = lane & 7, lm = lane >> 3;

  for (int p = 0; p < 4; ++p) prefetch(p);
  gload(0);
  bload(0, 0);
  cp_async_commit();
  for (int kc = 0; kc < nk; ++kc) {
    const int buf = kc & 1;
    // Decode this step's chunks into the weight tile (free: the previous step ended in a barrier).
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const uint32_t fac = fast_factor<F>(rsc[i]);
      const int sub = (tid & 1) * CH + i;
#pragma unroll
      for (int j = 0; j < NG; ++j) {
        uint32_t o[4];
        dec_group<F>(raw[i], j, rsc[i], fac, o);
        *reinterpret_cast<uint4*>(sA + pf_piece(drow, sub * NG + j)) =
            make_uint4(o[0], o[1], o[2], o[3]);
      }
    }
    if (kc + 1 < nk) {  // the next step's loads, in flight during this step's MMAs
      prefetch(kc + 4);
      gload(kc + 1);
      bload(kc + 1, buf ^ 1);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this step's activation pieces of this thread have landed
    __syncthreads();     // ... and every thread's, and the weight tile
    if (wact) {
      const uint8_t* bb = sB + buf * kBufBytes;
#pragma unroll
      for (int kk = 0; kk < kPfK / 16; ++kk) {
        // B fragments of 2 n tiles: x4 = (tokens +0..7, k lo), (+0..7, k hi), (+8..15, k lo),
        // (+8..15, k hi). A fragment of an m tile: x4 = (rows +0..7, k lo), (+8..15, k lo),
        // (+0..7, k hi), (+8..15, k hi).
        auto ld_b = [&](int np, uint32_t(&bh)[4], uint32_t(&bl)[4]) {
          const int r = wn * 32 + np * 16 + (lm >> 1) * 8 + lr;
          const uint32_t off = pf_piece(r, kk * 2 + (lm & 1));
          ldsm_x4(smem_u32(bb + off), bh);
          if constexpr (LO) ldsm_x4(smem_u32(bb + kBTile + off), bl);
        };
        auto ld_a = [&](int mt, uint32_t(&af)[4]) {
          const int rb =
              kUp ? (mt / (MT / 2)) * 64 + wr * (RW / 2) + (mt % (MT / 2)) * 16 : wr * RW + mt * 16;
          ldsm_x4(smem_u32(sA + pf_piece(rb + (lm & 1) * 8 + lr, kk * 2 + (lm >> 1))), af);
        };
        if constexpr (LO) {
          // hi and lo: one pair of n tiles at a time (registers), A fragments loaded twice.
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            if (2 * np >= ntv) break;
            uint32_t bh[4], bl[4];
            ld_b(np, bh, bl);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              uint32_t af[4];
              ld_a(mt, af);
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                if (2 * np + h >= ntv) break;
                float(&c)[4] = acc[mt][2 * np + h];
                mma_bf16_16816(c, af[0], af[1], af[2], af[3], bh[2 * h], bh[2 * h + 1]);
                mma_bf16_16816(c, af[0], af[1], af[2], af[3], bl[2 * h], bl[2 * h + 1]);
              }
            }
          }
        } else {
          uint32_t bh[2][4], unused[4];
#pragma unroll
          for (int np = 0; np < 2; ++np)
            if (2 * np < ntv) ld_b(np, bh[np], unused);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            uint32_t af[4];
            ld_a(mt, af);
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
              if (nt >= ntv) break;
              const int np = nt >> 1, h = (nt & 1) * 2;
              mma_bf16_16816(acc[mt][nt], af[0], af[1], af[2], af[3], bh[np][h], bh[np][h + 1]);
            }
          }
        }
      }
    }
    __syncthreads();  // the tiles are rewritten by the next step
  }
  cp_async_wait<0>();  // nothing is in flight (the last group is empty)

  if (!wact) return;
  const int g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int mt = 0; mt < (kUp ? MT / 2 : MT); ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t n = n0 + (kUp ? wr * (RW / 2) : wr * RW) + mt * 16 + g + (q >= 2 ? 8 : 0);
        const int ml = wn * 32 + nt * 8 + 2 * tq + (q & 1);
        if (n >= N || ml >= mcount) continue;
        const int m = m0 + ml;
        if constexpr (kUp) {
          const float gt = fminf(acc[mt][nt][q], a.limit);
          const float up = fminf(fmaxf(acc[mt + MT / 2][nt][q], -a.limit), a.limit);
          const float hv = gt * (1.0f / (1.0f + expf(-gt))) * up;
          const int64_t at = static_cast<int64_t>(start + m) * a.ldh +
                             ((n & ~int64_t{7}) | fpbits::stage_pos(static_cast<int>(n & 7)));
          const __nv_bfloat16 hi = __float2bfloat16_rn(hv);
          a.hh[at] = hi;
          a.hl[at] = __float2bfloat16_rn(hv - __bfloat162float(hi));
        } else {
          a.o[static_cast<int64_t>(start + m) * a.ldo + n] = acc[mt][nt][q];
        }
      }
}

// Persistent blocks over the work list of (expert, row tile of 64 (up) or 128 (down) rows, group
// of TOK tokens) items, claimed as moe_tc_kernel does.
template <bool kUp, bool LO, int TOK>
__global__ void __launch_bounds__(kTcThreads, 2) moe_pf_kernel(TcArgs a) {
  constexpr int TR = kUp ? kPfRows / 2 : kPfRows;
  extern __shared__ __align__(128) uint8_t pf_smem[];
  __shared__ int ex_s[kTcMaxExperts], first_s[kTcMaxExperts + 1];
  __shared__ int next_s;
  int total = 0;
  const int n = tc_work_list<TR, TOK>(a, ex_s, first_s, &total);
  const int E1 = a.E + 1;
  int it = static_cast<int>(blockIdx.x);
  while (it < total) {
    int claimed = 0;
    if (threadIdx.x == 0) claimed = atomicAdd(a.claim, 1);
    int lo = 0, hi = n - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (first_s[mid] <= it)
        lo = mid;
      else
        hi = mid - 1;
    }
    const int e = ex_s[lo], local = it - first_s[lo];
    const int count = a.meta[e], start = a.meta[E1 + e];
    const int groups = (count + TOK - 1) / TOK;
    const int tile = local / groups, grp = local - tile * groups;
    const DevExpert& ex = a.tab[e];
    const int fmt = kUp ? ex.w1.fmt : ex.w2.fmt;
    const int64_t n0 = static_cast<int64_t>(tile) * TR;
    if (fmt == kWFP4)
      pf_item<kWFP4, kUp, LO, TOK>(a, ex, count, start, n0, grp * TOK, pf_smem);
    else
      pf_item<kWFP8, kUp, LO, TOK>(a, ex, count, start, n0, grp * TOK, pf_smem);
    if (threadIdx.x == 0) next_s = static_cast<int>(gridDim.x) + claimed;
    __syncthreads();
    it = next_s;
    __syncthreads();
  }
}

// xh[m, c] = bf16(x[m, src(c)]) and xl the rest (f32 x), src the inverse of stage_pos inside each
// 8 columns; zero from cols on. Also zeroes zero[0, nzero) (the call's work-list counters).
template <typename XT>
__global__ void tc_stage_kernel(const XT* x, int64_t ldx, int64_t cols, int64_t M, int64_t ldp,
                                __nv_bfloat16* xh, __nv_bfloat16* xl, int* zero, int nzero) {
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < nzero) zero[threadIdx.x] = 0;
  const int64_t total = M * ldp;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / ldp, c = i - m * ldp;
    const int64_t src = (c & ~int64_t{7}) | (((c & 7) >> 1) + 4 * (c & 1));
    const float v = src < cols ? to_float(x[m * ldx + src]) : 0.0f;
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    xh[i] = h;
    if (xl != nullptr) xl[i] = __float2bfloat16_rn(v - __bfloat162float(h));
  }
}

// The launch's grid: persistent blocks, as many as are resident at once (the launch bounds'
// minimum per SM), fewer when the launch has fewer items at most. An expert of the range has
// ceil(count / 8 NT) <= count / 8 NT + 1 token groups, so the items are at most
// (npairs / 8 NT + experts) x tiles. Depends on the shapes and T only.
template <int NT>
unsigned tc_grid(int64_t rows, int64_t npairs, int64_t experts) {
  const int64_t tiles = (rows + kTcTileRows - 1) / kTcTileRows;
  const int64_t items = (npairs / (8 * NT) + experts) * tiles;
  SP_CHECK(items < std::numeric_limits<int>::max(), "moe_tc: ", items, " work items");
  const int64_t resident = int64_t{num_sms()} * (NT <= 2 ? 2 : 1);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(items, resident)));
}

// lo: the activations have lo halves (f32 tokens; h always). rows: the most rows of the launch's
// matrices; experts: the most experts its range can hold.
template <bool kUp, int NT>
void launch_tc_nt(cudaStream_t s, const TcArgs& a, int64_t rows, int64_t npairs, int64_t experts,
                  bool lo) {
  const dim3 grid(tc_grid<NT>(rows, npairs, experts));
  if constexpr (kUp) {
    if (!lo) {
      moe_tc_kernel<true, NT, false><<<grid, kTcThreads, 0, s>>>(a);
      SP_CUDA_LAUNCH();
      return;
    }
  }
  moe_tc_kernel<kUp, NT, true><<<grid, kTcThreads, 0, s>>>(a);
  SP_CUDA_LAUNCH();
}

// NT: n tiles of 8 tokens for the launch's largest count (1, 2, 4 or 8).
template <bool kUp>
void launch_tc(cudaStream_t s, const TcArgs& a, int64_t rows, int64_t npairs, int64_t experts,
               bool lo) {
  const int nt = (std::min(a.cmax, a.T) + 7) / 8;
  if (nt <= 1)
    launch_tc_nt<kUp, 1>(s, a, rows, npairs, experts, lo);
  else if (nt <= 2)
    launch_tc_nt<kUp, 2>(s, a, rows, npairs, experts, lo);
  else if (nt <= 4)
    launch_tc_nt<kUp, 4>(s, a, rows, npairs, experts, lo);
  else
    launch_tc_nt<kUp, 8>(s, a, rows, npairs, experts, lo);
}

// The prefill launch (block tiles of TOK tokens): persistent blocks, two per SM, fewer when the
// launch has fewer items at most ((npairs / TOK + experts) x row tiles).
template <bool kUp, int TOK>
void launch_pf(cudaStream_t s, const TcArgs& a, int64_t rows, int64_t npairs, int64_t experts,
               bool lo) {
  const int64_t tr = kUp ? kPfRows / 2 : kPfRows;
  const int64_t items = (npairs / TOK + experts) * ((rows + tr - 1) / tr);
  SP_CHECK(items < std::numeric_limits<int>::max(), "moe_tc: ", items, " work items");
  const dim3 grid(
      static_cast<unsigned>(std::max<int64_t>(1, std::min(items, int64_t{num_sms()} * 2))));
  auto go = [&](auto kernel, bool with_lo) {
    const size_t bytes = pf_smem_bytes(TOK, with_lo);
    allow_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
    kernel<<<grid, kTcThreads, bytes, s>>>(a);
    SP_CUDA_LAUNCH();
  };
  if constexpr (kUp) {
    if (!lo) {
      go(moe_pf_kernel<true, false, TOK>, false);
      return;
    }
  }
  go(moe_pf_kernel<kUp, true, TOK>, true);
}

}  // namespace

bool tc_experts_ok(const DevExpert* h, int64_t n) {
  if (n > kTcMaxExperts) return false;
  for (int64_t i = 0; i < n; ++i) {
    for (const DevMat* m : {&h[i].w1, &h[i].w2, &h[i].w3}) {
      if ((m->fmt != kWFP4 && m->fmt != kWFP8) || m->scale_f32) return false;
    }
    // h is read back by whole chunks: every chunk of W2's rows written by the up kernel.
    if (h[i].w2.in % 16 != 0 || h[i].w3.fmt != h[i].w1.fmt) return false;
    // The work lists take the routed experts' rows from the first (TcArgs::rows_routed).
    if (i + 1 < n && (h[i].w1.out != h[0].w1.out || h[i].w2.out != h[0].w2.out)) return false;
  }
  return true;
}

void moe_tc(cudaStream_t s, Workspace& ws, const MoeTcStep& st) {
  const int T = st.T;
  SP_CHECK(st.min_tok >= 1 && st.min_tok <= kTcSmallTok, "moe_tc: min_tok ", st.min_tok);
  SP_CHECK(st.E + 1 <= kTcMaxExperts, "moe_tc: ", st.E, " experts");
  SP_CHECK(st.I <= st.Imax && st.Is <= st.Imax, "moe_tc: intermediate sizes ", st.I, ", ", st.Is,
           " above ", st.Imax);
  if (T < st.min_tok) return;
  const int64_t TK = int64_t{T} * st.K, npairs = TK + T;
  const bool lo_x = !st.x_bf16;
  // The tokens, staged (rows of ldp values, zero past D; chunks never read past D rounded to 32).
  const int64_t ldp = (st.D + 31) / 32 * 32;
  // The work-list counters of the call's launches (pass x range), zeroed by the staging kernel.
  int* claims = ws.get<int>(kWsMoeTcClaims, kTcClaims);
  __nv_bfloat16* xh =
      ws.get<__nv_bfloat16>(kWsMoeStageX, static_cast<size_t>((lo_x ? 2 : 1) * T * ldp));
  __nv_bfloat16* xl = lo_x ? xh + T * ldp : nullptr;
  {
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>((T * ldp + 255) / 256, 1024));
    if (st.x_bf16)
      tc_stage_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(
          static_cast<const __nv_bfloat16*>(st.x), st.ldx, st.D, T, ldp, xh, xl, claims, kTcClaims);
    else
      tc_stage_kernel<float><<<grid, 256, 0, s>>>(static_cast<const float*>(st.x), st.ldx, st.D, T,
                                                  ldp, xh, xl, claims, kTcClaims);
    SP_CUDA_LAUNCH();
  }
  // h as hi + lo in stage order, a row per (expert, token) pair.
  const int64_t ldh = (st.Imax + 31) / 32 * 32;
  __nv_bfloat16* hh = ws.get<__nv_bfloat16>(kWsMoeStageH, static_cast<size_t>(2 * npairs * ldh));
  __nv_bfloat16* hl = hh + npairs * ldh;

  TcArgs a;
  a.tab = st.tab;
  a.meta = st.meta;
  a.pairs = st.pairs;
  a.T = T;
  a.K = st.K;
  a.E = st.E;
  a.limit = st.limit;
  a.hh = hh;
  a.hl = hl;
  a.ldh = ldh;
  a.o = st.o;
  a.ldo = st.D;
  // Three token ranges, so the experts of a few tokens (the common case in decode) do not carry
  // the registers of the widest n tiles: min_tok..8 tokens (experts: every one that can be hit),
  // 9..64 (at most TK / 9 routed experts, plus the shared expert) and more (TK / 65 + 1; groups
  // of 64 tokens, the groups of a row tile neighbours in the work list so that their re-reads of
  // its weights come from L2).
  struct Range {
    int cmin, cmax;
    int64_t experts;
  };
  Range ranges[3];
  int nr = 0;
  ranges[nr++] = {st.min_tok, kTcSmallTok, std::min<int64_t>(st.E, TK) + 1};
  if (T > kTcSmallTok)
    ranges[nr++] = {kTcSmallTok + 1, kTcMaxTok,
                    std::min<int64_t>(st.E, TK / (kTcSmallTok + 1)) + 1};
  if (T > kTcMaxTok)
    ranges[nr++] = {kTcMaxTok + 1, std::numeric_limits<int>::max(),
                    std::min<int64_t>(st.E, TK / (kTcMaxTok + 1)) + 1};
  for (int pass = 0; pass < 2; ++pass) {
    const bool up = pass == 0;
    const int64_t rows = up ? st.Imax : st.D;
    a.rows_routed = up ? st.I : st.D;
    a.rows_shared = up ? st.Is : st.D;
    if (up) {
      a.xh = xh;
      a.xl = xl;
      a.ldx = ldp;
    } else {
      a.xh = hh;
      a.xl = hl;
      a.ldx = ldh;
    }
    for (int r = 0; r < nr; ++r) {
      a.cmin = ranges[r].cmin;
      a.cmax = ranges[r].cmax;
      a.claim = claims + pass * 3 + r;
      // The prefill kernel: experts of more than 64 tokens in 128-token tiles, and in a step of
      // more than 64 tokens (prefill) those of 9..64 tokens in 64-token tiles; the decode-sized
      // steps keep the split-K kernel for them (few experts, bandwidth-bound).
      const bool lo = up ? lo_x : true;
      if (a.cmin > kTcMaxTok)
        up ? launch_pf<true, 128>(s, a, rows, npairs, ranges[r].experts, lo)
           : launch_pf<false, 128>(s, a, rows, npairs, ranges[r].experts, lo);
      else if (a.cmin > kTcSmallTok && T > kTcMaxTok)
        up ? launch_pf<true, 64>(s, a, rows, npairs, ranges[r].experts, lo)
           : launch_pf<false, 64>(s, a, rows, npairs, ranges[r].experts, lo);
      else
        up ? launch_tc<true>(s, a, rows, npairs, ranges[r].experts, lo)
           : launch_tc<false>(s, a, rows, npairs, ranges[r].experts, lo);
    }
  }
}

}  // namespace sp::cuda
