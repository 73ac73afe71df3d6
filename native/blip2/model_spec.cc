#include "blip2/model_spec.h"

#include "core/dtype.h"
#include "core/errors.h"
#include "core/tensor.h"

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

static Napi::Array RequireArray(Napi::Object object, const char* key, const std::string& where) {
  Napi::Value value = object.Get(key);
  if (!value.IsArray()) throw InvalidArgument(where + "." + key, "not an array", "an array");
  return value.As<Napi::Array>();
}

static Napi::Object RequireObject(Napi::Value value, const std::string& where) {
  if (!value.IsObject()) throw InvalidArgument(where, "not an object", "an object");
  return value.As<Napi::Object>();
}

static int64_t RequireIndex(Napi::Value value, const std::string& where) {
  double d = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : -1;
  if (d < 0 || d != static_cast<double>(static_cast<int64_t>(d))) throw InvalidArgument(where, "not an index", "an integer >= 0");
  return static_cast<int64_t>(d);
}

// spec.weights = { files: [{ path, bytes }], tensors: [{ key, file, offset, nbytes, dtype, shape, keepFloat32 }] }
// spec.modules = { imageEncoder: { path, parameters: [[name, tensorIndex], ...] }, languageModel: ... }
static void ParseWeightFiles(Napi::Object object, ModelSpec& spec) {
  Napi::Object weights = RequireObject(object.Get("weights"), "spec.weights");
  Napi::Array files = RequireArray(weights, "files", "spec.weights");
  for (uint32_t i = 0; i < files.Length(); ++i) {
    Napi::Object f = RequireObject(files.Get(i), "spec.weights.files[" + std::to_string(i) + "]");
    spec.weight_files.emplace_back(RequireString(f, "path"), RequireInt(f, "bytes", 0));
  }
  Napi::Array tensors = RequireArray(weights, "tensors", "spec.weights");
  for (uint32_t i = 0; i < tensors.Length(); ++i) {
    Napi::Object t = RequireObject(tensors.Get(i), "spec.weights.tensors[" + std::to_string(i) + "]");
    WeightRef ref;
    ref.key = RequireString(t, "key");
    ref.file = static_cast<int>(RequireInt(t, "file", 0));
    ref.offset = RequireInt(t, "offset", 0);
    ref.nbytes = RequireInt(t, "nbytes", 0);
    ref.dtype = RequireDType(RequireString(t, "dtype"), "spec.weights.tensors[" + std::to_string(i) + "].dtype");
    ref.shape = ParseShape(t.Get("shape"), "spec.weights.tensors[" + std::to_string(i) + "].shape");
    ref.keep_float32 = t.Get("keepFloat32").ToBoolean().Value();
    spec.weights.push_back(std::move(ref));
  }
}

static void ParseBindings(Napi::Object m, const std::string& where, ModelSpec::Module& out) {
  Napi::Array parameters = RequireArray(m, "parameters", where);
  for (uint32_t i = 0; i < parameters.Length(); ++i) {
    Napi::Value item = parameters.Get(i);
    if (!item.IsArray() || item.As<Napi::Array>().Length() != 2 || !item.As<Napi::Array>().Get(0u).IsString()) {
      throw InvalidArgument(where + ".parameters[" + std::to_string(i) + "]", "not a [name, index] pair", "[string, integer]");
    }
    Napi::Array pair = item.As<Napi::Array>();
    int64_t index = RequireIndex(pair.Get(1u), where + ".parameters[" + std::to_string(i) + "][1]");
    out.bindings.push_back({pair.Get(0u).As<Napi::String>().Utf8Value(), static_cast<int>(index)});
  }
}

static void ParseWeights(Napi::Object object, ModelSpec& spec) {
  ParseWeightFiles(object, spec);
  Napi::Object modules = RequireObject(object.Get("modules"), "spec.modules");
  auto module = [&](const char* name, ModelSpec::Module& out) {
    std::string where = std::string("spec.modules.") + name;
    Napi::Object m = RequireObject(modules.Get(name), where);
    out.path = RequireString(m, "path");
    ParseBindings(m, where, out);
  };
  module("imageEncoder", spec.image_encoder);
  module("languageModel", spec.language_model);
}

ModelSpec ModelSpec::WeightsFromJs(Napi::Object object, const std::string& path) {
  ModelSpec spec;
  ParseWeightFiles(object, spec);
  spec.image_encoder.path = path;
  ParseBindings(object, "bind", spec.image_encoder);
  return spec;
}

ModelSpec ModelSpec::FromJs(Napi::Object object) {
  ModelSpec spec;
  spec.architecture = RequireString(object, "architecture");
  if (spec.architecture != "opt" && spec.architecture != "t5") {
    throw Error(ErrorCode::kModelLoad, "architecture '" + spec.architecture + "' is not supported by this runtime ('opt' or 't5')");
  }
  ParseWeights(object, spec);
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
  spec.fused_attention = object.Get("fusedAttention").ToBoolean().Value();
  spec.bos_token_id = RequireInt(object, "bosTokenId", -1);
  spec.eos_token_id = RequireInt(object, "eosTokenId", -1);
  if (spec.encoder_decoder()) {
    spec.decoder_start_token_id = RequireInt(object, "decoderStartTokenId", 0);
    spec.max_encoder_length = RequireInt(object, "maxEncoderLength", 1);
  }
  Napi::Value image_token = object.Get("imageTokenIndex");
  if (!image_token.IsNull() && !image_token.IsUndefined()) spec.image_token_index = RequireInt(object, "imageTokenIndex", 0);
  return spec;
}

}  // namespace blip2
