"""T5 / Flan-T5 encoder-decoder (the language model of BLIP-2 Flan-T5 checkpoints), scriptable, with
slot caches for the decoder's self-attention and cross-attention.

Parameter names equal Hugging Face's `T5ForConditionalGeneration` (`shared.weight`,
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`,
`decoder.block.1.layer.2.DenseReluDense.wo.weight`, `lm_head.weight`, ...); `prepare_state_dict`
fills in the keys a checkpoint leaves to weight tying. Numerics follow transformers 5.18 with the eager
attention implementation:

* no 1/sqrt(d) scaling of the scores; a relative position bias computed by the first block of each
  stack and reused by all its blocks (bidirectional buckets in the encoder, causal in the decoder,
  none in cross-attention);
* T5LayerNorm: RMS without mean or bias, variance in float32, cast back to a half weight dtype;
* `wo` may be float32 while the rest is half (HF's `_keep_in_fp32_modules = ["wo"]`): its input is
  cast to wo's dtype, so the residual stream becomes float32 after the first feed-forward layer, as
  in HF (every later layer norm casts back to the half dtype);
* float16 hidden states clamped after each sub-layer, where HF clamps;
* softmax in the scores' dtype (HF's eager T5 does not upcast);
* the lm_head input scaled by d_model ** -0.5 only when `scale_decoder_outputs` (T5 v1.0; Flan-T5
  and T5 v1.1 have tie_word_embeddings false and are not scaled).

Exported methods (the blip2-node contract for architecture "t5"):

* `embed_tokens(input_ids [N,T]) -> [N,T,D]` (the shared embedding)
* `encode(inputs_embeds [B,T,D], attention_mask [B,T]) -> encoder_hidden_states [B,T,D]`
* `forward_full(inputs_embeds, attention_mask, decoder_input_ids [B,Td]) -> logits [B,Td,V] float32`
* `fill_cross_cache(cross_cache, encoder_hidden_states [N,T,D], slots [N]) -> 0-d int64 CPU tensor N`
* `decode(self_cache, cross_cache, input_ids [N], slots [N], positions [N], kv_len, encoder_mask [N,E],
  first_slot=-2) -> logits [N,V] float32`
* `text_hidden_states(input_ids [B,T], attention_mask [B,T]) -> [B,T,D]`: the encoder's output on the
  token embeddings, what transformers 5.18's Blip2Model.get_text_features returns for T5

The caches are allocated by the runtime (zeros, model dtype, contiguous):
`self_cache [L, 2, S, H, M, Dh]` and `cross_cache [L, 2, S, H, Menc, Dh]`, L = num_decoder_layers,
H = num_heads, Dh = d_kv (not d_model / num_heads). fill_cross_cache writes each decoder layer's
cross-attention keys/values of a row's encoder states at `cross_cache[l, 0/1, slots[i], :, :T]`,
once per sequence. decode feeds one decoder token per row (the decoder start token at position 0):
it writes the token's self-attention key/value at `positions[i]` of slot `slots[i]`, attends that
slot's positions `<= positions[i]` (reading `[..., :kv_len, :]`) with the causal relative position
bias of `key - query`, and cross-attends `cross_cache[..., slots[i], :, :E, :]` under
`encoder_mask [N,E]` (1 = real encoder token). Masked scores are replaced (masked_fill with the
dtype's min), never added to, so finite garbage past a row's length cannot produce NaN.

Bounds: decode checks `0 <= slots < S` and `0 <= positions < kv_len <= M`, fill_cross_cache
`0 <= slots < S`, before writing anything. On CUDA that is `torch._assert_async` (no synchronisation;
a failure is a device-side assert, which poisons the CUDA context, so the runtime should check on
the host first); elsewhere a host check raising RuntimeError with a message.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import SUPPORTED as SUPPORTED_ACTIVATIONS
from .activations import Activation
from .errors import ExportError
from .modeling_opt import check_index, dtype_min
from .weights import require_equal

# Carried by some checkpoints but never used (cross-attention has no position bias): HF ignores it
# on load (_keys_to_ignore_on_load_unexpected).
UNUSED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


@dataclass
class T5Config:
    """The fields of HF's T5Config that change the computation, with HF's defaults and HF's parsing."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6  # None in config.json means num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dense_act_fn: str = "relu"  # from feed_forward_proj ("gated-gelu" -> "gelu_new") unless given
    is_gated_act: bool = False  # feed_forward_proj "gated-*" unless given
    tie_word_embeddings: bool = True  # as written in config.json; HF 5.18 ties lm_head whatever it says
    scale_decoder_outputs: bool = True  # lm_head input * d_model**-0.5 (config.json's, else tie_word_embeddings)
    pad_token_id: Optional[int] = 0
    eos_token_id: Any = 1  # int or list of ints
    decoder_start_token_id: Optional[int] = None  # not a T5Config field in HF 5.18; checkpoints set 0

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "T5Config":
        mt = d.get("model_type", "t5")
        if mt != "t5":
            raise ExportError(f"text_config.model_type is {mt!r}, expected 't5'")
        proj = str(d.get("feed_forward_proj", "relu"))
        act_info = proj.split("-")
        # HF's validate_architecture: "ACT" or "gated-ACT".
        if (len(act_info) > 1 and act_info[0] != "gated") or len(act_info) > 2:
            raise ExportError(f"T5 feed_forward_proj {proj!r} is not of the form 'gated-ACT' or 'ACT'")
        dense_act_fn = "gelu_new" if proj == "gated-gelu" else act_info[-1]  # HF's backwards compatibility
        is_gated_act = act_info[0] == "gated"
        # HF 5.18 sets these from feed_forward_proj, then lets config.json's own values override them.
        if d.get("dense_act_fn") is not None:
            dense_act_fn = str(d["dense_act_fn"])
        if d.get("is_gated_act") is not None:
            is_gated_act = bool(d["is_gated_act"])
        if dense_act_fn not in SUPPORTED_ACTIVATIONS:
            raise ExportError(f"T5 dense_act_fn {dense_act_fn!r} (from feed_forward_proj {proj!r}) is not "
                              f"supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        # HF 5.18: scale_decoder_outputs = `tie_word_embeddings is not False` unless config.json has it.
        tie = d.get("tie_word_embeddings", True)
        scale = d.get("scale_decoder_outputs")
        num_layers = int(d.get("num_layers", 6))
        ndl = d.get("num_decoder_layers")
        cfg = cls(
            vocab_size=int(d.get("vocab_size", 32128)),
            d_model=int(d.get("d_model", 512)),
            d_kv=int(d.get("d_kv", 64)),
            d_ff=int(d.get("d_ff", 2048)),
            num_layers=num_layers,
            num_decoder_layers=int(ndl) if ndl is not None else num_layers,
            num_heads=int(d.get("num_heads", 8)),
            relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
            feed_forward_proj=proj,
            dense_act_fn=dense_act_fn,
            is_gated_act=is_gated_act,
            tie_word_embeddings=tie is not False,
            scale_decoder_outputs=bool(scale) if scale is not None else tie is not False,
            pad_token_id=d.get("pad_token_id", 0),
            eos_token_id=d.get("eos_token_id", 1),
            decoder_start_token_id=d.get("decoder_start_token_id"),
        )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "relative_attention_max_distance"):
            if getattr(cfg, name) < 1:
                raise ExportError(f"T5 {name} must be >= 1, got {getattr(cfg, name)}")
        # The encoder's bidirectional buckets use num_buckets // 4 exact distances; 0 would divide by 0.
        if cfg.relative_attention_num_buckets < 4:
            raise ExportError(f"T5 relative_attention_num_buckets must be >= 4, got "
                              f"{cfg.relative_attention_num_buckets}")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @property
    def hidden_size(self) -> int:
        # HF's T5Config.attribute_map: hidden_size is d_model (BLIP-2's language_projection width).
        return self.d_model

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


def _relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> Tensor:
    """HF's T5Attention._relative_position_bucket (Mesh TensorFlow's), the same ops in the same order.
    relative_position = key position - query position."""
    relative_buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets = num_buckets // 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    # Half of the buckets are exact distances, the other half logarithmically larger bins up to
    # max_distance.
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1))
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def _clamp_fp16(hidden_states: Tensor) -> Tensor:
    """HF's T5Block clamp of float16 hidden states (a no-op in any other dtype, including the float32
    residual stream that a float32 `wo` produces)."""
    if hidden_states.dtype == torch.float16:
        # finfo(float16).max - 1000 when the output holds an inf, else finfo(float16).max: 0-d float32
        # bounds, as HF's torch.where over Python floats gives (0-d, so hidden_states keeps float16).
        device = hidden_states.device
        clamp_value = torch.where(torch.isinf(hidden_states).any(),
                                  torch.full([], 64504.0, dtype=torch.float32, device=device),
                                  torch.full([], 65504.0, dtype=torch.float32, device=device))
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
    return hidden_states


def _read_slots(cache: Tensor, slots: Tensor, first_slot: int, length: int) -> Tensor:
    """[N,H,length,Dh] of a layer's [S,H,M,Dh] cache: a view when the slots are first_slot,
    first_slot+1, ...; else a gather (index_select copies N*H*length*Dh)."""
    if first_slot >= 0:
        return cache.narrow(0, first_slot, slots.size(0)).narrow(2, 0, length)
    return cache.narrow(2, 0, length).index_select(0, slots)


def _resolve_first_slot(slots: Tensor, first_slot: int) -> int:
    """-2: find out with one host read per call (not per layer) whether the slots are consecutive."""
    if first_slot == -2:
        first_slot = int(slots[0].item())
        n = slots.size(0)
        if not torch.equal(slots, torch.arange(first_slot, first_slot + n, device=slots.device, dtype=slots.dtype)):
            first_slot = -1
    return first_slot


def _check_cache(cache: Tensor, num_layers: int, num_heads: int, head_dim: int, what: str):
    if cache.dim() != 6 or cache.size(0) != num_layers or cache.size(1) != 2 \
            or cache.size(3) != num_heads or cache.size(5) != head_dim:
        raise RuntimeError(what + " must be [num_decoder_layers, 2, slots, num_heads, length, d_kv]")


class T5LayerNorm(nn.Module):
    """RMS norm: no mean subtracted, no bias; the variance in float32 whatever the input dtype."""

    variance_epsilon: torch.jit.Final[float]

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype == torch.float16 or self.weight.dtype == torch.bfloat16:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


def _to_wo_dtype(hidden_states: Tensor, wo_dtype: torch.dtype) -> Tensor:
    # HF casts wo's input to wo's dtype (float32 when kept so in half precision; never to int8).
    if hidden_states.dtype != wo_dtype and wo_dtype != torch.int8:
        hidden_states = hidden_states.to(wo_dtype)
    return hidden_states


class T5DenseActDense(nn.Module):
    """T5 v1.0 feed-forward: wo(act(wi(x)))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = Activation(cfg.dense_act_fn)

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.act(self.wi(hidden_states))
        return self.wo(_to_wo_dtype(hidden_states, self.wo.weight.dtype))


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1 / Flan-T5 feed-forward: wo(act(wi_0(x)) * wi_1(x))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = Activation(cfg.dense_act_fn)

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_gelu = self.act(self.wi_0(hidden_states))
        hidden_linear = self.wi_1(hidden_states)
        hidden_states = hidden_gelu * hidden_linear
        return self.wo(_to_wo_dtype(hidden_states, self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        if cfg.is_gated_act:
            self.DenseReluDense = T5DenseGatedActDense(cfg)
        else:
            self.DenseReluDense = T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hidden_states + self.DenseReluDense(self.layer_norm(hidden_states))


class T5Attention(nn.Module):
    n_heads: torch.jit.Final[int]
    key_value_proj_dim: torch.jit.Final[int]
    inner_dim: torch.jit.Final[int]
    bidirectional: torch.jit.Final[bool]
    relative_attention_num_buckets: torch.jit.Final[int]
    relative_attention_max_distance: torch.jit.Final[int]

    def __init__(self, cfg: T5Config, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        self.n_heads = cfg.num_heads
        self.key_value_proj_dim = cfg.d_kv
        self.inner_dim = cfg.inner_dim
        self.bidirectional = not is_decoder
        self.relative_attention_num_buckets = cfg.relative_attention_num_buckets
        self.relative_attention_max_distance = cfg.relative_attention_max_distance
        self.q = nn.Linear(cfg.d_model, self.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, self.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, self.inner_dim, bias=False)
        self.o = nn.Linear(self.inner_dim, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias: Optional[nn.Embedding] = nn.Embedding(
                cfg.relative_attention_num_buckets, cfg.num_heads)
        else:
            self.relative_attention_bias = None

    def compute_bias(self, relative_position: Tensor) -> Tensor:
        """relative_position [B,Q,K] (key - query) -> position bias [B,H,Q,K] in the embedding's dtype."""
        emb = self.relative_attention_bias
        if emb is None:
            raise RuntimeError("compute_bias called on a T5Attention without relative_attention_bias")
        bucket = _relative_position_bucket(relative_position, self.bidirectional,
                                           self.relative_attention_num_buckets, self.relative_attention_max_distance)
        return emb(bucket).permute(0, 3, 1, 2)

    def _shape(self, x: Tensor) -> Tensor:
        """[B,T,H*Dh] -> [B,H,T,Dh]"""
        return x.view(x.size(0), x.size(1), self.n_heads, self.key_value_proj_dim).transpose(1, 2)

    def _attend(self, query_states: Tensor, key_states: Tensor, value_states: Tensor,
                position_bias: Optional[Tensor], masked: Tensor) -> Tensor:
        """HF's eager_attention_forward with scaling 1, then o. masked: True where a query must not
        see a key (broadcast to [B,H,Q,K]); HF adds finfo.min there, replacing it gives the same
        probabilities (exactly 0) and cannot turn garbage into NaN."""
        scores = torch.matmul(query_states, key_states.transpose(2, 3))
        if position_bias is not None:
            scores = scores + position_bias
        # HF adds a zero bias to cross-attention scores (x + 0 == x): skipped.
        scores = scores.masked_fill(masked, dtype_min(scores.dtype))
        weights = F.softmax(scores, dim=-1)  # in the scores' dtype, as HF's eager T5
        out = torch.matmul(weights, value_states).transpose(1, 2).contiguous()
        out = out.reshape(out.size(0), out.size(1), self.inner_dim)
        return self.o(out)

    def forward(self, hidden_states: Tensor, key_value_states: Optional[Tensor], position_bias: Optional[Tensor],
                masked: Tensor) -> Tensor:
        """Uncached attention: self-attention when key_value_states is None, else cross-attention."""
        query_states = self._shape(self.q(hidden_states))
        current_states = hidden_states if key_value_states is None else key_value_states
        key_states = self._shape(self.k(current_states))
        value_states = self._shape(self.v(current_states))
        return self._attend(query_states, key_states, value_states, position_bias, masked)

    def key_values(self, states: Tensor):
        """[N,T,D] -> keys, values [N,H,T,Dh]."""
        return self._shape(self.k(states)), self._shape(self.v(states))

    def decode_self(self, hidden_states: Tensor, k_cache: Tensor, v_cache: Tensor, write_idx: Tensor,
                    slots: Tensor, first_slot: int, kv_len: int, position_bias: Tensor, masked: Tensor) -> Tensor:
        """One query per row [N,1,D]. k_cache/v_cache: this layer's [S,H,M,Dh] views of the cache;
        write_idx [N*H]: flat rows of k_cache.view(-1, Dh) for the new keys in [N,H] order."""
        query_states = self._shape(self.q(hidden_states))
        # T = 1, so [N,1,H*Dh] viewed as [N*H,Dh] is in [N,H] order.
        k = self.k(hidden_states).reshape(-1, self.key_value_proj_dim)
        v = self.v(hidden_states).reshape(-1, self.key_value_proj_dim)
        # In-place writes into the runtime's cache (k_cache is a view of it).
        k_cache.view(-1, self.key_value_proj_dim).index_copy_(0, write_idx, k)
        v_cache.view(-1, self.key_value_proj_dim).index_copy_(0, write_idx, v)
        keys = _read_slots(k_cache, slots, first_slot, kv_len)
        values = _read_slots(v_cache, slots, first_slot, kv_len)
        return self._attend(query_states, keys, values, position_bias, masked)

    def decode_cross(self, hidden_states: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                     first_slot: int, enc_len: int, masked: Tensor) -> Tensor:
        query_states = self._shape(self.q(hidden_states))
        keys = _read_slots(k_cache, slots, first_slot, enc_len)
        values = _read_slots(v_cache, slots, first_slot, enc_len)
        return self._attend(query_states, keys, values, None, masked)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, is_decoder, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, hidden_states: Tensor, position_bias: Tensor, masked: Tensor) -> Tensor:
        return hidden_states + self.SelfAttention(self.layer_norm(hidden_states), None, position_bias, masked)

    def decode(self, hidden_states: Tensor, k_cache: Tensor, v_cache: Tensor, write_idx: Tensor, slots: Tensor,
               first_slot: int, kv_len: int, position_bias: Tensor, masked: Tensor) -> Tensor:
        return hidden_states + self.SelfAttention.decode_self(
            self.layer_norm(hidden_states), k_cache, v_cache, write_idx, slots, first_slot, kv_len,
            position_bias, masked)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg, True, False)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, masked: Tensor) -> Tensor:
        return hidden_states + self.EncDecAttention(self.layer_norm(hidden_states), encoder_hidden_states,
                                                    None, masked)

    def decode(self, hidden_states: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, first_slot: int,
               enc_len: int, masked: Tensor) -> Tensor:
        return hidden_states + self.EncDecAttention.decode_cross(
            self.layer_norm(hidden_states), k_cache, v_cache, slots, first_slot, enc_len, masked)


class T5EncoderBlock(nn.Module):
    """HF's T5Block of the encoder: layer = [T5LayerSelfAttention, T5LayerFF]."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, False, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, hidden_states: Tensor, position_bias: Tensor, masked: Tensor) -> Tensor:
        hidden_states = _clamp_fp16(self.layer[0](hidden_states, position_bias, masked))
        return _clamp_fp16(self.layer[1](hidden_states))


class T5DecoderBlock(nn.Module):
    """HF's T5Block of the decoder: layer = [T5LayerSelfAttention, T5LayerCrossAttention, T5LayerFF]."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, True, has_relative_attention_bias),
                                    T5LayerCrossAttention(cfg), T5LayerFF(cfg)])

    def forward(self, hidden_states: Tensor, position_bias: Tensor, masked: Tensor, encoder_hidden_states: Tensor,
                encoder_masked: Tensor) -> Tensor:
        hidden_states = _clamp_fp16(self.layer[0](hidden_states, position_bias, masked))
        hidden_states = _clamp_fp16(self.layer[1](hidden_states, encoder_hidden_states, encoder_masked))
        return _clamp_fp16(self.layer[2](hidden_states))

    def decode(self, hidden_states: Tensor, k_cache: Tensor, v_cache: Tensor, write_idx: Tensor,
               k_cross: Tensor, v_cross: Tensor, slots: Tensor, first_slot: int, kv_len: int, enc_len: int,
               position_bias: Tensor, masked: Tensor, encoder_masked: Tensor) -> Tensor:
        hidden_states = _clamp_fp16(self.layer[0].decode(hidden_states, k_cache, v_cache, write_idx, slots,
                                                         first_slot, kv_len, position_bias, masked))
        hidden_states = _clamp_fp16(self.layer[1].decode(hidden_states, k_cross, v_cross, slots, first_slot,
                                                         enc_len, encoder_masked))
        return _clamp_fp16(self.layer[2](hidden_states))


class T5EncoderStack(nn.Module):
    """HF's encoder T5Stack. embed_tokens is tied to T5ForConditionalGeneration.shared (unused here:
    the encoder is given inputs_embeds)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.block = nn.ModuleList([T5EncoderBlock(cfg, i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        bsz, seq_len = inputs_embeds.size(0), inputs_embeds.size(1)
        # Positions are the indices 0..T-1, pads included (HF): the bias depends on key - query only,
        # so left padding does not change what the real tokens see.
        pos = torch.arange(seq_len, dtype=torch.long, device=inputs_embeds.device)
        relative_position = (pos.view(1, seq_len) - pos.view(seq_len, 1)).unsqueeze(0)   # [1,T,T]
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(relative_position)  # [1,H,T,T]
        # HF: attention_mask.bool(), padded keys get finfo.min; padded queries still attend.
        masked = (attention_mask == 0).view(bsz, 1, 1, seq_len)
        hidden_states = inputs_embeds
        for block in self.block:
            hidden_states = block(hidden_states, position_bias, masked)
        return self.final_layer_norm(hidden_states)


class T5DecoderStack(nn.Module):
    """HF's decoder T5Stack, uncached (forward) and over the slot caches (decode, fill_cross_cache)."""

    num_layers: torch.jit.Final[int]
    num_heads: torch.jit.Final[int]
    head_dim: torch.jit.Final[int]

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.num_layers = cfg.num_decoder_layers
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_kv
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.block = nn.ModuleList([T5DecoderBlock(cfg, i == 0) for i in range(cfg.num_decoder_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, input_ids: Tensor, encoder_hidden_states: Tensor, encoder_attention_mask: Tensor) -> Tensor:
        bsz, tgt_len = input_ids.size(0), input_ids.size(1)
        src_len = encoder_hidden_states.size(1)
        hidden_states = self.embed_tokens(input_ids)
        pos = torch.arange(tgt_len, dtype=torch.long, device=input_ids.device)
        relative_position = (pos.view(1, tgt_len) - pos.view(tgt_len, 1)).unsqueeze(0)   # [1,Td,Td]
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(relative_position)
        causal_masked = (pos.view(1, tgt_len) > pos.view(tgt_len, 1)).view(1, 1, tgt_len, tgt_len)
        encoder_masked = (encoder_attention_mask == 0).view(bsz, 1, 1, src_len)
        for block in self.block:
            hidden_states = block(hidden_states, position_bias, causal_masked, encoder_hidden_states, encoder_masked)
        return self.final_layer_norm(hidden_states)

    def fill_cross_cache(self, cross_cache: Tensor, encoder_hidden_states: Tensor, slots: Tensor) -> int:
        _check_cache(cross_cache, self.num_layers, self.num_heads, self.head_dim, "cross_cache")
        n, src_len = encoder_hidden_states.size(0), encoder_hidden_states.size(1)
        max_len = cross_cache.size(4)
        if src_len < 1 or src_len > max_len:
            raise RuntimeError("encoder length must be in [1, cross_cache.size(4)]")
        if slots.dim() != 1 or slots.size(0) != n:
            raise RuntimeError("slots must be [N] with N = encoder_hidden_states.size(0)")
        check_index(slots, cross_cache.size(2), "slots")
        device = encoder_hidden_states.device
        heads = torch.arange(self.num_heads, device=device).view(1, self.num_heads, 1)
        pos = torch.arange(src_len, device=device).view(1, 1, src_len)
        write_idx = ((slots.view(n, 1, 1) * self.num_heads + heads) * max_len + pos).reshape(-1)   # [N*H*T]
        for i, block in enumerate(self.block):
            k, v = block.layer[1].EncDecAttention.key_values(encoder_hidden_states)                 # [N,H,T,Dh]
            cross_cache[i, 0].view(-1, self.head_dim).index_copy_(0, write_idx, k.reshape(-1, self.head_dim))
            cross_cache[i, 1].view(-1, self.head_dim).index_copy_(0, write_idx, v.reshape(-1, self.head_dim))
        return n

    def decode(self, self_cache: Tensor, cross_cache: Tensor, input_ids: Tensor, slots: Tensor, positions: Tensor,
               kv_len: int, encoder_mask: Tensor, first_slot: int = -2) -> Tensor:
        """Hidden states [N,1,D] after the final layer norm, one token per row."""
        _check_cache(self_cache, self.num_layers, self.num_heads, self.head_dim, "self_cache")
        _check_cache(cross_cache, self.num_layers, self.num_heads, self.head_dim, "cross_cache")
        if cross_cache.size(2) != self_cache.size(2):
            raise RuntimeError("self_cache and cross_cache must have the same number of slots")
        max_len = self_cache.size(4)
        if kv_len < 1 or kv_len > max_len:
            raise RuntimeError("kv_len must be in [1, self_cache.size(4)]")
        n = input_ids.size(0)
        if input_ids.dim() != 1 or slots.dim() != 1 or positions.dim() != 1 or slots.size(0) != n \
                or positions.size(0) != n:
            raise RuntimeError("input_ids, slots and positions must be [N]")
        if encoder_mask.dim() != 2 or encoder_mask.size(0) != n:
            raise RuntimeError("encoder_mask must be [N, E]")
        enc_len = encoder_mask.size(1)
        if enc_len < 1 or enc_len > cross_cache.size(4):
            raise RuntimeError("encoder_mask.size(1) must be in [1, cross_cache.size(4)]")
        # positions < kv_len <= M: a token must see its own key, and a write never leaves its slot.
        check_index(slots, self_cache.size(2), "slots")
        check_index(positions, kv_len, "positions (must be < kv_len)")
        device = input_ids.device
        heads = torch.arange(self.num_heads, device=device).view(1, self.num_heads)
        write_idx = ((slots.view(n, 1) * self.num_heads + heads) * max_len + positions.view(n, 1)).reshape(-1)
        key_pos = torch.arange(kv_len, device=device)
        relative_position = (key_pos.view(1, kv_len) - positions.view(n, 1)).view(n, 1, kv_len)   # k - p
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(relative_position)     # [N,H,1,kv]
        masked = (key_pos.view(1, kv_len) > positions.view(n, 1)).view(n, 1, 1, kv_len)
        encoder_masked = (encoder_mask == 0).view(n, 1, 1, enc_len)
        first_slot = _resolve_first_slot(slots, first_slot)
        hidden_states = self.embed_tokens(input_ids.view(n, 1))
        for i, block in enumerate(self.block):
            hidden_states = block.decode(hidden_states, self_cache[i, 0], self_cache[i, 1], write_idx,
                                         cross_cache[i, 0], cross_cache[i, 1], slots, first_slot, kv_len, enc_len,
                                         position_bias, masked, encoder_masked)
        return self.final_layer_norm(hidden_states)


class T5ForConditionalGeneration(nn.Module):
    """HF's T5ForConditionalGeneration parameters with the methods of the blip2-node "t5" contract.
    encoder.embed_tokens.weight and decoder.embed_tokens.weight ARE shared.weight; lm_head.weight is
    too when tie_lm_head (see lm_head_is_tied)."""

    output_scale: torch.jit.Final[float]
    scale_decoder_outputs: torch.jit.Final[bool]

    def __init__(self, cfg: T5Config, tie_lm_head: bool = False):
        super().__init__()
        self.scale_decoder_outputs = cfg.scale_decoder_outputs
        self.output_scale = cfg.d_model ** -0.5
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5EncoderStack(cfg)
        self.decoder = T5DecoderStack(cfg)
        self.encoder.embed_tokens.weight = self.shared.weight
        self.decoder.embed_tokens.weight = self.shared.weight
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if tie_lm_head:
            self.lm_head.weight = self.shared.weight

    def _logits(self, sequence_output: Tensor) -> Tensor:
        if self.scale_decoder_outputs:
            sequence_output = sequence_output * self.output_scale
        # The head runs in the model dtype (as HF); logits are handed out as float32.
        return self.lm_head(sequence_output).float()

    @torch.jit.export
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.shared(input_ids)

    @torch.jit.export
    def encode(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        return self.encoder(inputs_embeds, attention_mask)

    @torch.jit.export
    def forward_full(self, inputs_embeds: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor) -> Tensor:
        encoder_hidden_states = self.encoder(inputs_embeds, attention_mask)
        return self._logits(self.decoder(decoder_input_ids, encoder_hidden_states, attention_mask))

    @torch.jit.export
    def fill_cross_cache(self, cross_cache: Tensor, encoder_hidden_states: Tensor, slots: Tensor) -> Tensor:
        """Writes every decoder layer's cross-attention keys/values of the encoder states into
        cross_cache[layer, 0/1, slots[i], :, :T, :]. Returns N (the rows written), a 0-d int64 CPU tensor."""
        return torch.tensor(self.decoder.fill_cross_cache(cross_cache, encoder_hidden_states, slots))

    @torch.jit.export
    def decode(self, self_cache: Tensor, cross_cache: Tensor, input_ids: Tensor, slots: Tensor, positions: Tensor,
               kv_len: int, encoder_mask: Tensor, first_slot: int = -2) -> Tensor:
        hidden_states = self.decoder.decode(self_cache, cross_cache, input_ids, slots, positions, kv_len,
                                            encoder_mask, first_slot)
        return self._logits(hidden_states[:, 0])

    @torch.jit.export
    def text_hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids [B,T], attention_mask [B,T] -> last_hidden_state [B,T,D]: transformers 5.18's
        Blip2Model.get_text_features for T5, i.e. `language_model.get_encoder()(input_ids, attention_mask)`
        (no image). Pad positions are computed as HF computes them (they attend the real tokens; pad
        keys are masked), so they match HF too; they mean nothing."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor) -> Tensor:
        """Same as forward_full."""
        return self.forward_full(inputs_embeds, attention_mask, decoder_input_ids)


# The "t5" language_model.pt contract in manifest form (export/README.md): "float" is the model
# dtype, "float32" always float32.
LANGUAGE_MODEL_METHODS = {
    "embed_tokens": {"inputs": ["input_ids: int64[N,T]"], "outputs": ["inputs_embeds: float[N,T,D]"]},
    "encode": {"inputs": ["inputs_embeds: float[B,T,D]", "attention_mask: int64[B,T]"],
               "outputs": ["encoder_hidden_states: float[B,T,D]"]},
    "forward_full": {"inputs": ["inputs_embeds: float[B,T,D]", "attention_mask: int64[B,T]",
                                "decoder_input_ids: int64[B,Td]"],
                     "outputs": ["logits: float32[B,Td,V]"]},
    "fill_cross_cache": {"inputs": ["cross_cache: float[L,2,S,H,Menc,Dh]", "encoder_hidden_states: float[N,T,D]",
                                    "slots: int64[N]"],
                         "outputs": ["rows: int64[] (N, a 0-d CPU tensor)"]},
    "decode": {"inputs": ["self_cache: float[L,2,S,H,M,Dh]", "cross_cache: float[L,2,S,H,Menc,Dh]",
                          "input_ids: int64[N]", "slots: int64[N]", "positions: int64[N]", "kv_len: int",
                          "encoder_mask: int64[N,E]", "first_slot: int = -2"],
               "outputs": ["logits: float32[N,V]"]},
    "text_hidden_states": {"inputs": ["input_ids: int64[B,T]", "attention_mask: int64[B,T]"],
                           "outputs": ["last_hidden_state: float[B,T,D]"]},
}


# ---- loading ---------------------------------------------------------------------------------------

def prepare_state_dict(state_dict: Mapping[str, Tensor], prefix: str = "") -> Dict[str, Tensor]:
    """An HF T5ForConditionalGeneration state dict (prefix already stripped, e.g. BLIP-2's
    `language_model.`, which `prefix` puts back in messages) made loadable with
    load_state_dict(strict=True), as HF 5.18 loads it:

    * shared.weight, if absent, from encoder.embed_tokens.weight, decoder.embed_tokens.weight or
      lm_head.weight (HF's tying works both ways);
    * encoder.embed_tokens.weight / decoder.embed_tokens.weight filled from shared.weight; present but
      different is an ExportError (untied input embeddings are not supported);
    * lm_head.weight filled from shared.weight when absent (HF 5.18 always ties it then, whatever
      tie_word_embeddings says); a present lm_head.weight is kept (Flan-T5's differs from shared);
    * the unused decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight dropped.
    """
    sd = {k: v for k, v in state_dict.items() if k not in UNUSED_KEYS}
    if "shared.weight" not in sd:
        for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            if k in sd:
                sd["shared.weight"] = sd[k]
                break
        else:
            raise ExportError(f"T5 state dict has no {prefix}shared.weight (nor an embedding tied to it)")
    shared = sd["shared.weight"]
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if k in sd:
            # (on meta tensors the exporter compares the data later: weights.require_equal)
            require_equal(sd[k], shared, f"T5 {prefix}{k} differs from {prefix}shared.weight (untied input "
                                         f"embeddings are not supported)")
        sd[k] = shared
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = shared
    return sd


def lm_head_is_tied(prepared: Mapping[str, Tensor]) -> bool:
    """Whether a prepared state dict's lm_head.weight equals shared.weight (then the module ties the
    two and the exported file holds the matrix once)."""
    a, b = prepared["lm_head.weight"], prepared["shared.weight"]
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def set_dtype(model: nn.Module, dtype: torch.dtype, wo_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Casts the parameters to dtype, the feed-forward `wo` weights to wo_dtype. Default wo_dtype:
    float32 when dtype is float16 (HF's `_keep_in_fp32_modules = ["wo"]`, which transformers 5.18
    applies only to float16 loads), else dtype. Cast an fp32 model before load_state_dict so each
    parameter is converted once, from the checkpoint's values."""
    if wo_dtype is None:
        wo_dtype = torch.float32 if dtype == torch.float16 else dtype
    model.to(dtype)
    for name, module in model.named_modules():
        if name.endswith("DenseReluDense"):
            module.wo.to(wo_dtype)
    return model


def from_state_dict(cfg: T5Config, state_dict: Mapping[str, Tensor], dtype: torch.dtype = torch.float32,
                    wo_dtype: Optional[torch.dtype] = None) -> T5ForConditionalGeneration:
    """prepare_state_dict, build (lm_head tied when it equals shared), cast (set_dtype), load strictly, eval."""
    sd = prepare_state_dict(state_dict)
    model = T5ForConditionalGeneration(cfg, tie_lm_head=lm_head_is_tied(sd))
    set_dtype(model, dtype, wo_dtype)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ExportError(f"T5 state dict does not match the config: {e}") from None
    return model.eval()
