// Runs a function on a device's executor and settles a JS promise with its result.
#pragma once

#include <napi.h>

#include <functional>
#include <memory>

#include "core/addon_data.h"
#include "core/errors.h"
#include "core/executor.h"
#include "core/js_channel.h"

namespace blip2 {

template <typename R>
class PromiseTask : public Task {
 public:
  using Work = std::function<R()>;
  using ToJs = std::function<Napi::Value(Napi::Env, R&)>;
  // Runs on the JS thread after the promise settles either way (releases JS references).
  using Finally = std::function<void(Napi::Env)>;

  PromiseTask(Napi::Env env, c10::Device device, Work work, ToJs to_js, std::shared_ptr<CancelToken> cancel,
              Finally finally = nullptr)
      : deferred_(Napi::Promise::Deferred::New(env)),
        channel_(AddonData::Get(env)->channel),
        device_(device),
        work_(std::move(work)),
        to_js_(std::move(to_js)),
        cancel_(std::move(cancel)),
        finally_(std::move(finally)) {
    channel_->BeginWork(env);
  }

  Napi::Promise promise() const { return deferred_.Promise(); }

  bool Step() override {
    auto result = std::make_shared<std::unique_ptr<R>>();
    std::exception_ptr failure;
    if (channel_->closed()) {
      work_ = nullptr;  // the environment is gone: nobody to tell
      return true;
    }
    try {
      if (cancel_ && cancel_->IsCancelled()) throw Error(ErrorCode::kAborted, "the operation was aborted");
      c10::OptionalDeviceGuard device_guard;
      if (!device_.is_cpu()) device_guard.reset_device(device_);
      *result = std::make_unique<R>(work_());
    } catch (...) {
      failure = std::current_exception();
    }
    Settle(std::move(result), failure);
    return true;
  }

  void Fail(std::exception_ptr error) noexcept override {
    try {
      Settle(std::make_shared<std::unique_ptr<R>>(), error);
    } catch (...) {
      // Out of memory while reporting an error: nothing left to do.
    }
  }

 private:
  void Settle(std::shared_ptr<std::unique_ptr<R>> result, std::exception_ptr failure) {
    // Work captured by the lambdas is released here, on the executor, not on the JS thread.
    work_ = nullptr;
    Napi::Promise::Deferred deferred = deferred_;
    auto channel = channel_;
    ToJs to_js = std::move(to_js_);
    Finally finally = std::move(finally_);
    channel_->Post([deferred, channel, to_js, finally, result, failure](Napi::Env env) {
      channel->EndWork(env);
      if (failure || !*result) {
        deferred.Reject(ToJsError(env, failure ? ErrorFromException(failure)
                                               : Error(ErrorCode::kInternal, "native task ended without a result")));
      } else {
        try {
          deferred.Resolve(to_js(env, **result));
        } catch (const Napi::Error& e) {
          deferred.Reject(e.Value());
        } catch (...) {
          deferred.Reject(ToJsError(env, ErrorFromException(std::current_exception())));
        }
      }
      if (finally) finally(env);
    });
  }

  Napi::Promise::Deferred deferred_;
  std::shared_ptr<JsChannel> channel_;
  c10::Device device_;
  Work work_;
  ToJs to_js_;
  std::shared_ptr<CancelToken> cancel_;
  Finally finally_;
};

template <typename R>
Napi::Promise RunAsync(Napi::Env env, const c10::Device& device, std::function<R()> work,
                       std::function<Napi::Value(Napi::Env, R&)> to_js,
                       std::shared_ptr<CancelToken> cancel = nullptr,
                       typename PromiseTask<R>::Finally finally = nullptr) {
  auto task = std::make_shared<PromiseTask<R>>(env, device, std::move(work), std::move(to_js), std::move(cancel),
                                               std::move(finally));
  Napi::Promise promise = task->promise();
  Executor::For(device).Submit(std::move(task));
  return promise;
}

}  // namespace blip2
