#include "kernels/attention.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <tuple>

#include <torch/library.h>

#include "kernels/rewrite.h"
#include "kernels/simd.h"

namespace blip2 {

namespace {

// ------------------------------------------------------------------------------------ kernels
// Scores: out[j] = sum_k q[k] * keys[j * stride + k] for j < n; 16 key rows at a time, their 16
// sums reduced together (Sum16).
template <typename W>
__attribute__((target("avx512f,avx512bw,fma"))) void Scores512(const W* q, const W* keys, int64_t stride, int64_t n,
                                                                int64_t k_len, float* out) {
  const int64_t k_vec = k_len - k_len % 16;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_vec; k += 16) {
      const __m512 qv = Load512<W>::At(q + k);
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(Load512<W>::At(keys + (j + r) * stride + k), qv, acc[r]);
    }
    _mm512_storeu_ps(out + j, Sum16(acc));
    for (int64_t k = k_vec; k < k_len; ++k)
      for (int r = 0; r < 16; ++r) out[j + r] += static_cast<float>(q[k]) * static_cast<float>(keys[(j + r) * stride + k]);
  }
  for (; j < n; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_vec; k += 16) acc = _mm512_fmadd_ps(Load512<W>::At(keys + j * stride + k), Load512<W>::At(q + k), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (int64_t k = k_vec; k < k_len; ++k) s += static_cast<float>(q[k]) * static_cast<float>(keys[j * stride + k]);
    out[j] = s;
  }
}

template <typename W>
__attribute__((target("avx2,fma,f16c"))) void Scores256(const W* q, const W* keys, int64_t stride, int64_t n, int64_t k_len,
                                                         float* out) {
  const int64_t k_vec = k_len - k_len % 8;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m256 acc[4];
    for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_vec; k += 8) {
      const __m256 qv = Load256<W>::At(q + k);
      for (int r = 0; r < 4; ++r) acc[r] = _mm256_fmadd_ps(Load256<W>::At(keys + (j + r) * stride + k), qv, acc[r]);
    }
    for (int r = 0; r < 4; ++r) {
      float s = Sum256(acc[r]);
      for (int64_t k = k_vec; k < k_len; ++k) s += static_cast<float>(q[k]) * static_cast<float>(keys[(j + r) * stride + k]);
      out[j + r] = s;
    }
  }
  for (; j < n; ++j) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_vec; k += 8) acc = _mm256_fmadd_ps(Load256<W>::At(keys + j * stride + k), Load256<W>::At(q + k), acc);
    float s = Sum256(acc);
    for (int64_t k = k_vec; k < k_len; ++k) s += static_cast<float>(q[k]) * static_cast<float>(keys[j * stride + k]);
    out[j] = s;
  }
}

// Values: out[c] = sum_k p[k] * values[k * stride + c] for c < n: each value row is read once,
// contiguously, into NV vector accumulators (NV * lanes columns at a time).
template <typename W, int NV>
__attribute__((target("avx512f,avx512bw,fma"))) void ValuesBlock512(const W* p, const W* values, int64_t stride, int64_t k_len,
                                                                     float* out) {
  __m512 acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_len; ++k) {
    const __m512 pk = _mm512_set1_ps(static_cast<float>(p[k]));
    for (int c = 0; c < NV; ++c) acc[c] = _mm512_fmadd_ps(pk, Load512<W>::At(values + k * stride + 16 * c), acc[c]);
  }
  for (int c = 0; c < NV; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
}

template <typename W, int NV>
__attribute__((target("avx2,fma,f16c"))) void ValuesBlock256(const W* p, const W* values, int64_t stride, int64_t k_len,
                                                              float* out) {
  __m256 acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_len; ++k) {
    const __m256 pk = _mm256_set1_ps(static_cast<float>(p[k]));
    for (int c = 0; c < NV; ++c) acc[c] = _mm256_fmadd_ps(pk, Load256<W>::At(values + k * stride + 8 * c), acc[c]);
  }
  for (int c = 0; c < NV; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

template <typename W>
void Values(const W* p, const W* values, int64_t stride, int64_t n, int64_t k_len, float* out) {
  const bool wide = CpuIsa() == Isa::kAvx512;
  const int64_t lanes = wide ? 16 : 8;
  int64_t c = 0;
  while (n - c >= lanes) {
    const int64_t nv = std::min<int64_t>(8, (n - c) / lanes);
    const W* v = values + c;
    float* o = out + c;
    // NV is a template argument so the accumulators stay in registers.
#define BLIP2_VALUES_CASE(N) \
  case N: wide ? ValuesBlock512<W, N>(p, v, stride, k_len, o) : ValuesBlock256<W, N>(p, v, stride, k_len, o); break;
    switch (nv) {
      BLIP2_VALUES_CASE(1)
      BLIP2_VALUES_CASE(2)
      BLIP2_VALUES_CASE(3)
      BLIP2_VALUES_CASE(4)
      BLIP2_VALUES_CASE(5)
      BLIP2_VALUES_CASE(6)
      BLIP2_VALUES_CASE(7)
      default: BLIP2_VALUES_CASE(8)
    }
#undef BLIP2_VALUES_CASE
    c += nv * lanes;
  }
  for (; c < n; ++c) {
    float s = 0;
    for (int64_t k = 0; k < k_len; ++k) s += static_cast<float>(p[k]) * static_cast<float>(values[k * stride + c]);
    out[c] = s;
  }
}

// a [..., 1, K], b [..., K, N] (checked by AttentionKernelApplies): one product per batch.
template <typename W>
at::Tensor RunProducts(const at::Tensor& a, const at::Tensor& b, AttentionProduct product) {
  const int64_t dims = a.dim();
  const int64_t k_len = a.size(-1), n = b.size(-1);
  std::vector<int64_t> out_sizes(a.sizes().begin(), a.sizes().end());
  out_sizes.back() = n;
  at::Tensor out = at::empty(out_sizes, a.options().memory_format(at::MemoryFormat::Contiguous));
  int64_t batches = 1;
  for (int64_t d = 0; d < dims - 2; ++d) batches *= a.size(d);
  if (batches == 0 || n == 0) return out;
  if (k_len == 0) return out.zero_();
  // Element offsets of each batch's a row and b matrix (batch dims in any strides).
  std::vector<int64_t> a_offset(batches), b_offset(batches);
  for (int64_t i = 0; i < batches; ++i) {
    int64_t rest = i, ao = 0, bo = 0;
    for (int64_t d = dims - 3; d >= 0; --d) {
      const int64_t index = rest % a.size(d);
      rest /= a.size(d);
      ao += index * a.stride(d);
      bo += index * b.stride(d);
    }
    a_offset[i] = ao;
    b_offset[i] = bo;
  }
  const W* ap = a.const_data_ptr<W>();
  const W* bp = b.const_data_ptr<W>();
  W* op = out.data_ptr<W>();
  // Rows of b per batch in memory: the scores read n rows of K, the values K rows of n.
  const int64_t stride = product == AttentionProduct::kScores ? b.stride(-1) : b.stride(-2);
  const int64_t batch_bytes = k_len * n * int64_t{sizeof(W)};
  const int64_t grain = std::max<int64_t>(1, (int64_t{32} << 10) / std::max<int64_t>(batch_bytes, 1));
  at::parallel_for(0, batches, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> wide;
    if constexpr (!std::is_same_v<W, float>) wide.resize(n);
    for (int64_t i = begin; i < end; ++i) {
      float* dst = std::is_same_v<W, float> ? reinterpret_cast<float*>(op + i * n) : wide.data();
      const W* q = ap + a_offset[i];
      const W* m = bp + b_offset[i];
      if (product == AttentionProduct::kScores) {
        if (CpuIsa() == Isa::kAvx512) Scores512<W>(q, m, stride, n, k_len, dst);
        else Scores256<W>(q, m, stride, n, k_len, dst);
      } else {
        Values<W>(q, m, stride, n, k_len, dst);
      }
      if constexpr (!std::is_same_v<W, float>)
        for (int64_t c = 0; c < n; ++c) op[i * n + c] = static_cast<W>(dst[c]);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------- policy

using PolicyKey = std::tuple<int, int, int64_t>;  // product, dtype, head dim
std::mutex policy_mutex;
std::map<PolicyKey, bool>& Policy() {
  static std::map<PolicyKey, bool> policy;
  return policy;
}

int64_t HeadDimOf(AttentionProduct product, const at::Tensor& a, const at::Tensor& b) {
  return product == AttentionProduct::kScores ? a.size(-1) : b.size(-1);
}

// Best of 7 after 2 warm-ups, in milliseconds.
template <typename F>
double TimeMs(F&& f) {
  for (int i = 0; i < 2; ++i) f();
  double best = 1e30;
  for (int i = 0; i < 7; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// One row count's trial of a decision: whether the kernel applies to its operands, and each path on them.
struct Trial {
  bool applies = false;
  std::function<void()> plain, kernel;
};

// Times libtorch's op against the kernel at 1 and 16 rows (`trial(rows)` sets both up) and keeps
// the kernel where it applies at both and was not slower at either; forced (kAlways), wherever it
// applies, untimed. No kernel on a CPU without AVX2, as for blip2::linear's.
template <typename MakeTrial>
void Decide(AttentionDecision& d, LinearKernelMode mode, MakeTrial&& trial) {
  bool applies = CpuIsa() != Isa::kNone, faster = true;
  for (int64_t rows : {int64_t{1}, int64_t{16}}) {
    if (!applies) break;
    const Trial t = trial(rows);
    applies = t.applies;
    if (!applies || mode == LinearKernelMode::kAlways) continue;
    const double plain = TimeMs(t.plain), kernel = TimeMs(t.kernel);
    (rows == 1 ? d.plain_ms_1 : d.plain_ms_16) = plain;
    (rows == 1 ? d.kernel_ms_1 : d.kernel_ms_16) = kernel;
    faster = faster && kernel <= plain;
  }
  d.kernel = applies && (mode == LinearKernelMode::kAlways || faster);
}

}  // namespace

const char* AttentionProductName(AttentionProduct product) {
  switch (product) {
    case AttentionProduct::kScores: return "scores";
    case AttentionProduct::kValues: return "values";
    case AttentionProduct::kCacheWrite: return "cache-write";
  }
  return "scores";
}

bool CacheWriteKernelApplies(const at::Tensor& self, int64_t dim, const at::Tensor& index, const at::Tensor& source) {
  return dim == 0 && self.device().is_cpu() && source.device().is_cpu() && index.device().is_cpu() && self.dim() == 2 &&
         source.dim() == 2 && index.dim() == 1 && index.scalar_type() == at::kLong && source.scalar_type() == self.scalar_type() &&
         self.size(1) == source.size(1) && index.numel() == source.size(0) && (self.stride(1) == 1 || self.size(1) <= 1) &&
         (source.stride(1) == 1 || source.size(1) <= 1) && index.is_contiguous() && !self.requires_grad() && !source.requires_grad();
}

at::Tensor& Blip2IndexCopy(at::Tensor& self, int64_t dim, const at::Tensor& index, const at::Tensor& source) {
  if (!CacheWriteKernelApplies(self, dim, index, source)) return self.index_copy_(dim, index, source);
  const int64_t rows = self.size(0), n = index.numel();
  const int64_t row_bytes = self.size(1) * static_cast<int64_t>(self.element_size());
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < rows, "index_copy_(): index ", idx[i], " is out of bounds for dimension 0 with size ", rows);
  char* dst = static_cast<char*>(self.data_ptr());
  const char* src = static_cast<const char*>(source.const_data_ptr());
  const int64_t dst_stride = self.stride(0) * self.element_size(), src_stride = source.stride(0) * source.element_size();
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + idx[i] * dst_stride, src + i * src_stride, row_bytes);
  return self;
}

bool AttentionKernelApplies(const at::Tensor& a, const at::Tensor& b, AttentionProduct* product) {
  if (CpuIsa() == Isa::kNone || !a.device().is_cpu() || !b.device().is_cpu()) return false;
  const at::ScalarType dtype = a.scalar_type();
  if (b.scalar_type() != dtype || (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)) return false;
  if (a.dim() < 3 || b.dim() != a.dim() || a.size(-2) != 1 || a.size(-1) != b.size(-2)) return false;
  if (a.requires_grad() || b.requires_grad()) return false;
  for (int64_t d = 0; d < a.dim() - 2; ++d)
    if (a.size(d) != b.size(d)) return false;  // no broadcasting
  if (a.stride(-1) != 1 && a.size(-1) > 1) return false;
  if (b.stride(-2) == 1 || b.size(-2) == 1) {
    *product = AttentionProduct::kScores;
  } else if (b.stride(-1) == 1 || b.size(-1) == 1) {
    *product = AttentionProduct::kValues;
  } else {
    return false;
  }
  return true;
}

at::Tensor AttentionKernelMatmul(const at::Tensor& a, const at::Tensor& b) {
  AttentionProduct product;
  TORCH_CHECK(AttentionKernelApplies(a, b, &product), "the attention kernel does not apply to ", a.sizes(), " x ", b.sizes());
  switch (a.scalar_type()) {
    case at::kFloat: return RunProducts<float>(a, b, product);
    case at::kBFloat16: return RunProducts<at::BFloat16>(a, b, product);
    default: return RunProducts<at::Half>(a, b, product);
  }
}

at::Tensor Blip2Matmul(const at::Tensor& a, const at::Tensor& b) {
  AttentionProduct product;
  if (AttentionKernelApplies(a, b, &product)) {
    bool kernel = false;
    {
      std::lock_guard<std::mutex> lock(policy_mutex);
      auto it = Policy().find({static_cast<int>(product), static_cast<int>(a.scalar_type()), HeadDimOf(product, a, b)});
      kernel = it != Policy().end() && it->second;
    }
    if (kernel) return AttentionKernelMatmul(a, b);
  }
  return at::matmul(a, b);
}

std::vector<AttentionDecision> DecideAttentionKernels(at::ScalarType dtype, int64_t heads, int64_t head_dim,
                                                      LinearKernelMode mode) {
  std::vector<AttentionDecision> decisions;
  if (heads <= 0 || head_dim <= 0) return decisions;
  c10::InferenceMode inference;
  constexpr int64_t kPositions = 64, kMaxPositions = 256;
  for (AttentionProduct product : {AttentionProduct::kScores, AttentionProduct::kValues}) {
    AttentionDecision d;
    d.product = product;
    d.dtype = dtype;
    d.head_dim = head_dim;
    Decide(d, mode, [&](int64_t rows) {
      // Laid out as the slot cache is: [rows, heads, max positions, head dim], read up to kPositions.
      at::Tensor cache = at::randn({rows, heads, kMaxPositions, head_dim}).to(dtype).narrow(2, 0, kPositions);
      at::Tensor a = product == AttentionProduct::kScores ? at::randn({rows, heads, 1, head_dim}).to(dtype)
                                                          : at::softmax(at::randn({rows, heads, 1, kPositions}), -1).to(dtype);
      at::Tensor b = product == AttentionProduct::kScores ? cache.transpose(-1, -2) : cache;
      AttentionProduct applies = product;
      return Trial{AttentionKernelApplies(a, b, &applies) && applies == product, [a, b] { at::matmul(a, b); },
                   [a, b] { AttentionKernelMatmul(a, b); }};
    });
    {
      std::lock_guard<std::mutex> lock(policy_mutex);
      Policy()[{static_cast<int>(product), static_cast<int>(dtype), head_dim}] = d.kernel;
    }
    decisions.push_back(d);
  }
  // The writes of one decode step's new keys (or values): rows x heads rows of head_dim into the
  // [slots x heads x max positions, head_dim] view of one layer's cache. (No policy entry: they
  // are index_copy_ alone, so the rewrite itself is the decision; see UseAttentionKernels.)
  AttentionDecision d;
  d.product = AttentionProduct::kCacheWrite;
  d.dtype = dtype;
  d.head_dim = head_dim;
  Decide(d, mode, [&](int64_t rows) {
    at::Tensor cache = at::zeros({16 * heads * kMaxPositions, head_dim}, at::TensorOptions().dtype(dtype));
    at::Tensor source = at::randn({rows * heads, head_dim}).to(dtype);
    at::Tensor index = at::arange(rows * heads, at::kLong).mul_(kMaxPositions).add_(kPositions - 1);
    return Trial{CacheWriteKernelApplies(cache, 0, index, source), [=]() mutable { cache.index_copy_(0, index, source); },
                 [=]() mutable { Blip2IndexCopy(cache, 0, index, source); }};
  });
  decisions.push_back(d);
  return decisions;
}

int UseAttentionKernels(torch::jit::Module& module, const std::string& method, const std::vector<AttentionDecision>& decisions) {
  bool products = false, writes = false;
  for (const AttentionDecision& d : decisions) {
    if (!d.kernel) continue;
    (d.product == AttentionProduct::kCacheWrite ? writes : products) = true;
  }
  int rewritten = 0;
  if (products) rewritten += RewriteOperator(module, method, "aten::matmul", "blip2::matmul", 2);
  if (writes) rewritten += RewriteOperator(module, method, "aten::index_copy_", "blip2::index_copy_", 4);
  return rewritten;
}

}  // namespace blip2

TORCH_LIBRARY_FRAGMENT(blip2, m) {
  m.def("matmul(Tensor a, Tensor b) -> Tensor");
  m.def("index_copy_(Tensor(a!) self, int dim, Tensor index, Tensor source) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(blip2, CompositeExplicitAutograd, m) {
  m.impl("matmul", TORCH_FN(blip2::Blip2Matmul));
  m.impl("index_copy_", TORCH_FN(blip2::Blip2IndexCopy));
}
