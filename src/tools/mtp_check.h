// The MTP draft layer against mtp_golden.safetensors (the fixtures' format): every prompt's full
// sequence t = input_ids ++ greedy_tokens is run through the main model, and the MTP layer is run
// on the last layer's output streams at each position p with the token t[p+1]; its logits are
// compared with p{i}.mtp_logits [N-1, vocab]. Used by `verify --mtp-golden` (any backend) and the
// unit tests (CPU).
#pragma once

#include <string>
#include <vector>

#include "core/status.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "tools/flags.h"
#include "tools/golden.h"

namespace sp {

// p{i}.mtp_logits of every prompt of `prompts`, shape-checked: [N-1, vocab] f32 with N the
// prompt's input ids plus greedy tokens. The pointers stay valid while `g` is open.
Result<std::vector<const float*>> read_mtp_golden(const SafetensorsFile& g,
                                                  const std::vector<GoldenPrompt>& prompts,
                                                  const Config& c);

// Runs every sequence (slot i for sequence i; the model needs as many slots) through the main
// model and the MTP layer, all sequences in each step, at most `chunk` positions of each per step,
// so the MTP window ring is carried across steps. Returns per sequence the MTP logits of
// positions 0 .. N-2, [N-1, vocab] row-major. The model must have the MTP layer (has_mtp) and two
// residual buffers of `chunk` x sequences rows.
std::vector<std::vector<float>> run_mtp_teacher_forced(
    Model& m, const std::vector<std::vector<int32_t>>& seqs, int chunk);

// Loads the whole model with its MTP layer on one stage of this process (--device, --threads,
// --load-format and --seed as given) and runs the sequences with run_mtp_teacher_forced, all of
// them in each step with at most --max-num-batched-tokens / sequences positions of each.
Result<std::vector<std::vector<float>>> mtp_logits_one_stage(
    const Flags& f, const Config& c, const std::vector<std::vector<int32_t>>& seqs);

// Writes an MTP golden file: p{i}.mtp_logits [rows_i, vocab] F32 (to FILE.tmp, then renamed).
Status write_mtp_golden(const std::string& path, const std::vector<std::vector<float>>& logits,
                        int64_t vocab);

// verify --mtp-golden: loads the whole model with its MTP layer on one stage of this process
// (--device, --threads and the state limits as given), runs the golden sequences and prints per
// prompt the max abs error, then top-1 agreement and median / max relative error over every
// position, and PASS or FAIL: fp32 CPU by --atol, otherwise by --min-top1 and --max-median-rel.
// Returns the exit code (0 pass, 1 fail, 2 user error).
int run_mtp_check(const Flags& f, const Config& c, const std::vector<GoldenPrompt>& prompts,
                  const std::string& mtp_golden_path);

}  // namespace sp
