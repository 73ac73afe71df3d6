"""Weight-free, reproducible TorchScript files.

A model folder keeps its weights in safetensors files (memory-mapped at load) and its code in
TorchScript archives that hold no weights: every parameter is replaced by an empty tensor before
scripting, and the manifest maps each parameter's path inside the module to the weight key the
runtime binds to it (`bind_weights` here, `native/core/weights.cc` in the addon).

torch.jit.save records the absolute path of every source file it scripted (the exporter's own
files, and torch's) in the archive's `*.debug_pkl` records, so two exports from clones at
different paths would differ. `save_reproducible` rewrites those strings to package-relative
names ("blip2_export/modeling_opt.py", "torch/nn/functional.py") and writes the archive to memory
first, so its internal folder name does not depend on the output file name either.
"""

import io
import os
import struct
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .errors import ExportError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def parameter_keys(module: nn.Module, key_of: Dict[int, str]) -> Dict[str, str]:
    """{parameter path inside `module`: weight key} for every parameter, found by identity in
    `key_of` ({id(parameter): key} of the full model). Raises for a parameter with no key."""
    out: Dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        key = key_of.get(id(param))
        if key is None:
            raise ExportError(f"internal: parameter {name} of {type(module).__name__} has no weight key")
        out[name] = key
    return out


def strip_parameters(module: nn.Module) -> None:
    """Replaces every parameter by an empty tensor of its dtype (the runtime binds the real ones)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(torch.empty(0, dtype=param.dtype), requires_grad=False)


def _relative(path: str) -> str:
    for root, prefix in ((_PACKAGE_DIR, "blip2_export"), (_TORCH_DIR, "torch")):
        if path.startswith(root + os.sep):
            return prefix + "/" + os.path.relpath(path, root).replace(os.sep, "/")
    return os.path.basename(path)


def _rewrite_paths(pickle_bytes: bytes, strings: Iterable[str]) -> bytes:
    """Replaces absolute paths inside a pickle by relative ones. Strings in torch's pickles are
    BINUNICODE ('X', u32 length, UTF-8) and nothing refers to byte offsets, so a string can change
    length in place. (Unpickling and pickling again would lose torch's typed-list markers.)"""
    for s in strings:
        if not s.startswith("/"):
            continue
        old, new = s.encode("utf-8"), _relative(s).encode("utf-8")
        pickle_bytes = pickle_bytes.replace(b"X" + struct.pack("<I", len(old)) + old,
                                            b"X" + struct.pack("<I", len(new)) + new)
    return pickle_bytes


def _absolute_paths(debug_pkl: bytes) -> List[str]:
    """Path-like strings of a debug_pkl record (its string table), read without unpickling."""
    found, at = [], 0
    marker = b"X"
    while True:
        at = debug_pkl.find(marker, at)
        if at < 0 or at + 5 > len(debug_pkl):
            return found
        (length,) = struct.unpack("<I", debug_pkl[at + 1:at + 5])
        body = debug_pkl[at + 5:at + 5 + length]
        if len(body) == length and body.startswith(b"/") and body.endswith(b".py") and b"\n" not in body:
            try:
                found.append(body.decode("utf-8"))
            except UnicodeDecodeError:
                pass
        at += 1


def save_reproducible(scripted: torch.jit.ScriptModule, path: str) -> Tuple[int, bytes]:
    """Saves `scripted` with package-relative source paths; returns (bytes written, file bytes)."""
    raw = io.BytesIO()
    torch.jit.save(scripted, raw)
    raw.seek(0)
    reader = torch._C.PyTorchFileReader(raw)
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for name in reader.get_all_records():
        if name in ("version", ".data/version", ".data/serialization_id"):
            continue  # written by write_end_of_file
        data = reader.get_record(name)
        if name.endswith(".debug_pkl"):
            data = _rewrite_paths(data, _absolute_paths(data))
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer
    blob = out.getvalue()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return len(blob), blob


def script_weight_free(module: nn.Module, key_of: Dict[int, str], path: str) -> Tuple[Dict[str, str], bytes]:
    """Scripts `module` without its weights into `path`. Returns ({parameter path: weight key},
    the file's bytes). `module` is left with empty parameters."""
    keys = parameter_keys(module, key_of)
    strip_parameters(module)
    scripted = torch.jit.script(module.eval())
    _, blob = save_reproducible(scripted, path)
    return keys, blob


def bind_weights(module: torch.jit.ScriptModule, parameters: Dict[str, str], tensors: Dict[str, torch.Tensor]) -> None:
    """The Python twin of the runtime's binding (tests, benchmarks): sets each parameter path of a
    loaded weight-free module to its tensor."""
    for name, key in parameters.items():
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            owner = getattr(owner, part)
        owner._c.setattr(leaf, tensors[key])


def load_model_folder(out_dir: str, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.jit.ScriptModule]:
    """{module name: loaded module with its weights bound}, as the runtime loads a model folder
    (for tests and benchmarks; optionally cast to `dtype`, keeping the manifest's float32 keys)."""
    import json

    from safetensors.torch import load_file

    with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    tensors: Dict[str, torch.Tensor] = {}
    for entry in manifest["weights"]["files"]:
        tensors.update(load_file(os.path.join(out_dir, entry["file"])))
    if dtype is not None:
        keep = set(manifest["weights"]["keep_float32"]) if dtype == torch.float16 else set()
        tensors = {k: (v.float() if k in keep else v.to(dtype)) if v.is_floating_point() else v for k, v in tensors.items()}
    out = {}
    for name, entry in manifest["modules"].items():
        module = torch.jit.load(os.path.join(out_dir, entry["file"]))
        bind_weights(module, entry["parameters"], tensors)
        out[name] = module.eval()
    return out
