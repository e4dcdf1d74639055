// The DeepSeek-V4 op set. The forward pass (model/model.cc) is written once against this
// interface; the CPU backend is the numerical oracle, later backends must match it.
//
// Memory: every Tensor an op takes lives where the backend keeps it (host for the CPU backend,
// device memory for a GPU backend). The backend is given, once at start-up, its sizing (`reserve`)
// and the weights (`upload`), and allocates the sequence state itself (`alloc_state`). Each step's
// host metadata (BatchView) is handed over once (`begin_step`) before the step's first op, so a GPU
// backend copies it to the device in one transfer and later ops read the device copy. Only sampled
// token ids come back to the host (`sample`), plus logits when a caller asks for them.
//
// Activations use the backend's activation dtype (`act_dtype`: fp32 on the CPU, bf16 on a GPU);
// the tensors the spec keeps in fp32 (mHC post/comb, indexer weights, compressor inputs, logits)
// are allocated fp32 by the model whatever the backend.
//
// Sequence state: the window ring and the compressors' partial windows are per sequence slot;
// compressed entries and indexer keys grow with the sequence and live in a pool of fixed-size
// blocks of `block_tokens` positions, addressed through each chunk's block table (the slot's own
// blocks today; a paging block manager hands out blocks freely).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/kinds.h"
#include "core/matrix.h"
#include "core/status.h"
#include "core/tensor.h"

namespace sp {

// One sequence's tokens inside a step: batch rows [offset, offset + n_tokens) at positions
// [start_pos, start_pos + n_tokens) of the sequence in state slot `slot`. Its compressed entries
// live in the blocks BatchView::block_tables[block_table, block_table + num_blocks).
struct SeqChunk {
  int32_t slot = 0;
  int32_t n_tokens = 0;
  int64_t start_pos = 0;
  int32_t offset = 0;
  int32_t block_table = 0;  // offset into BatchView::block_tables
  int32_t num_blocks = 0;   // blocks covering positions [0, start_pos + n_tokens)
  int32_t pad_ = 0;
};

// Host metadata of one step; every pipeline stage has it (token ids too: hash-MoE routes by them).
struct BatchView {
  int num_tokens = 0;
  std::vector<int32_t> token_ids;     // [num_tokens]
  std::vector<int32_t> positions;     // [num_tokens]
  std::vector<int32_t> chunk_of;      // [num_tokens] index into chunks
  std::vector<SeqChunk> chunks;       //
  std::vector<int32_t> block_tables;  // every chunk's block ids, concatenated
  std::vector<int32_t> logit_rows;    // batch rows whose logits the head computes
};

// Where compressed entry `w` (0-based, one per `ratio` positions) of a chunk's sequence lives in a
// per-entry pool of `block_tokens / ratio` rows per block.
inline int64_t entry_row(const BatchView& b, const SeqChunk& ch, int64_t w, int ratio,
                         int block_tokens) {
  const int64_t per_block = block_tokens / ratio;
  return static_cast<int64_t>(b.block_tables[ch.block_table + w / per_block]) * per_block +
         w % per_block;
}

// Rotary frequencies for the rotated trailing dims (interleaved pairs).
struct RopeView {
  Tensor inv_freq;  // [1, rope_dim / 2] f32
  int rope_dim = 0;
};

// mHC mixing parameters (f32).
struct HcWeights {
  Tensor fn;     // [mix, hc_mult * hidden] (mix = (2 + hc) * hc; hc for hc_head)
  Tensor base;   // [1, mix]
  Tensor scale;  // [1, 3] (hc_head: [1, 1])
};

struct CompressorView {
  Matrix wkv, wgate;  // [k * d, hidden]
  Tensor ape;         // [ratio, k * d] f32
  Tensor norm;        // [1, d] f32
};

struct MoeWeights {
  MlpKind kind = MlpKind::kMoe;
  Matrix gate;       // [experts, hidden]
  Tensor gate_bias;  // [1, experts] f32 (learned routing)
  Tensor tid2eid;    // [vocab, top_k] i32 (hash routing)
  std::vector<Matrix> w1, w2,
      w3;                // routed experts: [inter, hidden], [hidden, inter], [inter, hidden]
  Matrix sw1, sw2, sw3;  // shared expert
  Tensor table;          // backend-private (a GPU backend's per-expert pointer table)
};

// One layer's weights as the backend sees them.
struct LayerView {
  int index = -1;
  AttnKind kind = AttnKind::kSliding;
  int ratio = 0;
  Tensor attn_norm, ffn_norm;  // [1, hidden] f32
  HcWeights hc_attn, hc_ffn;
  Matrix wq_a, wq_b, wkv, wo_a, wo_b;
  Tensor q_norm;                      // [1, q_lora] f32
  Tensor kv_norm;                     // [1, head_dim] f32
  Tensor attn_sink;                   // [1, heads] f32
  CompressorView compressor;          // ratio > 0
  Matrix idx_wq_b, idx_weights_proj;  // CSA
  CompressorView idx_compressor;      // CSA
  MoeWeights moe;
};

// One attention layer's per-sequence state. The per-slot buffers are rings indexed by absolute
// position, with `slack` rows beyond what a step reads (the speculative tokens a step may write and
// later drop): rolling a sequence back to position p needs no copy, the next step simply writes
// from p again and never reads a row of a dropped position.
struct LayerState {
  Tensor window;   // [slots * ring, head_dim]   ring = window + slack: position p at row
                   // slot * ring + p % ring
  Tensor cmp;      // [pool rows, head_dim]       compressed entries (ratio > 0), see entry_row
  Tensor cmp_buf;  // [slots * ring, 2 * k * head_dim] the compressor's inputs of recent positions:
                   // position p at row slot * ring + p % ring holds its k * head_dim values, then
                   // their gates (ape included); ring = k * ratio + slack (CSA, k = 2, also reads
                   // the previous window's A-halves)
  Tensor idx;      // [pool rows, index_head_dim] indexer keys (CSA), see entry_row
  Tensor idx_buf;  // the indexer compressor's inputs, as cmp_buf at index_head_dim (k = 2)
};

// What each buffer of a LayerState holds, so a backend can choose its storage dtype.
enum class StateKind { kWindow, kEntries, kCompressorBuf };
// One buffer of a layer's state: `rows` x `cols` (already multiplied out for every slot / block).
struct StateAlloc {
  Tensor LayerState::*field;
  int64_t rows = 0, cols = 0;
  StateKind kind = StateKind::kWindow;
};

// Start-up sizing: the most of everything a step can hold.
struct BackendLimits {
  int max_tokens = 0;      // tokens per step
  int max_seqs = 0;        // chunks per step (sequence slots)
  int max_logit_rows = 0;  // head rows per step
  int max_blocks = 0;      // block-table entries per step
  int64_t vocab = 0;
  int block_tokens = 0;       // positions per state block
  int64_t max_model_len = 0;  // positions per sequence (bounds the launch sizes of graph steps)
  bool step_graphs = false;   // run_graph may record and replay steps (CUDA graphs)
};

// What a recorded step is replayed for: the step's token count and residual buffer (every other
// address a step's ops use is fixed at start-up), and which part of the forward pass.
struct StepGraphKey {
  int part = 0;  // 0: the decoder layers of a stage
  int tokens = 0;
  int chunk_tokens = 0;  // every chunk's tokens
  const void* residual = nullptr;
  bool operator<(const StepGraphKey& o) const {
    if (part != o.part) return part < o.part;
    if (tokens != o.tokens) return tokens < o.tokens;
    if (chunk_tokens != o.chunk_tokens) return chunk_tokens < o.chunk_tokens;
    return residual < o.residual;
  }
};
// Steps whose chunks all have the same number of tokens, at most this many (decode: 1; a verify
// step of speculative decoding: 1 + drafts), are decode-shaped: their launches depend on the
// token count, the chunk length and the limits only.
constexpr int kGraphChunkTokens = 16;
// A step's chunk length when it is decode-shaped (kGraphChunkTokens), else 0.
inline int decode_shaped_chunk(const BatchView& b) {
  const int n = b.chunks.empty() ? 0 : b.chunks.front().n_tokens;
  if (n < 1 || n > kGraphChunkTokens) return 0;
  for (const SeqChunk& ch : b.chunks)
    if (ch.n_tokens != n) return 0;
  return n;
}

struct CompressorArgs {
  const CompressorView* w;
  const RopeView* rope;
  int ratio, overlap, dim;  // overlap k: 2 for CSA, 1 for HCA; dim: entry width
  float eps;
  int ring;  // rows per slot of the input ring (LayerState::cmp_buf)
};

struct AttentionArgs {
  int num_heads, head_dim, window, ratio;  // ratio 0: sliding only
  AttnKind kind;
  float scale;
  const Tensor* sink;  // [1, num_heads] f32
  int ring;            // rows per slot of the window ring (LayerState::window)
};

struct MoeArgs {
  const MoeWeights* w;
  int experts_per_tok;
  float routed_scale, swiglu_limit;
};

// How one logit row picks its token. Randomness is counter-based: the uniform draw is a function of
// (seed, stream, counter) only, so a request samples the same token wherever and in whatever batch
// it runs (the serving layer gives each of a request's n choices its own stream).
// Trivially copyable (a GPU backend copies it to the device); the history pointers are host
// memory, read only by the host path.
struct SampleSpec {
  int32_t row = 0;           // logit row
  float temperature = 0.0f;  // 0: greedy (ties to the lower id)
  int32_t top_k = 0;         // 0: all
  float top_p = 1.0f;
  uint64_t seed = 0;
  uint64_t stream = 0;
  int64_t counter = 0;  // the position of the token being chosen
  float min_p = 0.0f;   // drop candidates below min_p times the most likely one's probability
  // Penalties (OpenAI / vLLM semantics): presence and frequency over the generated tokens,
  // repetition (divide positive logits, multiply negative ones) over prompt and generated tokens.
  float presence_penalty = 0.0f, frequency_penalty = 0.0f, repetition_penalty = 1.0f;
  const int32_t* prompt_tokens = nullptr;  // [n_prompt] host
  const int32_t* output_tokens = nullptr;  // [n_output] host
  int32_t n_prompt = 0, n_output = 0;
  int32_t logprobs = -1;  // -1: none; else the chosen token's logprob and this many top ones
  // Plain greedy: a device argmax suffices; anything else takes the host reference path.
  bool plain_greedy() const {
    return temperature <= 0.0f && logprobs < 0 && presence_penalty == 0.0f &&
           frequency_penalty == 0.0f && repetition_penalty == 1.0f;
  }
};

// Log-probabilities (log-softmax of the model's raw logits) of a chosen token and the most likely
// ones, as OpenAI's logprobs / top_logprobs (at most 20).
inline constexpr int kMaxTopLogprobs = 20;
struct TokenLogprobs {
  float logprob = 0.0f;
  int32_t n_top = 0;
  int32_t top_ids[kMaxTopLogprobs] = {};
  float top_logprobs[kMaxTopLogprobs] = {};
};

// Uniform in [0, 1) from a seed, a stream and a counter (splitmix64 finaliser; 53-bit mantissa).
double counter_uniform(uint64_t seed, uint64_t stream, int64_t counter);
// The reference choice of one row (host fp32 logits): penalties first; greedy = the first maximum
// (ties to the lower id); otherwise temperature, then top-k, then top-p over the sorted
// candidates, then min-p, and one counter_uniform draw. `lp` (optional) gets the logprobs.
int32_t sample_logits_row(const SampleSpec& spec, const float* logits, int64_t vocab,
                          TokenLogprobs* lp = nullptr);

// The distribution sample_logits_row draws from: the kept candidates (most likely first) and their
// unnormalised weights (greedy: the one maximum, weight 1). Speculative decoding compares a target
// and a draft distribution through it.
struct SamplingDist {
  std::vector<int32_t> ids;
  std::vector<double> w;
  double total = 0;
  // The candidate a uniform draw u in [0, 1) picks (sample_logits_row's rule).
  int32_t draw(double u01) const;
  // Normalised probability of `id` (0 when it is not a candidate).
  double prob(int32_t id) const;
};
SamplingDist sampling_distribution(const SampleSpec& spec, const float* logits, int64_t vocab);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual int num_threads() const = 0;
  virtual Device device() const = 0;
  // Dtype of activations (hidden states, projections, the stage-boundary residual).
  virtual DType act_dtype() const = 0;
  // Dtype of the residual streams X [T, hc * hidden] (the stage-boundary tensor): the sum that runs
  // through every layer, kept wider than the other activations where the backend chooses.
  virtual DType residual_dtype() const { return act_dtype(); }

  // Lets the calling thread use this backend (the CUDA backend makes its GPU current there); a
  // helper thread that builds the model at start-up calls it first.
  virtual void use_on_this_thread() {}
  // Sizes the backend's own scratch for the largest step. Called once before any op.
  virtual void reserve(const BackendLimits& lim) = 0;
  // Storage owned by the backend, alive until it is destroyed. Zero-initialised.
  virtual Tensor alloc(int64_t rows, int64_t cols, DType dtype) = 0;
  // A layer's sequence state (the backend picks each buffer's storage). Zero-initialised.
  virtual LayerState alloc_state(const std::vector<StateAlloc>& layout) = 0;
  // Weights, once at start-up: returns the backend's view (the CPU backend keeps the host bytes).
  virtual Matrix upload(const Matrix& host) = 0;
  // A small f32 / i32 host tensor (norm weights, mHC, sinks, tables) into backend memory.
  virtual Tensor upload(const Tensor& host) = 0;
  // After the experts of a layer were uploaded: build whatever the MoE op needs (moe.table).
  virtual void prepare_moe(MoeWeights& moe) = 0;

  // The step's metadata; every op until the next begin_step reads it (from the backend's copy).
  virtual void begin_step(const BatchView& b) = 0;
  // Runs `body` (ops of the current step). A backend that records graphs (the CUDA backend with
  // BackendLimits.step_graphs) may instead replay what an earlier step with the same key queued:
  // callers use it only for decode-shaped steps (kGraphChunkTokens), whose launches depend on
  // nothing but the key, the limits and device memory. Bit-identical either way.
  virtual void run_graph(const StepGraphKey& key, const std::function<void()>& body) {
    (void)key;
    body();
  }
  // Steps run_graph replayed from a recording so far.
  virtual int64_t graph_replays() const { return 0; }
  // Brackets work for an external profiler that starts paused (the CUDA backend calls
  // cudaProfilerStart / cudaProfilerStop: `ncu --profile-from-start off` profiles only what is in
  // between); no-op elsewhere.
  virtual void profile(bool on) { (void)on; }

  // out[t] = table[ids[t]]  (exact upcast)            out: [T, hidden]
  virtual void embed(const Matrix& table, const BatchView& b, Tensor out) = 0;
  // X[t, j, :] = e[t, :] for every stream j          e: [T, D]  X: [T, hc * D]
  virtual void expand_streams(Tensor e, int hc, Tensor X) = 0;
  // y = x W^T, fp32 accumulate                         x: [M, K]  y: [M, N]
  virtual void linear(Tensor x, const Matrix& w, Tensor y) = 0;
  // Block-diagonal grouped projection: y[:, g] = x[:, g] W_g^T with W viewed [G, N/G, K/G]
  virtual void grouped_linear(Tensor x, const Matrix& w, int groups, Tensor y) = 0;
  // RMS norm over each group of `group` columns; weight [1, group] f32 or null (unweighted). In
  // place OK.
  virtual void rms_norm(Tensor x, const Tensor* weight, int group, float eps, Tensor y) = 0;
  // Rotates the trailing rope dims of each `head_dim` group at the row's position (inverse:
  // -theta).
  virtual void rope(Tensor x, int head_dim, const RopeView& r, const BatchView& b,
                    bool inverse) = 0;
  // mHC: collapse before a sublayer. X: [T, hc*D] -> x: [T, D], post: [T, hc] f32, comb: [T, hc*hc]
  // f32
  virtual void hc_pre(Tensor X, const HcWeights& p, int hc, int sinkhorn_iters, float hc_eps,
                      float norm_eps, Tensor x, Tensor post, Tensor comb) = 0;
  // mHC: expand after a sublayer. X[k] = post_k f + sum_j comb[j,k] X[j] (in place on X)
  virtual void hc_post(Tensor f, Tensor post, Tensor comb, int hc, Tensor X) = 0;
  // Final collapse: h = sum_j (sigmoid(mix_j scale + base_j) + eps) X[j]     h: [T, D]
  virtual void hc_head(Tensor X, const HcWeights& p, int hc, float hc_eps, float norm_eps,
                       Tensor h) = 0;
  // hc_pre, then the sublayer's input norm xn = rms_norm(x, weight, x.cols, norm_eps) (norm_eps:
  // both eps). A backend may do both in one pass (the same results); by default the two calls.
  virtual void hc_pre_norm(Tensor X, const HcWeights& p, int hc, int sinkhorn_iters, float hc_eps,
                           float norm_eps, const Tensor* weight, Tensor x, Tensor xn, Tensor post,
                           Tensor comb) {
    hc_pre(X, p, hc, sinkhorn_iters, hc_eps, norm_eps, x, post, comb);
    rms_norm(x, weight, static_cast<int>(x.cols), norm_eps, xn);
  }
  // hc_head, then the final norm h = rms_norm(h, weight, h.cols, norm_eps) in place; by default
  // the two calls.
  virtual void hc_head_norm(Tensor X, const HcWeights& p, int hc, float hc_eps, float norm_eps,
                            const Tensor* weight, Tensor h) {
    hc_head(X, p, hc, hc_eps, norm_eps, h);
    rms_norm(h, weight, static_cast<int>(h.cols), norm_eps, h);
  }
  // Compressor: feeds projected values a and gates g ([T, k*dim] f32) of every chunk's tokens into
  // the slot's input ring `buf` (args.ring rows per slot) and writes an entry (norm + rope at the
  // window's first position) to `cache` (a per-entry pool, see entry_row) for every window that
  // completes. Window w pools positions [w r, (w+1) r) (CSA: also the A-halves of window w - 1,
  // none for w = 0).
  virtual void compress(Tensor a, Tensor g, const CompressorArgs& args, const BatchView& b,
                        Tensor buf, Tensor cache) = 0;
  // Lightning indexer: for each token the top-k visible compressed entries by
  // sum_h relu(q_h . k_w) * scale_q * weights_h, ties to the lower index; sorted ascending,
  // padded with -1.    q: [T, ih*id]  weights: [T, ih] f32  keys: the pool  out: [T, topk] i32
  virtual void indexer_topk(Tensor q, Tensor weights, int heads, int dim, int ratio, int topk,
                            const BatchView& b, Tensor keys, Tensor out) = 0;
  // Attention with sink over the window (ring + this step's kv rows) and compressed entries
  // (HCA: all visible; CSA: `selected` [T, topk] i32, -1 padded).
  // q: [T, H*dh]  kv: [T, dh]  o: [T, H*dh]
  virtual void attention(Tensor q, Tensor kv, const AttentionArgs& args, const BatchView& b,
                         const LayerState& st, const Tensor* selected, Tensor o) = 0;
  // Writes this step's kv rows (each chunk's last `ring_rows` ones: a verify chunk longer than the
  // window may be rolled back to its first rows) into the slots' window rings of `ring_rows` rows
  // per slot (after attention read them).
  virtual void window_update(Tensor kv, int window, int ring_rows, const BatchView& b,
                             Tensor ring) = 0;
  // Routed + shared experts.   x: [T, D] -> y: [T, D]
  virtual void moe(Tensor x, const MoeArgs& args, const BatchView& b, Tensor y) = 0;
  // out[i] = x[b.logit_rows[i]]
  virtual void gather_logit_rows(Tensor x, const BatchView& b, Tensor out) = 0;
  // dst = src (same shape and dtype).
  virtual void copy(Tensor src, Tensor dst) = 0;
  // Rows [dst_row, dst_row + n) of `t` = rows [src_row, src_row + n) (ranges inside t, not
  // overlapping): copies one state slot to another (prefix-cache snapshots), in stream order.
  virtual void copy_rows(Tensor t, int64_t src_row, int64_t dst_row, int64_t n) = 0;
  // One token id per spec from the f32 logits [rows, vocab]; `ids` is host memory. The only
  // device-to-host transfer of a decode step. `lps` (null, or one per spec) receives logprobs for
  // the specs that ask for them.
  virtual void sample(Tensor logits, const std::vector<SampleSpec>& specs, int32_t* ids,
                      TokenLogprobs* lps = nullptr) = 0;
  // Host copies of whole tensors in their own dtype (transports, logits for callers, tests).
  virtual void to_host(Tensor src, void* dst) = 0;
  virtual void from_host(const void* src, Tensor dst) = 0;
  // Waits for all work queued so far (no-op on the CPU).
  virtual void synchronize() = 0;
  // The device this backend runs on (a CUDA ordinal; -1 on the CPU) and the stream its ops are
  // queued on (a cudaStream_t; null on the CPU): the NCCL stage transport orders its transfers
  // after this stream's work with events.
  virtual int device_ordinal() const { return -1; }
  virtual void* native_stream() { return nullptr; }
  // Makes the device fail as a faulty GPU does (tests: --fault-inject S:STEP:cuda): the CUDA
  // backend queues a kernel that writes to an invalid address, so the next synchronising call
  // reports a CUDA error; the CPU backend has no device to break (no-op).
  virtual void inject_device_fault() {}
  // Non-finite check of the forward pass: notes whether the f32 tensor `x` holds a NaN or an Inf,
  // tagged `where` (a layer index, kNonFiniteEmbedding or kNonFiniteHead); non_finite_where() is
  // the first tag noted since begin_step, or kAllFinite. The CPU backend scans x at once (one read
  // of the residual per layer, next to the layer's reads of its weights: see
  // docs/pipeline_parallel.md for the measured cost). The CUDA backend queues a read-only kernel
  // that records the first tag in a device int (atomicMin), reset by begin_step; the host reads it
  // in the step's own device-to-host copy (sample's ids, or to_host / from_host / synchronize),
  // so ask after that copy: non_finite_where() waits for the stream itself only when no copy came
  // since the last note. The default (a backend without the check) reports kAllFinite.
  virtual void note_non_finite(Tensor x, int where) {
    (void)x;
    (void)where;
  }
  virtual int non_finite_where() { return kAllFinite; }
  static constexpr int kAllFinite = -1, kNonFiniteEmbedding = -2, kNonFiniteHead = -3;
};

// min_work_per_thread: the least work (multiply-adds) worth handing to another thread; tests set 1
// to split every op.
std::unique_ptr<Backend> make_cpu_backend(int num_threads,
                                          int64_t min_work_per_thread = int64_t{1} << 16);

// Whether this build has the CUDA backend, and whether a usable GPU is present.
bool cuda_backend_built();
bool cuda_device_available();
// GPUs visible to this process (0 without the CUDA backend or a driver).
int cuda_device_count();
// Device-to-device copy bandwidth of GPU `device` (bytes read + written per second / 1e9), measured
// with a `bytes` copy (median of 10 after a warm-up); 0 if there is no such GPU.
double cuda_copy_bandwidth_gbs(int device, size_t bytes);
// Free and total bytes of GPU `device` (an error if not built or no such GPU).
Status cuda_memory_info(int device, int64_t* free_bytes, int64_t* total_bytes);
// Activation quantisation before the FP8 projections (--activation-quant): none (the exact
// paths), or fp8: the reference's dynamic 1x128 e4m3 quantisation with power-of-two scales before
// every FP8 `linear` of at least 128 rows (not the grouped wo_a, nor the compressors), the GEMM on
// cuBLASLt's block-scaled FP8 tensor cores.
enum class ActQuant { kNone, kFP8 };

// The CUDA backend on device `device` (an error if not built or no such GPU).
// `kv_dtype`: storage of the window rings and compressed entries (bf16; fp32 for diagnosis);
// `act_dtype`: the activations between ops. With fp32 the backend matches the CPU oracle to ~1e-6
// relative; with bf16 to ~5e-3, which flips top-1 on random-weight models with near-tied logits.
// The residual streams are fp32 either way.
Result<std::unique_ptr<Backend>> make_cuda_backend(int device, DType kv_dtype = DType::kBF16,
                                                   DType act_dtype = DType::kF32,
                                                   ActQuant act_quant = ActQuant::kNone);

}  // namespace sp
