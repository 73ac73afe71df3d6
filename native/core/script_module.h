// TorchScript modules: loaded onto a device by its executor, called by method name.
#pragma once

#include <napi.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "core/torch_includes.h"

namespace blip2 {

// Sets the `fused` attribute of every submodule that has one (the vision attention's choice of
// transformers' sdpa path over its eager one); a ModelLoadError naming `path` when `fused` is asked
// of a module without any.
void SetFusedAttention(torch::jit::Module& module, bool fused, const std::string& path);

struct LoadedModule {
  torch::jit::Module module;
  c10::Device device{c10::kCPU};
  std::string path;
  std::map<std::string, c10::FunctionSchema> methods;  // name → schema, without `self`

  // Executor thread. Errors name the file: missing, unreadable, or not a TorchScript archive.
  static std::shared_ptr<LoadedModule> Load(const std::string& path, const c10::Device& device);
  const c10::FunctionSchema& Schema(const std::string& method) const;  // kInvalidArgument if absent
};

// A JS argument converted on the JS thread against the method's schema; tensors stay boxes until
// the executor materialises the IValue (a tensor may still be uploading).
struct ScriptArg {
  enum class Kind { kNone, kBool, kInt, kDouble, kString, kTensor, kList, kTuple };
  Kind kind = Kind::kNone;
  bool b = false;
  int64_t i = 0;
  double d = 0;
  std::string s;
  std::shared_ptr<TensorBox> tensor;
  c10::TypePtr type;  // for lists: the list type, so an empty list keeps its element type
  std::vector<ScriptArg> items;

  static ScriptArg FromJs(Napi::Value value, const c10::TypePtr& type, const std::string& argument);
  c10::IValue ToIValue() const;  // executor thread
};

// IValue → JS (JS thread): tensors become new handles, tuples and lists arrays.
Napi::Value IValueToJs(Napi::Env env, const c10::IValue& value);

class NativeScriptModule : public Napi::ObjectWrap<NativeScriptModule> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit NativeScriptModule(const Napi::CallbackInfo& info);
  // A JS handle on a module loaded elsewhere (a model's image encoder or language model).
  static Napi::Object Wrap(Napi::Env env, std::shared_ptr<LoadedModule> loaded);

 private:
  static Napi::Value Load(const Napi::CallbackInfo& info);
  Napi::Value Call(const Napi::CallbackInfo& info);
  Napi::Value GetMethods(const Napi::CallbackInfo& info);
  Napi::Value GetDevice(const Napi::CallbackInfo& info);
  Napi::Value GetPath(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  const std::shared_ptr<LoadedModule>& Require() const;

  std::shared_ptr<LoadedModule> loaded_;
};

}  // namespace blip2
