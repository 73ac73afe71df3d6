// What the runtime needs to know about an exported BLIP-2 model (lib reads manifest.json and
// passes these numbers; native code never parses JSON).
#pragma once

#include <napi.h>

#include <optional>
#include <string>
#include <vector>

#include "core/torch_includes.h"
#include "core/weights.h"

namespace blip2 {

struct ModelSpec {
  struct Module {
    std::string path;  // the weight-free TorchScript file
    std::vector<WeightBinding> bindings;
  };
  std::string architecture;  // "opt" (decoder-only) or "t5" (encoder-decoder)
  Module image_encoder;
  Module language_model;
  std::vector<std::pair<std::string, int64_t>> weight_files;  // path, bytes
  std::vector<WeightRef> weights;
  c10::Device device{c10::kCPU};
  at::ScalarType dtype = at::kFloat;  // parameters, activations and KV cache
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  int64_t embed_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_length = 0;  // positions one sequence may occupy in the cache (T5: decoder positions)
  int64_t max_encoder_length = 0;  // T5: the longest encoder input (image queries + prompt) a slot holds
  int64_t num_query_tokens = 0;
  int64_t image_height = 0;
  int64_t image_width = 0;
  std::optional<int64_t> image_token_index;
  bool fused_attention = false;  // the vision attention through sdpa (else transformers' eager ops)
  int64_t bos_token_id = -1;  // -1: none (T5)
  int64_t decoder_start_token_id = -1;  // T5
  int64_t eos_token_id = -1;  // the first; T5's default prompt ends with it (the tokenizer's "" is [eos])
  bool encoder_decoder() const { return architecture == "t5"; }

  static ModelSpec FromJs(Napi::Object spec);
  // { weights: {...}, parameters: [[name, index], ...] } of one module (ScriptModule.load with
  // weights): fills weight_files, weights and image_encoder (as "the" module) with `path`.
  static ModelSpec WeightsFromJs(Napi::Object object, const std::string& path);
};

}  // namespace blip2
