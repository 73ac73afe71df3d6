"""Shared helpers of the exporter tests: import path, fixture location, one export per process."""

import atexit
import json
import os
import shutil
import sys
import tempfile

EXPORT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(EXPORT_DIR)
if EXPORT_DIR not in sys.path:
    sys.path.insert(0, EXPORT_DIR)

import torch  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from blip2_export.torchscript import load_model_folder  # noqa: E402

PYTHON = sys.executable


def fixtures_dir() -> str:
    """$BLIP2_FIXTURES, else the repo's test/fixtures copy, else ../shared/fixtures."""
    candidates = [os.environ.get("BLIP2_FIXTURES"), os.path.join(REPO, "test", "fixtures"),
                  os.path.join(os.path.dirname(REPO), "shared", "fixtures")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "tiny-opt-expected", "expected.json")):
            return c
    raise RuntimeError("tiny-opt fixtures not found (set BLIP2_FIXTURES)")


FIXTURES = fixtures_dir()
CHECKPOINT = os.path.join(FIXTURES, "tiny-opt")

_cache = {}


def expected():
    """(tensors of expected.safetensors, expected.json)."""
    if "expected" not in _cache:
        d = os.path.join(FIXTURES, "tiny-opt-expected")
        with open(os.path.join(d, "expected.json"), encoding="utf-8") as f:
            meta = json.load(f)
        _cache["expected"] = (load_file(os.path.join(d, "expected.safetensors")), meta)
    return _cache["expected"]


def tempdir() -> str:
    d = tempfile.mkdtemp(prefix="blip2-export-test-")
    atexit.register(shutil.rmtree, d, True)
    return d


def eager_model():
    if "eager" not in _cache:
        from blip2_export.checkpoint import build_model
        _cache["eager"] = build_model(CHECKPOINT, report=None)
    return _cache["eager"]


def exported():
    """(out_dir, manifest, image_encoder, language_model): the fixture exported in-process once,
    the two .pt files reloaded with torch.jit.load and their weights bound."""
    if "exported" not in _cache:
        from blip2_export.exporter import export
        out = os.path.join(tempdir(), "model")
        manifest = export(CHECKPOINT, out, report=None)
        modules = load_model_folder(out)
        _cache["exported"] = (out, manifest, modules["image_encoder"], modules["language_model"])
    return _cache["exported"]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert tuple(a.shape) == tuple(b.shape), f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


# Measured differences, printed once at exit (for reports).
DIFFS = {}


def record(name: str, value: float) -> None:
    DIFFS[name] = max(value, DIFFS.get(name, 0.0))


def _print_diffs():
    if DIFFS and os.environ.get("BLIP2_PRINT_DIFFS"):
        print("\nmax abs differences:", file=sys.stderr)
        for k in sorted(DIFFS):
            print(f"  {k:55s} {DIFFS[k]:.3g}", file=sys.stderr)


atexit.register(_print_diffs)
