#include "engine/step_codec.h"

#include <cstddef>
#include <cstring>
#include <string>

namespace sp {

namespace {

class Writer {
 public:
  template <typename T>
  void put(const T& v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), p, p + sizeof(T));
  }
  template <typename T>
  void vec(const std::vector<T>& v) {
    put<uint32_t>(static_cast<uint32_t>(v.size()));
    if (v.empty()) return;
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    out.insert(out.end(), p, p + v.size() * sizeof(T));
  }
  std::vector<uint8_t> out;
};

class Reader {
 public:
  explicit Reader(const std::vector<uint8_t>& b) : b_(b) {}
  template <typename T>
  bool get(T& v) {
    if (pos_ + sizeof(T) > b_.size()) return false;
    std::memcpy(&v, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  template <typename T>
  bool vec(std::vector<T>& v) {
    uint32_t n;
    if (!get(n) || pos_ + static_cast<size_t>(n) * sizeof(T) > b_.size()) return false;
    v.resize(n);
    if (n > 0) std::memcpy(v.data(), b_.data() + pos_, n * sizeof(T));
    pos_ += n * sizeof(T);
    return true;
  }
  bool done() const { return pos_ == b_.size(); }

 private:
  const std::vector<uint8_t>& b_;
  size_t pos_ = 0;
};

// Every index a decoded step carries stays inside the step: the stages use them to index the batch
// without further checks.
Status check_step(const StepPlan& p) {
  auto bad = [](const std::string& what) {
    return Status::error("step descriptor: malformed message: " + what);
  };
  const int64_t n = p.batch.num_tokens;
  const int64_t chunks = static_cast<int64_t>(p.batch.chunks.size());
  if (static_cast<int64_t>(p.batch.chunk_of.size()) != n) return bad("chunk_of size");
  for (int32_t c : p.batch.chunk_of)
    if (c < 0 || c >= chunks) return bad("chunk index out of range");
  const int64_t blocks = static_cast<int64_t>(p.batch.block_tables.size());
  for (const SeqChunk& ch : p.batch.chunks)
    if (ch.slot < 0 || ch.start_pos < 0 || ch.n_tokens < 0 || ch.offset < 0 ||
        int64_t{ch.offset} + ch.n_tokens > n || ch.block_table < 0 || ch.num_blocks < 0 ||
        int64_t{ch.block_table} + ch.num_blocks > blocks)
      return bad("chunk out of range");
  for (int32_t b : p.batch.block_tables)
    if (b < 0) return bad("negative block id");
  if (static_cast<int64_t>(p.chunk_request.size()) != chunks) return bad("chunk_request size");
  if (!p.chunk_next.empty() && static_cast<int64_t>(p.chunk_next.size()) != chunks)
    return bad("chunk_next size");
  for (int32_t t : p.chunk_next)
    if (t < kNoDrafts) return bad("chunk_next token");
  const std::vector<int32_t>& logit_rows = p.batch.logit_rows;
  if (p.logit_request.size() != logit_rows.size() || p.logit_position.size() != logit_rows.size())
    return bad("logit row sizes");
  for (int32_t r : logit_rows)
    if (r < 0 || r >= n) return bad("logit row out of range");
  for (const SampleRow& s : p.samples) {
    if (s.logit_index < 0 || s.logit_index >= static_cast<int64_t>(logit_rows.size()))
      return bad("sample row out of range");
    if (s.n_draft < 0 || s.n_draft > kMaxSpecTokens ||
        int64_t{s.logit_index} + s.n_draft >= static_cast<int64_t>(logit_rows.size()))
      return bad("draft rows out of range");
    if (s.stop_offset < 0 || s.n_stop < 0 ||
        int64_t{s.stop_offset} + s.n_stop > static_cast<int64_t>(p.stop_tokens.size()))
      return bad("stop tokens out of range");
    // The bool arrived as a raw byte: anything but 0 or 1 is not a bool value.
    uint8_t b;
    std::memcpy(&b,
                reinterpret_cast<const uint8_t*>(&s) + offsetof(SampleRow, params) +
                    offsetof(SamplingParams, ignore_eos),
                1);
    if (b > 1) return bad("ignore_eos is not a bool");
  }
  for (const auto* copies : {&p.copies_before, &p.copies_after})
    for (const SlotCopy& c : *copies)
      if (c.src < 0 || c.dst < 0 || c.src == c.dst) return bad("slot copy out of range");
  return Status::ok();
}

}  // namespace

std::vector<uint8_t> encode_step(const StepPlan& p) {
  Writer w;
  w.put(StepKind::kStep);
  w.put(p.id);
  w.put<int32_t>(p.batch.num_tokens);
  w.vec(p.batch.token_ids);
  w.vec(p.batch.positions);
  w.vec(p.batch.chunk_of);
  w.vec(p.batch.chunks);
  w.vec(p.batch.block_tables);
  w.vec(p.chunk_request);
  w.vec(p.batch.logit_rows);
  w.vec(p.logit_request);
  w.vec(p.logit_position);
  w.vec(p.samples);
  w.vec(p.penalty_tokens);
  w.vec(p.stop_tokens);
  w.vec(p.chunk_next);
  w.vec(p.copies_before);
  w.vec(p.copies_after);
  w.vec(p.stage_times);
  return std::move(w.out);
}

std::vector<uint8_t> encode_stop() {
  Writer w;
  w.put(StepKind::kStop);
  return std::move(w.out);
}

Result<StepPlan> decode_step(const std::vector<uint8_t>& bytes, StepKind* kind) {
  Reader r(bytes);
  StepPlan p;
  if (!r.get(*kind)) return Status::error("step descriptor: empty message");
  if (*kind == StepKind::kStop) return p;
  if (*kind != StepKind::kStep) return Status::error("step descriptor: unknown kind");
  int32_t n = 0;
  bool ok = r.get(p.id) && r.get(n) && r.vec(p.batch.token_ids) && r.vec(p.batch.positions) &&
            r.vec(p.batch.chunk_of) && r.vec(p.batch.chunks) && r.vec(p.batch.block_tables) &&
            r.vec(p.chunk_request) && r.vec(p.batch.logit_rows) && r.vec(p.logit_request) &&
            r.vec(p.logit_position) && r.vec(p.samples) && r.vec(p.penalty_tokens) &&
            r.vec(p.stop_tokens) && r.vec(p.chunk_next) && r.vec(p.copies_before) &&
            r.vec(p.copies_after) && r.vec(p.stage_times) && r.done();
  p.batch.num_tokens = n;
  if (!ok || static_cast<int32_t>(p.batch.token_ids.size()) != n ||
      p.batch.positions.size() != p.batch.token_ids.size())
    return Status::error("step descriptor: malformed message");
  SP_RETURN_IF_ERROR(check_step(p));
  return p;
}

std::vector<uint8_t> encode_sampled(int64_t step, const std::vector<Sampled>& s,
                                    const std::vector<double>& stage_times,
                                    const std::vector<Drafted>& drafts) {
  Writer w;
  w.put(step);
  w.vec(s);
  w.vec(stage_times);
  w.vec(drafts);
  return std::move(w.out);
}

Result<std::vector<Sampled>> decode_sampled(const std::vector<uint8_t>& bytes, int64_t* step,
                                            std::vector<double>* stage_times,
                                            std::vector<Drafted>* drafts) {
  Reader r(bytes);
  std::vector<Sampled> s;
  std::vector<double> times;
  std::vector<Drafted> d;
  if (!r.get(*step) || !r.vec(s) || !r.vec(times) || !r.vec(d) || !r.done())
    return Status::error("sampled-token message: malformed");
  for (const Drafted& x : d)
    if (x.n < 0 || x.n > kMaxSpecTokens)
      return Status::error("sampled-token message: malformed draft count");
  if (stage_times) *stage_times = std::move(times);
  if (drafts) *drafts = std::move(d);
  return s;
}

}  // namespace sp
