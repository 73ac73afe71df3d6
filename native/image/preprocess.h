// Image preprocessing for BlipImageProcessor, as transformers does it with PIL:
//   convert("RGB") → resize (PIL-exact, 8-bit) → rescale → normalize → [B,3,H,W].
//
// preprocessImages(images, options, cancelToken?) => Promise<NativeTensor>
//   images:  [{ data: Uint8Array, width, height, channels, cmyk?, transparentColour? }]  8-bit,
//            interleaved, rows packed (channels 1 = L, 2 = LA, 3 = RGB, 4 = RGBA, as decoded;
//            cmyk: 4 channels of raw CMYK converted with PIL's formula; transparentColour [r,g,b]:
//            RGBA pixels with alpha 0 take this colour, as a GIF's transparent index does in PIL)
//   options: { resize: { width, height, filter } | null,   filter = PIL's resample number 0..5
//              lut: Float32Array(768),  lut[c * 256 + v] = the final value of level v in channel c
//              dtype?: floating dtype (default float32), device?: string (default 'cpu'),
//              maxPixels?: number (default 100,000,000) }
//
// Everything is validated on the calling thread (errors name the image index). Colour conversion
// and resizing then run on a CPU pool (image/cpu_pool.h), one job per image; when the last image
// is done, ONE task on the device's executor uploads the uint8 batch [B,H,W,3], maps it through
// the LUT on the device, lays it out as [B,3,H,W] and casts it to dtype. The image buffers are
// read in place (no copy); they are kept alive until the promise settles.
#pragma once

#include <napi.h>

#include <cstdint>

#include "image/pil_resample.h"

namespace blip2::image {

// How 4-channel input becomes RGB (ignored for 1..3 channels).
struct ColourOptions {
  // The 4 channels are C, M, Y, K (as PIL holds a CMYK JPEG): PIL's Convert.c cmyk2rgb.
  bool cmyk = false;
  // RGBA pixels whose alpha is 0 get this colour before the alpha is dropped.
  bool fillTransparent = false;
  uint8_t fill[3] = {0, 0, 0};
};

// PIL's convert("RGB") for 8-bit L / LA / RGB / RGBA (1..4 channels): grey is replicated, alpha is
// dropped (not composited). `dst` holds width * height * 3 bytes.
void ToRgb(const uint8_t* src, int64_t pixels, int channels, uint8_t* dst, const ColourOptions& colour = {});

// ToRgb, then PIL's Image.resize(dst size, filter) on the RGB image, written to dst
// (dstWidth * dstHeight * 3 bytes). Alpha is dropped before resizing, as BlipImageProcessor
// converts to RGB before it resizes. Arguments must have passed ValidateResizeArgs.
void ToRgbResized(const uint8_t* src, int width, int height, int channels, int dstWidth, int dstHeight,
                  PilFilter filter, uint8_t* dst, const ColourOptions& colour = {});

Napi::Value PreprocessImages(const Napi::CallbackInfo& info);

}  // namespace blip2::image
