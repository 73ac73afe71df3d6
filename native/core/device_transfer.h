// Host → device copies, one owner for all of them. On CUDA a copy goes through pinned host memory
// and is queued on the executor's stream without waiting (non_blocking), so the small per-step
// index tensors (slots, positions, tokens) never make the host wait for the GPU; the one host
// wait per decode step is reading the chosen ids back.
#pragma once

#include <cstdint>
#include <vector>

#include "core/torch_includes.h"

namespace blip2 {

// `host` (a CPU tensor) on `device`; the same tensor when device is the CPU.
at::Tensor ToDevice(const at::Tensor& host, const c10::Device& device);
// Host indices (slots, positions, rows) as an int64 tensor on `device`.
at::Tensor LongTensorOn(const std::vector<int64_t>& values, const c10::Device& device);

// The executor thread of a CUDA device runs on its own stream from the pool (not the legacy
// default stream, which would serialise with every other library's work). Call once per thread.
void UseExecutorStream(const c10::Device& device);

}  // namespace blip2
