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
  std::string architecture;  // "opt"
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
  int64_t max_length = 0;  // positions one sequence may occupy in the cache
  int64_t num_query_tokens = 0;
  int64_t image_height = 0;
  int64_t image_width = 0;
  std::optional<int64_t> image_token_index;
  int64_t bos_token_id = -1;

  static ModelSpec FromJs(Napi::Object spec);
};

}  // namespace blip2
