// Tensor handles: a JS object owning a libtorch tensor without copying it. JS sees shape, dtype
// and device synchronously (fixed at creation); the data itself is only touched on executors.
#pragma once

#include <napi.h>

#include <atomic>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "core/torch_includes.h"

namespace blip2 {

// Shared by a handle and the tasks using it, so dispose() during a running task is safe: the
// tensor is freed when the last owner lets go.
class TensorBox {
 public:
  explicit TensorBox(at::Tensor tensor);
  // A tensor still on its way to a device (Tensor.from(..., {device: 'cuda'})).
  explicit TensorBox(std::shared_future<at::Tensor> pending);
  ~TensorBox();
  TensorBox(const TensorBox&) = delete;
  TensorBox& operator=(const TensorBox&) = delete;

  // Executor threads only: waits for a pending transfer and rethrows its failure.
  at::Tensor Get() const;

  static int64_t LiveCount();

 private:
  std::shared_future<at::Tensor> value_;
  static std::atomic<int64_t> live_;
};

struct TensorMeta {
  std::vector<int64_t> shape;
  at::ScalarType dtype;
  c10::Device device;
  int64_t Numel() const;
  int64_t NBytes() const;
  static TensorMeta Of(const at::Tensor& tensor);
};

class NativeTensor : public Napi::ObjectWrap<NativeTensor> {
 public:
  static Napi::Function Init(Napi::Env env);
  // Wraps a tensor produced by native code into a new JS handle (JS thread).
  static Napi::Object NewInstance(Napi::Env env, at::Tensor tensor);
  static Napi::Object NewInstance(Napi::Env env, std::shared_ptr<TensorBox> box, const TensorMeta& meta);
  // The tensor behind a JS value, for `argument` of some call: throws a typed error when the
  // value is no tensor handle or was disposed.
  static NativeTensor* FromValue(Napi::Value value, const std::string& argument);
  static bool IsInstance(Napi::Value value);

  explicit NativeTensor(const Napi::CallbackInfo& info);
  ~NativeTensor() override;

  const std::shared_ptr<TensorBox>& box() const { return box_; }
  const TensorMeta& meta() const { return meta_; }
  bool disposed() const { return box_ == nullptr; }

 private:
  static Napi::Value FromData(const Napi::CallbackInfo& info);
  static Napi::Value LiveCount(const Napi::CallbackInfo& info);
  Napi::Value GetShape(const Napi::CallbackInfo& info);
  Napi::Value GetDType(const Napi::CallbackInfo& info);
  Napi::Value GetDevice(const Napi::CallbackInfo& info);
  Napi::Value GetNBytes(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
  Napi::Value ToArray(const Napi::CallbackInfo& info);
  Napi::Value To(const Napi::CallbackInfo& info);
  Napi::Value Narrow(const Napi::CallbackInfo& info);
  Napi::Value Select(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);

  void Adopt(Napi::Env env, std::shared_ptr<TensorBox> box, const TensorMeta& meta);
  void Release();
  void RequireLive() const;

  std::shared_ptr<TensorBox> box_;
  TensorMeta meta_{{}, at::kFloat, c10::Device(c10::kCPU)};
  int64_t reported_bytes_ = 0;
  napi_env env_ = nullptr;
};

// Parses a JS array of non-negative integers as a shape for `argument`.
std::vector<int64_t> ParseShape(Napi::Value value, const std::string& argument);
std::string ShapeString(c10::IntArrayRef shape);

}  // namespace blip2
