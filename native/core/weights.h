// The weights of a model folder: safetensors files memory-mapped once, and bound into weight-free
// TorchScript modules by parameter path (export/blip2_export/torchscript.py writes both halves).
// On the CPU a tensor whose stored dtype is the one it runs in is a view of the mapping (no copy,
// no load time: pages come in from the page cache on first use); anything else is converted once.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/torch_includes.h"

namespace blip2 {

// One tensor of a safetensors file, as lib read it from the file's header.
struct WeightRef {
  std::string key;
  int file = 0;            // index into the store's files
  int64_t offset = 0;      // from the start of the file
  int64_t nbytes = 0;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
  bool keep_float32 = false;  // stays float32 when the model runs in float16 (as transformers 5)
};

// A module parameter (dotted path inside the module) and the tensor it is bound to.
struct WeightBinding {
  std::string parameter;
  int ref = 0;  // index into the store's refs
};

class MappedFile;

class WeightStore {
 public:
  // Maps every file (read-only data, private copy-on-write pages, so nothing can ever write to the
  // files); checks each size and that every tensor lies inside its file.
  WeightStore(std::vector<std::pair<std::string, int64_t>> files, std::vector<WeightRef> refs);
  ~WeightStore();

  const std::vector<WeightRef>& refs() const { return refs_; }
  // The tensor of refs()[index] on `device` in the dtype the model runs in (`dtype` for floating
  // tensors, float32 for keep_float32 ones in a float16 model). Converted tensors are made once and shared (tied weights).
  at::Tensor Get(int index, const c10::Device& device, at::ScalarType dtype);
  // Sets every binding's parameter of `module` (`file` names the module in errors) and checks that
  // no parameter is left without a weight.
  void Bind(torch::jit::Module& module, const std::string& file, const std::vector<WeightBinding>& bindings,
            const c10::Device& device, at::ScalarType dtype);
  // Called with the bytes of each tensor as it is made (load progress).
  void OnTensor(std::function<void(int64_t)> callback) { on_tensor_ = std::move(callback); }
  // Bytes of weights that are views of the mapped files (not copied).
  int64_t mapped_bytes() const { return mapped_bytes_; }

 private:
  std::vector<std::shared_ptr<MappedFile>> files_;
  std::vector<WeightRef> refs_;
  std::unordered_map<int, at::Tensor> made_;
  int64_t mapped_bytes_ = 0;
  std::function<void(int64_t)> on_tensor_;
};

}  // namespace blip2
