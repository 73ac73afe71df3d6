#include "blip2/scheduler.h"

#include <algorithm>
#include <chrono>

#include "core/addon_data.h"
#include "core/cpu_tensor_cache.h"
#include "core/device_transfer.h"
#include "core/errors.h"
#include "core/stats.h"

namespace blip2 {

// One generate() call, from the JS thread's Submit to its promise settling.
class Request {
 public:
  Request(Napi::Env env, GenerationInputs inputs_in, GenerationOptions options_in, Napi::Function on_step,
          std::shared_ptr<CancelToken> cancel_in, bool stop_on_abort_in, int64_t batch_in, int64_t rows_in)
      : inputs(std::move(inputs_in)),
        options(std::move(options_in)),
        cancel(std::move(cancel_in)),
        stop_on_abort(stop_on_abort_in),
        batch(batch_in),
        rows(rows_in),
        channel(AddonData::Get(env)->channel),
        deferred(Napi::Promise::Deferred::New(env)) {
    if (!on_step.IsEmpty()) napi_create_reference(env, on_step, 1, &on_step_ref);
    channel->BeginWork(env);
  }

  bool cancelled() const { return cancel && cancel->IsCancelled(); }

  // Settles the promise: the result (error null) or the error. Executor thread; once.
  void Settle(std::exception_ptr error, at::Tensor sequences, at::Tensor scores) {
    if (posted) return;
    posted = true;
    settled = true;
    Napi::Promise::Deferred d = deferred;
    auto ch = channel;
    napi_ref callback = on_step_ref;
    on_step_ref = nullptr;
    ch->Post([d, ch, callback, error, sequences, scores](Napi::Env env) {
      ch->EndWork(env);
      if (callback != nullptr) napi_delete_reference(env, callback);
      if (error) {
        d.Reject(ToJsError(env, ErrorFromException(error)));
        return;
      }
      try {
        Napi::Object result = Napi::Object::New(env);
        result.Set("sequences", NativeTensor::NewInstance(env, sequences));
        result.Set("sequencesScores", scores.defined() ? Napi::Value(NativeTensor::NewInstance(env, scores)) : env.Null());
        d.Resolve(result);
      } catch (const Napi::Error& e) {
        d.Reject(e.Value());
      }
    });
  }

  // The tokens of one step to the caller's onStep (greedy and sampling).
  void PostStep() {
    if (on_step_ref == nullptr || !group) return;
    const auto& tokens = group->last_tokens();
    if (tokens.empty()) return;
    std::vector<int64_t> sequences, ids;
    for (const auto& [sequence, token] : tokens) {
      sequences.push_back(sequence);
      ids.push_back(token);
    }
    napi_ref callback = on_step_ref;
    int64_t step = group->steps() - 1;
    channel->Post([callback, sequences, ids, step](Napi::Env env) {
      napi_value fn = nullptr;
      if (napi_get_reference_value(env, callback, &fn) != napi_ok || fn == nullptr) return;
      Napi::Object event = Napi::Object::New(env);
      event.Set("step", static_cast<double>(step));
      Napi::Array seq = Napi::Array::New(env, sequences.size());
      Napi::Array tok = Napi::Array::New(env, ids.size());
      for (size_t i = 0; i < sequences.size(); ++i) {
        seq.Set(static_cast<uint32_t>(i), static_cast<double>(sequences[i]));
        tok.Set(static_cast<uint32_t>(i), static_cast<double>(ids[i]));
      }
      event.Set("sequences", seq);
      event.Set("tokens", tok);
      // lib's wrapper never throws; a throwing callback is the caller's bug and must not kill us.
      try {
        Napi::Function(env, fn).Call({event});
      } catch (const Napi::Error&) {
      }
    });
  }

  GenerationInputs inputs;
  GenerationOptions options;
  std::shared_ptr<CancelToken> cancel;
  bool stop_on_abort;
  int64_t batch;  // prompts (images)
  int64_t rows;   // sequences (slots) this call needs
  std::shared_ptr<JsChannel> channel;
  Napi::Promise::Deferred deferred;
  std::chrono::steady_clock::time_point queued_at = std::chrono::steady_clock::now();
  napi_ref on_step_ref = nullptr;
  bool settled = false;  // decided: no more work for this call
  bool posted = false;   // its promise's settlement is on its way to JS

  enum class State { kQueued, kPrefilling, kDecoding } state = State::kQueued;
  std::unique_ptr<SequenceGroup> group;
  std::vector<int64_t> slot_of;             // sequence → slot (-1 once released)
  std::vector<at::Tensor> prompt_embeds;    // prompt b → [T_b, E]
  std::vector<int64_t> prompt_done;         // prompt b → positions prefilled
  std::vector<at::Tensor> prompt_logits;    // prompt b → [V] once prefilled
  std::vector<int64_t> encoder_length;      // T5: prompt b → cross-cache positions it fills
};

namespace {

// Keeps a Scheduler cycling on its device's executor while it has work.
class SchedulerTask : public Task {
 public:
  explicit SchedulerTask(std::shared_ptr<Scheduler> scheduler) : scheduler_(std::move(scheduler)) {}
  bool Step() override {
    c10::OptionalDeviceGuard guard;
    const c10::Device device = scheduler_->runtime() ? scheduler_->runtime()->spec().device : c10::Device(c10::kCPU);
    if (!device.is_cpu()) guard.reset_device(device);
    bool idle = scheduler_->Cycle();
    if (idle) scheduler_.reset();  // the last owner may be this task: free on the executor
    return idle;
  }
  void Fail(std::exception_ptr error) noexcept override { scheduler_->FailAll(error); }

 private:
  std::shared_ptr<Scheduler> scheduler_;
};


// Prompt tokens prefilled, and images encoded, in one cycle at most while no sequence is decoding
// (nobody waits then; the bounds are for the activations' memory).
constexpr int64_t kIdlePrefillTokens = 2048;
constexpr int64_t kIdleEncodeImages = 16;
// Bounds of the measured prompt chunk: a floor so that prompts progress when a prompt position is
// dear (it still adds at most ~one step on the mid model), and the fixed chunk's ceiling.
constexpr int64_t kMinStepPrefill = 16;
constexpr int64_t kMaxStepPrefill = 256;
// An idle model's wait for calls to encode together ends batch_wait_us after the latest arrival,
// and at most this many of those windows after the first.
constexpr int kBatchWaitWindows = 8;

std::exception_ptr Disposed() {
  return std::make_exception_ptr(Error(ErrorCode::kDisposed, "the model was disposed before this generate() call finished"));
}

}  // namespace

Scheduler::Scheduler(std::shared_ptr<Blip2Runtime> runtime, SchedulerOptions options)
    : runtime_(std::move(runtime)), options_(options) {
  // Defaults measured on 2 Zen 5 cores with the mid model, calls arriving out of step
  // (bench/RESULTS.md, 2026-12-03 19:05): prompts in the decode step in chunks of 64 and one image
  // per cycle gave 12.1 req/s with gaps between two tokens of p99 ~96 ms, against 10.7 req/s and
  // p99 207-271 ms for separate prefill calls of 256 and encodes of up to 16. Not measured on a GPU:
  // there the old defaults stay.
  const bool cpu = runtime_->spec().device.is_cpu();
  if (options_.prefill_chunk == 0) options_.prefill_chunk = !cpu ? 1024 : runtime_->has_fused_step() ? 64 : 256;
  if (options_.encode_batch == 0) options_.encode_batch = cpu ? 1 : 16;
  // Sized by costs measured in this process's cycles: on a CUDA device the host-side times of
  // asynchronous calls are not their costs, so there the fixed sizes stay.
  staged_ = runtime_->has_staged_encode() && (cpu || options_.encode_layers > 0);
  adaptive_chunk_ = cpu && options.prefill_chunk == 0 && runtime_->has_fused_step();
  cache_ = std::make_unique<SlotCache>(runtime_->CacheShapes(options_.slots, options_.max_length), runtime_->spec().dtype,
                                       runtime_->spec().device);
  slot_table_.assign(options_.slots, Slot());
  stats_.slots = options_.slots;
  stats_.max_length = options_.max_length;
  stats_.kv_cache_bytes = cache_->bytes();
}

Scheduler::~Scheduler() = default;

Napi::Promise Scheduler::Submit(Napi::Env env, GenerationInputs inputs, int64_t batch, GenerationOptions options,
                                Napi::Function on_step, std::shared_ptr<CancelToken> cancel, bool stop_on_abort) {
  const int64_t per_prompt = options.num_beams > 1 ? options.num_beams : options.num_return_sequences;
  const int64_t rows = batch * per_prompt;
  if (rows > options_.slots) {
    throw InvalidArgument("inputs.pixelValues", "a batch of " + std::to_string(batch) + " image(s) x " + std::to_string(per_prompt) +
                          " sequence(s) each = " + std::to_string(rows) + " sequences",
                          "at most " + std::to_string(options_.slots) + " sequences per call (the model's maxBatchSize)");
  }
  auto request = std::make_shared<Request>(env, std::move(inputs), std::move(options), on_step, std::move(cancel), stop_on_abort, batch, rows);
  Napi::Promise promise = request->deferred.Promise();
  std::lock_guard<std::mutex> lock(mutex_);
  if (disposing_) {
    request->settled = true;
    request->channel->EndWork(env);
    if (request->on_step_ref != nullptr) napi_delete_reference(env, request->on_step_ref);
    throw Error(ErrorCode::kDisposed, "this model has been disposed; it can no longer be used");
  }
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queue) {
    request->settled = true;
    request->channel->EndWork(env);
    if (request->on_step_ref != nullptr) napi_delete_reference(env, request->on_step_ref);
    throw Error(ErrorCode::kQueueFull,
                "the model's queue is full (" + std::to_string(queue_.size()) + " calls waiting, maxQueue " +
                    std::to_string(options_.max_queue) + "); retry later or raise maxQueue",
                {{"argument", "maxQueue"}, {"value", std::to_string(options_.max_queue)}});
  }
  queue_.push_back(std::move(request));
  stats_.queued = static_cast<int64_t>(queue_.size());
  EnsureScheduled();
  arrived_.notify_one();
  return promise;
}

void Scheduler::EnsureScheduled() {
  if (scheduled_) return;
  scheduled_ = true;
  Executor::For(runtime_->spec().device).Submit(std::make_shared<SchedulerTask>(shared_from_this()));
}

Napi::Promise Scheduler::Dispose(Napi::Env env) {
  auto deferred = Napi::Promise::Deferred::New(env);
  std::lock_guard<std::mutex> lock(mutex_);
  if (disposing_ || !runtime_) {
    deferred.Resolve(env.Undefined());  // already disposed (or disposing): nothing more to wait for
    return deferred.Promise();
  }
  disposing_ = true;
  dispose_channel_ = AddonData::Get(env)->channel;
  dispose_channel_->BeginWork(env);
  dispose_deferred_ = deferred;
  EnsureScheduled();
  arrived_.notify_one();
  return deferred.Promise();
}

SchedulerStats Scheduler::Stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  SchedulerStats s = stats_;
  s.queued = static_cast<int64_t>(queue_.size());
  return s;
}

void Scheduler::PublishStats() {
  int64_t prefilling = 0, calls = 0;
  for (const auto& r : active_) {
    ++calls;
    if (r->state == Request::State::kPrefilling) {
      for (size_t b = 0; b < r->prompt_done.size(); ++b) {
        if (!r->prompt_logits[b].defined()) ++prefilling;
      }
    }
  }
  int64_t encoding = 0;
  if (encoding_) {
    for (auto& r : encoding_->requests) calls += !r->settled;
    encoding = encoding_->hidden.size(0);
  }
  int64_t in_use = 0;
  for (const Slot& s : slot_table_) in_use += s.owner != nullptr;
  const int64_t budget = PrefillBudget();
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.queued = static_cast<int64_t>(queue_.size());
  stats_.running_calls = calls;
  stats_.running_sequences = running_count_;
  stats_.prefilling_rows = prefilling;
  stats_.slots_in_use = in_use;
  stats_.kv_cache_bytes = cache_ ? cache_->bytes() : 0;
  stats_.completed = completed_;
  stats_.failed = failed_;
  stats_.decode_steps = decode_steps_;
  stats_.generated_tokens = generated_tokens_;
  stats_.prefill_tokens = prefill_tokens_;
  stats_.prefill_padding_tokens = prefill_padding_tokens_;
  stats_.step_prefill_tokens = step_prefill_tokens_;
  stats_.tokens_per_second = tokens_per_second_;
  stats_.last_step_ms = last_step_ms_;
  stats_.largest_step_rows = largest_step_rows_;
  stats_.image_encodes = image_encodes_;
  stats_.encoded_images = encoded_images_;
  stats_.encoding_images = encoding;
  stats_.staged_encode_cycles = staged_encode_cycles_;
  stats_.step_prefill_budget = budget;
}

int64_t Scheduler::PrefillBudget() const {
  // Auto (CPU, fused step): as many prompt positions as add stall_budget pure decode steps to the
  // step that carries them, once both costs are measured; the fixed chunk before that.
  if (!adaptive_chunk_ || pure_step_ms_ <= 0 || prompt_position_ms_ <= 0) return options_.prefill_chunk;
  return std::clamp<int64_t>(static_cast<int64_t>(options_.stall_budget * pure_step_ms_ / prompt_position_ms_), kMinStepPrefill, kMaxStepPrefill);
}

bool Scheduler::Cycle() {
  bool disposing;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    disposing = disposing_;
  }
  if (disposing) {
    FailAll(Disposed());
    cache_.reset();
    runtime_.reset();  // the weights go with the last owner; NativeBlip2Model dropped its own
    ReleaseIdleCpuTensorBlocks();  // what the model's activations held goes back to the kernel too
    std::lock_guard<std::mutex> lock(mutex_);
    if (dispose_deferred_) {
      Napi::Promise::Deferred d = *dispose_deferred_;
      auto ch = dispose_channel_;
      ch->Post([d, ch](Napi::Env env) {
        ch->EndWork(env);
        d.Resolve(env.Undefined());
      });
      dispose_deferred_.reset();
    }
    stats_ = SchedulerStats();
    scheduled_ = false;
    return true;
  }
  DropClosedAndCancelled();
  try {
    Admit();
    // The cycle's extra work beside the decode step is sized to stall_budget pure steps: the prompt
    // chunk first (its calls are closer to their first token), then vision layers with what is left.
    auto started = std::chrono::steady_clock::now();
    Prefill();
    double prefill_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
    int64_t step_positions = 0;
    for (const PrefillRow& row : step_prefill_) step_positions += row.width;
    AdvanceEncoding(options_.stall_budget * pure_step_ms_ - prefill_ms - static_cast<double>(step_positions) * prompt_position_ms_);
    DecodeStep();
  } catch (...) {
    // A failure outside one call's own work (the shared decode step): every running call gets
    // the error, the slots are freed, and the model stays usable for the next calls.
    std::exception_ptr error = std::current_exception();
    for (auto& r : std::vector<std::shared_ptr<Request>>(active_)) Finish(*r, error);
  }
  PublishStats();
  std::lock_guard<std::mutex> lock(mutex_);
  if (queue_.empty() && active_.empty() && !encoding_ && !disposing_) {
    scheduled_ = false;
    return true;
  }
  return false;
}

void Scheduler::FailAll(std::exception_ptr error) noexcept {
  try {
    std::deque<std::shared_ptr<Request>> queued;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queued.swap(queue_);
    }
    for (auto& r : queued) {
      r->Settle(error, {}, {});
      ++failed_;
    }
    if (encoding_) {
      for (auto& r : encoding_->requests) {
        if (r->settled) continue;
        r->Settle(error, {}, {});
        ++failed_;
      }
      encoding_.reset();
    }
    for (auto& r : std::vector<std::shared_ptr<Request>>(active_)) Finish(*r, error);
    PublishStats();
  } catch (...) {
  }
}

void Scheduler::DropClosedAndCancelled() {
  std::vector<std::shared_ptr<Request>> aborted;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      if ((*it)->channel->closed() || (*it)->cancelled()) {
        aborted.push_back(*it);
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& r : aborted) {
    if (r->channel->closed()) continue;  // the environment is gone: nobody to tell
    SettleAborted(*r, nullptr);
  }
  if (encoding_) {
    for (size_t k = 0; k < encoding_->requests.size(); ++k) {
      Request& r = *encoding_->requests[k];
      if (r.settled) continue;
      if (r.channel->closed()) {
        r.settled = true;
      } else if (r.cancelled()) {
        SettleAborted(r, &encoding_->ids_and_masks[k].first);
      }
    }
  }
  for (auto& r : std::vector<std::shared_ptr<Request>>(active_)) {
    if (r->channel->closed()) {
      r->settled = true;
      Finish(*r, nullptr);
    } else if (r->cancelled()) {
      Finish(*r, r->stop_on_abort && r->group ? nullptr
                                               : std::make_exception_ptr(Error(ErrorCode::kAborted, "generation was aborted")));
    }
  }
}

void Scheduler::SettleAborted(Request& r, const at::Tensor* input_ids) {
  if (r.stop_on_abort) {
    try {
      // Nothing generated yet: each returned row is its input ids alone.
      at::Tensor ids;
      if (input_ids) {
        ids = *input_ids;
      } else {
        std::optional<at::Tensor> given;
        if (r.inputs.input_ids) given = r.inputs.input_ids->Get();
        ids = runtime_->ResolveInputIds(given, r.batch);
      }
      r.Settle(nullptr, ids.repeat_interleave(r.options.num_return_sequences, 0).contiguous(), {});
      return;
    } catch (...) {
    }
  }
  r.Settle(std::make_exception_ptr(Error(ErrorCode::kAborted, "generation was aborted")), {}, {});
}

void Scheduler::Admit() {
  if (encoding_) return;  // the queue waits behind the encode in progress
  int64_t free = 0;
  for (const Slot& s : slot_table_) free += s.owner == nullptr;
  std::vector<std::shared_ptr<Request>> taken;
  int64_t images = 0;
  // An encode holds the running sequences up; with none running, calls arriving together should
  // share one (a wave of 16 on the mid model: 21.9 ms per image against 25.2 alone).
  const int64_t encode_limit = running_count_ > 0 ? options_.encode_batch : std::max(options_.encode_batch, kIdleEncodeImages);
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (active_.empty() && !queue_.empty() && options_.batch_wait_us > 0) {
      // Nothing runs, so nobody is held up: give the calls arriving right behind the first a
      // moment to join its image encode, unless enough are here already.
      auto enough = [&] {
        int64_t rows = 0, batch = 0;
        for (const auto& r : queue_) {
          rows += r->rows;
          batch += r->batch;
        }
        return disposing_ || rows >= free || batch >= encode_limit;
      };
      // The window restarts with each arrival (calls that finished together come back one JS
      // callback after another: 16 take longer than one window), up to kBatchWaitWindows windows
      // after the first.
      const auto window = std::chrono::microseconds(options_.batch_wait_us);
      const auto cap = queue_.front()->queued_at + kBatchWaitWindows * window;
      while (!enough()) {
        const auto until = std::min(queue_.back()->queued_at + window, cap);
        if (std::chrono::steady_clock::now() >= until) break;
        arrived_.wait_until(lock, until);
        if (queue_.empty()) break;
      }
    }
    while (!queue_.empty()) {
      const auto& next = queue_.front();
      if (next->rows > free) break;  // in order: a large call is not overtaken
      // Every waiting call that fits goes through the vision encoder in one batch, up to
      // encode_limit images: that one encode is the longest a cycle holds the running sequences up.
      if (!taken.empty() && images + next->batch > encode_limit) break;
      images += next->batch;
      free -= next->rows;
      taken.push_back(next);
      queue_.pop_front();
    }
  }
  if (taken.empty()) return;
  const ModelSpec& spec = runtime_->spec();

  // Inputs, then one image encode for everything taken.
  std::vector<at::Tensor> pixels;
  std::vector<std::shared_ptr<Request>> ready;
  std::vector<std::pair<at::Tensor, at::Tensor>> ids_and_masks;
  for (auto& r : taken) {
    try {
      at::Tensor pv = r->inputs.pixel_values->Get();
      std::optional<at::Tensor> ids_arg, mask_arg;
      if (r->inputs.input_ids) ids_arg = r->inputs.input_ids->Get();
      if (r->inputs.attention_mask) mask_arg = r->inputs.attention_mask->Get();
      at::Tensor ids = runtime_->ResolveInputIds(ids_arg, pv.size(0));
      at::Tensor mask = runtime_->ResolveAttentionMask(mask_arg, ids);
      r->inputs = GenerationInputs();  // the caller may dispose its tensors now
      pixels.push_back(pv.to(spec.device, spec.dtype));
      ids_and_masks.emplace_back(ids, mask);
      ready.push_back(r);
    } catch (...) {
      r->Settle(std::current_exception(), {}, {});
      ++failed_;
    }
  }
  if (ready.empty()) return;
  Encoding e;
  e.requests = std::move(ready);
  e.ids_and_masks = std::move(ids_and_masks);
  for (const at::Tensor& pv : pixels) e.batches.push_back(pv.size(0));
  at::Tensor all = pixels.size() == 1 ? pixels[0] : at::cat(pixels, 0);
  if (!staged_ || running_count_ == 0) {
    // Nobody waits for it (or it cannot be split): the whole encode now.
    at::Tensor query_embeds;
    try {
      query_embeds = runtime_->EncodeImages(all);
    } catch (...) {
      std::exception_ptr error = std::current_exception();
      for (auto& r : e.requests) {
        r->Settle(error, {}, {});
        ++failed_;
      }
      return;
    }
    ++image_encodes_;
    encoded_images_ += query_embeds.size(0);
    Place(e, query_embeds);
    return;
  }
  try {
    e.hidden = runtime_->StartEncode(all);
  } catch (...) {
    std::exception_ptr error = std::current_exception();
    for (auto& r : e.requests) {
      r->Settle(error, {}, {});
      ++failed_;
    }
    return;
  }
  encoding_ = std::move(e);
}

void Scheduler::AdvanceEncoding(double budget_ms) {
  if (!encoding_) return;
  Encoding& e = *encoding_;
  if (std::all_of(e.requests.begin(), e.requests.end(), [](const auto& r) { return r->settled; })) {
    encoding_.reset();  // every call of it was aborted
    return;
  }
  const int64_t layers = runtime_->vision_layers();
  const int64_t images = e.hidden.size(0);
  int64_t count = layers - e.next_layer;
  if (running_count_ > 0 && options_.encode_layers > 0) {
    count = std::min(count, options_.encode_layers);
  } else if (running_count_ > 0) {
    // The first layer measures the cost; then as many as the budget holds, at least one.
    count = image_layer_ms_ <= 0 ? 1
                                 : std::clamp<int64_t>(static_cast<int64_t>(budget_ms / (image_layer_ms_ * static_cast<double>(images))),
                                                       1, count);
  }
  at::Tensor query_embeds;
  try {
    if (count > 0) {
      auto started = std::chrono::steady_clock::now();
      e.hidden = runtime_->EncodeLayers(e.hidden, e.next_layer, e.next_layer + count);
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
      double per = ms / static_cast<double>(count * images);
      image_layer_ms_ = image_layer_ms_ <= 0 ? per : 0.8 * image_layer_ms_ + 0.2 * per;
      e.next_layer += count;
      staged_encode_cycles_ += running_count_ > 0;
    }
    if (e.next_layer < layers) return;
    query_embeds = runtime_->FinishEncode(e.hidden);
  } catch (...) {
    std::exception_ptr error = std::current_exception();
    for (auto& r : e.requests) {
      if (r->settled) continue;
      r->Settle(error, {}, {});
      ++failed_;
    }
    encoding_.reset();
    return;
  }
  ++image_encodes_;
  encoded_images_ += images;
  Encoding done = std::move(*encoding_);
  encoding_.reset();
  Place(done, query_embeds);
}

void Scheduler::Place(Encoding& done, const at::Tensor& query_embeds) {
  const ModelSpec& spec = runtime_->spec();
  int64_t offset = 0;
  for (size_t k = 0; k < done.requests.size(); ++k) {
    auto& r = done.requests[k];
    const int64_t batch = done.batches[k];
    at::Tensor queries = query_embeds.narrow(0, offset, batch);
    offset += batch;
    if (r->settled) continue;  // aborted while its image was encoded
    try {
      const auto& [ids, mask] = done.ids_and_masks[k];
      PreparedPrompts prompts = runtime_->Prepare(queries, ids, mask);
      int64_t longest = *std::max_element(prompts.lengths.begin(), prompts.lengths.end());
      int64_t b_longest = std::max_element(prompts.lengths.begin(), prompts.lengths.end()) - prompts.lengths.begin();
      const int64_t text_tokens = longest - spec.num_query_tokens;
      if (spec.encoder_decoder() && longest > cache_->length(1)) {
        throw Error(ErrorCode::kInvalidArgument,
                    "the prompt of row " + std::to_string(b_longest) + " takes " + std::to_string(longest) + " encoder positions (" +
                        std::to_string(spec.num_query_tokens) + " image queries and " + std::to_string(text_tokens) +
                        " text tokens), more than the " + std::to_string(cache_->length(1)) + " the model's encoder cache holds (max_encoder_length)",
                    {{"argument", "inputs.inputIds"}, {"value", std::to_string(longest) + " positions"},
                     {"expected", "at most " + std::to_string(cache_->length(1)) + " positions"}});
      }
      // Decoder positions: OPT continues after the prompt; T5's decoder starts from its start token.
      const int64_t decoder_prompt = spec.encoder_decoder() ? 1 : longest;
      if (decoder_prompt + r->options.max_new_tokens > options_.max_length) {
        if (spec.encoder_decoder()) {
          throw InvalidArgument("maxNewTokens", std::to_string(r->options.max_new_tokens),
                                "at most " + std::to_string(options_.max_length - 1) + " (the decoder positions a sequence may use, maxLength " +
                                    std::to_string(options_.max_length) + ", less the start token)");
        }
        throw Error(ErrorCode::kInvalidArgument,
                    "the prompt of row " + std::to_string(b_longest) + " takes " + std::to_string(longest) + " positions (" +
                        std::to_string(spec.num_query_tokens) + " image queries and " + std::to_string(text_tokens) +
                        " text tokens); with maxNewTokens " + std::to_string(r->options.max_new_tokens) + " that is more than the " +
                        std::to_string(options_.max_length) + " positions a sequence may use (maxLength)",
                    {{"argument", "inputs.inputIds"},
                     {"value", std::to_string(longest) + " positions"},
                     {"expected", "at most " + std::to_string(options_.max_length - r->options.max_new_tokens) +
                                      " positions with maxNewTokens " + std::to_string(r->options.max_new_tokens)}});
      }
      if (spec.encoder_decoder()) {
        // The decoder's own "prompt" is its start token: repetition penalty and the result see
        // decoder ids only, as transformers does for encoder-decoder models.
        at::Tensor start = at::full({batch, 1}, spec.decoder_start_token_id, at::TensorOptions().dtype(at::kLong));
        r->group = std::make_unique<SequenceGroup>(r->options, start, std::vector<int64_t>(batch, 1), spec.vocab_size, spec.device);
      } else {
        r->group = std::make_unique<SequenceGroup>(r->options, ids, prompts.lengths, spec.vocab_size, spec.device);
      }
      for (int64_t b = 0; b < batch; ++b) {
        r->prompt_embeds.push_back(prompts.inputs_embeds[b].narrow(0, 0, prompts.lengths[b]));
        r->prompt_done.push_back(0);
        r->prompt_logits.emplace_back();
        r->encoder_length.push_back(0);
      }
      // Slots from the top: running sequences are kept at the bottom (Compact).
      r->slot_of.assign(r->group->sequences(), -1);
      int64_t s = static_cast<int64_t>(slot_table_.size()) - 1;
      for (int64_t i = 0; i < r->group->sequences(); ++i) {
        while (slot_table_[s].owner != nullptr) --s;
        slot_table_[s] = {r.get(), i};
        r->slot_of[i] = s;
      }
      r->state = Request::State::kPrefilling;
      active_.push_back(r);
    } catch (...) {
      r->Settle(std::current_exception(), {}, {});
      ++failed_;
    }
  }
}

std::vector<int64_t> Scheduler::SlotLengths(int64_t slot) const {
  // Per cache tensor: the self-attention positions filled, and (T5) the cross-attention ones.
  std::vector<int64_t> lengths(cache_->count(), 0);
  const Slot& s = slot_table_[slot];
  if (s.owner == nullptr) return lengths;
  const Request& r = *s.owner;
  const int64_t prompt = s.sequence / r.group->per_prompt();
  if (r.state == Request::State::kDecoding) {
    lengths[0] = r.group->length(s.sequence);
  } else if (s.sequence % r.group->per_prompt() == 0 && !runtime_->spec().encoder_decoder()) {
    lengths[0] = r.prompt_done[prompt];  // the prompt's own slot
  }
  if (cache_->count() > 1) lengths[1] = r.encoder_length[prompt];
  return lengths;
}

void Scheduler::Prefill() {
  if (runtime_->spec().encoder_decoder()) {
    PrefillEncoder();
    return;
  }
  // The chunk bounds how long running sequences wait for a prefill; with none decoding nobody
  // waits, so the admitted prompts go through together (bounded only for the activations' memory)
  // and start decoding in the same step.
  const bool decoding = running_count_ > 0;
  std::vector<std::vector<PrefillRow>> groups =
      PlanPrefill(decoding ? PrefillBudget() : std::max<int64_t>(options_.prefill_chunk, kIdlePrefillTokens));
  if (groups.empty()) return;
  if (decoding && runtime_->has_fused_step()) {
    // The widest group rides in this cycle's decode step (one pass over the weights for both);
    // the other rows wait for the next steps, so a step carries at most one chunk.
    step_prefill_ = std::move(groups.front());
    return;
  }
  for (const auto& group : groups) RunPrefillGroup(group);
  StartCompleted();
}

std::vector<std::vector<Scheduler::PrefillRow>> Scheduler::PlanPrefill(int64_t budget) const {
  std::vector<PrefillRow> rows;
  for (auto& r : active_) {
    if (r->state != Request::State::kPrefilling) continue;
    for (size_t b = 0; b < r->prompt_done.size() && budget > 0; ++b) {
      int64_t remaining = r->prompt_embeds[b].size(0) - r->prompt_done[b];
      if (remaining <= 0) continue;
      int64_t count = std::min(remaining, budget);
      rows.push_back({r.get(), static_cast<int64_t>(b), r->prompt_done[b], count});
      budget -= count;
    }
    if (budget <= 0) break;
  }
  // One forward per width group: every row of a call is padded to the call's widest, so a long
  // prompt would make each short one beside it pay for its length. Rows, widest first, join a
  // group while their padding stays within max(8, width / 8) tokens; each group keeps the rows'
  // order (consecutive slots stay a view of the cache). The mid model's four bench prompts (33-46
  // positions, 16 rows): 2 calls with 664 positions instead of 1 with 736.
  std::vector<size_t> order(rows.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return rows[a].count > rows[b].count; });
  std::vector<int> group_of(rows.size(), -1);
  std::vector<int64_t> widths;
  for (size_t i : order) {
    if (widths.empty() || widths.back() - rows[i].count > std::max<int64_t>(8, widths.back() / 8)) widths.push_back(rows[i].count);
    group_of[i] = static_cast<int>(widths.size()) - 1;
  }
  std::vector<std::vector<PrefillRow>> groups;
  for (size_t g = 0; g < widths.size(); ++g) {
    // Padding of a short row is written past its length (and overwritten later): it must stay in
    // its slot, so rows whose start leaves no room for their group's width wait for the next cycle.
    std::vector<PrefillRow> group;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (group_of[i] == static_cast<int>(g) && rows[i].start + widths[g] <= cache_->length()) {
        group.push_back(rows[i]);
        group.back().width = widths[g];
      }
    }
    if (!group.empty()) groups.push_back(std::move(group));
  }
  return groups;
}

Scheduler::PrefillInputs Scheduler::GatherPrefill(const std::vector<PrefillRow>& group) const {
  // Slots are read here, after any Compact of this cycle moved them.
  const int64_t width = group.front().width;
  PrefillInputs in;
  in.embeds = at::zeros({static_cast<int64_t>(group.size()), width, runtime_->spec().embed_dim},
                        group.front().request->prompt_embeds.front().options());
  for (size_t i = 0; i < group.size(); ++i) {
    const PrefillRow& row = group[i];
    Request& r = *row.request;
    in.embeds[static_cast<int64_t>(i)].narrow(0, 0, row.count).copy_(r.prompt_embeds[row.prompt].narrow(0, row.start, row.count));
    in.slots.push_back(r.slot_of[row.prompt * r.group->per_prompt()]);
    in.starts.push_back(row.start);
    in.last.push_back(row.count - 1);
  }
  return in;
}

void Scheduler::RunPrefillGroup(const std::vector<PrefillRow>& group) {
  // A call whose earlier group failed has been finished (and may be freed): its rows are skipped.
  std::vector<PrefillRow> live;
  for (const PrefillRow& row : group) {
    if (std::any_of(active_.begin(), active_.end(), [&](const auto& r) { return r.get() == row.request; })) live.push_back(row);
  }
  if (live.empty()) return;
  at::Tensor logits;
  try {
    PrefillInputs in = GatherPrefill(live);
    logits = runtime_->PrefillChunk(*cache_, in.embeds, in.slots, in.starts, in.last);
  } catch (...) {
    std::exception_ptr error = std::current_exception();
    for (const PrefillRow& row : live) {
      for (auto& r : active_) {
        if (r.get() == row.request) {
          Finish(*r, error);
          break;
        }
      }
    }
    return;
  }
  RecordPrefill(live, logits);
}

void Scheduler::RecordPrefill(const std::vector<PrefillRow>& group, const at::Tensor& logits) {
  for (size_t i = 0; i < group.size(); ++i) {
    Request& r = *group[i].request;
    r.prompt_done[group[i].prompt] += group[i].count;
    prefill_tokens_ += group[i].count;
    prefill_padding_tokens_ += group[i].width - group[i].count;
    if (r.prompt_done[group[i].prompt] == r.prompt_embeds[group[i].prompt].size(0)) {
      r.prompt_logits[group[i].prompt] = logits[static_cast<int64_t>(i)];
    }
  }
}

void Scheduler::PrefillEncoder() {
  // T5: whole prompts through the encoder (it is bidirectional: no chunks), several per cycle up
  // to the prefill budget, then the decoder's start token for each.
  std::vector<std::pair<Request*, int64_t>> rows;
  int64_t budget = options_.prefill_chunk;
  for (auto& r : active_) {
    if (r->state != Request::State::kPrefilling) continue;
    for (size_t b = 0; b < r->prompt_done.size(); ++b) {
      if (r->prompt_logits[b].defined()) continue;
      if (!rows.empty() && r->prompt_embeds[b].size(0) > budget) break;
      rows.emplace_back(r.get(), static_cast<int64_t>(b));
      budget -= r->prompt_embeds[b].size(0);
    }
    if (budget <= 0) break;
  }
  if (rows.empty()) return;
  std::vector<at::Tensor> embeds;
  std::vector<int64_t> slots;
  for (const auto& [r, b] : rows) {
    embeds.push_back(r->prompt_embeds[b]);
    slots.push_back(r->slot_of[b * r->group->per_prompt()]);
  }
  at::Tensor logits;
  try {
    logits = runtime_->EncodePrompts(*cache_, embeds, slots);
  } catch (...) {
    std::exception_ptr error = std::current_exception();
    for (const auto& [request, b] : rows) {
      for (auto& r : std::vector<std::shared_ptr<Request>>(active_)) {
        if (r.get() == request) Finish(*r, error);
      }
    }
    return;
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    auto [r, b] = rows[i];
    if (r->settled) continue;
    r->encoder_length[b] = r->prompt_embeds[b].size(0);
    r->prompt_done[b] = r->encoder_length[b];
    prefill_tokens_ += r->encoder_length[b];
    r->prompt_logits[b] = logits[static_cast<int64_t>(i)];
  }
  StartCompleted();
}

void Scheduler::StartCompleted() {
  // Calls whose prompts are all in: first tokens, fan-out to their other sequences, decoding.
  for (auto& r : std::vector<std::shared_ptr<Request>>(active_)) {
    if (r->state != Request::State::kPrefilling) continue;
    bool complete = std::all_of(r->prompt_logits.begin(), r->prompt_logits.end(), [](const at::Tensor& t) { return t.defined(); });
    if (!complete) continue;
    try {
      at::Tensor first = at::stack(r->prompt_logits, 0);
      r->prompt_logits.assign(r->prompt_logits.size(), at::Tensor());
      r->prompt_embeds.clear();
      r->state = Request::State::kDecoding;
      ApplyCopy(*r, r->group->Start(first));
      generated_tokens_ += static_cast<int64_t>(r->group->last_tokens().size());
      r->PostStep();
      if (r->group->finished()) {
        Finish(*r, nullptr);
      } else {
        ReleaseSlots(*r);  // sequences that stopped at their first token
      }
    } catch (...) {
      Finish(*r, std::current_exception());
    }
  }
}

void Scheduler::ApplyCopy(Request& request, const SequenceGroup::SlotCopy& copy) {
  if (copy.source.empty()) return;
  std::vector<int64_t> src, dst;
  int64_t encoder = 0;
  for (size_t i = 0; i < copy.source.size(); ++i) {
    src.push_back(request.slot_of.at(copy.source[i]));
    dst.push_back(request.slot_of.at(copy.destination[i]));
    encoder = std::max(encoder, request.encoder_length[copy.source[i] / request.group->per_prompt()]);
  }
  cache_->CopySlots(src, dst, copy.length, 0);
  if (cache_->count() > 1) cache_->CopySlots(src, dst, encoder, 1);  // T5: the prompt's cross-attention too
}

void Scheduler::ReleaseSlots(Request& request) {
  // Sequences no longer running give their slots back at once (beams only when their prompt's
  // search is done: they are in running() until then).
  std::vector<bool> running(request.slot_of.size(), false);
  if (request.state == Request::State::kDecoding) {
    for (int64_t i : request.group->running()) running[i] = true;
  }
  for (size_t i = 0; i < request.slot_of.size(); ++i) {
    int64_t s = request.slot_of[i];
    if (s >= 0 && (!running[i] || request.settled)) {
      slot_table_[s] = Slot();
      request.slot_of[i] = -1;
    }
  }
}

void Scheduler::Compact() {
  // Running sequences into slots 0..n-1: each stray (a running sequence at n or above) trades
  // places with a hole below n (a free slot, or one a prefilling call holds).
  std::vector<std::pair<Request*, int64_t>> running;
  for (auto& r : active_) {
    if (r->state != Request::State::kDecoding) continue;
    for (int64_t i : r->group->running()) running.emplace_back(r.get(), i);
  }
  const int64_t n = static_cast<int64_t>(running.size());
  auto is_running = [&](int64_t slot) {
    const Slot& s = slot_table_[slot];
    return s.owner != nullptr && s.owner->state == Request::State::kDecoding &&
           std::binary_search(s.owner->group->running().begin(), s.owner->group->running().end(), s.sequence);
  };
  std::vector<int64_t> holes;
  for (int64_t s = 0; s < n; ++s) {
    if (!is_running(s)) holes.push_back(s);
  }
  size_t next_hole = 0;
  for (const auto& [request, sequence] : running) {
    int64_t from = request->slot_of[sequence];
    if (from < n) continue;
    int64_t to = holes.at(next_hole++);
    Slot displaced = slot_table_[to];
    if (displaced.owner == nullptr) {
      cache_->Move(from, to, SlotLengths(from));
    } else {
      cache_->Swap(from, to, SlotLengths(from), SlotLengths(to));
      displaced.owner->slot_of[displaced.sequence] = from;
    }
    slot_table_[from] = displaced;
    slot_table_[to] = {request, sequence};
    request->slot_of[sequence] = to;
  }
  running_count_ = n;
}

void Scheduler::DecodeStep() {
  std::vector<PrefillRow> prompt_rows = std::move(step_prefill_);
  step_prefill_.clear();
  Compact();
  const int64_t n = running_count_;
  if (n == 0) {  // the sequences that would have carried it finished: a call of its own
    if (!prompt_rows.empty()) {
      RunPrefillGroup(prompt_rows);
      StartCompleted();
    }
    return;
  }
  auto started = std::chrono::steady_clock::now();
  std::vector<int64_t> tokens(n), positions(n), encoder_lengths(n, 0);
  int64_t kv_len = 0;
  for (int64_t s = 0; s < n; ++s) {
    const Slot& slot = slot_table_[s];
    tokens[s] = slot.owner->group->next_token(slot.sequence);
    positions[s] = slot.owner->group->length(slot.sequence);
    kv_len = std::max(kv_len, positions[s] + 1);
    if (cache_->count() > 1) encoder_lengths[s] = slot.owner->encoder_length[slot.sequence / slot.owner->group->per_prompt()];
  }
  at::Tensor tokens_tensor = LongTensorOn(tokens, runtime_->spec().device);
  at::Tensor logits, prompt_logits;
  if (prompt_rows.empty()) {
    logits = runtime_->Decode(*cache_, tokens_tensor, positions, kv_len, encoder_lengths);
  } else {
    // Compact put every running sequence below n, so the prompts' slots are all >= n.
    PrefillInputs in = GatherPrefill(prompt_rows);
    at::Tensor all = runtime_->DecodeWithPrefill(*cache_, tokens_tensor, positions, kv_len, in.embeds, in.slots, in.starts, in.last);
    logits = all.narrow(0, 0, n);
    prompt_logits = all.narrow(0, n, all.size(0) - n);
    step_prefill_tokens_ += static_cast<int64_t>(in.embeds.size(0) * in.embeds.size(1));
  }
  decode_steps_ += 1;
  Stats::decode_steps += 1;
  largest_step_rows_ = std::max(largest_step_rows_, n);
  for (auto& r : std::vector<std::shared_ptr<Request>>(active_)) {
    if (r->state != Request::State::kDecoding) continue;
    try {
      std::vector<int64_t> rows;
      for (int64_t i : r->group->running()) rows.push_back(r->slot_of[i]);
      bool contiguous = true;
      for (size_t k = 1; k < rows.size(); ++k) contiguous = contiguous && rows[k] == rows[k - 1] + 1;
      at::Tensor mine = contiguous ? logits.narrow(0, rows.front(), static_cast<int64_t>(rows.size()))
                                   : logits.index_select(0, LongTensorOn(rows, logits.device()));
      ApplyCopy(*r, r->group->Advance(mine));
      generated_tokens_ += static_cast<int64_t>(rows.size());
      r->PostStep();
      if (r->group->finished()) {
        Finish(*r, nullptr);
      } else {
        ReleaseSlots(*r);
      }
    } catch (...) {
      Finish(*r, std::current_exception());
    }
  }
  if (!prompt_rows.empty()) {
    RecordPrefill(prompt_rows, prompt_logits);  // prompting calls are not decoding: all still active
    StartCompleted();
  }
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
  last_step_ms_ = ms;
  if (prompt_rows.empty()) {
    pure_step_ms_ = pure_step_ms_ <= 0 ? ms : 0.8 * pure_step_ms_ + 0.2 * ms;
  } else if (pure_step_ms_ > 0) {
    int64_t positions_in_step = 0;
    for (const PrefillRow& row : prompt_rows) positions_in_step += row.width;
    double per = std::max(0.0, ms - pure_step_ms_) / static_cast<double>(positions_in_step);
    prompt_position_ms_ = prompt_position_ms_ <= 0 ? per : 0.8 * prompt_position_ms_ + 0.2 * per;
  }
  double rate = ms > 0 ? 1000.0 * static_cast<double>(n) / ms : 0;
  tokens_per_second_ = tokens_per_second_ == 0 ? rate : 0.8 * tokens_per_second_ + 0.2 * rate;
}

void Scheduler::Finish(Request& request, std::exception_ptr failure) {
  std::pair<at::Tensor, at::Tensor> result;
  if (!request.settled && !failure) {
    try {
      result = request.group->Result();
    } catch (...) {
      failure = std::current_exception();
    }
  }
  // Slots and figures first: whoever sees the promise settle sees the call gone from stats().
  bool settle = !request.settled;
  request.settled = true;
  ReleaseSlots(request);
  std::shared_ptr<Request> keep;
  for (auto& r : active_) {
    if (r.get() == &request) keep = r;
  }
  active_.erase(std::remove_if(active_.begin(), active_.end(), [&](const auto& r) { return r.get() == &request; }), active_.end());
  if (settle) {
    if (failure) {
      ++failed_;
    } else {
      ++completed_;
    }
  }
  int64_t running = 0;
  for (auto& r : active_) {
    if (r->state == Request::State::kDecoding) running += static_cast<int64_t>(r->group->running().size());
  }
  running_count_ = std::min(running_count_, running);
  PublishStats();
  if (settle) request.Settle(failure, result.first, result.second);
}

}  // namespace blip2
