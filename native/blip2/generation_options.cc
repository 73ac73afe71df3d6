#include "blip2/generation_options.h"

#include <cmath>
#include <string>

#include "core/errors.h"

namespace blip2 {

namespace {

std::string Shown(Napi::Value value) { return value.IsUndefined() ? "undefined" : value.ToString().Utf8Value(); }

int64_t IntField(Napi::Object object, const char* key, int64_t fallback, int64_t min, int64_t max) {
  Napi::Value value = object.Get(key);
  if (value.IsUndefined() || value.IsNull()) return fallback;
  double d = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : std::nan("");
  if (!(d >= static_cast<double>(min) && d <= static_cast<double>(max)) || d != std::floor(d)) {
    throw InvalidArgument(key, Shown(value), "an integer from " + std::to_string(min) + " to " + std::to_string(max));
  }
  return static_cast<int64_t>(d);
}

double NumberField(Napi::Object object, const char* key, double fallback) {
  Napi::Value value = object.Get(key);
  if (value.IsUndefined() || value.IsNull()) return fallback;
  double d = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : std::nan("");
  if (!std::isfinite(d)) throw InvalidArgument(key, Shown(value), "a finite number");
  return d;
}

}  // namespace

GenerationOptions GenerationOptions::FromJs(Napi::Object object, int64_t vocab_size) {
  GenerationOptions o;
  constexpr int64_t kLarge = int64_t{1} << 30;
  o.max_new_tokens = IntField(object, "maxNewTokens", o.max_new_tokens, 1, kLarge);
  o.min_new_tokens = IntField(object, "minNewTokens", o.min_new_tokens, 0, kLarge);
  Napi::Value sample = object.Get("doSample");
  o.do_sample = sample.IsBoolean() && sample.As<Napi::Boolean>().Value();
  o.temperature = NumberField(object, "temperature", o.temperature);
  if (o.do_sample && o.temperature <= 0) throw InvalidArgument("temperature", std::to_string(o.temperature), "a number > 0 when sampling");
  o.top_k = IntField(object, "topK", o.top_k, 0, kLarge);
  o.top_p = NumberField(object, "topP", o.top_p);
  if (!(o.top_p > 0 && o.top_p <= 1)) throw InvalidArgument("topP", std::to_string(o.top_p), "a number in (0, 1]");
  o.repetition_penalty = NumberField(object, "repetitionPenalty", o.repetition_penalty);
  if (o.repetition_penalty <= 0) throw InvalidArgument("repetitionPenalty", std::to_string(o.repetition_penalty), "a number > 0");
  o.num_beams = IntField(object, "numBeams", o.num_beams, 1, 1024);
  o.length_penalty = NumberField(object, "lengthPenalty", o.length_penalty);
  Napi::Value early = object.Get("earlyStopping");
  if (early.IsBoolean()) {
    o.early_stopping = early.As<Napi::Boolean>().Value() ? EarlyStopping::kTrue : EarlyStopping::kFalse;
  } else if (early.IsString() && early.As<Napi::String>().Utf8Value() == "never") {
    o.early_stopping = EarlyStopping::kNever;
  } else if (!early.IsUndefined() && !early.IsNull()) {
    throw InvalidArgument("earlyStopping", Shown(early), "true, false or 'never'");
  }
  o.num_return_sequences = IntField(object, "numReturnSequences", o.num_return_sequences, 1, 1024);
  if (o.num_beams > 1 && o.num_return_sequences > o.num_beams) {
    throw InvalidArgument("numReturnSequences", std::to_string(o.num_return_sequences),
                          "at most numBeams (" + std::to_string(o.num_beams) + ")");
  }
  if (o.num_beams == 1 && !o.do_sample && o.num_return_sequences > 1) {
    throw InvalidArgument("numReturnSequences", std::to_string(o.num_return_sequences),
                          "1 for greedy search (use doSample or numBeams > 1 for several sequences)");
  }
  if (o.num_beams > 1 && o.do_sample) {
    throw InvalidArgument("doSample", "true with numBeams " + std::to_string(o.num_beams),
                          "doSample false when numBeams > 1 (beam sampling is not supported)");
  }
  Napi::Value eos = object.Get("eosTokenId");
  if (eos.IsArray()) {
    Napi::Array list = eos.As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); ++i) {
      Napi::Value item = list.Get(i);
      double d = item.IsNumber() ? item.As<Napi::Number>().DoubleValue() : -1;
      if (d < 0 || d >= static_cast<double>(vocab_size) || d != std::floor(d)) {
        throw InvalidArgument("eosTokenId", Shown(item), "token ids in [0, " + std::to_string(vocab_size) + ")");
      }
      o.eos_token_ids.push_back(static_cast<int64_t>(d));
    }
  } else if (!eos.IsUndefined() && !eos.IsNull()) {
    o.eos_token_ids.push_back(IntField(object, "eosTokenId", 0, 0, vocab_size - 1));
  }
  int64_t default_pad = o.eos_token_ids.empty() ? 0 : o.eos_token_ids[0];
  o.pad_token_id = IntField(object, "padTokenId", default_pad, 0, vocab_size - 1);
  Napi::Value seed = object.Get("seed");
  if (!seed.IsUndefined() && !seed.IsNull()) {
    o.seed = static_cast<uint64_t>(IntField(object, "seed", 0, 0, (int64_t{1} << 53) - 1));
  }
  return o;
}

}  // namespace blip2
