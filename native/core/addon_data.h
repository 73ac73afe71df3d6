// Per-environment state (the main thread and each worker_thread load the addon separately).
#pragma once

#include <napi.h>

#include <memory>

namespace blip2 {

class JsChannel;

struct AddonData {
  Napi::FunctionReference error_factory;       // (code, message, details) => Error, set by lib
  Napi::FunctionReference tensor_constructor;  // NativeTensor
  Napi::FunctionReference module_constructor;  // NativeScriptModule
  Napi::FunctionReference cancel_token_constructor;
  std::shared_ptr<JsChannel> channel;          // executor threads → this environment's JS thread

  static AddonData* Get(Napi::Env env) { return env.GetInstanceData<AddonData>(); }
};

}  // namespace blip2
