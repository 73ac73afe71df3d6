// The KV cache of a loaded model: allocated once, on the model's device, as `slots` sequence slots
// of `max_length` positions, and written in place by the language model's methods. One or more
// tensors, each [layers, 2, slots, heads, length, head_dim] (OPT: the self-attention cache; T5
// adds a cross-attention cache per slot).
//
// On the CPU the memory comes from an anonymous mapping: the kernel hands out zero pages lazily,
// so a 16-slot cache costs RSS only for the positions sequences actually fill, and unread positions
// are exact zeros (a value row past a sequence's length is multiplied by probability 0, and 0 * NaN
// from uninitialised memory would be NaN).
#pragma once

#include <cstdint>
#include <vector>

#include "core/torch_includes.h"

namespace blip2 {

class SlotCache {
 public:
  // shapes: [layers, 2, slots, heads, length, head_dim] each, with the same slot count.
  SlotCache(const std::vector<std::vector<int64_t>>& shapes, at::ScalarType dtype, const c10::Device& device);
  ~SlotCache();
  SlotCache(const SlotCache&) = delete;
  SlotCache& operator=(const SlotCache&) = delete;

  int64_t slots() const { return tensors_.front().size(2); }
  int64_t length(size_t i = 0) const { return tensors_.at(i).size(4); }
  at::Tensor& tensor(size_t i = 0) { return tensors_.at(i); }
  size_t count() const { return tensors_.size(); }
  int64_t bytes() const;
  // Bytes one slot takes, over all tensors.
  int64_t bytes_per_slot() const;

  // Slot `to` ← slot `from`, the first lengths[i] positions of tensor i (compaction).
  void Move(int64_t from, int64_t to, const std::vector<int64_t>& lengths);
  // Exchanges the first a_lengths / b_lengths positions of two slots.
  void Swap(int64_t a, int64_t b, const std::vector<int64_t>& a_lengths, const std::vector<int64_t>& b_lengths);
  // destination[i] ← source[i] over the first `length` positions of tensor `which` (beam
  // reordering; fan-out of one prefilled prompt). One gather, one scatter; overlap is safe.
  void CopySlots(const std::vector<int64_t>& source, const std::vector<int64_t>& destination, int64_t length, size_t which = 0);

  // The bytes one slot needs for the given shapes (for sizing before allocating).
  static int64_t BytesPerSlot(const std::vector<std::vector<int64_t>>& shapes, at::ScalarType dtype);

 private:
  std::vector<at::Tensor> tensors_;
};

}  // namespace blip2
