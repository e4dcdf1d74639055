#include "engine/block_manager.h"

#include "core/status.h"

namespace sp {

namespace {
const std::vector<int32_t> kEmpty;
}

BlockManager::BlockManager(int num_blocks, int block_tokens)
    : num_blocks_(num_blocks), block_tokens_(block_tokens) {
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
    t.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void BlockManager::release(int64_t seq) {
  auto it = tables_.find(seq);
  if (it == tables_.end()) return;
  for (auto b = it->second.rbegin(); b != it->second.rend(); ++b) free_.push_back(*b);
  tables_.erase(it);
}

const std::vector<int32_t>& BlockManager::table(int64_t seq) const {
  auto it = tables_.find(seq);
  return it == tables_.end() ? kEmpty : it->second;
}

std::string BlockManager::check_invariants() const {
  std::vector<int> owner(static_cast<size_t>(num_blocks_), 0);
  auto mark = [&](int32_t b, const std::string& who) -> std::string {
    if (b < 0 || b >= num_blocks_)
      return str(who, " holds block ", b, " outside [0, ", num_blocks_, ")");
    if (owner[static_cast<size_t>(b)]++ > 0) return str("block ", b, " is held twice (", who, ")");
    return "";
  };
  for (int32_t b : free_)
    if (auto e = mark(b, "the free list"); !e.empty()) return e;
  for (auto& [seq, t] : tables_)
    for (int32_t b : t)
      if (auto e = mark(b, str("sequence ", seq)); !e.empty()) return e;
  for (int b = 0; b < num_blocks_; ++b)
    if (owner[static_cast<size_t>(b)] == 0)
      return str("block ", b, " leaked: neither free nor held");
  return "";
}

}  // namespace sp
