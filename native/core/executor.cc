#include "core/executor.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>

#include <torch/csrc/jit/runtime/graph_executor.h>

namespace blip2 {

Executor& Executor::For(const c10::Device& requested) {
  static std::mutex registry_mutex;
  // Leaked on purpose: executor threads may still be parked at process exit and must not be
  // joined from static destructors that run after libtorch's own have.
  static auto* registry = new std::map<std::string, Executor*>();
  c10::Device device = requested;
  if (!device.is_cpu() && !device.has_index()) device.set_index(0);
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto key = device.str();
  auto it = registry->find(key);
  if (it != registry->end()) return *it->second;
  auto* executor = new Executor(device);
  registry->emplace(key, executor);
  return *executor;
}

Executor::Executor(c10::Device device) : device_(device) {
  thread_ = std::thread([this] { Loop(); });
  thread_.detach();
}

void Executor::Submit(std::shared_ptr<Task> task) {
  pending_.fetch_add(1);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(std::move(task));
  }
  wake_.notify_one();
}

void Executor::Loop() {
  // Both are per thread: inference mode skips autograd bookkeeping for everything we run, and
  // OpenMP's thread team is set up for the thread that issues the ops.
  c10::InferenceMode inference_mode;
  at::init_num_threads();
  // TorchScript's profiling executor re-optimises each method over its first few calls (up to
  // ~170 ms per call on 2 cores) and again when shapes change, which decoding does every step; on
  // CPU it buys nothing measurable here (mid-size model: 0.75-0.85 s per 20-token caption either
  // way), so graphs run as exported unless BLIP2_JIT_OPTIMIZE=1.
  const char* optimize = std::getenv("BLIP2_JIT_OPTIMIZE");
  torch::jit::setGraphExecutorOptimize(optimize != nullptr && std::strcmp(optimize, "1") == 0);
  for (;;) {
    std::shared_ptr<Task> task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return !queue_.empty(); });
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    bool finished = true;
    try {
      finished = task->Step();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "blip2-node: task on %s threw: %s\n", device_.str().c_str(), e.what());
    } catch (...) {
      std::fprintf(stderr, "blip2-node: task on %s threw a non-standard exception\n", device_.str().c_str());
    }
    if (finished) {
      pending_.fetch_sub(1);
    } else {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(task));
    }
  }
}

}  // namespace blip2
