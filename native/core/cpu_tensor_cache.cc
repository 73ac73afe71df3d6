#include "core/cpu_tensor_cache.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include "core/torch_includes.h"

namespace blip2 {

namespace {

constexpr size_t kMinCachedBytes = size_t{256} << 10;  // below: malloc's bins serve them well
constexpr size_t kGranule = size_t{64} << 10;          // block sizes are multiples of this
constexpr size_t kMaxIdleBlockBytes = size_t{256} << 20;  // larger (weights, a KV cache) unmap when freed
constexpr int64_t kIdleCapBytes = int64_t{512} << 20;

class CpuTensorCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes) {
      void* small = c10::alloc_cpu(n);
      return {small, small, &Free, c10::Device(c10::kCPU)};
    }
    const size_t want = (n + kGranule - 1) / kGranule * kGranule;
    void* block = nullptr;
    size_t size = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.lower_bound(want);
      if (it != idle_.end() && it->first <= want + want / 8) {  // best fit, at most 1/8 wasted
        block = it->second;
        size = it->first;
        idle_.erase(it);
        idle_bytes_ -= static_cast<int64_t>(size);
        ++reuses_;
        in_use_[block] = size;
      }
    }
    if (block == nullptr) {
      size = want;
      block = Map(size, n);
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_[block] = size;
      mapped_bytes_ += static_cast<int64_t>(size);
      ++maps_;
    }
    return {block, block, &Free, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
  // oneDNN (ideep) allocates through raw_allocate/raw_deallocate, which need one deleter for all.
  c10::DeleterFnPtr raw_deleter() const override { return &Free; }

  void Release(void* block) {
    std::vector<std::pair<void*, size_t>> unmap;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      auto it = in_use_.find(block);
      if (it == in_use_.end()) {  // a small block: malloc's
        lock.unlock();
        c10::free_cpu(block);
        return;
      }
      const size_t size = it->second;
      in_use_.erase(it);
      if (size > kMaxIdleBlockBytes) {
        unmap.emplace_back(block, size);
        mapped_bytes_ -= static_cast<int64_t>(size);
      } else {
        idle_.emplace(size, block);
        idle_bytes_ += static_cast<int64_t>(size);
        // Over the cap: the largest idle blocks go first (the rarest to fit a later request).
        while (idle_bytes_ > kIdleCapBytes) TakeIdle(std::prev(idle_.end()), unmap);
      }
    }
    for (auto& [p, size] : unmap) munmap(p, size);
  }

  void ReleaseIdle() {
    std::vector<std::pair<void*, size_t>> unmap;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (!idle_.empty()) TakeIdle(idle_.begin(), unmap);
    }
    for (auto& [p, size] : unmap) munmap(p, size);
  }

  CpuTensorCacheStats Stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    CpuTensorCacheStats stats;
    stats.installed = true;
    stats.mapped_bytes = mapped_bytes_;
    stats.idle_bytes = idle_bytes_;
    stats.reuses = reuses_;
    stats.maps = maps_;
    return stats;
  }

 private:
  static void Free(void* block);

  // Caller holds mutex_.
  void TakeIdle(std::multimap<size_t, void*>::iterator it, std::vector<std::pair<void*, size_t>>& unmap) {
    unmap.emplace_back(it->second, it->first);
    idle_bytes_ -= static_cast<int64_t>(it->first);
    mapped_bytes_ -= static_cast<int64_t>(it->first);
    idle_.erase(it);
  }

  void* Map(size_t size, size_t requested) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p != MAP_FAILED) return p;
      if (errno != ENOMEM) break;
      ReleaseIdle();  // idle blocks of other sizes may be what is missing
    }
    const int err = errno;
    // Worded like libtorch's DefaultCPUAllocator (core/errors.cc maps both to OutOfMemoryError).
    TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU tensor cache: can't allocate memory: you tried to allocate ", requested,
                     " bytes (", std::strerror(err), ")");
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;         // size → block
  std::unordered_map<void*, size_t> in_use_;  // block → size
  int64_t mapped_bytes_ = 0;
  int64_t idle_bytes_ = 0;
  int64_t reuses_ = 0;
  int64_t maps_ = 0;
};

// Leaked on purpose: tensors may be freed by static destructors at process exit.
CpuTensorCache* g_cache = nullptr;

void CpuTensorCache::Free(void* block) { g_cache->Release(block); }

}  // namespace

void InstallCpuTensorCache() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* setting = std::getenv("BLIP2_CPU_TENSOR_CACHE");
    if (setting != nullptr && std::string(setting) == "off") return;
    g_cache = new CpuTensorCache();
    c10::SetCPUAllocator(g_cache, /*priority=*/1);
  });
}

void ReleaseIdleCpuTensorBlocks() {
  if (g_cache != nullptr) g_cache->ReleaseIdle();
}

CpuTensorCacheStats GetCpuTensorCacheStats() { return g_cache != nullptr ? g_cache->Stats() : CpuTensorCacheStats{}; }

}  // namespace blip2
