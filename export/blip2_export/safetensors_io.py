"""Our own reader and writer of the safetensors format (no `safetensors` package needed).

Layout of a file:

    u64 little-endian N | N bytes of JSON header | raw little-endian tensor data

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the first byte after the header) and may hold a "__metadata__" dict of strings.
Hugging Face's writer pads the header with spaces to a multiple of 8 bytes, sorts the tensors by
name and stores {"format": "pt"} as metadata; `save_file` does the same.
"""

import json
import os
import struct
import sys
from typing import Dict, Mapping, Optional, Tuple

import torch

__all__ = ["SafetensorsError", "DTYPES", "read_header", "load_file", "save_file"]

# safetensors dtype name -> (torch dtype, element size in bytes)
DTYPES: Dict[str, Tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_NAME_OF_DTYPE = {dt: name for name, (dt, _) in DTYPES.items()}

# A header larger than this is certainly a corrupt length field (the reference implementation
# uses the same 100 MB limit).
_MAX_HEADER = 100 * 1024 * 1024

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("safetensors_io supports little-endian hosts only")


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file (the message names the file and what is wrong)."""


def read_header(path: str) -> Tuple[Dict[str, dict], Dict[str, str], int]:
    """Returns (tensor entries, metadata, byte offset of the data section) after validating them."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise SafetensorsError(f"{path}: file too short for a safetensors header ({size} bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} is invalid for a file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: __metadata__ is not an object")
    data_start = 8 + n
    data_len = size - data_start
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise SafetensorsError(f"{path}: entry {name!r} lacks dtype/shape/data_offsets")
        if e["dtype"] not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']!r}")
        shape = e["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SafetensorsError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
        begin, end = e["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        if not (0 <= begin <= end <= data_len) or end - begin != numel * DTYPES[e["dtype"]][1]:
            raise SafetensorsError(
                f"{path}: tensor {name!r} data_offsets {[begin, end]} do not fit dtype {e['dtype']} "
                f"shape {shape} within {data_len} data bytes (truncated or corrupt file?)")
    return header, metadata, data_start


def load_file(path: str, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """Reads every tensor of a safetensors file. Each tensor owns its memory (no mmap kept open)."""
    header, _, data_start = read_header(path)
    out: Dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        # Read in file order: sequential I/O on multi-GB shards.
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype, _ = DTYPES[e["dtype"]]
            begin, end = e["data_offsets"]
            if end == begin:
                t = torch.empty(e["shape"], dtype=dtype)
            else:
                f.seek(data_start + begin)
                buf = bytearray(end - begin)  # writable, so torch.frombuffer does not warn
                if f.readinto(buf) != len(buf):
                    raise SafetensorsError(f"{path}: unexpected end of file in tensor {name!r}")
                t = torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])
            out[name] = t.to(device) if device != "cpu" else t
    return out


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.numpy().tobytes()


def save_file(tensors: Mapping[str, torch.Tensor], path: str,
              metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes tensors as Hugging Face does: keys sorted, data in key order, `__metadata__`
    {"format": "pt"} (plus `metadata`), header space-padded to a multiple of 8 bytes."""
    meta = {"format": "pt"}
    if metadata:
        meta.update({str(k): str(v) for k, v in metadata.items()})
    header: Dict[str, object] = {"__metadata__": meta}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _NAME_OF_DTYPE:
            raise SafetensorsError(f"cannot store tensor {name!r} of dtype {t.dtype}")
        b = _tensor_bytes(t)
        header[name] = {"dtype": _NAME_OF_DTYPE[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
