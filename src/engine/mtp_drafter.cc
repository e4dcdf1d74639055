// The MTP layer as the draft source (speculative.h). After a step, the layer runs over every
// standing row of every speculated chunk (it keeps its own window state, so it must see every
// position once), each row paired with the token that follows it; the last row of a sequence that
// wants drafts yields the first draft, and the layer fed its own output streams yields the next.
#include <algorithm>

#include "engine/speculative.h"

namespace sp {

namespace {

class MtpDrafter : public DraftSource {
 public:
  MtpDrafter(Model& model, int k) : m_(model), k_(k) {
    SP_CHECK(model.has_mtp(), "--speculative mtp: this stage has no MTP layer");
  }

  void propose(const StepPlan& plan, Tensor X, const std::vector<ChunkAfterVerify>& chunks,
               std::vector<Drafted>* out, std::map<int, DraftDists>* q) override {
    const BatchView& b = plan.batch;
    // Pass 1: the standing rows whose next token is known.
    BatchView mb;
    std::vector<int32_t> src;  // X row of each MTP row
    std::vector<Seq> seqs;
    for (const ChunkAfterVerify& c : chunks) {
      int rows = c.rows;
      while (rows > 0 && c.next[static_cast<size_t>(rows - 1)] < 0) --rows;
      if (rows == 0) continue;
      const SeqChunk& ch = b.chunks[static_cast<size_t>(c.chunk)];
      add_chunk(mb, ch, b, ch.start_pos, rows);
      for (int i = 0; i < rows; ++i) {
        mb.token_ids.push_back(c.next[static_cast<size_t>(i)]);
        src.push_back(ch.offset + i);
      }
      if (c.draft && rows == c.rows && c.sample) {
        mb.logit_rows.push_back(mb.num_tokens - 1);
        Seq s;
        s.request = plan.chunk_request[static_cast<size_t>(c.chunk)];
        s.chunk = ch;
        s.table.assign(b.block_tables.begin() + ch.block_table,
                       b.block_tables.begin() + ch.block_table + ch.num_blocks);
        s.last = ch.start_pos + rows - 1;
        s.params = c.sample->params;
        seqs.push_back(std::move(s));
      }
    }
    if (mb.num_tokens == 0) return;
    Tensor in = m_.mtp_hidden().slice_rows(0, mb.num_tokens);
    gather(X, src, in, mb);
    Tensor logits = m_.mtp_forward(mb, in, m_.mtp_streams(mb.num_tokens));
    draw(logits, seqs, 0);
    // Passes 2 .. K: each drafting sequence's last MTP row again, one position on, with its own
    // output streams and the draft just made.
    std::vector<int32_t> prev_rows = mb.logit_rows;
    std::vector<Seq> done;  // sequences whose drafts end here (near max_model_len)
    for (int k = 1; k < k_ && !seqs.empty(); ++k) {
      BatchView cb;
      std::vector<int32_t> from;
      std::vector<Seq> next;
      for (size_t i = 0; i < seqs.size(); ++i) {
        Seq& s = seqs[i];
        const int64_t pos = s.last + k;  // the MTP position of this pass
        if (pos + 1 >= m_.limits().max_model_len) {
          done.push_back(std::move(s));
          continue;
        }
        add_chunk_table(cb, s.chunk, s.table, pos);
        cb.token_ids.push_back(s.drafts.back());
        cb.logit_rows.push_back(cb.num_tokens - 1);
        from.push_back(prev_rows[i]);
        next.push_back(std::move(s));
      }
      seqs = std::move(next);
      if (cb.num_tokens == 0) break;
      Tensor in2 = m_.mtp_hidden().slice_rows(0, cb.num_tokens);
      gather(m_.mtp_streams(std::max(mb.num_tokens, cb.num_tokens)), from, in2, cb);
      Tensor l2 = m_.mtp_forward(cb, in2, m_.mtp_streams(cb.num_tokens));
      draw(l2, seqs, k);
      prev_rows = cb.logit_rows;
    }
    for (Seq& s : seqs) done.push_back(std::move(s));
    for (Seq& s : done) {
      Drafted d;
      d.request = s.request;
      d.n = static_cast<int32_t>(s.drafts.size());
      std::copy(s.drafts.begin(), s.drafts.end(), d.tokens);
      out->push_back(d);
      if (s.params.temperature > 0.0f) (*q)[s.chunk.slot] = DraftDists{s.request, std::move(s.q)};
    }
  }

 private:
  struct Seq {
    int64_t request = 0;
    SeqChunk chunk;
    std::vector<int32_t> table;
    int64_t last = 0;  // the last standing position (its next token is the newest token)
    SamplingParams params;
    std::vector<int32_t> drafts;
    std::vector<SamplingDist> q;
  };

  // A chunk of `rows` positions from `start` for the sequence of `ch` (its block table copied).
  static void add_chunk(BatchView& mb, const SeqChunk& ch, const BatchView& b, int64_t start,
                        int rows) {
    SeqChunk c = ch;
    c.start_pos = static_cast<int32_t>(start);
    c.n_tokens = rows;
    c.offset = mb.num_tokens;
    c.block_table = static_cast<int32_t>(mb.block_tables.size());
    mb.block_tables.insert(mb.block_tables.end(), b.block_tables.begin() + ch.block_table,
                           b.block_tables.begin() + ch.block_table + ch.num_blocks);
    mb.chunks.push_back(c);
    for (int i = 0; i < rows; ++i) {
      mb.positions.push_back(static_cast<int32_t>(start + i));
      mb.chunk_of.push_back(static_cast<int32_t>(mb.chunks.size() - 1));
    }
    mb.num_tokens += rows;
  }
  static void add_chunk_table(BatchView& mb, const SeqChunk& ch, const std::vector<int32_t>& table,
                              int64_t pos) {
    SeqChunk c = ch;
    c.start_pos = static_cast<int32_t>(pos);
    c.n_tokens = 1;
    c.offset = mb.num_tokens;
    c.block_table = static_cast<int32_t>(mb.block_tables.size());
    mb.block_tables.insert(mb.block_tables.end(), table.begin(), table.end());
    mb.chunks.push_back(c);
    mb.positions.push_back(static_cast<int32_t>(pos));
    mb.chunk_of.push_back(static_cast<int32_t>(mb.chunks.size() - 1));
    mb.num_tokens += 1;
  }

  // dst[i] = src[rows[i]] on the backend (a step of its own: the backend's ops take the batch
  // that begin_step received).
  void gather(Tensor from, const std::vector<int32_t>& rows, Tensor dst, const BatchView& like) {
    gb_ = like;
    gb_.logit_rows = rows;
    m_.begin_step(gb_);
    m_.backend().gather_logit_rows(from, gb_, dst);
  }

  // The k-th draft of every sequence from the MTP logits (row i: sequence i): greedy on the
  // backend, sampled ones from their distribution on the host (kept for verification).
  void draw(Tensor logits, std::vector<Seq>& seqs, int k) {
    const int64_t V = m_.config().vocab_size;
    std::vector<SampleSpec> specs(seqs.size());
    bool host = false;
    for (size_t i = 0; i < seqs.size(); ++i) {
      specs[i].row = static_cast<int32_t>(i);
      host |= seqs[i].params.temperature > 0.0f;
    }
    std::vector<int32_t> ids(seqs.size());
    m_.backend().sample(logits, specs, ids.data(), nullptr);  // greedy (temperature 0)
    if (host) {
      host_.resize(static_cast<size_t>(logits.rows * logits.cols));
      m_.backend().to_host(logits, host_.data());
    }
    for (size_t i = 0; i < seqs.size(); ++i) {
      Seq& s = seqs[i];
      if (s.params.temperature <= 0.0f) {
        s.drafts.push_back(ids[i]);
        continue;
      }
      SampleSpec sp;
      sp.temperature = s.params.temperature;
      sp.top_k = s.params.top_k;
      sp.top_p = s.params.top_p;
      sp.min_p = s.params.min_p;
      SamplingDist d = sampling_distribution(sp, host_.data() + i * V, V);
      // The draft lands at position last + 2 + k.
      s.drafts.push_back(d.draw(
          counter_uniform(s.params.seed, s.params.stream ^ kDraftStreamSalt, s.last + 2 + k)));
      s.q.push_back(std::move(d));
    }
  }

  Model& m_;
  const int k_;
  BatchView gb_;
  std::vector<float> host_;
};

}  // namespace

std::unique_ptr<DraftSource> make_mtp_drafter(Model& model, int num_tokens) {
  return std::make_unique<MtpDrafter>(model, num_tokens);
}

}  // namespace sp
