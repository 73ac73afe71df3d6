// One long-lived thread per device owns every libtorch call for that device. Tasks run in FIFO
// order; a task that is not finished after a step goes to the back of the queue, so long jobs
// (the generation scheduler) advance step by step, interleaved with everything else for the same
// device.
//
// Shutdown: at process exit (an atexit handler registered when the addon loads, which runs before
// libtorch's own static destructors) every executor finishes the step it is in and parks, so no
// libtorch code runs while libtorch is being torn down. Tasks of an environment that is going away
// (a terminated worker) see their JsChannel closed and end at their next step.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
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
  virtual bool Step() = 0;
  // Step threw (a bug of ours, or an error the task did not catch): settle with it. Must not throw.
  virtual void Fail(std::exception_ptr error) noexcept = 0;
};

class Executor {
 public:
  // The executor of `device` (created on first use, lives until the process exits).
  static Executor& For(const c10::Device& device);
  // Every executor finishes its current step and runs nothing more (process exit). Waits up to
  // `timeout_ms` for the running steps.
  static void ShutdownAll(int64_t timeout_ms);

  void Submit(std::shared_ptr<Task> task);
  const c10::Device& device() const { return device_; }
  // Tasks waiting or running; for stats and tests.
  int64_t pending() const { return pending_.load(); }

 private:
  explicit Executor(c10::Device device);
  void Loop();
  // Returns once no step is running (or after timeout_ms); no step starts afterwards.
  void Stop(int64_t timeout_ms);

  c10::Device device_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable idle_;
  std::deque<std::shared_ptr<Task>> queue_;
  std::atomic<int64_t> pending_{0};
  bool stopping_ = false;
  bool running_step_ = false;
  std::thread thread_;
};

// Cooperative cancellation shared between an AbortSignal listener (JS thread) and a task.
struct CancelToken {
  std::atomic<bool> cancelled{false};
  bool IsCancelled() const { return cancelled.load(std::memory_order_relaxed); }
};

}  // namespace blip2
