#include "core/tensor.h"

#include <cstring>
#include <limits>
#include <sstream>

#include "core/addon_data.h"
#include "core/async.h"
#include "core/dtype.h"
#include "core/device_transfer.h"
#include "core/errors.h"
#include "core/stats.h"

namespace blip2 {

std::atomic<int64_t> TensorBox::live_{0};

TensorBox::TensorBox(at::Tensor tensor) {
  std::promise<at::Tensor> ready;
  ready.set_value(std::move(tensor));
  value_ = ready.get_future().share();
  live_.fetch_add(1);
}

TensorBox::TensorBox(std::shared_future<at::Tensor> pending) : value_(std::move(pending)) { live_.fetch_add(1); }

TensorBox::~TensorBox() { live_.fetch_sub(1); }

at::Tensor TensorBox::Get() const { return value_.get(); }

int64_t TensorBox::LiveCount() { return live_.load(); }

int64_t TensorMeta::Numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t TensorMeta::NBytes() const { return Numel() * static_cast<int64_t>(c10::elementSize(dtype)); }

TensorMeta TensorMeta::Of(const at::Tensor& tensor) {
  return TensorMeta{tensor.sizes().vec(), tensor.scalar_type(), tensor.device()};
}

std::string ShapeString(c10::IntArrayRef shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

std::vector<int64_t> ParseShape(Napi::Value value, const std::string& argument) {
  const std::string expected = "an array of non-negative integers";
  if (!value.IsArray()) throw InvalidArgument(argument, "not an array", expected);
  Napi::Array array = value.As<Napi::Array>();
  if (array.Length() > 16) throw InvalidArgument(argument, "an array of " + std::to_string(array.Length()) + " dimensions", "at most 16 dimensions");
  std::vector<int64_t> shape;
  // 2^53 keeps every element count exactly representable as a JS number.
  constexpr double kMaxNumel = 9007199254740992.0;
  double numel = 1;
  for (uint32_t i = 0; i < array.Length(); ++i) {
    Napi::Value item = array.Get(i);
    double d = item.IsNumber() ? item.As<Napi::Number>().DoubleValue() : -1;
    if (!item.IsNumber() || d < 0 || d != static_cast<double>(static_cast<int64_t>(d))) {
      throw InvalidArgument(argument, "an array whose item " + std::to_string(i) + " is " + item.ToString().Utf8Value(), expected);
    }
    numel *= d;
    if (numel > kMaxNumel) throw InvalidArgument(argument, "a shape with more than 2^53 elements", "a shape that fits in memory");
    shape.push_back(static_cast<int64_t>(d));
  }
  return shape;
}

namespace {

struct NewHandleArgs {
  std::shared_ptr<TensorBox> box;
  TensorMeta meta;
};

}  // namespace

Napi::Function NativeTensor::Init(Napi::Env env) {
  Napi::Function ctor = DefineClass(
      env, "NativeTensor",
      {
          StaticMethod<&NativeTensor::FromData>("fromData"),
          StaticMethod<&NativeTensor::LiveCount>("liveCount"),
          InstanceAccessor<&NativeTensor::GetShape>("shape"),
          InstanceAccessor<&NativeTensor::GetDType>("dtype"),
          InstanceAccessor<&NativeTensor::GetDevice>("device"),
          InstanceAccessor<&NativeTensor::GetNBytes>("nbytes"),
          InstanceAccessor<&NativeTensor::GetDisposed>("disposed"),
          InstanceMethod<&NativeTensor::ToArray>("toArray"),
          InstanceMethod<&NativeTensor::To>("to"),
          InstanceMethod<&NativeTensor::Narrow>("narrow"),
          InstanceMethod<&NativeTensor::Select>("select"),
          InstanceMethod<&NativeTensor::Dispose>("dispose"),
      });
  AddonData::Get(env)->tensor_constructor = Napi::Persistent(ctor);
  return ctor;
}

NativeTensor::NativeTensor(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeTensor>(info) {
  env_ = info.Env();
  if (info.Length() != 1 || !info[0].IsExternal()) {
    throw Napi::TypeError::New(info.Env(), "NativeTensor cannot be constructed directly; use Tensor.from()");
  }
  auto* args = info[0].As<Napi::External<NewHandleArgs>>().Data();
  Adopt(info.Env(), args->box, args->meta);
}

NativeTensor::~NativeTensor() { Release(); }

void NativeTensor::Adopt(Napi::Env env, std::shared_ptr<TensorBox> box, const TensorMeta& meta) {
  box_ = std::move(box);
  meta_ = meta;
  reported_bytes_ = meta_.NBytes();
  // Tell V8 how much memory hangs off this small object, so forgotten tensors get collected.
  Napi::MemoryManagement::AdjustExternalMemory(env, reported_bytes_);
}

void NativeTensor::Release() {
  if (!box_) return;
  box_.reset();
  if (reported_bytes_ != 0 && env_ != nullptr) {
    Napi::MemoryManagement::AdjustExternalMemory(Napi::Env(env_), -reported_bytes_);
  }
  reported_bytes_ = 0;
}

Napi::Object NativeTensor::NewInstance(Napi::Env env, at::Tensor tensor) {
  TensorMeta meta = TensorMeta::Of(tensor);
  return NewInstance(env, std::make_shared<TensorBox>(std::move(tensor)), meta);
}

Napi::Object NativeTensor::NewInstance(Napi::Env env, std::shared_ptr<TensorBox> box, const TensorMeta& meta) {
  NewHandleArgs args{std::move(box), meta};
  return AddonData::Get(env)->tensor_constructor.New({Napi::External<NewHandleArgs>::New(env, &args)});
}

bool NativeTensor::IsInstance(Napi::Value value) {
  if (!value.IsObject()) return false;
  AddonData* data = AddonData::Get(value.Env());
  return value.As<Napi::Object>().InstanceOf(data->tensor_constructor.Value());
}

NativeTensor* NativeTensor::FromValue(Napi::Value value, const std::string& argument) {
  if (!IsInstance(value)) {
    std::string what = value.IsUndefined() ? "undefined" : value.IsNull() ? "null" : "not a Tensor";
    throw InvalidArgument(argument, what, "a Tensor");
  }
  NativeTensor* tensor = ObjectWrap<NativeTensor>::Unwrap(value.As<Napi::Object>());
  if (tensor->disposed()) {
    throw Error(ErrorCode::kDisposed, "argument '" + argument + "' is a Tensor that has been disposed",
                {{"argument", argument}});
  }
  return tensor;
}

void NativeTensor::RequireLive() const {
  if (disposed()) throw Error(ErrorCode::kDisposed, "this Tensor has been disposed; it can no longer be used");
}

Napi::Value NativeTensor::FromData(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    if (!info[0].IsTypedArray()) {
      throw InvalidArgument("data", info[0].IsUndefined() ? "undefined" : "not a typed array", "a TypedArray");
    }
    Napi::TypedArray data = info[0].As<Napi::TypedArray>();
    std::vector<int64_t> shape = ParseShape(info[1], "shape");
    napi_typedarray_type array_type = data.TypedArrayType();
    std::optional<at::ScalarType> source = DTypeOfTypedArray(array_type);
    std::optional<at::ScalarType> target;
    if (info[2].IsString()) target = RequireDType(info[2].As<Napi::String>().Utf8Value(), "dtype");
    if (array_type == napi_uint16_array) {
      // Uint16Array carries half-precision bits; which kind only the caller knows.
      if (!target || (*target != at::kHalf && *target != at::kBFloat16)) {
        throw Error(ErrorCode::kDType, "argument 'dtype' is " + (target ? "'" + DTypeName(*target) + "'" : std::string("missing")) +
                    "; a Uint16Array holds raw half-precision bits, so dtype must be 'float16' or 'bfloat16'",
                    {{"argument", "dtype"}, {"expected", "'float16' or 'bfloat16'"}});
      }
      source = target;
    }
    if (!source) {
      throw Error(ErrorCode::kDType, "argument 'data' is a typed array without a tensor dtype (Uint32Array/BigUint64Array); "
                  "expected Float32Array, Float64Array, BigInt64Array, Int32Array, Int16Array, Int8Array, Uint8Array or Uint16Array",
                  {{"argument", "data"}});
    }
    if (!target) target = source;
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    if (numel != static_cast<int64_t>(data.ElementLength())) {
      throw Error(ErrorCode::kShape,
                  "argument 'shape' is " + ShapeString(shape) + " (" + std::to_string(numel) + " elements) but 'data' has " +
                      std::to_string(data.ElementLength()) + " elements",
                  {{"argument", "shape"}, {"value", ShapeString(shape)}, {"expected", std::to_string(data.ElementLength()) + " elements"}});
    }
    c10::Device device(c10::kCPU);
    if (info[3].IsString()) device = RequireDevice(info[3].As<Napi::String>().Utf8Value(), "device");

    // The one copy in: JS memory → a tensor libtorch owns (JS may reuse its buffer at once).
    at::Tensor cpu = at::empty(shape, at::TensorOptions().dtype(*source));
    const auto* bytes = static_cast<const uint8_t*>(data.ArrayBuffer().Data()) + data.ByteOffset();
    if (numel > 0) std::memcpy(cpu.data_ptr(), bytes, data.ByteLength());
    if (*target != *source) cpu = cpu.to(*target);

    TensorMeta meta{shape, *target, device};
    if (device.is_cpu()) return NewInstance(env, std::make_shared<TensorBox>(std::move(cpu)), meta);

    // Other devices: the handle exists now, the upload runs on that device's executor, and any
    // later use of the handle waits for it there.
    auto transfer = std::make_shared<std::promise<at::Tensor>>();
    auto box = std::make_shared<TensorBox>(transfer->get_future().share());
    class UploadTask : public Task {
     public:
      UploadTask(at::Tensor source, c10::Device device, std::shared_ptr<std::promise<at::Tensor>> result)
          : source_(std::move(source)), device_(device), result_(std::move(result)) {}
      bool Step() override {
        try {
          c10::OptionalDeviceGuard guard(device_);
          result_->set_value(ToDevice(source_, device_));
          Stats::host_to_device_bytes += source_.nbytes();
        } catch (...) {
          result_->set_exception(std::current_exception());
        }
        source_ = at::Tensor();
        return true;
      }
      void Fail(std::exception_ptr error) noexcept override {
        try {
          result_->set_exception(error);
        } catch (...) {
        }
      }

     private:
      at::Tensor source_;
      c10::Device device_;
      std::shared_ptr<std::promise<at::Tensor>> result_;
    };
    Executor::For(device).Submit(std::make_shared<UploadTask>(std::move(cpu), device, transfer));
    return NewInstance(env, std::move(box), meta);
  });
}

Napi::Value NativeTensor::LiveCount(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(TensorBox::LiveCount()));
}

Napi::Value NativeTensor::GetShape(const Napi::CallbackInfo& info) {
  Napi::Array shape = Napi::Array::New(info.Env(), meta_.shape.size());
  for (size_t i = 0; i < meta_.shape.size(); ++i) shape.Set(static_cast<uint32_t>(i), static_cast<double>(meta_.shape[i]));
  return shape;
}

Napi::Value NativeTensor::GetDType(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), DTypeName(meta_.dtype)); }

Napi::Value NativeTensor::GetDevice(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), DeviceName(meta_.device)); }

Napi::Value NativeTensor::GetNBytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(meta_.NBytes()));
}

Napi::Value NativeTensor::GetDisposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), disposed()); }

Napi::Value NativeTensor::ToArray(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    RequireLive();
    napi_typedarray_type array_type = TypedArrayTypeFor(meta_.dtype);
    int64_t nbytes = meta_.NBytes();
    // The result buffer is made here, on the JS thread, and filled on the executor: a single
    // copy from the device (or from CPU memory) straight into JS memory.
    Napi::ArrayBuffer buffer = Napi::ArrayBuffer::New(env, static_cast<size_t>(nbytes));
    napi_ref buffer_ref = nullptr;
    napi_create_reference(env, buffer, 1, &buffer_ref);
    void* destination = buffer.Data();
    auto box = box_;
    TensorMeta meta = meta_;
    auto promise = RunAsync<bool>(
        env, meta.device,
        [box, meta, destination, nbytes]() {
          at::Tensor source = box->Get();
          if (nbytes > 0) {
            at::from_blob(destination, meta.shape, at::TensorOptions().dtype(meta.dtype)).copy_(source);
            if (!source.device().is_cpu()) Stats::device_to_host_bytes += nbytes;
          }
          return true;
        },
        [buffer_ref, array_type, meta](Napi::Env env, bool&) -> Napi::Value {
          napi_value value = nullptr;
          napi_get_reference_value(env, buffer_ref, &value);
          Napi::ArrayBuffer ab(env, value);
          size_t element_size = c10::elementSize(meta.dtype);
          size_t length = ab.ByteLength() / element_size;
          napi_value array = nullptr;
          napi_create_typedarray(env, array_type, length, ab, 0, &array);
          return Napi::Value(env, array);
        },
        nullptr, [buffer_ref](Napi::Env env) { napi_delete_reference(env, buffer_ref); });
    return promise;
  });
}

Napi::Value NativeTensor::To(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    RequireLive();
    c10::Device device = meta_.device;
    at::ScalarType dtype = meta_.dtype;
    if (info[0].IsString()) device = RequireDevice(info[0].As<Napi::String>().Utf8Value(), "device");
    if (info[1].IsString()) dtype = RequireDType(info[1].As<Napi::String>().Utf8Value(), "dtype");
    // Copies between host and a device run on the device's executor (its stream).
    c10::Device runner = !device.is_cpu() ? device : meta_.device;
    auto box = box_;
    return RunAsync<at::Tensor>(
        env, runner,
        [box, device, dtype]() {
          at::Tensor source = box->Get();
          at::Tensor result = source.to(device, dtype);
          if (!source.device().is_cpu() && device.is_cpu()) Stats::device_to_host_bytes += result.nbytes();
          if (source.device().is_cpu() && !device.is_cpu()) Stats::host_to_device_bytes += result.nbytes();
          return result;
        },
        [](Napi::Env env, at::Tensor& result) -> Napi::Value { return NewInstance(env, std::move(result)); });
  });
}

Napi::Value NativeTensor::Narrow(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    RequireLive();
    auto integer = [&](size_t i, const char* name) {
      double d = info[i].IsNumber() ? info[i].As<Napi::Number>().DoubleValue() : -1;
      if (d < 0 || d != static_cast<double>(static_cast<int64_t>(d))) throw InvalidArgument(name, info[i].ToString().Utf8Value(), "an integer >= 0");
      return static_cast<int64_t>(d);
    };
    const int64_t dim = integer(0, "dim"), start = integer(1, "start"), length = integer(2, "length");
    const int64_t rank = static_cast<int64_t>(meta_.shape.size());
    if (dim >= rank) throw InvalidArgument("dim", std::to_string(dim), "a dimension of this " + std::to_string(rank) + "-d tensor");
    if (start + length > meta_.shape[dim]) {
      throw InvalidArgument("length", std::to_string(length), "at most " + std::to_string(meta_.shape[dim] - start) +
                            " (dimension " + std::to_string(dim) + " has " + std::to_string(meta_.shape[dim]) + ", from " + std::to_string(start) + ")");
    }
    auto box = box_;
    // A view: no copy; it keeps the whole tensor alive.
    return RunAsync<at::Tensor>(
        env, meta_.device, [box, dim, start, length]() { return box->Get().narrow(dim, start, length); },
        [](Napi::Env env, at::Tensor& result) -> Napi::Value { return NewInstance(env, std::move(result)); });
  });
}

Napi::Value NativeTensor::Select(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    RequireLive();
    auto integer = [&](size_t i, const char* name) {
      double d = info[i].IsNumber() ? info[i].As<Napi::Number>().DoubleValue() : -1;
      if (d < 0 || d != static_cast<double>(static_cast<int64_t>(d))) throw InvalidArgument(name, info[i].ToString().Utf8Value(), "an integer >= 0");
      return static_cast<int64_t>(d);
    };
    const int64_t dim = integer(0, "dim"), index = integer(1, "index");
    const int64_t rank = static_cast<int64_t>(meta_.shape.size());
    if (dim >= rank) throw InvalidArgument("dim", std::to_string(dim), "a dimension of this " + std::to_string(rank) + "-d tensor");
    if (index >= meta_.shape[dim]) {
      throw InvalidArgument("index", std::to_string(index), "less than " + std::to_string(meta_.shape[dim]) + " (the size of dimension " + std::to_string(dim) + ")");
    }
    auto box = box_;
    return RunAsync<at::Tensor>(
        env, meta_.device, [box, dim, index]() { return box->Get().select(dim, index); },
        [](Napi::Env env, at::Tensor& result) -> Napi::Value { return NewInstance(env, std::move(result)); });
  });
}

Napi::Value NativeTensor::Dispose(const Napi::CallbackInfo& info) {
  Release();
  return info.Env().Undefined();
}

}  // namespace blip2
