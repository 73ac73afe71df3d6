#include "blip2/blip2_model.h"

#include "blip2/generation.h"
#include "core/addon_data.h"
#include "core/async.h"
#include "core/cancel_token.h"
#include "core/dtype.h"
#include "core/errors.h"
#include "core/tensor.h"

namespace blip2 {

namespace {

bool IsFloating(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble; }
bool IsIndex(at::ScalarType t) { return t == at::kLong || t == at::kInt; }

struct ModelInputs {
  std::shared_ptr<TensorBox> pixel_values, input_ids, attention_mask;
  int64_t batch = 0;
};

// Checks the model inputs against their metadata on the calling thread, so a wrong shape or dtype
// fails at once with an error naming the argument.
ModelInputs ValidateInputs(const ModelSpec& spec, Napi::Value pixel_arg, Napi::Value ids_arg, Napi::Value mask_arg) {
  ModelInputs inputs;
  NativeTensor* pixels = NativeTensor::FromValue(pixel_arg, "inputs.pixelValues");
  const TensorMeta& pm = pixels->meta();
  std::vector<int64_t> expected{-1, 3, spec.image_height, spec.image_width};
  bool shape_ok = pm.shape.size() == 4 && pm.shape[0] >= 1 && pm.shape[1] == 3 && pm.shape[2] == spec.image_height &&
                  pm.shape[3] == spec.image_width;
  if (!shape_ok) {
    std::string want = "[B, 3, " + std::to_string(spec.image_height) + ", " + std::to_string(spec.image_width) + "]";
    throw Error(ErrorCode::kShape, "argument 'inputs.pixelValues' has shape " + ShapeString(pm.shape) + "; expected " + want +
                                       " (the model's image size; Blip2Processor resizes to it)",
                {{"argument", "inputs.pixelValues"}, {"value", ShapeString(pm.shape)}, {"expected", want}});
  }
  if (!IsFloating(pm.dtype)) {
    throw Error(ErrorCode::kDType, "argument 'inputs.pixelValues' has dtype " + DTypeName(pm.dtype) + "; expected a float dtype",
                {{"argument", "inputs.pixelValues"}, {"value", DTypeName(pm.dtype)}, {"expected", "float32, float16 or bfloat16"}});
  }
  inputs.pixel_values = pixels->box();
  inputs.batch = pm.shape[0];
  const TensorMeta* ids_meta = nullptr;
  if (!ids_arg.IsUndefined() && !ids_arg.IsNull()) {
    NativeTensor* ids = NativeTensor::FromValue(ids_arg, "inputs.inputIds");
    ids_meta = &ids->meta();
    if (!IsIndex(ids_meta->dtype)) {
      throw Error(ErrorCode::kDType, "argument 'inputs.inputIds' has dtype " + DTypeName(ids_meta->dtype) + "; expected int64",
                  {{"argument", "inputs.inputIds"}, {"value", DTypeName(ids_meta->dtype)}, {"expected", "int64"}});
    }
    if (ids_meta->shape.size() != 2 || ids_meta->shape[1] < 1) {
      throw Error(ErrorCode::kShape, "argument 'inputs.inputIds' has shape " + ShapeString(ids_meta->shape) + "; expected [B, T] with T >= 1",
                  {{"argument", "inputs.inputIds"}, {"value", ShapeString(ids_meta->shape)}, {"expected", "[B, T]"}});
    }
    if (ids_meta->shape[0] != inputs.batch) {
      throw Error(ErrorCode::kShape,
                  "argument 'inputs.inputIds' has batch size " + std::to_string(ids_meta->shape[0]) + " but 'inputs.pixelValues' has " +
                      std::to_string(inputs.batch) + "; expected one row of ids per image",
                  {{"argument", "inputs.inputIds"}, {"value", std::to_string(ids_meta->shape[0])}, {"expected", std::to_string(inputs.batch)}});
    }
    inputs.input_ids = ids->box();
  }
  if (!mask_arg.IsUndefined() && !mask_arg.IsNull()) {
    NativeTensor* mask = NativeTensor::FromValue(mask_arg, "inputs.attentionMask");
    const TensorMeta& mm = mask->meta();
    if (ids_meta == nullptr) {
      throw InvalidArgument("inputs.attentionMask", "given without inputs.inputIds", "an attention mask only together with input ids");
    }
    if (mm.shape != ids_meta->shape) {
      throw Error(ErrorCode::kShape, "argument 'inputs.attentionMask' has shape " + ShapeString(mm.shape) + " but 'inputs.inputIds' has " +
                                         ShapeString(ids_meta->shape) + "; expected the same shape",
                  {{"argument", "inputs.attentionMask"}, {"value", ShapeString(mm.shape)}, {"expected", ShapeString(ids_meta->shape)}});
    }
    if (!IsIndex(mm.dtype) && mm.dtype != at::kBool && mm.dtype != at::kByte) {
      throw Error(ErrorCode::kDType, "argument 'inputs.attentionMask' has dtype " + DTypeName(mm.dtype) + "; expected int64",
                  {{"argument", "inputs.attentionMask"}, {"value", DTypeName(mm.dtype)}, {"expected", "int64, int32, uint8 or bool"}});
    }
    inputs.attention_mask = mask->box();
  }
  return inputs;
}

}  // namespace

Napi::Function NativeBlip2Model::Init(Napi::Env env) {
  return DefineClass(env, "NativeBlip2Model",
                     {StaticMethod<&NativeBlip2Model::Load>("load"),
                      InstanceMethod<&NativeBlip2Model::EncodeImages>("encodeImages"),
                      InstanceMethod<&NativeBlip2Model::Forward>("forward"),
                      InstanceMethod<&NativeBlip2Model::Generate>("generate"),
                      InstanceMethod<&NativeBlip2Model::Dispose>("dispose"),
                      InstanceAccessor<&NativeBlip2Model::GetDevice>("device"),
                      InstanceAccessor<&NativeBlip2Model::GetDType>("dtype"),
                      InstanceAccessor<&NativeBlip2Model::GetLinearKernels>("linearKernels")});
}

NativeBlip2Model::NativeBlip2Model(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeBlip2Model>(info) {
  if (info.Length() != 1 || !info[0].IsExternal()) {
    throw Napi::TypeError::New(info.Env(), "NativeBlip2Model cannot be constructed directly; use load()");
  }
  runtime_ = *info[0].As<Napi::External<std::shared_ptr<Blip2Runtime>>>().Data();
}

const std::shared_ptr<Blip2Runtime>& NativeBlip2Model::Require() const {
  if (!runtime_) throw Error(ErrorCode::kDisposed, "this model has been disposed; it can no longer be used");
  return runtime_;
}

Napi::Value NativeBlip2Model::Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    if (!info[0].IsObject()) throw InvalidArgument("spec", "not an object", "a model spec object");
    ModelSpec spec = ModelSpec::FromJs(info[0].As<Napi::Object>());
    auto cancel = NativeCancelToken::FromValue(info[1]);
    napi_ref ctor_ref = nullptr;
    napi_create_reference(env, info.This(), 1, &ctor_ref);
    return RunAsync<std::shared_ptr<Blip2Runtime>>(
        env, spec.device, [spec]() { return Blip2Runtime::Load(spec); },
        [ctor_ref](Napi::Env env, std::shared_ptr<Blip2Runtime>& runtime) -> Napi::Value {
          napi_value ctor = nullptr;
          napi_get_reference_value(env, ctor_ref, &ctor);
          return Napi::Function(env, ctor).New({Napi::External<std::shared_ptr<Blip2Runtime>>::New(env, &runtime)});
        },
        cancel, [ctor_ref](Napi::Env env) { napi_delete_reference(env, ctor_ref); });
  });
}

Napi::Value NativeBlip2Model::EncodeImages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    auto runtime = Require();
    ModelInputs inputs = ValidateInputs(runtime->spec(), info[0], env.Undefined(), env.Undefined());
    auto cancel = NativeCancelToken::FromValue(info[1]);
    auto pixels = inputs.pixel_values;
    return RunAsync<at::Tensor>(
        env, runtime->spec().device, [runtime, pixels]() { return runtime->EncodeImages(pixels->Get()); },
        [](Napi::Env env, at::Tensor& out) -> Napi::Value { return NativeTensor::NewInstance(env, out); }, cancel);
  });
}

Napi::Value NativeBlip2Model::Forward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    auto runtime = Require();
    ModelInputs inputs = ValidateInputs(runtime->spec(), info[0], info[1], info[2]);
    auto cancel = NativeCancelToken::FromValue(info[3]);
    return RunAsync<at::Tensor>(
        env, runtime->spec().device,
        [runtime, inputs]() {
          std::optional<at::Tensor> ids, mask;
          if (inputs.input_ids) ids = inputs.input_ids->Get();
          if (inputs.attention_mask) mask = inputs.attention_mask->Get();
          return runtime->Forward(inputs.pixel_values->Get(), ids, mask);
        },
        [](Napi::Env env, at::Tensor& logits) -> Napi::Value { return NativeTensor::NewInstance(env, logits); }, cancel);
  });
}

Napi::Value NativeBlip2Model::Generate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    auto runtime = Require();
    ModelInputs inputs = ValidateInputs(runtime->spec(), info[0], info[1], info[2]);
    if (!info[3].IsObject()) throw InvalidArgument("options", "not an object", "a generation options object");
    GenerationOptions options = GenerationOptions::FromJs(info[3].As<Napi::Object>(), runtime->spec().vocab_size);
    Napi::Function on_step;
    if (info[4].IsFunction()) on_step = info[4].As<Napi::Function>();
    auto cancel = NativeCancelToken::FromValue(info[5]);
    GenerationInputs generation_inputs{inputs.pixel_values, inputs.input_ids, inputs.attention_mask};
    auto task = std::make_shared<GenerationTask>(env, runtime, std::move(generation_inputs), std::move(options), on_step, cancel);
    Napi::Promise promise = task->promise();
    Executor::For(runtime->spec().device).Submit(std::move(task));
    return promise;
  });
}

Napi::Value NativeBlip2Model::Dispose(const Napi::CallbackInfo& info) {
  runtime_.reset();
  return info.Env().Undefined();
}

Napi::Value NativeBlip2Model::GetDevice(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), runtime_ ? DeviceName(runtime_->spec().device) : "");
}

Napi::Value NativeBlip2Model::GetDType(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), runtime_ ? DTypeName(runtime_->spec().dtype) : "");
}

Napi::Value NativeBlip2Model::GetLinearKernels(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array out = Napi::Array::New(env);
  if (!runtime_) return out;
  uint32_t i = 0;
  for (const LinearDecision& d : runtime_->linear_decisions()) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("outFeatures", static_cast<double>(d.out_features));
    o.Set("inFeatures", static_cast<double>(d.in_features));
    o.Set("dtype", DTypeName(d.dtype));
    o.Set("rows", static_cast<double>(d.rows));
    o.Set("plainMs", d.plain_ms);
    o.Set("kernelMs", d.kernel_ms);
    o.Set("useKernel", d.use_kernel);
    out.Set(i++, o);
  }
  return out;
}

}  // namespace blip2
