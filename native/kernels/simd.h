// The SIMD pieces blip2's CPU kernels share (linear.cc, attention.cc): which instruction set runs,
// vector loads that widen float32/bfloat16/float16 to float32, and horizontal sums.
#pragma once

#include <immintrin.h>

#include <cstdlib>
#include <string>

#include "core/torch_includes.h"

namespace blip2 {

enum class Isa { kNone, kAvx2, kAvx512 };

// Detected once per process. BLIP2_LINEAR_ISA=avx2 (tests): the AVX2 kernels on an AVX-512 machine.
inline Isa CpuIsa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const char* forced = std::getenv("BLIP2_LINEAR_ISA");
    if (forced && std::string(forced) == "avx2" && avx2) return Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::kAvx512;
    if (avx2) return Isa::kAvx2;
    return Isa::kNone;
  }();
  return isa;
}

// 16 (8) values of W at p as float32 lanes.
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

// The 16 horizontal sums of v[0..15] as the 16 lanes of one vector: a transpose-and-add tree
// (~45 instructions where 16 separate reductions take ~160), which matters once the x rows make
// the kernel arithmetic-bound.
__attribute__((target("avx512f"))) inline __m512 Sum16(const __m512* v) {
  __m512 a[8];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 b[4];  // per 128-bit lane: the lane's partial sums of v[4i..4i+3]
  for (int i = 0; i < 4; ++i) {
    __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
    b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  __m512 d01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  __m512 d23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d01, d23, 0x88), _mm512_shuffle_f32x4(d01, d23, 0xDD));
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

}  // namespace blip2
