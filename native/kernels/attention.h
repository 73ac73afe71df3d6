// blip2::matmul and blip2::index_copy_: torch.matmul and Tensor.index_copy_ with CPU kernels for
// the cached attention's two products and its cache writes.
//
// A decode step's attention multiplies, for every running sequence and head, one query row by the
// cached keys (scores = q · Kᵀ) and the probabilities by the cached values (p · V): batched
// vector-matrix products over the slots' part of the KV cache, a few KB each. libtorch hands them
// to MKL one small sgemv at a time; measured on 2 Zen 5 cores, 16 rows x 12 heads x 65 positions
// of the mid model read their 77 MB of keys and values at 11 GB/s per step (6.8 ms of a ~35 ms
// step), where the machine reads 40. The kernel here streams each batch's rows once, splitting the
// batches over the intra-op threads, with float32 accumulation for float32, bfloat16 and float16.
//
// It applies where a has one row per batch (a [..., 1, K], b [..., K, N], the same batch sizes, no
// broadcasting, same dtype, CPU, AVX-512 or AVX2) and b's last two dims are either rows of Kᵀ that
// are contiguous in K (the scores: b is keys.transpose(-1, -2)) or rows contiguous in N (the
// values). Anything else calls at::matmul. Whether it is used is decided per dtype, layout and
// head dim by timing both on cache-shaped tensors at load (DecideAttentionKernels); until decided,
// and where MKL was as fast, at::matmul runs. One decision per shape class (not per batch count),
// so a sequence gets the same bits batched or alone.
//
// The writes: each decode step copies every row's new keys and values into the cache with
// index_copy_ (rows of head_dim values at computed positions; 24 calls per step on the mid model),
// which libtorch's indexed TensorIterator did in 5.2 us per call for 16 rows (192 rows of 64
// floats) at load-time timing, against 1.4 us for one memcpy per row here (self and source
// row-major matrices of one dtype on the CPU). Small, but timed and kept like the products.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/torch_includes.h"
#include "kernels/linear.h"

namespace blip2 {

enum class AttentionProduct : int { kScores = 0, kValues = 1, kCacheWrite = 2 };  // q · Kᵀ, p · V, the writes
// "scores", "values", "cache-write".
const char* AttentionProductName(AttentionProduct product);

struct AttentionDecision {
  AttentionProduct product = AttentionProduct::kScores;
  at::ScalarType dtype = at::kFloat;
  int64_t head_dim = 0;
  // Milliseconds per call on 1 and 16 rows of `heads` heads over 64 cached positions; 0 where
  // not timed (forced modes) or the kernel cannot run here.
  double plain_ms_1 = 0, kernel_ms_1 = 0, plain_ms_16 = 0, kernel_ms_16 = 0;
  bool kernel = false;  // the kernel runs these products (it was not slower at either row count)
};

// Decides the two products and the writes for a model's language model (its dtype, heads and head
// dim) under the linear kernels' modes (kAlways: the kernel without timing; kOneDnn counts as kAuto).
std::vector<AttentionDecision> DecideAttentionKernels(at::ScalarType dtype, int64_t heads, int64_t head_dim,
                                                      LinearKernelMode mode);

// Rewrites every aten::matmul (aten::index_copy_) in `method`'s graph, inlined first, to
// blip2::matmul (blip2::index_copy_) where `decisions` chose the kernel for them. Returns how many.
int UseAttentionKernels(torch::jit::Module& module, const std::string& method, const std::vector<AttentionDecision>& decisions);

// The operator: the kernel where it applies and was decided for, at::matmul otherwise.
at::Tensor Blip2Matmul(const at::Tensor& a, const at::Tensor& b);
// Whether the kernel applies to a x b, and which product it is then.
bool AttentionKernelApplies(const at::Tensor& a, const at::Tensor& b, AttentionProduct* product);
// The kernel without policy (tests, the timing); a c10::Error where it does not apply.
at::Tensor AttentionKernelMatmul(const at::Tensor& a, const at::Tensor& b);

// self.index_copy_(dim, index, source): one memcpy per row where it applies (dim 0 of a row-major
// [R, D] self, source [N, D] of its dtype, int64 index [N], CPU), else libtorch's. Bounds checked.
at::Tensor& Blip2IndexCopy(at::Tensor& self, int64_t dim, const at::Tensor& index, const at::Tensor& source);
bool CacheWriteKernelApplies(const at::Tensor& self, int64_t dim, const at::Tensor& index, const at::Tensor& source);

}  // namespace blip2
