// Continuous batching for one loaded model, in the shape of node-llama-cpp's LlamaContext: the
// model owns N sequence slots in one KV cache, concurrent generate() calls queue, and each cycle
// on the model device's executor merges everything that is ready into as few model calls as
// possible:
//   1. admission: queued calls whose sequences fit in the free slots are taken in order; their
//      images go through vision → Q-Former → projection as one batch (at most encode_batch
//      images: the running sequences wait at most that one encode);
//   2. prefill: prompts are written into their slots in chunks of at most `prefill_chunk` tokens
//      per cycle while other sequences decode, so a long prompt holds them up by at most one
//      chunk per cycle (with none decoding, up to 2048 tokens go at once). What that costs in
//      time depends on the machine: on 2 Zen 5 cores with the mid model, a 16-row decode step
//      takes ~20 ms, an image ~25 ms and a prompt token ~0.7 ms, so with the defaults (256, 16)
//      calls arriving out of step held running sequences up to 200-400 ms between two tokens;
//      prefill_chunk 48 and encode_batch 1 bound that to ~105-125 ms for 5-8% less throughput,
//      but every cycle then carries some of that work (median gap ~80 instead of ~25 ms). Only
//      running the prefill in the decode step's own language-model call would remove it
//      (bench/throughput.ts --stagger measures it);
//   3. decode: one step for every running sequence of every call, in one language-model call.
//      Running sequences always occupy slots 0..n-1 (a finished sequence's slot is refilled by
//      moving another one in, once), so the step reads the cache through views, never a gather;
//   4. each call turns its rows of the logits into tokens (greedy, seeded sampling, beam search)
//      and finishes when its sequences do; its slots are free for the next call at once.
// Results are the same as running each call alone: rows never see each other's slots.
#pragma once

#include <napi.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "blip2/generation_options.h"
#include "blip2/runtime.h"
#include "blip2/sequence_group.h"
#include "blip2/slot_cache.h"
#include "core/executor.h"
#include "core/js_channel.h"
#include "core/tensor.h"

namespace blip2 {

struct SchedulerOptions {
  int64_t slots = 16;           // sequences decoded together at most (maxBatchSize)
  int64_t max_length = 512;     // positions per slot (image queries + prompt + new tokens)
  int64_t max_queue = 1024;     // calls waiting beyond which generate() rejects at once
  int64_t prefill_chunk = 256;  // prompt tokens written per cycle (all prefilling rows together)
  int64_t encode_batch = 16;    // images encoded together per cycle at most
  // An idle model waits this long after a call arrives for more to encode with it (calls that
  // finished together come back a few ms apart): their images are encoded and their prompts
  // prefilled together, and their sequences then decode in step.
  int64_t batch_wait_us = 2000;
};

struct GenerationInputs {
  std::shared_ptr<TensorBox> pixel_values;
  std::shared_ptr<TensorBox> input_ids;       // may be null
  std::shared_ptr<TensorBox> attention_mask;  // may be null
};

// Live figures for model.stats() (any thread).
struct SchedulerStats {
  int64_t queued = 0;
  int64_t running_calls = 0;
  int64_t running_sequences = 0;
  int64_t prefilling_rows = 0;
  int64_t slots_in_use = 0;
  int64_t slots = 0;
  int64_t max_length = 0;
  int64_t kv_cache_bytes = 0;
  int64_t completed = 0;
  int64_t failed = 0;
  int64_t decode_steps = 0;
  int64_t generated_tokens = 0;
  int64_t prefill_tokens = 0;
  int64_t prefill_padding_tokens = 0;  // positions computed as padding beside shorter prompts
  double tokens_per_second = 0;
  double last_step_ms = 0;
  int64_t largest_step_rows = 0;
  int64_t image_encodes = 0;   // vision encoder calls of admission
  int64_t encoded_images = 0;  // images through them
};

class Request;

class Scheduler : public std::enable_shared_from_this<Scheduler> {
 public:
  Scheduler(std::shared_ptr<Blip2Runtime> runtime, SchedulerOptions options);
  ~Scheduler();

  // JS thread. Returns the call's promise; throws a typed error for what can be told at once
  // (queue full, more sequences than slots, disposed).
  // `batch`: the images in inputs.pixel_values (from the handle's metadata: the tensor itself may
  // still be on its way to the device).
  Napi::Promise Submit(Napi::Env env, GenerationInputs inputs, int64_t batch, GenerationOptions options, Napi::Function on_step,
                       std::shared_ptr<CancelToken> cancel, bool stop_on_abort);
  // JS thread. No new calls; queued and running ones reject with DisposedError at the next cycle;
  // the cache and the runtime's weights are freed on the executor; the promise resolves then.
  Napi::Promise Dispose(Napi::Env env);
  SchedulerStats Stats() const;
  const SchedulerOptions& options() const { return options_; }
  const std::shared_ptr<Blip2Runtime>& runtime() const { return runtime_; }

  // Executor thread: one cycle. Returns true when there is nothing left to do.
  bool Cycle();
  void FailAll(std::exception_ptr error) noexcept;

 private:
  struct Slot {
    Request* owner = nullptr;
    int64_t sequence = -1;
  };

  void EnsureScheduled();  // caller holds mutex_
  void Admit();
  void Prefill();
  void PrefillEncoder();   // T5
  void StartCompleted();
  void DecodeStep();
  void Compact();
  void Finish(Request& request, std::exception_ptr failure);
  void DropClosedAndCancelled();
  void ReleaseSlots(Request& request);
  std::vector<int64_t> SlotLengths(int64_t slot) const;
  void ApplyCopy(Request& request, const SequenceGroup::SlotCopy& copy);
  void PublishStats();

  std::shared_ptr<Blip2Runtime> runtime_;
  SchedulerOptions options_;
  std::unique_ptr<SlotCache> cache_;

  mutable std::mutex mutex_;  // queue_, scheduled_, disposing_, stats_
  std::condition_variable arrived_;  // a call was queued, or dispose began
  std::deque<std::shared_ptr<Request>> queue_;
  bool scheduled_ = false;
  bool disposing_ = false;
  std::shared_ptr<JsChannel> dispose_channel_;
  std::optional<Napi::Promise::Deferred> dispose_deferred_;
  SchedulerStats stats_;

  // Executor thread only.
  std::vector<std::shared_ptr<Request>> active_;  // admitted, not finished
  std::vector<Slot> slot_table_;
  int64_t running_count_ = 0;  // slots 0..running_count_-1 hold the running sequences
  double tokens_per_second_ = 0;
  int64_t completed_ = 0, failed_ = 0, decode_steps_ = 0, generated_tokens_ = 0, prefill_tokens_ = 0, prefill_padding_tokens_ = 0;
  double last_step_ms_ = 0;
  int64_t largest_step_rows_ = 0;
  int64_t image_encodes_ = 0, encoded_images_ = 0;
};

}  // namespace blip2
