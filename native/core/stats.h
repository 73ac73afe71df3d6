// Process-wide counters that let tests prove the data-movement promises of the design.
#pragma once

#include <atomic>
#include <cstdint>

namespace blip2 {

struct Stats {
  static inline std::atomic<int64_t> device_to_host_bytes{0};
  static inline std::atomic<int64_t> host_to_device_bytes{0};
  static inline std::atomic<int64_t> kv_cache_allocations{0};
  static inline std::atomic<int64_t> kv_cache_bytes{0};  // allocated now (one cache per loaded model)
  static inline std::atomic<int64_t> generated_tokens{0};
  // Bytes the decoding loops read from tensors into host memory, on any device (on the CPU this is
  // a read, not a copy, but it shows what would cross the bus on a GPU).
  static inline std::atomic<int64_t> decode_host_read_bytes{0};
  static inline std::atomic<int64_t> decode_steps{0};
};

}  // namespace blip2
