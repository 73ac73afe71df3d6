// Generation options as Hugging Face's GenerationConfig names them (lib fills in the defaults of
// the model's generation_config.json and validates with precise messages; this re-checks ranges
// so that no value can crash the process).
#pragma once

#include <napi.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace blip2 {

enum class EarlyStopping { kFalse, kTrue, kNever };

struct GenerationOptions {
  int64_t max_new_tokens = 20;
  int64_t min_new_tokens = 0;
  bool do_sample = false;
  double temperature = 1.0;
  int64_t top_k = 50;  // 0 disables
  double top_p = 1.0;  // 1 disables
  double repetition_penalty = 1.0;
  int64_t num_beams = 1;
  double length_penalty = 1.0;
  EarlyStopping early_stopping = EarlyStopping::kFalse;
  int64_t num_return_sequences = 1;
  std::vector<int64_t> eos_token_ids;
  int64_t pad_token_id = 0;
  std::optional<uint64_t> seed;

  static GenerationOptions FromJs(Napi::Object object, int64_t vocab_size);
};

}  // namespace blip2
