// The executor-side half of a loaded BLIP-2 model: TorchScript modules plus the orchestration
// around them (merging query embeddings into the prompt, the KV cache, prefill, decode steps).
// Every method runs on the model device's executor thread.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "blip2/model_spec.h"
#include "blip2/slot_cache.h"
#include "core/device_transfer.h"
#include "core/script_module.h"
#include "core/torch_includes.h"
#include "kernels/attention.h"
#include "kernels/linear.h"

namespace blip2 {

// A batch of prompts ready for prefill: compacted (pads dropped), with the query embeddings in
// place of the <image> tokens or prepended to rows that have none (pre-4.45 checkpoints).
struct PreparedPrompts {
  at::Tensor inputs_embeds;      // [B, Tmax, E], right-padded, model dtype
  std::vector<int64_t> lengths;  // real positions per row
  at::Tensor input_ids;          // [B, T] int64 on the CPU, as the caller gave them (pads included)
};

class Blip2Runtime {
 public:
  // `on_weights(bytes)` (may be empty): called as each weight tensor is bound (load progress).
  static std::shared_ptr<Blip2Runtime> Load(const ModelSpec& spec, std::function<void(int64_t)> on_weights = nullptr);

  const ModelSpec& spec() const { return spec_; }
  const std::shared_ptr<LoadedModule>& image_encoder() const { return image_encoder_; }
  const std::shared_ptr<LoadedModule>& language_model() const { return language_model_; }
  // What the load-time timing chose for the language model's products (kernels/linear.h).
  const std::vector<LinearDecision>& linear_decisions() const { return linear_decisions_; }
  // And for its attention's products over the KV cache (kernels/attention.h).
  const std::vector<AttentionDecision>& attention_decisions() const { return attention_decisions_; }

  // pixel_values [B,3,H,W] (any float dtype, any device) → language_model_inputs [B,Q,E].
  at::Tensor EncodeImages(const at::Tensor& pixel_values);
  // The same encode in stages, where the export has them (this exporter on; BLIP2_STAGED_ENCODE=off
  // hides them): StartEncode → EncodeLayers over [0, vision_layers()) in any split → FinishEncode
  // equals EncodeImages bit for bit. The scheduler spreads an encode over decode steps with them.
  bool has_staged_encode() const { return vision_layers_ > 0; }
  int64_t vision_layers() const { return vision_layers_; }
  at::Tensor StartEncode(const at::Tensor& pixel_values);                        // → hidden [B,P+1,Dv]
  at::Tensor EncodeLayers(const at::Tensor& hidden, int64_t start, int64_t end);  // layers start..end-1
  at::Tensor FinishEncode(const at::Tensor& hidden);                             // → [B,Q,E]
  // Validated input ids [B,T] on the CPU: the caller's, or HF's default prompt when absent.
  at::Tensor ResolveInputIds(const std::optional<at::Tensor>& input_ids, int64_t batch) const;
  at::Tensor ResolveAttentionMask(const std::optional<at::Tensor>& attention_mask, const at::Tensor& input_ids) const;
  PreparedPrompts Prepare(const at::Tensor& query_embeds, const at::Tensor& input_ids, const at::Tensor& attention_mask);
  // Hugging Face's forward: logits over the whole (uncompacted) sequence, [B, T(+Q), V] float32;
  // T5: over the decoder_input_ids, [B, Td, V].
  at::Tensor Forward(const at::Tensor& pixel_values, const std::optional<at::Tensor>& input_ids,
                     const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& decoder_input_ids);

  // The KV cache tensors' shapes for `slots` sequences of `max_length` positions.
  std::vector<std::vector<int64_t>> CacheShapes(int64_t slots, int64_t max_length) const;
  // Writes row i's T_i ≤ T tokens (`embeds` [N, T, E], right-padded) at positions start[i].. of
  // slots[i] and returns the logits of each row's token last[i], [N, V] float32.
  at::Tensor PrefillChunk(SlotCache& cache, const at::Tensor& embeds, const std::vector<int64_t>& slots,
                          const std::vector<int64_t>& start, const std::vector<int64_t>& last);
  // T5: encodes each prompt (rows [T_b, D], together, right-padded), writes its cross-attention
  // keys/values into slots[b] of the cross cache, and runs the decoder start token at position 0
  // of the self cache; returns that step's logits [N, V] float32.
  at::Tensor EncodePrompts(SlotCache& cache, const std::vector<at::Tensor>& rows, const std::vector<int64_t>& slots);
  // One token per running sequence, sequence i in slot i at positions[i]; [N, V] float32.
  // encoder_lengths (T5): how many cross-cache positions of slot i are the prompt's.
  at::Tensor Decode(SlotCache& cache, const at::Tensor& tokens, const std::vector<int64_t>& positions, int64_t kv_len,
                    const std::vector<int64_t>& encoder_lengths);
  // Decode (sequence i in slot i, i < N) and PrefillChunk (rows in other slots) in one language-model
  // call whose products read each weight once: logits [N + P, V], the decode rows' first. Only
  // where the export has the `step` method (OPT from this exporter on): has_fused_step().
  bool has_fused_step() const { return step_.has_value(); }
  at::Tensor DecodeWithPrefill(SlotCache& cache, const at::Tensor& tokens, const std::vector<int64_t>& positions, int64_t kv_len,
                               const at::Tensor& embeds, const std::vector<int64_t>& slots, const std::vector<int64_t>& start,
                               const std::vector<int64_t>& last);

 private:
  Blip2Runtime(ModelSpec spec, std::shared_ptr<LoadedModule> image_encoder, std::shared_ptr<LoadedModule> language_model);
  at::Tensor EmbedTokens(const at::Tensor& input_ids_cpu);
  void ChooseCpuKernels();
  // Counts of <image> tokens per row; throws unless each is 0 or num_query_tokens.
  std::vector<int64_t> ImageTokenCounts(const at::Tensor& input_ids) const;

  ModelSpec spec_;
  std::shared_ptr<LoadedModule> image_encoder_;
  std::shared_ptr<LoadedModule> language_model_;
  torch::jit::Method embed_tokens_;
  torch::jit::Method forward_full_;
  torch::jit::Method forward_cached_;
  torch::jit::Method decode_;
  std::optional<torch::jit::Method> step_;              // OPT exports with `step`
  int64_t vision_layers_ = 0;                           // 0: no staged encode
  std::optional<torch::jit::Method> encode_;            // T5
  std::optional<torch::jit::Method> fill_cross_cache_;  // T5
  std::vector<LinearDecision> linear_decisions_;
  std::vector<AttentionDecision> attention_decisions_;
};


// Consecutive slots are read through views by the language model; otherwise gathered.
int64_t FirstSlotIfConsecutive(const std::vector<int64_t>& slots);

}  // namespace blip2
