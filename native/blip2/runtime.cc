#include "blip2/runtime.h"

#include <algorithm>
#include <cstdlib>

#include "core/device_transfer.h"
#include "core/errors.h"
#include "kernels/linear.h"
#include "core/stats.h"
#include "core/tensor.h"

namespace blip2 {

int64_t FirstSlotIfConsecutive(const std::vector<int64_t>& slots) {
  for (size_t i = 1; i < slots.size(); ++i) {
    if (slots[i] != slots[0] + static_cast<int64_t>(i)) return -1;
  }
  return slots.empty() ? -1 : slots[0];
}

Blip2Runtime::Blip2Runtime(ModelSpec spec, std::shared_ptr<LoadedModule> image_encoder,
                           std::shared_ptr<LoadedModule> language_model)
    : spec_(std::move(spec)),
      image_encoder_(std::move(image_encoder)),
      language_model_(std::move(language_model)),
      embed_tokens_(language_model_->module.get_method("embed_tokens")),
      forward_full_(language_model_->module.get_method("forward_full")),
      // T5 has no cached forward (its prompt goes through the encoder): decode stands in.
      forward_cached_(language_model_->module.get_method(spec_.encoder_decoder() ? "decode" : "forward_cached")),
      decode_(language_model_->module.get_method("decode")) {
  if (spec_.encoder_decoder()) {
    encode_ = language_model_->module.get_method("encode");
    fill_cross_cache_ = language_model_->module.get_method("fill_cross_cache");
  } else if (language_model_->methods.count("step")) {
    // BLIP2_FUSED_PREFILL=off: prompts in calls of their own, as for exports without `step`
    // (benchmarks compare the two).
    const char* env = std::getenv("BLIP2_FUSED_PREFILL");
    if (!(env && std::string(env) == "off")) step_ = language_model_->module.get_method("step");
  }
  const auto& encoder_methods = image_encoder_->methods;
  const char* staged = std::getenv("BLIP2_STAGED_ENCODE");
  if (!(staged && std::string(staged) == "off") && encoder_methods.count("num_vision_layers") && encoder_methods.count("encode_start") &&
      encoder_methods.count("encode_layers") && encoder_methods.count("encode_finish")) {
    vision_layers_ = image_encoder_->module.get_method("num_vision_layers")({}).toInt();
  }
}

std::shared_ptr<Blip2Runtime> Blip2Runtime::Load(const ModelSpec& spec, std::function<void(int64_t)> on_weights) {
  auto image_encoder = LoadedModule::Load(spec.image_encoder.path, spec.device);
  auto language_model = LoadedModule::Load(spec.language_model.path, spec.device);
  std::vector<const char*> required = {"embed_tokens", "forward_full", "decode"};
  if (spec.encoder_decoder()) {
    required.push_back("encode");
    required.push_back("fill_cross_cache");
  } else {
    required.push_back("forward_cached");
  }
  for (const char* method : required) {
    if (!language_model->methods.count(method)) {
      throw Error(ErrorCode::kModelLoad,
                  "model file '" + spec.language_model.path + "' has no method '" + method +
                      "'; it was not written by a compatible blip2-node exporter",
                  {{"file", spec.language_model.path}});
    }
  }
  if (!image_encoder->methods.count("forward")) {
    throw Error(ErrorCode::kModelLoad, "model file '" + spec.image_encoder.path + "' has no method 'forward'",
                {{"file", spec.image_encoder.path}});
  }
  {
    // The weights: views of the mapped safetensors files where the stored dtype is the one the
    // model runs in on the CPU, converted (or uploaded) once otherwise. The store goes away after
    // binding; the tensors keep their files mapped.
    WeightStore store(spec.weight_files, spec.weights);
    store.OnTensor(std::move(on_weights));
    store.Bind(image_encoder->module, spec.image_encoder.path, spec.image_encoder.bindings, spec.device, spec.dtype);
    store.Bind(language_model->module, spec.language_model.path, spec.language_model.bindings, spec.device, spec.dtype);
  }
  SetFusedAttention(image_encoder->module, spec.fused_attention, spec.image_encoder.path);
  auto runtime = std::shared_ptr<Blip2Runtime>(new Blip2Runtime(spec, std::move(image_encoder), std::move(language_model)));
  runtime->ChooseCpuKernels();
  return runtime;
}

void Blip2Runtime::ChooseCpuKernels() {
  // BLIP2_LINEAR_KERNEL: auto (default: timed here, on this machine), on or onednn (tests: that
  // path wherever it runs), off (at::linear only, the plain path).
  const char* env = std::getenv("BLIP2_LINEAR_KERNEL");
  std::string mode = env ? env : "auto";
  if (!spec_.device.is_cpu() || mode == "off") return;
  std::vector<at::Tensor> matrices;
  for (torch::jit::Module* module : {&image_encoder_->module, &language_model_->module}) {
    for (const at::Tensor& p : module->parameters()) {
      if (p.dim() == 2) matrices.push_back(p);
    }
  }
  const LinearKernelMode kernel_mode = mode == "on"       ? LinearKernelMode::kAlways
                                       : mode == "onednn" ? LinearKernelMode::kOneDnn
                                                          : LinearKernelMode::kAuto;
  linear_decisions_ = DecideLinearKernels(matrices, kernel_mode);
  bool any = std::any_of(linear_decisions_.begin(), linear_decisions_.end(),
                         [](const LinearDecision& d) { return d.path != LinearPath::kPlain; });
  if (any) {
    // Every method: the decode step, the prefill (OPT's forward_cached, T5's encode and cross-cache
    // fill), full forwards and the image encoder all multiply by these weights.
    for (LoadedModule* module : {image_encoder_.get(), language_model_.get()}) {
      for (const auto& [method, schema] : module->methods) UseBlip2Linear(module->module, method);
    }
  }
  // The language model's attention over the cache: one query row per sequence and head in decode
  // steps (OPT's decode, T5's decoder self- and cross-attention). BLIP2_ATTENTION_KERNEL=off keeps
  // at::matmul there alone (benchmarks compare the two in one process).
  const char* attention_env = std::getenv("BLIP2_ATTENTION_KERNEL");
  if (attention_env && std::string(attention_env) == "off") return;
  attention_decisions_ = DecideAttentionKernels(spec_.dtype, spec_.num_heads, spec_.head_dim, kernel_mode);
  for (const auto& [method, schema] : language_model_->methods) UseAttentionKernels(language_model_->module, method, attention_decisions_);
}

at::Tensor Blip2Runtime::EncodeImages(const at::Tensor& pixel_values) {
  at::Tensor pixels = pixel_values.to(spec_.device, spec_.dtype);
  return image_encoder_->module.forward({pixels}).toTensor();
}

at::Tensor Blip2Runtime::StartEncode(const at::Tensor& pixel_values) {
  at::Tensor pixels = pixel_values.to(spec_.device, spec_.dtype);
  return image_encoder_->module.get_method("encode_start")({pixels}).toTensor();
}

at::Tensor Blip2Runtime::EncodeLayers(const at::Tensor& hidden, int64_t start, int64_t end) {
  return image_encoder_->module.get_method("encode_layers")({hidden, start, end}).toTensor();
}

at::Tensor Blip2Runtime::FinishEncode(const at::Tensor& hidden) {
  return image_encoder_->module.get_method("encode_finish")({hidden}).toTensor();
}

at::Tensor Blip2Runtime::ResolveInputIds(const std::optional<at::Tensor>& input_ids, int64_t batch) const {
  if (!input_ids) {
    // Hugging Face: caption from BOS alone, after the image placeholders when the model has them.
    // T5 has no BOS: its tokenizer makes "" into [eos], which is what Blip2Processor gives for ''.
    std::vector<int64_t> start;
    if (spec_.image_token_index) start.assign(spec_.num_query_tokens, *spec_.image_token_index);
    int64_t first = spec_.bos_token_id >= 0 ? spec_.bos_token_id : spec_.eos_token_id;
    if (first >= 0) start.push_back(first);
    if (start.empty()) throw InvalidArgument("inputs.inputIds", "missing", "input ids (this model has no default prompt)");
    return at::tensor(start, at::TensorOptions().dtype(at::kLong)).unsqueeze(0).repeat({batch, 1});
  }
  at::Tensor ids = input_ids->to(at::kCPU).to(at::kLong).contiguous();
  if (ids.numel() > 0) {
    int64_t low = ids.min().item<int64_t>();
    int64_t high = ids.max().item<int64_t>();
    if (low < 0 || high >= spec_.vocab_size) {
      int64_t bad = low < 0 ? low : high;
      throw InvalidArgument("inputs.inputIds", "a tensor containing the id " + std::to_string(bad),
                            "token ids in [0, " + std::to_string(spec_.vocab_size) + ") (the model's vocabulary)");
    }
  }
  return ids;
}

at::Tensor Blip2Runtime::ResolveAttentionMask(const std::optional<at::Tensor>& attention_mask, const at::Tensor& input_ids) const {
  if (!attention_mask) return at::ones_like(input_ids);
  at::Tensor mask = attention_mask->to(at::kCPU).to(at::kLong).contiguous();
  if (mask.numel() > 0 && (mask.min().item<int64_t>() < 0 || mask.max().item<int64_t>() > 1)) {
    throw InvalidArgument("inputs.attentionMask", "a tensor with values other than 0 and 1", "a mask of 0s and 1s");
  }
  return mask;
}

std::vector<int64_t> Blip2Runtime::ImageTokenCounts(const at::Tensor& input_ids) const {
  std::vector<int64_t> counts(input_ids.size(0), 0);
  if (!spec_.image_token_index) return counts;
  at::Tensor per_row = input_ids.eq(*spec_.image_token_index).sum(1);
  for (int64_t b = 0; b < input_ids.size(0); ++b) {
    counts[b] = per_row[b].item<int64_t>();
    if (counts[b] != 0 && counts[b] != spec_.num_query_tokens) {
      throw InvalidArgument("inputs.inputIds", "row " + std::to_string(b) + " with " + std::to_string(counts[b]) + " image tokens",
                            "0 or num_query_tokens (" + std::to_string(spec_.num_query_tokens) +
                                ") <image> tokens per row (Blip2Processor inserts them)");
    }
  }
  return counts;
}

at::Tensor Blip2Runtime::EmbedTokens(const at::Tensor& input_ids_cpu) {
  return embed_tokens_({input_ids_cpu.to(spec_.device)}).toTensor();
}

PreparedPrompts Blip2Runtime::Prepare(const at::Tensor& query_embeds, const at::Tensor& input_ids,
                                      const at::Tensor& attention_mask) {
  const int64_t batch = input_ids.size(0);
  std::vector<int64_t> image_tokens = ImageTokenCounts(input_ids);
  at::Tensor text_embeds = EmbedTokens(input_ids);  // [B,T,E]
  std::vector<at::Tensor> rows;
  PreparedPrompts prepared;
  prepared.input_ids = input_ids;
  for (int64_t b = 0; b < batch; ++b) {
    // Dropping the pads puts every real token at the position OPT gives it (cumsum of the mask).
    std::vector<int64_t> kept;
    auto mask_row = attention_mask[b];
    auto mask_data = mask_row.data_ptr<int64_t>();
    for (int64_t t = 0; t < input_ids.size(1); ++t) {
      if (mask_data[t] != 0) kept.push_back(t);
    }
    at::Tensor row = text_embeds[b].index_select(0, LongTensorOn(kept, spec_.device));  // [T_b, E]
    if (image_tokens[b] > 0) {
      // The query embeddings take the places of the <image> tokens, in order.
      std::vector<int64_t> image_positions;
      auto ids = input_ids[b].data_ptr<int64_t>();
      for (size_t i = 0; i < kept.size(); ++i) {
        if (ids[kept[i]] == *spec_.image_token_index) image_positions.push_back(static_cast<int64_t>(i));
      }
      if (static_cast<int64_t>(image_positions.size()) != spec_.num_query_tokens) {
        throw InvalidArgument("inputs.attentionMask", "a mask hiding some <image> tokens of row " + std::to_string(b),
                              "the image tokens to be attended (mask 1)");
      }
      row = row.index_copy(0, LongTensorOn(image_positions, spec_.device), query_embeds[b].to(row.scalar_type()));
    } else {
      row = at::cat({query_embeds[b].to(row.scalar_type()), row}, 0);  // pre-4.45 checkpoints: prepend
    }
    prepared.lengths.push_back(row.size(0));
    rows.push_back(row);
  }
  int64_t longest = *std::max_element(prepared.lengths.begin(), prepared.lengths.end());
  prepared.inputs_embeds = at::zeros({batch, longest, spec_.embed_dim}, text_embeds.options());
  for (int64_t b = 0; b < batch; ++b) prepared.inputs_embeds[b].narrow(0, 0, prepared.lengths[b]).copy_(rows[b]);
  return prepared;
}

at::Tensor Blip2Runtime::Forward(const at::Tensor& pixel_values, const std::optional<at::Tensor>& input_ids_arg,
                                 const std::optional<at::Tensor>& attention_mask_arg,
                                 const std::optional<at::Tensor>& decoder_input_ids) {
  const int64_t batch = pixel_values.size(0);
  at::Tensor input_ids = ResolveInputIds(input_ids_arg, batch);
  at::Tensor attention_mask = ResolveAttentionMask(attention_mask_arg, input_ids);
  std::vector<int64_t> image_tokens = ImageTokenCounts(input_ids);
  bool all_expanded = std::all_of(image_tokens.begin(), image_tokens.end(), [&](int64_t c) { return c > 0; });
  bool none_expanded = std::all_of(image_tokens.begin(), image_tokens.end(), [](int64_t c) { return c == 0; });
  if (!all_expanded && !none_expanded) {
    throw InvalidArgument("inputs.inputIds", "a batch where only some rows carry <image> tokens",
                          "every row with num_query_tokens <image> tokens, or none");
  }
  at::Tensor query_embeds = EncodeImages(pixel_values);
  at::Tensor embeds = EmbedTokens(input_ids);
  at::Tensor mask = attention_mask.to(spec_.device);
  if (all_expanded) {
    // masked_scatter fills the image positions in row-major order: row b gets its own queries.
    at::Tensor positions = input_ids.eq(*spec_.image_token_index).to(spec_.device).unsqueeze(-1);
    embeds = embeds.masked_scatter(positions, query_embeds.to(embeds.scalar_type()));
  } else {
    embeds = at::cat({query_embeds.to(embeds.scalar_type()), embeds}, 1);
    mask = at::cat({at::ones({batch, spec_.num_query_tokens}, mask.options()), mask}, 1);
  }
  if (spec_.encoder_decoder()) {
    if (!decoder_input_ids) {
      throw InvalidArgument("inputs.decoderInputIds", "missing",
                            "decoder input ids [B, Td] for a T5 model's forward (transformers' T5 needs them or labels)");
    }
    at::Tensor decoder_ids = decoder_input_ids->to(at::kCPU).to(at::kLong);
    if (decoder_ids.size(0) != batch) {
      throw InvalidArgument("inputs.decoderInputIds", "a batch of " + std::to_string(decoder_ids.size(0)), "one row per image (" + std::to_string(batch) + ")");
    }
    if (decoder_ids.numel() > 0 && (decoder_ids.min().item<int64_t>() < 0 || decoder_ids.max().item<int64_t>() >= spec_.vocab_size)) {
      throw InvalidArgument("inputs.decoderInputIds", "a tensor with ids outside the vocabulary", "token ids in [0, " + std::to_string(spec_.vocab_size) + ")");
    }
    return forward_full_({embeds, mask, decoder_ids.to(spec_.device)}).toTensor();
  }
  if (decoder_input_ids) {
    throw InvalidArgument("inputs.decoderInputIds", "given", "no decoder input ids: this is a decoder-only (OPT) model");
  }
  return forward_full_({embeds, mask}).toTensor();
}

std::vector<std::vector<int64_t>> Blip2Runtime::CacheShapes(int64_t slots, int64_t max_length) const {
  std::vector<std::vector<int64_t>> shapes{{spec_.num_layers, 2, slots, spec_.num_heads, max_length, spec_.head_dim}};
  if (spec_.encoder_decoder()) shapes.push_back({spec_.num_layers, 2, slots, spec_.num_heads, spec_.max_encoder_length, spec_.head_dim});
  return shapes;
}

at::Tensor Blip2Runtime::EncodePrompts(SlotCache& cache, const std::vector<at::Tensor>& rows, const std::vector<int64_t>& slots) {
  const int64_t n = static_cast<int64_t>(rows.size());
  int64_t longest = 0;
  for (const at::Tensor& r : rows) longest = std::max(longest, r.size(0));
  if (longest > cache.length(1)) {
    throw Error(ErrorCode::kInternal, "encoder input of " + std::to_string(longest) + " positions exceeds the cross cache");
  }
  for (int64_t s : slots) {
    if (s < 0 || s >= cache.slots()) throw Error(ErrorCode::kInternal, "encode into slot " + std::to_string(s) + " outside the cache");
  }
  // Right padding with a mask: the real tokens' relative positions (all T5 sees) are unchanged.
  at::Tensor embeds = at::zeros({n, longest, spec_.embed_dim}, rows.front().options());
  std::vector<int64_t> mask_values(n * longest, 0);
  for (int64_t i = 0; i < n; ++i) {
    embeds[i].narrow(0, 0, rows[i].size(0)).copy_(rows[i]);
    for (int64_t t = 0; t < rows[i].size(0); ++t) mask_values[i * longest + t] = 1;
  }
  at::Tensor mask = at::tensor(mask_values, at::TensorOptions().dtype(at::kLong)).view({n, longest}).to(spec_.device);
  at::Tensor slot_tensor = LongTensorOn(slots, spec_.device);
  at::Tensor encoded = (*encode_)({embeds, mask}).toTensor();
  (*fill_cross_cache_)({cache.tensor(1), encoded, slot_tensor});
  at::Tensor start = at::full({n}, spec_.decoder_start_token_id, at::TensorOptions().dtype(at::kLong).device(spec_.device));
  at::Tensor positions = at::zeros({n}, at::TensorOptions().dtype(at::kLong).device(spec_.device));
  return decode_({cache.tensor(0), cache.tensor(1), start, slot_tensor, positions, int64_t{1}, mask, FirstSlotIfConsecutive(slots)})
      .toTensor();
}

namespace {

// The prompt rows' key length; throws unless every row's positions lie in its slot.
int64_t PrefillKeyLength(const SlotCache& cache, const at::Tensor& embeds, const std::vector<int64_t>& slots,
                         const std::vector<int64_t>& start) {
  int64_t kv_len = 0;
  for (size_t i = 0; i < start.size(); ++i) {
    if (slots[i] < 0 || slots[i] >= cache.slots() || start[i] < 0 || start[i] + embeds.size(1) > cache.length()) {
      throw Error(ErrorCode::kInternal, "prefill outside the cache: slot " + std::to_string(slots[i]) + ", positions " +
                  std::to_string(start[i]) + ".." + std::to_string(start[i] + embeds.size(1)));
    }
    kv_len = std::max(kv_len, start[i] + embeds.size(1));
  }
  return kv_len;
}

// The decode rows' key length; throws unless rows 0..n-1 and their positions lie in the cache.
int64_t DecodeKeyLength(const SlotCache& cache, const std::vector<int64_t>& positions, int64_t kv_len) {
  const int64_t n = static_cast<int64_t>(positions.size());
  if (n > cache.slots() || kv_len > cache.length()) {
    throw Error(ErrorCode::kInternal, "decode outside the cache: " + std::to_string(n) + " rows, kv_len " + std::to_string(kv_len));
  }
  for (int64_t p : positions) {
    if (p < 0 || p >= cache.length()) throw Error(ErrorCode::kInternal, "decode position " + std::to_string(p) + " outside the cache");
  }
  return kv_len;
}

std::vector<int64_t> FirstSlots(int64_t n) {
  std::vector<int64_t> slots(n);
  for (int64_t i = 0; i < n; ++i) slots[i] = i;
  return slots;
}

}  // namespace

at::Tensor Blip2Runtime::PrefillChunk(SlotCache& cache, const at::Tensor& embeds, const std::vector<int64_t>& slots,
                                      const std::vector<int64_t>& start, const std::vector<int64_t>& last) {
  const int64_t kv_len = PrefillKeyLength(cache, embeds, slots, start);
  std::vector<c10::IValue> args{cache.tensor(), embeds, LongTensorOn(slots, spec_.device), LongTensorOn(start, spec_.device),
                                kv_len, LongTensorOn(last, spec_.device), FirstSlotIfConsecutive(slots)};
  return forward_cached_(std::move(args)).toTensor();
}

at::Tensor Blip2Runtime::Decode(SlotCache& cache, const at::Tensor& tokens, const std::vector<int64_t>& positions, int64_t kv_len,
                                const std::vector<int64_t>& encoder_lengths) {
  const int64_t n = static_cast<int64_t>(positions.size());
  DecodeKeyLength(cache, positions, kv_len);
  std::vector<int64_t> slots = FirstSlots(n);
  if (spec_.encoder_decoder()) {
    int64_t longest = 1;
    for (int64_t e : encoder_lengths) longest = std::max(longest, e);
    std::vector<int64_t> mask_values(n * longest, 0);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t t = 0; t < encoder_lengths.at(i); ++t) mask_values[i * longest + t] = 1;
    }
    at::Tensor mask = at::tensor(mask_values, at::TensorOptions().dtype(at::kLong)).view({n, longest}).to(spec_.device);
    return decode_({cache.tensor(0), cache.tensor(1), tokens, LongTensorOn(slots, spec_.device), LongTensorOn(positions, spec_.device),
                    kv_len, mask, int64_t{0}})
        .toTensor();
  }
  std::vector<c10::IValue> args{cache.tensor(), tokens, LongTensorOn(slots, spec_.device), LongTensorOn(positions, spec_.device),
                                kv_len, int64_t{0}};
  return decode_(std::move(args)).toTensor();
}

at::Tensor Blip2Runtime::DecodeWithPrefill(SlotCache& cache, const at::Tensor& tokens, const std::vector<int64_t>& positions,
                                           int64_t kv_len, const at::Tensor& embeds, const std::vector<int64_t>& slots,
                                           const std::vector<int64_t>& start, const std::vector<int64_t>& last) {
  if (!step_) throw Error(ErrorCode::kInternal, "DecodeWithPrefill on a language model without a step method");
  const int64_t n = static_cast<int64_t>(positions.size());
  DecodeKeyLength(cache, positions, kv_len);
  const int64_t prompt_kv_len = PrefillKeyLength(cache, embeds, slots, start);
  for (int64_t s : slots) {
    if (s < n) throw Error(ErrorCode::kInternal, "prefill slot " + std::to_string(s) + " is a decode row's (0.." + std::to_string(n - 1) + ")");
  }
  std::vector<c10::IValue> args{cache.tensor(), tokens, LongTensorOn(FirstSlots(n), spec_.device), LongTensorOn(positions, spec_.device),
                                kv_len, int64_t{0}, embeds, LongTensorOn(slots, spec_.device), LongTensorOn(start, spec_.device),
                                prompt_kv_len, LongTensorOn(last, spec_.device), FirstSlotIfConsecutive(slots)};
  return (*step_)(std::move(args)).toTensor();
}

}  // namespace blip2
