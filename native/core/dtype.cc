#include "core/dtype.h"

#include <torch/cuda.h>
#include <torch/version.h>

#include "core/errors.h"

namespace blip2 {

std::optional<at::ScalarType> ParseDType(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "float16") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float64") return at::kDouble;
  if (name == "int64") return at::kLong;
  if (name == "int32") return at::kInt;
  if (name == "int16") return at::kShort;
  if (name == "int8") return at::kChar;
  if (name == "uint8") return at::kByte;
  if (name == "bool") return at::kBool;
  return std::nullopt;
}

std::string DTypeName(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return std::string("unsupported(") + c10::toString(type) + ")";
  }
}

at::ScalarType RequireDType(const std::string& name, const std::string& argument) {
  auto type = ParseDType(name);
  if (!type) {
    throw InvalidArgument(argument, "'" + name + "'",
                          "one of float32, float16, bfloat16, float64, int64, int32, int16, int8, uint8, bool");
  }
  return *type;
}

napi_typedarray_type TypedArrayTypeFor(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return napi_float32_array;
    case at::kDouble: return napi_float64_array;
    case at::kHalf:
    case at::kBFloat16: return napi_uint16_array;
    case at::kLong: return napi_bigint64_array;
    case at::kInt: return napi_int32_array;
    case at::kShort: return napi_int16_array;
    case at::kChar: return napi_int8_array;
    case at::kByte:
    case at::kBool: return napi_uint8_array;
    default: throw Error(ErrorCode::kDType, "tensors of dtype " + DTypeName(type) + " cannot be read into JS");
  }
}

std::optional<at::ScalarType> DTypeOfTypedArray(napi_typedarray_type type) {
  switch (type) {
    case napi_float32_array: return at::kFloat;
    case napi_float64_array: return at::kDouble;
    case napi_bigint64_array: return at::kLong;
    case napi_int32_array: return at::kInt;
    case napi_int16_array: return at::kShort;
    case napi_int8_array: return at::kChar;
    case napi_uint8_array:
    case napi_uint8_clamped_array: return at::kByte;
    default: return std::nullopt;
  }
}

c10::Device RequireDevice(const std::string& name, const std::string& argument) {
  auto bad = [&](const std::string& why) {
    return Error(ErrorCode::kDevice, "argument '" + argument + "' is '" + name + "'; " + why,
                 {{"argument", argument}, {"value", name}, {"expected", "'cpu', 'cuda' or 'cuda:N'"}});
  };
  if (name != "cpu" && name.rfind("cuda", 0) != 0) throw bad("expected 'cpu', 'cuda' or 'cuda:N'");
  c10::Device device(c10::kCPU);
  try {
    device = c10::Device(name);
  } catch (const c10::Error&) {
    throw bad("expected 'cpu', 'cuda' or 'cuda:N'");
  }
  if (device.is_cuda()) {
    if (!torch::cuda::is_available()) {
#ifdef BLIP2_WITH_CUDA
      throw bad("no CUDA GPU or driver was found (this addon is built with CUDA, against libtorch " + std::string(TORCH_VERSION) + ")");
#else
      throw bad("this addon is a CPU-only build (against libtorch " + std::string(TORCH_VERSION) +
                " without CUDA); build it against a CUDA torch for GPUs: BLIP2_PYTHON=<python with a CUDA torch> npm rebuild blip2-node");
#endif
    }
    int64_t count = static_cast<int64_t>(torch::cuda::device_count());
    if (device.has_index() && device.index() >= count) {
      throw bad("only " + std::to_string(count) + " CUDA device(s) are present");
    }
    if (!device.has_index()) device.set_index(0);
  }
  return device;
}

std::string DeviceName(const c10::Device& device) { return device.str(); }

}  // namespace blip2
