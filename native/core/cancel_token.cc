#include "core/cancel_token.h"

#include "core/addon_data.h"
#include "core/errors.h"

namespace blip2 {

Napi::Function NativeCancelToken::Init(Napi::Env env) {
  Napi::Function ctor = DefineClass(env, "NativeCancelToken",
                                    {InstanceMethod<&NativeCancelToken::Cancel>("cancel"),
                                     InstanceAccessor<&NativeCancelToken::GetCancelled>("cancelled")});
  AddonData::Get(env)->cancel_token_constructor = Napi::Persistent(ctor);
  return ctor;
}

NativeCancelToken::NativeCancelToken(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeCancelToken>(info) {}

Napi::Value NativeCancelToken::Cancel(const Napi::CallbackInfo& info) {
  token_->cancelled.store(true);
  return info.Env().Undefined();
}

Napi::Value NativeCancelToken::GetCancelled(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), token_->IsCancelled());
}

std::shared_ptr<CancelToken> NativeCancelToken::FromValue(Napi::Value value) {
  if (value.IsUndefined() || value.IsNull()) return nullptr;
  Napi::FunctionReference& ctor = AddonData::Get(value.Env())->cancel_token_constructor;
  if (value.IsObject() && value.As<Napi::Object>().InstanceOf(ctor.Value())) {
    return ObjectWrap<NativeCancelToken>::Unwrap(value.As<Napi::Object>())->token();
  }
  throw InvalidArgument("cancelToken", "not a NativeCancelToken", "a token made by the binding, or undefined");
}

}  // namespace blip2
