// Wire format of the step descriptor and of the sampled tokens flowing back.
// The descriptor is what every stage already needs (sequence slots, token ids, positions, chunk
// bounds, which rows the head computes); the activation tensor's shape derives from it, so no
// separate shape message is ever sent.
#pragma once

#include <cstdint>
#include <vector>

#include "core/status.h"
#include "engine/scheduler.h"

namespace sp {

enum class StepKind : uint8_t { kStep = 1, kStop = 2 };

std::vector<uint8_t> encode_step(const StepPlan& plan);
std::vector<uint8_t> encode_stop();
// Decodes a descriptor; `kind` says whether it is a step or the end of the run.
Result<StepPlan> decode_step(const std::vector<uint8_t>& bytes, StepKind* kind);

// The tokens sampled from a step (with speculation: those accepted, and the next drafts), and every
// stage's (busy, wall) seconds so far: one message per step from the last stage back to stage 0.
std::vector<uint8_t> encode_sampled(int64_t step, const std::vector<Sampled>& s,
                                    const std::vector<double>& stage_times = {},
                                    const std::vector<Drafted>& drafts = {});
Result<std::vector<Sampled>> decode_sampled(const std::vector<uint8_t>& bytes, int64_t* step,
                                            std::vector<double>* stage_times = nullptr,
                                            std::vector<Drafted>* drafts = nullptr);

}  // namespace sp
