// Continuous batching for one loaded model, in the shape of node-llama-cpp's LlamaContext: the
// model owns N sequence slots in one KV cache, concurrent generate() calls queue, and each cycle
// on the model device's executor merges everything that is ready into as few model calls as
// possible:
//   1. admission: queued calls whose sequences fit in the free slots are taken in order; their
//      images go through vision → Q-Former → projection as one batch. While sequences decode, at
//      most encode_batch images (CPU: 1), and, where the export has the staged methods, a few
//      vision layers per cycle (encode_layers; CPU default: what fits in the budget of item 2),
//      so an encode (~25 ms on the mid model, ~15 decode steps of OPT-2.7B) is spread over steps;
//      an idle model encodes up to 16 images at once, which nobody waits for;
//   2. prefill: prompts are written into their slots in chunks while other sequences decode (with
//      none decoding, up to 2048 tokens go at once in separate calls). Where the export has `step`,
//      one chunk group rides in the decode step's own language-model call, so the weights are read
//      once per cycle for both; the chunk's compute still adds to that step. On the CPU the chunk
//      and the vision layers of a cycle are sized together to stall_budget pure decode steps, from
//      costs measured as the model runs (EMAs of a step without prompt, of what a prompt position
//      adds to a step, of a vision layer per image), so a running sequence waits about
//      1 + stall_budget steps' time at most between two tokens (bench/throughput.ts --stagger);
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
  // Vision layers of an encode run per cycle while sequences decode, where the export has the
  // staged methods; 0: on the CPU as many as fit beside the prompt chunk in stall_budget pure
  // decode steps (measured), on CUDA the whole encode at once.
  int64_t encode_layers = 0;
  // The work for arriving calls (vision layers, prompt positions) a cycle may add beside its decode
  // step, in pure decode steps (CPU, from the measured costs): running sequences wait about
  // 1 + stall_budget steps' time at most between two tokens. 1: a prefill or an encode stalls them
  // by about one step. On 2 Intel Xeon cores with the mid model and calls arriving out of step, 1
  // held the gaps between two tokens to ~2 pure steps (p99 66-81 ms) at 5.2-6.5 req/s: the
  // arriving calls' encodes and prompts (~60% of the compute at full speed) no longer keep the 16
  // slots filled (6 rows per step); 2 gave 8.6 req/s at p99 118 ms. Calls arriving together (an
  // idle model) are not bounded by it: 16 in step ran at 4.3x one-by-one either way (bench/RESULTS.md).
  double stall_budget = 1.0;
  // An idle model waits for more calls to encode with the first until none has arrived for this
  // long (calls that finished together come back one JS callback after another), 8 times this
  // after the first at most: their images are encoded and their prompts prefilled together, and
  // their sequences then decode in step. A window from the first call alone split such waves on
  // the mid model (16 calls: 2.1-2.4 images per encode, 9-10 rows per step in 2 rounds of 3).
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
  int64_t image_encodes = 0;   // image encodes of admission (whole or in stages)
  int64_t encoded_images = 0;  // images through them
  int64_t encoding_images = 0;       // images in the staged encode now
  int64_t staged_encode_cycles = 0;  // cycles that ran vision layers of a staged encode beside decoding
  int64_t step_prefill_budget = 0;   // prompt positions the next decode step may carry
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
  // Calls taken from the queue whose images are in the vision encoder, in stages: a few layers per
  // cycle while sequences decode (CPU exports with the staged methods), else all at once. One at a
  // time; the queue waits behind it. Its calls hold no slots yet (they are free when it is done:
  // only admission takes slots).
  struct Encoding {
    std::vector<std::shared_ptr<Request>> requests;
    std::vector<std::pair<at::Tensor, at::Tensor>> ids_and_masks;  // per request
    std::vector<int64_t> batches;                                   // images per request
    at::Tensor hidden;                                              // [images, P+1, Dv]
    int64_t next_layer = 0;
  };
  // Runs vision layers of encoding_ within `budget_ms` (at least one; all with nothing decoding),
  // and admits its calls when the last is done.
  void AdvanceEncoding(double budget_ms);
  // Prompts of encoded calls into their groups and slots; `query_embeds` rows follow `requests`.
  void Place(Encoding& done, const at::Tensor& query_embeds);
  // A call that ends before its first token (aborted in the queue or in the encoder).
  void SettleAborted(Request& r, const at::Tensor* input_ids);
  // Prompt tokens this cycle may carry while sequences decode.
  int64_t PrefillBudget() const;
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
  std::optional<Encoding> encoding_;
  // The costs a cycle's extra work is sized by (CPU; EMAs over this model's own cycles): a decode
  // step with no prompt in it, what one prompt position adds to a step, one vision layer for one
  // image. 0: not measured yet.
  bool staged_ = false;          // encodes in stages, sized by the costs
  bool adaptive_chunk_ = false;  // the prompt tokens per step too (prefillChunk not given)
  double pure_step_ms_ = 0, prompt_position_ms_ = 0, image_layer_ms_ = 0;
  double tokens_per_second_ = 0;
  int64_t completed_ = 0, failed_ = 0, decode_steps_ = 0, generated_tokens_ = 0, prefill_tokens_ = 0, prefill_padding_tokens_ = 0;
  int64_t step_prefill_tokens_ = 0;
  double last_step_ms_ = 0;
  int64_t largest_step_rows_ = 0;
  int64_t image_encodes_ = 0, encoded_images_ = 0, staged_encode_cycles_ = 0;
};

}  // namespace blip2
