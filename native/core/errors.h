// Errors users can cause cross into JS as instances of lib/errors.ts classes, chosen by a stable
// code; lib registers a factory at load time so native code creates the right class directly.
#pragma once

#include <napi.h>

#include <exception>
#include <string>
#include <utility>
#include <vector>

namespace blip2 {

enum class ErrorCode {
  kInvalidArgument,  // a value outside what the API accepts
  kShape,            // tensor shapes that do not fit together
  kDType,            // a tensor of the wrong element type
  kDisposed,         // use of a disposed handle
  kDevice,           // an unknown or unavailable device
  kModelLoad,        // a missing or damaged model file
  kTorch,            // libtorch failed while running
  kOutOfMemory,      // an allocation failed on the device
  kAborted,          // cancelled through an AbortSignal
  kQueueFull,        // back-pressure: the model's queue is at maxQueue
  kImageDecode,      // an image that cannot be decoded
  kInternal,         // a bug of ours
};

const char* ErrorCodeName(ErrorCode code);

// Named fields copied onto the JS error (argument, value, expected, file, index...).
using ErrorDetails = std::vector<std::pair<std::string, std::string>>;

class Error : public std::exception {
 public:
  Error(ErrorCode code, std::string message, ErrorDetails details = {})
      : code_(code), message_(std::move(message)), details_(std::move(details)) {}
  const char* what() const noexcept override { return message_.c_str(); }
  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }
  const ErrorDetails& details() const { return details_; }

 private:
  ErrorCode code_;
  std::string message_;
  ErrorDetails details_;
};

// "argument 'maxNewTokens' is 0; expected an integer >= 1".
Error InvalidArgument(const std::string& argument, const std::string& value, const std::string& expected);

// Classifies whatever was thrown (our Error, c10::Error, std::bad_alloc, std::exception) so that a
// user error never becomes an abort and a libtorch message keeps its text without the C++ backtrace.
Error ErrorFromException(std::exception_ptr error, const std::string& context = "");

// Builds the JS error object through lib's factory (falls back to a plain Error before it is set).
Napi::Value ToJsError(Napi::Env env, const Error& error);

// Runs `body` and turns any C++ exception into a thrown JS error. For synchronous methods.
template <typename Fn>
auto GuardJs(Napi::Env env, Fn&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const Napi::Error&) {
    throw;
  } catch (...) {
    throw Napi::Error(env, ToJsError(env, ErrorFromException(std::current_exception())));
  }
}

}  // namespace blip2
