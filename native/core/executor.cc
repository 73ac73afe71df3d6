#include "core/executor.h"

#include "core/cpu_tensor_cache.h"
#include "core/device_transfer.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#include <torch/csrc/jit/runtime/graph_executor.h>

namespace blip2 {

namespace {

std::mutex& RegistryMutex() {
  static auto* mutex = new std::mutex();
  return *mutex;
}

// Leaked on purpose: executor threads may still be parked at process exit and must not be joined
// or destroyed from static destructors.
std::map<std::string, Executor*>& Registry() {
  static auto* registry = new std::map<std::string, Executor*>();
  return *registry;
}

}  // namespace

Executor& Executor::For(const c10::Device& requested) {
  c10::Device device = requested;
  if (!device.is_cpu() && !device.has_index()) device.set_index(0);
  std::lock_guard<std::mutex> lock(RegistryMutex());
  auto key = device.str();
  auto it = Registry().find(key);
  if (it != Registry().end()) return *it->second;
  auto* executor = new Executor(device);
  Registry().emplace(key, executor);
  return *executor;
}

void Executor::ShutdownAll(int64_t timeout_ms) {
  std::vector<Executor*> all;
  {
    std::lock_guard<std::mutex> lock(RegistryMutex());
    for (auto& [key, executor] : Registry()) all.push_back(executor);
  }
  for (Executor* e : all) e->Stop(timeout_ms);
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

void Executor::Stop(int64_t timeout_ms) {
  std::unique_lock<std::mutex> lock(mutex_);
  stopping_ = true;
  wake_.notify_all();
  if (!idle_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [this] { return !running_step_; })) {
    std::fprintf(stderr, "blip2-node: a step on %s did not finish within %lld ms of process exit\n", device_.str().c_str(),
                 static_cast<long long>(timeout_ms));
  }
}

void Executor::Loop() {
  // Both are per thread: inference mode skips autograd bookkeeping for everything we run, and
  // OpenMP's thread team is set up for the thread that issues the ops.
  c10::InferenceMode inference_mode;
  at::init_num_threads();
  UseExecutorStream(device_);
  // TorchScript's profiling executor re-optimises each method over its first few calls (up to
  // ~170 ms per call on 2 cores) and again when shapes change, which decoding does every step; on
  // CPU it buys nothing measurable here, so graphs run as exported unless BLIP2_JIT_OPTIMIZE=1.
  const char* optimize = std::getenv("BLIP2_JIT_OPTIMIZE");
  torch::jit::setGraphExecutorOptimize(optimize != nullptr && std::strcmp(optimize, "1") == 0);
  for (;;) {
    std::shared_ptr<Task> task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      auto has_work = [this] { return stopping_ || !queue_.empty(); };
      // A second without work on the CPU: the idle blocks of the CPU tensor cache go back to the
      // kernel (under load they are reused from one batch to the next).
      if (device_.is_cpu() && !wake_.wait_for(lock, std::chrono::seconds(1), has_work)) {
        lock.unlock();
        ReleaseIdleCpuTensorBlocks();
        lock.lock();
      }
      wake_.wait(lock, has_work);
      if (stopping_) {
        // Parked for good: the process is exiting. Tasks still queued are leaked with it.
        idle_.notify_all();
        wake_.wait(lock, [] { return false; });
      }
      task = std::move(queue_.front());
      queue_.pop_front();
      running_step_ = true;
    }
    bool finished = true;
    try {
      finished = task->Step();
    } catch (...) {
      task->Fail(std::current_exception());
    }
    std::lock_guard<std::mutex> lock(mutex_);
    running_step_ = false;
    if (finished) {
      pending_.fetch_sub(1);
    } else {
      queue_.push_back(std::move(task));
    }
    if (stopping_) idle_.notify_all();
  }
}

}  // namespace blip2
