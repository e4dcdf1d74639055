// Paged allocation of the sequence state that grows with the sequence (compressed entries and
// indexer keys of every compressed layer): a pool of fixed-size blocks of `block_tokens` positions
// and a block table per sequence. Pure host bookkeeping: the model's pool (Model::num_blocks) is
// addressed through the tables the scheduler puts into each step (BatchView::block_tables).
//
// The window ring and the compressors' partial windows are not paged: they are per sequence slot
// and the scheduler hands out slots separately.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace sp {

class BlockManager {
 public:
  BlockManager(int num_blocks, int block_tokens);

  int num_blocks() const { return num_blocks_; }
  int block_tokens() const { return block_tokens_; }
  int free_blocks() const { return static_cast<int>(free_.size()); }
  int used_blocks() const { return num_blocks_ - free_blocks(); }
  // Blocks covering positions [0, len).
  int64_t blocks_for_len(int64_t len) const;
  // Blocks `seq` would still need to cover `len` positions.
  int64_t missing(int64_t seq, int64_t len) const;
  // Grows `seq`'s table to cover `len` positions; false (and nothing changes) when the pool lacks
  // the blocks.
  bool ensure(int64_t seq, int64_t len);
  // Returns every block of `seq` to the pool (no-op for an unknown sequence).
  void release(int64_t seq);
  bool has(int64_t seq) const { return tables_.count(seq) > 0; }
  // The block ids of `seq`, in position order (empty for an unknown sequence).
  const std::vector<int32_t>& table(int64_t seq) const;
  int64_t num_sequences() const { return static_cast<int64_t>(tables_.size()); }
  // Empty when consistent, else what is wrong: every block is free or owned by exactly one
  // sequence, ids in range, no duplicates.
  std::string check_invariants() const;

 private:
  int num_blocks_, block_tokens_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::map<int64_t, std::vector<int32_t>> tables_;
};

}  // namespace sp
