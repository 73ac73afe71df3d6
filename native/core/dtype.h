// The dtype names of the JS API and their libtorch and typed-array counterparts.
#pragma once

#include <napi.h>

#include <optional>
#include <string>

#include "core/torch_includes.h"

namespace blip2 {

// "float32" → kFloat ...; nullopt for names we do not support.
std::optional<at::ScalarType> ParseDType(const std::string& name);
std::string DTypeName(at::ScalarType type);
// Throws an InvalidArgument error naming `argument` for unknown names.
at::ScalarType RequireDType(const std::string& name, const std::string& argument);

// The typed array that holds a dtype's elements in toArray() (float16/bfloat16 as raw Uint16 bits,
// bool as Uint8).
napi_typedarray_type TypedArrayTypeFor(at::ScalarType type);
// The dtype whose elements a typed array holds bit for bit; Uint16Array has none (it may carry
// float16 or bfloat16 bits), nor do Uint32Array and BigUint64Array.
std::optional<at::ScalarType> DTypeOfTypedArray(napi_typedarray_type type);

// "cpu", "cuda", "cuda:1" → Device; throws a kDevice error for malformed or unavailable devices.
c10::Device RequireDevice(const std::string& name, const std::string& argument);
std::string DeviceName(const c10::Device& device);

}  // namespace blip2
