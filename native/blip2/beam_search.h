// Hugging Face's BeamSearchScorer and BeamHypotheses (transformers 4.45), on the host: per step
// they see only the top 2·num_beams candidates of each batch row, never the logits.
#pragma once

#include <cstdint>
#include <vector>

#include "blip2/generation_options.h"

namespace blip2 {

class BeamHypotheses {
 public:
  BeamHypotheses(int64_t num_beams, double length_penalty, EarlyStopping early_stopping, int64_t max_new_tokens)
      : num_beams_(num_beams), length_penalty_(length_penalty), early_stopping_(early_stopping), max_new_tokens_(max_new_tokens) {}

  // `tokens`: the generated tokens of the hypothesis (without a final end-of-sequence token);
  // `generated_len`: the length its score is normalised by.
  void Add(const std::vector<int64_t>& tokens, double sum_logprobs, int64_t generated_len);
  // `cur_len`: generated tokens counting the one being chosen in this step.
  bool IsDone(double best_sum_logprobs, int64_t cur_len) const;
  size_t size() const { return beams_.size(); }
  // Best first.
  std::vector<std::pair<double, std::vector<int64_t>>> Sorted() const;

 private:
  int64_t num_beams_;
  double length_penalty_;
  EarlyStopping early_stopping_;
  int64_t max_new_tokens_;
  std::vector<std::pair<double, std::vector<int64_t>>> beams_;
  double worst_score_ = 1e9;
};

struct BeamCandidate {
  float score;       // cumulative log-probability
  int64_t token;
  int64_t beam;      // index of the parent beam within its batch row
};

struct BeamStep {
  std::vector<float> scores;     // [num_beams] next cumulative scores
  std::vector<int64_t> tokens;   // [num_beams]
  std::vector<int64_t> parents;  // [num_beams] parent beam within the batch row
};

class BeamSearchScorer {
 public:
  BeamSearchScorer(int64_t batch_size, int64_t num_beams, double length_penalty, EarlyStopping early_stopping,
                   int64_t max_new_tokens);

  bool done(int64_t batch) const { return done_[batch]; }
  bool all_done() const;

  // One batch row's step (BeamSearchScorer.process): candidates sorted best first;
  // `histories[beam]` the tokens generated so far by each beam of this row; `cur_len` the
  // generated length including this step's token.
  BeamStep Process(int64_t batch, const std::vector<BeamCandidate>& candidates,
                   const std::vector<std::vector<int64_t>>& histories, const std::vector<int64_t>& eos_token_ids,
                   int64_t cur_len);

  // BeamSearchScorer.finalize: open beams join the hypotheses; returns the best `keep` per batch
  // row (tokens padded by the caller) and their scores.
  void Finalize(int64_t batch, const std::vector<float>& beam_scores, const std::vector<std::vector<int64_t>>& histories);
  std::vector<std::pair<double, std::vector<int64_t>>> Best(int64_t batch, int64_t keep) const;

 private:
  int64_t num_beams_;
  std::vector<BeamHypotheses> hypotheses_;
  std::vector<bool> done_;
};

}  // namespace blip2
