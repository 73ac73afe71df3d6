// One long-lived thread per device owns every libtorch call for that device. Tasks run in FIFO
// order; a task that is not finished after a step goes to the back of the queue, so long jobs
// (generation) advance step by step, interleaved with everything else for the same device.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "core/torch_includes.h"

namespace blip2 {

class Task {
 public:
  virtual ~Task() = default;
  // Runs one slice of work on the executor thread; returns true when the task is finished.
  // Must not throw: tasks report their own failures to JS.
  virtual bool Step() = 0;
};

class Executor {
 public:
  // The executor of `device` (created on first use, lives until the process exits).
  static Executor& For(const c10::Device& device);

  void Submit(std::shared_ptr<Task> task);
  const c10::Device& device() const { return device_; }
  // Tasks waiting or running; for stats and tests.
  int64_t pending() const { return pending_.load(); }

 private:
  explicit Executor(c10::Device device);
  void Loop();

  c10::Device device_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Task>> queue_;
  std::atomic<int64_t> pending_{0};
  std::thread thread_;
};

// Cooperative cancellation shared between an AbortSignal listener (JS thread) and a task.
struct CancelToken {
  std::atomic<bool> cancelled{false};
  bool IsCancelled() const { return cancelled.load(std::memory_order_relaxed); }
};

}  // namespace blip2
