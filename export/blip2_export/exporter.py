"""HF BLIP-2 checkpoint folder -> blip2-node model folder (format version 2, see export/README.md).

One exporter for the whole family, by config.json:
  * Blip2ForConditionalGeneration / Blip2Model with an OPT text model -> architecture "opt"
    (image_encoder.pt + language_model.pt over one slot KV cache);
  * the same with a T5 / Flan-T5 text model -> architecture "t5" (image_encoder.pt +
    language_model.pt over a decoder self-attention cache and a cross-attention cache);
  * Blip2ForImageTextRetrieval / Blip2TextModelWithProjection / Blip2VisionModelWithProjection ->
    architecture "itm" (retrieval.pt, no language model).

export() reads and validates config.json, plans the checkpoint → parameter mapping on the file
headers alone (weights.py), streams the weights into safetensors shards in the requested dtype,
scripts the weight-free modules (torchscript.py), copies the checkpoint's side files and writes
manifest.json last, so a folder with a manifest is complete. Files are written under temporary
names and renamed. Two exports of one checkpoint are byte identical, wherever the exporter and the
output live (with PYTHONHASHSEED=0, which the CLI sets).
"""

import hashlib
import json
import os
import shutil
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import __version__, modeling_opt, modeling_t5, torchscript, weights
from .checkpoint import CheckpointReader, fast_init, load_config, progress, read_json
from .errors import ExportError
from .modeling_blip_2 import (
    IMAGE_ENCODER_METHODS_EXTRA, Blip2Config, Blip2ForConditionalGeneration, Blip2ImageEncoder,
    Blip2RetrievalEncoder, Blip2RetrievalModel, model_parts, retrieval_methods, served_classes)

# torch 2.x marks torch.jit as deprecated (still supported; libtorch loads these files): not news
# for our users on every export.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)

FORMAT = "blip2-node-model"
FORMAT_VERSION = 2

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# T5 has relative positions, so nothing in the checkpoint bounds its lengths: the cache sizes the
# runtime allocates get these defaults (Flan-T5's tokenizer model_max_length).
T5_DEFAULT_MAX_LENGTH = 512
T5_DEFAULT_MAX_ENCODER_LENGTH = 512

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
    # `forward` in stages (a scheduler interleaves them with decode steps); exports before these
    # lack them and are encoded whole.
    "num_vision_layers": {"inputs": [], "outputs": ["layers: int"]},
    "encode_start": {"inputs": ["pixel_values: float[B,3,H,W]"], "outputs": ["hidden_states: float[B,P+1,Dv]"]},
    "encode_layers": {"inputs": ["hidden_states: float[B,P+1,Dv]", "start: int", "end: int"],
                      "outputs": ["hidden_states: float[B,P+1,Dv]"]},
    "encode_finish": {"inputs": ["hidden_states: float[B,P+1,Dv]"], "outputs": ["language_model_inputs: float[B,Q,E]"]},
    **IMAGE_ENCODER_METHODS_EXTRA,
}

# language_model.pt's methods per architecture (each module file defines its contract).
LANGUAGE_MODEL_METHODS = modeling_opt.LANGUAGE_MODEL_METHODS
T5_LANGUAGE_MODEL_METHODS = modeling_t5.LANGUAGE_MODEL_METHODS


def _eos_list(v: Any) -> Optional[list]:
    if v is None:
        return None
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def special_tokens(hf_dir: str, config: Dict[str, Any], cfg: Blip2Config) -> Dict[str, Any]:
    """Each id from generation_config.json when it has the key, else from text_config, else the
    text model's defaults (OPTConfig's; T5: no bos, eos 1, pad 0, and the decoder starts with the
    pad token as T5 is trained to). Retrieval folders: only the Q-Former's pad_token_id (its text
    embeddings' padding_idx, the BERT tokenizer's [PAD]); the rest is null."""
    if cfg.is_retrieval:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": cfg.qformer.pad_token_id,
                "decoder_start_token_id": None}
    gen_path = os.path.join(hf_dir, "generation_config.json")
    gen = read_json(gen_path) if os.path.isfile(gen_path) else {}
    text = config.get("text_config") or {}
    t = cfg.text
    if cfg.language_model_type == "t5":
        defaults = {"bos_token_id": None, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
                    "decoder_start_token_id": t.decoder_start_token_id}
    else:
        defaults = {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
                    "pad_token_id": t.pad_token_id, "decoder_start_token_id": None}
    out = {}
    for key, default in defaults.items():
        v = gen[key] if key in gen else text.get(key, default)
        out[key] = _eos_list(v) if key == "eos_token_id" else (int(v) if v is not None else None)
    if cfg.language_model_type == "t5" and out["decoder_start_token_id"] is None:
        if out["pad_token_id"] is None:
            raise ExportError("the T5 checkpoint names no decoder_start_token_id (generation_config.json or "
                              "text_config) and no pad_token_id to start with")
        out["decoder_start_token_id"] = out["pad_token_id"]
    return out


def _lengths(cfg: Blip2Config, max_length: Optional[int],
             max_encoder_length: Optional[int]) -> Tuple[Optional[int], Optional[int]]:
    """(max_length, max_encoder_length) for the manifest, validated against the architecture."""
    kind = cfg.language_model_type
    if kind is None:
        if max_length is not None or max_encoder_length is not None:
            raise ExportError(f"--max-length / --max-encoder-length size language-model caches; "
                              f"{cfg.architecture} (image-text retrieval) has none")
        return None, None
    if kind == "opt":
        if max_encoder_length is not None:
            raise ExportError("--max-encoder-length applies to encoder-decoder (T5) checkpoints; this one is OPT")
        max_pos = cfg.text.max_position_embeddings
        if max_length is None:
            max_length = max_pos
        if max_length > max_pos:
            raise ExportError(f"--max-length {max_length} exceeds the language model's "
                              f"max_position_embeddings ({max_pos})")
        if max_length <= cfg.num_query_tokens:
            raise ExportError(f"--max-length {max_length} leaves no room after the {cfg.num_query_tokens} "
                              f"image tokens")
        return max_length, None
    if max_length is None:
        max_length = T5_DEFAULT_MAX_LENGTH
    if max_encoder_length is None:
        max_encoder_length = T5_DEFAULT_MAX_ENCODER_LENGTH
    if max_length < 2:
        raise ExportError(f"--max-length {max_length} leaves no room for a token after the decoder start token")
    if max_encoder_length <= cfg.num_query_tokens:
        raise ExportError(f"--max-encoder-length {max_encoder_length} leaves no room after the "
                          f"{cfg.num_query_tokens} image tokens")
    return max_length, max_encoder_length


def _modules(cfg: Blip2Config, model: nn.Module) -> List[Tuple[str, nn.Module, Dict[str, Any]]]:
    """(name, module to script, its methods for the manifest) of each .pt file."""
    if cfg.is_retrieval:
        return [("retrieval", Blip2RetrievalEncoder(model), retrieval_methods(cfg))]
    lm_methods = T5_LANGUAGE_MODEL_METHODS if cfg.language_model_type == "t5" else LANGUAGE_MODEL_METHODS
    return [("image_encoder", Blip2ImageEncoder(model), IMAGE_ENCODER_METHODS),
            ("language_model", model.language_model, lm_methods)]


def _shape_fields(cfg: Blip2Config, max_length: Optional[int], max_encoder_length: Optional[int],
                  specials: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest's architecture-specific fields (between `classes` and `weights`)."""
    v, q = cfg.vision, cfg.qformer
    vision = {"hidden_size": v.hidden_size, "num_layers": v.num_hidden_layers, "patch_size": v.patch_size,
              "num_positions": v.num_positions}
    common = {"num_query_tokens": cfg.num_query_tokens, "image_token_index": cfg.image_token_index,
              "image_size": [v.image_size, v.image_size]}
    kind = cfg.language_model_type
    if kind is None:
        parts = set(model_parts(cfg))
        has_vision = "vision_model" in parts
        if not has_vision:
            common["image_size"] = None  # no vision model: images cannot be encoded
        return {
            **common,
            "image_text_hidden_size": cfg.image_text_hidden_size,
            "special_tokens": specials,
            # Which of Blip2ForImageTextRetrieval's parts the weights have (HF's attribute names).
            "parts": {p: p in parts for p in ("vision_model", "embeddings", "vision_projection", "text_projection",
                                              "itm_head")},
            "vision": vision if has_vision else None,
            # max_position_embeddings: the longest text (Q-Former tokens, image tokens not counted).
            "qformer": {"hidden_size": q.hidden_size, "num_layers": q.num_hidden_layers, "vocab_size": q.vocab_size,
                        "max_position_embeddings": q.max_position_embeddings,
                        "encoder_hidden_size": q.encoder_hidden_size,
                        "use_qformer_text_input": q.use_qformer_text_input},
        }
    t = cfg.text
    if kind == "opt":
        lm = {"num_layers": t.num_hidden_layers, "num_heads": t.num_attention_heads, "head_dim": t.head_dim,
              "hidden_size": t.hidden_size, "embed_dim": t.word_embed_proj_dim,
              "max_position_embeddings": t.max_position_embeddings, "vocab_size": t.vocab_size}
        lengths = {"max_length": max_length}
    else:
        # num_layers: the decoder's (both caches have one entry per decoder layer).
        lm = {"num_layers": t.num_decoder_layers, "num_encoder_layers": t.num_layers, "num_heads": t.num_heads,
              "head_dim": t.d_kv, "hidden_size": t.d_model, "embed_dim": t.d_model, "vocab_size": t.vocab_size}
        lengths = {"max_length": max_length, "max_encoder_length": max_encoder_length}
    return {**common, **lengths, "vocab_size": t.vocab_size, "special_tokens": specials, "language_model": lm,
            "vision": vision, "qformer": {"hidden_size": q.hidden_size, "num_layers": q.num_hidden_layers,
                                          "encoder_hidden_size": q.encoder_hidden_size}}


def export(hf_dir: str, out_dir: str, dtype: str = "float32", max_length: Optional[int] = None,
           report: Optional[Callable[[str], None]] = progress,
           max_encoder_length: Optional[int] = None) -> Dict[str, Any]:
    """Exports and returns the manifest. Raises ExportError for anything the user can fix. The
    module files are byte identical across runs when PYTHONHASHSEED=0 (the CLI ensures it).
    max_length: longest sequence a cache slot holds (OPT: image tokens + prompt + new tokens, at
    most max_position_embeddings, the default; T5: decoder start + new tokens, default 512);
    max_encoder_length (T5 only): longest encoder input (image tokens + prompt), default 512."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    config = load_config(hf_dir)
    cfg = Blip2Config.from_dict(config)
    max_length, max_encoder_length = _lengths(cfg, max_length, max_encoder_length)
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
        model = (Blip2RetrievalModel(cfg) if cfg.is_retrieval else Blip2ForConditionalGeneration(cfg)).eval()
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
    for name, module, methods in _modules(cfg, model):
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

    fields = _shape_fields(cfg, max_length, max_encoder_length, specials)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": cfg.language_model_type or "itm",
        "dtype": dtype,
        "exporter": {"version": __version__, "torch": torch.__version__.split("+")[0]},
        # config.json's architecture, and the transformers classes this folder can serve.
        "checkpoint_class": cfg.architecture,
        "classes": served_classes(cfg),
        **fields,
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
