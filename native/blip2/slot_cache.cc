#include "blip2/slot_cache.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include "core/device_transfer.h"
#include "core/errors.h"
#include "core/stats.h"

namespace blip2 {

namespace {

at::Tensor AllocateZeros(const std::vector<int64_t>& shape, at::ScalarType dtype, const c10::Device& device) {
  if (!device.is_cpu()) return at::zeros(shape, at::TensorOptions().dtype(dtype).device(device));
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (bytes == 0) return at::zeros(shape, at::TensorOptions().dtype(dtype));
  void* memory = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    throw Error(ErrorCode::kOutOfMemory, "cannot reserve " + std::to_string(bytes) + " bytes for the KV cache (" +
                std::string(std::strerror(errno)) + "); lower maxBatchSize, maxLength or kvCacheMaxBytes");
  }
  return at::from_blob(memory, shape, [bytes](void* p) { ::munmap(p, bytes); }, at::TensorOptions().dtype(dtype));
}

}  // namespace

SlotCache::SlotCache(const std::vector<std::vector<int64_t>>& shapes, at::ScalarType dtype, const c10::Device& device) {
  for (const auto& shape : shapes) tensors_.push_back(AllocateZeros(shape, dtype, device));
  Stats::kv_cache_allocations += 1;
  Stats::kv_cache_bytes += bytes();
}

SlotCache::~SlotCache() { Stats::kv_cache_bytes -= bytes(); }

int64_t SlotCache::bytes() const {
  int64_t total = 0;
  for (const auto& t : tensors_) total += static_cast<int64_t>(t.nbytes());
  return total;
}

int64_t SlotCache::bytes_per_slot() const { return slots() > 0 ? bytes() / slots() : 0; }

int64_t SlotCache::BytesPerSlot(const std::vector<std::vector<int64_t>>& shapes, at::ScalarType dtype) {
  int64_t total = 0;
  for (const auto& shape : shapes) {
    int64_t per = static_cast<int64_t>(c10::elementSize(dtype));
    for (size_t d = 0; d < shape.size(); ++d) {
      if (d != 2) per *= shape[d];
    }
    total += per;
  }
  return total;
}

void SlotCache::Move(int64_t from, int64_t to, const std::vector<int64_t>& lengths) {
  if (from == to) return;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    if (lengths.at(i) <= 0) continue;
    at::Tensor& t = tensors_[i];
    t.select(2, to).narrow(3, 0, lengths[i]).copy_(t.select(2, from).narrow(3, 0, lengths[i]));
  }
}

void SlotCache::Swap(int64_t a, int64_t b, const std::vector<int64_t>& a_lengths, const std::vector<int64_t>& b_lengths) {
  if (a == b) return;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    at::Tensor& t = tensors_[i];
    at::Tensor saved_a = a_lengths.at(i) > 0 ? t.select(2, a).narrow(3, 0, a_lengths[i]).clone() : at::Tensor();
    if (b_lengths.at(i) > 0) t.select(2, a).narrow(3, 0, b_lengths[i]).copy_(t.select(2, b).narrow(3, 0, b_lengths[i]));
    if (saved_a.defined()) t.select(2, b).narrow(3, 0, a_lengths[i]).copy_(saved_a);
  }
}

void SlotCache::CopySlots(const std::vector<int64_t>& source, const std::vector<int64_t>& destination, int64_t length, size_t which) {
  if (source.empty() || length <= 0) return;
  at::Tensor& t = tensors_.at(which);
  at::Tensor src = LongTensorOn(source, t.device());
  at::Tensor dst = LongTensorOn(destination, t.device());
  at::Tensor filled = t.narrow(4, 0, length);
  // index_select copies first, so overlapping source and destination slots are safe.
  filled.index_copy_(2, dst, filled.index_select(2, src));
}

}  // namespace blip2
