#include "blip2/blip2_model.h"

#include "core/addon_data.h"
#include "core/async.h"
#include "core/cancel_token.h"
#include "core/dtype.h"
#include "core/errors.h"
#include "core/script_module.h"
#include "core/tensor.h"

namespace blip2 {

namespace {

struct Loaded {
  std::shared_ptr<Blip2Runtime> runtime;
  std::shared_ptr<Scheduler> scheduler;
};

int64_t OptionInt(Napi::Object object, const char* key, int64_t fallback, int64_t min) {
  Napi::Value v = object.Get(key);
  if (v.IsUndefined()) return fallback;
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (d < static_cast<double>(min) || d != static_cast<double>(static_cast<int64_t>(d))) {
    throw InvalidArgument(std::string("scheduler.") + key, v.ToString().Utf8Value(), "an integer >= " + std::to_string(min));
  }
  return static_cast<int64_t>(d);
}

// A number option in (above, at_most]; lib/ has checked it with the same range and message.
double OptionNumber(Napi::Object object, const char* key, double fallback, double above, double at_most, const char* expected) {
  Napi::Value v = object.Get(key);
  if (v.IsUndefined()) return fallback;
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : above;
  if (!(d > above && d <= at_most)) throw InvalidArgument(std::string("scheduler.") + key, v.ToString().Utf8Value(), expected);
  return d;
}

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
                      InstanceAccessor<&NativeBlip2Model::GetLinearKernels>("linearKernels"),
                      InstanceAccessor<&NativeBlip2Model::GetAttentionKernels>("attentionKernels"),
                      InstanceMethod<&NativeBlip2Model::GetStats>("stats"),
                      InstanceMethod<&NativeBlip2Model::Modules>("modules")});
}

NativeBlip2Model::NativeBlip2Model(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeBlip2Model>(info) {
  if (info.Length() != 1 || !info[0].IsExternal()) {
    throw Napi::TypeError::New(info.Env(), "NativeBlip2Model cannot be constructed directly; use load()");
  }
  const Loaded& loaded = *info[0].As<Napi::External<Loaded>>().Data();
  runtime_ = loaded.runtime;
  scheduler_ = loaded.scheduler;
  device_ = DeviceName(runtime_->spec().device);
  dtype_ = DTypeName(runtime_->spec().dtype);
  linear_decisions_ = runtime_->linear_decisions();
  attention_decisions_ = runtime_->attention_decisions();
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
    if (!info[1].IsObject()) throw InvalidArgument("scheduler", "not an object", "scheduler options");
    Napi::Object s = info[1].As<Napi::Object>();
    SchedulerOptions options;
    options.slots = OptionInt(s, "slots", options.slots, 1);
    options.max_length = OptionInt(s, "maxLength", std::min(options.max_length, spec.max_length), 2);
    options.max_queue = OptionInt(s, "maxQueue", options.max_queue, 0);
    options.prefill_chunk = OptionInt(s, "prefillChunk", 0, 1);  // 0: the Scheduler picks (device, export)
    options.encode_batch = OptionInt(s, "encodeBatch", 0, 1);
    options.encode_layers = OptionInt(s, "encodeLayersPerStep", 0, 1);  // 0: from measured costs (CPU)
    options.stall_budget = OptionNumber(s, "stallBudget", options.stall_budget, 0, 64, "a number of decode steps above 0, at most 64");
    options.batch_wait_us = static_cast<int64_t>(OptionInt(s, "batchWaitUs", options.batch_wait_us, 0));
    if (options.max_length > spec.max_length) {
      throw InvalidArgument("maxLength", std::to_string(options.max_length), "at most the model's " + std::to_string(spec.max_length) + " positions");
    }
    auto cancel = NativeCancelToken::FromValue(info[2]);
    // onProgress(boundBytes): posted as weights are bound, at most every 1% of them.
    napi_ref progress_ref = nullptr;
    if (info[3].IsFunction()) napi_create_reference(env, info[3], 1, &progress_ref);
    std::shared_ptr<JsChannel> channel = AddonData::Get(env)->channel;
    int64_t total = 0;
    for (const WeightRef& w : spec.weights) total += w.nbytes;
    napi_ref ctor_ref = nullptr;
    napi_create_reference(env, info.This(), 1, &ctor_ref);
    return RunAsync<Loaded>(
        env, spec.device,
        [spec, options, progress_ref, channel, total]() {
          Loaded loaded;
          std::function<void(int64_t)> on_weights;
          if (progress_ref != nullptr) {
            auto done = std::make_shared<int64_t>(0);
            auto reported = std::make_shared<int64_t>(0);
            on_weights = [=](int64_t bytes) {
              *done += bytes;
              if (*done - *reported < total / 100 && *done < total) return;
              *reported = *done;
              int64_t now = *done;
              channel->Post([progress_ref, now](Napi::Env env) {
                napi_value fn = nullptr;
                if (napi_get_reference_value(env, progress_ref, &fn) != napi_ok || fn == nullptr) return;
                try {
                  Napi::Function(env, fn).Call({Napi::Number::New(env, static_cast<double>(now))});
                } catch (const Napi::Error&) {
                }
              });
            };
          }
          loaded.runtime = Blip2Runtime::Load(spec, on_weights);
          loaded.scheduler = std::make_shared<Scheduler>(loaded.runtime, options);  // allocates the KV cache
          return loaded;
        },
        [ctor_ref](Napi::Env env, Loaded& loaded) -> Napi::Value {
          napi_value ctor = nullptr;
          napi_get_reference_value(env, ctor_ref, &ctor);
          return Napi::Function(env, ctor).New({Napi::External<Loaded>::New(env, &loaded)});
        },
        cancel, [ctor_ref, progress_ref](Napi::Env env) {
          napi_delete_reference(env, ctor_ref);
          if (progress_ref != nullptr) napi_delete_reference(env, progress_ref);
        });
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
    std::shared_ptr<TensorBox> decoder_ids;
    if (!info[3].IsUndefined() && !info[3].IsNull()) {
      NativeTensor* d = NativeTensor::FromValue(info[3], "inputs.decoderInputIds");
      const TensorMeta& dm = d->meta();
      if (!IsIndex(dm.dtype)) {
        throw Error(ErrorCode::kDType, "argument 'inputs.decoderInputIds' has dtype " + DTypeName(dm.dtype) + "; expected int64",
                    {{"argument", "inputs.decoderInputIds"}, {"value", DTypeName(dm.dtype)}, {"expected", "int64"}});
      }
      if (dm.shape.size() != 2 || dm.shape[0] != inputs.batch || dm.shape[1] < 1) {
        throw Error(ErrorCode::kShape, "argument 'inputs.decoderInputIds' has shape " + ShapeString(dm.shape) + "; expected [" +
                    std::to_string(inputs.batch) + ", Td] with Td >= 1",
                    {{"argument", "inputs.decoderInputIds"}, {"value", ShapeString(dm.shape)}, {"expected", "[B, Td]"}});
      }
      decoder_ids = d->box();
    }
    auto cancel = NativeCancelToken::FromValue(info[4]);
    return RunAsync<at::Tensor>(
        env, runtime->spec().device,
        [runtime, inputs, decoder_ids]() {
          std::optional<at::Tensor> ids, mask, decoder;
          if (inputs.input_ids) ids = inputs.input_ids->Get();
          if (inputs.attention_mask) mask = inputs.attention_mask->Get();
          if (decoder_ids) decoder = decoder_ids->Get();
          return runtime->Forward(inputs.pixel_values->Get(), ids, mask, decoder);
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
    bool stop_on_abort = info[6].ToBoolean().Value();
    GenerationInputs generation_inputs{inputs.pixel_values, inputs.input_ids, inputs.attention_mask};
    return scheduler_->Submit(env, std::move(generation_inputs), inputs.batch, std::move(options), on_step, cancel, stop_on_abort);
  });
}

Napi::Value NativeBlip2Model::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  runtime_.reset();
  if (!scheduler_) {
    auto done = Napi::Promise::Deferred::New(env);
    done.Resolve(env.Undefined());
    return done.Promise();
  }
  Napi::Promise freed = scheduler_->Dispose(env);
  scheduler_.reset();
  return freed;
}

Napi::Value NativeBlip2Model::GetDevice(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), device_); }

Napi::Value NativeBlip2Model::GetDType(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), dtype_); }

Napi::Value NativeBlip2Model::Modules(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    auto runtime = Require();
    Napi::Object o = Napi::Object::New(env);
    o.Set("imageEncoder", NativeScriptModule::Wrap(env, runtime->image_encoder()));
    o.Set("languageModel", NativeScriptModule::Wrap(env, runtime->language_model()));
    return o;
  });
}

Napi::Value NativeBlip2Model::GetStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  SchedulerStats s = scheduler_ ? scheduler_->Stats() : SchedulerStats();
  o.Set("disposed", scheduler_ == nullptr);
  o.Set("queued", static_cast<double>(s.queued));
  o.Set("runningCalls", static_cast<double>(s.running_calls));
  o.Set("runningSequences", static_cast<double>(s.running_sequences));
  o.Set("prefillingRows", static_cast<double>(s.prefilling_rows));
  o.Set("slotsInUse", static_cast<double>(s.slots_in_use));
  o.Set("slots", static_cast<double>(s.slots));
  o.Set("maxLength", static_cast<double>(s.max_length));
  o.Set("kvCacheBytes", static_cast<double>(s.kv_cache_bytes));
  o.Set("completedCalls", static_cast<double>(s.completed));
  o.Set("failedCalls", static_cast<double>(s.failed));
  o.Set("decodeSteps", static_cast<double>(s.decode_steps));
  o.Set("generatedTokens", static_cast<double>(s.generated_tokens));
  o.Set("prefillTokens", static_cast<double>(s.prefill_tokens));
  o.Set("prefillPaddingTokens", static_cast<double>(s.prefill_padding_tokens));
  o.Set("stepPrefillTokens", static_cast<double>(s.step_prefill_tokens));
  o.Set("tokensPerSecond", s.tokens_per_second);
  o.Set("lastStepMs", s.last_step_ms);
  o.Set("largestStepRows", static_cast<double>(s.largest_step_rows));
  o.Set("imageEncodes", static_cast<double>(s.image_encodes));
  o.Set("encodedImages", static_cast<double>(s.encoded_images));
  o.Set("encodingImages", static_cast<double>(s.encoding_images));
  o.Set("stagedEncodeCycles", static_cast<double>(s.staged_encode_cycles));
  o.Set("stepPrefillBudget", static_cast<double>(s.step_prefill_budget));
  return o;
}

Napi::Value NativeBlip2Model::GetLinearKernels(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array out = Napi::Array::New(env);
  uint32_t i = 0;
  for (const LinearDecision& d : linear_decisions_) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("outFeatures", static_cast<double>(d.out_features));
    o.Set("inFeatures", static_cast<double>(d.in_features));
    o.Set("dtype", DTypeName(d.dtype));
    o.Set("rows", static_cast<double>(d.rows));
    o.Set("plainMs", d.plain_ms);
    o.Set("kernelMs", d.kernel_ms);
    o.Set("onednnMs", d.onednn_ms);
    o.Set("path", LinearPathName(CurrentLinearPath(d)));
    out.Set(i++, o);
  }
  return out;
}

Napi::Value NativeBlip2Model::GetAttentionKernels(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array out = Napi::Array::New(env);
  uint32_t i = 0;
  for (const AttentionDecision& d : attention_decisions_) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("product", AttentionProductName(d.product));
    o.Set("dtype", DTypeName(d.dtype));
    o.Set("headDim", static_cast<double>(d.head_dim));
    Napi::Object plain = Napi::Object::New(env), kernel = Napi::Object::New(env);
    plain.Set("1", d.plain_ms_1);
    plain.Set("16", d.plain_ms_16);
    kernel.Set("1", d.kernel_ms_1);
    kernel.Set("16", d.kernel_ms_16);
    o.Set("plainMs", plain);
    o.Set("kernelMs", kernel);
    o.Set("path", d.kernel ? "kernel" : "plain");
    out.Set(i++, o);
  }
  return out;
}

}  // namespace blip2
