#include "image/preprocess.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/async.h"
#include "core/cancel_token.h"
#include "core/dtype.h"
#include "core/device_transfer.h"
#include "core/errors.h"
#include "core/stats.h"
#include "core/tensor.h"
#include "image/cpu_pool.h"

namespace blip2::image {

void ToRgb(const uint8_t* src, int64_t pixels, int channels, uint8_t* dst, const ColourOptions& colour) {
  if (channels == 4 && colour.cmyk) {
    // PIL 9.4 Convert.c cmyk2rgb: nk = 255 - k; out = CLIP8(nk - MULDIV255(c, nk)).
    for (int64_t i = 0; i < pixels; ++i, dst += 3, src += 4) {
      const int nk = 255 - src[3];
      for (int c = 0; c < 3; ++c) {
        const int t = src[c] * nk + 128;
        const int v = nk - (((t >> 8) + t) >> 8);
        dst[c] = static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
      }
    }
    return;
  }
  if (channels == 4 && colour.fillTransparent) {
    for (int64_t i = 0; i < pixels; ++i, dst += 3, src += 4) {
      const uint8_t* rgb = src[3] == 0 ? colour.fill : src;
      dst[0] = rgb[0];
      dst[1] = rgb[1];
      dst[2] = rgb[2];
    }
    return;
  }
  switch (channels) {
    case 1:
      for (int64_t i = 0; i < pixels; ++i, dst += 3) dst[0] = dst[1] = dst[2] = src[i];
      break;
    case 2:
      for (int64_t i = 0; i < pixels; ++i, dst += 3) dst[0] = dst[1] = dst[2] = src[2 * i];
      break;
    case 3:
      std::memcpy(dst, src, static_cast<size_t>(pixels) * 3);
      break;
    case 4:
      for (int64_t i = 0; i < pixels; ++i, dst += 3, src += 4) {
        dst[0] = src[0];
        dst[1] = src[1];
        dst[2] = src[2];
      }
      break;
    default:
      throw Error(ErrorCode::kInternal, "ToRgb: channels must be 1..4, got " + std::to_string(channels));
  }
}

void ToRgbResized(const uint8_t* src, int width, int height, int channels, int dstWidth, int dstHeight,
                  PilFilter filter, uint8_t* dst, const ColourOptions& colour) {
  const int64_t srcPixels = static_cast<int64_t>(width) * height;
  const int64_t dstPixels = static_cast<int64_t>(dstWidth) * dstHeight;
  if (channels == 3) {
    ResizeU8(src, width, height, 3, dstWidth, dstHeight, filter, dst);
    return;
  }
  if (channels == 4) {
    // convert("RGB") drops alpha first; resizing RGBA would premultiply, which PIL does not do here.
    std::vector<uint8_t> rgb(static_cast<size_t>(srcPixels) * 3);
    ToRgb(src, srcPixels, 4, rgb.data(), colour);
    ResizeU8(rgb.data(), width, height, 3, dstWidth, dstHeight, filter, dst);
    return;
  }
  // Grey (L, or LA without its alpha): PIL resamples each band of an RGB image with the same
  // integer arithmetic, so resizing the single grey plane and replicating it afterwards gives
  // the bytes of resizing the replicated RGB image, for a third of the work.
  std::vector<uint8_t> grey;
  const uint8_t* plane = src;
  if (channels == 2) {
    grey.resize(static_cast<size_t>(srcPixels));
    for (int64_t i = 0; i < srcPixels; ++i) grey[i] = src[2 * i];
    plane = grey.data();
  }
  std::vector<uint8_t> resized(static_cast<size_t>(dstPixels));
  ResizeU8(plane, width, height, 1, dstWidth, dstHeight, filter, resized.data());
  ToRgb(resized.data(), dstPixels, 1, dst);
}

namespace {

constexpr double kDefaultMaxPixels = 100e6;
constexpr uint32_t kMaxBatch = 65536;
constexpr int kMaxSide = 1 << 24;  // ValidateResizeArgs' limit

struct ImageView {
  const uint8_t* data = nullptr;
  int width = 0;
  int height = 0;
  int channels = 0;
  ColourOptions colour;
};

struct ResizeSpec {
  bool enabled = false;
  int width = 0;
  int height = 0;
  PilFilter filter = PilFilter::Bicubic;
};

// Shared by the CPU jobs of one call and its final device task.
struct Job {
  std::vector<ImageView> images;
  ResizeSpec resize;
  int outWidth = 0;
  int outHeight = 0;
  std::vector<float> lut;  // 3 * 256
  at::ScalarType dtype = at::kFloat;
  c10::Device device{c10::kCPU};
  std::shared_ptr<CancelToken> cancel;

  at::Tensor batch;  // uint8 [B,H,W,3], CPU
  std::atomic<int64_t> remaining{0};
  std::atomic<bool> failed{false};
  std::mutex errorMutex;
  std::exception_ptr error;
  std::shared_ptr<Task> deviceTask;  // submitted by the job that finishes last

  void Fail(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(errorMutex);
    if (!error) error = e;
    failed.store(true);
  }
};

std::string Str(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e18) return std::to_string(static_cast<int64_t>(v));
  std::string s = std::to_string(v);
  return s;
}

std::string Describe(const Napi::Value& value) {
  if (value.IsUndefined()) return "undefined";
  if (value.IsNull()) return "null";
  if (value.IsNumber()) return Str(value.As<Napi::Number>().DoubleValue());
  if (value.IsString()) return "the string '" + value.As<Napi::String>().Utf8Value() + "'";
  if (value.IsBoolean()) return value.As<Napi::Boolean>().Value() ? "true" : "false";
  if (value.IsArray()) return "an array";
  if (value.IsTypedArray()) return "a typed array";
  return "an object";
}

Error IndexedError(ErrorCode code, uint32_t index, const std::string& message, ErrorDetails details = {}) {
  details.emplace_back("index", std::to_string(index));
  return Error(code, message, std::move(details));
}

// An integer-valued JS number in [lo, hi], else a typed error naming `argument`.
int RequireInt(const Napi::Value& value, const std::string& argument, double lo, double hi, const std::string& expected,
               const uint32_t* index = nullptr) {
  double d = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : NAN;
  if (!value.IsNumber() || !std::isfinite(d) || d != std::floor(d) || d < lo || d > hi) {
    Error e = InvalidArgument(argument, Describe(value), expected);
    if (index == nullptr) throw e;
    ErrorDetails details = e.details();
    throw IndexedError(ErrorCode::kInvalidArgument, *index, e.message(), details);
  }
  return static_cast<int>(d);
}

void RunImage(const std::shared_ptr<Job>& job, size_t i) {
  if (job->failed.load() || (job->cancel && job->cancel->IsCancelled())) return;
  try {
    const ImageView& image = job->images[i];
    const int64_t outBytes = static_cast<int64_t>(job->outWidth) * job->outHeight * 3;
    uint8_t* out = job->batch.data_ptr<uint8_t>() + static_cast<int64_t>(i) * outBytes;
    if (job->resize.enabled) {
      ToRgbResized(image.data, image.width, image.height, image.channels, job->outWidth, job->outHeight,
                   job->resize.filter, out, image.colour);
    } else {
      ToRgb(image.data, static_cast<int64_t>(image.width) * image.height, image.channels, out, image.colour);
    }
  } catch (...) {
    Error e = ErrorFromException(std::current_exception(), "image at index " + std::to_string(i));
    ErrorDetails details = e.details();
    details.emplace_back("index", std::to_string(i));
    job->Fail(std::make_exception_ptr(Error(e.code(), e.message(), details)));
  }
}

void FinishOne(const std::shared_ptr<Job>& job) {
  if (job->remaining.fetch_sub(1) != 1) return;
  std::shared_ptr<Task> task = std::move(job->deviceTask);  // breaks the job <-> task cycle
  Executor::For(job->device).Submit(std::move(task));
}

// The device step: one upload, one gather through the LUT, one layout change and cast.
at::Tensor DeviceStep(const std::shared_ptr<Job>& job) {
  if (job->error) std::rethrow_exception(job->error);
  at::Tensor batch = std::move(job->batch);  // [B,H,W,3] uint8 on the CPU
  const c10::Device device = job->device;
  at::Tensor lut = at::from_blob(job->lut.data(), {3 * 256}, at::TensorOptions().dtype(at::kFloat));
  if (!device.is_cpu()) {
    batch = ToDevice(batch, device);  // uint8 up (a quarter of the float bytes), pinned
    lut = ToDevice(lut, device);
    Stats::host_to_device_bytes += batch.nbytes() + lut.nbytes();
  } else {
    lut = lut.clone();  // job->lut goes away with the job
  }
  if (job->dtype != at::kFloat) lut = lut.to(job->dtype);  // cast once: the same values as casting each pixel
  // index[b,c,h,w] = c * 256 + pixel[b,h,w,c]
  at::Tensor offsets = at::arange(0, 3 * 256, 256, at::TensorOptions().dtype(at::kLong).device(device)).view({1, 3, 1, 1});
  at::Tensor index = batch.permute({0, 3, 1, 2}).to(at::kLong).add_(offsets);
  at::Tensor out = lut.take(index);
  return out.is_contiguous() ? out : out.contiguous();
}

}  // namespace

Napi::Value PreprocessImages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return GuardJs(env, [&]() -> Napi::Value {
    auto job = std::make_shared<Job>();

    // --- options ---
    if (!info[1].IsObject()) throw InvalidArgument("options", Describe(info[1]), "an object { resize, lut, dtype, device }");
    Napi::Object options = info[1].As<Napi::Object>();

    double maxPixels = kDefaultMaxPixels;
    Napi::Value maxPixelsValue = options.Get("maxPixels");
    if (!maxPixelsValue.IsUndefined() && !maxPixelsValue.IsNull()) {
      double d = maxPixelsValue.IsNumber() ? maxPixelsValue.As<Napi::Number>().DoubleValue() : NAN;
      if (!(d >= 1) || d != std::floor(d)) {
        throw InvalidArgument("options.maxPixels", Describe(maxPixelsValue), "an integer >= 1");
      }
      maxPixels = d;
    }

    Napi::Value resizeValue = options.Get("resize");
    if (!resizeValue.IsNull() && !resizeValue.IsUndefined()) {
      if (!resizeValue.IsObject()) {
        throw InvalidArgument("options.resize", Describe(resizeValue), "null or an object { width, height, filter }");
      }
      Napi::Object resize = resizeValue.As<Napi::Object>();
      job->resize.enabled = true;
      job->resize.width = RequireInt(resize.Get("width"), "options.resize.width", 1, kMaxSide, "an integer from 1 to 16777216");
      job->resize.height = RequireInt(resize.Get("height"), "options.resize.height", 1, kMaxSide, "an integer from 1 to 16777216");
      int filter = RequireInt(resize.Get("filter"), "options.resize.filter", 0, 5,
                              "a PIL resample filter: 0 (nearest), 1 (lanczos), 2 (bilinear), 3 (bicubic), 4 (box) or 5 (hamming)");
      if (!PilFilterFromInt(filter, &job->resize.filter)) {
        throw InvalidArgument("options.resize.filter", std::to_string(filter), "an integer from 0 to 5");
      }
    }

    Napi::Value lutValue = options.Get("lut");
    if (!lutValue.IsTypedArray() || lutValue.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array ||
        lutValue.As<Napi::TypedArray>().ElementLength() != 3 * 256) {
      throw InvalidArgument("options.lut", Describe(lutValue), "a Float32Array of 768 values (3 channels x 256 levels)");
    }
    {
      Napi::Float32Array lut = lutValue.As<Napi::Float32Array>();
      job->lut.assign(lut.Data(), lut.Data() + 3 * 256);
    }

    Napi::Value dtypeValue = options.Get("dtype");
    if (!dtypeValue.IsUndefined() && !dtypeValue.IsNull()) {
      if (!dtypeValue.IsString()) throw InvalidArgument("options.dtype", Describe(dtypeValue), "a floating dtype name");
      at::ScalarType dtype = RequireDType(dtypeValue.As<Napi::String>().Utf8Value(), "options.dtype");
      if (!at::isFloatingType(dtype)) {
        throw Error(ErrorCode::kDType,
                    "argument 'options.dtype' is '" + DTypeName(dtype) + "'; pixel values need a floating dtype: "
                    "float32, float16, bfloat16 or float64",
                    {{"argument", "options.dtype"}, {"value", DTypeName(dtype)}, {"expected", "float32, float16, bfloat16 or float64"}});
      }
      job->dtype = dtype;
    }
    Napi::Value deviceValue = options.Get("device");
    if (!deviceValue.IsUndefined() && !deviceValue.IsNull()) {
      if (!deviceValue.IsString()) throw InvalidArgument("options.device", Describe(deviceValue), "a device string such as 'cpu' or 'cuda:0'");
      job->device = RequireDevice(deviceValue.As<Napi::String>().Utf8Value(), "options.device");
    }
    job->cancel = NativeCancelToken::FromValue(info[2]);

    // --- images ---
    if (!info[0].IsArray()) throw InvalidArgument("images", Describe(info[0]), "an array of { data, width, height, channels }");
    Napi::Array array = info[0].As<Napi::Array>();
    const uint32_t count = array.Length();
    if (count == 0) throw InvalidArgument("images", "an empty array", "at least one image");
    if (count > kMaxBatch) throw InvalidArgument("images", "an array of " + std::to_string(count) + " images", "at most 65536 images");
    job->images.resize(count);
    std::vector<Napi::TypedArray> arrays;
    arrays.reserve(count);
    for (uint32_t i = 0; i < count; ++i) {
      const std::string name = "images[" + std::to_string(i) + "]";
      Napi::Value item = array.Get(i);
      if (!item.IsObject() || item.IsArray() || item.IsTypedArray()) {
        throw IndexedError(ErrorCode::kInvalidArgument, i,
                           "argument '" + name + "' is " + Describe(item) + "; expected an object { data, width, height, channels }",
                           {{"argument", name}, {"value", Describe(item)}, {"expected", "an object { data, width, height, channels }"}});
      }
      Napi::Object object = item.As<Napi::Object>();
      Napi::Value data = object.Get("data");
      bool bytes = data.IsTypedArray() && (data.As<Napi::TypedArray>().TypedArrayType() == napi_uint8_array ||
                                           data.As<Napi::TypedArray>().TypedArrayType() == napi_uint8_clamped_array);
      if (!bytes) {
        throw IndexedError(ErrorCode::kInvalidArgument, i,
                           "argument '" + name + ".data' is " + Describe(data) + "; expected a Uint8Array (or Buffer) of 8-bit pixels",
                           {{"argument", name + ".data"}, {"value", Describe(data)}, {"expected", "a Uint8Array"}});
      }
      // Sizes: any non-negative integer is accepted here so that 0 gets the image error below.
      ImageView& view = job->images[i];
      view.width = RequireInt(object.Get("width"), name + ".width", 0, kMaxSide, "an integer from 1 to 16777216", &i);
      view.height = RequireInt(object.Get("height"), name + ".height", 0, kMaxSide, "an integer from 1 to 16777216", &i);
      view.channels = RequireInt(object.Get("channels"), name + ".channels", 1, 4,
                                 "1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)", &i);
      Napi::Value cmyk = object.Get("cmyk");
      if (!cmyk.IsUndefined() && !cmyk.IsNull()) {
        if (!cmyk.IsBoolean()) {
          throw IndexedError(ErrorCode::kInvalidArgument, i, "argument '" + name + ".cmyk' is " + Describe(cmyk) + "; expected a boolean",
                             {{"argument", name + ".cmyk"}, {"value", Describe(cmyk)}, {"expected", "a boolean"}});
        }
        view.colour.cmyk = cmyk.As<Napi::Boolean>().Value();
        if (view.colour.cmyk && view.channels != 4) {
          throw IndexedError(ErrorCode::kInvalidArgument, i,
                             "argument '" + name + ".cmyk' is true but the image has " + std::to_string(view.channels) + " channels; CMYK needs 4",
                             {{"argument", name + ".cmyk"}, {"value", "true"}, {"expected", "4 channels"}});
        }
      }
      Napi::Value fill = object.Get("transparentColour");
      if (!fill.IsUndefined() && !fill.IsNull()) {
        const std::string arg = name + ".transparentColour";
        if (!fill.IsArray() || fill.As<Napi::Array>().Length() != 3) {
          throw IndexedError(ErrorCode::kInvalidArgument, i, "argument '" + arg + "' is " + Describe(fill) + "; expected [r, g, b] (0..255)",
                             {{"argument", arg}, {"value", Describe(fill)}, {"expected", "[r, g, b]"}});
        }
        for (uint32_t c = 0; c < 3; ++c) {
          view.colour.fill[c] = static_cast<uint8_t>(RequireInt(fill.As<Napi::Array>().Get(c), arg, 0, 255, "[r, g, b] with values 0..255", &i));
        }
        view.colour.fillTransparent = true;
      }
      const std::string size = std::to_string(view.width) + "x" + std::to_string(view.height);
      if (view.width == 0 || view.height == 0) {
        throw IndexedError(ErrorCode::kImageDecode, i,
                           "image at index " + std::to_string(i) + " is " + size + " pixels; an image needs a width and a height of at least 1",
                           {{"value", size}});
      }
      const double pixels = static_cast<double>(view.width) * view.height;
      if (pixels > maxPixels) {
        throw IndexedError(ErrorCode::kImageDecode, i,
                           "image at index " + std::to_string(i) + " has " + Str(pixels) + " pixels (" + size +
                               "), above the limit of " + Str(maxPixels) + " pixels (option maxPixels)",
                           {{"value", size}, {"expected", "at most " + Str(maxPixels) + " pixels"}});
      }
      Napi::TypedArray typed = data.As<Napi::TypedArray>();
      const double expectedBytes = pixels * view.channels;
      if (static_cast<double>(typed.ByteLength()) != expectedBytes) {
        throw IndexedError(ErrorCode::kImageDecode, i,
                           "image at index " + std::to_string(i) + ": data holds " + std::to_string(typed.ByteLength()) +
                               " bytes but width x height x channels = " + size + "x" + std::to_string(view.channels) + " = " +
                               Str(expectedBytes) + " bytes",
                           {{"value", std::to_string(typed.ByteLength()) + " bytes"}, {"expected", Str(expectedBytes) + " bytes"}});
      }
      view.data = static_cast<const uint8_t*>(typed.ArrayBuffer().Data()) + typed.ByteOffset();
      if (job->resize.enabled) {
        std::string why;
        if (!ValidateResizeArgs(view.width, view.height, view.channels == 4 ? 3 : (view.channels == 2 ? 1 : view.channels),
                                job->resize.width, job->resize.height, job->resize.filter, &why)) {
          throw IndexedError(ErrorCode::kImageDecode, i, "image at index " + std::to_string(i) + " cannot be resized: " + why,
                             {{"value", size}});
        }
      } else if (i > 0 && (view.width != job->images[0].width || view.height != job->images[0].height)) {
        const std::string first = std::to_string(job->images[0].width) + "x" + std::to_string(job->images[0].height);
        throw IndexedError(ErrorCode::kInvalidArgument, i,
                           "image at index " + std::to_string(i) + " is " + size + " but image 0 is " + first +
                               "; without resizing, every image of a batch must have the same size",
                           {{"argument", name}, {"value", size}, {"expected", first}});
      }
      arrays.push_back(typed);
    }
    job->outWidth = job->resize.enabled ? job->resize.width : job->images[0].width;
    job->outHeight = job->resize.enabled ? job->resize.height : job->images[0].height;
    const double batchBytes = static_cast<double>(count) * job->outWidth * job->outHeight * 3;
    if (batchBytes > static_cast<double>(int64_t{1} << 46)) {
      throw InvalidArgument("images", "a batch of " + Str(batchBytes) + " bytes of pixels", "a batch that fits in memory");
    }
    job->batch = at::empty({static_cast<int64_t>(count), job->outHeight, job->outWidth, 3}, at::TensorOptions().dtype(at::kByte));

    // Keep every pixel buffer alive until the promise settles (the pool reads them in place).
    auto refs = std::make_shared<std::vector<napi_ref>>();
    refs->reserve(count);
    for (Napi::TypedArray& typed : arrays) {
      napi_ref ref = nullptr;
      if (napi_create_reference(env, typed, 1, &ref) != napi_ok) {
        for (napi_ref r : *refs) napi_delete_reference(env, r);
        throw Error(ErrorCode::kInternal, "could not hold a reference to an image buffer");
      }
      refs->push_back(ref);
    }

    // Nothing may throw from here on: the task counts as outstanding work from its construction.
    auto task = std::make_shared<PromiseTask<at::Tensor>>(
        env, job->device, [job]() { return DeviceStep(job); },
        [](Napi::Env env, at::Tensor& result) -> Napi::Value { return NativeTensor::NewInstance(env, std::move(result)); },
        job->cancel,
        [refs](Napi::Env env) {
          for (napi_ref r : *refs) napi_delete_reference(env, r);
          refs->clear();
        });
    Napi::Promise promise = task->promise();
    job->deviceTask = task;
    job->remaining.store(count);
    CpuPool& pool = CpuPool::Shared();
    for (uint32_t i = 0; i < count; ++i) {
      pool.Submit([job, i]() {
        RunImage(job, i);
        FinishOne(job);
      });
    }
    return promise;
  });
}

}  // namespace blip2::image
