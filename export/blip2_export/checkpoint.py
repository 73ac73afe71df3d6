"""Reading a Hugging Face checkpoint folder: config.json plus weights in any of HF's layouts.

Weights are looked up in this order (the order `from_pretrained` prefers):
  model.safetensors | model.safetensors.index.json (+ shards) | pytorch_model.bin |
  pytorch_model.bin.index.json (+ shards)

Safetensors files are read with the `safetensors` package; `pytorch_model.bin` files with
`torch.load(weights_only=True, mmap=True)`. Progress goes to stderr as lines starting with
`progress: ` so a CLI can relay them.
"""

import contextlib
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import ExportError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def progress(message: str) -> None:
    print(f"progress: {message}", file=sys.stderr, flush=True)


def read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} does not hold a JSON object")
    return data


def load_config(hf_dir: str) -> Dict[str, Any]:
    if not os.path.isdir(hf_dir):
        raise ExportError(f"{hf_dir} is not a directory")
    return read_json(os.path.join(hf_dir, "config.json"))


def weight_files(hf_dir: str) -> Tuple[str, List[str]]:
    """(layout, absolute paths of the files to read, in order)."""
    p = lambda name: os.path.join(hf_dir, name)  # noqa: E731
    if os.path.isfile(p(SAFETENSORS)):
        return "safetensors", [p(SAFETENSORS)]
    for index_name, layout in ((SAFETENSORS_INDEX, "safetensors"), (BIN, "bin"), (BIN_INDEX, "bin")):
        if not os.path.isfile(p(index_name)):
            continue
        if index_name == BIN:
            return "bin", [p(BIN)]
        index = read_json(p(index_name))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExportError(f"{p(index_name)} has no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(p(s))]
        if missing:
            raise ExportError(f"{p(index_name)} lists shard(s) that are not in the folder: {', '.join(missing)}")
        return layout, [p(s) for s in shards]
    raise ExportError(f"no weights in {hf_dir}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX}")


# safetensors dtype names (as its headers spell them) -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _load_bin(path: str) -> Dict[str, torch.Tensor]:
    """A pytorch_model.bin's tensors, memory-mapped (torch >= 2.1) so they are read on use."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - corrupt pickles raise all sorts of things
        raise ExportError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


class CheckpointReader:
    """A checkpoint's tensors by name: shapes and dtypes from the file headers at once, data on
    demand. `read` opens only the files it needs and closes them again, so memory-mapped pages of
    tensors already written out are not held (and not counted in RSS) for the rest of an export."""

    def __init__(self, hf_dir: str):
        self.layout, self.files = weight_files(hf_dir)
        self.file_of: Dict[str, str] = {}
        self._meta: Dict[str, torch.Tensor] = {}
        for path in self.files:
            for name, (dtype, shape) in self._headers(path).items():
                if name in self.file_of:
                    raise ExportError(f"{os.path.basename(path)} repeats tensor {name} of "
                                      f"{os.path.basename(self.file_of[name])}")
                self.file_of[name] = path
                self._meta[name] = torch.empty(shape, dtype=dtype, device="meta")

    def _headers(self, path: str) -> Dict[str, Tuple[torch.dtype, List[int]]]:
        if self.layout == "bin":
            return {k: (v.dtype, list(v.shape)) for k, v in _load_bin(path).items()}
        from safetensors import SafetensorError, safe_open
        out = {}
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise ExportError(f"{path}: tensor {name} has dtype {sl.get_dtype()}, which the exporter does not read")
                    out[name] = (dtype, list(sl.get_shape()))
        except SafetensorError as e:
            raise ExportError(f"cannot read {path}: {e}") from None
        except OSError as e:
            raise ExportError(f"cannot read {path}: {e}") from None
        return out

    def meta_state_dict(self) -> Dict[str, torch.Tensor]:
        """Every tensor as a meta tensor (shape and dtype, no data): for planning and checking."""
        return dict(self._meta)

    def nbytes(self, name: str) -> int:
        t = self._meta[name]
        return t.numel() * t.element_size()

    def read(self, names) -> Dict[str, torch.Tensor]:
        """The named tensors (CPU), file by file."""
        by_file: Dict[str, List[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        out: Dict[str, torch.Tensor] = {}
        for path, keys in by_file.items():
            if self.layout == "bin":
                part = _load_bin(path)
                out.update({k: part[k] for k in keys})
                continue
            from safetensors import SafetensorError, safe_open
            try:
                with safe_open(path, framework="pt") as f:
                    for k in keys:
                        out[k] = f.get_tensor(k)
            except SafetensorError as e:
                raise ExportError(f"cannot read {path}: {e}") from None
        return out


def load_state_dict(hf_dir: str, report: Optional[Callable[[str], None]] = progress) -> Dict[str, torch.Tensor]:
    """All tensors of the checkpoint in one dict (CPU). Raises ExportError on unreadable files and
    on a key found in two shards."""
    reader = CheckpointReader(hf_dir)
    sd: Dict[str, torch.Tensor] = {}
    for i, path in enumerate(reader.files):
        if report is not None:
            what = "shard" if len(reader.files) > 1 else "weights"
            report(f"loading {what} {i + 1}/{len(reader.files)} {os.path.basename(path)}")
        sd.update(reader.read([k for k, p in reader.file_of.items() if p == path]))
    return sd


def load_checkpoint(hf_dir: str, report: Optional[Callable[[str], None]] = progress
                    ) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict)."""
    config = load_config(hf_dir)
    return config, load_state_dict(hf_dir, report)


@contextlib.contextmanager
def fast_init(dtype: torch.dtype = torch.float32):
    """Builds modules without random initialisation (every parameter is overwritten by the strict
    load right after) and directly in `dtype`, so a multi-billion-parameter model neither spends
    minutes in init nor exists twice in memory."""
    classes = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm)
    saved = [(c, c.reset_parameters) for c in classes]
    old_dtype = torch.get_default_dtype()
    try:
        for c in classes:
            c.reset_parameters = lambda self: None
        torch.set_default_dtype(dtype)
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        for c, f in saved:
            c.reset_parameters = f


def build_model(hf_dir: str, report: Optional[Callable[[str], None]] = progress,
                dtype: Optional[torch.dtype] = None):
    """Reads the folder and returns our eager Blip2ForConditionalGeneration (eval mode) with the
    checkpoint's weights, in `dtype` (default: the checkpoint's floating dtype)."""
    from .modeling_blip_2 import Blip2Config, Blip2ForConditionalGeneration

    config = load_config(hf_dir)
    cfg = Blip2Config.from_dict(config)  # validate before reading gigabytes
    sd = load_state_dict(hf_dir, report)
    if dtype is None:
        dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if report is not None:
        report("building modules")
    with fast_init(dtype):
        model = Blip2ForConditionalGeneration(cfg)
    if report is not None:
        report("loading weights into modules")
    model.load_hf_state_dict(sd)  # copy_ converts each tensor to the module's dtype
    del sd
    return model.eval()
