#include "core/weights.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/dtype.h"
#include "core/errors.h"
#include "core/tensor.h"

namespace blip2 {

class MappedFile {
 public:
  MappedFile(std::string path, int64_t expected_bytes) : path_(std::move(path)) {
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) Fail("cannot be opened (" + std::string(std::strerror(errno)) + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      Fail("cannot be read (" + std::string(std::strerror(errno)) + ")");
    }
    size_ = static_cast<int64_t>(st.st_size);
    if (size_ != expected_bytes) {
      ::close(fd);
      Fail("has " + std::to_string(size_) + " bytes, the manifest says " + std::to_string(expected_bytes) + " (truncated or replaced)");
    }
    if (size_ > 0) {
      // PROT_WRITE with MAP_PRIVATE: an in-place write to a weight would get a private page
      // instead of a crash; the file itself is never written.
      void* base = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
      if (base == MAP_FAILED) {
        int err = errno;
        ::close(fd);
        if (err == ENOMEM) throw Error(ErrorCode::kOutOfMemory, "cannot map weights file '" + path_ + "': out of address space");
        Fail("cannot be mapped (" + std::string(std::strerror(err)) + ")");
      }
      base_ = static_cast<uint8_t*>(base);
      ::madvise(base_, static_cast<size_t>(size_), MADV_WILLNEED);  // start reading ahead now
    }
    ::close(fd);
  }
  ~MappedFile() {
    if (base_ != nullptr) ::munmap(base_, static_cast<size_t>(size_));
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  int64_t size() const { return size_; }
  uint8_t* at(int64_t offset) const { return base_ + offset; }

 private:
  [[noreturn]] void Fail(const std::string& why) const {
    throw Error(ErrorCode::kModelLoad, "weights file '" + path_ + "' " + why, {{"file", path_}});
  }
  std::string path_;
  uint8_t* base_ = nullptr;
  int64_t size_ = 0;
};

WeightStore::WeightStore(std::vector<std::pair<std::string, int64_t>> files, std::vector<WeightRef> refs)
    : refs_(std::move(refs)) {
  for (auto& [path, bytes] : files) files_.push_back(std::make_shared<MappedFile>(path, bytes));
  for (const WeightRef& r : refs_) {
    auto bad = [&](const std::string& why) {
      const std::string path = r.file >= 0 && r.file < static_cast<int>(files_.size()) ? files_[r.file]->path() : "?";
      return Error(ErrorCode::kModelLoad, "weights file '" + path + "' is damaged: tensor '" + r.key + "' " + why,
                   {{"file", path}});
    };
    if (r.file < 0 || r.file >= static_cast<int>(files_.size())) throw bad("names no weights file");
    int64_t numel = 1;
    for (int64_t d : r.shape) {
      if (d < 0) throw bad("has a negative dimension");
      numel *= d;
    }
    if (numel * static_cast<int64_t>(c10::elementSize(r.dtype)) != r.nbytes) {
      throw bad("has " + std::to_string(r.nbytes) + " bytes for shape " + ShapeString(r.shape) + " of " + DTypeName(r.dtype));
    }
    if (r.offset < 0 || r.offset + r.nbytes > files_[r.file]->size()) throw bad("lies outside the file");
  }
}

WeightStore::~WeightStore() = default;

at::Tensor WeightStore::Get(int index, const c10::Device& device, at::ScalarType dtype) {
  auto made = made_.find(index);
  if (made != made_.end()) return made->second;
  const WeightRef& r = refs_.at(index);
  const std::shared_ptr<MappedFile>& file = files_[r.file];
  at::ScalarType want = r.dtype;
  if (at::isFloatingType(r.dtype)) {
    want = r.keep_float32 && dtype == at::kHalf ? at::kFloat : dtype;
  }
  void* data = file->at(r.offset);
  bool aligned = reinterpret_cast<uintptr_t>(data) % c10::elementSize(r.dtype) == 0;
  std::shared_ptr<MappedFile> keep = file;
  at::Tensor view = r.nbytes == 0 || !aligned
                        ? at::empty(r.shape, at::TensorOptions().dtype(r.dtype))
                        : at::from_blob(data, r.shape, [keep](void*) {}, at::TensorOptions().dtype(r.dtype));
  if (!aligned && r.nbytes > 0) std::memcpy(view.data_ptr(), data, static_cast<size_t>(r.nbytes));
  at::Tensor out;
  if (device.is_cpu() && want == r.dtype) {
    out = view;  // a view of the mapping: the deleter keeps the file mapped while it is used
    if (aligned) mapped_bytes_ += r.nbytes;
  } else {
    out = view.to(device, want, /*non_blocking=*/false, /*copy=*/true);
  }
  made_.emplace(index, out);
  if (on_tensor_) on_tensor_(r.nbytes);
  return out;
}

void WeightStore::Bind(torch::jit::Module& module, const std::string& file, const std::vector<WeightBinding>& bindings,
                       const c10::Device& device, at::ScalarType dtype) {
  std::unordered_map<std::string, bool> bound;
  for (const WeightBinding& b : bindings) {
    if (b.ref < 0 || b.ref >= static_cast<int>(refs_.size())) {
      throw Error(ErrorCode::kModelLoad, "model file '" + file + "': parameter '" + b.parameter + "' names no weight", {{"file", file}});
    }
    // Walk to the owning submodule: "model.decoder.layers.0.fc1.weight" → layers.0.fc1, "weight".
    torch::jit::Module owner = module;
    std::string path = b.parameter;
    size_t dot;
    while ((dot = path.find('.')) != std::string::npos) {
      std::string part = path.substr(0, dot);
      if (!owner.hasattr(part) || !owner.attr(part).isModule()) {
        throw Error(ErrorCode::kModelLoad, "model file '" + file + "' has no submodule '" + part + "' for parameter '" +
                    b.parameter + "' (manifest and module do not belong together)", {{"file", file}});
      }
      owner = owner.attr(part).toModule();
      path = path.substr(dot + 1);
    }
    if (!owner.hasattr(path)) {
      throw Error(ErrorCode::kModelLoad, "model file '" + file + "' has no parameter '" + b.parameter + "'", {{"file", file}});
    }
    owner.setattr(path, Get(b.ref, device, dtype));
    bound[b.parameter] = true;
  }
  for (const auto& p : module.named_parameters(/*recurse=*/true)) {
    if (!bound.count(p.name)) {
      throw Error(ErrorCode::kModelLoad, "model file '" + file + "': parameter '" + p.name +
                  "' has no weight in the manifest (manifest and module do not belong together)", {{"file", file}});
    }
  }
}

}  // namespace blip2
