// The scheduler's prefix-caching side (see prefix_cache.h): admission on a cached prefix, the
// snapshot at a prompt's last block boundary, eviction. Kept apart from the scheduling loop, which
// calls in at admission, around each chunk, and before preempting.
#include <map>

#include "engine/scheduler.h"

namespace sp {

namespace {

// Requests that report logits at every position (verify, score) must compute every position.
bool cacheable(const Sequence* s) {
  return !s->req.all_logits;
}

}  // namespace

bool Scheduler::admit_blocks(Sequence* s) {
  const int64_t id = s->req.id;
  PrefixEntry* hit = nullptr;
  // A hit leaves at least the last prompt position to compute: its logits choose the next token.
  if (cache_ && cacheable(s)) hit = cache_->lookup(s->tokens, s->prefill_end - 1);
  const int64_t shared = hit ? static_cast<int64_t>(hit->blocks.size()) : 0;
  const int64_t need = blocks_.blocks_for_len(s->prefill_end) - shared;
  if (hit) hit->pins++;  // not evicted to make room for the sequence that will use it
  if (need > blocks_.free_blocks() && !(cache_ && evict_for(need))) {
    if (hit) hit->pins--;
    return false;
  }
  if (cache_ && cacheable(s)) cache_->stats.queries += s->prefill_end;
  if (hit) {
    const int64_t B = static_cast<int64_t>(hit->tokens.size());
    blocks_.adopt(id, hit->blocks);
    s->num_scheduled = s->num_computed = B;
    s->restore_entry = hit->id;  // the pin holds until the restore is in a step
    s->cached_tokens += B;
    cache_->touch(*hit);
    cache_->stats.hits += B;
  }
  SP_CHECK(blocks_.ensure(id, s->prefill_end), "block admission");
  return true;
}

bool Scheduler::evict_for(int64_t need) {
  // Blocks that only unpinned entries hold come free when those entries go.
  std::map<int32_t, int> holds;
  for (auto& [eid, e] : cache_->entries())
    if (e.pins == 0)
      for (int32_t b : e.blocks) holds[b]++;
  int64_t could = blocks_.free_blocks();
  for (auto& [b, n] : holds) could += blocks_.refs(b) == n;
  if (could < need) return false;
  while (blocks_.free_blocks() < need)
    if (!evict_one()) return false;
  return true;
}

bool Scheduler::evict_one() {
  if (!cache_) return false;
  PrefixEntry* e = cache_->lru();
  if (!e) return false;
  const std::vector<int32_t> blocks = e->blocks;
  cache_->erase(e);
  blocks_.drop(blocks);
  return true;
}

int64_t Scheduler::snapshot_boundary(const Sequence* s) const {
  if (!cache_ || !cacheable(s)) return 0;
  const int64_t bt = lim_.block_tokens;
  return s->prompt_len() / bt * bt;
}

int Scheduler::snapshot_cut(const Sequence* s, int n) const {
  const int64_t B = snapshot_boundary(s);
  if (B > s->num_scheduled && B < s->num_scheduled + n && !cache_->contains(s->tokens, B))
    return static_cast<int>(B - s->num_scheduled);
  return n;
}

void Scheduler::prefix_before(StepPlan& plan, Sequence* s) {
  if (s->restore_entry < 0) return;
  PrefixEntry* e = cache_->find(s->restore_entry);
  SP_CHECK(e != nullptr, "restore from a prefix entry that is gone");
  plan.copies_before.push_back({e->slot, s->slot});
  unpin(s);
}

void Scheduler::prefix_after(StepPlan& plan, Sequence* s) {
  const int64_t B = snapshot_boundary(s);
  if (B == 0 || s->num_scheduled != B || cache_->contains(s->tokens, B)) return;
  int slot = cache_->take_slot();
  if (slot < 0 && evict_one()) slot = cache_->take_slot();
  if (slot < 0) return;  // every snapshot is about to be restored: no room now
  const std::vector<int32_t>& table = blocks_.table(s->req.id);
  std::vector<int32_t> blocks(table.begin(), table.begin() + B / lim_.block_tokens);
  blocks_.hold(blocks);
  cache_->insert(s->tokens, B, std::move(blocks), slot);
  plan.copies_after.push_back({s->slot, slot});
}

void Scheduler::unpin(Sequence* s) {
  if (s->restore_entry < 0) return;
  PrefixEntry* e = cache_->find(s->restore_entry);
  SP_CHECK(e != nullptr && e->pins > 0, "unpinning prefix entry ", s->restore_entry);
  e->pins--;
  s->restore_entry = -1;
}

std::string Scheduler::check_prefix_invariants() const {
  if (!cache_) {
    for (int32_t b = 0; b < blocks_.num_blocks(); ++b)
      if (blocks_.held(b) != 0) return str("block ", b, " held with prefix caching off");
    return "";
  }
  if (std::string e = cache_->check_invariants(); !e.empty()) return e;
  std::vector<int> holds(static_cast<size_t>(blocks_.num_blocks()), 0);
  std::map<int64_t, int> pins;
  for (auto& [id, e] : cache_->entries()) {
    for (int32_t b : e.blocks) {
      if (b < 0 || b >= blocks_.num_blocks()) return str("prefix entry ", id, " holds block ", b);
      holds[static_cast<size_t>(b)]++;
    }
    pins[id] += 0;
  }
  for (int32_t b = 0; b < blocks_.num_blocks(); ++b)
    if (blocks_.held(b) != holds[static_cast<size_t>(b)])
      return str("block ", b, " is held ", blocks_.held(b), " times, by ",
                 holds[static_cast<size_t>(b)], " prefix entries");
  for (auto& s : running_)
    if (s->restore_entry >= 0) {
      if (!pins.count(s->restore_entry))
        return str("request ", s->req.id, " restores from a missing prefix entry");
      pins[s->restore_entry]++;
      // Its slot holds nothing yet: nothing of it may have been scheduled past the prefix.
      const PrefixEntry& e = cache_->entries().at(s->restore_entry);
      if (s->num_scheduled != static_cast<int64_t>(e.tokens.size()))
        return str("request ", s->req.id, " ran before its prefix was restored");
    }
  for (auto& s : waiting_)
    if (s->restore_entry >= 0) return str("waiting request ", s->req.id, " holds a pin");
  for (auto& [id, e] : cache_->entries())
    if (e.pins != pins[id])
      return str("prefix entry ", id, " has ", e.pins, " pins for ", pins[id], " sequences");
  return "";
}

}  // namespace sp
