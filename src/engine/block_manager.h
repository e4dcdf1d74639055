// Paged allocation of the sequence state that grows with the sequence (compressed entries and
// indexer keys of every compressed layer): a pool of fixed-size blocks of `block_tokens` positions
// and a block table per sequence. Pure host bookkeeping: the model's pool (Model::num_blocks) is
// addressed through the tables the scheduler puts into each step (BatchView::block_tables).
//
// Blocks are reference-counted so the prefix cache can share them: a block is held by every
// sequence whose table lists it and by every cache entry that holds it (`hold`), and returns to
// the pool only when nobody holds it. Shared blocks are read-only: a sequence that adopts a
// cached prefix only ever writes the blocks past it (entries of later windows).
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
  // Starts `seq`'s table (it must have none) with `blocks`, which somebody already holds (a cached
  // prefix): each gains a reference.
  void adopt(int64_t seq, const std::vector<int32_t>& blocks);
  // Drops `seq`'s references (no-op for an unknown sequence); blocks nobody holds become free.
  void release(int64_t seq);
  // References held outside any sequence (prefix-cache entries).
  void hold(const std::vector<int32_t>& blocks);
  void drop(const std::vector<int32_t>& blocks);
  int refs(int32_t block) const { return ref_[static_cast<size_t>(block)]; }
  int held(int32_t block) const { return held_[static_cast<size_t>(block)]; }
  // Blocks only cache entries hold (no sequence): evicted on demand, so as good as free.
  int cache_only_blocks() const;
  bool has(int64_t seq) const { return tables_.count(seq) > 0; }
  // The block ids of `seq`, in position order (empty for an unknown sequence).
  const std::vector<int32_t>& table(int64_t seq) const;
  int64_t num_sequences() const { return static_cast<int64_t>(tables_.size()); }
  // Empty when consistent, else what is wrong: ids in range, no block twice in one table or in
  // the free list, each block's count equals the tables listing it plus its holds, a block is free
  // exactly when nothing references it.
  std::string check_invariants() const;

 private:
  void unref(int32_t b);
  int num_blocks_, block_tokens_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::vector<int> ref_;       // per block: tables listing it + holds
  std::vector<int> held_;      // per block: holds (cache entries)
  std::map<int64_t, std::vector<int32_t>> tables_;
};

}  // namespace sp
