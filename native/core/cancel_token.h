// The native end of an AbortSignal: lib calls cancel() from the signal's 'abort' listener and
// the task sees the flag before it starts and between steps.
#pragma once

#include <napi.h>

#include <memory>

#include "core/executor.h"

namespace blip2 {

class NativeCancelToken : public Napi::ObjectWrap<NativeCancelToken> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit NativeCancelToken(const Napi::CallbackInfo& info);
  const std::shared_ptr<CancelToken>& token() const { return token_; }
  // nullptr for undefined/null; a typed error for anything else that is not a token.
  static std::shared_ptr<CancelToken> FromValue(Napi::Value value);

 private:
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  Napi::Value GetCancelled(const Napi::CallbackInfo& info);
  std::shared_ptr<CancelToken> token_ = std::make_shared<CancelToken>();
};

}  // namespace blip2
