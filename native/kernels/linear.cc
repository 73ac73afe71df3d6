#include "kernels/linear.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/passes/subgraph_rewrite.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/library.h>

namespace blip2 {

namespace {

enum class Isa { kNone, kAvx2, kAvx512 };

Isa DetectIsa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return Isa::kAvx2;
  return Isa::kNone;
}

const Isa kIsa = DetectIsa();

// ---------------------------------------------------------------------------------- kernels
// y[m, o] = sum_k x[m, k] * w[o, k] for o in [o_begin, o_end), four weight rows at a time so
// each x vector load feeds four FMAs; weights are converted to float32 in registers.

template <typename W>
struct Load512;
template <>
struct Load512<float> {
  __attribute__((target("avx512f"))) static __m512 At(const float* p) { return _mm512_loadu_ps(p); }
  static float Scalar(const float* p) { return *p; }
};
template <>
struct Load512<at::BFloat16> {
  __attribute__((target("avx512f,avx512bw"))) static __m512 At(const at::BFloat16* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static float Scalar(const at::BFloat16* p) { return static_cast<float>(*p); }
};
template <>
struct Load512<at::Half> {
  __attribute__((target("avx512f"))) static __m512 At(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static float Scalar(const at::Half* p) { return static_cast<float>(*p); }
};

template <typename W, int M>
__attribute__((target("avx512f,avx512bw,fma"))) void Rows512(const W* w, const float* x, int64_t k_len, int64_t o_begin,
                                                               int64_t o_end, float* y, int64_t n) {
  constexpr int R = M <= 2 ? 8 : 4;  // 8 weight streams in flight read faster where registers allow
  const int64_t k_vec = k_len - k_len % 16;
  int64_t o = o_begin;
  for (; o + R <= o_end; o += R) {
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    const W* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = w + (o + r) * k_len;
    for (int64_t k = 0; k < k_vec; k += 16) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = Load512<W>::At(rows[r] + k);
      for (int m = 0; m < M; ++m) {
        __m512 xv = _mm512_loadu_ps(x + m * k_len + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float s = _mm512_reduce_add_ps(acc[m][r]);
        for (int64_t k = k_vec; k < k_len; ++k) s += x[m * k_len + k] * Load512<W>::Scalar(rows[r] + k);
        y[m * n + o + r] = s;
      }
    }
  }
  for (; o < o_end; ++o) {
    const W* row = w + o * k_len;
    for (int m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < k_vec; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * k_len + k), Load512<W>::At(row + k), acc);
      float s = _mm512_reduce_add_ps(acc);
      for (int64_t k = k_vec; k < k_len; ++k) s += x[m * k_len + k] * Load512<W>::Scalar(row + k);
      y[m * n + o] = s;
    }
  }
}

template <typename W>
struct Load256;
template <>
struct Load256<float> {
  __attribute__((target("avx2"))) static __m256 At(const float* p) { return _mm256_loadu_ps(p); }
};
template <>
struct Load256<at::BFloat16> {
  __attribute__((target("avx2"))) static __m256 At(const at::BFloat16* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
};
template <>
struct Load256<at::Half> {
  __attribute__((target("avx2,f16c"))) static __m256 At(const at::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

__attribute__((target("avx2"))) inline float Sum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <typename W, int M>
__attribute__((target("avx2,fma,f16c"))) void Rows256(const W* w, const float* x, int64_t k_len, int64_t o_begin,
                                                        int64_t o_end, float* y, int64_t n) {
  constexpr int R = M <= 2 ? 4 : 2;  // 16 ymm registers
  const int64_t k_vec = k_len - k_len % 8;
  int64_t o = o_begin;
  for (; o + R <= o_end; o += R) {
    __m256 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_vec; k += 8) {
      __m256 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = Load256<W>::At(w + (o + r) * k_len + k);
      for (int m = 0; m < M; ++m) {
        __m256 xv = _mm256_loadu_ps(x + m * k_len + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float s = Sum256(acc[m][r]);
        for (int64_t k = k_vec; k < k_len; ++k) s += x[m * k_len + k] * static_cast<float>(w[(o + r) * k_len + k]);
        y[m * n + o + r] = s;
      }
    }
  }
  for (; o < o_end; ++o) {
    for (int m = 0; m < M; ++m) {
      float s = 0;
      for (int64_t k = 0; k < k_len; ++k) s += x[m * k_len + k] * static_cast<float>(w[o * k_len + k]);
      y[m * n + o] = s;
    }
  }
}

// Up to four x rows per pass over a block of weight rows (the register tile); more rows take
// further passes over the same block, which is then read from L1/L2 rather than memory, so the
// weights still stream from memory once per call.
template <typename W>
void RunRows(const W* w, const float* x, int64_t rows, int64_t k_len, int64_t o_begin, int64_t o_end, float* y, int64_t n) {
  auto run = [&](auto m_const, const float* xm, float* ym, int64_t ob, int64_t oe) {
    constexpr int M = decltype(m_const)::value;
    if (kIsa == Isa::kAvx512) {
      Rows512<W, M>(w, xm, k_len, ob, oe, ym, n);
    } else {
      Rows256<W, M>(w, xm, k_len, ob, oe, ym, n);
    }
  };
  // Weight rows per block: ~48 KB of weights, so a block stays cached across the row passes.
  const int64_t block = rows <= 4 ? o_end - o_begin : std::max<int64_t>(4, (int64_t{48} << 10) / (k_len * int64_t{sizeof(W)}) / 4 * 4);
  for (int64_t ob = o_begin; ob < o_end; ob += block) {
    const int64_t oe = std::min(o_end, ob + block);
    for (int64_t m = 0; m < rows; m += 4) {
      const float* xm = x + m * k_len;
      float* ym = y + m * n;
      switch (std::min<int64_t>(4, rows - m)) {
        case 1: run(std::integral_constant<int, 1>{}, xm, ym, ob, oe); break;
        case 2: run(std::integral_constant<int, 2>{}, xm, ym, ob, oe); break;
        case 3: run(std::integral_constant<int, 3>{}, xm, ym, ob, oe); break;
        default: run(std::integral_constant<int, 4>{}, xm, ym, ob, oe); break;
      }
    }
  }
}

// ----------------------------------------------------------------------------------- policy

using PolicyKey = std::tuple<int64_t, int64_t, int, int64_t>;  // out, in, dtype, rows bucket

std::mutex policy_mutex;
std::map<PolicyKey, bool>& Policy() {
  static auto* policy = new std::map<PolicyKey, bool>();  // leaked: used until process exit
  return *policy;
}

// The row counts timed at load; a call uses the decision of the smallest bucket that holds it.
constexpr int64_t kRowBuckets[] = {1, 4, 16, kMaxKernelRows};

int64_t RowsBucket(int64_t rows) {
  for (int64_t bucket : kRowBuckets)
    if (rows <= bucket) return bucket;
  return kMaxKernelRows;
}

bool Eligible(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (kIsa == Isa::kNone || !x.device().is_cpu() || !weight.device().is_cpu() || weight.dim() != 2) return false;
  at::ScalarType t = weight.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) return false;
  if (x.scalar_type() != t || !weight.is_contiguous() || x.size(-1) != weight.size(1) || x.numel() == 0) return false;
  if (bias && bias->defined() && (bias->scalar_type() != t || bias->dim() != 1 || bias->size(0) != weight.size(0))) return false;
  return x.numel() / x.size(-1) <= kMaxKernelRows;
}

bool Decided(const at::Tensor& x, const at::Tensor& weight) {
  int64_t rows = x.numel() / x.size(-1);
  PolicyKey key{weight.size(0), weight.size(1), static_cast<int>(weight.scalar_type()), RowsBucket(rows)};
  std::lock_guard<std::mutex> lock(policy_mutex);
  auto it = Policy().find(key);
  return it != Policy().end() && it->second;
}

}  // namespace

const char* LinearKernelIsa() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kNone: return "none";
  }
  return "none";
}

at::Tensor Blip2LinearKernel(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t k_len = weight.size(1);
  const int64_t n = weight.size(0);
  const int64_t rows = x_in.numel() / k_len;
  at::Tensor x = x_in.reshape({rows, k_len}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Blocks of 16 output rows, spread evenly over the intra-op threads.
  const int64_t blocks = (n + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, (blocks + at::get_num_threads() - 1) / at::get_num_threads());
  auto run = [&](auto* wp) {
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      RunRows(wp, xp, rows, k_len, b0 * 16, std::min(n, b1 * 16), yp, n);
    });
  };
  switch (weight.scalar_type()) {
    case at::kFloat: run(weight.data_ptr<float>()); break;
    case at::kBFloat16: run(weight.data_ptr<at::BFloat16>()); break;
    case at::kHalf: run(weight.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "blip2::linear kernel: unsupported weight dtype ", weight.scalar_type());
  }
  if (bias && bias->defined()) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape = x_in.sizes().vec();
  shape.back() = n;
  return y.to(weight.scalar_type()).view(shape);
}

at::Tensor Blip2Linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (Eligible(x, weight, bias) && Decided(x, weight)) return Blip2LinearKernel(x, weight, bias);
  return at::linear(x, weight, bias);
}

std::vector<LinearDecision> DecideLinearKernels(const std::vector<at::Tensor>& weights, LinearKernelMode mode) {
  std::vector<LinearDecision> decisions;
  if (kIsa == Isa::kNone) return decisions;
  // Group the model's weights by shape and dtype; time a sweep over several of them (as a decode
  // step reads them, mostly from memory rather than cache), up to ~64 MB per sweep.
  std::map<std::tuple<int64_t, int64_t, int>, std::vector<at::Tensor>> groups;
  for (const at::Tensor& w : weights) {
    if (w.dim() != 2 || !w.is_contiguous() || !w.device().is_cpu()) continue;
    at::ScalarType t = w.scalar_type();
    if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) continue;
    auto& group = groups[{w.size(0), w.size(1), static_cast<int>(t)}];
    int64_t bytes = 0;
    for (const auto& g : group) bytes += g.nbytes();
    if (bytes < (int64_t{64} << 20)) group.push_back(w);
  }
  // Up to 4 rows a product is bound by reading the weights: sweep ~64 MB (past the last-level
  // cache). From 16 rows it is bound by arithmetic: a quarter of that bounds the timing's cost.
  auto sweep_of = [](const std::vector<at::Tensor>& group, int64_t rows) {
    const int64_t budget = rows <= 4 ? (int64_t{64} << 20) : (int64_t{16} << 20);
    std::vector<at::Tensor> sweep;
    int64_t bytes = 0;
    for (const at::Tensor& w : group) {
      if (!sweep.empty() && bytes >= budget) break;
      sweep.push_back(w);
      bytes += w.nbytes();
    }
    return sweep;
  };
  using Clock = std::chrono::steady_clock;
  for (auto& [key, all] : groups) {
    for (int64_t rows : kRowBuckets) {
      const std::vector<at::Tensor> group = sweep_of(all, rows);
      const at::Tensor& first = group.front();
      at::Tensor x = at::randn({rows, first.size(1)}).to(first.scalar_type());
      auto sweep = [&](bool kernel) {
        auto start = Clock::now();
        for (const at::Tensor& w : group) {
          at::Tensor y = kernel ? Blip2LinearKernel(x, w, c10::nullopt) : at::linear(x, w);
          (void)y;
        }
        return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
      };
      double plain = 0, kernel = 0;
      if (mode == LinearKernelMode::kAuto) {
        sweep(true);  // first touch of every weight page, and warm-up of both paths
        plain = sweep(false);
        kernel = sweep(true);
      }
      // A path 3x slower than the other needs no more runs (bfloat16 one-row at::linear can take
      // seconds per sweep on real sizes); otherwise the best of three, alternating.
      if (mode == LinearKernelMode::kAuto && plain < 3 * kernel && kernel < 3 * plain) {
        for (int i = 0; i < 2; ++i) {
          plain = std::min(plain, sweep(false));
          kernel = std::min(kernel, sweep(true));
        }
      }
      LinearDecision d;
      std::tie(d.out_features, d.in_features, std::ignore) = key;
      d.dtype = first.scalar_type();
      d.rows = rows;
      d.plain_ms = plain / static_cast<double>(group.size());
      d.kernel_ms = kernel / static_cast<double>(group.size());
      d.use_kernel = mode == LinearKernelMode::kAlways || kernel < plain;
      {
        std::lock_guard<std::mutex> lock(policy_mutex);
        Policy()[{d.out_features, d.in_features, static_cast<int>(d.dtype), rows}] = d.use_kernel;
      }
      decisions.push_back(d);
    }
  }
  return decisions;
}

int UseBlip2Linear(torch::jit::Module& module, const std::string& method) {
  std::shared_ptr<torch::jit::Graph> graph = torch::jit::toGraphFunction(module.get_method(method).function()).graph();
  {
    // Inline() takes callees' optimized graphs, which are only inlined themselves while graph
    // optimisation is on (we run with it off; see executor.cc).
    torch::jit::GraphOptimizerEnabledGuard optimize(true);
    torch::jit::Inline(*graph);
  }
  torch::jit::SubgraphRewriter rewriter;
  rewriter.RegisterRewritePattern(R"IR(
graph(%x, %w, %b):
  %r = aten::linear(%x, %w, %b)
  return (%r))IR",
                                  R"IR(
graph(%x, %w, %b):
  %r = blip2::linear(%x, %w, %b)
  return (%r))IR");
  rewriter.runOnGraph(graph);
  std::string text = graph->toString(false);
  int rewritten = 0;
  for (size_t at = text.find("blip2::linear("); at != std::string::npos; at = text.find("blip2::linear(", at + 1)) ++rewritten;
  return rewritten;
}

}  // namespace blip2

TORCH_LIBRARY(blip2, m) { m.def("linear(Tensor x, Tensor w, Tensor? b=None) -> Tensor"); }

TORCH_LIBRARY_IMPL(blip2, CompositeExplicitAutograd, m) { m.impl("linear", TORCH_FN(blip2::Blip2Linear)); }
