"""BLIP-2 vision transformer, Q-Former and language projection, scriptable, with HF parameter names.

`Blip2ForConditionalGeneration` here has exactly the parameters of Hugging Face's class of the same
name (`vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`, `language_model.*`)
so a checkpoint's state dict loads with `load_state_dict(strict=True)` after `prepare_state_dict`
(tied lm_head, and the few keys HF itself ignores). Numerics follow transformers v4.45.1 (eager):

* vision attention scales the scores after q @ k^T (HF's order), with a fused `qkv` projection whose
  bias is the checkpoint's `qkv.bias` = [q_bias, k part, v_bias] used as stored (HF's conversion
  writes k as zeros; older `q_bias`/`v_bias` layouts are fused on load);
* the vision pooler output is `post_layernorm` applied a second time to the already normalised CLS
  row (HF quirk, kept);
* the Q-Former starts with `layernorm(query_tokens)`; all its masks are all-ones for image inputs,
  so HF's additive masks are exactly 0 and are left out; scores are divided by sqrt(head size);
  queries use the `intermediate_query`/`output_query` FFN.

`Blip2ImageEncoder` wraps the three image stages for export (methods `forward`, `vision_model`,
`qformer`, `language_projection`).
"""

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .activations import Activation
from .errors import ExportError
from .modeling_opt import OPTConfig, OPTForCausalLM

# --------------------------------------------------------------------------------------- configs


@dataclass
class VisionConfig:
    """HF Blip2VisionConfig fields that matter, with HF's defaults."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VisionConfig":
        cfg = cls(
            hidden_size=int(d.get("hidden_size", 1408)),
            intermediate_size=int(d.get("intermediate_size", 6144)),
            num_hidden_layers=int(d.get("num_hidden_layers", 39)),
            num_attention_heads=int(d.get("num_attention_heads", 16)),
            image_size=d.get("image_size", 224),
            patch_size=d.get("patch_size", 14),
            hidden_act=str(d.get("hidden_act", "gelu")),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            qkv_bias=bool(d.get("qkv_bias", True)),
        )
        if not isinstance(cfg.image_size, int) or not isinstance(cfg.patch_size, int):
            raise ExportError(f"vision_config.image_size/patch_size must be integers "
                              f"(got {cfg.image_size!r}, {cfg.patch_size!r})")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ExportError("vision_config.hidden_size is not divisible by num_attention_heads")
        return cfg

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class QFormerConfig:
    """HF Blip2QFormerConfig fields that matter, with HF's defaults."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False

    @classmethod
    def from_dict(cls, d: Dict[str, Any], vision_hidden_size: int) -> "QFormerConfig":
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            # relative_key(_query) adds distance embeddings to the self-attention; no BLIP-2
            # checkpoint uses it and we do not implement it.
            raise ExportError(f"qformer_config.position_embedding_type {pet!r} is not supported")
        cfg = cls(
            hidden_size=int(d.get("hidden_size", 768)),
            num_hidden_layers=int(d.get("num_hidden_layers", 12)),
            num_attention_heads=int(d.get("num_attention_heads", 12)),
            intermediate_size=int(d.get("intermediate_size", 3072)),
            hidden_act=str(d.get("hidden_act", "gelu")),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            cross_attention_frequency=int(d.get("cross_attention_frequency", 2)),
            # Blip2Config.__init__ overwrites qformer_config.encoder_hidden_size with the vision
            # hidden size, whatever config.json says; so do we.
            encoder_hidden_size=vision_hidden_size,
            use_qformer_text_input=bool(d.get("use_qformer_text_input", False)),
        )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ExportError("qformer_config.hidden_size is not divisible by num_attention_heads")
        if cfg.cross_attention_frequency < 1:
            raise ExportError("qformer_config.cross_attention_frequency must be >= 1")
        return cfg


# Architectures (config.json "architectures") with the parameter layout of
# Blip2ForConditionalGeneration; Blip2Model has the same parameter names.
SUPPORTED_ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2Model")
RETRIEVAL_ARCHITECTURES = ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection",
                           "Blip2VisionModelWithProjection")


@dataclass
class Blip2Config:
    vision: VisionConfig
    qformer: QFormerConfig
    text: OPTConfig
    num_query_tokens: int = 32
    image_token_index: Optional[int] = None
    architectures: List[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Blip2Config":
        mt = d.get("model_type")
        if mt != "blip-2":
            raise ExportError(f"config.json model_type is {mt!r}; this exporter handles BLIP-2 ('blip-2') only")
        archs = list(d.get("architectures") or [])
        bad = [a for a in archs if a in RETRIEVAL_ARCHITECTURES]
        if bad:
            raise ExportError(f"architecture {bad[0]} (image-text retrieval/matching) is not supported; "
                              f"only {SUPPORTED_ARCHITECTURES[0]} (OPT language model) can be exported")
        other = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if other:
            raise ExportError(f"architecture {other[0]} is not supported (expected {SUPPORTED_ARCHITECTURES[0]})")
        text = dict(d.get("text_config") or {})
        tmt = text.get("model_type", "opt")  # HF's default text config is OPT
        if tmt != "opt":
            kind = "T5 (Flan-T5) encoder-decoder" if tmt in ("t5", "mt5", "umt5") else repr(tmt)
            raise ExportError(f"text_config.model_type is {tmt!r}: {kind} language models are not supported "
                              f"by this exporter yet; only OPT")
        vision = VisionConfig.from_dict(dict(d.get("vision_config") or {}))
        qformer = QFormerConfig.from_dict(dict(d.get("qformer_config") or {}), vision.hidden_size)
        # Blip2Config copies the text config's tie_word_embeddings to the top level; the text config's
        # value is the one the language model honours.
        opt = OPTConfig.from_dict(text)
        iti = d.get("image_token_index", d.get("image_token_id"))
        cfg = cls(vision=vision, qformer=qformer, text=opt,
                  num_query_tokens=int(d.get("num_query_tokens", 32)),
                  image_token_index=int(iti) if iti is not None else None,
                  architectures=archs)
        if opt.hidden_size != opt.word_embed_proj_dim:
            # language_projection outputs text hidden_size but the token embeddings have
            # word_embed_proj_dim; HF's BLIP-2 cannot concatenate/scatter them either.
            raise ExportError(f"OPT word_embed_proj_dim ({opt.word_embed_proj_dim}) != hidden_size "
                              f"({opt.hidden_size}): BLIP-2 cannot feed the query embeddings to this LM")
        return cfg


# ---------------------------------------------------------------------------------- vision model


class Blip2VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_positions, cfg.hidden_size))

    def forward(self, pixel_values: Tensor) -> Tensor:
        batch_size = pixel_values.size(0)
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(target_dtype)).flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1).to(target_dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        return embeddings + self.position_embedding[:, : embeddings.size(1), :].to(target_dtype)


class Blip2Attention(nn.Module):
    num_heads: torch.jit.Final[int]
    scale: torch.jit.Final[float]

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.scale = (d // self.num_heads) ** -0.5
        # One fused projection; with qkv_bias its bias is [q_bias, 0, v_bias] as stored by HF.
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.projection = nn.Linear(d, d)

    def forward(self, hidden_states: Tensor) -> Tensor:
        bsz, tgt_len, embed_dim = hidden_states.size()
        mixed = self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, embed_dim // self.num_heads)
        mixed = mixed.permute(2, 0, 3, 1, 4)
        query, key, value = mixed[0], mixed[1], mixed[2]
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale
        probs = torch.softmax(scores, dim=-1)
        context = torch.matmul(probs, value).permute(0, 2, 1, 3)
        context = context.reshape(bsz, tgt_len, embed_dim)
        return self.projection(context)


class Blip2MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.activation_fn = Activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class Blip2EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = Blip2Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Blip2MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.self_attn(self.layer_norm1(hidden_states)) + hidden_states
        return self.mlp(self.layer_norm2(hidden_states)) + hidden_states


class Blip2Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([Blip2EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, hidden_states: Tensor) -> Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class Blip2VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = Blip2VisionEmbeddings(cfg)
        self.encoder = Blip2Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> Tuple[Tensor, Tensor]:
        last_hidden_state = self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
        # HF quirk: the pooler output is post_layernorm applied AGAIN to the (already normalised)
        # CLS row, so it differs from last_hidden_state[:, 0].
        pooled_output = self.post_layernorm(last_hidden_state[:, 0, :])
        return last_hidden_state, pooled_output


# -------------------------------------------------------------------------------------- Q-Former


class Blip2QFormerMultiHeadAttention(nn.Module):
    num_heads: torch.jit.Final[int]
    head_size: torch.jit.Final[int]
    all_head_size: torch.jit.Final[int]

    def __init__(self, cfg: QFormerConfig, is_cross_attention: bool):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_size = cfg.hidden_size // cfg.num_attention_heads
        self.all_head_size = self.num_heads * self.head_size
        kv_in = cfg.encoder_hidden_size if is_cross_attention else cfg.hidden_size
        self.query = nn.Linear(cfg.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_in, self.all_head_size)
        self.value = nn.Linear(kv_in, self.all_head_size)

    def _split(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), self.num_heads, self.head_size).permute(0, 2, 1, 3)

    def forward(self, hidden_states: Tensor, kv_states: Tensor) -> Tensor:
        key = self._split(self.key(kv_states))
        value = self._split(self.value(kv_states))
        query = self._split(self.query(hidden_states))
        # HF divides by sqrt(head size) (the vision tower multiplies by its inverse instead).
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_size)
        probs = torch.softmax(scores, dim=-1)
        context = torch.matmul(probs, value).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), self.all_head_size)


class Blip2QFormerSelfOutput(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


class Blip2QFormerAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(cfg, is_cross_attention)
        self.output = Blip2QFormerSelfOutput(cfg)

    def forward(self, hidden_states: Tensor, kv_states: Tensor) -> Tensor:
        return self.output(self.attention(hidden_states, kv_states), hidden_states)


class Blip2QFormerIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.intermediate_act_fn = Activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(x))


class Blip2QFormerOutput(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


class Blip2QFormerLayer(nn.Module):
    """Query-only path of HF's layer: self-attention, cross-attention to the image (every
    `cross_attention_frequency`-th layer), query FFN. The text FFN (`intermediate`/`output`, only
    with use_qformer_text_input) never sees query tokens, so it is not built."""

    def __init__(self, cfg: QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = Blip2QFormerAttention(cfg)
        if layer_idx % cfg.cross_attention_frequency == 0:
            self.crossattention: Optional[Blip2QFormerAttention] = Blip2QFormerAttention(cfg, True)
        else:
            self.crossattention = None
        self.intermediate_query = Blip2QFormerIntermediate(cfg)
        self.output_query = Blip2QFormerOutput(cfg)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        attention_output = self.attention(hidden_states, hidden_states)
        crossattention = self.crossattention
        if crossattention is not None:
            attention_output = crossattention(attention_output, encoder_hidden_states)
        return self.output_query(self.intermediate_query(attention_output), attention_output)


class Blip2QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([Blip2QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers)])

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, encoder_hidden_states)
        return hidden_states


class Blip2QFormerModel(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Blip2QFormerEncoder(cfg)

    def forward(self, query_embeds: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        """last_hidden_state of the query tokens [B,Q,Dq]. With image inputs every attention mask
        HF builds is all ones, i.e. an additive 0, so no mask is applied."""
        return self.encoder(self.layernorm(query_embeds), encoder_hidden_states)


# ------------------------------------------------------------------------------- the whole model


class Blip2ForConditionalGeneration(nn.Module):
    """Eager model with HF's parameter names. Use `from_hf_state_dict` to load a checkpoint."""

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self.config = cfg
        self.vision_model = Blip2VisionModel(cfg.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer.hidden_size))
        self.qformer = Blip2QFormerModel(cfg.qformer)
        self.language_projection = nn.Linear(cfg.qformer.hidden_size, cfg.text.hidden_size)
        self.language_model = OPTForCausalLM(cfg.text)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """pixels -> language_model_inputs [B,Q,E]."""
        image_embeds = self.vision_model(pixel_values)[0]
        query = self.query_tokens.expand(image_embeds.size(0), -1, -1)
        return self.language_projection(self.qformer(query, image_embeds))

    def prepare_state_dict(self, sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return prepare_state_dict(self.config, sd, self.state_dict().keys())

    def load_hf_state_dict(self, sd: Dict[str, Tensor]) -> None:
        """Loads a checkpoint's state dict strictly (after `prepare_state_dict`), keeping dtypes of
        the module (copy_ converts)."""
        prepared = self.prepare_state_dict(sd)
        own = self.state_dict()
        shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                        for k, v in prepared.items() if tuple(v.shape) != tuple(own[k].shape)]
        if shape_errors:
            raise ExportError("checkpoint tensors do not match the shapes config.json implies:\n  "
                              + "\n  ".join(shape_errors[:20]))
        with torch.no_grad():
            self.load_state_dict(prepared, strict=True)

    @classmethod
    def from_hf(cls, config_dict: Dict[str, Any], sd: Dict[str, Tensor]) -> "Blip2ForConditionalGeneration":
        model = cls(Blip2Config.from_dict(config_dict))
        model.load_hf_state_dict(sd)
        return model.eval()


class Blip2ImageEncoder(nn.Module):
    """What image_encoder.pt holds: vision tower, query tokens, Q-Former, projection.
    (Submodules are renamed here because the exported methods take HF's names.)"""

    def __init__(self, model: Blip2ForConditionalGeneration):
        super().__init__()
        self.vision = model.vision_model
        self.query_tokens = model.query_tokens
        self.q_former = model.qformer
        self.projection = model.language_projection

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.language_projection(self.qformer(self.vision_model(pixel_values)[0]))

    @torch.jit.export
    def vision_model(self, pixel_values: Tensor) -> Tuple[Tensor, Tensor]:
        return self.vision(pixel_values)

    @torch.jit.export
    def qformer(self, image_embeds: Tensor) -> Tensor:
        query = self.query_tokens.expand(image_embeds.size(0), -1, -1)
        return self.q_former(query, image_embeds)

    @torch.jit.export
    def language_projection(self, query_output: Tensor) -> Tensor:
        return self.projection(query_output)


# ------------------------------------------------------------------------------ state dict rules

# Keys Hugging Face's Blip2ForConditionalGeneration has no parameter for, which from_pretrained
# drops (as "unused weights"), and which we drop too. Anything else unexpected is an error.
IGNORED_KEY_PATTERNS = (
    # Q-Former text FFN: exists only with use_qformer_text_input (retrieval/ITM checkpoints, or
    # checkpoints saved with the whole BERT-style Q-Former); the caption path never uses it.
    re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)$"),
    # Q-Former text embeddings (word/position embeddings, position_ids buffer) of older exports.
    re.compile(r"^qformer\.embeddings\."),
    # Non-persistent position_ids buffers some older checkpoints saved.
    re.compile(r"^vision_model\.embeddings\.position_ids$"),
)


def prepare_state_dict(cfg: Blip2Config, sd: Dict[str, Tensor], expected_keys) -> Dict[str, Tensor]:
    """Maps a HF checkpoint state dict onto our parameter set or raises ExportError listing every
    missing and unexpected key. Steps:
      1. drop the keys HF ignores (IGNORED_KEY_PATTERNS);
      2. fuse pre-4.45 `self_attn.q_bias`/`v_bias` into `qkv.bias` = [q_bias, 0, v_bias] (what HF's
         own conversion does);
      3. tie `language_model.lm_head.weight` to embed_tokens when tie_word_embeddings (a duplicate
         head in the checkpoint must then equal embed_tokens).
    """
    expected = set(expected_keys)
    out: Dict[str, Tensor] = {}
    for k, v in sd.items():
        if k in expected:
            out[k] = v
        elif any(p.search(k) for p in IGNORED_KEY_PATTERNS):
            continue
        else:
            out[k] = v  # reported below unless a later rule consumes it

    for i in range(cfg.vision.num_hidden_layers):
        pre = f"vision_model.encoder.layers.{i}.self_attn."
        if pre + "q_bias" in out and pre + "v_bias" in out and pre + "qkv.bias" not in out:
            q, v = out.pop(pre + "q_bias"), out.pop(pre + "v_bias")
            out[pre + "qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])

    head, emb = "language_model.lm_head.weight", "language_model.model.decoder.embed_tokens.weight"
    if cfg.text.tie_word_embeddings:
        if head in out and emb in out and not torch.equal(out[head], out[emb]):
            raise ExportError(f"{head} differs from {emb} but text_config.tie_word_embeddings is true; "
                              f"set it to false in config.json to use the separate head")
        if emb in out:
            out[head] = out[emb]

    missing = sorted(expected - out.keys())
    unexpected = sorted(out.keys() - expected)
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:30])
                         + (" ..." if len(missing) > 30 else ""))
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:30])
                         + (" ..." if len(unexpected) > 30 else ""))
        raise ExportError("checkpoint does not match config.json: " + "; ".join(lines))
    return out
