#!/usr/bin/env python3
"""Writes test/fixtures/processor/: small images in the colour modes and containers users send,
and what Pillow 9.4 (the version the transformers reference fixtures were made with) gives for
each through `Image.open(path).convert("RGB")` — the conversion BlipImageProcessor applies
(transformers.image_transforms.convert_to_rgb: PIL's plain convert("RGB"), alpha dropped, no
compositing). EXIF orientation is not applied, as transformers does not; for images with an
orientation tag the expectation with `ImageOps.exif_transpose` is recorded too (our `autoOrient`).

Run with Debian's interpreter (Pillow 9.4.0, numpy):
    /usr/bin/python3 test/python/make_processor_fixtures.py [out_dir]
Deterministic: re-running rewrites the same bytes.
"""

import io
import json
import os
import struct
import sys
import zlib

import numpy as np
import PIL
from PIL import Image, ImageCms, ImageOps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "test", "fixtures", "processor")

W, H = 23, 17  # odd sizes exercise chroma upsampling edges and row handling


def pattern_rgb(w=W, h=H, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(1, w - 1)).astype(np.int32)
    g = (y * 255 // max(1, h - 1)).astype(np.int32)
    b = ((x + y) * 7 % 256).astype(np.int32)
    img = np.stack([r, g, b], axis=-1)
    img = img + rng.integers(-40, 41, size=img.shape)
    img[2:6, 3:9] = [250, 20, 30]  # a saturated block (chroma edges in JPEG)
    return np.clip(img, 0, 255).astype(np.uint8)


def pattern_grey(w=W, h=H, seed=1):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    g = (x * 11 + y * 5) % 256 + rng.integers(-20, 21, size=(h, w))
    return np.clip(g, 0, 255).astype(np.uint8)


def alpha_plane(w=W, h=H, seed=2):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(h, w))
    a[0, :] = 0  # fully transparent pixels keep their (non-zero) colour in PIL's convert("RGB")
    a[1, :] = 255
    return a.astype(np.uint8)


# --- a hand-written PNG encoder for what PIL cannot write (16-bit RGB/RGBA/LA) ---

def _chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def png_bytes(array, bit_depth, colour_type, extra_chunks=()):
    """array: HxWxC uint8/uint16 (big-endian written), colour_type per the PNG spec."""
    h, w = array.shape[:2]
    data = array.astype(">u2" if bit_depth == 16 else "u1").tobytes()
    stride = len(data) // h
    raw = b"".join(b"\x00" + data[i * stride:(i + 1) * stride] for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    for kind, payload in extra_chunks:
        out += _chunk(kind, payload)
    return out + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def exif_with_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def srgb_profile_with_linear_trc():
    """lcms' sRGB profile with its tone curves' gamma changed to 1.0: a valid RGB profile whose
    transform visibly changes pixel values, so a decoder that applied it would be caught."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    patched = 0
    for i in range(count):
        sig, offset, size = struct.unpack(">4sII", data[132 + 12 * i:144 + 12 * i])
        if sig in (b"rTRC", b"gTRC", b"bTRC") and data[offset:offset + 4] == b"para":
            data[offset + 12:offset + 16] = struct.pack(">i", 1 << 16)  # g = 1.0
            patched += 1
    assert patched >= 1, "no parametric TRC found in lcms' sRGB profile"
    data[24:36] = struct.pack(">6H", 2024, 1, 1, 0, 0, 0)  # creation date: fixed, for reproducible files
    data[84:100] = bytes(16)  # profile ID: not computed
    return bytes(data)


# BlipImageProcessor with the settings of the tiny-opt fixture but a size that exercises both
# directions: what transformers 4.45 computes (PIL resize of the uint8 RGB image; rescale as
# float64 * factor -> float32; normalize in float32; channels first).
PV_SIZE = (16, 20)  # (width, height): shrinks the width, enlarges the height of 23x17
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def blip_pixel_values(rgb_image):
    resized = np.asarray(rgb_image.resize(PV_SIZE, resample=Image.Resampling.BICUBIC))
    x = (resized.astype(np.float64) * 0.00392156862745098).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return x.transpose(2, 0, 1)[None]  # [1, 3, H, W]


def main():
    os.makedirs(os.path.join(OUT, "expected"), exist_ok=True)
    cases = {}  # name -> (file bytes, extension, description)

    rgb = pattern_rgb()
    grey = pattern_grey()
    alpha = alpha_plane()

    def save(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    # PNG, 8-bit modes
    cases["png_rgb"] = (save(Image.fromarray(rgb, "RGB"), "PNG"), "png", "RGB 8-bit PNG")
    cases["png_l"] = (save(Image.fromarray(grey, "L"), "PNG"), "png", "greyscale (L) PNG: grey replicated")
    cases["png_la"] = (save(Image.fromarray(np.stack([grey, alpha], -1), "LA"), "PNG"), "png", "grey + alpha (LA) PNG: alpha dropped")
    cases["png_rgba"] = (save(Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA"), "PNG"), "png",
                         "RGBA PNG incl. fully transparent pixels with colour: alpha dropped, not composited")
    bilevel = Image.fromarray(((grey > 128) * 255).astype(np.uint8), "L").convert("1")
    cases["png_1bit"] = (save(bilevel, "PNG"), "png", "1-bit PNG (mode '1'): 0/255")
    pal_img = Image.fromarray(rgb, "RGB").quantize(colors=37, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    cases["png_p"] = (save(pal_img, "PNG"), "png", "palette (P) PNG, 37 colours")
    trns = bytes((i * 29) % 256 for i in range(37))  # per-entry alpha
    cases["png_p_trns"] = (save(pal_img, "PNG", transparency=trns), "png",
                           "palette PNG with a tRNS chunk (per-entry alpha): palette colours, transparency ignored")
    pal16 = Image.fromarray(rgb, "RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    cases["png_p_4bit"] = (save(pal16, "PNG", bits=4), "png", "4-bit palette PNG")
    cases["png_l_trns"] = (save(Image.fromarray(grey, "L"), "PNG", transparency=int(grey[0, 0])), "png",
                           "greyscale PNG with a tRNS grey key")
    cases["png_rgb_trns"] = (save(Image.fromarray(rgb, "RGB"), "PNG", transparency=tuple(int(v) for v in rgb[0, 0])), "png",
                             "RGB PNG with a tRNS colour key")
    cases["png_interlaced"] = (png_interlaced(rgb), "png", "Adam7-interlaced RGB PNG")
    cases["png_gamma"] = (png_bytes(rgb, 8, 2, [(b"gAMA", struct.pack(">I", 100000))]), "png",
                          "RGB PNG with gAMA 1.0 (PIL ignores gamma)")
    cases["png_icc"] = (save(Image.fromarray(rgb, "RGB"), "PNG", icc_profile=srgb_profile_with_linear_trc()), "png",
                        "RGB PNG with an embedded ICC profile (linear-TRC sRGB): PIL does not apply it")

    # PNG, 16-bit (PIL: 'I' for grey, high byte for RGB/RGBA/LA)
    rng = np.random.default_rng(5)
    g16 = rng.integers(0, 65536, size=(H, W)).astype(np.uint16)
    g16[0, :] = np.arange(W) * 12  # small values: PIL's I -> RGB keeps values below 256
    cases["png_i16"] = (png_bytes(g16[..., None], 16, 0), "png",
                        "16-bit greyscale PNG (PIL mode I): convert('RGB') clips to 0..255")
    rgb16 = rng.integers(0, 65536, size=(H, W, 3)).astype(np.uint16)
    cases["png_rgb16"] = (png_bytes(rgb16, 16, 2), "png", "16-bit RGB PNG: PIL keeps the high byte")
    rgba16 = rng.integers(0, 65536, size=(H, W, 4)).astype(np.uint16)
    cases["png_rgba16"] = (png_bytes(rgba16, 16, 6), "png", "16-bit RGBA PNG: PIL keeps the high byte, alpha dropped")
    la16 = rng.integers(0, 65536, size=(H, W, 2)).astype(np.uint16)
    cases["png_la16"] = (png_bytes(la16, 16, 4), "png", "16-bit grey + alpha PNG (PIL reads it as RGBA): high byte")

    # JPEG
    cases["jpeg_rgb"] = (save(Image.fromarray(rgb, "RGB"), "JPEG", quality=85), "jpg", "baseline JPEG, 4:2:0")
    cases["jpeg_444"] = (save(Image.fromarray(rgb, "RGB"), "JPEG", quality=92, subsampling=0), "jpg", "JPEG 4:4:4")
    cases["jpeg_422"] = (save(Image.fromarray(rgb, "RGB"), "JPEG", quality=80, subsampling=1), "jpg", "JPEG 4:2:2")
    cases["jpeg_progressive"] = (save(Image.fromarray(rgb, "RGB"), "JPEG", quality=85, progressive=True), "jpg",
                                 "progressive JPEG")
    cases["jpeg_l"] = (save(Image.fromarray(grey, "L"), "JPEG", quality=90), "jpg", "greyscale JPEG")
    cmyk = Image.fromarray(rgb, "RGB").convert("CMYK")
    cmyk_arr = np.array(cmyk)
    cmyk_arr[..., 3] = (np.arange(W)[None, :] * 9 + np.arange(H)[:, None] * 3) % 200  # a real K channel
    cases["jpeg_cmyk"] = (save(Image.fromarray(cmyk_arr, "CMYK"), "JPEG", quality=90), "jpg",
                          "CMYK JPEG (Adobe, inverted): PIL's plain CMYK -> RGB formula, no ICC")
    cases["jpeg_exif_orient6"] = (save(Image.fromarray(rgb, "RGB"), "JPEG", quality=90, exif=exif_with_orientation(6)), "jpg",
                                  "JPEG with EXIF Orientation 6: not applied unless autoOrient")
    cases["jpeg_icc"] = (save(Image.fromarray(rgb, "RGB"), "JPEG", quality=90, icc_profile=srgb_profile_with_linear_trc()), "jpg",
                         "JPEG with an embedded ICC profile: PIL does not apply it")

    # Other containers
    gif_img = Image.fromarray(rgb, "RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    cases["gif"] = (save(gif_img, "GIF"), "gif", "GIF (palette)")
    cases["gif_trns"] = (save(gif_img, "GIF", transparency=3), "gif",
                         "GIF with a transparent index: PIL gives that entry's palette colour")
    cases["webp_lossless"] = (save(Image.fromarray(rgb, "RGB"), "WEBP", lossless=True), "webp", "lossless WebP")
    cases["webp_lossy"] = (save(Image.fromarray(rgb, "RGB"), "WEBP", quality=80), "webp", "lossy WebP")
    cases["webp_rgba"] = (save(Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA"), "WEBP", lossless=True), "webp",
                          "lossless WebP with alpha")
    cases["tiff_rgb"] = (save(Image.fromarray(rgb, "RGB"), "TIFF"), "tif", "uncompressed RGB TIFF")
    cases["tiff_lzw"] = (save(Image.fromarray(rgb, "RGB"), "TIFF", compression="tiff_lzw"), "tif", "LZW RGB TIFF")
    cases["tiff_i16"] = (save(Image.fromarray(g16, "I;16"), "TIFF"), "tif",
                         "16-bit greyscale TIFF (PIL mode I;16): convert('RGB') clips to 0..255")
    cases["bmp"] = (save(Image.fromarray(rgb, "RGB"), "BMP"), "bmp", "BMP (sharp/libvips cannot load BMP: expected to be rejected)")

    index = {"pillow": PIL.__version__, "numpy": np.__version__, "generator": "test/python/make_processor_fixtures.py",
             "conversion": "Image.open(path).convert('RGB') (transformers.image_transforms.convert_to_rgb)",
             "pixel_values": {"size": {"width": PV_SIZE[0], "height": PV_SIZE[1]}, "resample": 3, "rescale_factor": 0.00392156862745098,
                              "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "dtype": "float32"},
             "images": {}}
    for name, (data, ext, description) in sorted(cases.items()):
        path = os.path.join(OUT, f"{name}.{ext}")
        with open(path, "wb") as f:
            f.write(data)
        entry = {"file": f"{name}.{ext}", "description": description}
        try:
            with Image.open(path) as im:
                entry["pil_mode"] = im.mode
                entry["size"] = list(im.size)
                out = im.convert("RGB")
                arr = np.asarray(out, dtype=np.uint8)
            with open(os.path.join(OUT, "expected", f"{name}.rgb"), "wb") as f:
                f.write(arr.tobytes())
            entry["rgb"] = f"expected/{name}.rgb"
            pv = blip_pixel_values(out)
            with open(os.path.join(OUT, "expected", f"{name}.pv.f32"), "wb") as f:
                f.write(pv.astype("<f4").tobytes())
            entry["pixel_values"] = {"file": f"expected/{name}.pv.f32", "shape": list(pv.shape)}
            with Image.open(path) as im:
                if im.getexif().get(0x0112, 1) != 1:
                    t = ImageOps.exif_transpose(im).convert("RGB")
                    arr = np.asarray(t, dtype=np.uint8)
                    with open(os.path.join(OUT, "expected", f"{name}.oriented.rgb"), "wb") as f:
                        f.write(arr.tobytes())
                    entry["oriented"] = {"size": list(t.size), "rgb": f"expected/{name}.oriented.rgb"}
        except Exception as e:  # recorded: PIL cannot convert it
            entry["pil_error"] = f"{type(e).__name__}: {e}"
        index["images"][name] = entry
    with open(os.path.join(OUT, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(cases)} images to {OUT}")


def png_interlaced(rgb):
    """RGB 8-bit Adam7 PNG (PIL cannot write interlaced PNGs)."""
    h, w = rgb.shape[:2]
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = rgb[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue
        for row in sub:
            raw += b"\x00" + row.tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


if __name__ == "__main__":
    main()
