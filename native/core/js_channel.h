// Delivers work from executor threads back to one JS environment, and keeps that environment's
// event loop alive exactly while promises of ours are outstanding.
//
// When the environment goes away (process exit, a terminated worker) its cleanup hook closes the
// channel: from then on Post drops callbacks instead of touching a finalised thread-safe function,
// and tasks that belong to the environment see closed() and stop.
#pragma once

#include <napi.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>

namespace blip2 {

class JsChannel {
 public:
  using Callback = std::function<void(Napi::Env)>;

  static std::shared_ptr<JsChannel> Create(Napi::Env env);
  ~JsChannel();

  // Any thread. The callback runs on the JS thread inside a handle scope. Returns false (and
  // drops the callback) once the environment is shutting down.
  bool Post(Callback callback);
  // JS thread (the environment's cleanup hook). Idempotent.
  void Close();
  // Any thread, at process exit: every channel stops posting (the loops are gone), nothing released.
  static void CloseAllForExit();
  bool closed() const { return closed_.load(); }

  // JS thread only: one BeginWork per promise handed out, one EndWork when it settles.
  void BeginWork(Napi::Env env);
  void EndWork(Napi::Env env);

 private:
  static void CallJs(Napi::Env env, Napi::Function, JsChannel*, Callback* callback);
  using Tsfn = Napi::TypedThreadSafeFunction<JsChannel, Callback, &JsChannel::CallJs>;

  std::mutex mutex_;  // Post against Close: never a call on a released function
  Tsfn tsfn_;
  std::atomic<bool> closed_{false};
  int outstanding_ = 0;
};

}  // namespace blip2
