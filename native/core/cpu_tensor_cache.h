// libtorch's CPU allocator, with large blocks kept for reuse.
//
// The default CPU allocator hands every tensor to malloc, and glibc gives large blocks back to the
// kernel when they are freed (munmap, heap trims, arena heaps deleted). A batch of 16 images
// through the mid-size model allocates ~0.5 GB of activations per pass, so every pass paid ~100k
// fresh page faults (its image features took 0.9-1.1 s on the 2-core VM, 0.65-0.83 s with this).
// This allocator maps blocks of 256 KB and more itself and keeps freed ones (best fit, at most 1/8
// larger than asked), up to 512 MB idle; smaller requests go to malloc as before (c10::alloc_cpu).
// Idle blocks go back to the kernel when the CPU executor has had no work for a second, and when a
// model is disposed.
//
// BLIP2_CPU_TENSOR_CACHE=off leaves libtorch's allocator alone (diagnosis).
#pragma once

#include <cstdint>

namespace blip2 {

struct CpuTensorCacheStats {
  bool installed = false;
  int64_t mapped_bytes = 0;  // mapped now: blocks in use by tensors + idle ones
  int64_t idle_bytes = 0;    // mapped now and free for reuse
  int64_t reuses = 0;        // allocations served from an idle block, since the process started
  int64_t maps = 0;          // allocations that mapped a new block, since the process started
};

// Makes the cache libtorch's CPU allocator (once per process; no-op when turned off).
void InstallCpuTensorCache();
// Unmaps every idle block.
void ReleaseIdleCpuTensorBlocks();
CpuTensorCacheStats GetCpuTensorCacheStats();

}  // namespace blip2
