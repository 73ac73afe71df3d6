// Bit-exact port of Pillow 9.4's 8-bit resize path. Each piece names the Pillow function it
// mirrors (src/libImaging/Resample.c, Geometry.c, Convert.c, src/_imaging.c, PIL/Image.py); the
// arithmetic follows Pillow's operation for operation because any deviation (a different rounding
// of a coefficient, a reordered float expression) changes output bytes.
#include "pil_resample.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace blip2::image {
namespace {

// --- Coefficients (Resample.c: *_filter, precompute_coeffs, normalize_coeffs_8bpc) ---------------
//
// Pillow's x86-64 build evaluates these doubles without fused multiply-add. A compiler that
// contracts a*b+c into an FMA (GCC's default -ffp-contract=fast once -mfma/-march allows it,
// clang's default "on") rounds some weights differently in the last bit, which can tip a rounding
// decision, so contraction is switched off for this section only.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

constexpr double kPi = 3.14159265358979323846;  // M_PI, which <cmath> does not promise

double BoxFilter(double x) {
  if (x > -0.5 && x <= 0.5) return 1.0;
  return 0.0;
}

double BilinearFilter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

double HammingFilter(double x) {
  if (x < 0.0) x = -x;
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * kPi;
  // The float literals are Pillow's: 0.54f and 0.46f are not 0.54 and 0.46 as doubles.
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));
}

double BicubicFilter(double x) {
  constexpr double a = -0.5;  // Pillow's Keys cubic parameter
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double SincFilter(double x) {
  if (x == 0.0) return 1.0;
  x = x * kPi;
  return std::sin(x) / x;
}

double LanczosFilter(double x) {
  // Truncated sinc, a = 3.
  if (-3.0 <= x && x < 3.0) return SincFilter(x) * SincFilter(x / 3);
  return 0.0;
}

struct FilterDef {
  double (*fn)(double);
  double support;
};

FilterDef GetFilterDef(PilFilter filter) {
  switch (filter) {
    case PilFilter::Box: return {BoxFilter, 0.5};
    case PilFilter::Bilinear: return {BilinearFilter, 1.0};
    case PilFilter::Hamming: return {HammingFilter, 1.0};
    case PilFilter::Bicubic: return {BicubicFilter, 2.0};
    case PilFilter::Lanczos: return {LanczosFilter, 3.0};
    case PilFilter::Nearest: break;  // never resampled with weights (see ScaleNearest)
  }
  return {BoxFilter, 0.5};
}

// 8-bit results in 32-bit accumulators: filters have negative lobes, so sums can leave [0, 1] and
// two extra bits keep them in range (Resample.c PRECISION_BITS).
constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr int32_t kHalf = int32_t{1} << (kPrecisionBits - 1);  // rounding start value of each sum

// Integer weights for one axis: output i reads `count[i]` inputs starting at `first[i]` with the
// weights k[i * ksize .. i * ksize + count[i]).
struct Coeffs {
  int ksize = 0;
  std::vector<int> first;
  std::vector<int> count;
  std::vector<int32_t> k;
};

// precompute_coeffs() followed by normalize_coeffs_8bpc(), for box = (0, inSize) as Image.resize
// passes it when box=None. `weights`, when given, receives the normalised double weights (what
// Pillow's 32-bit modes use), which lets the test compare them with PIL's "I" mode.
Coeffs PrecomputeCoeffs(int inSize, int outSize, const FilterDef& filter,
                        std::vector<double>* weights = nullptr) {
  // Pillow receives the box as C floats: in1 - in0 is a float, so sizes above 2^24 round here.
  const double in0 = 0.0;
  const float in1 = static_cast<float>(inSize);
  const double scale = static_cast<double>(in1 - 0.0f) / outSize;
  const double filterscale = scale < 1.0 ? 1.0 : scale;  // widen the kernel only when shrinking
  const double support = filter.support * filterscale;
  const int ksize = static_cast<int>(std::ceil(support)) * 2 + 1;

  Coeffs c;
  c.ksize = ksize;
  c.first.resize(outSize);
  c.count.resize(outSize);
  c.k.assign(static_cast<size_t>(outSize) * ksize, 0);  // taps past count stay 0, as in Pillow
  std::vector<double> w(ksize);
  if (weights != nullptr) weights->assign(static_cast<size_t>(outSize) * ksize, 0.0);

  for (int xx = 0; xx < outSize; xx++) {
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    const double ss = 1.0 / filterscale;
    // "+ 0.5" then truncation toward zero is Pillow's rounding; negative values truncate up to 0
    // and are clamped anyway.
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    for (int x = 0; x < xmax; x++) {
      const double v = filter.fn((x + xmin - center + 0.5) * ss);
      w[x] = v;
      ww += v;
    }
    // Pillow divides (not multiplies by 1/ww) and leaves all-zero windows unnormalised.
    for (int x = 0; x < xmax; x++) {
      if (ww != 0.0) w[x] /= ww;
    }
    if (weights != nullptr) {
      std::copy(w.begin(), w.begin() + xmax, weights->begin() + static_cast<size_t>(xx) * ksize);
    }
    int32_t* k = &c.k[static_cast<size_t>(xx) * ksize];
    for (int x = 0; x < xmax; x++) {
      // normalize_coeffs_8bpc: round half away from zero to PRECISION_BITS fixed point.
      const double p = w[x];
      k[x] = p < 0 ? static_cast<int32_t>(-0.5 + p * (1 << kPrecisionBits))
                   : static_cast<int32_t>(0.5 + p * (1 << kPrecisionBits));
    }
    c.first[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

#if defined(__clang__)
#pragma STDC FP_CONTRACT DEFAULT
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

// --- Passes (Resample.c: clip8, ImagingResampleHorizontal_8bpc / Vertical_8bpc) ----------------

// Pillow's clip8 looks up (v >> PRECISION_BITS) in a table that is 0 below 0 and 255 above 255.
inline uint8_t Clip8(int32_t v) {
  const int32_t s = v >> kPrecisionBits;  // arithmetic shift, as Pillow relies on
  return static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

// The passes below produce exactly Pillow's integer sums, only in another order: the sums are
// exact (no overflow: the weights' absolute values add up to far less than 2^31 / 255 / 2^22),
// so order does not matter. The order is chosen so the inner loops run over a compile-time number
// of contiguous samples, which compilers vectorise even at GCC's -O2 (checked with GCC 12).

// Horizontal pass over `rows` source rows starting at `rowFirst` (ImagingResampleHorizontal_8bpc).
// Channels are independent in Pillow (RGB is stored as RGBX, LA as L..A), so each channel gets its
// own sum. Blocks of kBlockRows rows are transposed to column-major first so that one output pixel
// of all rows in the block is a single fixed-length multiply-accumulate per tap.
constexpr int kBlockRows = 16;

template <int C>
void HorizontalPass(const uint8_t* src, int srcWidth, int rowFirst, int rows, const Coeffs& cx,
                    int dstWidth, uint8_t* out) {
  constexpr int kLanes = kBlockRows * C;  // one block column: kBlockRows pixels of C channels
  const size_t srcStride = static_cast<size_t>(srcWidth) * C;
  const size_t dstStride = static_cast<size_t>(dstWidth) * C;
  // Only the columns some output reads: [colFirst, colLast).
  const int colFirst = cx.first[0];
  const int colLast = cx.first[dstWidth - 1] + cx.count[dstWidth - 1];
  std::vector<uint8_t> block(static_cast<size_t>(colLast - colFirst) * kLanes, 0);

  for (int r0 = 0; r0 < rows; r0 += kBlockRows) {
    const int blockRows = std::min(kBlockRows, rows - r0);
    // Rows past blockRows keep stale bytes in the last block; their sums are discarded.
    for (int r = 0; r < blockRows; r++) {
      const uint8_t* s = src + static_cast<size_t>(rowFirst + r0 + r) * srcStride +
                         static_cast<size_t>(colFirst) * C;
      uint8_t* t = block.data() + r * C;
      for (int x = 0; x < colLast - colFirst; x++) {
        for (int c = 0; c < C; c++) {
          t[static_cast<size_t>(x) * kLanes + c] = s[static_cast<size_t>(x) * C + c];
        }
      }
    }
    for (int xx = 0; xx < dstWidth; xx++) {
      const uint8_t* col = block.data() + static_cast<size_t>(cx.first[xx] - colFirst) * kLanes;
      const int32_t* k = &cx.k[static_cast<size_t>(xx) * cx.ksize];
      const int n = cx.count[xx];
      int32_t acc[kLanes];
      for (int j = 0; j < kLanes; j++) acc[j] = kHalf;
      for (int x = 0; x < n; x++) {
        const int32_t kv = k[x];
        const uint8_t* v = col + static_cast<size_t>(x) * kLanes;
        for (int j = 0; j < kLanes; j++) acc[j] += static_cast<int32_t>(v[j]) * kv;
      }
      uint8_t* o = out + static_cast<size_t>(r0) * dstStride + static_cast<size_t>(xx) * C;
      for (int r = 0; r < blockRows; r++) {
        for (int c = 0; c < C; c++) {
          o[static_cast<size_t>(r) * dstStride + c] = Clip8(acc[r * C + c]);
        }
      }
    }
  }
}

void HorizontalPassAny(int channels, const uint8_t* src, int srcWidth, int rowFirst, int rows,
                       const Coeffs& cx, int dstWidth, uint8_t* out) {
  switch (channels) {
    case 1: HorizontalPass<1>(src, srcWidth, rowFirst, rows, cx, dstWidth, out); break;
    case 2: HorizontalPass<2>(src, srcWidth, rowFirst, rows, cx, dstWidth, out); break;
    case 3: HorizontalPass<3>(src, srcWidth, rowFirst, rows, cx, dstWidth, out); break;
    default: HorizontalPass<4>(src, srcWidth, rowFirst, rows, cx, dstWidth, out); break;
  }
}

// One output row of the vertical pass (ImagingResampleVertical_8bpc) over `width` samples starting
// at column offset `i0`; N is a compile-time width so the loops vectorise, 0 means runtime width.
template <int N>
void VerticalSpan(const uint8_t* base, size_t rowElems, size_t i0, int width, const int32_t* k,
                  int n, uint8_t* o) {
  const int w = N > 0 ? N : width;
  int32_t acc[N > 0 ? N : 64];
  for (int j = 0; j < w; j++) acc[j] = kHalf;
  for (int y = 0; y < n; y++) {
    const uint8_t* r = base + static_cast<size_t>(y) * rowElems + i0;
    const int32_t kv = k[y];
    for (int j = 0; j < w; j++) acc[j] += static_cast<int32_t>(r[j]) * kv;
  }
  for (int j = 0; j < w; j++) o[i0 + j] = Clip8(acc[j]);
}

// Vertical pass: channels are independent, so a row is just rowElems samples, processed in spans
// of 64 with all taps accumulated per span.
void VerticalPass(const uint8_t* in, size_t rowElems, const Coeffs& cy, int dstHeight,
                  uint8_t* out) {
  constexpr int kSpan = 64;
  for (int yy = 0; yy < dstHeight; yy++) {
    const int32_t* k = &cy.k[static_cast<size_t>(yy) * cy.ksize];
    const int n = cy.count[yy];
    const uint8_t* base = in + static_cast<size_t>(cy.first[yy]) * rowElems;
    uint8_t* o = out + static_cast<size_t>(yy) * rowElems;
    size_t i0 = 0;
    for (; i0 + kSpan <= rowElems; i0 += kSpan) {
      VerticalSpan<kSpan>(base, rowElems, i0, kSpan, k, n, o);
    }
    if (i0 < rowElems) {
      VerticalSpan<0>(base, rowElems, i0, static_cast<int>(rowElems - i0), k, n, o);
    }
  }
}

// ImagingResampleInner: vertical coefficients first (they say which source rows matter), then a
// horizontal pass over only those rows, then the vertical pass; a pass is skipped when its
// dimension does not change.
void ResampleWeighted(const uint8_t* src, int srcWidth, int srcHeight, int channels, int dstWidth,
                      int dstHeight, const FilterDef& filter, uint8_t* dst) {
  const bool needHorizontal = dstWidth != srcWidth;
  const bool needVertical = dstHeight != srcHeight;

  Coeffs cy = PrecomputeCoeffs(srcHeight, dstHeight, filter);
  const int rowFirst = cy.first[0];
  const int rowLast = cy.first[dstHeight - 1] + cy.count[dstHeight - 1];

  const uint8_t* in = src;
  std::vector<uint8_t> temp;
  if (needHorizontal) {
    const Coeffs cx = PrecomputeCoeffs(srcWidth, dstWidth, filter);
    for (int i = 0; i < dstHeight; i++) cy.first[i] -= rowFirst;
    const int rows = rowLast - rowFirst;
    if (!needVertical) {
      // Pillow returns the horizontal result itself. With an unchanged height the vertical bounds
      // cover every row (xmin of the first output is 0, xmax of the last is clamped to srcHeight),
      // so rows == dstHeight and the pass can write straight into dst.
      HorizontalPassAny(channels, src, srcWidth, rowFirst, rows, cx, dstWidth, dst);
      return;
    }
    temp.resize(static_cast<size_t>(dstWidth) * rows * channels);
    HorizontalPassAny(channels, src, srcWidth, rowFirst, rows, cx, dstWidth, temp.data());
    in = temp.data();
  }
  // Here needVertical holds: ResizeU8 handled the unchanged-size case before calling us.
  VerticalPass(in, static_cast<size_t>(dstWidth) * channels, cy, dstHeight, dst);
}

// --- NEAREST (_imaging.c _resize -> Geometry.c ImagingTransformAffine -> ImagingScaleAffine) ----
//
// Pillow maps NEAREST to an affine scale with a[0] = in/out, stepping the source coordinate by
// repeated double addition; the accumulated rounding decides which pixel is picked, so the
// accumulation is reproduced rather than computing (x + 0.5) * a[0] directly.
inline int Coord(double v) { return v < 0.0 ? -1 : static_cast<int>(v); }  // Geometry.c COORD

void ScaleNearest(const uint8_t* src, int srcWidth, int srcHeight, int channels, int dstWidth,
                  int dstHeight, uint8_t* dst) {
  // The box arrives as floats; (double)(box[2] - box[0]) / xsize.
  const double a0 = static_cast<double>(static_cast<float>(srcWidth)) / dstWidth;
  const double a4 = static_cast<double>(static_cast<float>(srcHeight)) / dstHeight;
  double xo = 0.0 + a0 * 0.5;
  double yo = 0.0 + a4 * 0.5;

  // Pretabulated columns. Pillow's table is calloc'ed, so a column inside [xmin, xmax) whose
  // source fell outside the image would read column 0; out-of-range edges stay 0 (fill=1).
  std::vector<int> xintab(dstWidth, 0);
  int xmin = dstWidth;
  int xmax = 0;
  for (int x = 0; x < dstWidth; x++) {
    const int xin = Coord(xo);
    if (xin >= 0 && xin < srcWidth) {
      xmax = x + 1;
      if (x < xmin) xmin = x;
      xintab[x] = xin;
    }
    xo += a0;
  }

  const size_t srcStride = static_cast<size_t>(srcWidth) * channels;
  const size_t dstStride = static_cast<size_t>(dstWidth) * channels;
  for (int y = 0; y < dstHeight; y++) {
    const int yi = Coord(yo);
    uint8_t* out = dst + static_cast<size_t>(y) * dstStride;
    std::memset(out, 0, dstStride);
    if (yi >= 0 && yi < srcHeight) {
      const uint8_t* row = src + static_cast<size_t>(yi) * srcStride;
      for (int x = xmin; x < xmax; x++) {
        std::memcpy(out + static_cast<size_t>(x) * channels,
                    row + static_cast<size_t>(xintab[x]) * channels, channels);
      }
    }
    yo += a4;
  }
}

// --- Alpha (Image.resize's LA/RGBA -> La/RGBa round trip; Convert.c rgbA2rgba, rgba2rgbA, ------
// lA2la, la2lA) ---------------------------------------------------------------------------------

// Convert.c MULDIV255: a * b / 255 rounded, with Pillow's shift trick.
inline uint8_t MulDiv255(unsigned a, unsigned b) {
  const unsigned tmp = a * b + 128;
  return static_cast<uint8_t>(((tmp >> 8) + tmp) >> 8);
}

void Premultiply(const uint8_t* src, size_t pixels, int channels, uint8_t* out) {
  const int colors = channels - 1;
  for (size_t i = 0; i < pixels; i++) {
    const uint8_t* p = src + i * channels;
    uint8_t* o = out + i * channels;
    const unsigned alpha = p[colors];
    for (int c = 0; c < colors; c++) o[c] = MulDiv255(p[c], alpha);
    o[colors] = static_cast<uint8_t>(alpha);
  }
}

void Unpremultiply(uint8_t* data, size_t pixels, int channels) {
  const int colors = channels - 1;
  for (size_t i = 0; i < pixels; i++) {
    uint8_t* p = data + i * channels;
    const unsigned alpha = p[colors];
    if (alpha == 255 || alpha == 0) continue;  // Pillow keeps the stored colour as is
    for (int c = 0; c < colors; c++) {
      // CLIP8: resampling can leave colour above alpha (negative lobes), so clamp to 255.
      const unsigned v = (255u * p[c]) / alpha;
      p[c] = static_cast<uint8_t>(v > 255 ? 255 : v);
    }
  }
}

// Resize without the alpha round trip (Image.resize on L, RGB, La, RGBa).
void ResizeChannels(const uint8_t* src, int srcWidth, int srcHeight, int channels, int dstWidth,
                    int dstHeight, PilFilter filter, uint8_t* dst) {
  if (filter == PilFilter::Nearest) {
    ScaleNearest(src, srcWidth, srcHeight, channels, dstWidth, dstHeight, dst);
  } else {
    ResampleWeighted(src, srcWidth, srcHeight, channels, dstWidth, dstHeight,
                     GetFilterDef(filter), dst);
  }
}

bool MulFits(size_t a, size_t b, size_t limit, size_t* out) {
  if (a != 0 && b > limit / a) return false;
  *out = a * b;
  return true;
}

// Pillow passes sizes to precompute_coeffs as float box coordinates and computes bounds in int;
// keeping every dimension within 2^24 keeps those exact and all of our int index maths (bounds up
// to 4x a dimension) far from overflow. Real images are orders of magnitude smaller.
constexpr int kMaxDimension = 1 << 24;

std::string ArgError(const char* name, long long value, const char* expected) {
  return std::string("argument '") + name + "' is " + std::to_string(value) + "; expected " +
         expected;
}

}  // namespace

bool PilFilterFromInt(int value, PilFilter* filter) {
  if (value < 0 || value > 5) return false;
  *filter = static_cast<PilFilter>(value);
  return true;
}

const char* PilFilterName(PilFilter filter) {
  switch (filter) {
    case PilFilter::Nearest: return "nearest";
    case PilFilter::Lanczos: return "lanczos";
    case PilFilter::Bilinear: return "bilinear";
    case PilFilter::Bicubic: return "bicubic";
    case PilFilter::Box: return "box";
    case PilFilter::Hamming: return "hamming";
  }
  return "unknown";
}

bool ValidateResizeArgs(int srcWidth, int srcHeight, int channels, int dstWidth, int dstHeight,
                        PilFilter filter, std::string* error) {
  std::string message;
  const struct {
    const char* name;
    int value;
  } sizes[] = {{"srcWidth", srcWidth}, {"srcHeight", srcHeight}, {"dstWidth", dstWidth},
               {"dstHeight", dstHeight}};
  for (const auto& s : sizes) {
    if (s.value < 1 || s.value > kMaxDimension) {
      message = ArgError(s.name, s.value, "an integer between 1 and 16777216");
      break;
    }
  }
  if (message.empty() && (channels < 1 || channels > 4)) {
    message = ArgError("channels", channels, "1, 2, 3 or 4");
  }
  if (message.empty() && (static_cast<int>(filter) < 0 || static_cast<int>(filter) > 5)) {
    message = ArgError("filter", static_cast<int>(filter),
                       "a PIL resample filter 0..5 (nearest, lanczos, bilinear, bicubic, box, "
                       "hamming)");
  }
  if (message.empty()) {
    // Byte counts of the source, the destination and the horizontal pass's intermediate image
    // (dstWidth x up to srcHeight), plus the vertical pass's int32 accumulator row.
    const size_t limit = static_cast<size_t>(std::numeric_limits<std::ptrdiff_t>::max());
    const struct {
      const char* what;
      int w, h;
    } images[] = {{"source", srcWidth, srcHeight},
                  {"destination", dstWidth, dstHeight},
                  {"intermediate", dstWidth, srcHeight}};
    for (const auto& im : images) {
      size_t pixels = 0, bytes = 0;
      if (!MulFits(static_cast<size_t>(im.w), static_cast<size_t>(im.h), limit, &pixels) ||
          !MulFits(pixels, static_cast<size_t>(channels), limit / sizeof(int32_t), &bytes)) {
        message = std::string(im.what) + " image " + std::to_string(im.w) + "x" +
                  std::to_string(im.h) + " with " + std::to_string(channels) +
                  " channels is too large to address";
        break;
      }
    }
  }
  if (message.empty()) return true;
  if (error != nullptr) *error = std::move(message);
  return false;
}

void ResizeU8(const uint8_t* src, int srcWidth, int srcHeight, int channels, int dstWidth,
              int dstHeight, PilFilter filter, uint8_t* dst, bool premultiplyAlphaLikePil) {
  if (!ValidateResizeArgs(srcWidth, srcHeight, channels, dstWidth, dstHeight, filter, nullptr)) {
    return;
  }
  const size_t srcBytes = static_cast<size_t>(srcWidth) * srcHeight * channels;

  // Image.resize: same size and default box -> self.copy(), before any mode conversion.
  if (srcWidth == dstWidth && srcHeight == dstHeight) {
    std::memcpy(dst, src, srcBytes);
    return;
  }

  // Image.resize: LA/RGBA with any filter but NEAREST go through premultiplied La/RGBa.
  const bool alphaRoundTrip = premultiplyAlphaLikePil && (channels == 2 || channels == 4) &&
                              filter != PilFilter::Nearest;
  if (!alphaRoundTrip) {
    ResizeChannels(src, srcWidth, srcHeight, channels, dstWidth, dstHeight, filter, dst);
    return;
  }
  std::vector<uint8_t> premultiplied(srcBytes);
  Premultiply(src, static_cast<size_t>(srcWidth) * srcHeight, channels, premultiplied.data());
  ResizeChannels(premultiplied.data(), srcWidth, srcHeight, channels, dstWidth, dstHeight, filter,
                 dst);
  Unpremultiply(dst, static_cast<size_t>(dstWidth) * dstHeight, channels);
}

}  // namespace blip2::image
