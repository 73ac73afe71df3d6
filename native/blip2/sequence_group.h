// The decoding state of one generate() call: its B prompts times `per_prompt` sequences (beams,
// or return sequences), the tokens chosen so far, and Hugging Face's rules for choosing the next
// ones (greedy, seeded sampling, beam search, repetition penalty, minimum new tokens, several EOS
// ids). The scheduler owns the slots and runs the model; this class only turns each step's logits
// of its running sequences into tokens. Executor thread only.
#pragma once

#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "blip2/beam_search.h"
#include "blip2/generation_options.h"
#include "blip2/logits_processing.h"
#include "core/torch_includes.h"

namespace blip2 {

class SequenceGroup {
 public:
  // `input_ids` [B, T] on the CPU (as given, pads included: repetition penalty and the result use
  // them); `prompt_lengths[b]`: cache positions prompt b fills (pads dropped, queries included).
  SequenceGroup(GenerationOptions options, at::Tensor input_ids, std::vector<int64_t> prompt_lengths,
                int64_t vocab_size, const c10::Device& device);

  int64_t batch() const { return batch_; }
  int64_t per_prompt() const { return per_prompt_; }
  int64_t sequences() const { return batch_ * per_prompt_; }
  const GenerationOptions& options() const { return options_; }
  // Sequences still decoding, in ascending order.
  const std::vector<int64_t>& running() const { return running_; }
  bool finished() const;
  // Cache positions sequence i fills (its next token goes at this position).
  int64_t length(int64_t i) const { return lengths_[i]; }
  // The token sequence i feeds the next decode step.
  int64_t next_token(int64_t i) const { return next_token_[i]; }
  int64_t steps() const { return steps_; }

  // Cache copies the scheduler must make before the next step: destination sequence ← source
  // sequence over the first `length` positions (beam reordering, fan-out after prefill).
  struct SlotCopy {
    std::vector<int64_t> source, destination;
    int64_t length = 0;
  };

  // The first step, from the logits of each prompt's last position [B, V] float32. Returns the
  // fan-out and beam copies to apply (the prompt is in each group's first sequence).
  SlotCopy Start(const at::Tensor& prompt_logits);
  // A decode step: `logits` [running().size(), V] float32, rows in running() order (the positions
  // they were decoded at were length(i); each is one longer now). Returns the copies to apply.
  SlotCopy Advance(const at::Tensor& logits);

  // New tokens of the last step: sequence index → token (greedy and sampling; empty for beams).
  const std::vector<std::pair<int64_t, int64_t>>& last_tokens() const { return last_tokens_; }

  // The result so far ([rows, T + new] int64 CPU, and beam scores or undefined). Callable when
  // finished, or early (stopOnAbortSignal).
  std::pair<at::Tensor, at::Tensor> Result();

  // Bytes read to the host by this group's decisions (the chosen ids, or beam candidates).
  int64_t host_read_bytes() const { return host_read_bytes_; }

 private:
  at::Tensor ApplyProcessors(at::Tensor scores, const std::vector<int64_t>& rows) const;
  at::Tensor ReadToHost(const at::Tensor& tensor);
  void ChooseTokens(const at::Tensor& logits);
  SlotCopy ChooseBeams(const at::Tensor& logits);

  GenerationOptions options_;
  at::Tensor input_ids_;
  int64_t vocab_size_;
  c10::Device device_;
  int64_t batch_ = 0;
  int64_t per_prompt_ = 1;
  bool beam_ = false;
  int64_t steps_ = 0;
  std::vector<int64_t> lengths_;
  std::vector<std::vector<int64_t>> generated_;
  std::vector<int64_t> running_;
  std::vector<int64_t> next_token_;
  std::vector<std::pair<int64_t, int64_t>> last_tokens_;
  at::Tensor seen_;     // [N, V] bool on the device, for the repetition penalty
  at::Tensor eos_ids_;  // on the device
  std::optional<TokenSampler> sampler_;
  std::unique_ptr<BeamSearchScorer> scorer_;
  std::vector<float> beam_scores_;
  bool finalized_ = false;
  std::pair<at::Tensor, at::Tensor> result_;
  int64_t host_read_bytes_ = 0;
};

}  // namespace blip2
