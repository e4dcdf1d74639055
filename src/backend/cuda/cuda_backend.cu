// The CUDA backend: device memory, the step's metadata on the device, and the op dispatch.
#include <cuda_profiler_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "backend/cuda/gemm_lt.h"
#include "backend/cuda/kernels.h"
#include "core/dummy.h"

namespace sp {
namespace cuda {

// A failed CUDA call is an error of the GPU (a fault, a lost device, memory) as often as of the
// code: it is thrown, so the stage that hit it brings the pipeline down naming itself and the GPU
// (the driver catches it), instead of aborting the process without saying which stage it was.
void check_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e == cudaSuccess) return;
  // Clear a non-sticky error, so the next launch check does not report it again as its own.
  cudaGetLastError();
  int dev = -1;
  cudaGetDevice(&dev);
  throw std::runtime_error(str("CUDA error on GPU ", dev, ": ", cudaGetErrorString(e), " (",
                               cudaGetErrorName(e), ") in ", what, " at ", file, ":", line));
}

namespace {
// --fault-inject S:STEP:cuda: an out-of-bounds write, the commonest real GPU fault.
__global__ void fault_kernel(int* p) {
  p[threadIdx.x] = 1;
}
}  // namespace

Workspace::~Workspace() {
  for (void* p : ptr_)
    if (p) cudaFree(p);
}

void* Workspace::get(int slot, size_t bytes) {
  if (slot >= static_cast<int>(ptr_.size())) {
    ptr_.resize(slot + 1, nullptr);
    size_.resize(slot + 1, 0);
  }
  if (bytes > size_[slot]) {
    if (capturing_) throw GraphCaptureAbort{};
    // Growing: nothing queued may still use the old buffer.
    SP_CUDA(cudaStreamSynchronize(stream_));
    if (ptr_[slot]) SP_CUDA(cudaFree(ptr_[slot]));
    size_t n = std::max<size_t>(bytes, 256);
    SP_CUDA(cudaMalloc(&ptr_[slot], n));
    SP_CUDA(cudaMemsetAsync(ptr_[slot], 0, n, stream_));
    SP_CUDA(cudaStreamSynchronize(stream_));
    size_[slot] = n;
    ++epoch_;
  }
  return ptr_[slot];
}

int num_sms() {
  static int n = 0;  // the first GPU's; every GPU this backend runs on is a Hopper of one kind
  if (n == 0) {
    int dev = 0;
    SP_CUDA(cudaGetDevice(&dev));
    SP_CUDA(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  }
  return n;
}

void allow_dynamic_smem(const void* func, size_t bytes) {
  if (bytes == 0) return;
  struct Limit {
    size_t static_bytes = 0;  // the kernel's own __shared__ arrays
    size_t dynamic = 0;       // the dynamic limit raised so far (0: the default)
  };
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, Limit> raised;  // (function, device)
  static std::map<int, int> optin;
  int dev = 0;
  SP_CUDA(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  auto [lim, fresh] = raised.try_emplace({func, dev});
  if (fresh) {
    cudaFuncAttributes at{};
    SP_CUDA(cudaFuncGetAttributes(&at, func));
    lim->second.static_bytes = at.sharedSizeBytes;
  }
  Limit& l = lim->second;
  // Without the attribute a block may use 48 KiB in all, static and dynamic together.
  if (bytes + l.static_bytes <= 48 * 1024 || bytes <= l.dynamic) return;
  auto it = optin.find(dev);
  if (it == optin.end()) {
    int v = 0;
    SP_CUDA(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    it = optin.emplace(dev, v).first;
  }
  SP_CHECK(bytes + l.static_bytes <= static_cast<size_t>(it->second), "a kernel needs ", bytes,
           " bytes of dynamic and ", l.static_bytes, " of static shared memory, GPU ", dev,
           " allows ", it->second, " in all");
  // The limit asked for, not the device's maximum: a kernel with static shared memory as well may
  // not raise its dynamic limit past the maximum less that (cudaErrorInvalidValue).
  SP_CUDA(cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(bytes)));
  l.dynamic = bytes;
}

}  // namespace cuda

namespace {

using cuda::DevBatch;
using cuda::Workspace;

size_t align16(size_t n) {
  return (n + 15) & ~size_t{15};
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, DType kv_dtype, DType act_dtype, ActQuant act_quant)
      : device_(device), state_dtype_(kv_dtype), act_dtype_(act_dtype) {
    SP_CUDA(cudaSetDevice(device));
    SP_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    ws_ = std::make_unique<Workspace>(stream_);
    if (act_quant == ActQuant::kFP8) {
      lt_ = std::make_unique<cuda::LtGemm>(device);
      ws_->fp8_gemm = lt_.get();
    }
    for (auto& e : meta_ready_) SP_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    clear_graphs();
    if (lt_) {
      // How much of the run the fp8 path covered (the projections below its row threshold, and
      // shapes it declines, ran on the exact kernels).
      std::fprintf(stderr,
                   "cuda: --activation-quant fp8: %lld FP8 projections through cuBLASLt, %lld "
                   "declined by shape, %lld below %lld rows (exact kernels)\n",
                   static_cast<long long>(lt_->taken()), static_cast<long long>(lt_->declined()),
                   static_cast<long long>(fp8_linear_calls_ - lt_->taken() - lt_->declined()),
                   static_cast<long long>(cuda::kLtMinRows));
      lt_.reset();
    }
    ws_.reset();
    for (void* p : allocs_) cudaFree(p);
    for (void* p : pinned_) cudaFreeHost(p);
    for (auto& e : meta_ready_) cudaEventDestroy(e);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  int num_threads() const override { return 1; }
  Device device() const override { return Device::kCuda; }
  DType act_dtype() const override { return act_dtype_; }
  DType residual_dtype() const override { return DType::kF32; }

  void use_on_this_thread() override { SP_CUDA(cudaSetDevice(device_)); }

  void reserve(const BackendLimits& lim) override {
    SP_CUDA(cudaSetDevice(device_));
    lim_ = lim;
    grow_meta(lim.max_tokens, lim.max_seqs, lim.max_blocks, lim.max_logit_rows);
    specs_host_ =
        static_cast<SampleSpec*>(pinned(sizeof(SampleSpec) * std::max(1, lim.max_logit_rows)));
    specs_dev_ = static_cast<SampleSpec*>(
        device_alloc(sizeof(SampleSpec) * std::max(1, lim.max_logit_rows)));
    // [non-finite flag, ids...]: the flag comes back in the copy that brings the sampled ids.
    const size_t out_bytes = sizeof(int32_t) * (1 + std::max(1, lim.max_logit_rows));
    out_host_ = static_cast<int32_t*>(pinned(out_bytes));
    out_dev_ = static_cast<int32_t*>(device_alloc(out_bytes));
    ids_host_ = out_host_ + 1;
    ids_dev_ = out_dev_ + 1;
    out_host_[0] = cuda::kNonFiniteKeyClean;
    SP_CUDA(cudaMemsetAsync(out_dev_, 0x7f, sizeof(int32_t), stream_));
  }

  Tensor alloc(int64_t rows, int64_t cols, DType dtype) override {
    SP_CUDA(cudaSetDevice(device_));
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(rows * cols * dtype_size(dtype), 1));
    void* p = device_alloc(bytes);
    SP_CUDA(cudaMemsetAsync(p, 0, bytes, stream_));
    return Tensor::of(p, rows, cols, dtype, Device::kCuda);
  }

  LayerState alloc_state(const std::vector<StateAlloc>& layout) override {
    LayerState st;
    for (const StateAlloc& a : layout)
      st.*a.field =
          alloc(a.rows, a.cols, a.kind == StateKind::kCompressorBuf ? DType::kF32 : state_dtype_);
    return st;
  }

  Matrix upload(const Matrix& host) override {
    if (!host.valid()) return host;
    Matrix m = host;
    const size_t vb = static_cast<size_t>(host.value_bytes()),
                 sb = static_cast<size_t>(host.scale_bytes());
    uint8_t* p = static_cast<uint8_t*>(device_alloc(align16(vb) + sb));
    m.data = p;
    if (sb > 0) m.scale = p + align16(vb);
    if (host.dummy.on && !host.data) {
      // --load-format dummy: the bytes are made here, equal to the host generator's.
      SP_CHECK(host.scale_dtype == DType::kE8M0, host.name, ": described scales are E8M0");
      if (host.format == WeightFormat::kFP8 && !e4m3_table_) {
        e4m3_table_ = static_cast<uint8_t*>(device_alloc(65536));
        SP_CUDA(cudaMemcpyAsync(e4m3_table_, bf16_to_e4m3_table(), 65536, cudaMemcpyHostToDevice,
                                stream_));
      }
      cuda::dummy_values(stream_, host, p, e4m3_table_);
      if (sb > 0)
        SP_CUDA(cudaMemsetAsync(p + align16(vb), dummy_scale_byte(host.dummy), sb, stream_));
      m.dummy = DummyGen{};
    } else {
      SP_CUDA(cudaMemcpyAsync(p, host.data, vb, cudaMemcpyHostToDevice, stream_));
      if (sb > 0)
        SP_CUDA(cudaMemcpyAsync(p + align16(vb), host.scale, sb, cudaMemcpyHostToDevice, stream_));
    }
    m.device = Device::kCuda;
    // The fp8 path's fp32 copy of the block scales, made once here rather than on first use.
    if (lt_ && m.format == WeightFormat::kFP8 && m.scale) lt_->prepare(stream_, m);
    // The host bytes may be a mapped file: finish before the caller may unmap it.
    SP_CUDA(cudaStreamSynchronize(stream_));
    return m;
  }

  Tensor upload(const Tensor& host) override {
    if (!host.data) return host;
    Tensor t = alloc(host.rows, host.cols, host.dtype);
    from_host(host.data, t);
    return t;
  }

  void prepare_moe(MoeWeights& moe) override {
    cuda::prepare_moe(moe, stream_);
    SP_CUDA(cudaStreamSynchronize(stream_));
  }
  // cuda::set_moe_tc_min_tokens (kernels.h).
  void set_moe_tc_min_tokens(int n) {
    SP_CHECK(n >= 0 && n <= 8, "moe tensor-core minimum ", n, " (0: by the step, or 1..8)");
    if (n == ws_->moe_tc_min_tokens) return;
    SP_CUDA(cudaStreamSynchronize(stream_));
    clear_graphs();
    ws_->moe_tc_min_tokens = n;
  }

  void begin_step(const BatchView& b) override {
    // The stage's thread owns this device, but a step may be driven from another thread (the
    // server's loop): every step selects it (a cheap driver call).
    SP_CUDA(cudaSetDevice(device_));
    const int T = b.num_tokens, C = static_cast<int>(b.chunks.size()),
              B = static_cast<int>(b.block_tables.size()),
              L = static_cast<int>(b.logit_rows.size());
    grow_meta(T, C, B, L);
    // Two pinned staging buffers: the one written now was last copied two steps ago.
    cur_ ^= 1;
    SP_CUDA(cudaEventSynchronize(meta_ready_[cur_]));
    uint8_t* h = static_cast<uint8_t*>(meta_host_[cur_]);
    // Every array at the same offset every step (sized for the capacity): a recorded step's
    // kernels read the next step's metadata at the addresses they were recorded with.
    const MetaLayout& m = meta_layout_;
    auto put = [&](size_t at, const void* src, size_t n) {
      if (n) std::memcpy(h + at, src, n);
    };
    put(m.tok, b.token_ids.data(), 4 * static_cast<size_t>(T));
    put(m.pos, b.positions.data(), 4 * static_cast<size_t>(T));
    put(m.cof, b.chunk_of.data(), 4 * static_cast<size_t>(T));
    put(m.chk, b.chunks.data(), sizeof(SeqChunk) * static_cast<size_t>(C));
    put(m.blk, b.block_tables.data(), 4 * static_cast<size_t>(B));
    put(m.lr, b.logit_rows.data(), 4 * static_cast<size_t>(L));
    // Up to the end of this step's block tables (the largest array, last), not the capacity.
    const size_t used = m.blk + 4 * static_cast<size_t>(B);
    SP_CUDA(cudaMemcpyAsync(meta_dev_, h, used, cudaMemcpyHostToDevice, stream_));
    SP_CUDA(cudaEventRecord(meta_ready_[cur_], stream_));
    const uint8_t* d = static_cast<const uint8_t*>(meta_dev_);
    dev_.num_tokens = T;
    dev_.num_chunks = C;
    dev_.num_logit_rows = L;
    dev_.block_tokens = lim_.block_tokens;
    dev_.max_positions = lim_.max_model_len;
    dev_.static_shapes = lim_.max_model_len > 0 && decode_shaped_chunk(b) > 0;
    dev_.token_ids = reinterpret_cast<const int32_t*>(d + m.tok);
    dev_.positions = reinterpret_cast<const int32_t*>(d + m.pos);
    dev_.chunk_of = reinterpret_cast<const int32_t*>(d + m.cof);
    dev_.chunks = reinterpret_cast<const SeqChunk*>(d + m.chk);
    dev_.block_tables = reinterpret_cast<const int32_t*>(d + m.blk);
    dev_.logit_rows = reinterpret_cast<const int32_t*>(d + m.lr);
    dev_.host = &b;
    // The non-finite flag starts clean every step (stream-ordered: no wait here).
    if (out_dev_) SP_CUDA(cudaMemsetAsync(out_dev_, 0x7f, sizeof(int32_t), stream_));
    nf_where_ = kAllFinite;
    nf_dirty_ = false;
  }

  int64_t graph_replays() const override { return graph_launches_; }
  void profile(bool on) override {
    SP_CUDA(cudaStreamSynchronize(stream_));
    SP_CUDA(on ? cudaProfilerStart() : cudaProfilerStop());
  }

  // First step of a key: run eagerly (the workspace reaches its size for the key); second: record
  // it into a graph (nothing may wait or allocate meanwhile) and launch that; later: launch the
  // graph. A step that cannot be recorded (something grows) runs eagerly from then on.
  void run_graph(const StepGraphKey& key, const std::function<void()>& body) override {
    if (!lim_.step_graphs || lim_.max_model_len <= 0) return body();
    // A workspace buffer was reallocated since the graphs were recorded (a larger step ran
    // eagerly): they point at freed memory. Record them again (growth waited for the stream, so
    // no recorded launch is still running).
    if (ws_->epoch() != graphs_epoch_) {
      clear_graphs();
      graphs_epoch_ = ws_->epoch();
    }
    auto it = graphs_.find(key);
    if (it == graphs_.end()) {
      if (graphs_.size() >= kMaxGraphs) return body();
      it = graphs_.emplace(key, StepGraph{}).first;
    }
    StepGraph& g = it->second;
    if (g.exec) {
      SP_CUDA(cudaGraphLaunch(g.exec, stream_));
      if (g.notes_flag) nf_dirty_ = true;
      ++graph_launches_;
      return;
    }
    if (g.failed || g.runs++ == 0) return body();
    const bool dirty = nf_dirty_;
    nf_dirty_ = false;
    SP_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    ws_->set_capturing(true);
    bool recorded = true;
    try {
      body();
    } catch (...) {  // GraphCaptureAbort, or a call a capture refuses: run it eagerly below
      recorded = false;
    }
    ws_->set_capturing(false);
    cudaGraph_t graph = nullptr;
    const cudaError_t e = cudaStreamEndCapture(stream_, &graph);
    const bool notes = nf_dirty_;
    nf_dirty_ = dirty;
    if (!recorded || e != cudaSuccess || graph == nullptr) {
      cudaGetLastError();
      if (graph) cudaGraphDestroy(graph);
      g.failed = true;
      return body();  // eagerly: a real error is raised here
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t ie = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (ie != cudaSuccess || exec == nullptr || ws_->epoch() != graphs_epoch_) {
      cudaGetLastError();
      if (ie == cudaSuccess && exec) cudaGraphExecDestroy(exec);
      g.failed = true;
      return body();
    }
    g.exec = exec;
    g.notes_flag = notes;
    SP_CUDA(cudaGraphLaunch(g.exec, stream_));
    if (notes) nf_dirty_ = true;
    ++graph_launches_;
  }

  // One read of x per call, on the stream, nothing waited for; the flag reaches the host with the
  // next copy this backend makes anyway (sampled ids, to_host of the boundary tensor or logits,
  // from_host, synchronize), or, if none came since, when non_finite_where() is asked.
  void note_non_finite(Tensor x, int where) override {
    if (x.dtype != DType::kF32) return;
    SP_CHECK(out_dev_ != nullptr, "note_non_finite before reserve");
    SP_CHECK(where == kNonFiniteEmbedding || where == kNonFiniteHead ||
                 (where >= 0 && where < cuda::kNonFiniteKeyHead - 1),
             "note_non_finite: bad place ", where);
    const int32_t key = where == kNonFiniteEmbedding ? 0
                        : where == kNonFiniteHead    ? cuda::kNonFiniteKeyHead
                                                     : where + 1;
    cuda::note_non_finite(stream_, x, key, out_dev_);
    nf_dirty_ = true;
  }
  int non_finite_where() override {
    if (nf_dirty_) sync_with_flag();  // no copy since the last check: this is the sync point
    return nf_where_;
  }

  void embed(const Matrix& table, const BatchView& b, Tensor out) override {
    cuda::embed(stream_, table, batch(b), out);
  }
  void expand_streams(Tensor e, int hc, Tensor X) override {
    cuda::expand_streams(stream_, e, hc, X);
  }
  void linear(Tensor x, const Matrix& w, Tensor y) override {
    SP_CHECK(x.cols == w.in && y.cols == w.out && x.rows == y.rows, w.name, ": x ", x.rows, "x",
             x.cols, " y ", y.rows, "x", y.cols, " W ", w.out, "x", w.in);
    if (w.format == WeightFormat::kFP8) ++fp8_linear_calls_;
    cuda::linear(stream_, *ws_, x, w, y);
  }
  void grouped_linear(Tensor x, const Matrix& w, int groups, Tensor y) override {
    cuda::grouped_linear(stream_, *ws_, x, w, groups, y);
  }
  void rms_norm(Tensor x, const Tensor* weight, int group, float eps, Tensor y) override {
    cuda::rms_norm(stream_, x, weight, group, eps, y);
  }
  void rope(Tensor x, int head_dim, const RopeView& r, const BatchView& b, bool inverse) override {
    cuda::rope(stream_, x, head_dim, r, batch(b), inverse);
  }
  void hc_pre(Tensor X, const HcWeights& p, int hc, int iters, float hc_eps, float norm_eps,
              Tensor x, Tensor post, Tensor comb) override {
    cuda::hc_pre(stream_, *ws_, X, p, hc, iters, hc_eps, norm_eps, x, post, comb);
  }
  void hc_post(Tensor f, Tensor post, Tensor comb, int hc, Tensor X) override {
    cuda::hc_post(stream_, f, post, comb, hc, X);
  }
  void hc_head(Tensor X, const HcWeights& p, int hc, float hc_eps, float norm_eps,
               Tensor h) override {
    cuda::hc_head(stream_, *ws_, X, p, hc, hc_eps, norm_eps, h);
  }
  void hc_pre_norm(Tensor X, const HcWeights& p, int hc, int iters, float hc_eps, float norm_eps,
                   const Tensor* weight, Tensor x, Tensor xn, Tensor post, Tensor comb) override {
    cuda::hc_pre_norm(stream_, *ws_, X, p, hc, iters, hc_eps, norm_eps, weight, x, xn, post, comb);
  }
  void hc_head_norm(Tensor X, const HcWeights& p, int hc, float hc_eps, float norm_eps,
                    const Tensor* weight, Tensor h) override {
    cuda::hc_head_norm(stream_, *ws_, X, p, hc, hc_eps, norm_eps, weight, h);
  }
  void compress(Tensor a, Tensor g, const CompressorArgs& args, const BatchView& b, Tensor buf,
                Tensor cache) override {
    cuda::compress(stream_, *ws_, a, g, args, batch(b), buf, cache);
  }
  void indexer_topk(Tensor q, Tensor weights, int heads, int dim, int ratio, int topk,
                    const BatchView& b, Tensor keys, Tensor out) override {
    cuda::indexer_topk(stream_, *ws_, q, weights, heads, dim, ratio, topk, batch(b), keys, out);
  }
  void attention(Tensor q, Tensor kv, const AttentionArgs& args, const BatchView& b,
                 const LayerState& st, const Tensor* selected, Tensor o) override {
    cuda::attention(stream_, *ws_, q, kv, args, batch(b), st, selected, o);
  }
  void window_update(Tensor kv, int window, int ring_rows, const BatchView& b,
                     Tensor ring) override {
    cuda::window_update(stream_, kv, window, ring_rows, batch(b), ring);
  }
  void moe(Tensor x, const MoeArgs& args, const BatchView& b, Tensor y) override {
    cuda::moe(stream_, *ws_, x, args, batch(b), y);
  }
  void gather_logit_rows(Tensor x, const BatchView& b, Tensor out) override {
    cuda::gather_rows(stream_, x, batch(b), out);
  }
  void copy(Tensor src, Tensor dst) override { cuda::copy(stream_, src, dst); }
  void copy_rows(Tensor t, int64_t src_row, int64_t dst_row, int64_t n) override {
    cuda::copy_rows(stream_, t, src_row, dst_row, n);
  }

  void sample(Tensor logits, const std::vector<SampleSpec>& specs, int32_t* ids,
              TokenLogprobs* lps) override {
    const int n = static_cast<int>(specs.size());
    if (n == 0) return;
    SP_CHECK(n <= std::max(1, lim_.max_logit_rows), n, " sample rows over the limit");
    std::memcpy(specs_host_, specs.data(), sizeof(SampleSpec) * n);
    SP_CUDA(cudaMemcpyAsync(specs_dev_, specs_host_, sizeof(SampleSpec) * n, cudaMemcpyHostToDevice,
                            stream_));
    cuda::sample(stream_, *ws_, logits, specs_dev_, specs_host_, n, ids_dev_);
    // The ids and the non-finite flag in front of them: one copy, one wait.
    SP_CUDA(cudaMemcpyAsync(out_host_, out_dev_, sizeof(int32_t) * (n + 1), cudaMemcpyDeviceToHost,
                            stream_));
    SP_CUDA(cudaStreamSynchronize(stream_));
    absorb_flag();
    std::memcpy(ids, ids_host_, sizeof(int32_t) * n);
    // Rows with a temperature, penalties or logprobs are chosen on the host with the reference
    // algorithm (a device sampler for them is future work); plain greedy rows never leave the
    // device (the device argmax of the other rows is overwritten here).
    std::vector<float> row;
    for (int i = 0; i < n; ++i) {
      if (specs[i].plain_greedy()) continue;
      row.resize(static_cast<size_t>(logits.cols));
      to_host(logits.slice_rows(specs[i].row, 1), row.data());
      ids[i] = sample_logits_row(specs[i], row.data(), logits.cols, lps ? &lps[i] : nullptr);
    }
  }

  void to_host(Tensor src, void* dst) override {
    if (src.numel() == 0) return;
    SP_CUDA(cudaSetDevice(device_));
    const size_t es = static_cast<size_t>(src.elem_size());
    SP_CUDA(cudaMemcpy2DAsync(dst, src.cols * es, src.data, src.stride * es, src.cols * es,
                              src.rows, cudaMemcpyDeviceToHost, stream_));
    sync_with_flag();
  }
  void from_host(const void* src, Tensor dst) override {
    if (dst.numel() == 0) return;
    SP_CUDA(cudaSetDevice(device_));
    const size_t es = static_cast<size_t>(dst.elem_size());
    SP_CUDA(cudaMemcpy2DAsync(dst.data, dst.stride * es, src, dst.cols * es, dst.cols * es,
                              dst.rows, cudaMemcpyHostToDevice, stream_));
    sync_with_flag();
  }
  void synchronize() override { sync_with_flag(); }
  int device_ordinal() const override { return device_; }
  void* native_stream() override { return stream_; }
  void inject_device_fault() override {
    SP_CUDA(cudaSetDevice(device_));
    cuda::fault_kernel<<<1, 32, 0, stream_>>>(reinterpret_cast<int*>(uintptr_t{16}));
    SP_CUDA_LAUNCH();
  }

 private:
  const DevBatch& batch(const BatchView& b) {
    SP_CHECK(dev_.host == &b, "CUDA op called with a batch that begin_step did not receive");
    return dev_;
  }
  // Waits for the stream; if a check ran since the flag was last read, its 4 bytes come back in
  // the same wait.
  void sync_with_flag() {
    const bool flag = nf_dirty_;
    if (flag)
      SP_CUDA(
          cudaMemcpyAsync(out_host_, out_dev_, sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
    SP_CUDA(cudaStreamSynchronize(stream_));
    if (flag) absorb_flag();
  }
  // After a wait that followed a copy of the flag into out_host_[0].
  void absorb_flag() {
    const int32_t key = out_host_[0];
    nf_where_ = key == cuda::kNonFiniteKeyClean  ? kAllFinite
                : key == 0                       ? kNonFiniteEmbedding
                : key == cuda::kNonFiniteKeyHead ? kNonFiniteHead
                                                 : key - 1;
    nf_dirty_ = false;
  }
  struct MetaLayout {
    int T = 0, C = 0, B = 0, L = 0;  // capacities
    size_t tok = 0, pos = 0, cof = 0, chk = 0, blk = 0, lr = 0, bytes = 0;
  };
  // Grows the metadata buffers to hold a step of T tokens, C chunks, B block-table entries and L
  // logit rows (at least the limits). Moving them invalidates every recorded step.
  void grow_meta(int T, int C, int B, int L) {
    MetaLayout& m = meta_layout_;
    if (meta_dev_ && T <= m.T && C <= m.C && B <= m.B && L <= m.L) return;
    SP_CUDA(cudaStreamSynchronize(stream_));
    clear_graphs();
    m.T = std::max({T, m.T, lim_.max_tokens, 1});
    m.C = std::max({C, m.C, lim_.max_seqs, 1});
    m.B = std::max({B, m.B, lim_.max_blocks, 1});
    m.L = std::max({L, m.L, lim_.max_logit_rows, 1});
    m.tok = 0;
    m.pos = m.tok + align16(4 * static_cast<size_t>(m.T));
    m.cof = m.pos + align16(4 * static_cast<size_t>(m.T));
    m.chk = m.cof + align16(4 * static_cast<size_t>(m.T));
    m.lr = m.chk + align16(sizeof(SeqChunk) * static_cast<size_t>(m.C));
    m.blk = m.lr + align16(4 * static_cast<size_t>(m.L));  // last: the copy ends at its use
    m.bytes = m.blk + align16(4 * static_cast<size_t>(m.B));
    for (void*& p : meta_host_) {
      if (p) release_pinned(p);
      p = pinned(m.bytes);
    }
    if (meta_dev_) release_device(meta_dev_);
    meta_dev_ = device_alloc(m.bytes);
  }
  void clear_graphs() {
    for (auto& [key, g] : graphs_)
      if (g.exec) cudaGraphExecDestroy(g.exec);
    graphs_.clear();
  }
  void* device_alloc(size_t bytes) {
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      size_t free_b = 0, total = 0;
      cudaGetLastError();
      cudaMemGetInfo(&free_b, &total);
      SP_CHECK(false, "CUDA out of memory on GPU ", device_, ": asked for ", bytes, " bytes, ",
               free_b, " of ", total, " free (the memory plan should have refused this)");
    }
    allocs_.push_back(p);
    return p;
  }
  void release_device(void* p) {
    allocs_.erase(std::find(allocs_.begin(), allocs_.end(), p));
    SP_CUDA(cudaFree(p));
  }
  void* pinned(size_t bytes) {
    void* p = nullptr;
    SP_CUDA(cudaMallocHost(&p, bytes));
    pinned_.push_back(p);
    return p;
  }
  void release_pinned(void* p) {
    pinned_.erase(std::find(pinned_.begin(), pinned_.end(), p));
    SP_CUDA(cudaFreeHost(p));
  }

  int device_;
  DType state_dtype_, act_dtype_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Workspace> ws_;
  std::unique_ptr<cuda::LtGemm> lt_;  // --activation-quant fp8
  uint8_t* e4m3_table_ = nullptr;     // [65536] bf16 -> e4m3 codes: dummy FP8 weights, first use
  int64_t fp8_linear_calls_ = 0;      // linear() calls with an FP8 weight
  BackendLimits lim_;
  std::vector<void*> allocs_, pinned_;
  void* meta_host_[2] = {nullptr, nullptr};
  cudaEvent_t meta_ready_[2];
  void* meta_dev_ = nullptr;
  MetaLayout meta_layout_;
  struct StepGraph {
    int runs = 0;             // eager runs so far (the first sizes the workspace)
    bool failed = false;      // could not be recorded: always eager
    bool notes_flag = false;  // the step queues non-finite checks
    cudaGraphExec_t exec = nullptr;
  };
  static constexpr size_t kMaxGraphs = 256;
  std::map<StepGraphKey, StepGraph> graphs_;
  int64_t graphs_epoch_ = 0;  // the workspace's epoch the graphs were recorded in
  int64_t graph_launches_ = 0;
  int cur_ = 0;
  DevBatch dev_;
  SampleSpec* specs_host_ = nullptr;
  SampleSpec* specs_dev_ = nullptr;
  int32_t* out_host_ = nullptr;  // pinned [1 + max_logit_rows]: the non-finite flag, then ids
  int32_t* out_dev_ = nullptr;   // the same on the device; out_dev_[0] is the flag
  int32_t* ids_host_ = nullptr;  // out_host_ + 1
  int32_t* ids_dev_ = nullptr;   // out_dev_ + 1
  int nf_where_ = kAllFinite;    // the flag as last read (Backend::non_finite_where's values)
  bool nf_dirty_ = false;        // a check was queued since the flag was last read
};

}  // namespace

bool cuda_backend_built() {
  return true;
}

bool cuda_device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return false;
  }
  return n > 0;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void cuda::set_moe_tc_min_tokens(Backend& b, int n) {
  auto* c = dynamic_cast<CudaBackend*>(&b);
  SP_CHECK(c != nullptr, "set_moe_tc_min_tokens: ", b.name(), " is not the CUDA backend");
  c->set_moe_tc_min_tokens(n);
}

double cuda_copy_bandwidth_gbs(int device, size_t bytes) {
  if (!cuda_device_available()) return 0;
  SP_CUDA(cudaSetDevice(device));
  void *a = nullptr, *b = nullptr;
  SP_CUDA(cudaMalloc(&a, bytes));
  SP_CUDA(cudaMalloc(&b, bytes));
  SP_CUDA(cudaMemset(a, 1, bytes));
  cudaEvent_t e0, e1;
  SP_CUDA(cudaEventCreate(&e0));
  SP_CUDA(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int i = 0; i < 11; ++i) {
    SP_CUDA(cudaEventRecord(e0));
    SP_CUDA(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    SP_CUDA(cudaEventRecord(e1));
    SP_CUDA(cudaEventSynchronize(e1));
    float t = 0;
    SP_CUDA(cudaEventElapsedTime(&t, e0, e1));
    if (i > 0) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) / (ms[ms.size() / 2] * 1e-3) / 1e9;
}

Status cuda_memory_info(int device, int64_t* free_bytes, int64_t* total_bytes) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || device < 0 || device >= n) {
    cudaGetLastError();
    return Status::error(str("no CUDA GPU ", device));
  }
  int prev = 0;
  SP_CUDA(cudaGetDevice(&prev));
  SP_CUDA(cudaSetDevice(device));
  size_t f = 0, t = 0;
  SP_CUDA(cudaMemGetInfo(&f, &t));
  SP_CUDA(cudaSetDevice(prev));
  *free_bytes = static_cast<int64_t>(f);
  *total_bytes = static_cast<int64_t>(t);
  return Status::ok();
}

Result<std::unique_ptr<Backend>> make_cuda_backend(int device, DType kv_dtype, DType act_dtype,
                                                   ActQuant act_quant) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    return Status::error("--device cuda: no usable CUDA GPU is visible to this process");
  }
  if (device < 0 || device >= n)
    return Status::error(str("--device cuda: GPU ", device, " requested but only ", n,
                             " visible (stage placement uses one GPU per stage on each machine)"));
  cudaDeviceProp prop;
  SP_CUDA(cudaGetDeviceProperties(&prop, device));
  if (prop.major != 9)
    return Status::error(str("--device cuda: GPU ", device, " is ", prop.name, " (compute ",
                             prop.major, ".", prop.minor,
                             "); this build targets Hopper (sm_90a) only"));
  SP_CHECK(kv_dtype == DType::kBF16 || kv_dtype == DType::kF32, "kv dtype");
  SP_CHECK(act_dtype == DType::kBF16 || act_dtype == DType::kF32, "act dtype");
  if (act_quant == ActQuant::kFP8)
    if (std::string why = cuda::lt_unavailable(); !why.empty())
      return Status::error(str("--activation-quant fp8: ", why));
  return std::unique_ptr<Backend>(
      std::make_unique<CudaBackend>(device, kv_dtype, act_dtype, act_quant));
}

}  // namespace sp
