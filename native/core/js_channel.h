// Delivers work from executor threads back to one JS environment, and keeps that environment's
// event loop alive exactly while promises of ours are outstanding.
#pragma once

#include <napi.h>

#include <functional>
#include <memory>

namespace blip2 {

class JsChannel {
 public:
  using Callback = std::function<void(Napi::Env)>;

  static std::shared_ptr<JsChannel> Create(Napi::Env env);
  ~JsChannel();

  // Any thread. The callback runs on the JS thread inside a handle scope. Returns false (and
  // drops the callback) once the environment is shutting down.
  bool Post(Callback callback);

  // JS thread only: one BeginWork per promise handed out, one EndWork when it settles.
  void BeginWork(Napi::Env env);
  void EndWork(Napi::Env env);

 private:
  static void CallJs(Napi::Env env, Napi::Function, JsChannel*, Callback* callback);
  using Tsfn = Napi::TypedThreadSafeFunction<JsChannel, Callback, &JsChannel::CallJs>;

  Tsfn tsfn_;
  int outstanding_ = 0;
};

}  // namespace blip2
