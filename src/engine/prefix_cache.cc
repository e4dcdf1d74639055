#include "engine/prefix_cache.h"

#include <algorithm>
#include <set>

#include "core/status.h"

namespace sp {

PrefixCache::PrefixCache(int first_slot, int num_slots, int block_tokens)
    : first_slot_(first_slot), num_slots_(num_slots), block_tokens_(block_tokens) {
  SP_CHECK(first_slot >= 0 && num_slots >= 0 && block_tokens > 0, "bad prefix cache ", first_slot,
           " ", num_slots, " ", block_tokens);
  for (int s = num_slots - 1; s >= 0; --s) free_slots_.push_back(first_slot + s);
}

// splitmix64 over the parent's hash and the block's token ids.
uint64_t PrefixCache::chain_hash(uint64_t parent, const int32_t* block) const {
  auto mix = [](uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  };
  uint64_t h = mix(parent);
  for (int i = 0; i < block_tokens_; ++i) h = mix(h ^ static_cast<uint32_t>(block[i]));
  return h;
}

PrefixEntry* PrefixCache::lookup(const std::vector<int32_t>& tokens, int64_t max_len) {
  PrefixEntry* best = nullptr;
  if (entries_.empty()) return best;
  const int64_t n = std::min<int64_t>(max_len, static_cast<int64_t>(tokens.size()));
  uint64_t h = 0;
  for (int64_t end = block_tokens_; end <= n; end += block_tokens_) {
    h = chain_hash(h, tokens.data() + end - block_tokens_);
    auto range = by_hash_.equal_range(h);
    for (auto it = range.first; it != range.second; ++it) {
      PrefixEntry& e = entries_.at(it->second);
      if (static_cast<int64_t>(e.tokens.size()) == end &&
          std::equal(e.tokens.begin(), e.tokens.end(), tokens.begin()))
        best = &e;
    }
  }
  return best;
}

bool PrefixCache::contains(const std::vector<int32_t>& tokens, int64_t len) const {
  if (len <= 0 || len % block_tokens_ != 0 || len > static_cast<int64_t>(tokens.size()))
    return false;
  uint64_t h = 0;
  for (int64_t end = block_tokens_; end <= len; end += block_tokens_)
    h = chain_hash(h, tokens.data() + end - block_tokens_);
  auto range = by_hash_.equal_range(h);
  for (auto it = range.first; it != range.second; ++it) {
    const PrefixEntry& e = entries_.at(it->second);
    if (static_cast<int64_t>(e.tokens.size()) == len &&
        std::equal(e.tokens.begin(), e.tokens.end(), tokens.begin()))
      return true;
  }
  return false;
}

PrefixEntry& PrefixCache::insert(const std::vector<int32_t>& tokens, int64_t len,
                                 std::vector<int32_t> blocks, int slot) {
  SP_CHECK(len > 0 && len % block_tokens_ == 0 && len <= static_cast<int64_t>(tokens.size()) &&
               static_cast<int64_t>(blocks.size()) == len / block_tokens_,
           "prefix cache entry of ", len, " tokens with ", blocks.size(), " blocks");
  SP_CHECK(slot >= first_slot_ && slot < first_slot_ + num_slots_, "snapshot slot ", slot);
  PrefixEntry e;
  e.id = next_id_++;
  e.tokens.assign(tokens.begin(), tokens.begin() + len);
  e.blocks = std::move(blocks);
  e.slot = slot;
  e.last_used = ++clock_;
  uint64_t h = 0;
  for (int64_t end = block_tokens_; end <= len; end += block_tokens_)
    h = chain_hash(h, e.tokens.data() + end - block_tokens_);
  by_hash_.emplace(h, e.id);
  stats.snapshots++;
  return entries_[e.id] = std::move(e);
}

int PrefixCache::take_slot() {
  if (free_slots_.empty()) return -1;
  const int s = free_slots_.back();
  free_slots_.pop_back();
  return s;
}

PrefixEntry* PrefixCache::lru() {
  PrefixEntry* best = nullptr;
  for (auto& [id, e] : entries_)
    if (e.pins == 0 && (!best || e.last_used < best->last_used)) best = &e;
  return best;
}

PrefixEntry* PrefixCache::find(int64_t id) {
  auto it = entries_.find(id);
  return it == entries_.end() ? nullptr : &it->second;
}

void PrefixCache::erase(PrefixEntry* e) {
  SP_CHECK(e->pins == 0, "evicting a pinned prefix cache entry");
  for (auto it = by_hash_.begin(); it != by_hash_.end(); ++it)
    if (it->second == e->id) {
      by_hash_.erase(it);
      break;
    }
  free_slots_.push_back(e->slot);
  stats.evictions++;
  entries_.erase(e->id);
}

std::string PrefixCache::check_invariants() const {
  std::set<int> slots;
  for (int s : free_slots_) {
    if (s < first_slot_ || s >= first_slot_ + num_slots_)
      return str("free snapshot slot ", s, " out of range");
    if (!slots.insert(s).second) return str("snapshot slot ", s, " is free twice");
  }
  for (auto& [id, e] : entries_) {
    if (e.slot < first_slot_ || e.slot >= first_slot_ + num_slots_)
      return str("prefix entry ", id, " has slot ", e.slot, " out of range");
    if (!slots.insert(e.slot).second) return str("snapshot slot ", e.slot, " is used twice");
    if (e.pins < 0) return str("prefix entry ", id, " has negative pins");
    if (e.tokens.empty() || e.tokens.size() % static_cast<size_t>(block_tokens_) != 0 ||
        e.blocks.size() != e.tokens.size() / static_cast<size_t>(block_tokens_))
      return str("prefix entry ", id, " has ", e.tokens.size(), " tokens and ", e.blocks.size(),
                 " blocks");
    if (!contains(e.tokens, static_cast<int64_t>(e.tokens.size())))
      return str("prefix entry ", id, " cannot be found by its hash");
  }
  if (static_cast<int>(slots.size()) != num_slots_) return "a snapshot slot leaked";
  if (by_hash_.size() != entries_.size()) return "hash index and entries disagree";
  return "";
}

}  // namespace sp
