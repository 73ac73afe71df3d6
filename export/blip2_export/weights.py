"""The weights of a model folder: a checkpoint's tensors, renamed and converted, streamed into
safetensors shards with bounded memory.

The model's `prepare_state_dict` (the checkpoint → our parameter names rules: dropped keys, fused
biases, tied heads) runs once on meta tensors, which tells for every output key the checkpoint key
it is a plain copy of. Only the few derived ones (fused q/v biases) need the rules again on real
data. The shards are then written one at a time: the tensors of one shard are read (only their
files opened), converted to their output dtype and saved, so an export holds about one shard
(`SHARD_BYTES`) plus what the checkpoint reader maps, not the whole model. Tied parameters are
stored once: `aliases` maps the other names to the stored one. A checkpoint that stores a tied
weight again must hold the same values: the rules ask `require_equal`, which on meta tensors is
recorded and run on the data once the plan is made (two tensors read at a time).
"""

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Pattern, Sequence, Tuple

import torch

from .checkpoint import CheckpointReader
from .errors import ExportError

SHARD_BYTES = 2 * 1024 ** 3

# transformers 5 keeps these in float32 when a model is loaded in float16 (`_keep_in_fp32_modules`:
# ["query_tokens", "qformer"] for BLIP-2, ["wo"] for T5; its dtype plan applies them to float16
# only, a bfloat16 load converts everything); so do we.
KEEP_FLOAT32: Sequence[Pattern[str]] = (
    re.compile(r"^query_tokens$"),
    re.compile(r"^qformer\."),
    re.compile(r"\.wo\.(weight|bias)$"),
)


# Value checks the state-dict rules ask for while plan() runs them on meta tensors (see require_equal).
_deferred: Optional[List[Tuple[torch.Tensor, torch.Tensor, str]]] = None


@contextlib.contextmanager
def _deferring() -> Iterator[List[Tuple[torch.Tensor, torch.Tensor, str]]]:
    global _deferred
    saved, _deferred = _deferred, []
    try:
        yield _deferred
    finally:
        _deferred = saved


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(a, b)


def require_equal(a: torch.Tensor, b: torch.Tensor, message: str) -> None:
    """For the state-dict rules: raises ExportError(message) unless `a` and `b` hold the same values
    (a checkpoint's duplicate of a tied weight). Meta tensors have no values: while plan() runs the
    rules on the file headers the check is recorded and run on the checkpoint's data afterwards;
    elsewhere only the shapes are compared."""
    if a is b:
        return
    if a.is_meta or b.is_meta:
        if tuple(a.shape) != tuple(b.shape):
            raise ExportError(message)
        if _deferred is not None:
            _deferred.append((a, b, message))
        return
    if not _same_values(a, b):
        raise ExportError(message)


def keeps_float32(key: str) -> bool:
    return any(p.search(key) for p in KEEP_FLOAT32)


def output_dtype(key: str, stored: torch.dtype, target: torch.dtype) -> torch.dtype:
    if not stored.is_floating_point:
        return stored
    if target == torch.float16 and keeps_float32(key):
        return torch.float32
    return target


@dataclass
class WeightPlan:
    keys: List[str]                      # output keys, sorted (what the model expects)
    copies: Dict[str, str]               # output key -> checkpoint key it equals
    derived: Dict[str, torch.Tensor]     # output key -> computed tensor (real data)
    aliases: Dict[str, str]              # tied output key -> the stored key with the same data
    meta: Dict[str, torch.Tensor]        # output key -> meta tensor (shape, checkpoint dtype)

    @property
    def stored(self) -> List[str]:
        return [k for k in self.keys if k not in self.aliases]

    def stored_key(self, key: str) -> str:
        return self.aliases.get(key, key)


def plan(reader: CheckpointReader, prepare: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]) -> WeightPlan:
    meta_sd = reader.meta_state_dict()
    with _deferring() as checks:
        prepared = prepare(meta_sd)
    source_of = {id(t): k for k, t in meta_sd.items()}
    for a, b, message in checks:
        # Duplicates of tied weights: compared on the data, one pair at a time.
        ka, kb = source_of.get(id(a)), source_of.get(id(b))
        if ka is None or kb is None:
            raise ExportError(f"internal: a value check of the state-dict rules is on a derived tensor ({message})")
        data = reader.read([ka, kb])
        if not _same_values(data[ka], data[kb]):
            raise ExportError(message)
        del data
    copies = {k: source_of[id(t)] for k, t in prepared.items() if id(t) in source_of}
    derived_keys = [k for k in prepared if k not in copies]
    derived: Dict[str, torch.Tensor] = {}
    if derived_keys:
        # The rules once more on real data, for the inputs no output copies (small: biases).
        unused = [k for k in meta_sd if k not in set(copies.values())]
        real = dict(meta_sd)
        real.update(reader.read(unused))
        with _deferring():  # value checks ran above
            again = prepare(real)
        for k in derived_keys:
            if again[k].is_meta:
                raise ExportError(f"internal: weight {k} could not be computed from the checkpoint")
            derived[k] = again[k]
    # Tied outputs (same checkpoint tensor) are stored once, under the checkpoint's own name when
    # one of them has it (embed_tokens, not the tied lm_head).
    groups: Dict[str, List[str]] = {}
    for k in sorted(copies):
        groups.setdefault(copies[k], []).append(k)
    aliases: Dict[str, str] = {}
    for src, ks in groups.items():
        keep = src if src in ks else ks[0]
        aliases.update({k: keep for k in ks if k != keep})
    return WeightPlan(keys=sorted(prepared), copies=copies, derived=derived, aliases=aliases,
                      meta={k: v for k, v in prepared.items()})


@dataclass
class WrittenWeights:
    files: List[Dict[str, object]] = field(default_factory=list)  # {file, bytes, sha256}
    dtypes: Dict[str, str] = field(default_factory=dict)          # stored key -> torch dtype name
    total_bytes: int = 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 * 1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


def write(reader: CheckpointReader, weight_plan: WeightPlan, out_dir: str, target: torch.dtype,
          report: Optional[Callable[[str], None]] = None, shard_bytes: int = SHARD_BYTES) -> WrittenWeights:
    """Writes weights.safetensors (or weights-0000i-of-0000n.safetensors shards) into out_dir."""
    from safetensors.torch import save_file

    stored = weight_plan.stored
    size = {}
    for k in stored:
        m = weight_plan.meta[k]
        size[k] = m.numel() * torch.empty((), dtype=output_dtype(k, m.dtype, target)).element_size()
    shards: List[List[str]] = [[]]
    filled = 0
    for k in stored:
        if shards[-1] and filled + size[k] > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(k)
        filled += size[k]
    total = sum(size.values())
    names = (["weights.safetensors"] if len(shards) == 1 else
             [f"weights-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    written = WrittenWeights(total_bytes=total)
    if report is not None:
        report(f"weights to write: {total} bytes in {len(names)} file(s)")
    done = 0
    for name, keys in zip(names, shards):
        sources = reader.read([weight_plan.copies[k] for k in keys if k in weight_plan.copies])
        tensors: Dict[str, torch.Tensor] = {}
        for k in keys:
            t = sources[weight_plan.copies[k]] if k in weight_plan.copies else weight_plan.derived[k]
            tensors[k] = t.to(output_dtype(k, t.dtype, target)).contiguous()
            written.dtypes[k] = str(tensors[k].dtype).replace("torch.", "")
        del sources
        path = os.path.join(out_dir, name)
        save_file(tensors, path + ".tmp", metadata={"format": "pt"})
        del tensors
        os.chmod(path + ".tmp", 0o666 & ~_umask())  # the writer makes private files
        os.replace(path + ".tmp", path)
        done += sum(size[k] for k in keys)
        written.files.append({"file": name, "bytes": os.path.getsize(path), "sha256": _sha256(path)})
        if report is not None:
            report(f"weights written {done}/{total} bytes ({name})")
    return written
