// Automatic prefix caching (vLLM's, adapted to DeepSeek-V4's state): pure host bookkeeping on
// stage 0, next to the scheduler.
//
// A cache entry is a prompt prefix [0, B) ending on a state-block boundary B (a multiple of every
// compression ratio) and what a sequence needs to continue from B without computing [0, B):
//  - the state blocks covering [0, B) (compressed entries and indexer keys: written once, never
//    rewritten, so they are shared read-only, reference-counted by the BlockManager);
//  - a snapshot of the per-slot state at B (the window ring and the compressors' pending windows,
//    which roll and are overwritten, so they cannot be shared): a copy of the sequence's slot in
//    one of `num_slots` extra state slots, made by every stage in step order
//    (StepPlan::copies_after).
// Entries are found by a chain of block hashes (hash of the parent's hash and the block's tokens,
// as vLLM's) and confirmed token by token, so a hash collision can never hand out a wrong prefix.
// Eviction is least recently used; an entry with a restore scheduled but not yet sent (`pins`) is
// never evicted.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace sp {

struct PrefixEntry {
  int64_t id = 0;
  std::vector<int32_t> tokens;  // the prefix [0, B)
  std::vector<int32_t> blocks;  // B / block_tokens state blocks
  int slot = -1;                // the snapshot's state slot
  uint64_t last_used = 0;
  int pins = 0;  // sequences admitted on it whose restore is not in a step yet
};

struct PrefixCacheStats {
  int64_t queries = 0;  // prompt tokens looked up
  int64_t hits = 0;     // of them, tokens found cached (not computed)
  int64_t snapshots = 0, evictions = 0;
};

class PrefixCache {
 public:
  // Snapshot slots are state slots [first_slot, first_slot + num_slots).
  PrefixCache(int first_slot, int num_slots, int block_tokens);

  int num_slots() const { return num_slots_; }
  int free_slots() const { return static_cast<int>(free_slots_.size()); }
  int64_t size() const { return static_cast<int64_t>(entries_.size()); }
  // The longest entry that is a prefix of `tokens` and no longer than `max_len`, or null.
  PrefixEntry* lookup(const std::vector<int32_t>& tokens, int64_t max_len);
  // Whether an entry holds exactly tokens[0, len).
  bool contains(const std::vector<int32_t>& tokens, int64_t len) const;
  // Registers tokens[0, len) with `blocks` (the caller holds them for the entry) in snapshot slot
  // `slot` (from take_slot).
  PrefixEntry& insert(const std::vector<int32_t>& tokens, int64_t len, std::vector<int32_t> blocks,
                      int slot);
  // A free snapshot slot, or -1.
  int take_slot();
  // The least recently used entry that is not pinned, or null.
  PrefixEntry* lru();
  // Forgets `e`, returning its slot to the free ones; the caller drops its blocks.
  void erase(PrefixEntry* e);
  PrefixEntry* find(int64_t id);
  void touch(PrefixEntry& e) { e.last_used = ++clock_; }
  const std::unordered_map<int64_t, PrefixEntry>& entries() const { return entries_; }
  PrefixCacheStats stats;
  // Empty when consistent: slots in range and distinct (an entry's or free, never both), every
  // entry reachable by its hash with B / block_tokens blocks.
  std::string check_invariants() const;

 private:
  uint64_t chain_hash(uint64_t parent, const int32_t* block) const;
  int first_slot_, num_slots_, block_tokens_;
  std::vector<int> free_slots_;
  std::unordered_map<int64_t, PrefixEntry> entries_;
  std::unordered_multimap<uint64_t, int64_t> by_hash_;  // chain hash at B -> entry ids
  int64_t next_id_ = 0;
  uint64_t clock_ = 0;
};

}  // namespace sp
