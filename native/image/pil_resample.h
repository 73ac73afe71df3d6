// Bit-exact reimplementation of Pillow 9.4's Image.resize for 8-bit images, so that our
// preprocessing produces the same pixels as Hugging Face's BlipImageProcessor (which resizes with
// PIL) and therefore the same model inputs as the Python reference.
//
// Standard library only; reentrant (no mutable static state), safe to call from worker threads.
//
// Exactness relies on IEEE double arithmetic without fused multiply-add in the coefficient
// computation (pil_resample.cc turns contraction off for that code) and on the C library's
// sin/cos matching the one Pillow runs with (only the HAMMING and LANCZOS filters call them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace blip2::image {

// PIL's Image.Resampling numbering: the `resample` value of preprocessor_config.json.
enum class PilFilter : int {
  Nearest = 0,
  Lanczos = 1,
  Bilinear = 2,
  Bicubic = 3,
  Box = 4,
  Hamming = 5,
};

// Maps a config integer to a PilFilter; false (and *filter untouched) for anything PIL rejects.
bool PilFilterFromInt(int value, PilFilter* filter);

// Lower-case PIL name ("bicubic"...), or "unknown" for a value outside the enum.
const char* PilFilterName(PilFilter filter);

// Checks arguments for ResizeU8. Returns true when they are usable; otherwise false with a message
// such as "argument 'dstWidth' is 0; expected an integer >= 1" in *error (when error is non-null).
// Rejects sizes outside 1..2^24, channels outside 1..4, a filter outside the enum, and images
// (source, destination, or the dstWidth x srcHeight intermediate) whose byte count does not fit
// in ptrdiff_t.
bool ValidateResizeArgs(int srcWidth, int srcHeight, int channels, int dstWidth, int dstHeight,
                        PilFilter filter, std::string* error);

// Resizes an interleaved 8-bit image (row-major, rows packed without padding, `channels` bytes per
// pixel) exactly as Pillow 9.4 does with `Image.resize((dstWidth, dstHeight), resample=filter)`
// (box=None, reducing_gap=None) on the matching mode:
//   channels 1 -> "L", 2 -> "LA", 3 -> "RGB", 4 -> "RGBA".
//
// premultiplyAlphaLikePil: Image.resize converts "LA"/"RGBA" to premultiplied "La"/"RGBa" before
// resampling with any filter but NEAREST and converts back afterwards (a lossy round trip). With
// true (the default) 2- and 4-channel input is treated as colour + straight alpha and gets that
// same round trip, matching PIL's "LA"/"RGBA". With false every channel is resampled
// independently, which matches PIL's "La"/"RGBa" (already premultiplied) or any non-alpha data.
// Ignored for 1 and 3 channels.
//
// dst must hold dstWidth * dstHeight * channels bytes and must not overlap src. Invalid arguments
// (see ValidateResizeArgs) leave dst untouched; validate first to get the reason.
void ResizeU8(const uint8_t* src, int srcWidth, int srcHeight, int channels, int dstWidth,
              int dstHeight, PilFilter filter, uint8_t* dst, bool premultiplyAlphaLikePil = true);

}  // namespace blip2::image
