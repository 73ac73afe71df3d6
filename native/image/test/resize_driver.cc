// Test driver for pil_resample: resizes raw interleaved 8-bit images named in a manifest, or times
// one resize. Used by check_pil_resample.py; not part of the addon.
//
//   resize_driver batch MANIFEST
//     each line: IN_PATH SRC_W SRC_H CHANNELS DST_W DST_H FILTER PREMULTIPLY(0|1) OUT_PATH
//   resize_driver bench SRC_W SRC_H CHANNELS DST_W DST_H FILTER ITERATIONS
//   resize_driver validate SRC_W SRC_H CHANNELS DST_W DST_H FILTER   (prints the verdict)
//   resize_driver weights IN_SIZE OUT_SIZE FILTER
//     prints, per output sample, "first count" and ROUND_UP(2^30 * weight) for each tap: the
//     double weights as PIL's "I" mode exposes them, which the 8-bit output alone hides.
//
// The driver includes pil_resample.cc itself (and is compiled alone) to reach the weights, which
// the header deliberately does not export.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "../pil_resample.cc"  // NOLINT: see above

using blip2::image::PilFilter;

namespace {

bool ReadFile(const std::string& path, std::vector<uint8_t>* data) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  data->assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  return true;
}

int Batch(const char* manifest) {
  std::ifstream m(manifest);
  if (!m) {
    std::cerr << "cannot open " << manifest << "\n";
    return 2;
  }
  std::string line;
  int done = 0;
  while (std::getline(m, line)) {
    if (line.empty()) continue;
    std::istringstream ls(line);
    std::string in, out;
    int sw, sh, ch, dw, dh, filter, premul;
    if (!(ls >> in >> sw >> sh >> ch >> dw >> dh >> filter >> premul >> out)) {
      std::cerr << "bad manifest line: " << line << "\n";
      return 2;
    }
    std::string error;
    if (!blip2::image::ValidateResizeArgs(sw, sh, ch, dw, dh, static_cast<PilFilter>(filter),
                                          &error)) {
      std::cerr << "invalid case " << line << ": " << error << "\n";
      return 2;
    }
    std::vector<uint8_t> src;
    if (!ReadFile(in, &src) || src.size() != static_cast<size_t>(sw) * sh * ch) {
      std::cerr << "bad input " << in << "\n";
      return 2;
    }
    std::vector<uint8_t> dst(static_cast<size_t>(dw) * dh * ch);
    blip2::image::ResizeU8(src.data(), sw, sh, ch, dw, dh, static_cast<PilFilter>(filter),
                           dst.data(), premul != 0);
    std::ofstream o(out, std::ios::binary);
    o.write(reinterpret_cast<const char*>(dst.data()), static_cast<std::streamsize>(dst.size()));
    if (!o) {
      std::cerr << "cannot write " << out << "\n";
      return 2;
    }
    done++;
  }
  std::cout << done << "\n";
  return 0;
}

int Bench(char** a) {
  const int sw = std::atoi(a[0]), sh = std::atoi(a[1]), ch = std::atoi(a[2]);
  const int dw = std::atoi(a[3]), dh = std::atoi(a[4]), filter = std::atoi(a[5]);
  const int iters = std::atoi(a[6]);
  std::vector<uint8_t> src(static_cast<size_t>(sw) * sh * ch);
  uint32_t s = 12345;  // deterministic noise
  for (auto& v : src) {
    s = s * 1664525u + 1013904223u;
    v = static_cast<uint8_t>(s >> 24);
  }
  std::vector<uint8_t> dst(static_cast<size_t>(dw) * dh * ch);
  std::vector<double> ms;
  for (int i = 0; i < iters; i++) {
    const auto t0 = std::chrono::steady_clock::now();
    blip2::image::ResizeU8(src.data(), sw, sh, ch, dw, dh, static_cast<PilFilter>(filter),
                           dst.data());
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  unsigned sum = 0;
  for (uint8_t v : dst) sum += v;
  std::printf("median_ms %.3f min_ms %.3f checksum %u\n", ms[ms.size() / 2], ms[0], sum);
  return 0;
}

int Validate(char** a) {
  std::string error;
  const bool ok = blip2::image::ValidateResizeArgs(
      std::atoi(a[0]), std::atoi(a[1]), std::atoi(a[2]), std::atoi(a[3]), std::atoi(a[4]),
      static_cast<PilFilter>(std::atoi(a[5])), &error);
  std::cout << (ok ? "ok" : error) << "\n";
  return 0;
}

int Weights(char** a) {
  const int inSize = std::atoi(a[0]), outSize = std::atoi(a[1]), filter = std::atoi(a[2]);
  std::vector<double> w;
  const auto c = blip2::image::PrecomputeCoeffs(
      inSize, outSize, blip2::image::GetFilterDef(static_cast<PilFilter>(filter)), &w);
  for (int xx = 0; xx < outSize; xx++) {
    std::printf("%d %d", c.first[xx], c.count[xx]);
    for (int x = 0; x < c.count[xx]; x++) {
      const double v = w[static_cast<size_t>(xx) * c.ksize + x] * 1073741824.0;
      std::printf(" %d", static_cast<int>(v >= 0.0 ? v + 0.5F : v - 0.5F));  // Pillow ROUND_UP
    }
    std::printf("\n");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "batch" && argc == 3) return Batch(argv[2]);
  if (mode == "bench" && argc == 9) return Bench(argv + 2);
  if (mode == "validate" && argc == 8) return Validate(argv + 2);
  if (mode == "weights" && argc == 5) return Weights(argv + 2);
  std::cerr << "usage: resize_driver batch MANIFEST | bench SW SH C DW DH FILTER ITERS | "
               "validate SW SH C DW DH FILTER | weights IN OUT FILTER\n";
  return 2;
}
