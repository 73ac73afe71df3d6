#include "core/device_transfer.h"

#ifdef BLIP2_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace blip2 {

at::Tensor ToDevice(const at::Tensor& host, const c10::Device& device) {
  if (device.is_cpu()) return host;
  if (device.is_cuda() && host.device().is_cpu()) return host.pin_memory().to(device, /*non_blocking=*/true);
  return host.to(device);
}

at::Tensor LongTensorOn(const std::vector<int64_t>& values, const c10::Device& device) {
  return ToDevice(at::tensor(values, at::TensorOptions().dtype(at::kLong)), device);
}

void UseExecutorStream(const c10::Device& device) {
#ifdef BLIP2_WITH_CUDA
  if (device.is_cuda()) {
    // Set once for this thread: every op the executor issues goes to this stream.
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index()));
  }
#else
  (void)device;
#endif
}

}  // namespace blip2
