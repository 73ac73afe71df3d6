#include "image/cpu_pool.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

namespace blip2::image {

size_t CpuPool::ThreadCount() {
  if (const char* env = std::getenv("BLIP2_IMAGE_THREADS")) {
    char* end = nullptr;
    long n = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && n >= 1 && n <= 64) return static_cast<size_t>(n);
  }
  unsigned hw = std::thread::hardware_concurrency();
  return std::clamp<size_t>(hw == 0 ? 1 : hw, 1, 8);
}

CpuPool& CpuPool::Shared() {
  // Leaked on purpose, like the executors: its threads may be parked at process exit.
  static CpuPool* pool = new CpuPool(ThreadCount());
  return *pool;
}

CpuPool::CpuPool(size_t threads) : threads_(threads) {
  for (size_t i = 0; i < threads_; ++i) std::thread([this] { Loop(); }).detach();
}

void CpuPool::Submit(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(std::move(job));
  }
  wake_.notify_one();
}

void CpuPool::Loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return !queue_.empty(); });
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    try {
      job();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "blip2-node: image job threw: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "blip2-node: image job threw a non-standard exception\n");
    }
  }
}

}  // namespace blip2::image
