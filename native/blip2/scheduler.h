// Continuous batching for one loaded model, in the shape of node-llama-cpp's LlamaContext: the
// model owns N sequence slots in one KV cache, concurrent generate() calls queue, and each cycle
// on the model device's executor merges everything that is ready into as few model calls as
// possible:
//   1. admission: queued calls whose sequences fit in the free slots are taken in order; their
//      images go through vision → Q-Former → projection as one batch. While sequences decode, at
//      most encode_batch images (CPU: 1, ~25 ms on the mid model), since the running sequences
//      wait for that encode; an idle model takes up to 16, which nobody waits for;
//   2. prefill: prompts are written into their slots in chunks of at most `prefill_chunk` tokens
//      per cycle while other sequences decode (with none decoding, up to 2048 tokens go at once
//      in separate calls). Where the export has `step`, one chunk group rides in the decode
//      step's own language-model call, so the weights are read once per cycle for both; the
//      chunk's compute still adds to that step. On 2 Zen 5 cores with the mid model (16-row
//      step ~20 ms, a prompt token ~0.7 ms separately), calls arriving out of step saw gaps
//      between two tokens of p99 207-271 ms with separate calls of 256 tokens and 16 images,
//      and p99 94-99 ms, p50 ~70 ms with the fused step, 64 tokens and 1 image, at 12% more
//      requests/s (bench/throughput.ts --stagger 70; bench/RESULTS.md, 2026-12-03 19:00);
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
  // Prompt tokens written per cycle while sequences decode (all prefilling rows together); 0: 64
  // on the CPU where the export has the fused `step` (else 256), 1024 on CUDA.
  int64_t prefill_chunk = 0;
  // Images encoded together per cycle at most while sequences decode (idle: at least 16); 0: 1 on
  // the CPU, 16 on CUDA.
  int64_t encode_batch = 0;
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
  int64_t step_prefill_tokens = 0;     // prompt positions (padding included) computed inside decode steps
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
  // A prompt row of a prefill call: positions start..start+count-1 of prompt `prompt`, padded to
  // its group's `width`.
  struct PrefillRow {
    Request* request;
    int64_t prompt;
    int64_t start;
    int64_t count;
    int64_t width = 0;
  };
  struct PrefillInputs {
    at::Tensor embeds;  // [P, width, E]
    std::vector<int64_t> slots, starts, last;
  };

  void Prefill();
  // The prompt rows to prefill now, at most `budget` positions, in width groups (widest first).
  std::vector<std::vector<PrefillRow>> PlanPrefill(int64_t budget) const;
  PrefillInputs GatherPrefill(const std::vector<PrefillRow>& group) const;
  void RunPrefillGroup(const std::vector<PrefillRow>& group);
  void RecordPrefill(const std::vector<PrefillRow>& group, const at::Tensor& logits);
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
  std::vector<PrefillRow> step_prefill_;  // prompt rows that go into this cycle's decode step
  double tokens_per_second_ = 0;
  int64_t completed_ = 0, failed_ = 0, decode_steps_ = 0, generated_tokens_ = 0, prefill_tokens_ = 0, prefill_padding_tokens_ = 0;
  int64_t step_prefill_tokens_ = 0;
  double last_step_ms_ = 0;
  int64_t largest_step_rows_ = 0;
  int64_t image_encodes_ = 0, encoded_images_ = 0;
};

}  // namespace blip2
