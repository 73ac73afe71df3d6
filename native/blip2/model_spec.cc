#include "blip2/model_spec.h"

#include "core/dtype.h"
#include "core/errors.h"

namespace blip2 {

static int64_t RequireInt(Napi::Object object, const char* key, int64_t min) {
  Napi::Value value = object.Get(key);
  double d = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : -1e300;
  if (d < static_cast<double>(min) || d != static_cast<double>(static_cast<int64_t>(d))) {
    throw InvalidArgument(std::string("spec.") + key, value.IsUndefined() ? "undefined" : value.ToString().Utf8Value(),
                          "an integer >= " + std::to_string(min));
  }
  return static_cast<int64_t>(d);
}

static std::string RequireString(Napi::Object object, const char* key) {
  Napi::Value value = object.Get(key);
  if (!value.IsString()) throw InvalidArgument(std::string("spec.") + key, "not a string", "a string");
  return value.As<Napi::String>().Utf8Value();
}

ModelSpec ModelSpec::FromJs(Napi::Object object) {
  ModelSpec spec;
  spec.architecture = RequireString(object, "architecture");
  if (spec.architecture != "opt") {
    throw Error(ErrorCode::kModelLoad, "architecture '" + spec.architecture + "' is not supported by this runtime (only 'opt')");
  }
  spec.image_encoder_path = RequireString(object, "imageEncoderPath");
  spec.language_model_path = RequireString(object, "languageModelPath");
  spec.device = RequireDevice(RequireString(object, "device"), "device");
  spec.dtype = RequireDType(RequireString(object, "dtype"), "dtype");
  if (spec.dtype != at::kFloat && spec.dtype != at::kHalf && spec.dtype != at::kBFloat16) {
    throw InvalidArgument("dtype", "'" + DTypeName(spec.dtype) + "'", "'float32', 'float16' or 'bfloat16'");
  }
  spec.num_layers = RequireInt(object, "numLayers", 1);
  spec.num_heads = RequireInt(object, "numHeads", 1);
  spec.head_dim = RequireInt(object, "headDim", 1);
  spec.embed_dim = RequireInt(object, "embedDim", 1);
  spec.vocab_size = RequireInt(object, "vocabSize", 1);
  spec.max_length = RequireInt(object, "maxLength", 2);
  spec.num_query_tokens = RequireInt(object, "numQueryTokens", 1);
  spec.image_height = RequireInt(object, "imageHeight", 1);
  spec.image_width = RequireInt(object, "imageWidth", 1);
  spec.bos_token_id = RequireInt(object, "bosTokenId", 0);
  Napi::Value image_token = object.Get("imageTokenIndex");
  if (!image_token.IsNull() && !image_token.IsUndefined()) spec.image_token_index = RequireInt(object, "imageTokenIndex", 0);
  return spec;
}

}  // namespace blip2
