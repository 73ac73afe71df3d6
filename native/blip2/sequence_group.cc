#include "blip2/sequence_group.h"

#include <algorithm>

#include "core/device_transfer.h"
#include "core/errors.h"
#include "core/stats.h"

namespace blip2 {

namespace {

bool Contains(const std::vector<int64_t>& values, int64_t value) {
  return std::find(values.begin(), values.end(), value) != values.end();
}


}  // namespace

SequenceGroup::SequenceGroup(GenerationOptions options, at::Tensor input_ids, std::vector<int64_t> prompt_lengths,
                             int64_t vocab_size, const c10::Device& device)
    : options_(std::move(options)), input_ids_(std::move(input_ids)), vocab_size_(vocab_size), device_(device) {
  batch_ = input_ids_.size(0);
  beam_ = options_.num_beams > 1;
  per_prompt_ = beam_ ? options_.num_beams : options_.num_return_sequences;
  const int64_t n = sequences();
  for (int64_t i = 0; i < n; ++i) lengths_.push_back(prompt_lengths.at(i / per_prompt_));
  generated_.assign(n, {});
  next_token_.assign(n, 0);
  if (!options_.eos_token_ids.empty()) eos_ids_ = LongTensorOn(options_.eos_token_ids, device_);
  if (options_.repetition_penalty != 1.0) {
    // Hugging Face penalises every id of input_ids (prompt, <image> placeholders and pads included).
    seen_ = at::zeros({n, vocab_size_}, at::TensorOptions().dtype(at::kBool).device(device_));
    at::Tensor prompt_ids = ToDevice(input_ids_.repeat_interleave(per_prompt_, 0).contiguous(), device_);
    if (prompt_ids.size(1) > 0) seen_.scatter_(1, prompt_ids, true);
  }
  if (options_.do_sample) sampler_.emplace(options_.seed ? *options_.seed : std::random_device{}());
  if (beam_) {
    scorer_ = std::make_unique<BeamSearchScorer>(batch_, options_.num_beams, options_.length_penalty,
                                                 options_.early_stopping, options_.max_new_tokens);
    // Only the first beam of each prompt starts live, so the first step does not pick duplicates.
    beam_scores_.assign(n, -1e9f);
    for (int64_t b = 0; b < batch_; ++b) beam_scores_[b * per_prompt_] = 0.0f;
  }
}

bool SequenceGroup::finished() const {
  if (steps_ >= options_.max_new_tokens) return true;
  if (beam_) return scorer_->all_done();
  return running_.empty() && steps_ > 0;
}

at::Tensor SequenceGroup::ReadToHost(const at::Tensor& tensor) {
  at::Tensor host = tensor.to(at::kCPU).contiguous();
  host_read_bytes_ += static_cast<int64_t>(host.nbytes());
  Stats::decode_host_read_bytes += static_cast<int64_t>(host.nbytes());
  if (!tensor.device().is_cpu()) Stats::device_to_host_bytes += static_cast<int64_t>(host.nbytes());
  return host;
}

at::Tensor SequenceGroup::ApplyProcessors(at::Tensor scores, const std::vector<int64_t>& rows) const {
  if (seen_.defined()) scores = ApplyRepetitionPenalty(scores, seen_.index_select(0, LongTensorOn(rows, device_)), options_.repetition_penalty);
  if (steps_ < options_.min_new_tokens && eos_ids_.defined()) scores = SuppressTokens(scores, eos_ids_);
  return scores;
}

SequenceGroup::SlotCopy SequenceGroup::Start(const at::Tensor& prompt_logits) {
  SlotCopy copy;
  for (int64_t b = 0; b < batch_; ++b) {
    for (int64_t r = 1; r < per_prompt_; ++r) {
      copy.source.push_back(b * per_prompt_);
      copy.destination.push_back(b * per_prompt_ + r);
    }
    copy.length = std::max(copy.length, lengths_[b * per_prompt_]);
  }
  at::Tensor logits = per_prompt_ > 1 ? prompt_logits.repeat_interleave(per_prompt_, 0) : prompt_logits;
  running_.clear();
  for (int64_t i = 0; i < sequences(); ++i) running_.push_back(i);
  if (beam_) {
    SlotCopy beams = ChooseBeams(logits);
    // The fan-out happens first (the beams' parents are the prompt copies); both only read prompt
    // positions here, so one copy of the prompt to every sequence covers the beam reordering too.
    (void)beams;
  } else {
    ChooseTokens(logits);
  }
  return copy;
}

SequenceGroup::SlotCopy SequenceGroup::Advance(const at::Tensor& logits) {
  for (int64_t i : running_) lengths_[i] += 1;
  if (beam_) return ChooseBeams(logits);
  ChooseTokens(logits);
  return SlotCopy();
}

void SequenceGroup::ChooseTokens(const at::Tensor& logits) {
  // Hugging Face's order: processors (repetition penalty, minimum new tokens), then the sampling
  // warpers (temperature, top-k, top-p).
  at::Tensor scores = ApplyProcessors(logits, running_);
  at::Tensor chosen;
  if (options_.do_sample) {
    scores = ApplyTopP(ApplyTopK(ApplyTemperature(scores, options_.temperature), options_.top_k), options_.top_p);
    chosen = sampler_->Sample(scores);
  } else {
    chosen = scores.argmax(-1);
  }
  at::Tensor host = ReadToHost(chosen);  // the only data the host reads in a step
  const int64_t* tokens = host.data_ptr<int64_t>();
  steps_ += 1;
  Stats::generated_tokens += static_cast<int64_t>(running_.size());
  if (seen_.defined()) seen_.index_put_({LongTensorOn(running_, device_), chosen}, at::scalar_tensor(true, seen_.options()));

  // Finished sequences are no longer decoded; like Hugging Face they are padded to the end.
  std::vector<bool> was_running(generated_.size(), false);
  std::vector<int64_t> still_running;
  last_tokens_.clear();
  for (size_t k = 0; k < running_.size(); ++k) {
    int64_t i = running_[k];
    was_running[i] = true;
    generated_[i].push_back(tokens[k]);
    next_token_[i] = tokens[k];
    last_tokens_.emplace_back(i, tokens[k]);
    if (!Contains(options_.eos_token_ids, tokens[k])) still_running.push_back(i);
  }
  for (size_t i = 0; i < generated_.size(); ++i) {
    if (!was_running[i]) generated_[i].push_back(options_.pad_token_id);
  }
  running_ = steps_ >= options_.max_new_tokens ? std::vector<int64_t>() : std::move(still_running);
}

SequenceGroup::SlotCopy SequenceGroup::ChooseBeams(const at::Tensor& logits) {
  const int64_t beams = options_.num_beams;
  const int64_t vocab = logits.size(1);
  at::Tensor scores = ApplyProcessors(logits.log_softmax(-1), running_);
  std::vector<float> running_scores;
  for (int64_t i : running_) running_scores.push_back(beam_scores_[i]);
  scores = scores + ToDevice(at::tensor(running_scores), device_).unsqueeze(1);
  const int64_t groups = static_cast<int64_t>(running_.size()) / beams;
  const int64_t k = std::max<int64_t>(2, 1 + static_cast<int64_t>(options_.eos_token_ids.size())) * beams;
  auto top = scores.view({groups, beams * vocab}).topk(std::min(k, beams * vocab), 1, /*largest=*/true, /*sorted=*/true);
  at::Tensor top_scores = ReadToHost(std::get<0>(top));
  at::Tensor top_indices = ReadToHost(std::get<1>(top));
  const int64_t kept = top_scores.size(1);
  const float* score_data = top_scores.data_ptr<float>();
  const int64_t* index_data = top_indices.data_ptr<int64_t>();
  const int64_t cur_len = steps_ + 1;  // generated length counting this step's token

  std::vector<int64_t> parents, destinations, next_running;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t batch = running_[g * beams] / beams;
    std::vector<BeamCandidate> candidates;
    for (int64_t j = 0; j < kept; ++j) {
      int64_t flat = index_data[g * kept + j];
      candidates.push_back({score_data[g * kept + j], flat % vocab, flat / vocab});
    }
    std::vector<std::vector<int64_t>> histories(generated_.begin() + batch * beams, generated_.begin() + (batch + 1) * beams);
    BeamStep step = scorer_->Process(batch, candidates, histories, options_.eos_token_ids, cur_len);
    for (int64_t beam = 0; beam < beams; ++beam) {
      int64_t i = batch * beams + beam;
      generated_[i] = histories[step.parents[beam]];
      generated_[i].push_back(step.tokens[beam]);
      beam_scores_[i] = step.scores[beam];
      next_token_[i] = step.tokens[beam];
      parents.push_back(batch * beams + step.parents[beam]);
      destinations.push_back(i);
      if (!scorer_->done(batch)) next_running.push_back(i);
    }
  }
  steps_ += 1;
  Stats::generated_tokens += static_cast<int64_t>(destinations.size());
  // Beams whose parent changed take over the parent's cache and repetition history.
  SlotCopy copy;
  for (size_t i = 0; i < parents.size(); ++i) {
    copy.length = std::max(copy.length, lengths_[destinations[i]]);
    if (parents[i] != destinations[i]) {
      copy.source.push_back(parents[i]);
      copy.destination.push_back(destinations[i]);
    }
  }
  if (seen_.defined()) {
    at::Tensor to = LongTensorOn(destinations, device_);
    seen_.index_copy_(0, to, seen_.index_select(0, LongTensorOn(parents, device_)));
    std::vector<int64_t> chosen;
    for (int64_t i : destinations) chosen.push_back(generated_[i].back());
    seen_.index_put_({to, LongTensorOn(chosen, device_)}, at::scalar_tensor(true, seen_.options()));
  }
  running_ = steps_ >= options_.max_new_tokens ? std::vector<int64_t>() : std::move(next_running);
  last_tokens_.clear();
  return copy;
}

std::pair<at::Tensor, at::Tensor> SequenceGroup::Result() {
  if (finalized_) return result_;
  finalized_ = true;
  const int64_t prompt_length = input_ids_.size(1);
  auto options = at::TensorOptions().dtype(at::kLong);
  if (!beam_) {
    const int64_t rows = static_cast<int64_t>(generated_.size());
    at::Tensor out = at::empty({rows, prompt_length + steps_}, options);
    for (int64_t i = 0; i < rows; ++i) {
      out[i].narrow(0, 0, prompt_length).copy_(input_ids_[i / per_prompt_]);
      if (steps_ > 0) out[i].narrow(0, prompt_length, steps_).copy_(at::tensor(generated_[i], options));
    }
    result_ = {out, at::Tensor()};
    return result_;
  }
  const int64_t beams = options_.num_beams;
  const int64_t keep = options_.num_return_sequences;
  std::vector<std::vector<int64_t>> best;
  std::vector<float> best_scores;
  size_t longest = 0;
  for (int64_t b = 0; b < batch_; ++b) {
    std::vector<float> scores(beam_scores_.begin() + b * beams, beam_scores_.begin() + (b + 1) * beams);
    std::vector<std::vector<int64_t>> histories(generated_.begin() + b * beams, generated_.begin() + (b + 1) * beams);
    if (steps_ > 0) scorer_->Finalize(b, scores, histories);
    for (auto& [score, tokens] : scorer_->Best(b, keep)) {
      longest = std::max(longest, tokens.size());
      best.push_back(std::move(tokens));
      best_scores.push_back(static_cast<float>(score));
    }
    while (static_cast<int64_t>(best.size()) < (b + 1) * keep) {  // aborted before any step
      best.emplace_back();
      best_scores.push_back(0.0f);
    }
  }
  // As BeamSearchScorer.finalize: room for one end-of-sequence token after the longest hypothesis,
  // within max_new_tokens; shorter hypotheses get it, then padding.
  const int64_t width = std::min<int64_t>(static_cast<int64_t>(longest) + 1, std::max<int64_t>(steps_, 0));
  at::Tensor out = at::full({static_cast<int64_t>(best.size()), prompt_length + width}, options_.pad_token_id, options);
  for (size_t i = 0; i < best.size(); ++i) {
    out[i].narrow(0, 0, prompt_length).copy_(input_ids_[static_cast<int64_t>(i) / keep]);
    auto* data = out[i].data_ptr<int64_t>() + prompt_length;
    const size_t n = std::min<size_t>(best[i].size(), static_cast<size_t>(width));
    std::copy(best[i].begin(), best[i].begin() + static_cast<std::ptrdiff_t>(n), data);
    if (static_cast<int64_t>(n) < width && !options_.eos_token_ids.empty()) data[n] = options_.eos_token_ids[0];
  }
  result_ = {out, at::tensor(best_scores)};
  return result_;
}

}  // namespace blip2
