#include "engine/block_manager.h"

#include <algorithm>
#include <set>

#include "core/status.h"

namespace sp {

namespace {
const std::vector<int32_t> kEmpty;
}

BlockManager::BlockManager(int num_blocks, int block_tokens)
    : num_blocks_(num_blocks),
      block_tokens_(block_tokens),
      ref_(static_cast<size_t>(std::max(0, num_blocks)), 0),
      held_(static_cast<size_t>(std::max(0, num_blocks)), 0) {
  SP_CHECK(num_blocks >= 0 && block_tokens > 0, "bad block pool ", num_blocks, " x ", block_tokens);
  free_.reserve(static_cast<size_t>(num_blocks));
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

int64_t BlockManager::blocks_for_len(int64_t len) const {
  return (len + block_tokens_ - 1) / block_tokens_;
}

int64_t BlockManager::missing(int64_t seq, int64_t len) const {
  auto it = tables_.find(seq);
  const int64_t have = it == tables_.end() ? 0 : static_cast<int64_t>(it->second.size());
  return std::max<int64_t>(0, blocks_for_len(len) - have);
}

bool BlockManager::ensure(int64_t seq, int64_t len) {
  const int64_t need = missing(seq, len);
  if (need > free_blocks()) return false;
  std::vector<int32_t>& t = tables_[seq];
  for (int64_t i = 0; i < need; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    ref_[static_cast<size_t>(b)] = 1;
    t.push_back(b);
  }
  return true;
}

void BlockManager::adopt(int64_t seq, const std::vector<int32_t>& blocks) {
  SP_CHECK(!has(seq), "sequence ", seq, " adopts blocks but already has a table");
  for (int32_t b : blocks) {
    SP_CHECK(b >= 0 && b < num_blocks_ && ref_[static_cast<size_t>(b)] > 0, "adopting block ", b,
             " that nobody holds");
    ref_[static_cast<size_t>(b)]++;
  }
  tables_[seq] = blocks;
}

void BlockManager::unref(int32_t b) {
  SP_CHECK(ref_[static_cast<size_t>(b)] > 0, "block ", b, " released more often than held");
  if (--ref_[static_cast<size_t>(b)] == 0) free_.push_back(b);
}

void BlockManager::release(int64_t seq) {
  auto it = tables_.find(seq);
  if (it == tables_.end()) return;
  for (auto b = it->second.rbegin(); b != it->second.rend(); ++b) unref(*b);
  tables_.erase(it);
}

void BlockManager::hold(const std::vector<int32_t>& blocks) {
  for (int32_t b : blocks) {
    SP_CHECK(b >= 0 && b < num_blocks_ && ref_[static_cast<size_t>(b)] > 0, "holding block ", b,
             " that nobody holds");
    ref_[static_cast<size_t>(b)]++;
    held_[static_cast<size_t>(b)]++;
  }
}

void BlockManager::drop(const std::vector<int32_t>& blocks) {
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) {
    SP_CHECK(held_[static_cast<size_t>(*b)] > 0, "dropping block ", *b, " that is not held");
    held_[static_cast<size_t>(*b)]--;
    unref(*b);
  }
}

int BlockManager::cache_only_blocks() const {
  int n = 0;
  for (size_t b = 0; b < ref_.size(); ++b) n += ref_[b] > 0 && ref_[b] == held_[b];
  return n;
}

const std::vector<int32_t>& BlockManager::table(int64_t seq) const {
  auto it = tables_.find(seq);
  return it == tables_.end() ? kEmpty : it->second;
}

std::string BlockManager::check_invariants() const {
  std::vector<int> count(static_cast<size_t>(num_blocks_), 0);
  std::vector<bool> is_free(static_cast<size_t>(num_blocks_), false);
  for (int32_t b : free_) {
    if (b < 0 || b >= num_blocks_)
      return str("the free list holds block ", b, " outside [0, ", num_blocks_, ")");
    if (is_free[static_cast<size_t>(b)]) return str("block ", b, " is free twice");
    is_free[static_cast<size_t>(b)] = true;
  }
  for (auto& [seq, t] : tables_) {
    std::set<int32_t> mine;
    for (int32_t b : t) {
      if (b < 0 || b >= num_blocks_)
        return str("sequence ", seq, " holds block ", b, " outside [0, ", num_blocks_, ")");
      if (!mine.insert(b).second) return str("sequence ", seq, " lists block ", b, " twice");
      count[static_cast<size_t>(b)]++;
    }
  }
  for (int b = 0; b < num_blocks_; ++b) {
    const size_t i = static_cast<size_t>(b);
    if (held_[i] < 0) return str("block ", b, " has a negative hold count");
    if (ref_[i] != count[i] + held_[i])
      return str("block ", b, " counts ", ref_[i], " references, but ", count[i],
                 " tables list it and ", held_[i], " cache entries hold it");
    if (ref_[i] == 0 && !is_free[i]) return str("block ", b, " leaked: neither free nor held");
    if (ref_[i] > 0 && is_free[i]) return str("block ", b, " is free but held");
  }
  return "";
}

}  // namespace sp
