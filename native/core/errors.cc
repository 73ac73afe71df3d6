#include "core/errors.h"

#include <algorithm>
#include <new>
#include <stdexcept>

#include "core/addon_data.h"
#include "core/torch_includes.h"

namespace blip2 {

const char* ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "ERR_BLIP2_INVALID_ARGUMENT";
    case ErrorCode::kShape: return "ERR_BLIP2_SHAPE";
    case ErrorCode::kDType: return "ERR_BLIP2_DTYPE";
    case ErrorCode::kDisposed: return "ERR_BLIP2_DISPOSED";
    case ErrorCode::kDevice: return "ERR_BLIP2_DEVICE";
    case ErrorCode::kModelLoad: return "ERR_BLIP2_MODEL_LOAD";
    case ErrorCode::kTorch: return "ERR_BLIP2_TORCH";
    case ErrorCode::kOutOfMemory: return "ERR_BLIP2_OUT_OF_MEMORY";
    case ErrorCode::kAborted: return "ABORT_ERR";
    case ErrorCode::kQueueFull: return "ERR_BLIP2_QUEUE_FULL";
    case ErrorCode::kImageDecode: return "ERR_BLIP2_IMAGE_DECODE";
    case ErrorCode::kInternal: return "ERR_BLIP2_INTERNAL";
  }
  return "ERR_BLIP2_INTERNAL";
}

Error InvalidArgument(const std::string& argument, const std::string& value, const std::string& expected) {
  return Error(ErrorCode::kInvalidArgument,
               "argument '" + argument + "' is " + value + "; expected " + expected,
               {{"argument", argument}, {"value", value}, {"expected", expected}});
}

static std::string WithContext(const std::string& context, const std::string& message) {
  return context.empty() ? message : context + ": " + message;
}

// libtorch reports a failed host allocation as a plain c10::Error ("DefaultCPUAllocator: can't
// allocate memory"), and errors inside TorchScript arrive as std::runtime_error with the text;
// CUDA's are "CUDA out of memory".
static bool IsAllocationFailure(const std::string& message) {
  return message.find("out of memory") != std::string::npos || message.find("can't allocate memory") != std::string::npos ||
         message.find("Cannot allocate memory") != std::string::npos;
}

static std::string OutOfMemoryMessage(const std::string& message) {
  // From the allocator's name on (libtorch's, or the addon's CPU tensor cache), up to the end of
  // that line: inside TorchScript it follows the interpreter's traceback.
  size_t start = std::string::npos;
  for (const char* allocator : {"DefaultCPUAllocator", "CPU tensor cache"}) start = std::min(start, message.find(allocator));
  std::string line = message.substr(start == std::string::npos ? 0 : start);
  size_t end = line.find('\n');
  return "out of memory: " + (end == std::string::npos ? line : line.substr(0, end));
}

Error ErrorFromException(std::exception_ptr error, const std::string& context) {
  try {
    std::rethrow_exception(error);
  } catch (const Error& e) {
    if (context.empty()) return e;
    return Error(e.code(), WithContext(context, e.message()), e.details());
  } catch (const c10::OutOfMemoryError& e) {
    return Error(ErrorCode::kOutOfMemory, WithContext(context, e.what_without_backtrace()));
  } catch (const c10::Error& e) {
    std::string message = e.what_without_backtrace();
    if (IsAllocationFailure(message)) return Error(ErrorCode::kOutOfMemory, WithContext(context, OutOfMemoryMessage(message)));
    return Error(ErrorCode::kTorch, WithContext(context, message));
  } catch (const std::bad_alloc&) {
    return Error(ErrorCode::kOutOfMemory, WithContext(context, "out of host memory"));
  } catch (const std::exception& e) {
    // TorchScript interpreter errors arrive as std::runtime_error; CUDA OOM inside a script too.
    std::string message = e.what();
    if (IsAllocationFailure(message)) return Error(ErrorCode::kOutOfMemory, WithContext(context, OutOfMemoryMessage(message)));
    return Error(ErrorCode::kTorch, WithContext(context, message));
  } catch (...) {
    return Error(ErrorCode::kInternal, WithContext(context, "unknown native exception"));
  }
}

Napi::Value ToJsError(Napi::Env env, const Error& error) {
  Napi::Object details = Napi::Object::New(env);
  for (const auto& [key, value] : error.details()) details.Set(key, value);
  AddonData* data = AddonData::Get(env);
  if (data != nullptr && !data->error_factory.IsEmpty()) {
    return data->error_factory.Call({Napi::String::New(env, ErrorCodeName(error.code())),
                                     Napi::String::New(env, error.message()), details});
  }
  Napi::Error plain = Napi::Error::New(env, error.message());
  plain.Set("code", ErrorCodeName(error.code()));
  return plain.Value();
}

}  // namespace blip2
