#include "blip2/generation.h"

#include <algorithm>

#include "core/addon_data.h"
#include "core/errors.h"
#include "core/stats.h"

namespace blip2 {

namespace {

bool Contains(const std::vector<int64_t>& values, int64_t value) {
  return std::find(values.begin(), values.end(), value) != values.end();
}

}  // namespace

GenerationTask::GenerationTask(Napi::Env env, std::shared_ptr<Blip2Runtime> runtime, GenerationInputs inputs,
                               GenerationOptions options, Napi::Function on_step, std::shared_ptr<CancelToken> cancel)
    : runtime_(std::move(runtime)),
      inputs_(std::move(inputs)),
      options_(std::move(options)),
      cancel_(std::move(cancel)),
      deferred_(Napi::Promise::Deferred::New(env)),
      channel_(AddonData::Get(env)->channel) {
  if (!on_step.IsEmpty()) napi_create_reference(env, on_step, 1, &on_step_);
  channel_->BeginWork(env);
}

bool GenerationTask::Step() {
  try {
    if (cancel_ && cancel_->IsCancelled()) throw Error(ErrorCode::kAborted, "generation was aborted");
    c10::OptionalDeviceGuard device_guard;
    if (!runtime_->spec().device.is_cpu()) device_guard.reset_device(runtime_->spec().device);
    if (!started_) {
      started_ = true;
      Start();
    } else {
      Advance();
    }
    if (!Finished()) return false;
    Settle(nullptr);
  } catch (...) {
    Settle(std::current_exception());
  }
  return true;
}

void GenerationTask::Start() {
  const ModelSpec& spec = runtime_->spec();
  at::Tensor pixel_values = inputs_.pixel_values->Get();
  batch_ = pixel_values.size(0);
  std::optional<at::Tensor> ids_arg, mask_arg;
  if (inputs_.input_ids) ids_arg = inputs_.input_ids->Get();
  if (inputs_.attention_mask) mask_arg = inputs_.attention_mask->Get();
  input_ids_ = runtime_->ResolveInputIds(ids_arg, batch_);
  at::Tensor attention_mask = runtime_->ResolveAttentionMask(mask_arg, input_ids_);
  inputs_ = GenerationInputs();  // the caller may dispose its tensors now

  beam_ = options_.num_beams > 1;
  per_prompt_ = beam_ ? options_.num_beams : options_.num_return_sequences;
  const int64_t sequences = batch_ * per_prompt_;

  at::Tensor query_embeds = runtime_->EncodeImages(pixel_values);
  PreparedPrompts prompts = runtime_->Prepare(query_embeds, input_ids_, attention_mask);
  int64_t longest = *std::max_element(prompts.lengths.begin(), prompts.lengths.end());
  if (longest + options_.max_new_tokens > spec.max_length) {
    throw InvalidArgument("maxNewTokens", std::to_string(options_.max_new_tokens),
                          "at most " + std::to_string(spec.max_length - longest) + ": the prompt takes " + std::to_string(longest) +
                              " of the model's " + std::to_string(spec.max_length) + " positions (image queries included)");
  }

  // One cache for the whole call, sized for the longest prompt plus every new token.
  cache_ = std::make_unique<KvCache>(spec, sequences, longest + options_.max_new_tokens);
  std::vector<int64_t> prompt_slots, fan_out_source, fan_out_destination;
  for (int64_t b = 0; b < batch_; ++b) {
    prompt_slots.push_back(b * per_prompt_);
    for (int64_t r = 1; r < per_prompt_; ++r) {
      fan_out_source.push_back(b * per_prompt_);
      fan_out_destination.push_back(b * per_prompt_ + r);
    }
  }
  at::Tensor logits = runtime_->Prefill(*cache_, prompts, prompt_slots);
  cache_->CopySlots(fan_out_source, fan_out_destination, longest);  // the prompt is computed once
  if (per_prompt_ > 1) logits = logits.repeat_interleave(per_prompt_, 0);

  for (int64_t i = 0; i < sequences; ++i) {
    lengths_.push_back(prompts.lengths[i / per_prompt_]);
    active_.push_back(i);
  }
  generated_.assign(sequences, {});
  if (!options_.eos_token_ids.empty()) eos_ids_ = LongTensorOn(options_.eos_token_ids, spec.device);
  if (options_.repetition_penalty != 1.0) {
    // Hugging Face penalises every id of input_ids (prompt, <image> placeholders and pads included).
    seen_ = at::zeros({sequences, spec.vocab_size}, at::TensorOptions().dtype(at::kBool).device(spec.device));
    at::Tensor prompt_ids = input_ids_.repeat_interleave(per_prompt_, 0).to(spec.device);
    if (prompt_ids.size(1) > 0) seen_.scatter_(1, prompt_ids, true);
  }
  if (options_.do_sample) sampler_.emplace(options_.seed ? *options_.seed : std::random_device{}());
  if (beam_) {
    scorer_ = std::make_unique<BeamSearchScorer>(batch_, options_.num_beams, options_.length_penalty,
                                                 options_.early_stopping, options_.max_new_tokens);
    // Only the first beam of each prompt starts live, so the first step does not pick duplicates.
    beam_scores_.assign(sequences, -1e9f);
    for (int64_t b = 0; b < batch_; ++b) beam_scores_[b * per_prompt_] = 0.0f;
    ChooseBeams(logits);
  } else {
    ChooseTokens(logits);
  }
}

void GenerationTask::Advance() {
  std::vector<int64_t> positions;
  for (int64_t row : active_) positions.push_back(lengths_[row]);
  at::Tensor logits = runtime_->Decode(*cache_, next_tokens_, active_, positions);
  for (int64_t row : active_) lengths_[row] += 1;
  Stats::decode_steps += 1;
  if (beam_) {
    ChooseBeams(logits);
  } else {
    ChooseTokens(logits);
  }
}

at::Tensor GenerationTask::ReadToHost(const at::Tensor& tensor) const {
  at::Tensor host = tensor.to(at::kCPU).contiguous();
  Stats::decode_host_read_bytes += static_cast<int64_t>(host.nbytes());
  if (!tensor.device().is_cpu()) Stats::device_to_host_bytes += static_cast<int64_t>(host.nbytes());
  return host;
}

at::Tensor GenerationTask::ApplyProcessors(at::Tensor scores, const at::Tensor& rows) const {
  if (seen_.defined()) scores = ApplyRepetitionPenalty(scores, seen_.index_select(0, rows), options_.repetition_penalty);
  if (steps_ < options_.min_new_tokens && eos_ids_.defined()) scores = SuppressTokens(scores, eos_ids_);
  return scores;
}

void GenerationTask::ChooseTokens(const at::Tensor& logits) {
  const c10::Device device = runtime_->spec().device;
  at::Tensor rows = LongTensorOn(active_, device);
  // Hugging Face's order: processors (repetition penalty, minimum new tokens), then the sampling
  // warpers (temperature, top-k, top-p).
  at::Tensor scores = ApplyProcessors(logits, rows);
  at::Tensor chosen;
  if (options_.do_sample) {
    scores = ApplyTopP(ApplyTopK(ApplyTemperature(scores, options_.temperature), options_.top_k), options_.top_p);
    chosen = sampler_->Sample(scores);
  } else {
    chosen = scores.argmax(-1);
  }
  at::Tensor host = ReadToHost(chosen);  // the only data the host reads in a step
  std::vector<int64_t> tokens(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
  steps_ += 1;
  Stats::generated_tokens += static_cast<int64_t>(tokens.size());
  if (seen_.defined()) seen_.index_put_({rows, chosen}, at::scalar_tensor(true, seen_.options()));

  // Finished sequences are no longer decoded; like Hugging Face they are padded to the end.
  std::vector<bool> was_active(generated_.size(), false);
  std::vector<int64_t> still_active, keep;
  for (size_t i = 0; i < active_.size(); ++i) {
    int64_t row = active_[i];
    was_active[row] = true;
    generated_[row].push_back(tokens[i]);
    if (!Contains(options_.eos_token_ids, tokens[i])) {
      still_active.push_back(row);
      keep.push_back(static_cast<int64_t>(i));
    }
  }
  for (size_t row = 0; row < generated_.size(); ++row) {
    if (!was_active[row]) generated_[row].push_back(options_.pad_token_id);
  }
  PostStep(active_, tokens);
  next_tokens_ = keep.size() == active_.size() ? chosen : chosen.index_select(0, LongTensorOn(keep, device));
  active_ = std::move(still_active);
}

void GenerationTask::ChooseBeams(const at::Tensor& logits) {
  const c10::Device device = runtime_->spec().device;
  const int64_t beams = options_.num_beams;
  const int64_t vocab = logits.size(1);
  at::Tensor rows = LongTensorOn(active_, device);
  at::Tensor scores = ApplyProcessors(logits.log_softmax(-1), rows);
  std::vector<float> active_scores;
  for (int64_t row : active_) active_scores.push_back(beam_scores_[row]);
  scores = scores + at::tensor(active_scores).to(device).unsqueeze(1);
  const int64_t groups = static_cast<int64_t>(active_.size()) / beams;
  const int64_t k = std::max<int64_t>(2, 1 + static_cast<int64_t>(options_.eos_token_ids.size())) * beams;
  auto top = scores.view({groups, beams * vocab}).topk(std::min(k, beams * vocab), 1, /*largest=*/true, /*sorted=*/true);
  at::Tensor top_scores = ReadToHost(std::get<0>(top));
  at::Tensor top_indices = ReadToHost(std::get<1>(top));
  const int64_t kept = top_scores.size(1);
  const float* score_data = top_scores.data_ptr<float>();
  const int64_t* index_data = top_indices.data_ptr<int64_t>();
  const int64_t cur_len = steps_ + 1;  // generated length counting this step's token

  std::vector<int64_t> parents, destinations, next_active;
  std::vector<int64_t> next_tokens;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t batch = active_[g * beams] / beams;
    std::vector<BeamCandidate> candidates;
    for (int64_t j = 0; j < kept; ++j) {
      int64_t flat = index_data[g * kept + j];
      candidates.push_back({score_data[g * kept + j], flat % vocab, flat / vocab});
    }
    std::vector<std::vector<int64_t>> histories(generated_.begin() + batch * beams, generated_.begin() + (batch + 1) * beams);
    BeamStep step = scorer_->Process(batch, candidates, histories, options_.eos_token_ids, cur_len);
    for (int64_t beam = 0; beam < beams; ++beam) {
      int64_t row = batch * beams + beam;
      generated_[row] = histories[step.parents[beam]];
      generated_[row].push_back(step.tokens[beam]);
      beam_scores_[row] = step.scores[beam];
      parents.push_back(batch * beams + step.parents[beam]);
      destinations.push_back(row);
      if (!scorer_->done(batch)) {
        next_active.push_back(row);
        next_tokens.push_back(step.tokens[beam]);
      }
    }
  }
  steps_ += 1;
  Stats::generated_tokens += static_cast<int64_t>(destinations.size());
  // Beams whose parent changed take over the parent's cache and repetition history.
  std::vector<int64_t> moved_from, moved_to;
  int64_t filled = 0;
  for (size_t i = 0; i < parents.size(); ++i) {
    filled = std::max(filled, lengths_[destinations[i]]);
    if (parents[i] != destinations[i]) {
      moved_from.push_back(parents[i]);
      moved_to.push_back(destinations[i]);
    }
  }
  cache_->CopySlots(moved_from, moved_to, filled);
  if (seen_.defined()) {
    at::Tensor to = LongTensorOn(destinations, device);
    seen_.index_copy_(0, to, seen_.index_select(0, LongTensorOn(parents, device)));
    std::vector<int64_t> chosen;
    for (int64_t row : destinations) chosen.push_back(generated_[row].back());
    seen_.index_put_({to, LongTensorOn(chosen, device)}, at::scalar_tensor(true, seen_.options()));
  }
  active_ = std::move(next_active);
  if (!active_.empty()) next_tokens_ = LongTensorOn(next_tokens, device);
}

bool GenerationTask::Finished() const {
  if (steps_ >= options_.max_new_tokens) return true;
  if (beam_) return scorer_->all_done();
  return active_.empty();
}

at::Tensor GenerationTask::Sequences() {
  const int64_t prompt_length = input_ids_.size(1);
  auto options = at::TensorOptions().dtype(at::kLong);
  if (!beam_) {
    const int64_t rows = static_cast<int64_t>(generated_.size());
    at::Tensor out = at::empty({rows, prompt_length + steps_}, options);
    for (int64_t i = 0; i < rows; ++i) {
      out[i].narrow(0, 0, prompt_length).copy_(input_ids_[i / per_prompt_]);
      out[i].narrow(0, prompt_length, steps_).copy_(at::tensor(generated_[i], options));
    }
    return out;
  }
  const int64_t beams = options_.num_beams;
  const int64_t keep = options_.num_return_sequences;
  std::vector<std::vector<int64_t>> best;
  std::vector<float> best_scores;
  size_t longest = 0;
  for (int64_t b = 0; b < batch_; ++b) {
    std::vector<float> scores(beam_scores_.begin() + b * beams, beam_scores_.begin() + (b + 1) * beams);
    std::vector<std::vector<int64_t>> histories(generated_.begin() + b * beams, generated_.begin() + (b + 1) * beams);
    scorer_->Finalize(b, scores, histories);
    for (auto& [score, tokens] : scorer_->Best(b, keep)) {
      longest = std::max(longest, tokens.size());
      best.push_back(std::move(tokens));
      best_scores.push_back(static_cast<float>(score));
    }
  }
  // As BeamSearchScorer.finalize: room for one end-of-sequence token after the longest hypothesis,
  // within max_new_tokens; shorter hypotheses get it, then padding.
  const int64_t width = std::min<int64_t>(static_cast<int64_t>(longest) + 1, options_.max_new_tokens);
  at::Tensor out = at::full({static_cast<int64_t>(best.size()), prompt_length + width}, options_.pad_token_id, options);
  for (size_t i = 0; i < best.size(); ++i) {
    out[i].narrow(0, 0, prompt_length).copy_(input_ids_[static_cast<int64_t>(i) / keep]);
    auto* data = out[i].data_ptr<int64_t>() + prompt_length;
    std::copy(best[i].begin(), best[i].end(), data);
    if (static_cast<int64_t>(best[i].size()) < width && !options_.eos_token_ids.empty()) {
      data[best[i].size()] = options_.eos_token_ids[0];
    }
  }
  sequence_scores_ = at::tensor(best_scores);
  return out;
}

void GenerationTask::PostStep(const std::vector<int64_t>& rows, const std::vector<int64_t>& tokens) {
  if (on_step_ == nullptr) return;
  napi_ref callback = on_step_;
  int64_t step = steps_ - 1;
  channel_->Post([callback, rows, tokens, step](Napi::Env env) {
    napi_value fn = nullptr;
    if (napi_get_reference_value(env, callback, &fn) != napi_ok || fn == nullptr) return;
    Napi::Object event = Napi::Object::New(env);
    event.Set("step", static_cast<double>(step));
    Napi::Array sequence_indices = Napi::Array::New(env, rows.size());
    Napi::Array token_ids = Napi::Array::New(env, tokens.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      sequence_indices.Set(static_cast<uint32_t>(i), static_cast<double>(rows[i]));
      token_ids.Set(static_cast<uint32_t>(i), static_cast<double>(tokens[i]));
    }
    event.Set("sequences", sequence_indices);
    event.Set("tokens", token_ids);
    // lib's wrapper never throws; a throwing callback is the caller's bug and must not kill us.
    try {
      Napi::Function(env, fn).Call({event});
    } catch (const Napi::Error&) {
    }
  });
}

void GenerationTask::Settle(std::exception_ptr failure) {
  at::Tensor sequences, scores;
  if (!failure) {
    try {
      sequences = Sequences();
      scores = sequence_scores_;
    } catch (...) {
      failure = std::current_exception();
    }
  }
  // Free the cache and device state now, on the executor.
  cache_.reset();
  seen_ = at::Tensor();
  next_tokens_ = at::Tensor();
  Napi::Promise::Deferred deferred = deferred_;
  auto channel = channel_;
  napi_ref callback = on_step_;
  on_step_ = nullptr;
  channel_->Post([deferred, channel, callback, failure, sequences, scores](Napi::Env env) {
    channel->EndWork(env);
    if (callback != nullptr) napi_delete_reference(env, callback);
    if (failure) {
      deferred.Reject(ToJsError(env, ErrorFromException(failure)));
      return;
    }
    try {
      Napi::Object result = Napi::Object::New(env);
      result.Set("sequences", NativeTensor::NewInstance(env, sequences));
      result.Set("sequencesScores", scores.defined() ? Napi::Value(NativeTensor::NewInstance(env, scores)) : env.Null());
      deferred.Resolve(result);
    } catch (const Napi::Error& e) {
      deferred.Reject(e.Value());
    }
  });
}

}  // namespace blip2
