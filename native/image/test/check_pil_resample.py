#!/usr/bin/env python3
"""Proves native/image/pil_resample.cc equals Pillow's Image.resize byte for byte.

Run from the repository root with the project environment's Python (Pillow 12.3; Pillow 9.4.0, the
version the reference fixtures were made with, matches too):

    .venv/bin/python native/image/test/check_pil_resample.py [--cases N] [--seed S] [--quick]
        [--sanitize]

Checks two things against PIL: the double filter weights, read exactly (to 2^-30) through PIL's
32-bit "I" mode, and the 8-bit output bytes of Image.resize for random cases. Builds
resize_driver.cc twice (g++ -O2, and -O3 -march=native -ffp-contract=fast to show that
FMA contraction cannot creep into the coefficient maths), feeds both the same random cases and
compares every output with PIL. Exits non-zero on any mismatch.
"""

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(os.path.dirname(IMAGE_DIR))
FIXTURES = os.path.join(REPO, "test", "fixtures", "images")

MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
PREMULTIPLIED_MODES = {2: "La", 4: "RGBa"}  # resized without PIL's alpha round trip
FILTERS = {
    0: "NEAREST",
    1: "LANCZOS",
    2: "BILINEAR",
    3: "BICUBIC",
    4: "BOX",
    5: "HAMMING",
}

BUILDS = {
    "O2": ["-O2"],
    "O3-native-fpfast": ["-O3", "-march=native", "-ffp-contract=fast"],
}
SANITIZE_BUILD = {
    "asan-ubsan": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}


def build(out_dir, name, flags):
    exe = os.path.join(out_dir, "resize_driver_" + name)
    cmd = (
        ["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror"]
        + flags
        + [
            "-o",
            exe,
            os.path.join(HERE, "resize_driver.cc"),  # includes ../pil_resample.cc
        ]
    )
    subprocess.run(cmd, check=True)
    return exe


def make_pixels(rng, w, h, c, kind):
    """Random noise, smooth gradients, or hard-edged blocks with extreme values."""
    if kind == "noise":
        return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
    if kind == "gradient":
        ys = np.linspace(0.0, 1.0, h)[:, None, None]
        xs = np.linspace(0.0, 1.0, w)[None, :, None]
        phase = rng.uniform(0, 2 * np.pi, size=(1, 1, c))
        freq = rng.uniform(0.5, 4.0, size=(1, 1, c))
        v = 127.5 + 127.5 * np.sin(freq * (xs * rng.uniform(-3, 3) + ys * rng.uniform(-3, 3)) + phase)
        return np.clip(np.round(v), 0, 255).astype(np.uint8)
    # blocks of 0/255 (worst case for negative lobes and clipping) with random alpha levels
    bw, bh = max(1, w // rng.integers(1, 9)), max(1, h // rng.integers(1, 9))
    ys, xs = np.arange(h)[:, None] // bh, np.arange(w)[None, :] // bw
    out = np.empty((h, w, c), dtype=np.uint8)
    for ch in range(c):
        table = rng.choice([0, 1, 2, 128, 254, 255], size=(ys.max() + 1, xs.max() + 1))
        out[:, :, ch] = table[ys, xs]
    return out


def random_size(rng):
    r = rng.random()
    if r < 0.1:
        return 1
    if r < 0.2:
        return int(rng.integers(2, 5))
    return int(rng.integers(1, 301))


def generate_cases(rng, count):
    cases = []
    kinds = ["noise", "gradient", "blocks"]
    for i in range(count):
        c = (i % 4) + 1
        f = (i // 4) % 6
        sw, sh, dw, dh = (random_size(rng) for _ in range(4))
        shape = i % 10
        if shape == 0:  # 1 x N / N x 1 sources and targets
            sw, dh = 1, int(rng.integers(1, 301))
        elif shape == 1:
            sh, dw = 1, int(rng.integers(1, 301))
        elif shape == 2:  # extreme downscale
            sw, sh = int(rng.integers(200, 301)), int(rng.integers(200, 301))
            dw, dh = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        elif shape == 3:  # extreme upscale
            sw, sh = int(rng.integers(1, 4)), int(rng.integers(1, 4))
            dw, dh = int(rng.integers(200, 301)), int(rng.integers(200, 301))
        elif shape == 4:  # one dimension unchanged (single-pass paths)
            if rng.random() < 0.5:
                dw = sw
            else:
                dh = sh
        elif shape == 5 and i % 20 == 5:  # identity
            dw, dh = sw, sh
        premul = 1
        if c in PREMULTIPLIED_MODES and rng.random() < 0.25:
            premul = 0
        cases.append((sw, sh, c, dw, dh, f, premul, kinds[i % 3]))
    # Shapes the processor actually sees.
    for f in FILTERS:
        cases.append((1024, 768, 3, 224, 224, f, 1, "gradient"))
        cases.append((300, 200, 3, 364, 364, f, 1, "noise"))
    return cases


def pil_resize(arr, c, dw, dh, f, premul):
    mode = MODES[c] if premul else PREMULTIPLIED_MODES.get(c, MODES[c])
    h, w = arr.shape[:2]
    im = Image.frombytes(mode, (w, h), arr.tobytes())
    return im.resize((dw, dh), resample=f).tobytes()


def run_cases(exes, cases, tmp, rng):
    manifest = os.path.join(tmp, "manifest.txt")
    expected = []
    with open(manifest, "w") as m:
        for idx, (sw, sh, c, dw, dh, f, premul, kind) in enumerate(cases):
            arr = make_pixels(rng, sw, sh, c, kind)
            src = os.path.join(tmp, f"in{idx}.raw")
            with open(src, "wb") as fh:
                fh.write(arr.tobytes())
            expected.append(pil_resize(arr, c, dw, dh, f, premul))
            m.write(f"{src} {sw} {sh} {c} {dw} {dh} {f} {premul} {{OUT}}{idx}.raw\n")
    failures = []
    for name, exe in exes.items():
        out_prefix = os.path.join(tmp, f"out_{name}_")
        with open(manifest) as m:
            text = m.read().replace("{OUT}", out_prefix)
        named = os.path.join(tmp, f"manifest_{name}.txt")
        with open(named, "w") as m:
            m.write(text)
        subprocess.run([exe, "batch", named], check=True, stdout=subprocess.DEVNULL)
        for idx, case in enumerate(cases):
            with open(f"{out_prefix}{idx}.raw", "rb") as fh:
                got = fh.read()
            if got != expected[idx]:
                a = np.frombuffer(got, dtype=np.uint8).astype(int)
                b = np.frombuffer(expected[idx], dtype=np.uint8).astype(int)
                if a.shape == b.shape:
                    detail = f"{int((a != b).sum())} bytes differ, max |diff| {int(abs(a - b).max())}"
                else:
                    detail = f"size {a.size} != {b.size}"
                failures.append((name, case, detail))
    return failures


def check_fixtures(exes, tmp):
    """The shared fixture images, convert('RGB') then 56x56 BICUBIC, as BlipImageProcessor does."""
    results = []
    for fname in sorted(os.listdir(FIXTURES)):
        im = Image.open(os.path.join(FIXTURES, fname)).convert("RGB")
        w, h = im.size
        src = os.path.join(tmp, "fixture_" + fname + ".raw")
        with open(src, "wb") as fh:
            fh.write(im.tobytes())
        expected = im.resize((56, 56), resample=Image.Resampling.BICUBIC).tobytes()
        for name, exe in exes.items():
            out = os.path.join(tmp, f"fixture_{name}_{fname}.out")
            manifest = os.path.join(tmp, "fixture_manifest.txt")
            with open(manifest, "w") as m:
                m.write(f"{src} {w} {h} 3 56 56 3 1 {out}\n")
            subprocess.run([exe, "batch", manifest], check=True, stdout=subprocess.DEVNULL)
            with open(out, "rb") as fh:
                results.append((fname, name, fh.read() == expected))
    return results


def check_weights(exe, rng, count):
    """Resizes an "I" image holding 2^30 on the diagonal horizontally with PIL: output row r,
    column xx is ROUND_UP(2^30 * weight of source column r for output xx), i.e. every double
    weight of precompute_coeffs to 2^-30, which must equal what the driver prints for ours."""
    combos = set()
    while len(combos) < count:
        f = int(rng.integers(1, 6))
        n_in = int(rng.integers(1, 301)) if rng.random() < 0.8 else int(rng.integers(1, 8))
        n_out = int(rng.integers(1, 301)) if rng.random() < 0.8 else int(rng.integers(1, 8))
        if n_in != n_out:
            combos.add((n_in, n_out, f))
    for f in range(1, 6):  # the processor's 224 from typical inputs
        combos.add((1024, 224, f))
        combos.add((480, 224, f))
    bad = []
    for n_in, n_out, f in sorted(combos):
        diag = np.zeros((n_in, n_in), dtype=np.int32)
        np.fill_diagonal(diag, 1 << 30)
        im = Image.frombytes("I", (n_in, n_in), diag.tobytes())
        got = np.frombuffer(im.resize((n_out, n_in), resample=f).tobytes(), dtype=np.int32)
        pil = got.reshape(n_in, n_out)
        ours = np.zeros((n_in, n_out), dtype=np.int64)
        text = subprocess.run(
            [exe, "weights", str(n_in), str(n_out), str(f)], check=True, capture_output=True,
            text=True,
        ).stdout.split("\n")
        for xx in range(n_out):
            vals = [int(v) for v in text[xx].split()]
            first, cnt = vals[0], vals[1]
            ours[first:first + cnt, xx] = vals[2:2 + cnt]
        if not np.array_equal(ours, pil):
            diff = np.argwhere(ours != pil)
            r, xx = diff[0]
            bad.append(((n_in, n_out, FILTERS[f]), len(diff), int(ours[r, xx]), int(pil[r, xx])))
    return len(combos), bad


def check_validation(exe):
    expectations = [
        ((0, 10, 3, 5, 5, 3), "argument 'srcWidth' is 0; expected an integer between 1 and"),
        ((10, 10, 3, 5, -1, 3), "argument 'dstHeight' is -1; expected an integer between 1"),
        ((10, 1 << 25, 3, 5, 5, 3), "argument 'srcHeight' is 33554432; expected an integer"),
        ((10, 10, 5, 5, 5, 3), "argument 'channels' is 5; expected 1, 2, 3 or 4"),
        ((10, 10, 0, 5, 5, 3), "argument 'channels' is 0; expected 1, 2, 3 or 4"),
        ((10, 10, 3, 5, 5, 6), "argument 'filter' is 6; expected a PIL resample filter 0..5"),
        ((10, 10, 3, 5, 5, 3), "ok"),
    ]
    if sys.maxsize <= 2**32:
        expectations.append(((65536, 65536, 4, 5, 5, 3), "source image 65536x65536 with 4"))
    bad = []
    for args, want in expectations:
        got = subprocess.run(
            [exe, "validate"] + [str(a) for a in args], check=True, capture_output=True, text=True
        ).stdout.strip()
        if not got.startswith(want):
            bad.append((args, want, got))
    return bad


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--weight-sets", type=int, default=300)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--quick", action="store_true", help="only the -O2 build")
    parser.add_argument("--sanitize", action="store_true",
                        help="add an ASan/UBSan build (slower; not needed for exactness)")
    args = parser.parse_args()

    if PIL.__version__ != "9.4.0":
        print(f"warning: Pillow {PIL.__version__}, the fixtures were made with 9.4.0")
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    random.seed(args.seed)
    tmp = tempfile.mkdtemp(prefix="pil_resample_")
    try:
        builds = {k: v for k, v in BUILDS.items() if not args.quick or k == "O2"}
        if args.sanitize:
            builds.update(SANITIZE_BUILD)
        exes = {name: build(tmp, name, flags) for name, flags in builds.items()}
        cases = generate_cases(rng, args.cases)
        failures = run_cases(exes, cases, tmp, rng)
        fixtures = check_fixtures(exes, tmp)
        validation = check_validation(exes["O2"])
        weight_sets, weight_failures = 0, []
        for name, exe in exes.items():
            n, bad = check_weights(exe, np.random.default_rng(args.seed + 1), args.weight_sets)
            weight_sets += n
            weight_failures += [(name,) + b for b in bad]
        bench = subprocess.run(
            [exes["O2"], "bench", "1024", "768", "3", "224", "224", "3", "30"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    by_filter = {}
    for case in cases:
        by_filter[FILTERS[case[5]]] = by_filter.get(FILTERS[case[5]], 0) + 1
    print(f"Pillow {PIL.__version__}; builds: {', '.join(exes)}")
    print(f"random/edge cases: {len(cases)} per build, {len(cases) * len(exes)} comparisons; "
          f"per filter: {by_filter}")
    for name, case, detail in failures[:20]:
        sw, sh, c, dw, dh, f, premul, kind = case
        print(f"  MISMATCH [{name}] {sw}x{sh}x{c} -> {dw}x{dh} {FILTERS[f]} premul={premul} "
              f"{kind}: {detail}")
    print(f"mismatches: {len(failures)}")
    print(f"weight sets (in size, out size, filter) compared with PIL's I mode: {weight_sets} "
          f"over all builds, mismatching: {len(weight_failures)}")
    for name, combo, n, ours, pil in weight_failures[:20]:
        print(f"  WEIGHTS [{name}] {combo}: {n} differ, e.g. ours {ours} vs PIL {pil} (x 2^-30)")
    for fname, name, ok in fixtures:
        print(f"fixture {fname} -> 56x56 BICUBIC [{name}]: {'match' if ok else 'MISMATCH'}")
    for args_, want, got in validation:
        print(f"  VALIDATION {args_}: want '{want}...', got '{got}'")
    print(f"validation checks: {'ok' if not validation else 'FAILED'}")
    print(f"1024x768 RGB -> 224x224 BICUBIC (-O2 build): {bench}")
    print(f"elapsed {time.time() - t0:.1f}s")
    ok = (not failures and not weight_failures and all(r[2] for r in fixtures)
          and not validation)
    print("ALL MATCH" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
