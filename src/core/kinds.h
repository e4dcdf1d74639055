// The kinds of DeepSeek-V4 layers and weight storage, shared by the config, the weights and the
// backends.
#pragma once

namespace sp {

enum class AttnKind { kSliding, kCSA, kHCA };
enum class MlpKind { kHashMoe, kMoe };
// How a family of weights is stored: plain float (F32/BF16/F16), FP8 e4m3 with 128x128 ue8m0
// block scales, or FP4 e2m1 with ue8m0 scales per 32 inputs.
enum class WeightFormat { kFloat, kFP8, kFP4 };

}  // namespace sp
