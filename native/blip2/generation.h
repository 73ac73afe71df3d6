// generate(): a task on the model device's executor that advances one decoding step per slice,
// so concurrent generations and other work interleave. Per step only the chosen token ids (or,
// for beam search, the 2·num_beams best candidates per batch row) are read by the host; the KV
// cache is allocated once per call and written in place.
#pragma once

#include <napi.h>

#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "blip2/beam_search.h"
#include "blip2/generation_options.h"
#include "blip2/logits_processing.h"
#include "blip2/runtime.h"
#include "core/executor.h"
#include "core/js_channel.h"
#include "core/tensor.h"

namespace blip2 {

struct GenerationInputs {
  std::shared_ptr<TensorBox> pixel_values;
  std::shared_ptr<TensorBox> input_ids;       // may be null
  std::shared_ptr<TensorBox> attention_mask;  // may be null
};

class GenerationTask : public Task {
 public:
  // `on_step` (may be null): a JS function called with the new tokens of each decoding step.
  GenerationTask(Napi::Env env, std::shared_ptr<Blip2Runtime> runtime, GenerationInputs inputs, GenerationOptions options,
                 Napi::Function on_step, std::shared_ptr<CancelToken> cancel);

  Napi::Promise promise() const { return deferred_.Promise(); }
  bool Step() override;

 private:
  void Start();
  void Advance();
  // Greedy and sampling: picks the next token of each active row from its logits.
  void ChooseTokens(const at::Tensor& logits);
  void ChooseBeams(const at::Tensor& logits);
  bool Finished() const;
  at::Tensor Sequences();
  void Settle(std::exception_ptr failure);
  // Repetition penalty and minimum new tokens, on the scores of the active rows.
  at::Tensor ApplyProcessors(at::Tensor scores, const at::Tensor& rows) const;
  // Every read the decoding loop makes from device tensors goes through here (and is counted).
  at::Tensor ReadToHost(const at::Tensor& tensor) const;
  void PostStep(const std::vector<int64_t>& rows, const std::vector<int64_t>& tokens);

  std::shared_ptr<Blip2Runtime> runtime_;
  GenerationInputs inputs_;
  GenerationOptions options_;
  std::shared_ptr<CancelToken> cancel_;
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<JsChannel> channel_;
  napi_ref on_step_ = nullptr;

  bool started_ = false;
  bool beam_ = false;
  int64_t batch_ = 0;            // prompts
  int64_t per_prompt_ = 1;       // sequences per prompt: num_beams or num_return_sequences
  int64_t steps_ = 0;            // tokens generated so far (per sequence)
  at::Tensor input_ids_;         // [B, T] CPU, for the output
  std::unique_ptr<KvCache> cache_;
  std::vector<int64_t> lengths_;                  // cache positions filled, per sequence
  std::vector<std::vector<int64_t>> generated_;   // per sequence
  std::vector<int64_t> active_;                   // sequences decoded in the next step
  at::Tensor next_tokens_;                        // [active] on the device: the next decode input
  at::Tensor seen_;                               // [N, V] bool, for the repetition penalty
  at::Tensor eos_ids_;                            // on the device
  std::optional<TokenSampler> sampler_;
  std::unique_ptr<BeamSearchScorer> scorer_;
  std::vector<float> beam_scores_;                // [N]
  at::Tensor sequence_scores_;                    // beam search: [B * num_return_sequences]
};

}  // namespace blip2
