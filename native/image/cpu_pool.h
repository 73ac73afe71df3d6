// A small pool of CPU threads for image work (colour conversion, PIL-exact resizing) that must not
// run on the event loop, must not occupy the libuv pool (sharp and fs use it) and must not delay
// the device executors (which own every libtorch call). Standard library only.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace blip2::image {

class CpuPool {
 public:
  // The process-wide pool (created on first use with ThreadCount() threads; lives until exit).
  static CpuPool& Shared();

  // min(hardware threads, 8), at least 1; BLIP2_IMAGE_THREADS (1..64) overrides.
  static size_t ThreadCount();

  // Runs `job` on one of the pool's threads. Jobs must not throw (an escaping exception is
  // reported on stderr and dropped) and must not block on other jobs of the pool.
  void Submit(std::function<void()> job);

  size_t size() const { return threads_; }

 private:
  explicit CpuPool(size_t threads);
  void Loop();

  size_t threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> queue_;
};

}  // namespace blip2::image
