#include "core/js_channel.h"

#include <algorithm>
#include <cstdio>
#include <vector>

namespace blip2 {

namespace {

std::mutex& ChannelsMutex() {
  static auto* mutex = new std::mutex();
  return *mutex;
}

std::vector<std::weak_ptr<JsChannel>>& Channels() {
  static auto* channels = new std::vector<std::weak_ptr<JsChannel>>();  // leaked: used at exit
  return *channels;
}

}  // namespace

std::shared_ptr<JsChannel> JsChannel::Create(Napi::Env env) {
  auto channel = std::shared_ptr<JsChannel>(new JsChannel());
  channel->tsfn_ = Tsfn::New(env, "blip2-node", 0, 1, channel.get());
  channel->tsfn_.Unref(env);  // an idle addon must not keep the process alive
  std::lock_guard<std::mutex> lock(ChannelsMutex());
  auto& all = Channels();
  all.erase(std::remove_if(all.begin(), all.end(), [](const auto& w) { return w.expired(); }), all.end());
  all.push_back(channel);
  return channel;
}

void JsChannel::CloseAllForExit() {
  std::lock_guard<std::mutex> lock(ChannelsMutex());
  for (auto& weak : Channels()) {
    if (auto channel = weak.lock()) {
      std::lock_guard<std::mutex> post_lock(channel->mutex_);
      channel->closed_.store(true);
    }
  }
}

JsChannel::~JsChannel() = default;

bool JsChannel::Post(Callback callback) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_.load()) return false;
  auto* heap = new Callback(std::move(callback));
  if (tsfn_.NonBlockingCall(heap) != napi_ok) {
    delete heap;
    return false;
  }
  return true;
}

void JsChannel::Close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_.exchange(true)) return;
  tsfn_.Release();
}

void JsChannel::BeginWork(Napi::Env env) {
  if (closed_.load()) return;
  if (outstanding_++ == 0) tsfn_.Ref(env);
}

void JsChannel::EndWork(Napi::Env env) {
  if (closed_.load()) return;
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
