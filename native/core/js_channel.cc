#include "core/js_channel.h"

#include <cstdio>

namespace blip2 {

std::shared_ptr<JsChannel> JsChannel::Create(Napi::Env env) {
  auto channel = std::shared_ptr<JsChannel>(new JsChannel());
  channel->tsfn_ = Tsfn::New(env, "blip2-node", 0, 1, channel.get());
  channel->tsfn_.Unref(env);  // an idle addon must not keep the process alive
  return channel;
}

JsChannel::~JsChannel() = default;

bool JsChannel::Post(Callback callback) {
  auto* heap = new Callback(std::move(callback));
  if (tsfn_.NonBlockingCall(heap) != napi_ok) {
    delete heap;
    return false;
  }
  return true;
}

void JsChannel::BeginWork(Napi::Env env) {
  if (outstanding_++ == 0) tsfn_.Ref(env);
}

void JsChannel::EndWork(Napi::Env env) {
  if (outstanding_ > 0 && --outstanding_ == 0) tsfn_.Unref(env);
}

void JsChannel::CallJs(Napi::Env env, Napi::Function, JsChannel*, Callback* callback) {
  if (env != nullptr && callback != nullptr) {
    try {
      (*callback)(env);
    } catch (const Napi::Error& e) {
      // A callback settles a promise; a JS exception here means the conversion itself failed.
      std::fprintf(stderr, "blip2-node: uncaught error in completion: %s\n", e.Message().c_str());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "blip2-node: uncaught error in completion: %s\n", e.what());
    }
  }
  delete callback;
}

}  // namespace blip2
