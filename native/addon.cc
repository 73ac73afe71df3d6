// blip2-node native binding: tensor handles, per-device executors, TorchScript modules.
// The JS-facing contract is typings/binding.d.ts; lib/ is its only caller.
#include <napi.h>

#include <ATen/Parallel.h>

#include <cstdlib>
#include <mutex>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/cuda.h>

#include "blip2/blip2_model.h"
#include "core/addon_data.h"
#include "core/async.h"
#include "core/cancel_token.h"
#include "core/cpu_tensor_cache.h"
#include "core/errors.h"
#include "core/executor.h"
#include "core/js_channel.h"
#include "core/script_module.h"
#include "core/stats.h"
#include "core/tensor.h"
#include "image/preprocess.h"
#include "kernels/attention.h"
#include "kernels/linear.h"

namespace blip2 {
namespace {

Napi::Value SetErrorFactory(const Napi::CallbackInfo& info) {
  if (!info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "setErrorFactory expects a function");
  AddonData::Get(info.Env())->error_factory = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

Napi::Value Devices(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array devices = Napi::Array::New(env);
  devices.Set(0u, "cpu");
  if (torch::cuda::is_available()) {
    for (size_t i = 0; i < torch::cuda::device_count(); ++i) {
      devices.Set(static_cast<uint32_t>(i + 1), "cuda:" + std::to_string(i));
    }
  }
  return devices;
}

Napi::Value Versions(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object versions = Napi::Object::New(env);
  versions.Set("libtorch", TORCH_VERSION);
  versions.Set("linearKernel", LinearKernelIsa());
  versions.Set("onednnLinear", OneDnnLinearAvailable());
  const auto& cuda = at::detail::getCUDAHooks();
  if (cuda.hasCUDART()) {
    long v = cuda.versionCUDART();  // e.g. 12040 → "12.4"
    versions.Set("cuda", std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10));
  } else {
    versions.Set("cuda", env.Null());
  }
#ifdef BLIP2_WITH_CUDA
  versions.Set("builtWithCuda", true);
#else
  versions.Set("builtWithCuda", false);
#endif
  return versions;
}

Napi::Value GetStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object stats = Napi::Object::New(env);
  stats.Set("liveTensors", static_cast<double>(TensorBox::LiveCount()));
  stats.Set("deviceToHostBytes", static_cast<double>(Stats::device_to_host_bytes.load()));
  stats.Set("hostToDeviceBytes", static_cast<double>(Stats::host_to_device_bytes.load()));
  stats.Set("kvCacheAllocations", static_cast<double>(Stats::kv_cache_allocations.load()));
  stats.Set("kvCacheBytes", static_cast<double>(Stats::kv_cache_bytes.load()));
  stats.Set("generatedTokens", static_cast<double>(Stats::generated_tokens.load()));
  stats.Set("decodeHostReadBytes", static_cast<double>(Stats::decode_host_read_bytes.load()));
  stats.Set("decodeSteps", static_cast<double>(Stats::decode_steps.load()));
  stats.Set("pendingCpuTasks", static_cast<double>(Executor::For(c10::Device(c10::kCPU)).pending()));
  const CpuTensorCacheStats cache = GetCpuTensorCacheStats();
  Napi::Object cpu_cache = Napi::Object::New(env);
  cpu_cache.Set("installed", cache.installed);
  cpu_cache.Set("mappedBytes", static_cast<double>(cache.mapped_bytes));
  cpu_cache.Set("idleBytes", static_cast<double>(cache.idle_bytes));
  cpu_cache.Set("reuses", static_cast<double>(cache.reuses));
  cpu_cache.Set("maps", static_cast<double>(cache.maps));
  stats.Set("cpuTensorCache", cpu_cache);
  return stats;
}

// Intra-op threads are per issuing thread under OpenMP, so the setting is made on the executor.
Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    double n = info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
    if (n < 1 || n > 1024 || n != static_cast<double>(static_cast<int>(n))) {
      throw InvalidArgument("threads", info[0].ToString().Utf8Value(), "an integer from 1 to 1024");
    }
    int threads = static_cast<int>(n);
    return RunAsync<int>(
        env, c10::Device(c10::kCPU), [threads]() { at::set_num_threads(threads); return at::get_num_threads(); },
        [](Napi::Env env, int& result) -> Napi::Value { return Napi::Number::New(env, result); });
  });
}

Napi::Value GetNumThreads(const Napi::CallbackInfo& info) {
  return RunAsync<int>(
      info.Env(), c10::Device(c10::kCPU), []() { return at::get_num_threads(); },
      [](Napi::Env env, int& result) -> Napi::Value { return Napi::Number::New(env, result); });
}

// The main thread's process 'exit' event (lib registers it): every channel stops posting and every
// executor finishes its current step and parks, BEFORE exit() runs any static destructor. (An
// atexit handler alone is not enough: libraries that create their statics lazily, oneDNN's
// primitive cache among them, register destructors that run before it.)
Napi::Value ShutdownForExit(const Napi::CallbackInfo& info) {
  JsChannel::CloseAllForExit();
  Executor::ShutdownAll(30000);
  return info.Env().Undefined();
}

// Tests only: one product through one path (LinearPathName's names), to compare them.
Napi::Value LinearForTesting(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    auto x = NativeTensor::FromValue(info[0], "x")->box();
    auto w = NativeTensor::FromValue(info[1], "weight")->box();
    std::shared_ptr<TensorBox> b;
    if (!info[2].IsNull() && !info[2].IsUndefined()) b = NativeTensor::FromValue(info[2], "bias")->box();
    std::string name = info[3].IsString() ? info[3].As<Napi::String>().Utf8Value() : "";
    LinearPath path;
    if (!LinearPathFromName(name, &path)) throw InvalidArgument("path", name, "'plain', 'kernel', 'onednn' or 'kernel-prefetch'");
    return RunAsync<at::Tensor>(
        env, c10::Device(c10::kCPU),
        [x, w, b, path]() {
          c10::optional<at::Tensor> bias;
          if (b) bias = b->Get();
          return LinearOnPath(path, x->Get(), w->Get(), bias);
        },
        [](Napi::Env env, at::Tensor& out) -> Napi::Value { return NativeTensor::NewInstance(env, out); });
  });
}

// Tests only: the `path` argument of the attention kernels' bindings; true for 'kernel'.
bool KernelPathArgument(const Napi::Value& value) {
  std::string name = value.IsString() ? value.As<Napi::String>().Utf8Value() : "";
  if (name != "plain" && name != "kernel") throw InvalidArgument("path", name, "'plain' or 'kernel'");
  return name == "kernel";
}

// Tests only: a x (the first `positions` rows of the cache-like `b`, transposed for the scores)
// through at::matmul ('plain') or the attention kernel ('kernel'), as the decode step reads the cache.
Napi::Value AttentionMatmulForTesting(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    auto a = NativeTensor::FromValue(info[0], "a")->box();
    auto b = NativeTensor::FromValue(info[1], "b")->box();
    const bool transpose = info[2].ToBoolean();
    const int64_t positions = info[3].IsNumber() ? info[3].As<Napi::Number>().Int64Value() : -1;
    const bool kernel = KernelPathArgument(info[4]);
    return RunAsync<at::Tensor>(
        env, c10::Device(c10::kCPU),
        [a, b, transpose, positions, kernel]() {
          at::Tensor rows = b->Get();
          if (positions < 0 || positions > rows.size(-2))
            throw InvalidArgument("positions", std::to_string(positions), "0 to b.size(-2) = " + std::to_string(rows.size(-2)));
          rows = rows.narrow(-2, 0, positions);
          if (transpose) rows = rows.transpose(-1, -2);
          return kernel ? AttentionKernelMatmul(a->Get(), rows) : at::matmul(a->Get(), rows);
        },
        [](Napi::Env env, at::Tensor& out) -> Napi::Value { return NativeTensor::NewInstance(env, out); });
  });
}

// Tests only: a copy of `self` after self.index_copy_(0, index, source) by libtorch ('plain') or
// the runtime's cache-write kernel ('kernel').
Napi::Value CacheWriteForTesting(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    auto self = NativeTensor::FromValue(info[0], "self")->box();
    auto index = NativeTensor::FromValue(info[1], "index")->box();
    auto source = NativeTensor::FromValue(info[2], "source")->box();
    const bool kernel = KernelPathArgument(info[3]);
    return RunAsync<at::Tensor>(
        env, c10::Device(c10::kCPU),
        [self, index, source, kernel]() {
          at::Tensor out = self->Get().clone();
          if (kernel) {
            TORCH_CHECK(CacheWriteKernelApplies(out, 0, index->Get(), source->Get()), "the cache-write kernel does not apply");
            Blip2IndexCopy(out, 0, index->Get(), source->Get());
          } else {
            out.index_copy_(0, index->Get(), source->Get());
          }
          return out;
        },
        [](Napi::Env env, at::Tensor& out) -> Napi::Value { return NativeTensor::NewInstance(env, out); });
  });
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  InstallCpuTensorCache();
  auto* data = new AddonData();
  env.SetInstanceData(data);
  data->channel = JsChannel::Create(env);
  // A terminated worker or an exiting process: close this environment's channel first, so that
  // executor threads stop posting into it and its tasks end at their next step.
  auto* hook_channel = new std::shared_ptr<JsChannel>(data->channel);
  napi_add_env_cleanup_hook(env, [](void* arg) {
    auto* channel = static_cast<std::shared_ptr<JsChannel>*>(arg);
    (*channel)->Close();
    delete channel;
  }, hook_channel);
  // Process exit: runs before libtorch's static destructors (registered earlier, run later), so
  // no executor is inside libtorch while it is torn down.
  static std::once_flag exit_handler;
  std::call_once(exit_handler, [] {
    std::atexit([] {
      JsChannel::CloseAllForExit();
      Executor::ShutdownAll(30000);
    });
  });
  exports.Set("NativeTensor", NativeTensor::Init(env));
  exports.Set("NativeScriptModule", NativeScriptModule::Init(env));
  exports.Set("NativeCancelToken", NativeCancelToken::Init(env));
  exports.Set("NativeBlip2Model", NativeBlip2Model::Init(env));
  exports.Set("setErrorFactory", Napi::Function::New(env, SetErrorFactory, "setErrorFactory"));
  exports.Set("devices", Napi::Function::New(env, Devices, "devices"));
  exports.Set("versions", Napi::Function::New(env, Versions, "versions"));
  exports.Set("stats", Napi::Function::New(env, GetStats, "stats"));
  exports.Set("setNumThreads", Napi::Function::New(env, SetNumThreads, "setNumThreads"));
  exports.Set("getNumThreads", Napi::Function::New(env, GetNumThreads, "getNumThreads"));
  exports.Set("shutdownForExit", Napi::Function::New(env, ShutdownForExit, "shutdownForExit"));
  exports.Set("linearForTesting", Napi::Function::New(env, LinearForTesting, "linearForTesting"));
  exports.Set("attentionMatmulForTesting", Napi::Function::New(env, AttentionMatmulForTesting, "attentionMatmulForTesting"));
  exports.Set("cacheWriteForTesting", Napi::Function::New(env, CacheWriteForTesting, "cacheWriteForTesting"));
  exports.Set("preprocessImages", Napi::Function::New(env, image::PreprocessImages, "preprocessImages"));
  return exports;
}

}  // namespace blip2

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return blip2::Init(env, exports); }

NODE_API_MODULE(blip2_node, InitAddon)
