// Hugging Face's logits processors and warpers, as tensor ops on the model's device. Each takes
// and returns float32 scores [N, V]; the order of application is Hugging Face's.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "core/torch_includes.h"

namespace blip2 {

// RepetitionPenaltyLogitsProcessor: a token already in the sequence has its score divided by the
// penalty when positive and multiplied when negative. `seen` [N, V] bool marks those tokens.
at::Tensor ApplyRepetitionPenalty(const at::Tensor& scores, const at::Tensor& seen, double penalty);
// MinNewTokensLengthLogitsProcessor: no end of sequence yet.
at::Tensor SuppressTokens(const at::Tensor& scores, const at::Tensor& token_ids);
// TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper (min_tokens_to_keep = 1).
at::Tensor ApplyTemperature(const at::Tensor& scores, double temperature);
at::Tensor ApplyTopK(const at::Tensor& scores, int64_t top_k);
at::Tensor ApplyTopP(const at::Tensor& scores, double top_p);

// Inverse-CDF sampling with uniforms drawn on the host from a seeded generator: the same seed
// gives the same tokens on any device, and only N floats go up per step.
class TokenSampler {
 public:
  explicit TokenSampler(uint64_t seed) : engine_(seed) {}
  at::Tensor Sample(const at::Tensor& scores);

 private:
  std::mt19937_64 engine_;
};

}  // namespace blip2
