#include "kernels/linear.h"
#include "kernels/rewrite.h"
#include "kernels/simd.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include <torch/library.h>

namespace blip2 {

namespace {

// ---------------------------------------------------------------------------------- kernels
// y[m, o] = sum_k x[m, k] * w[o, k] for o in [o_begin, o_end), four weight rows at a time so
// each x vector load feeds four FMAs; weights are converted to float32 in registers.

// y[m * n + o] (+)= sum_{k < kc} x[m * ld + k] * w[o * ld + k] for M rows of x and o in
// [o_begin, o_end). x and w point at the first k of this block of columns; `ld` is the row stride
// of both; `accumulate` adds to y (the later column blocks of a long row); `bias` (float32, indexed
// by o; non-null only for a row's last column block) is added after the sum. Rows256 the same.
// Prefetch: each 64-byte line of the next group of weight rows is prefetched as the same column of
// the current group is read (one group, R rows, ahead; see LinearPath::kKernelPrefetch).
template <typename W, int M, bool Prefetch>
__attribute__((target("avx512f,avx512bw,fma"))) void Rows512(const W* w, const float* x, int64_t ld, int64_t kc, int64_t o_begin,
                                                               int64_t o_end, float* y, int64_t n, bool accumulate, const float* bias) {
  constexpr int R = M <= 2 ? 8 : 4;  // 8 weight streams in flight read faster where registers allow
  const int64_t k_vec = kc - kc % 16;
  int64_t o = o_begin;
  for (; o + R <= o_end; o += R) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    const W* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = w + (o + r) * ld;
    for (int64_t k = 0; k < k_vec; k += 16) {
      __m512 wv[R];
      if (Prefetch && ((k * int64_t{sizeof(W)}) & 63) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + R * ld + k), _MM_HINT_T0);
      for (int r = 0; r < R; ++r) wv[r] = Load512<W>::At(rows[r] + k);
      for (int m = 0; m < M; ++m) {
        __m512 xv = _mm512_loadu_ps(x + m * ld + k);
        for (int r = 0; r < R; ++r) acc[m * R + r] = _mm512_fmadd_ps(xv, wv[r], acc[m * R + r]);
      }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, Sum16(acc));
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float s = sums[m * R + r];
        for (int64_t k = k_vec; k < kc; ++k) s += x[m * ld + k] * Load512<W>::Scalar(rows[r] + k);
        float& out = y[m * n + o + r];
        out = accumulate ? out + s : s;
        if (bias) out += bias[o + r];
      }
    }
  }
  for (; o < o_end; ++o) {
    const W* row = w + o * ld;
    for (int m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < k_vec; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ld + k), Load512<W>::At(row + k), acc);
      float s = _mm512_reduce_add_ps(acc);
      for (int64_t k = k_vec; k < kc; ++k) s += x[m * ld + k] * Load512<W>::Scalar(row + k);
      float& out = y[m * n + o];
      out = accumulate ? out + s : s;
      if (bias) out += bias[o];
    }
  }
}

template <typename W, int M, bool Prefetch>
__attribute__((target("avx2,fma,f16c"))) void Rows256(const W* w, const float* x, int64_t ld, int64_t kc, int64_t o_begin,
                                                        int64_t o_end, float* y, int64_t n, bool accumulate, const float* bias) {
  constexpr int R = M <= 2 ? 4 : 2;  // 16 ymm registers
  const int64_t k_vec = kc - kc % 8;
  int64_t o = o_begin;
  for (; o + R <= o_end; o += R) {
    __m256 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_vec; k += 8) {
      __m256 wv[R];
      if (Prefetch && ((k * int64_t{sizeof(W)}) & 63) == 0)
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (o + R + r) * ld + k), _MM_HINT_T0);
      for (int r = 0; r < R; ++r) wv[r] = Load256<W>::At(w + (o + r) * ld + k);
      for (int m = 0; m < M; ++m) {
        __m256 xv = _mm256_loadu_ps(x + m * ld + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float s = Sum256(acc[m][r]);
        for (int64_t k = k_vec; k < kc; ++k) s += x[m * ld + k] * static_cast<float>(w[(o + r) * ld + k]);
        float& out = y[m * n + o + r];
        out = accumulate ? out + s : s;
        if (bias) out += bias[o + r];
      }
    }
  }
  for (; o < o_end; ++o) {
    for (int m = 0; m < M; ++m) {
      float s = 0;
      for (int64_t k = 0; k < kc; ++k) s += x[m * ld + k] * static_cast<float>(w[o * ld + k]);
      float& out = y[m * n + o];
      out = accumulate ? out + s : s;
      if (bias) out += bias[o];
    }
  }
}

// More than four x rows on AVX-512: up to 16 rows in one pass over the weights. The 4-row tile
// above reads each weight block from memory in its first pass (bound by bandwidth, a quarter of
// its arithmetic done) and computes the other three passes from L2 (bound by arithmetic), so a
// 16-row product costs about memory time + 3/4 of compute time. Here every weight vector loaded
// feeds all 16 rows (two groups of 8 rows x 3 weight rows: 24 accumulators, 11 loads per 24 FMAs),
// and the weight rows a few rows ahead are prefetched, so the stream from memory overlaps the
// arithmetic. x is packed per column piece into [16][kXPiece] (16 x 1.5 KB stays in L1, and rows
// a power of two apart in memory would share L1 sets); y is accumulated transposed, [o][16], one
// vector per weight row, by Sum16. Measured on 2 Zen 5 cores, the mid model's 73 decode products
// at 16 rows (494 MB of float32 weights): 17.3 against 21.3 ms per step.
constexpr int64_t kXPiece = 384;      // columns per packed x piece (floats)
constexpr int64_t kWideRows = 16;     // x rows per pass
constexpr int64_t kWideBlock = 48;    // weight rows per output block (a multiple of 3 and of 16)
constexpr int kWidePrefetchRows = 6;  // how far ahead (weight rows) the stream is prefetched

// The M x R dot products of x rows [g*M, g*M+M) with weight rows o..o+R-1 over kc columns into
// out[r * 16 + g * M + m] (unreduced accumulators). Prefetch: the weight rows kWidePrefetchRows ahead.
template <typename W, int M, int R, bool Prefetch>
__attribute__((target("avx512f,avx512bw,fma"), always_inline)) inline void WideGroup(const W* w, const float* xg, int64_t ld,
                                                                                    int64_t kc, int64_t o, __m512* out, int g) {
  __m512 acc[M * R];
  for (int i = 0; i < M * R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; k += 16) {
    if (Prefetch && ((k * int64_t{sizeof(W)}) & 63) == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (o + kWidePrefetchRows + r) * ld + k), _MM_HINT_T0);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = Load512<W>::At(w + (o + r) * ld + k);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m512 xv = _mm512_loadu_ps(xg + m * kXPiece + k);
      // Keeps xv in a register: GCC otherwise folds the load into each of the R FMAs (R loads).
      __asm__("" : "+v"(xv));
      for (int r = 0; r < R; ++r) acc[r * M + m] = _mm512_fmadd_ps(xv, wv[r], acc[r * M + m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[r * 16 + g * M + m] = acc[r * M + m];
}

// The 16 row sums of each of the `count` weight rows' accumulators, stored (or added) at yt[r * 16].
__attribute__((target("avx512f"))) inline void WideStore(const __m512* acc, int count, float* yt, bool accumulate) {
  for (int r = 0; r < count; ++r) {
    __m512 s = Sum16(acc + r * 16);
    if (accumulate) s = _mm512_add_ps(s, _mm512_load_ps(yt + r * 16));
    _mm512_store_ps(yt + r * 16, s);
  }
}

// yt[(o - o_begin) * 16 + m] (+)= sum_{k < kc} x[m][k] * w[o][k] for the G * 8 rows of the packed
// piece x ([16][kXPiece], rows beyond the real ones zero) and o in [o_begin, o_end). kc: a
// multiple of 16, at most the piece's columns (RunWideRows adds the last few one by one).
template <typename W, int G>
__attribute__((target("avx512f,avx512bw,fma"))) void WideRows512(const W* w, const float* x, int64_t ld, int64_t kc, int64_t o_begin,
                                                                   int64_t o_end, float* yt, bool accumulate) {
  alignas(64) __m512 acc[3 * 16];
  for (int i = 0; i < 3 * 16; ++i) acc[i] = _mm512_setzero_ps();  // rows of a G == 1 pass stay zero
  int64_t o = o_begin;
  for (; o + 3 <= o_end; o += 3) {
    WideGroup<W, 8, 3, true>(w, x, ld, kc, o, acc, 0);
    if (G == 2) WideGroup<W, 8, 3, false>(w, x + 8 * kXPiece, ld, kc, o, acc, 1);
    WideStore(acc, 3, yt + (o - o_begin) * 16, accumulate);
  }
  for (; o < o_end; ++o) {
    WideGroup<W, 8, 1, false>(w, x, ld, kc, o, acc, 0);
    if (G == 2) WideGroup<W, 8, 1, false>(w, x + 8 * kXPiece, ld, kc, o, acc, 1);
    WideStore(acc, 1, yt + (o - o_begin) * 16, accumulate);
  }
}

// x [rows, k_len] packed for WideRows512: [chunk of 16 rows][piece][16][kXPiece], zero-padded.
at::Tensor PackWide(const float* x, int64_t rows, int64_t k_len) {
  const int64_t chunks = (rows + kWideRows - 1) / kWideRows;
  const int64_t pieces = (k_len + kXPiece - 1) / kXPiece;
  at::Tensor packed = at::zeros({chunks, pieces, kWideRows, kXPiece});
  float* p = packed.data_ptr<float>();
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t c = m / kWideRows, r = m % kWideRows;
    for (int64_t q = 0; q < pieces; ++q) {
      const int64_t k0 = q * kXPiece, kc = std::min(kXPiece, k_len - k0);
      std::memcpy(p + ((c * pieces + q) * kWideRows + r) * kXPiece, x + m * k_len + k0, static_cast<size_t>(kc) * sizeof(float));
    }
  }
  return packed;
}

// y rows [0, rows) for output columns [o_begin, o_end) from the packed x (PackWide), plus the bias.
template <typename W>
void RunWideRows(const W* w, const float* packed, int64_t rows, int64_t k_len, int64_t o_begin, int64_t o_end, float* y, int64_t n,
                 const float* bias) {
  const int64_t pieces = (k_len + kXPiece - 1) / kXPiece;
  alignas(64) float yt[kWideBlock * 16];
  for (int64_t ob = o_begin; ob < o_end; ob += kWideBlock) {
    const int64_t oe = std::min(o_end, ob + kWideBlock);
    for (int64_t c = 0; c * kWideRows < rows; ++c) {
      const int64_t m0 = c * kWideRows, mc = std::min(kWideRows, rows - m0);
      for (int64_t q = 0; q < pieces; ++q) {
        const int64_t k0 = q * kXPiece, kc = std::min(kXPiece, k_len - k0);
        const float* xq = packed + (c * pieces + q) * kWideRows * kXPiece;
        const int64_t kv = kc - kc % 16;
        if (kv > 0) {
          if (mc > 8) WideRows512<W, 2>(w + k0, xq, k_len, kv, ob, oe, yt, q > 0);
          else WideRows512<W, 1>(w + k0, xq, k_len, kv, ob, oe, yt, q > 0);
        } else if (q == 0) {
          std::fill(yt, yt + (oe - ob) * 16, 0.f);
        }
        for (int64_t k = k0 + kv; k < k0 + kc; ++k)  // the columns beyond the last multiple of 16
          for (int64_t o = ob; o < oe; ++o)
            for (int64_t m = 0; m < mc; ++m) yt[(o - ob) * 16 + m] += xq[m * kXPiece + (k - k0)] * Load512<W>::Scalar(w + o * k_len + k);
      }
      for (int64_t m = 0; m < mc; ++m)
        for (int64_t o = ob; o < oe; ++o) y[(m0 + m) * n + o] = bias ? yt[(o - ob) * 16 + m] + bias[o] : yt[(o - ob) * 16 + m];
    }
  }
}

// Up to four x rows per pass over the weights (the register tile), which then stream from memory
// once, sequentially. With more rows the product is blocked like a GEMM: x rows in chunks of
// kRowChunk, columns in equal blocks of at most kColumns, weight rows in blocks of ~128 KB that
// stay in L2 while every group of four x rows of the chunk passes over them.
constexpr int64_t kColumns = 768;
constexpr int64_t kRowChunk = 256;
// From 5 to this many x rows a product hands its output chunks out dynamically (Blip2LinearKernel).
constexpr int64_t kDynamicRows = 64;

// prefetch: software prefetch of the next weight rows (only up to 4 x rows, the pure stream).
template <typename W>
void RunRows(const W* w, const float* x, int64_t rows, int64_t k_len, int64_t o_begin, int64_t o_end, float* y, int64_t n,
             const float* bias, bool prefetch) {
  prefetch = prefetch && rows <= 4;
  auto tile = [&](auto m_const, int64_t m, int64_t k0, int64_t kc, int64_t ob, int64_t oe) {
    constexpr int M = decltype(m_const)::value;
    const float* b = k0 + kc == k_len ? bias : nullptr;
    if (CpuIsa() == Isa::kAvx512) {
      (prefetch ? Rows512<W, M, true> : Rows512<W, M, false>)(w + k0, x + m * k_len + k0, k_len, kc, ob, oe, y + m * n, n, k0 > 0, b);
    } else {
      (prefetch ? Rows256<W, M, true> : Rows256<W, M, false>)(w + k0, x + m * k_len + k0, k_len, kc, ob, oe, y + m * n, n, k0 > 0, b);
    }
  };
  const int64_t pieces = rows <= 4 ? 1 : (k_len + kColumns - 1) / kColumns;
  const int64_t columns = (k_len / pieces + 15) / 16 * 16;
  const int64_t block = rows <= 4 ? o_end - o_begin : std::max<int64_t>(8, (int64_t{128} << 10) / (columns * int64_t{sizeof(W)}) / 8 * 8);
  for (int64_t m0 = 0; m0 < rows; m0 += kRowChunk) {
    const int64_t m1 = std::min(rows, m0 + kRowChunk);
    for (int64_t k0 = 0; k0 < k_len; k0 += columns) {
      const int64_t kc = std::min(columns, k_len - k0);
      for (int64_t ob = o_begin; ob < o_end; ob += block) {
        const int64_t oe = std::min(o_end, ob + block);
        for (int64_t m = m0; m < m1; m += 4) {
          switch (std::min<int64_t>(4, m1 - m)) {
            case 1: tile(std::integral_constant<int, 1>{}, m, k0, kc, ob, oe); break;
            case 2: tile(std::integral_constant<int, 2>{}, m, k0, kc, ob, oe); break;
            case 3: tile(std::integral_constant<int, 3>{}, m, k0, kc, ob, oe); break;
            default: tile(std::integral_constant<int, 4>{}, m, k0, kc, ob, oe); break;
          }
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------------- policy

using PolicyKey = std::tuple<int64_t, int64_t, int, int64_t>;  // out, in, dtype, rows bucket

std::mutex policy_mutex;
// The kernel with and without prefetch give the same bits (the prefetch changes no arithmetic), so
// where the load-time timing picked the kernel for up to 4 rows, its two variants are compared on
// the model's own decode products instead of at load: the load-time sweep reads tens of MB, a
// decode step the whole model (GBs on real sizes), whose page-table walks it does not reproduce
// (measured on 2 Zen 5 cores: a load-time sweep of both chose no prefetch for blip2-opt-2.7b's
// 2560x2560 bfloat16 one-row products, while its decode steps were 4-22% faster with prefetch on
// every such product; timing both at load also took its load from 2.7 to 3.4 s). After a warm-up
// of one product per weight of the shape, calls alternate until each variant has kOnlineTrials
// timed calls, and the faster in total is kept.
constexpr int64_t kOnlineTrials = 16;
struct PolicyEntry {
  LinearPath path = LinearPath::kPlain;
  bool online = false;   // still comparing kKernel and kKernelPrefetch on real calls
  int64_t warmup = 0;    // calls left before timing starts
  int64_t calls[2] = {0, 0};  // timed calls: [0] kernel, [1] kernel with prefetch
  double ms[2] = {0, 0};
};
std::map<PolicyKey, PolicyEntry>& Policy() {
  static auto* policy = new std::map<PolicyKey, PolicyEntry>();  // leaked: used until process exit
  return *policy;
}

int64_t RowsBucket(int64_t rows) {
  for (int64_t bucket : kRowBuckets)
    if (rows <= bucket) return bucket;
  return std::end(kRowBuckets)[-1];
}

bool Eligible(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (!x.device().is_cpu() || !weight.device().is_cpu() || weight.dim() != 2) return false;
  at::ScalarType t = weight.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) return false;
  if (x.scalar_type() != t || !weight.is_contiguous() || x.size(-1) != weight.size(1) || x.numel() == 0) return false;
  return !(bias && bias->defined() && (bias->scalar_type() != t || bias->dim() != 1 || bias->size(0) != weight.size(0)));
}

PolicyKey KeyOf(int64_t out, int64_t in, at::ScalarType dtype, int64_t rows) {
  return {out, in, static_cast<int>(dtype), RowsBucket(rows)};
}

PolicyKey KeyOf(const at::Tensor& x, const at::Tensor& weight) {
  return KeyOf(weight.size(0), weight.size(1), weight.scalar_type(), x.numel() / x.size(-1));
}

// The path for this product; `timed` is set while the call is one of the online comparison's.
LinearPath Decided(const PolicyKey& key, bool* timed) {
  std::lock_guard<std::mutex> lock(policy_mutex);
  auto it = Policy().find(key);
  if (it == Policy().end()) return LinearPath::kPlain;
  PolicyEntry& e = it->second;
  if (!e.online) return e.path;
  if (e.warmup > 0) {
    --e.warmup;
    return e.path;
  }
  *timed = true;
  return e.calls[0] <= e.calls[1] ? LinearPath::kKernel : LinearPath::kKernelPrefetch;
}

void RecordOnline(const PolicyKey& key, LinearPath path, double ms) {
  std::lock_guard<std::mutex> lock(policy_mutex);
  auto it = Policy().find(key);
  if (it == Policy().end() || !it->second.online) return;  // re-decided meanwhile (another load)
  PolicyEntry& e = it->second;
  const int v = path == LinearPath::kKernelPrefetch ? 1 : 0;
  ++e.calls[v];
  e.ms[v] += ms;
  if (e.calls[0] >= kOnlineTrials && e.calls[1] >= kOnlineTrials) {
    e.path = e.ms[1] < e.ms[0] ? LinearPath::kKernelPrefetch : LinearPath::kKernel;
    e.online = false;
  }
}

// oneDNN's matmul as libtorch registers it for its own CPU compiler (mkldnn::_linear_pointwise),
// given the unpacked weight, so there is no second copy of it. Found by name: a libtorch built
// without oneDNN simply lacks it. Called boxed: the op's C++ signature is not public API.
const c10::OperatorHandle* OneDnnLinearOp() {
  static const c10::OperatorHandle* op = []() -> const c10::OperatorHandle* {
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return handle ? new c10::OperatorHandle(*handle) : nullptr;  // leaked: used until process exit
  }();
  return op;
}

}  // namespace

const char* LinearPathName(LinearPath path) {
  switch (path) {
    case LinearPath::kKernel: return "kernel";
    case LinearPath::kKernelPrefetch: return "kernel-prefetch";
    case LinearPath::kOneDnn: return "onednn";
    case LinearPath::kPlain: return "plain";
  }
  return "plain";
}

bool LinearPathFromName(const std::string& name, LinearPath* path) {
  for (LinearPath p : {LinearPath::kPlain, LinearPath::kKernel, LinearPath::kOneDnn, LinearPath::kKernelPrefetch}) {
    if (name == LinearPathName(p)) {
      *path = p;
      return true;
    }
  }
  return false;
}

bool OneDnnLinearAvailable() { return OneDnnLinearOp() != nullptr; }

at::Tensor OneDnnLinear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(OneDnnLinearOp(), "blip2::linear: this libtorch has no mkldnn::_linear_pointwise");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(weight);
  stack.emplace_back(bias && bias->defined() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));  // no fused activation
  stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  OneDnnLinearOp()->callBoxed(&stack);
  return stack.back().toTensor();
}

const char* LinearKernelIsa() {
  switch (CpuIsa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kNone: return "none";
  }
  return "none";
}

at::Tensor Blip2LinearKernel(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool prefetch) {
  const int64_t k_len = weight.size(1);
  const int64_t n = weight.size(0);
  const int64_t rows = x_in.numel() / k_len;
  // float32 operands as they come (every float32 model's products) go in without conversion ops:
  // each is a dispatch (~1 us), and a decode step makes ~70 products.
  const bool as_is = x_in.scalar_type() == at::kFloat && x_in.is_contiguous();
  at::Tensor x = as_is ? x_in : x_in.reshape({rows, k_len}).to(at::kFloat).contiguous();
  std::vector<int64_t> shape = x_in.sizes().vec();
  shape.back() = n;
  const bool float_out = as_is && weight.scalar_type() == at::kFloat;
  at::Tensor y = float_out ? at::empty(shape, x.options()) : at::empty({rows, n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // The bias is added as each output's last column block is stored (after its full sum, as a
  // separate add would: the same bits), saving an op and a pass over y.
  at::Tensor b;
  if (bias && bias->defined())
    b = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  // Blocks of 16 output rows. Up to 4 x rows (a pure stream of the weights) and beyond
  // kDynamicRows (prefill, the image encoder: each thread streams x once): an even split over the
  // intra-op threads. In between (batched decode steps, arithmetic-bound): chunks handed out as
  // threads become free, so a thread the OS takes away for a while (a busy or virtual machine)
  // holds the step back less; the other one takes its chunks. Measured on the mid model's 16-row
  // steps: 41-49 ms against 45-55 static in 3 of 4 alternating runs; for one row the chunks were
  // 3-8% slower, so one row stays static. Chunk bounds are multiples of 16 rows either way, so
  // every output is computed the same way on any thread count.
  const int64_t blocks = (n + 15) / 16;
  const int64_t threads = at::get_num_threads();
  // 5 to kDynamicRows rows on AVX-512: the one-pass wide kernel (from packed x).
  const bool wide = rows > 4 && rows <= kDynamicRows && CpuIsa() == Isa::kAvx512;
  at::Tensor packed = wide ? PackWide(xp, rows, k_len) : at::Tensor();
  const float* pp = wide ? packed.data_ptr<float>() : nullptr;
  auto run = [&](auto* wp) {
    auto range = [&](int64_t o0, int64_t o1) {
      if (wide) RunWideRows(wp, pp, rows, k_len, o0, o1, yp, n, bp);
      else RunRows(wp, xp, rows, k_len, o0, o1, yp, n, bp, prefetch);
    };
    if (rows <= 4 || rows > kDynamicRows || threads < 2 || blocks < 4 * threads) {
      const int64_t grain = std::max<int64_t>(1, (blocks + threads - 1) / threads);
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) { range(b0 * 16, std::min(n, b1 * 16)); });
      return;
    }
    // ~8 chunks per thread; at least 4 blocks (64 weight rows) so the blocked path beyond 4 x
    // rows keeps an L2-sized weight block.
    const int64_t chunk = std::max<int64_t>(4, blocks / (threads * 8));
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t b0 = next.fetch_add(chunk); b0 < blocks; b0 = next.fetch_add(chunk))
        range(b0 * 16, std::min(n, std::min(blocks, b0 + chunk) * 16));
    });
  };
  switch (weight.scalar_type()) {
    case at::kFloat: run(weight.data_ptr<float>()); break;
    case at::kBFloat16: run(weight.data_ptr<at::BFloat16>()); break;
    case at::kHalf: run(weight.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "blip2::linear kernel: unsupported weight dtype ", weight.scalar_type());
  }
  if (float_out) return y;
  return y.to(weight.scalar_type()).view(shape);
}

at::Tensor LinearOnPath(LinearPath path, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  switch (path) {
    case LinearPath::kKernel: return Blip2LinearKernel(x, weight, bias);
    case LinearPath::kKernelPrefetch: return Blip2LinearKernel(x, weight, bias, /*prefetch=*/true);
    case LinearPath::kOneDnn: return OneDnnLinear(x, weight, bias);
    case LinearPath::kPlain: break;
  }
  return at::linear(x, weight, bias);
}

at::Tensor Blip2Linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (!Eligible(x, weight, bias)) return at::linear(x, weight, bias);
  const PolicyKey key = KeyOf(x, weight);
  bool timed = false;
  const LinearPath path = Decided(key, &timed);
  if (!timed) return LinearOnPath(path, x, weight, bias);
  const auto start = std::chrono::steady_clock::now();
  at::Tensor y = LinearOnPath(path, x, weight, bias);
  RecordOnline(key, path, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  return y;
}

std::vector<LinearDecision> DecideLinearKernels(const std::vector<at::Tensor>& weights, LinearKernelMode mode) {
  std::vector<LinearDecision> decisions;
  if (CpuIsa() == Isa::kNone && !OneDnnLinearAvailable()) return decisions;
  // Group the model's weights by shape and dtype; time a sweep over several of them (as a decode
  // step reads them, mostly from memory rather than cache).
  std::map<std::tuple<int64_t, int64_t, int>, std::vector<at::Tensor>> groups;
  for (const at::Tensor& w : weights) {
    if (w.dim() != 2 || !w.is_contiguous() || !w.device().is_cpu()) continue;
    at::ScalarType t = w.scalar_type();
    if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) continue;
    groups[{w.size(0), w.size(1), static_cast<int>(t)}].push_back(w);
  }
  // Up to 4 rows a product is bound by reading the weights: sweep ~64 MB at one row, past the
  // last-level cache. With more rows it is bound by arithmetic, and smaller sweeps bound the
  // timing's cost at load. A matrix larger than the sweep (an LM head) is timed on its first
  // output rows, a contiguous [rows, in] matrix of its own, and the time scaled to the whole.
  struct Sweep {
    std::vector<at::Tensor> weights;
    double scale = 1;  // full products per timed product
  };
  auto sweep_of = [](const std::vector<at::Tensor>& group, int64_t rows) {
    const int64_t budget = (rows <= 1 ? int64_t{64} : rows <= 4 ? int64_t{32} : rows <= 64 ? int64_t{8} : int64_t{2}) << 20;
    Sweep sweep;
    int64_t bytes = 0;
    for (const at::Tensor& w : group) {
      if (!sweep.weights.empty() && bytes >= budget) break;
      if (sweep.weights.empty() && w.nbytes() > static_cast<size_t>(budget)) {
        const int64_t row_bytes = w.size(1) * static_cast<int64_t>(w.element_size());
        const int64_t out = std::min<int64_t>(w.size(0), std::max<int64_t>(64, budget / row_bytes / 16 * 16));
        sweep.weights.push_back(w.narrow(0, 0, out));
        sweep.scale = static_cast<double>(w.size(0)) / static_cast<double>(out);
        break;
      }
      sweep.weights.push_back(w);
      bytes += w.nbytes();
    }
    return sweep;
  };
  using Clock = std::chrono::steady_clock;
  constexpr int kPaths = 3;  // indexed by LinearPath (kKernelPrefetch is compared online)
  for (auto& [key, all] : groups) {
    for (int64_t rows : kRowBuckets) {
      const Sweep timed = sweep_of(all, rows);
      const std::vector<at::Tensor>& group = timed.weights;
      const at::Tensor& first = group.front();
      at::Tensor x = at::randn({rows, first.size(1)}).to(first.scalar_type());
      auto sweep = [&](LinearPath path) {
        auto start = Clock::now();
        for (const at::Tensor& w : group) (void)LinearOnPath(path, x, w, c10::nullopt);
        return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
      };
      // Which paths run here: the kernel needs AVX2; oneDNN may lack the ISA a dtype needs (it
      // throws then, e.g. float16 without AVX512-FP16 on some builds), found on its first call.
      bool runs[kPaths] = {true, CpuIsa() != Isa::kNone, OneDnnLinearAvailable()};
      if (mode == LinearKernelMode::kAuto || mode == LinearKernelMode::kOneDnn) {
        if (runs[2]) {
          try {
            (void)OneDnnLinear(x, first, c10::nullopt);  // oneDNN's first-call set-up (its primitive)
          } catch (const std::exception&) {
            runs[2] = false;
          }
        }
      }
      double ms[kPaths] = {0, 0, 0};
      if (mode == LinearKernelMode::kAuto) {
        if (runs[1]) sweep(LinearPath::kKernel);  // first touch of every weight page, and the kernel's warm-up
        (void)at::linear(x, first);  // libtorch's (MKL's, oneDNN's) first-call set-up
        for (int p = 0; p < kPaths; ++p)
          if (runs[p]) ms[p] = sweep(static_cast<LinearPath>(p));
        // The best of three, alternating, for every path whose sweep was cheap (under 20 ms: one
        // preempted sweep must not decide) or within 2x of the best; a path slower than that
        // needs no more runs (bfloat16 one-row at::linear can take seconds per sweep on real sizes).
        for (int i = 0; i < 2; ++i) {
          double best = 0;
          for (int p = 0; p < kPaths; ++p)
            if (runs[p] && (best == 0 || ms[p] < best)) best = ms[p];
          bool again[kPaths];
          int count = 0;
          for (int p = 0; p < kPaths; ++p) count += again[p] = runs[p] && (ms[p] < 2 * best || ms[p] < 20.0);
          if (count < 2) break;
          for (int p = 0; p < kPaths; ++p)
            if (again[p]) ms[p] = std::min(ms[p], sweep(static_cast<LinearPath>(p)));
        }
      }
      LinearDecision d;
      std::tie(d.out_features, d.in_features, std::ignore) = key;
      d.dtype = first.scalar_type();
      d.rows = rows;
      auto per_product = [&](int p) { return runs[p] ? ms[p] * timed.scale / static_cast<double>(group.size()) : 0.0; };
      d.plain_ms = per_product(0);
      d.kernel_ms = per_product(1);
      d.onednn_ms = per_product(2);
      if (mode == LinearKernelMode::kAlways) {
        d.path = runs[1] ? LinearPath::kKernel : LinearPath::kPlain;
      } else if (mode == LinearKernelMode::kOneDnn) {
        d.path = runs[2] ? LinearPath::kOneDnn : LinearPath::kPlain;
      } else {
        for (int p = 1; p < kPaths; ++p)
          if (runs[p] && ms[p] < ms[static_cast<int>(d.path)]) d.path = static_cast<LinearPath>(p);
      }
      {
        std::lock_guard<std::mutex> lock(policy_mutex);
        PolicyEntry& e = Policy()[KeyOf(d.out_features, d.in_features, d.dtype, rows)];
        e = PolicyEntry{};
        e.path = d.path;
        e.online = mode == LinearKernelMode::kAuto && rows <= 4 && d.path == LinearPath::kKernel;
        e.warmup = static_cast<int64_t>(all.size());
      }
      decisions.push_back(d);
    }
  }
  return decisions;
}

LinearPath CurrentLinearPath(const LinearDecision& d) {
  std::lock_guard<std::mutex> lock(policy_mutex);
  auto it = Policy().find(KeyOf(d.out_features, d.in_features, d.dtype, d.rows));
  // The policy is per shape, process-wide: a later load of another model of the same shapes (or in
  // a forced mode) re-decides it; only the online choice between the kernel's variants is reported.
  if (it == Policy().end() || d.path != LinearPath::kKernel) return d.path;
  return it->second.path == LinearPath::kKernelPrefetch ? LinearPath::kKernelPrefetch : d.path;
}

int UseBlip2Linear(torch::jit::Module& module, const std::string& method) {
  return RewriteOperator(module, method, "aten::linear", "blip2::linear", 3);
}

}  // namespace blip2

TORCH_LIBRARY(blip2, m) { m.def("linear(Tensor x, Tensor w, Tensor? b=None) -> Tensor"); }

TORCH_LIBRARY_IMPL(blip2, CompositeExplicitAutograd, m) { m.impl("linear", TORCH_FN(blip2::Blip2Linear)); }
