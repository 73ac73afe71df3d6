#include "blip2/logits_processing.h"

#include <limits>

namespace blip2 {

static constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

at::Tensor ApplyRepetitionPenalty(const at::Tensor& scores, const at::Tensor& seen, double penalty) {
  at::Tensor penalised = at::where(scores < 0, scores * penalty, scores / penalty);
  return at::where(seen, penalised, scores);
}

at::Tensor SuppressTokens(const at::Tensor& scores, const at::Tensor& token_ids) {
  return scores.index_fill(1, token_ids, kMinusInf);
}

at::Tensor ApplyTemperature(const at::Tensor& scores, double temperature) {
  return temperature == 1.0 ? scores : scores / temperature;
}

at::Tensor ApplyTopK(const at::Tensor& scores, int64_t top_k) {
  if (top_k <= 0) return scores;
  int64_t k = std::min<int64_t>(std::max<int64_t>(top_k, 1), scores.size(-1));
  at::Tensor kth = std::get<0>(scores.topk(k, -1)).narrow(-1, k - 1, 1);
  return scores.masked_fill(scores < kth, kMinusInf);
}

at::Tensor ApplyTopP(const at::Tensor& scores, double top_p) {
  if (top_p >= 1.0) return scores;
  auto sorted = scores.sort(-1, /*descending=*/false);
  at::Tensor sorted_scores = std::get<0>(sorted);
  at::Tensor sorted_indices = std::get<1>(sorted);
  at::Tensor cumulative = sorted_scores.softmax(-1).cumsum(-1);
  at::Tensor remove = cumulative <= (1.0 - top_p);
  remove.narrow(-1, remove.size(-1) - 1, 1).fill_(false);  // always keep the most likely token
  return scores.masked_fill(remove.scatter(1, sorted_indices, remove), kMinusInf);
}

at::Tensor TokenSampler::Sample(const at::Tensor& scores) {
  const int64_t rows = scores.size(0);
  std::vector<double> uniforms(rows);
  // In (0, 1): 53 random bits, offset by half a step so that 0 (which would pick a token of
  // probability 0 at index 0) cannot occur.
  for (auto& u : uniforms) u = (static_cast<double>(engine_() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  at::Tensor probabilities = scores.softmax(-1);
  at::Tensor cdf = probabilities.cumsum(-1);
  at::Tensor threshold = at::tensor(uniforms, at::TensorOptions().dtype(at::kDouble)).to(cdf.device(), cdf.scalar_type());
  threshold = threshold.unsqueeze(1) * cdf.narrow(1, cdf.size(1) - 1, 1);
  return (cdf < threshold).sum(1).clamp_max(scores.size(1) - 1);
}

}  // namespace blip2
