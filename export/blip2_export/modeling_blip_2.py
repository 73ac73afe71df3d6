"""BLIP-2 vision transformer, Q-Former, language projection and the image-text retrieval heads,
scriptable, with HF parameter names.

`Blip2ForConditionalGeneration` here has exactly the parameters of Hugging Face's class of the same
name (`vision_model.*`, `query_tokens`, `qformer.*`, `language_projection.*`, `language_model.*`,
the language model being OPT (modeling_opt.OPTForCausalLM) or Flan-T5 (modeling_t5.
T5ForConditionalGeneration) as text_config.model_type says) so a checkpoint's state dict loads with
`load_state_dict(strict=True)` after `prepare_state_dict` (tied lm_head / T5 embeddings, and the few
keys HF itself ignores). `Blip2RetrievalModel` has the parameters of
HF's `Blip2ForImageTextRetrieval`, `Blip2TextModelWithProjection` or `Blip2VisionModelWithProjection`
(`prepare_retrieval_state_dict`). Numerics follow transformers 5.18 (eager and sdpa agree to
~1e-6; v4.45.1, which the caption fixtures come from, computes the same):

* vision attention scales the scores after q @ k^T (HF's order), with a fused `qkv` projection whose
  bias is the checkpoint's `qkv.bias` = [q_bias, k part, v_bias] used as stored (HF's conversion
  writes k as zeros; older `q_bias`/`v_bias` layouts are fused on load);
* the vision pooler output is `post_layernorm` applied a second time to the already normalised CLS
  row (HF quirk, kept);
* the Q-Former starts with `layernorm` of its input embeddings (query tokens, then text embeddings
  when there is text); scores are multiplied by head_size**-0.5; positions below `query_length` use
  the `intermediate_query`/`output_query` FFN and cross-attend to the image, text positions use
  `intermediate`/`output` and never see the image. Masks (text padding, encoder_attention_mask) hide
  keys whose mask value is 0; HF adds finfo.min there, we replace the score (same softmax, finite).
  With image inputs only, every mask HF builds is all ones, so the caption path
  (`Blip2QFormerModel.forward`) applies none;
* half precision as transformers 5 loads it (`_keep_in_fp32_modules = ["query_tokens", "qformer"]`,
  applied by HF for float16 only, see `to_dtype_like_hf`): the Q-Former casts its inputs to its own
  dtype, and its outputs are cast to the consumer's dtype exactly where HF casts them (the
  image_embeds dtype before language_projection, `.to(projection.weight.dtype)` before the
  retrieval projections and the ITM head). Text embeddings (`embeddings.*`) are not part of the
  Q-Former in HF and so are NOT kept in float32; query tokens concatenated to them are cast to
  their dtype first (HF does), then back to the Q-Former's.

`Blip2ImageEncoder` (image_encoder.pt) wraps the caption model's image stages (methods `forward`,
`vision_model`, `qformer`, `language_projection`, `qformer_forward`, and `forward` in stages:
`num_vision_layers`, `encode_start`, `encode_layers`, `encode_finish`); `Blip2RetrievalEncoder`
(retrieval.pt) wraps a `Blip2RetrievalModel` (methods `forward`, `vision_model`, `image_embeds`,
`text_embeds`, `itm`, `itm_pairs`, `itc`, `itc_logits`, `qformer_forward`). Each method's
contract is in its docstring and, in manifest form, in IMAGE_ENCODER_METHODS_EXTRA /
RETRIEVAL_ENCODER_METHODS.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import Activation
from .errors import ExportError
from . import modeling_t5
from .modeling_opt import OPTConfig, OPTForCausalLM, dtype_min
from .modeling_t5 import T5Config, T5ForConditionalGeneration
from .weights import require_equal

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
    """HF Blip2QFormerConfig fields that matter, with HF's defaults. vocab_size,
    max_position_embeddings and pad_token_id size the text embeddings (`Blip2TextEmbeddings`) of the
    retrieval architectures; use_qformer_text_input builds each layer's text FFN
    (`intermediate`/`output`) in them."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    pad_token_id: Optional[int] = 0

    @classmethod
    def from_dict(cls, d: Dict[str, Any], vision_hidden_size: int) -> "QFormerConfig":
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            # relative_key(_query) adds distance embeddings to the self-attention; no BLIP-2
            # checkpoint uses it and we do not implement it.
            raise ExportError(f"qformer_config.position_embedding_type {pet!r} is not supported")
        pad = d.get("pad_token_id", 0)
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
            vocab_size=int(d.get("vocab_size", 30522)),
            max_position_embeddings=int(d.get("max_position_embeddings", 512)),
            pad_token_id=int(pad) if pad is not None else None,
        )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ExportError("qformer_config.hidden_size is not divisible by num_attention_heads")
        if cfg.cross_attention_frequency < 1:
            raise ExportError("qformer_config.cross_attention_frequency must be >= 1")
        if cfg.pad_token_id is not None and not 0 <= cfg.pad_token_id < cfg.vocab_size:
            # nn.Embedding(padding_idx=...) in HF's Blip2TextEmbeddings rejects it too.
            raise ExportError(f"qformer_config.pad_token_id {cfg.pad_token_id} is outside the vocabulary "
                              f"(vocab_size {cfg.vocab_size})")
        return cfg


# Architectures (config.json "architectures") with the parameter layout of
# Blip2ForConditionalGeneration; Blip2Model has the same parameter names.
SUPPORTED_ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2Model")
# Architectures of Blip2RetrievalModel, with the top-level parts of HF's class besides
# query_tokens and qformer (which all three have). The released retrieval checkpoint
# (Salesforce/blip2-itm-vit-g) is a Blip2ForImageTextRetrieval one; HF's docs load the two
# *WithProjection classes from it, dropping the parts they lack.
RETRIEVAL_PARTS = {
    "Blip2ForImageTextRetrieval": ("vision_model", "embeddings", "vision_projection", "text_projection", "itm_head"),
    "Blip2TextModelWithProjection": ("embeddings", "text_projection"),
    "Blip2VisionModelWithProjection": ("vision_model", "vision_projection"),
}
RETRIEVAL_ARCHITECTURES = tuple(RETRIEVAL_PARTS)
# Retrieval architectures whose Q-Former runs text (HF's layers then call `intermediate`/`output`,
# which exist only with use_qformer_text_input).
TEXT_ARCHITECTURES = ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection")


class NoLanguageModel:
    """`Blip2Config.text` of retrieval checkpoints, which have no language model (their config.json
    may still carry HF's default OPT text_config, which nothing uses). Reading any field raises
    ExportError, so code written for captioning checkpoints stops with a user-facing message."""

    def __init__(self, architecture: str):
        self.architecture = architecture

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy/pickle/repr probes
            raise AttributeError(name)
        raise ExportError(f"architecture {self.architecture} (image-text retrieval) has no language model; "
                          f"it exports as a retrieval model (Blip2RetrievalEncoder), not a captioning one")

    def __repr__(self) -> str:
        return f"NoLanguageModel({self.architecture!r})"


# text_config.model_type values with a language model here (HF's default is "opt").
LANGUAGE_MODEL_TYPES = ("opt", "t5")


def language_model_config(text: Dict[str, Any]) -> Any:
    """The language model's config from config.json's text_config: OPTConfig for OPT (HF's default
    when model_type is absent), modeling_t5.T5Config for T5 / Flan-T5. Other model types raise
    ExportError naming the field (the one place to add them)."""
    tmt = text.get("model_type", "opt")
    if tmt == "t5":
        return T5Config.from_dict(text)
    if tmt != "opt":
        raise ExportError(f"text_config.model_type is {tmt!r}: BLIP-2 language models of that type are not "
                          f"supported (supported: {', '.join(repr(t) for t in LANGUAGE_MODEL_TYPES)})")
    # Blip2Config copies the text config's tie_word_embeddings to the top level; the text config's
    # value is the one the language model honours.
    opt = OPTConfig.from_dict(text)
    if opt.hidden_size != opt.word_embed_proj_dim:
        # language_projection outputs text hidden_size but the token embeddings have
        # word_embed_proj_dim; HF's BLIP-2 cannot concatenate/scatter them either.
        raise ExportError(f"OPT word_embed_proj_dim ({opt.word_embed_proj_dim}) != hidden_size "
                          f"({opt.hidden_size}): BLIP-2 cannot feed the query embeddings to this LM")
    return opt


@dataclass
class Blip2Config:
    vision: VisionConfig
    qformer: QFormerConfig
    # The language model's config (OPTConfig or T5Config), or NoLanguageModel for retrieval architectures.
    text: Any
    num_query_tokens: int = 32
    image_token_index: Optional[int] = None
    architectures: List[str] = field(default_factory=list)
    # Width of the ITC embedding space (vision_projection/text_projection outputs).
    image_text_hidden_size: int = 256

    @property
    def architecture(self) -> str:
        """config.json's (first) architecture; HF's Blip2Config default is the captioning model."""
        return self.architectures[0] if self.architectures else SUPPORTED_ARCHITECTURES[0]

    @property
    def language_model_type(self) -> Optional[str]:
        """"opt" or "t5" (text_config.model_type), None for retrieval architectures."""
        if self.is_retrieval:
            return None
        return "t5" if isinstance(self.text, T5Config) else "opt"

    @property
    def is_retrieval(self) -> bool:
        """True for Blip2ForImageTextRetrieval / Blip2TextModelWithProjection /
        Blip2VisionModelWithProjection checkpoints (Blip2RetrievalModel, no language model)."""
        return self.architecture in RETRIEVAL_ARCHITECTURES

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Blip2Config":
        mt = d.get("model_type")
        if mt != "blip-2":
            raise ExportError(f"config.json model_type is {mt!r}; this exporter handles BLIP-2 ('blip-2') only")
        archs = list(d.get("architectures") or [])
        known = SUPPORTED_ARCHITECTURES + RETRIEVAL_ARCHITECTURES
        other = [a for a in archs if a not in known]
        if other:
            raise ExportError(f"architecture {other[0]} is not supported (expected one of {', '.join(known)})")
        if any(a in RETRIEVAL_ARCHITECTURES for a in archs) and any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ExportError(f"config.json lists both retrieval and captioning architectures ({', '.join(archs)})")
        vision = VisionConfig.from_dict(dict(d.get("vision_config") or {}))
        qformer = QFormerConfig.from_dict(dict(d.get("qformer_config") or {}), vision.hidden_size)
        retrieval = bool(archs) and archs[0] in RETRIEVAL_ARCHITECTURES
        if retrieval:
            arch = archs[0]
            if arch in TEXT_ARCHITECTURES and not qformer.use_qformer_text_input:
                raise ExportError(f"architecture {arch} runs text through the Q-Former, which needs "
                                  f"qformer_config.use_qformer_text_input = true (HF builds no text FFN without it)")
            # The text_config (if any) describes no module of these checkpoints: not parsed.
            text: Any = NoLanguageModel(arch)
        else:
            text = language_model_config(dict(d.get("text_config") or {}))
        iti = d.get("image_token_index", d.get("image_token_id"))
        return cls(vision=vision, qformer=qformer, text=text,
                   num_query_tokens=int(d.get("num_query_tokens", 32)),
                   image_token_index=int(iti) if iti is not None else None,
                   architectures=archs,
                   image_text_hidden_size=int(d.get("image_text_hidden_size", 256)))


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
    # Not Final: the runtime sets it at load (attention: 'eager' | 'sdpa').
    fused: bool

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fused = False
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
        if self.fused:
            # transformers' sdpa path: softmax(q k^T * scale) v within float rounding of eager
            # (5e-7), 5-7x faster on a CPU for 257 image tokens, no [B, H, T, T] scores.
            context = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
        else:
            # transformers' eager path, op for op (the default: exact parity).
            context = torch.matmul(torch.softmax(torch.matmul(query, key.transpose(-1, -2)) * self.scale, dim=-1), value)
        context = context.permute(0, 2, 1, 3)
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


def key_padding_mask(attention_mask: Optional[Tensor], batch_size: int, kv_length: int) -> Optional[Tensor]:
    """[B,K] mask (1 = attend, 0 = padding; any dtype) -> bool [B,1,1,K], True where the key is
    hidden. HF converts a 2-D mask with `.to(torch.bool)`, so every nonzero value attends."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.size(0) != batch_size or attention_mask.size(1) != kv_length:
        raise RuntimeError("attention masks must be [batch, keys] and match the states they mask")
    return (attention_mask == 0).view(batch_size, 1, 1, kv_length)


class Blip2QFormerMultiHeadAttention(nn.Module):
    num_heads: torch.jit.Final[int]
    head_size: torch.jit.Final[int]
    all_head_size: torch.jit.Final[int]
    scaling: torch.jit.Final[float]

    def __init__(self, cfg: QFormerConfig, is_cross_attention: bool):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_size = cfg.hidden_size // cfg.num_attention_heads
        self.all_head_size = self.num_heads * self.head_size
        self.scaling = self.head_size ** -0.5
        kv_in = cfg.encoder_hidden_size if is_cross_attention else cfg.hidden_size
        self.query = nn.Linear(cfg.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_in, self.all_head_size)
        self.value = nn.Linear(kv_in, self.all_head_size)

    def _split(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), self.num_heads, self.head_size).permute(0, 2, 1, 3)

    def forward(self, hidden_states: Tensor, kv_states: Tensor, hidden_keys: Optional[Tensor] = None) -> Tensor:
        """hidden_keys: bool [B,1,1,K] from key_padding_mask (True = not attended), or None."""
        key = self._split(self.key(kv_states))
        value = self._split(self.value(kv_states))
        query = self._split(self.query(hidden_states))
        # transformers 5 multiplies by head_size**-0.5 (v4.45 divided by its root: the same up to
        # rounding, exactly the same for head sizes 4, 16, 64, ...).
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.scaling
        if hidden_keys is not None:
            # HF adds finfo(mask dtype).min; replacing the score gives the same probabilities
            # (exactly 0 unless a row hides every key) and cannot overflow.
            scores = scores.masked_fill(hidden_keys, dtype_min(scores.dtype))
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

    def forward(self, hidden_states: Tensor, kv_states: Tensor, hidden_keys: Optional[Tensor] = None) -> Tensor:
        return self.output(self.attention(hidden_states, kv_states, hidden_keys), hidden_states)


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
    """HF's layer: self-attention over all positions, then for the first `query_length` positions
    cross-attention to the image (every `cross_attention_frequency`-th layer) and the query FFN
    (`intermediate_query`/`output_query`); the remaining (text) positions go through the text FFN
    (`intermediate`/`output`) and never see the image. The text FFN is built only with
    `with_text_ffn` (HF: use_qformer_text_input); the caption model never builds it, since its
    Q-Former only ever sees query tokens."""

    def __init__(self, cfg: QFormerConfig, layer_idx: int, with_text_ffn: bool = False):
        super().__init__()
        self.attention = Blip2QFormerAttention(cfg)
        if layer_idx % cfg.cross_attention_frequency == 0:
            self.crossattention: Optional[Blip2QFormerAttention] = Blip2QFormerAttention(cfg, True)
        else:
            self.crossattention = None
        if with_text_ffn:
            self.intermediate: Optional[Blip2QFormerIntermediate] = Blip2QFormerIntermediate(cfg)
            self.output: Optional[Blip2QFormerOutput] = Blip2QFormerOutput(cfg)
        else:
            self.intermediate = None
            self.output = None
        self.intermediate_query = Blip2QFormerIntermediate(cfg)
        self.output_query = Blip2QFormerOutput(cfg)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        """Query-only fast path (captioning): every position is a query token, no masks."""
        attention_output = self.attention(hidden_states, hidden_states)
        crossattention = self.crossattention
        if crossattention is not None:
            attention_output = crossattention(attention_output, encoder_hidden_states)
        return self.output_query(self.intermediate_query(attention_output), attention_output)

    def _text_ffn(self, attention_output: Tensor) -> Tensor:
        # (two statements: TorchScript cannot put modules in a tuple)
        intermediate = self.intermediate
        output = self.output
        if intermediate is None or output is None:
            raise RuntimeError("this Q-Former has no text FFN (qformer_config.use_qformer_text_input is false)")
        return output(intermediate(attention_output), attention_output)

    def forward_full(self, hidden_states: Tensor, hidden_keys: Optional[Tensor],
                     encoder_hidden_states: Optional[Tensor], encoder_hidden_keys: Optional[Tensor],
                     query_length: int) -> Tensor:
        """HF's Blip2QFormerLayer.forward. hidden_keys / encoder_hidden_keys: key_padding_mask
        results for the self-attention / the cross-attention (None = attend everything)."""
        attention_output = self.attention(hidden_states, hidden_states, hidden_keys)
        if query_length == 0:
            return self._text_ffn(attention_output)
        query_attention_output = attention_output[:, :query_length, :]
        crossattention = self.crossattention
        if crossattention is not None:
            if encoder_hidden_states is None:
                raise RuntimeError("encoder_hidden_states must be given for cross-attention layers")
            query_attention_output = crossattention(query_attention_output, encoder_hidden_states,
                                                    encoder_hidden_keys)
        layer_output = self.output_query(self.intermediate_query(query_attention_output), query_attention_output)
        if attention_output.size(1) > query_length:
            text_output = self._text_ffn(attention_output[:, query_length:, :])
            layer_output = torch.cat([layer_output, text_output], dim=1)
        return layer_output


class Blip2QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, with_text_ffn: bool = False):
        super().__init__()
        self.layer = nn.ModuleList([Blip2QFormerLayer(cfg, i, with_text_ffn) for i in range(cfg.num_hidden_layers)])

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, encoder_hidden_states)
        return hidden_states

    def forward_full(self, hidden_states: Tensor, hidden_keys: Optional[Tensor],
                     encoder_hidden_states: Optional[Tensor], encoder_hidden_keys: Optional[Tensor],
                     query_length: int) -> Tensor:
        for layer in self.layer:
            hidden_states = layer.forward_full(hidden_states, hidden_keys, encoder_hidden_states,
                                               encoder_hidden_keys, query_length)
        return hidden_states


class Blip2QFormerModel(nn.Module):
    def __init__(self, cfg: QFormerConfig, with_text_ffn: bool = False):
        super().__init__()
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Blip2QFormerEncoder(cfg, with_text_ffn)

    def forward(self, query_embeds: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        """Query-only fast path: last_hidden_state of the query tokens [B,Q,Dq], in the Q-Former's
        dtype. With image inputs every attention mask HF builds is all ones, i.e. an additive 0, so
        no mask is applied. Inputs are cast to the Q-Former's dtype first (HF 5 keeps the Q-Former
        in float32 under float16 and casts query_embeds and encoder_hidden_states so)."""
        dtype = self.layernorm.weight.dtype
        return self.encoder(self.layernorm(query_embeds.to(dtype)), encoder_hidden_states.to(dtype))

    def forward_full(self, query_embeds: Tensor, query_length: int, attention_mask: Optional[Tensor],
                     encoder_hidden_states: Optional[Tensor],
                     encoder_attention_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """HF's Blip2QFormerModel.forward (2-D masks only): `query_embeds` [B,L,Dq] are the query
        tokens (first `query_length` positions) followed by text embeddings; attention_mask [B,L]
        masks the self-attention keys, encoder_attention_mask [B,P] the image keys of the
        cross-attention (None: attend everything). Returns (last_hidden_state [B,L,Dq],
        pooler_output = last_hidden_state[:, 0] [B,Dq]) in the Q-Former's dtype."""
        dtype = self.layernorm.weight.dtype
        embedding_output = self.layernorm(query_embeds.to(dtype))
        bsz, length = embedding_output.size(0), embedding_output.size(1)
        if query_length < 0 or query_length > length:
            raise RuntimeError("query_length must be in [0, sequence length]")
        hidden_keys = key_padding_mask(attention_mask, bsz, length)
        encoder_hidden_keys: Optional[Tensor] = None
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(dtype)
            encoder_hidden_keys = key_padding_mask(encoder_attention_mask, encoder_hidden_states.size(0),
                                                   encoder_hidden_states.size(1))
        sequence_output = self.encoder.forward_full(embedding_output, hidden_keys, encoder_hidden_states,
                                                    encoder_hidden_keys, query_length)
        return sequence_output, sequence_output[:, 0, :]


class Blip2TextEmbeddings(nn.Module):
    """HF's Blip2TextEmbeddings (top-level `embeddings.*` of the retrieval models, outside the
    Q-Former): word + absolute position embeddings, no LayerNorm of its own (the Q-Former's
    `layernorm` normalises its whole input). Positions are 0..T-1 (HF's position_ids buffer, which
    is non-persistent); query embeddings, when given, go before the text and do not shift them."""

    max_positions: torch.jit.Final[int]

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.max_positions = cfg.max_position_embeddings
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor, query_embeds: Optional[Tensor] = None) -> Tensor:
        seq_length = input_ids.size(1)
        if seq_length > self.max_positions:
            raise RuntimeError("text is longer than qformer_config.max_position_embeddings")
        position_ids = torch.arange(seq_length, device=input_ids.device).unsqueeze(0)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if query_embeds is not None:
            # HF: the (float32) query tokens are cast to the embeddings' dtype before the concatenation.
            embeddings = torch.cat([query_embeds.to(embeddings.dtype), embeddings], dim=1)
        return embeddings


# ------------------------------------------------------------------------------- the whole model

# HF's `_keep_in_fp32_modules` of every BLIP-2 class (top-level names). from_pretrained applies it
# only when loading in float16 (bfloat16 loads everything in bfloat16).
KEEP_IN_FP32_MODULES = ("query_tokens", "qformer")


def to_dtype_like_hf(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts a Blip2ForConditionalGeneration / Blip2RetrievalModel to `dtype` the way HF's
    `from_pretrained(dtype=...)` leaves it: for float16, `query_tokens` and `qformer` stay float32,
    and a T5 language model's `wo` weights (T5's own `_keep_in_fp32_modules`) (so call this on a
    float32 model: those keep their float32 values); for any other dtype everything is cast. In
    place; returns the model."""
    keep = dtype == torch.float16
    for name, child in model.named_children():
        if isinstance(child, T5ForConditionalGeneration):
            modeling_t5.set_dtype(child, dtype)
        elif not (keep and name in KEEP_IN_FP32_MODULES):
            child.to(dtype)
    for name, param in model.named_parameters(recurse=False):
        if param.is_floating_point() and not (keep and name in KEEP_IN_FP32_MODULES):
            param.data = param.data.to(dtype)
    return model


def _load_strict(module: nn.Module, prepared: Dict[str, Tensor]) -> None:
    """load_state_dict(strict=True) after checking shapes (named in an ExportError); copy_ converts
    each tensor to the parameter's dtype."""
    own = module.state_dict()
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in prepared.items() if tuple(v.shape) != tuple(own[k].shape)]
    if shape_errors:
        raise ExportError("checkpoint tensors do not match the shapes config.json implies:\n  "
                          + "\n  ".join(shape_errors[:20]))
    with torch.no_grad():
        module.load_state_dict(prepared, strict=True)


class Blip2ForConditionalGeneration(nn.Module):
    """Eager model with HF's parameter names. Use `from_hf_state_dict` to load a checkpoint."""

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        if cfg.is_retrieval:
            raise ExportError(f"architecture {cfg.architecture} is an image-text retrieval model; "
                              f"build Blip2RetrievalModel for it")
        self.config = cfg
        self.vision_model = Blip2VisionModel(cfg.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer.hidden_size))
        self.qformer = Blip2QFormerModel(cfg.qformer)
        self.language_projection = nn.Linear(cfg.qformer.hidden_size, cfg.text.hidden_size)
        if isinstance(cfg.text, T5Config):
            # lm_head is a parameter of its own even when the checkpoint ties it to shared: the
            # exporter stores tied weights once and binds both names to it.
            self.language_model: nn.Module = T5ForConditionalGeneration(cfg.text)
        else:
            self.language_model = OPTForCausalLM(cfg.text)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """pixels -> language_model_inputs [B,Q,E]."""
        image_embeds = self.vision_model(pixel_values)[0]
        query = self.query_tokens.expand(image_embeds.size(0), -1, -1)
        # HF: the (float32) Q-Former output is cast back to the image_embeds dtype.
        return self.language_projection(self.qformer(query, image_embeds).to(image_embeds.dtype))

    def prepare_state_dict(self, sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return prepare_state_dict(self.config, sd, self.state_dict().keys())

    def load_hf_state_dict(self, sd: Dict[str, Tensor]) -> None:
        """Loads a checkpoint's state dict strictly (after `prepare_state_dict`), keeping dtypes of
        the module (copy_ converts)."""
        _load_strict(self, self.prepare_state_dict(sd))

    @classmethod
    def from_hf(cls, config_dict: Dict[str, Any], sd: Dict[str, Tensor]) -> "Blip2ForConditionalGeneration":
        model = cls(Blip2Config.from_dict(config_dict))
        model.load_hf_state_dict(sd)
        return model.eval()


class Blip2ImageEncoder(nn.Module):
    """What image_encoder.pt holds: vision tower, query tokens, Q-Former, projection.
    (Submodules are renamed here because the exported methods take HF's names.)

    Dtypes: the Q-Former may be float32 while the rest is float16 (HF's float16 loading); the
    methods cast where HF casts, so `forward`, `vision_model`, `qformer` and `language_projection`
    hand out the model (vision/projection) dtype, `qformer_forward` the Q-Former's dtype."""

    def __init__(self, model: Blip2ForConditionalGeneration):
        super().__init__()
        self.vision = model.vision_model
        self.query_tokens = model.query_tokens
        self.q_former = model.qformer
        self.projection = model.language_projection

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B,3,H,W] -> language_model_inputs [B,Q,E] (HF's
        Blip2ForConditionalGeneration.get_image_features(...).pooler_output)."""
        return self.language_projection(self.qformer(self.vision_model(pixel_values)[0]))

    # `forward` in stages, for a scheduler that spreads one encode over several decode steps (a
    # ViT-g encode is ~15 of OPT-2.7B's decode steps on a CPU): the same operations in the same
    # order, so encode_start -> encode_layers(0, n) -> encode_finish equals `forward` bit for bit.
    @torch.jit.export
    def num_vision_layers(self) -> int:
        return len(self.vision.encoder.layers)

    @torch.jit.export
    def encode_start(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B,3,H,W] -> the vision embeddings [B,P+1,Dv] (the encoder's input)."""
        return self.vision.embeddings(pixel_values)

    @torch.jit.export
    def encode_layers(self, hidden_states: Tensor, start: int, end: int) -> Tensor:
        """Vision encoder layers start..end-1 over hidden_states [B,P+1,Dv]."""
        i = 0
        for layer in self.vision.encoder.layers:
            if i >= start and i < end:
                hidden_states = layer(hidden_states)
            i += 1
        return hidden_states

    @torch.jit.export
    def encode_finish(self, hidden_states: Tensor) -> Tensor:
        """The last encoder layer's output [B,P+1,Dv] -> language_model_inputs [B,Q,E]."""
        return self.language_projection(self.qformer(self.vision.post_layernorm(hidden_states)))

    @torch.jit.export
    def vision_model(self, pixel_values: Tensor) -> Tuple[Tensor, Tensor]:
        """pixel_values [B,3,H,W] -> (last_hidden_state [B,P,Dv], pooler_output [B,Dv]); HF's
        Blip2VisionModel (= Blip2Model.get_image_features in transformers 5)."""
        return self.vision(pixel_values)

    @torch.jit.export
    def qformer(self, image_embeds: Tensor) -> Tensor:
        """image_embeds [B,P,Dv] -> query last_hidden_state [B,Q,Dq] in image_embeds' dtype (HF's
        Blip2Model.get_qformer_features, whose float32 result HF casts to that dtype before
        language_projection)."""
        query = self.query_tokens.expand(image_embeds.size(0), -1, -1)
        return self.q_former(query, image_embeds).to(image_embeds.dtype)

    @torch.jit.export
    def language_projection(self, query_output: Tensor) -> Tensor:
        """query_output [B,Q,Dq] (any float dtype) -> language_model_inputs [B,Q,E]."""
        return self.projection(query_output.to(self.projection.weight.dtype))

    @torch.jit.export
    def qformer_forward(self, query_embeds: Tensor, encoder_hidden_states: Tensor,
                        encoder_attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
        """HF's Blip2QFormerModel.forward(query_embeds, encoder_hidden_states=...,
        encoder_attention_mask=...): query_embeds [B,Q,Dq] (every position a query: query FFN and
        cross-attention), encoder_hidden_states [B,P,Dv], encoder_attention_mask [B,P] int64
        (0 = image position not attended). Returns (last_hidden_state [B,Q,Dq], pooler_output =
        last_hidden_state[:, 0] [B,Dq]) in the Q-Former's dtype (float32 when kept so)."""
        return self.q_former.forward_full(query_embeds, query_embeds.size(1), None, encoder_hidden_states,
                                          encoder_attention_mask)


# --------------------------------------------------------------------------- image-text retrieval


class Blip2RetrievalModel(nn.Module):
    """Eager model with the parameters of HF's `architecture` (default: the config's):
    Blip2ForImageTextRetrieval = vision_model, query_tokens, embeddings, qformer,
    vision_projection, text_projection, itm_head; Blip2TextModelWithProjection = query_tokens
    (unused, but HF has it), embeddings, qformer, text_projection; Blip2VisionModelWithProjection =
    vision_model, query_tokens, qformer, vision_projection. Parts an architecture lacks are None.
    The Q-Former has the text FFN iff qformer_config.use_qformer_text_input (as in HF).
    A *WithProjection model can be built from a Blip2ForImageTextRetrieval checkpoint (the other
    parts' keys are dropped, as HF's from_pretrained does)."""

    def __init__(self, cfg: Blip2Config, architecture: Optional[str] = None):
        super().__init__()
        arch = architecture or cfg.architecture
        if arch not in RETRIEVAL_PARTS:
            raise ExportError(f"architecture {arch} is not a retrieval architecture "
                              f"({', '.join(RETRIEVAL_ARCHITECTURES)})")
        if arch in TEXT_ARCHITECTURES and not cfg.qformer.use_qformer_text_input:
            raise ExportError(f"architecture {arch} needs qformer_config.use_qformer_text_input = true")
        self.config = cfg
        self.architecture = arch
        parts = RETRIEVAL_PARTS[arch]
        dq, dp = cfg.qformer.hidden_size, cfg.image_text_hidden_size
        self.vision_model: Optional[Blip2VisionModel] = (
            Blip2VisionModel(cfg.vision) if "vision_model" in parts else None)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, dq))
        self.embeddings: Optional[Blip2TextEmbeddings] = (
            Blip2TextEmbeddings(cfg.qformer) if "embeddings" in parts else None)
        self.qformer = Blip2QFormerModel(cfg.qformer, with_text_ffn=cfg.qformer.use_qformer_text_input)
        self.vision_projection: Optional[nn.Linear] = nn.Linear(dq, dp) if "vision_projection" in parts else None
        self.text_projection: Optional[nn.Linear] = nn.Linear(dq, dp) if "text_projection" in parts else None
        self.itm_head: Optional[nn.Linear] = nn.Linear(dq, 2) if "itm_head" in parts else None

    def prepare_state_dict(self, sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return prepare_retrieval_state_dict(self.config, sd, self.state_dict().keys(), self.architecture)

    def load_hf_state_dict(self, sd: Dict[str, Tensor]) -> None:
        """Strict load after `prepare_state_dict` (ExportError naming every missing/unexpected key
        and any shape mismatch); keeps the module's dtypes (copy_ converts)."""
        _load_strict(self, self.prepare_state_dict(sd))

    @classmethod
    def from_hf(cls, config_dict: Dict[str, Any], sd: Dict[str, Tensor],
                architecture: Optional[str] = None) -> "Blip2RetrievalModel":
        model = cls(Blip2Config.from_dict(config_dict), architecture)
        model.load_hf_state_dict(sd)
        return model.eval()


class Blip2RetrievalEncoder(nn.Module):
    """What retrieval.pt holds (a Blip2RetrievalModel, renamed submodules). Methods that need a
    part the architecture lacks raise RuntimeError ("... has no ...").

    Shapes: B images, P = vision positions (patches + 1), Dv vision width, Q = num_query_tokens,
    Dq Q-Former width, Dp = image_text_hidden_size, Bt/N texts of T tokens. input_ids [.,T] int64
    are the Q-Former (BERT) tokenizer's ids of the text alone; attention_mask [.,T] int64 is 1 for
    tokens, 0 for padding. When config.json has image_token_index, HF's processor prepends Q image
    tokens to the ids (and ones to the mask) and HF's forward strips them again: pass
    input_ids[:, Q:] and attention_mask[:, Q:] here.
    Dtypes: vision outputs and ITC/ITM embeddings come in the model dtype (that of the vision
    model / projections), Q-Former hidden states in the Q-Former's dtype (float32 when it is kept
    in float32, as HF returns them), all logits as float32 (computed in the model dtype as HF
    computes them, then widened)."""

    num_query_tokens: torch.jit.Final[int]

    def __init__(self, model: Blip2RetrievalModel):
        super().__init__()
        self.num_query_tokens = model.config.num_query_tokens
        self.vision: Optional[Blip2VisionModel] = model.vision_model
        self.query_tokens = model.query_tokens
        self.text_embeddings: Optional[Blip2TextEmbeddings] = model.embeddings
        self.q_former = model.qformer
        self.vision_proj: Optional[nn.Linear] = model.vision_projection
        self.text_proj: Optional[nn.Linear] = model.text_projection
        self.itm_linear: Optional[nn.Linear] = model.itm_head

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                use_image_text_matching_head: bool = False) -> Tuple[Tensor, Tensor]:
        """HF's Blip2ForImageTextRetrieval.forward -> (logits_per_image, logits_per_text), float32:
        with the ITM head [B,2] and [2,B] (B texts, paired row by row with the images), else the
        ITC similarities [B,Bt] and [Bt,B]."""
        image_embeds = self.vision_model(pixel_values)[0]
        if use_image_text_matching_head:
            logits_per_image = self.itm(image_embeds, input_ids, attention_mask)
            return logits_per_image, logits_per_image.t()
        itc = self.itc(image_embeds, input_ids, attention_mask)
        return itc[0], itc[1]

    @torch.jit.export
    def vision_model(self, pixel_values: Tensor) -> Tuple[Tensor, Tensor]:
        """pixel_values [B,3,H,W] -> (last_hidden_state [B,P,Dv], pooler_output [B,Dv]) (HF's
        Blip2VisionModel; pooler = post_layernorm applied again to the CLS row)."""
        vision = self.vision
        if vision is None:
            raise RuntimeError("this retrieval model has no vision model")
        return vision(pixel_values)

    def _query_output(self, image_embeds: Tensor) -> Tensor:
        # HF passes an all-ones encoder_attention_mask (masks nothing): the fast path.
        query = self.query_tokens.expand(image_embeds.size(0), -1, -1)
        return self.q_former(query, image_embeds)

    @torch.jit.export
    def image_embeds(self, image_embeds: Tensor) -> Tuple[Tensor, Tensor]:
        """image_embeds [B,P,Dv] (vision last_hidden_state) -> (image_embeds [B,Q,Dp], L2-normalised,
        model dtype; query last_hidden_state [B,Q,Dq], Q-Former dtype). The ITC image side: HF's
        Blip2VisionModelWithProjection.image_embeds and Blip2ForImageTextRetrieval's image_embeds."""
        proj = self.vision_proj
        if proj is None:
            raise RuntimeError("this retrieval model has no vision_projection")
        query_output = self._query_output(image_embeds)
        embeds = F.normalize(proj(query_output.to(proj.weight.dtype)), dim=-1)
        return embeds, query_output

    def _text_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        embeddings = self.text_embeddings
        if embeddings is None:
            raise RuntimeError("this retrieval model has no text embeddings")
        if attention_mask.size(0) != input_ids.size(0) or attention_mask.size(1) != input_ids.size(1):
            raise RuntimeError("attention_mask must have the shape of input_ids")
        # Text only: query_length 0, every position through the text FFN, no cross-attention.
        return self.q_former.forward_full(embeddings(input_ids), 0, attention_mask, None, None)[0]

    @torch.jit.export
    def text_embeds(self, input_ids: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
        """input_ids [B,T], attention_mask [B,T] -> (text_embeds [B,T,Dp], L2-normalised per token,
        model dtype; last_hidden_state [B,T,Dq], Q-Former dtype): HF's Blip2TextModelWithProjection.
        text_embeds[:, 0] is the ITC text embedding (the [CLS] token's)."""
        proj = self.text_proj
        if proj is None:
            raise RuntimeError("this retrieval model has no text_projection")
        last_hidden_state = self._text_hidden(input_ids, attention_mask)
        text_embeds = F.normalize(proj(last_hidden_state.to(proj.weight.dtype)), dim=-1)
        return text_embeds, last_hidden_state

    @torch.jit.export
    def itm(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """image_embeds [B,P,Dv], input_ids [B,T], attention_mask [B,T] -> logits_per_image [B,2]
        float32: HF's ITM logits (use_image_text_matching_head=True; index 1 = "matches"), image i
        with text i (HF concatenates query tokens and text per row, so B must equal Bt; logits_per_text
        is the transpose). The query tokens and the text share one self-attention (text padding
        masked), only the queries cross-attend to the image; itm_head is applied to the Q query
        outputs and averaged over them."""
        head = self.itm_linear
        embeddings = self.text_embeddings
        if head is None or embeddings is None:
            raise RuntimeError("this retrieval model has no itm_head")
        bsz = image_embeds.size(0)
        if input_ids.size(0) != bsz or attention_mask.size(0) != bsz or attention_mask.size(1) != input_ids.size(1):
            raise RuntimeError("itm pairs image i with text i: image_embeds, input_ids and attention_mask "
                               "need the same batch size (and the mask the shape of input_ids)")
        query = self.query_tokens.expand(bsz, -1, -1)
        q = query.size(1)
        mask = torch.cat([torch.ones([bsz, q], dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        hidden = self.q_former.forward_full(embeddings(input_ids, query), q, mask, image_embeds, None)[0]
        # HF's order (cast all, then slice): in half precision another order picks another matmul kernel.
        output = head(hidden.to(head.weight.dtype)[:, :q, :])
        return output.mean(dim=1).float()

    @torch.jit.export
    def itm_pairs(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """image_embeds [M,P,Dv], input_ids [N,T], attention_mask [N,T] -> ITM logits [M,N,2] float32
        of every image with every text (row m*N+n of one `itm` call; M*N Q-Former rows at once, so
        chunk large M*N)."""
        m, n = image_embeds.size(0), input_ids.size(0)
        images = image_embeds.unsqueeze(1).expand(m, n, image_embeds.size(1), image_embeds.size(2))
        logits = self.itm(images.reshape(m * n, image_embeds.size(1), image_embeds.size(2)),
                          input_ids.repeat(m, 1), attention_mask.repeat(m, 1))
        return logits.view(m, n, 2)

    @torch.jit.export
    def itc(self, image_embeds: Tensor, input_ids: Tensor,
            attention_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """image_embeds [B,P,Dv], input_ids [Bt,T], attention_mask [Bt,T] -> (logits_per_image
        [B,Bt] float32, logits_per_text [Bt,B] float32, text_embeds [Bt,Dp], image_embeds
        [B,Q,Dp]): HF's Blip2ForImageTextRetrieval.forward with use_image_text_matching_head=False.
        B and Bt are independent (M images against N texts). The similarity of an image and a text
        is the max over the Q query embeddings of their cosine similarity (no temperature)."""
        image_itc = self.image_embeds(image_embeds)[0]
        proj = self.text_proj
        if proj is None:
            raise RuntimeError("this retrieval model has no text_projection")
        question_embeds = self._text_hidden(input_ids, attention_mask)
        text_itc = F.normalize(proj(question_embeds.to(proj.weight.dtype)[:, 0, :]), dim=-1)  # HF's order
        logits = self.itc_logits(image_itc, text_itc)
        return logits[0], logits[1], text_itc, image_itc

    @torch.jit.export
    def itc_logits(self, image_embeds: Tensor, text_embeds: Tensor) -> Tuple[Tensor, Tensor]:
        """Ranking with cached embeddings: image_embeds [M,Q,Dp] (from `image_embeds`), text_embeds
        [N,Dp] (`text_embeds(...)[0][:, 0]`, or itc's text_embeds) -> (logits_per_image [M,N],
        logits_per_text [N,M]) float32, HF's ITC logits: max over queries of image_embeds @ text^T."""
        sims = torch.matmul(image_embeds, text_embeds.t())  # [M,Q,N]
        logits_per_image = sims.max(dim=1)[0]
        return logits_per_image.float(), logits_per_image.t().float()

    @torch.jit.export
    def qformer_forward(self, query_embeds: Tensor, encoder_hidden_states: Tensor,
                        encoder_attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
        """Same contract as Blip2ImageEncoder.qformer_forward (HF's Blip2QFormerModel.forward with
        query embeds only): (last_hidden_state [B,Q,Dq], pooler_output [B,Dq]), Q-Former dtype."""
        return self.q_former.forward_full(query_embeds, query_embeds.size(1), None, encoder_hidden_states,
                                          encoder_attention_mask)


# --------------------------------------------------------------- what a model folder can serve

# The user-facing transformers classes, in the order a manifest lists them, with the parts of the
# weights each needs ("qformer_text_ffn": the Q-Former's `intermediate`/`output`, present with
# use_qformer_text_input, which HF's text paths call).
CLASS_PARTS = {
    "Blip2ForConditionalGeneration": ("vision_model", "query_tokens", "qformer", "language_projection",
                                      "language_model"),
    "Blip2Model": ("vision_model", "query_tokens", "qformer", "language_projection", "language_model"),
    "Blip2ForImageTextRetrieval": ("vision_model", "query_tokens", "embeddings", "qformer", "qformer_text_ffn",
                                   "vision_projection", "text_projection", "itm_head"),
    "Blip2TextModelWithProjection": ("embeddings", "qformer", "qformer_text_ffn", "text_projection"),
    "Blip2VisionModelWithProjection": ("vision_model", "query_tokens", "qformer", "vision_projection"),
    "Blip2VisionModel": ("vision_model",),
    "Blip2QFormerModel": ("qformer",),
}


def model_parts(cfg: Blip2Config) -> Tuple[str, ...]:
    """The parts (CLASS_PARTS' names) the checkpoint of `cfg`'s architecture has."""
    if not cfg.is_retrieval:
        return ("vision_model", "query_tokens", "qformer", "language_projection", "language_model")
    parts = ("query_tokens", "qformer") + RETRIEVAL_PARTS[cfg.architecture]
    if cfg.qformer.use_qformer_text_input:
        parts += ("qformer_text_ffn",)
    return parts


def served_classes(cfg: Blip2Config) -> List[str]:
    """The transformers classes a folder exported from `cfg`'s checkpoint can serve: those whose
    parts its weights all have (a Blip2ForImageTextRetrieval checkpoint serves both
    *WithProjection classes, as HF's docs load them from it; none serves a language model class)."""
    parts = set(model_parts(cfg))
    return [name for name, need in CLASS_PARTS.items() if set(need) <= parts]


# Method contracts in manifest form (export/README.md's `modules.*.methods`), for the exporter.
# "float" is the model dtype (vision model / projections), "qformer_float" the Q-Former's (float32
# when it is kept in float32), "float32" always float32.
IMAGE_ENCODER_METHODS_EXTRA = {
    "qformer_forward": {"inputs": ["query_embeds: float[B,Q,Dq]", "encoder_hidden_states: float[B,P,Dv]",
                                   "encoder_attention_mask: int64[B,P]"],
                        "outputs": ["last_hidden_state: qformer_float[B,Q,Dq]", "pooler_output: qformer_float[B,Dq]"]},
}
RETRIEVAL_ENCODER_METHODS = {
    "forward": {"inputs": ["pixel_values: float[B,3,H,W]", "input_ids: int64[Bt,T]", "attention_mask: int64[Bt,T]",
                           "use_image_text_matching_head: bool = false"],
                "outputs": ["logits_per_image: float32[B,2] (ITM, Bt == B) | float32[B,Bt] (ITC)",
                            "logits_per_text: float32[2,B] | float32[Bt,B]"]},
    "vision_model": {"inputs": ["pixel_values: float[B,3,H,W]"],
                     "outputs": ["last_hidden_state: float[B,P,Dv]", "pooler_output: float[B,Dv]"]},
    "image_embeds": {"inputs": ["image_embeds: float[B,P,Dv]"],
                     "outputs": ["image_embeds: float[B,Q,Dp] (L2-normalised)",
                                 "last_hidden_state: qformer_float[B,Q,Dq]"]},
    "text_embeds": {"inputs": ["input_ids: int64[B,T]", "attention_mask: int64[B,T]"],
                    "outputs": ["text_embeds: float[B,T,Dp] (L2-normalised)",
                                "last_hidden_state: qformer_float[B,T,Dq]"]},
    "itm": {"inputs": ["image_embeds: float[B,P,Dv]", "input_ids: int64[B,T]", "attention_mask: int64[B,T]"],
            "outputs": ["logits_per_image: float32[B,2]"]},
    "itm_pairs": {"inputs": ["image_embeds: float[M,P,Dv]", "input_ids: int64[N,T]", "attention_mask: int64[N,T]"],
                  "outputs": ["logits: float32[M,N,2]"]},
    "itc": {"inputs": ["image_embeds: float[B,P,Dv]", "input_ids: int64[Bt,T]", "attention_mask: int64[Bt,T]"],
            "outputs": ["logits_per_image: float32[B,Bt]", "logits_per_text: float32[Bt,B]",
                        "text_embeds: float[Bt,Dp]", "image_embeds: float[B,Q,Dp]"]},
    "itc_logits": {"inputs": ["image_embeds: float[M,Q,Dp]", "text_embeds: float[N,Dp]"],
                   "outputs": ["logits_per_image: float32[M,N]", "logits_per_text: float32[N,M]"]},
    "qformer_forward": IMAGE_ENCODER_METHODS_EXTRA["qformer_forward"],
}
# The parts each retrieval.pt method needs (it raises "this retrieval model has no ..." without them):
# a manifest lists only the methods its checkpoint's parts allow.
RETRIEVAL_METHOD_PARTS = {
    "forward": ("vision_model", "embeddings", "qformer_text_ffn", "vision_projection", "text_projection", "itm_head"),
    "vision_model": ("vision_model",),
    "image_embeds": ("vision_projection",),
    "text_embeds": ("embeddings", "qformer_text_ffn", "text_projection"),
    "itm": ("embeddings", "qformer_text_ffn", "itm_head"),
    "itm_pairs": ("embeddings", "qformer_text_ffn", "itm_head"),
    "itc": ("embeddings", "qformer_text_ffn", "vision_projection", "text_projection"),
    "itc_logits": (),
    "qformer_forward": (),
}


def retrieval_methods(cfg: Blip2Config) -> Dict[str, Any]:
    """RETRIEVAL_ENCODER_METHODS restricted to what the checkpoint's parts allow."""
    parts = set(model_parts(cfg))
    return {name: m for name, m in RETRIEVAL_ENCODER_METHODS.items() if set(RETRIEVAL_METHOD_PARTS[name]) <= parts}


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

# The retrieval models drop only HF's non-persistent position_ids buffers (older checkpoints saved
# them) and, for a model built with fewer parts than the checkpoint (a *WithProjection model from a
# Blip2ForImageTextRetrieval checkpoint), the parts it lacks.
RETRIEVAL_IGNORED_KEY_PATTERNS = (
    re.compile(r"^vision_model\.embeddings\.position_ids$"),
    re.compile(r"^embeddings\.position_ids$"),
)
_ALL_RETRIEVAL_PARTS = RETRIEVAL_PARTS["Blip2ForImageTextRetrieval"]


def _fuse_vision_qv_bias(cfg: Blip2Config, out: Dict[str, Tensor]) -> None:
    """Pre-4.45 `self_attn.q_bias`/`v_bias` -> `qkv.bias` = [q_bias, 0, v_bias] (HF's conversion)."""
    for i in range(cfg.vision.num_hidden_layers):
        pre = f"vision_model.encoder.layers.{i}.self_attn."
        if pre + "q_bias" in out and pre + "v_bias" in out and pre + "qkv.bias" not in out:
            q, v = out.pop(pre + "q_bias"), out.pop(pre + "v_bias")
            out[pre + "qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])


def prepare_state_dict(cfg: Blip2Config, sd: Dict[str, Tensor], expected_keys) -> Dict[str, Tensor]:
    """Maps a HF checkpoint state dict onto our parameter set or raises ExportError listing every
    missing and unexpected key. Steps:
      1. drop the keys HF ignores (IGNORED_KEY_PATTERNS);
      2. fuse pre-4.45 `self_attn.q_bias`/`v_bias` into `qkv.bias` = [q_bias, 0, v_bias] (what HF's
         own conversion does);
      3. OPT: tie `language_model.lm_head.weight` to embed_tokens when tie_word_embeddings (a
         duplicate head in the checkpoint must then equal embed_tokens);
         T5: modeling_t5.prepare_state_dict under `language_model.` (shared / encoder / decoder
         embeddings are one tensor, a missing lm_head is shared, the unused cross-attention bias
         is dropped).
    Works on meta tensors too (the exporter plans on file headers): value checks of duplicates are
    weights.require_equal's.
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

    _fuse_vision_qv_bias(cfg, out)

    if isinstance(cfg.text, T5Config):
        _prepare_t5(out)
    else:
        head, emb = "language_model.lm_head.weight", "language_model.model.decoder.embed_tokens.weight"
        if cfg.text.tie_word_embeddings:
            if head in out and emb in out:
                require_equal(out[head], out[emb], f"{head} differs from {emb} but text_config.tie_word_embeddings "
                                                   f"is true; set it to false in config.json to use the separate head")
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


LM_PREFIX = "language_model."


def _prepare_t5(out: Dict[str, Tensor]) -> None:
    """T5's key rules on the `language_model.` keys of `out`, in place. Without any embedding key
    the rules are skipped, so the missing/unexpected listing names what is wrong."""
    lm_keys = [k for k in out if k.startswith(LM_PREFIX)]
    lm = {k[len(LM_PREFIX):]: out.pop(k) for k in lm_keys}
    if any(k in lm for k in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                             "lm_head.weight")):
        lm = modeling_t5.prepare_state_dict(lm, LM_PREFIX)
    out.update({LM_PREFIX + k: v for k, v in lm.items()})


def prepare_retrieval_state_dict(cfg: Blip2Config, sd: Dict[str, Tensor], expected_keys,
                                 architecture: Optional[str] = None) -> Dict[str, Tensor]:
    """prepare_state_dict for Blip2RetrievalModel (no language model, nothing tied). Steps:
      1. drop RETRIEVAL_IGNORED_KEY_PATTERNS, and the keys of Blip2ForImageTextRetrieval's parts
         (vision_model., embeddings., vision_projection., text_projection., itm_head.) that
         `architecture` (default: the config's) does not have;
      2. fuse pre-4.45 vision `q_bias`/`v_bias` as prepare_state_dict does.
    Everything else must match exactly: ExportError lists every missing and every unexpected key
    (the Q-Former text FFN included: with use_qformer_text_input it must be present, without it
    it must not)."""
    arch = architecture or cfg.architecture
    lacking = tuple(p + "." for p in _ALL_RETRIEVAL_PARTS if p not in RETRIEVAL_PARTS[arch])
    expected = set(expected_keys)
    out: Dict[str, Tensor] = {}
    for k, v in sd.items():
        if k not in expected and (any(p.search(k) for p in RETRIEVAL_IGNORED_KEY_PATTERNS)
                                  or k.startswith(lacking)):
            continue
        out[k] = v
    _fuse_vision_qv_bias(cfg, out)
    missing = sorted(expected - out.keys())
    unexpected = sorted(out.keys() - expected)
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing key(s): " + ", ".join(missing))
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected))
        raise ExportError(f"checkpoint does not match config.json ({arch}): " + "; ".join(lines))
    return out
