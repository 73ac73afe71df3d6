// blip2::linear, a TorchScript operator for the model's matrix products on the CPU.
//
// A decode step multiplies one row per running sequence (1 to 64) by every weight matrix; a
// prefill or the image encoder, hundreds to thousands of rows. With few rows that is pure weight
// streaming, bound by memory bandwidth, and libtorch's CPU path is far from the bound on the
// machines we measured: MKL runs one-row float32 products on one thread (19 GB/s where two
// threads read 45), bfloat16 ones go through a scalar fallback (the 50272x768 OPT head: 141 ms
// instead of ~3). With many rows MKL's float32 GEMM runs its AVX2 code on AMD CPUs (~160 GFLOP/s
// on 2 Zen 5 cores, where AVX-512 reaches ~300). blip2::linear splits the output rows over the
// intra-op threads and computes with AVX-512 or AVX2 FMA kernels (float32, bfloat16 and float16
// weights, float32 accumulation): up to 4 x rows by 4-8 weight rows in registers, one stream over
// the weights; 5-64 rows on AVX-512 in passes of 16 rows that each read the weights once (8 x rows
// by 3 weight rows in registers, twice); more rows (or AVX2) blocked like a GEMM; anything else
// (other devices, other dtypes, a CPU without AVX2) calls at::linear.
//
// Whether the kernel is used is decided per weight shape, dtype and row count by timing both
// paths on the model's own weights at load (Decide); until decided, and wherever libtorch was as
// fast, at::linear runs. So the kernel can only make a model faster on the machine it runs on.
//
// A third path is timed with them: oneDNN's matmul (mkldnn::_linear_pointwise, which libtorch
// ships for its own compiler) on the unpacked weight. With many float32 rows it runs AVX-512 code
// where MKL does not: measured on 2 Zen 5 cores, 345-420 GFLOP/s on the image encoder's and
// prefill's shapes against MKL's 150-185 and the kernel's ~220-300. For bfloat16 at::linear
// already goes to oneDNN.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/torch_includes.h"

namespace blip2 {

// The row counts (x.numel() / in_features) timed at load. A call uses the decision of the smallest
// bucket that holds its rows; more than 64 rows (prefill, the image encoder) that of the last.
constexpr int64_t kRowBuckets[] = {1, 4, 16, 64, 256};

// Which instruction set the kernel runs with here: "avx512", "avx2" or "none" (never used).
const char* LinearKernelIsa();

// Which code computes a product (the values index arrays in linear.cc). kKernelPrefetch is the
// kernel with software prefetch of the next weight rows, for up to 4 rows (beyond, the kernel
// reuses blocks from L2 and it is the kernel): it pays where the hardware prefetcher stalls, e.g.
// measured on 2 Zen 5 cores, bfloat16 one-row decode on blip2-opt-2.7b's memory-mapped weights
// (4 KiB pages) took 159 ms per token against 204 without, while on malloc'd (huge-page) float32
// weights it was up to 14% slower. So it is measured, on the model's own decode products (linear.cc).
enum class LinearPath : int { kPlain = 0, kKernel = 1, kOneDnn = 2, kKernelPrefetch = 3 };
// "plain" (at::linear), "kernel" (blip2::linear's own), "onednn", "kernel-prefetch".
const char* LinearPathName(LinearPath path);
// The path of that name; false for any other.
bool LinearPathFromName(const std::string& name, LinearPath* path);

struct LinearDecision {
  int64_t out_features = 0;
  int64_t in_features = 0;
  at::ScalarType dtype = at::kFloat;
  int64_t rows = 1;
  // Milliseconds per product; 0 where the path was not timed (forced modes) or cannot run here.
  double plain_ms = 0;   // at::linear
  double kernel_ms = 0;  // blip2::linear's kernel
  double onednn_ms = 0;  // mkldnn::_linear_pointwise
  LinearPath path = LinearPath::kPlain;
};

enum class LinearKernelMode {
  kAuto,    // time the paths, keep the fastest (the default)
  kAlways,  // the kernel wherever it applies, no timing (tests: BLIP2_LINEAR_KERNEL=on)
  kOneDnn,  // oneDNN wherever it runs, no timing (tests: BLIP2_LINEAR_KERNEL=onednn)
};

// Times the paths for each distinct weight (by shape and dtype) at each of kRowBuckets and
// records the fastest. `weights` are [out, in] matrices of the model (their own memory, so the
// timing sees the real cache behaviour). Returns what was decided.
std::vector<LinearDecision> DecideLinearKernels(const std::vector<at::Tensor>& weights, LinearKernelMode mode);

// The path products of this decision's shape and rows take now: its `path`, or for up to 4 rows
// the kernel variant the comparison on real calls settled on since (see linear.cc).
LinearPath CurrentLinearPath(const LinearDecision& decision);

// Rewrites every aten::linear in `method`'s graph (inlined first) to blip2::linear. Returns how many.
int UseBlip2Linear(torch::jit::Module& module, const std::string& method);

// The operator itself (also callable directly, e.g. from tests).
at::Tensor Blip2Linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// oneDNN's product (x: any [..., in] CPU tensor of the weight's dtype), and whether this libtorch has it.
at::Tensor OneDnnLinear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
bool OneDnnLinearAvailable();
// One path's product, no policy (tests, and the timing at load).
at::Tensor LinearOnPath(LinearPath path, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// The kernel alone, no policy (x: [rows, in] contiguous, weight [out, in] contiguous).
at::Tensor Blip2LinearKernel(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             bool prefetch = false);

}  // namespace blip2
