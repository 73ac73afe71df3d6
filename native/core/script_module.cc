#include "core/script_module.h"

#include <fstream>
#include <optional>
#include <sstream>

#include "blip2/model_spec.h"
#include "core/addon_data.h"
#include "core/js_channel.h"
#include "core/weights.h"
#include "core/async.h"
#include "core/cancel_token.h"
#include "core/dtype.h"
#include "core/errors.h"

namespace blip2 {

void SetFusedAttention(torch::jit::Module& module, bool fused, const std::string& path) {
  int count = 0;
  for (const auto& sub : module.named_modules()) {
    torch::jit::Module m = sub.value;
    if (m.hasattr("fused") && m.attr("fused").isBool()) {
      m.setattr("fused", fused);
      ++count;
    }
  }
  // Exports before the switch have eager attention only; asking them for sdpa is an error, not a
  // silent eager run.
  if (fused && count == 0) {
    throw Error(ErrorCode::kModelLoad,
                "model file '" + path + "' has no switchable vision attention (exported before attention: 'sdpa' existed); re-export the folder with `blip2 export`, or use attention: 'eager'",
                {{"file", path}});
  }
}

std::shared_ptr<LoadedModule> LoadedModule::Load(const std::string& path, const c10::Device& device) {
  {
    std::ifstream probe(path, std::ios::binary);
    if (!probe) {
      throw Error(ErrorCode::kModelLoad, "cannot open model file '" + path + "' (missing or unreadable)", {{"file", path}});
    }
  }
  auto loaded = std::make_shared<LoadedModule>();
  try {
    loaded->module = torch::jit::load(path, device);
  } catch (const c10::Error& e) {
    throw Error(ErrorCode::kModelLoad,
                "model file '" + path + "' is damaged or not a TorchScript archive: " + e.what_without_backtrace(),
                {{"file", path}});
  } catch (const std::exception& e) {
    throw Error(ErrorCode::kModelLoad, "model file '" + path + "' could not be loaded: " + e.what(), {{"file", path}});
  }
  loaded->module.eval();
  loaded->device = device;
  loaded->path = path;
  for (const auto& method : loaded->module.get_methods()) {
    const c10::FunctionSchema& schema = method.function().getSchema();
    // Drop `self`: callers never pass it.
    std::vector<c10::Argument> arguments(schema.arguments().begin() + 1, schema.arguments().end());
    loaded->methods.emplace(method.name(), schema.cloneWithArguments(std::move(arguments)));
  }
  return loaded;
}

const c10::FunctionSchema& LoadedModule::Schema(const std::string& method) const {
  auto it = methods.find(method);
  if (it == methods.end()) {
    std::string names;
    for (const auto& [name, schema] : methods) names += (names.empty() ? "" : ", ") + name;
    throw InvalidArgument("method", "'" + method + "'", "one of the module's methods: " + names);
  }
  return it->second;
}

static std::string Describe(Napi::Value value) {
  if (value.IsUndefined()) return "undefined";
  if (value.IsNull()) return "null";
  if (value.IsString()) return "the string '" + value.As<Napi::String>().Utf8Value() + "'";
  if (value.IsNumber() || value.IsBoolean()) return value.ToString().Utf8Value();
  if (value.IsArray()) return "an array";
  return "an object";
}

ScriptArg ScriptArg::FromJs(Napi::Value value, const c10::TypePtr& type, const std::string& argument) {
  ScriptArg arg;
  const std::string expected = type->annotation_str();
  auto mismatch = [&]() { return InvalidArgument(argument, Describe(value), "a value of type " + expected); };
  switch (type->kind()) {
    case c10::TypeKind::OptionalType:
      if (value.IsUndefined() || value.IsNull()) return arg;
      return FromJs(value, type->expectRef<c10::OptionalType>().getElementType(), argument);
    case c10::TypeKind::NoneType:
      if (!value.IsUndefined() && !value.IsNull()) throw mismatch();
      return arg;
    case c10::TypeKind::TensorType:
      arg.kind = Kind::kTensor;
      arg.tensor = NativeTensor::FromValue(value, argument)->box();
      return arg;
    case c10::TypeKind::IntType: {
      if (!value.IsNumber()) throw mismatch();
      double d = value.As<Napi::Number>().DoubleValue();
      if (d != static_cast<double>(static_cast<int64_t>(d))) throw InvalidArgument(argument, Describe(value), "an integer");
      arg.kind = Kind::kInt;
      arg.i = static_cast<int64_t>(d);
      return arg;
    }
    case c10::TypeKind::FloatType:
    case c10::TypeKind::NumberType:
      if (!value.IsNumber()) throw mismatch();
      arg.kind = Kind::kDouble;
      arg.d = value.As<Napi::Number>().DoubleValue();
      return arg;
    case c10::TypeKind::BoolType:
      if (!value.IsBoolean()) throw mismatch();
      arg.kind = Kind::kBool;
      arg.b = value.As<Napi::Boolean>().Value();
      return arg;
    case c10::TypeKind::StringType:
      if (!value.IsString()) throw mismatch();
      arg.kind = Kind::kString;
      arg.s = value.As<Napi::String>().Utf8Value();
      return arg;
    case c10::TypeKind::ListType: {
      if (!value.IsArray()) throw mismatch();
      Napi::Array array = value.As<Napi::Array>();
      const c10::TypePtr& element = type->expectRef<c10::ListType>().getElementType();
      arg.kind = Kind::kList;
      arg.type = type;
      for (uint32_t i = 0; i < array.Length(); ++i) {
        arg.items.push_back(FromJs(array.Get(i), element, argument + "[" + std::to_string(i) + "]"));
      }
      return arg;
    }
    case c10::TypeKind::TupleType: {
      if (!value.IsArray()) throw mismatch();
      Napi::Array array = value.As<Napi::Array>();
      const auto& elements = type->expectRef<c10::TupleType>().elements();
      if (array.Length() != elements.size()) throw mismatch();
      arg.kind = Kind::kTuple;
      for (uint32_t i = 0; i < array.Length(); ++i) {
        arg.items.push_back(FromJs(array.Get(i), elements[i], argument + "[" + std::to_string(i) + "]"));
      }
      return arg;
    }
    default:
      throw InvalidArgument(argument, Describe(value), "a type JS can pass (" + expected + " is not supported)");
  }
}

c10::IValue ScriptArg::ToIValue() const {
  switch (kind) {
    case Kind::kNone: return c10::IValue();
    case Kind::kBool: return c10::IValue(b);
    case Kind::kInt: return c10::IValue(i);
    case Kind::kDouble: return c10::IValue(d);
    case Kind::kString: return c10::IValue(s);
    case Kind::kTensor: return c10::IValue(tensor->Get());
    case Kind::kList: {
      c10::impl::GenericList list(type->expectRef<c10::ListType>().getElementType());
      for (const auto& item : items) list.push_back(item.ToIValue());
      return c10::IValue(list);
    }
    case Kind::kTuple: {
      std::vector<c10::IValue> elements;
      for (const auto& item : items) elements.push_back(item.ToIValue());
      return c10::ivalue::Tuple::create(std::move(elements));
    }
  }
  return c10::IValue();
}

Napi::Value IValueToJs(Napi::Env env, const c10::IValue& value) {
  if (value.isTensor()) return NativeTensor::NewInstance(env, value.toTensor());
  if (value.isNone()) return env.Null();
  if (value.isBool()) return Napi::Boolean::New(env, value.toBool());
  if (value.isInt()) return Napi::Number::New(env, static_cast<double>(value.toInt()));
  if (value.isDouble()) return Napi::Number::New(env, value.toDouble());
  if (value.isString()) return Napi::String::New(env, value.toStringRef());
  if (value.isTuple() || value.isList()) {
    std::vector<c10::IValue> items = value.isTuple() ? value.toTupleRef().elements().vec() : value.toListRef().vec();
    Napi::Array array = Napi::Array::New(env, items.size());
    for (size_t i = 0; i < items.size(); ++i) array.Set(static_cast<uint32_t>(i), IValueToJs(env, items[i]));
    return array;
  }
  throw Error(ErrorCode::kInvalidArgument, "the method returned a " + value.tagKind() + ", which JS cannot receive");
}

Napi::Function NativeScriptModule::Init(Napi::Env env) {
  Napi::Function ctor = DefineClass(env, "NativeScriptModule",
                                    {StaticMethod<&NativeScriptModule::Load>("load"),
                                     InstanceMethod<&NativeScriptModule::Call>("call"),
                                     InstanceMethod<&NativeScriptModule::Dispose>("dispose"),
                                     InstanceAccessor<&NativeScriptModule::GetMethods>("methods"),
                                     InstanceAccessor<&NativeScriptModule::GetDevice>("device"),
                                     InstanceAccessor<&NativeScriptModule::GetPath>("path")});
  AddonData::Get(env)->module_constructor = Napi::Persistent(ctor);
  return ctor;
}

NativeScriptModule::NativeScriptModule(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeScriptModule>(info) {
  if (info.Length() != 1 || !info[0].IsExternal()) {
    throw Napi::TypeError::New(info.Env(), "NativeScriptModule cannot be constructed directly; use load()");
  }
  loaded_ = *info[0].As<Napi::External<std::shared_ptr<LoadedModule>>>().Data();
}

const std::shared_ptr<LoadedModule>& NativeScriptModule::Require() const {
  if (!loaded_) throw Error(ErrorCode::kDisposed, "this ScriptModule has been disposed; it can no longer be used");
  return loaded_;
}

Napi::Value NativeScriptModule::Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    if (!info[0].IsString()) throw InvalidArgument("path", Describe(info[0]), "a file path string");
    std::string path = info[0].As<Napi::String>().Utf8Value();
    c10::Device device(c10::kCPU);
    if (info[1].IsString()) device = RequireDevice(info[1].As<Napi::String>().Utf8Value(), "device");
    // Optional: a weight-free module of a model folder and the weights to bind into it.
    std::optional<ModelSpec::Module> bind;
    std::vector<std::pair<std::string, int64_t>> files;
    std::vector<WeightRef> refs;
    at::ScalarType dtype = at::kFloat;
    bool fused = false;
    napi_ref progress_ref = nullptr;
    if (info[3].IsFunction()) napi_create_reference(env, info[3], 1, &progress_ref);
    std::shared_ptr<JsChannel> channel = AddonData::Get(env)->channel;
    if (info[2].IsObject()) {
      Napi::Object b = info[2].As<Napi::Object>();
      dtype = RequireDType(b.Get("dtype").ToString().Utf8Value(), "dtype");
      ModelSpec parsed = ModelSpec::WeightsFromJs(b, path);
      files = std::move(parsed.weight_files);
      refs = std::move(parsed.weights);
      bind = std::move(parsed.image_encoder);
      fused = b.Get("fusedAttention").ToBoolean().Value();
    }
    return RunAsync<std::shared_ptr<LoadedModule>>(
        env, device,
        [path, device, bind, files, refs, dtype, fused, progress_ref, channel]() {
          auto loaded = LoadedModule::Load(path, device);
          if (bind) {
            WeightStore store(files, refs);
            if (progress_ref != nullptr) {
              auto done = std::make_shared<int64_t>(0);
              store.OnTensor([=](int64_t bytes) {
                *done += bytes;
                int64_t now = *done;
                channel->Post([progress_ref, now](Napi::Env env) {
                  napi_value fn = nullptr;
                  if (napi_get_reference_value(env, progress_ref, &fn) != napi_ok || fn == nullptr) return;
                  try {
                    Napi::Function(env, fn).Call({Napi::Number::New(env, static_cast<double>(now))});
                  } catch (const Napi::Error&) {
                  }
                });
              });
            }
            store.Bind(loaded->module, path, bind->bindings, device, dtype);
            SetFusedAttention(loaded->module, fused, path);
          }
          return loaded;
        },
        [](Napi::Env env, std::shared_ptr<LoadedModule>& loaded) -> Napi::Value { return NativeScriptModule::Wrap(env, loaded); },
        nullptr, [progress_ref](Napi::Env env) {
          if (progress_ref != nullptr) napi_delete_reference(env, progress_ref);
        });
  });
}

Napi::Object NativeScriptModule::Wrap(Napi::Env env, std::shared_ptr<LoadedModule> loaded) {
  return AddonData::Get(env)->module_constructor.New({Napi::External<std::shared_ptr<LoadedModule>>::New(env, &loaded)});
}

Napi::Value NativeScriptModule::Call(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    auto loaded = Require();
    if (!info[0].IsString()) throw InvalidArgument("method", Describe(info[0]), "a method name string");
    std::string method = info[0].As<Napi::String>().Utf8Value();
    const c10::FunctionSchema& schema = loaded->Schema(method);
    Napi::Array args = info[1].IsArray() ? info[1].As<Napi::Array>() : Napi::Array::New(env);
    const auto& formals = schema.arguments();
    if (args.Length() > formals.size()) {
      throw InvalidArgument("args", std::to_string(args.Length()) + " arguments",
                            "at most " + std::to_string(formals.size()) + " for " + c10::toString(schema));
    }
    std::vector<ScriptArg> converted;
    for (size_t i = 0; i < formals.size(); ++i) {
      const c10::Argument& formal = formals[i];
      if (i >= args.Length()) {
        if (formal.default_value()) break;  // trailing defaults are filled in by the method
        throw InvalidArgument(formal.name(), "missing", "a value of type " + formal.type()->annotation_str());
      }
      converted.push_back(ScriptArg::FromJs(args.Get(static_cast<uint32_t>(i)), formal.type(), formal.name()));
    }
    auto cancel = NativeCancelToken::FromValue(info[2]);
    return RunAsync<c10::IValue>(
        env, loaded->device,
        [loaded, method, converted]() {
          std::vector<c10::IValue> stack;
          stack.reserve(converted.size());
          for (const auto& arg : converted) stack.push_back(arg.ToIValue());
          return loaded->module.get_method(method)(std::move(stack));
        },
        [](Napi::Env env, c10::IValue& result) { return IValueToJs(env, result); }, cancel);
  });
}

Napi::Value NativeScriptModule::GetMethods(const Napi::CallbackInfo& info) {
  Napi::Object methods = Napi::Object::New(info.Env());
  if (loaded_) {
    for (const auto& [name, schema] : loaded_->methods) {
      std::ostringstream text;
      text << schema;
      methods.Set(name, text.str());
    }
  }
  return methods;
}

Napi::Value NativeScriptModule::GetDevice(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), loaded_ ? DeviceName(loaded_->device) : "");
}

Napi::Value NativeScriptModule::GetPath(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), loaded_ ? loaded_->path : "");
}

Napi::Value NativeScriptModule::Dispose(const Napi::CallbackInfo& info) {
  loaded_.reset();
  return info.Env().Undefined();
}

}  // namespace blip2
