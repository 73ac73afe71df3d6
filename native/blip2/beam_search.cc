#include "blip2/beam_search.h"

#include <algorithm>
#include <cmath>

#include "core/errors.h"

namespace blip2 {

void BeamHypotheses::Add(const std::vector<int64_t>& tokens, double sum_logprobs, int64_t generated_len) {
  double score = sum_logprobs / std::pow(static_cast<double>(generated_len), length_penalty_);
  if (static_cast<int64_t>(beams_.size()) < num_beams_ || score > worst_score_) {
    beams_.emplace_back(score, tokens);
    if (static_cast<int64_t>(beams_.size()) > num_beams_) {
      // Drop the worst; the new worst is the second worst (Python's sorted() is stable: on ties
      // the earlier hypothesis counts as worse).
      std::vector<std::pair<double, size_t>> order;
      for (size_t i = 0; i < beams_.size(); ++i) order.emplace_back(beams_[i].first, i);
      std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a < b; });
      beams_.erase(beams_.begin() + static_cast<std::ptrdiff_t>(order[0].second));
      worst_score_ = order[1].first;
    } else {
      worst_score_ = std::min(score, worst_score_);
    }
  }
}

bool BeamHypotheses::IsDone(double best_sum_logprobs, int64_t cur_len) const {
  if (static_cast<int64_t>(beams_.size()) < num_beams_) return false;
  switch (early_stopping_) {
    case EarlyStopping::kTrue:
      return true;
    case EarlyStopping::kFalse:
      return worst_score_ >= best_sum_logprobs / std::pow(static_cast<double>(cur_len), length_penalty_);
    case EarlyStopping::kNever: {
      double length = length_penalty_ > 0 ? static_cast<double>(max_new_tokens_) : static_cast<double>(cur_len);
      return worst_score_ >= best_sum_logprobs / std::pow(length, length_penalty_);
    }
  }
  return false;
}

std::vector<std::pair<double, std::vector<int64_t>>> BeamHypotheses::Sorted() const {
  // Python: sorted(beams, key=score) then pop() from the end, so among equal scores the later
  // added one comes first.
  std::vector<size_t> order(beams_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return beams_[a].first < beams_[b].first; });
  std::vector<std::pair<double, std::vector<int64_t>>> best;
  for (auto it = order.rbegin(); it != order.rend(); ++it) best.push_back(beams_[*it]);
  return best;
}

BeamSearchScorer::BeamSearchScorer(int64_t batch_size, int64_t num_beams, double length_penalty,
                                   EarlyStopping early_stopping, int64_t max_new_tokens)
    : num_beams_(num_beams), done_(batch_size, false) {
  for (int64_t b = 0; b < batch_size; ++b) hypotheses_.emplace_back(num_beams, length_penalty, early_stopping, max_new_tokens);
}

bool BeamSearchScorer::all_done() const {
  return std::all_of(done_.begin(), done_.end(), [](bool d) { return d; });
}

BeamStep BeamSearchScorer::Process(int64_t batch, const std::vector<BeamCandidate>& candidates,
                                   const std::vector<std::vector<int64_t>>& histories,
                                   const std::vector<int64_t>& eos_token_ids, int64_t cur_len) {
  BeamStep step;
  BeamHypotheses& hypotheses = hypotheses_[batch];
  for (size_t rank = 0; rank < candidates.size(); ++rank) {
    const BeamCandidate& c = candidates[rank];
    bool is_eos = std::find(eos_token_ids.begin(), eos_token_ids.end(), c.token) != eos_token_ids.end();
    if (is_eos) {
      // An end of sequence outside the top num_beams candidates does not make a hypothesis.
      if (static_cast<int64_t>(rank) >= num_beams_) continue;
      hypotheses.Add(histories[c.beam], static_cast<double>(c.score), cur_len);
    } else {
      step.scores.push_back(c.score);
      step.tokens.push_back(c.token);
      step.parents.push_back(c.beam);
    }
    if (static_cast<int64_t>(step.tokens.size()) == num_beams_) break;
  }
  if (static_cast<int64_t>(step.tokens.size()) < num_beams_) {
    throw Error(ErrorCode::kInternal, "beam search found fewer than num_beams candidates that are not end-of-sequence");
  }
  float best = candidates.front().score;
  for (const auto& c : candidates) best = std::max(best, c.score);
  done_[batch] = done_[batch] || hypotheses.IsDone(static_cast<double>(best), cur_len);
  return step;
}

void BeamSearchScorer::Finalize(int64_t batch, const std::vector<float>& beam_scores,
                                const std::vector<std::vector<int64_t>>& histories) {
  if (done_[batch]) return;
  for (int64_t beam = 0; beam < num_beams_; ++beam) {
    hypotheses_[batch].Add(histories[beam], static_cast<double>(beam_scores[beam]),
                           static_cast<int64_t>(histories[beam].size()));
  }
}

std::vector<std::pair<double, std::vector<int64_t>>> BeamSearchScorer::Best(int64_t batch, int64_t keep) const {
  auto sorted = hypotheses_[batch].Sorted();
  sorted.resize(std::min<size_t>(sorted.size(), static_cast<size_t>(keep)));
  return sorted;
}

}  // namespace blip2
