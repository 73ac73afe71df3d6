// NativeBlip2Model: a loaded Blip2ForConditionalGeneration (OPT) for lib's model classes.
#pragma once

#include <napi.h>

#include <memory>

#include "blip2/runtime.h"
#include "blip2/scheduler.h"

namespace blip2 {

class NativeBlip2Model : public Napi::ObjectWrap<NativeBlip2Model> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit NativeBlip2Model(const Napi::CallbackInfo& info);

 private:
  static Napi::Value Load(const Napi::CallbackInfo& info);
  Napi::Value EncodeImages(const Napi::CallbackInfo& info);
  Napi::Value Forward(const Napi::CallbackInfo& info);
  Napi::Value Generate(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value GetDevice(const Napi::CallbackInfo& info);
  Napi::Value GetDType(const Napi::CallbackInfo& info);
  Napi::Value GetLinearKernels(const Napi::CallbackInfo& info);
  Napi::Value GetAttentionKernels(const Napi::CallbackInfo& info);
  Napi::Value GetStats(const Napi::CallbackInfo& info);
  Napi::Value Modules(const Napi::CallbackInfo& info);
  const std::shared_ptr<Blip2Runtime>& Require() const;

  std::shared_ptr<Blip2Runtime> runtime_;
  std::shared_ptr<Scheduler> scheduler_;
  std::string device_;  // kept after dispose
  std::string dtype_;
  std::vector<LinearDecision> linear_decisions_;
  std::vector<AttentionDecision> attention_decisions_;
};

}  // namespace blip2
