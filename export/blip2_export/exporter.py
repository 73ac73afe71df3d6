"""HF BLIP-2 checkpoint folder -> blip2-node model folder (format version 2, see export/README.md).

export() reads and validates config.json, plans the checkpoint → parameter mapping on the file
headers alone (weights.py), streams the weights into safetensors shards in the requested dtype,
scripts the weight-free modules (torchscript.py: image_encoder.pt, language_model.pt), copies the
checkpoint's side files and writes manifest.json last, so a folder with a manifest is complete.
Files are written under temporary names and renamed. Two exports of one checkpoint are byte
identical, wherever the exporter and the output live.
"""

import hashlib
import json
import os
import shutil
import warnings
from typing import Any, Callable, Dict, Optional

import torch

from . import __version__, torchscript, weights
from .checkpoint import CheckpointReader, fast_init, load_config, progress, read_json
from .errors import ExportError
from .modeling_blip_2 import Blip2Config, Blip2ForConditionalGeneration, Blip2ImageEncoder

# torch 2.x marks torch.jit as deprecated (still supported; libtorch loads these files): not news
# for our users on every export.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)

FORMAT = "blip2-node-model"
FORMAT_VERSION = 2

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Copied verbatim from the checkpoint folder when present.
SIDE_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "spiece.model",
)

IMAGE_ENCODER_METHODS = {
    "forward": {"inputs": ["pixel_values: float[B,3,H,W]"],
                "outputs": ["language_model_inputs: float[B,Q,E]"]},
    "vision_model": {"inputs": ["pixel_values: float[B,3,H,W]"],
                     "outputs": ["last_hidden_state: float[B,P+1,Dv]", "pooler_output: float[B,Dv]"]},
    "qformer": {"inputs": ["image_embeds: float[B,P+1,Dv]"],
                "outputs": ["last_hidden_state: float[B,Q,Dq]"]},
    "language_projection": {"inputs": ["query_output: float[B,Q,Dq]"],
                            "outputs": ["language_model_inputs: float[B,Q,E]"]},
}

LANGUAGE_MODEL_METHODS = {
    "embed_tokens": {"inputs": ["input_ids: int64[N,T]"], "outputs": ["inputs_embeds: float[N,T,E]"]},
    "forward_full": {"inputs": ["inputs_embeds: float[B,T,E]", "attention_mask: int64[B,T]"],
                     "outputs": ["logits: float32[B,T,V]"]},
    "forward_cached": {"inputs": ["cache: float[L,2,S,H,M,Dh]", "inputs_embeds: float[N,T,E]", "slots: int64[N]",
                                  "start: int64[N]", "kv_len: int", "logit_index: Optional[int64[N]]"],
                       "outputs": ["logits: float32[N,T,V] (float32[N,V] with logit_index)"]},
    "decode": {"inputs": ["cache: float[L,2,S,H,M,Dh]", "input_ids: int64[N]", "slots: int64[N]",
                          "positions: int64[N]", "kv_len: int"],
               "outputs": ["logits: float32[N,V]"]},
}


def _eos_list(v: Any) -> Optional[list]:
    if v is None:
        return None
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def special_tokens(hf_dir: str, config: Dict[str, Any], cfg: Blip2Config) -> Dict[str, Any]:
    """Each id from generation_config.json when it has the key, else from text_config (with
    OPTConfig's defaults)."""
    gen_path = os.path.join(hf_dir, "generation_config.json")
    gen = read_json(gen_path) if os.path.isfile(gen_path) else {}
    text = config.get("text_config") or {}
    defaults = {"bos_token_id": cfg.text.bos_token_id, "eos_token_id": cfg.text.eos_token_id,
                "pad_token_id": cfg.text.pad_token_id, "decoder_start_token_id": None}
    out = {}
    for key, default in defaults.items():
        v = gen[key] if key in gen else text.get(key, default)
        out[key] = _eos_list(v) if key == "eos_token_id" else (int(v) if v is not None else None)
    return out


def export(hf_dir: str, out_dir: str, dtype: str = "float32", max_length: Optional[int] = None,
           report: Optional[Callable[[str], None]] = progress) -> Dict[str, Any]:
    """Exports and returns the manifest. Raises ExportError for anything the user can fix. The
    module files are byte identical across runs when PYTHONHASHSEED=0 (the CLI ensures it)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    config = load_config(hf_dir)
    cfg = Blip2Config.from_dict(config)
    max_pos = cfg.text.max_position_embeddings
    if max_length is None:
        max_length = max_pos
    if max_length > max_pos:
        raise ExportError(f"--max-length {max_length} exceeds the language model's "
                          f"max_position_embeddings ({max_pos})")
    if max_length <= cfg.num_query_tokens:
        raise ExportError(f"--max-length {max_length} leaves no room after the {cfg.num_query_tokens} "
                          f"image tokens")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.path.samefile(out_dir, hf_dir):
        raise ExportError("the output folder must differ from the checkpoint folder")
    specials = special_tokens(hf_dir, config, cfg)

    stale = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(stale):
        os.remove(stale)  # a folder is complete only once its new manifest is written

    target = DTYPES[dtype]
    reader = CheckpointReader(hf_dir)
    if report is not None:
        report(f"checkpoint: {len(reader.files)} file(s), {len(reader.file_of)} tensors")
    with fast_init(target):
        # Parameters are allocated (not touched, so not resident) and never filled: the modules
        # are scripted without their weights, which go to the safetensors shards directly.
        model = Blip2ForConditionalGeneration(cfg).eval()
    weight_plan = weights.plan(reader, model.prepare_state_dict)
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers())
    shape_errors = [f"{k}: checkpoint {tuple(weight_plan.meta[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in weight_plan.keys if k in own and tuple(weight_plan.meta[k].shape) != tuple(own[k].shape)]
    if shape_errors:
        raise ExportError("checkpoint tensors do not match the shapes config.json implies:\n  "
                          + "\n  ".join(shape_errors[:20]))
    os.makedirs(out_dir, exist_ok=True)
    written = weights.write(reader, weight_plan, out_dir, target, report)
    key_of = {id(p): weight_plan.stored_key(name) for name, p in own.items() if name in weight_plan.meta}

    modules = {}
    for name, module, methods in (("image_encoder", Blip2ImageEncoder(model), IMAGE_ENCODER_METHODS),
                                  ("language_model", model.language_model, LANGUAGE_MODEL_METHODS)):
        if report is not None:
            report(f"scripting {name.replace('_', ' ')}")
        file = f"{name}.pt"
        parameters, blob = torchscript.script_weight_free(module, key_of, os.path.join(out_dir, file))
        modules[name] = {"file": file, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                         "methods": methods, "parameters": parameters}
    del model

    if report is not None:
        report("copying side files")
    for name in SIDE_FILES:
        src = os.path.join(hf_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))

    t, v, q = cfg.text, cfg.vision, cfg.qformer
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": "opt",
        "dtype": dtype,
        "exporter": {"version": __version__, "torch": torch.__version__.split("+")[0]},
        "num_query_tokens": cfg.num_query_tokens,
        "image_token_index": cfg.image_token_index,
        "image_size": [v.image_size, v.image_size],
        "max_length": max_length,
        "vocab_size": t.vocab_size,
        "special_tokens": specials,
        "language_model": {"num_layers": t.num_hidden_layers, "num_heads": t.num_attention_heads,
                           "head_dim": t.head_dim, "hidden_size": t.hidden_size,
                           "embed_dim": t.word_embed_proj_dim, "max_position_embeddings": t.max_position_embeddings},
        "vision": {"hidden_size": v.hidden_size, "num_layers": v.num_hidden_layers,
                   "patch_size": v.patch_size, "num_positions": v.num_positions},
        "qformer": {"hidden_size": q.hidden_size, "num_layers": q.num_hidden_layers},
        # keep_float32: the weights that stay float32 whenever the model runs in float16 (stored
        # so in a float16 export; a float32 export run in float16 keeps them too).
        "weights": {"files": written.files, "bytes": written.total_bytes,
                    "keep_float32": sorted(k for k in written.dtypes if weights.keeps_float32(k))},
        "modules": modules,
    }
    tmp = os.path.join(out_dir, "manifest.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, "manifest.json"))
    if report is not None:
        report("done")
    return manifest
