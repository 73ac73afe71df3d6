"""OPT decoder (the language model of BLIP-2 OPT checkpoints), scriptable, with a slot KV cache.

Parameter names equal Hugging Face's `OPTForCausalLM` (`model.decoder.layers.0.self_attn.q_proj.weight`,
`lm_head.weight`, ...), so its state dict loads unchanged. Numerics follow transformers v4.45.1 with
the eager attention implementation: query scaled before the product, additive mask of
`finfo(dtype).min` clamped with `torch.max`, float16 softmax computed in float32 (bfloat16 is not
upcast, as in HF), learned positions with an offset of 2 computed from `cumsum(attention_mask)`.

Exported methods (see export/README.md for the contract):

* `embed_tokens(input_ids [N,T]) -> [N,T,E]`
* `forward_full(inputs_embeds [B,T,E], attention_mask [B,T]) -> logits [B,T,V] float32`
  HF's uncached forward, pads included.
* `forward_cached(cache, inputs_embeds [N,T,E], slots [N], start [N], kv_len, logit_index=None)`
  writes the new keys/values into the slot cache and attends over it.
* `decode(cache, input_ids [N], slots [N], positions [N], kv_len) -> logits [N,V] float32`
* `step(cache, input_ids [N], slots [N], positions [N], kv_len, first_slot, prompt_embeds [P,T,E],
  prompt_slots [P], prompt_start [P], prompt_kv_len, logit_index [P]) -> logits [N+P,V] float32`
  `decode` and `forward_cached` in one call: the products run over both groups' rows at once.
* `text_hidden_states(input_ids [B,T], attention_mask [B,T]) -> last_hidden_state [B,T,E]`
  transformers 5.18's Blip2Model.get_text_features (OPTModel's output, no image), equal at real tokens.

The cache is one tensor `[L, 2, S, H, M, Dh]` (layers, key/value, slots, heads, max_length, head
dim), allocated by the runtime (zeros, model dtype, contiguous). Row i's token t lives at position
`start[i] + t` of slot `slots[i]`; it attends the positions `<= start[i] + t` of its slot. Only
`cache[..., :kv_len, :]` is read. Masked scores are replaced (masked_fill), never added to, so finite
garbage past a row's length cannot produce NaN; the value rows there get probability exactly 0.
When the slots of a call are consecutive (s, s+1, ...) the cache is read through views; otherwise
each layer gathers the rows' slots (index_select). Telling the two apart costs one host read of
`slots[0]` per call.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import Activation
from .errors import ExportError

# OPT's learned positional embedding is offset by 2 (a fairseq leftover; rows 0 and 1 are used only
# by padding positions, whose position id is -1 -> row 1).
POSITION_OFFSET = 2


@dataclass
class OPTConfig:
    """The fields of HF's OPTConfig that change the computation, with HF's defaults."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False  # `_remove_final_layer_norm` in config.json
    word_embed_proj_dim: int = 768  # None in config.json means hidden_size
    num_attention_heads: int = 12
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 2
    eos_token_id: Any = 2  # int or list of ints
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "OPTConfig":
        mt = d.get("model_type", "opt")
        if mt != "opt":
            raise ExportError(f"text_config.model_type is {mt!r}, expected 'opt'")
        hidden = int(d.get("hidden_size", 768))
        wep = d.get("word_embed_proj_dim")
        cfg = cls(
            vocab_size=int(d.get("vocab_size", 50272)),
            hidden_size=hidden,
            num_hidden_layers=int(d.get("num_hidden_layers", 12)),
            ffn_dim=int(d.get("ffn_dim", 3072)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            do_layer_norm_before=bool(d.get("do_layer_norm_before", True)),
            remove_final_layer_norm=bool(d.get("_remove_final_layer_norm", False)),
            word_embed_proj_dim=int(wep) if wep is not None else hidden,
            num_attention_heads=int(d.get("num_attention_heads", 12)),
            activation_function=str(d.get("activation_function", "relu")),
            enable_bias=bool(d.get("enable_bias", True)),
            layer_norm_elementwise_affine=bool(d.get("layer_norm_elementwise_affine", True)),
            pad_token_id=d.get("pad_token_id", 1),
            bos_token_id=d.get("bos_token_id", 2),
            eos_token_id=d.get("eos_token_id", 2),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        )
        if cfg.hidden_size % cfg.num_attention_heads != 0:
            raise ExportError(f"OPT hidden_size {cfg.hidden_size} is not divisible by "
                              f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        # HF keeps `_remove_final_layer_norm` only for checkpoints fine-tuned before v4.20.1.
        return self.do_layer_norm_before and not self.remove_final_layer_norm


def dtype_min(dtype: torch.dtype) -> float:
    """torch.finfo(dtype).min, which TorchScript cannot call."""
    if dtype == torch.float16:
        return -65504.0
    if dtype == torch.bfloat16:
        return -3.3895313892515355e38
    if dtype == torch.float64:
        return -1.7976931348623157e308
    return -3.4028234663852886e38


def check_index(index: Tensor, upper: int, what: str):
    """Raises unless 0 <= index < upper everywhere, so a bad slot or position can never write into
    a neighbouring slot of the shared cache. On CUDA torch._assert_async, which queues a
    device-side assert instead of synchronising; elsewhere a host check (free on CPU)."""
    ok = ((index >= 0) & (index < upper)).all()
    if index.is_cuda:
        torch._assert_async(ok)
    elif not bool(ok):
        raise RuntimeError(what + " out of range [0, " + str(upper) + ")")


def _softmax(w: Tensor) -> Tensor:
    # HF (PR 17437) upcasts only float16 attention weights; bfloat16 stays bfloat16.
    if w.dtype == torch.float16:
        return F.softmax(w, dim=-1, dtype=torch.float32).to(torch.float16)
    return F.softmax(w, dim=-1)


class OPTAttention(nn.Module):
    num_heads: torch.jit.Final[int]
    head_dim: torch.jit.Final[int]
    embed_dim: torch.jit.Final[int]
    scaling: torch.jit.Final[float]

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.embed_dim = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.scaling = self.head_dim ** -0.5
        b = cfg.enable_bias
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=b)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=b)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=b)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=b)

    def _shape(self, x: Tensor, seq_len: int, bsz: int) -> Tensor:
        return x.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """HF's eager path without cache. attention_mask: additive [B,1,T,T] (0 or finfo.min)."""
        bsz, tgt_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states) * self.scaling
        key_states = self._shape(self.k_proj(hidden_states), -1, bsz)
        value_states = self._shape(self.v_proj(hidden_states), -1, bsz)
        bh = bsz * self.num_heads
        query_states = self._shape(query_states, tgt_len, bsz).view(bh, -1, self.head_dim)
        key_states = key_states.view(bh, -1, self.head_dim)
        value_states = value_states.view(bh, -1, self.head_dim)
        src_len = key_states.size(1)
        w = torch.bmm(query_states, key_states.transpose(1, 2))
        w = w.view(bsz, self.num_heads, tgt_len, src_len) + attention_mask
        w = torch.max(w, torch.tensor(dtype_min(w.dtype), dtype=w.dtype, device=w.device))
        w = _softmax(w.view(bh, tgt_len, src_len))
        out = torch.bmm(w, value_states)
        out = out.view(bsz, self.num_heads, tgt_len, self.head_dim).transpose(1, 2)
        out = out.reshape(bsz, tgt_len, self.embed_dim)
        return self.out_proj(out)

    def forward_cached(self, hidden_states: Tensor, k_cache: Tensor, v_cache: Tensor, write_idx: Tensor,
                       slots: Tensor, first_slot: int, kv_len: int, masked: Tensor) -> Tensor:
        """k_cache/v_cache: this layer's [S,H,M,Dh] views of the cache. write_idx [N*H*T]: flat row
        indices into k_cache.view(-1, Dh) for the new keys in [N,H,T] order. first_slot >= 0: the
        slots are first_slot, first_slot+1, ... (read the cache through a view, no gather).
        masked [N,1,T,kv_len]: True where a query must not see a key."""
        n, t, _ = hidden_states.size()
        out = self._attend(self.q_proj(hidden_states) * self.scaling, self.k_proj(hidden_states),
                           self.v_proj(hidden_states), n, t, k_cache, v_cache, write_idx, slots, first_slot, kv_len, masked)
        return self.out_proj(out)

    def forward_step(self, hidden_states: Tensor, n: int, p: int, t: int, k_cache: Tensor, v_cache: Tensor,
                     dec_write_idx: Tensor, dec_slots: Tensor, dec_first_slot: int, dec_kv_len: int, dec_masked: Tensor,
                     pre_write_idx: Tensor, pre_slots: Tensor, pre_first_slot: int, pre_kv_len: int,
                     pre_masked: Tensor) -> Tensor:
        """hidden_states [n + p*t, E]: n decode rows (one token each) then p prompt rows of t tokens.
        The projections run once over all rows (one pass over the weights); each group attends its
        own slots exactly as forward_cached would."""
        q = self.q_proj(hidden_states) * self.scaling
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        dec = self._attend(q.narrow(0, 0, n), k.narrow(0, 0, n), v.narrow(0, 0, n), n, 1, k_cache, v_cache,
                           dec_write_idx, dec_slots, dec_first_slot, dec_kv_len, dec_masked)
        pre = self._attend(q.narrow(0, n, p * t), k.narrow(0, n, p * t), v.narrow(0, n, p * t), p, t, k_cache, v_cache,
                           pre_write_idx, pre_slots, pre_first_slot, pre_kv_len, pre_masked)
        return self.out_proj(torch.cat([dec.reshape(n, self.embed_dim), pre.reshape(p * t, self.embed_dim)]))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, n: int, t: int, k_cache: Tensor, v_cache: Tensor,
                write_idx: Tensor, slots: Tensor, first_slot: int, kv_len: int, masked: Tensor) -> Tensor:
        """q (scaled), k, v: the projections of n rows of t tokens ([n, t, E] or [n*t, E]); writes k, v
        into the cache and returns the attention output [n, t, E] (before out_proj)."""
        q = q.reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)
        # In-place writes into the runtime's cache (k_cache is a view of it).
        k_cache.view(-1, self.head_dim).index_copy_(0, write_idx, k.reshape(-1, self.head_dim))
        v_cache.view(-1, self.head_dim).index_copy_(0, write_idx, v.reshape(-1, self.head_dim))
        if first_slot >= 0:  # consecutive slots: a strided view, nothing copied
            keys = k_cache.narrow(0, first_slot, n).narrow(2, 0, kv_len)      # [N,H,kv_len,Dh]
            values = v_cache.narrow(0, first_slot, n).narrow(2, 0, kv_len)
        else:  # gather the rows' slots (copies N*H*kv_len*Dh per layer)
            keys = k_cache.narrow(2, 0, kv_len).index_select(0, slots)
            values = v_cache.narrow(2, 0, kv_len).index_select(0, slots)
        w = torch.matmul(q, keys.transpose(-1, -2))                   # [N,H,T,kv_len]
        # Replace (not add): whatever lies past a row's length, the score becomes finfo.min and its
        # probability exactly 0, as the HF mask gives for padding.
        w = _softmax(w.masked_fill(masked, dtype_min(w.dtype)))
        out = torch.matmul(w, values)                                 # [N,H,T,Dh]
        return out.transpose(1, 2).reshape(n, t, self.embed_dim)


class OPTDecoderLayer(nn.Module):
    do_layer_norm_before: torch.jit.Final[bool]

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = OPTAttention(cfg)
        self.do_layer_norm_before = cfg.do_layer_norm_before
        self.activation_fn = Activation(cfg.activation_function)
        affine = cfg.layer_norm_elementwise_affine
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, d, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

    def _feed_forward(self, hidden_states: Tensor) -> Tensor:
        # HF flattens to 2-D for the MLP; do the same so the matmuls are the same calls.
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_states.size(-1))
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.fc2(self.activation_fn(self.fc1(hidden_states)))
        hidden_states = (residual + hidden_states).view(shape)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states, attention_mask)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        return self._feed_forward(hidden_states)

    def forward_cached(self, hidden_states: Tensor, k_cache: Tensor, v_cache: Tensor, write_idx: Tensor,
                       slots: Tensor, first_slot: int, kv_len: int, masked: Tensor) -> Tensor:
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = residual + self.self_attn.forward_cached(
            hidden_states, k_cache, v_cache, write_idx, slots, first_slot, kv_len, masked)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        return self._feed_forward(hidden_states)

    def forward_step(self, hidden_states: Tensor, n: int, p: int, t: int, k_cache: Tensor, v_cache: Tensor,
                     dec_write_idx: Tensor, dec_slots: Tensor, dec_first_slot: int, dec_kv_len: int, dec_masked: Tensor,
                     pre_write_idx: Tensor, pre_slots: Tensor, pre_first_slot: int, pre_kv_len: int,
                     pre_masked: Tensor) -> Tensor:
        """forward_cached for n decode rows and p prompt rows of t tokens at once, [n + p*t, E]."""
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = residual + self.self_attn.forward_step(
            hidden_states, n, p, t, k_cache, v_cache, dec_write_idx, dec_slots, dec_first_slot, dec_kv_len, dec_masked,
            pre_write_idx, pre_slots, pre_first_slot, pre_kv_len, pre_masked)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        return self._feed_forward(hidden_states)


class OPTDecoder(nn.Module):
    num_layers: torch.jit.Final[int]
    num_heads: torch.jit.Final[int]
    head_dim: torch.jit.Final[int]
    position_offset: torch.jit.Final[int]

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.position_offset = POSITION_OFFSET
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.word_embed_proj_dim, cfg.pad_token_id)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            self.project_out: Optional[nn.Linear] = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False)
            self.project_in: Optional[nn.Linear] = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False)
        else:
            self.project_out = None
            self.project_in = None
        if cfg.has_final_layer_norm:
            self.final_layer_norm: Optional[nn.LayerNorm] = nn.LayerNorm(
                cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList([OPTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def _embed(self, inputs_embeds: Tensor, positions: Tensor) -> Tensor:
        pos_embeds = self.embed_positions(positions + self.position_offset)
        project_in = self.project_in
        if project_in is not None:
            inputs_embeds = project_in(inputs_embeds)
        return inputs_embeds + pos_embeds

    def finish(self, hidden_states: Tensor) -> Tensor:
        """Final layer norm and output projection (per token)."""
        final_layer_norm = self.final_layer_norm
        if final_layer_norm is not None:
            hidden_states = final_layer_norm(hidden_states)
        project_out = self.project_out
        if project_out is not None:
            hidden_states = project_out(hidden_states)
        return hidden_states

    def forward_full(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        bsz, seq_len = attention_mask.size(0), attention_mask.size(1)
        attention_mask = attention_mask.long()
        # HF: positions from the mask, so left padding does not shift the real tokens; pads get -1.
        positions = (torch.cumsum(attention_mask, dim=1).type_as(attention_mask) * attention_mask).long() - 1
        hidden_states = self._embed(inputs_embeds, positions)
        dtype = hidden_states.dtype
        # HF's 4-D mask: finfo.min above the diagonal and on keys whose mask is not 1, 0 elsewhere
        # (the two are combined with masked_fill, not summed, so a value is never 2*min).
        idx = torch.arange(seq_len, device=inputs_embeds.device)
        future = (idx.view(1, -1) > idx.view(-1, 1)).view(1, 1, seq_len, seq_len)
        pad = (attention_mask != 1).view(bsz, 1, 1, seq_len)
        mask = torch.zeros([bsz, 1, seq_len, seq_len], dtype=dtype, device=inputs_embeds.device)
        mask = mask.masked_fill(future | pad, dtype_min(dtype))
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        return self.finish(hidden_states)

    def _check_cache(self, cache: Tensor):
        if cache.dim() != 6 or cache.size(0) != self.num_layers or cache.size(1) != 2 \
                or cache.size(3) != self.num_heads or cache.size(5) != self.head_dim:
            raise RuntimeError("cache must be [num_layers, 2, slots, num_heads, max_length, head_dim]")

    def _rows(self, cache: Tensor, inputs_embeds: Tensor, slots: Tensor, start: Tensor, kv_len: int,
              first_slot: int) -> Tuple[Tensor, Tensor, Tensor, int]:
        """For rows of T tokens at start[i].. of slots[i]: their embedded hidden states [N,T,D], the
        cache rows their keys go to, the attention mask and first_slot resolved (see forward_cached)."""
        max_len = cache.size(4)
        if kv_len < 1 or kv_len > max_len:
            raise RuntimeError("kv_len must be in [1, max_length]")
        n, t = inputs_embeds.size(0), inputs_embeds.size(1)
        device = inputs_embeds.device
        check_index(slots, cache.size(2), "slots")
        check_index(start, max_len - t + 1, "start (positions start..start+T-1 must be < max_length)")
        positions = start.view(n, 1) + torch.arange(t, device=device).view(1, t)          # [N,T]
        heads = torch.arange(self.num_heads, device=device).view(1, self.num_heads, 1)
        write_idx = ((slots.view(n, 1, 1) * self.num_heads + heads) * max_len
                     + positions.view(n, 1, t)).reshape(-1)                                # [N*H*T]
        key_pos = torch.arange(kv_len, device=device)
        masked = (key_pos.view(1, 1, 1, kv_len) > positions.view(n, 1, t, 1))             # [N,1,T,kv]
        if first_slot == -2:
            # One host read per call (not per layer): are the slots consecutive? Then the layers
            # read the cache through views instead of gathering it.
            first_slot = int(slots[0].item())
            if not torch.equal(slots, torch.arange(first_slot, first_slot + n, device=slots.device, dtype=slots.dtype)):
                first_slot = -1
        return self._embed(inputs_embeds, positions), write_idx, masked, first_slot

    def forward_cached(self, cache: Tensor, inputs_embeds: Tensor, slots: Tensor, start: Tensor,
                       kv_len: int, first_slot: int = -2) -> Tensor:
        """Hidden states before `finish` [N,T,D]. first_slot: >= 0 when the caller knows the slots
        are first_slot, first_slot+1, ...; -1 when they are not; -2 to find out here (a host read,
        which on a GPU is a synchronisation)."""
        self._check_cache(cache)
        hidden_states, write_idx, masked, first_slot = self._rows(cache, inputs_embeds, slots, start, kv_len, first_slot)
        for i, layer in enumerate(self.layers):
            hidden_states = layer.forward_cached(hidden_states, cache[i, 0], cache[i, 1], write_idx,
                                                 slots, first_slot, kv_len, masked)
        return hidden_states

    def forward_step(self, cache: Tensor, decode_embeds: Tensor, slots: Tensor, positions: Tensor, kv_len: int,
                     first_slot: int, prompt_embeds: Tensor, prompt_slots: Tensor, prompt_start: Tensor,
                     prompt_kv_len: int, prompt_first_slot: int) -> Tuple[Tensor, Tensor]:
        """forward_cached of decode rows [N,1,D] and prompt rows [P,T,D] in one pass: hidden states
        before `finish`, [N,D] and [P,T,D]. The two groups never share a slot (the caller's rule)."""
        self._check_cache(cache)
        dec, dec_write_idx, dec_masked, first_slot = self._rows(cache, decode_embeds, slots, positions, kv_len, first_slot)
        pre, pre_write_idx, pre_masked, prompt_first_slot = self._rows(
            cache, prompt_embeds, prompt_slots, prompt_start, prompt_kv_len, prompt_first_slot)
        n, p, t = dec.size(0), pre.size(0), pre.size(1)
        hidden_states = torch.cat([dec.reshape(n, -1), pre.reshape(p * t, -1)])
        for i, layer in enumerate(self.layers):
            hidden_states = layer.forward_step(hidden_states, n, p, t, cache[i, 0], cache[i, 1],
                                               dec_write_idx, slots, first_slot, kv_len, dec_masked,
                                               pre_write_idx, prompt_slots, prompt_first_slot, prompt_kv_len, pre_masked)
        return hidden_states.narrow(0, 0, n), hidden_states.narrow(0, n, p * t).view(p, t, -1)


class OPTModel(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTForCausalLM(nn.Module):
    """HF's OPTForCausalLM parameters (`model.decoder.*`, `lm_head.weight`) with the four methods of
    the blip2-node contract. With tie_word_embeddings, lm_head.weight IS embed_tokens.weight."""

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.model = OPTModel(cfg)
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def _logits(self, hidden_states: Tensor) -> Tensor:
        # The LM head runs in the model dtype (as HF); logits are handed out as float32.
        return self.lm_head(self.model.decoder.finish(hidden_states)).float()

    @torch.jit.export
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.decoder.embed_tokens(input_ids)

    @torch.jit.export
    def forward_full(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        hidden_states = self.model.decoder.forward_full(inputs_embeds, attention_mask)
        return self.lm_head(hidden_states).float()

    @torch.jit.export
    def forward_cached(self, cache: Tensor, inputs_embeds: Tensor, slots: Tensor, start: Tensor, kv_len: int,
                       logit_index: Optional[Tensor] = None, first_slot: int = -2) -> Tensor:
        hidden_states = self.model.decoder.forward_cached(cache, inputs_embeds, slots, start, kv_len, first_slot)
        if logit_index is not None:
            rows = torch.arange(hidden_states.size(0), device=hidden_states.device)
            hidden_states = hidden_states[rows, logit_index]  # [N,D]: only these rows reach the head
        return self._logits(hidden_states)

    @torch.jit.export
    def decode(self, cache: Tensor, input_ids: Tensor, slots: Tensor, positions: Tensor, kv_len: int,
               first_slot: int = -2) -> Tensor:
        inputs_embeds = self.model.decoder.embed_tokens(input_ids.view(-1, 1))
        hidden_states = self.model.decoder.forward_cached(cache, inputs_embeds, slots, positions, kv_len, first_slot)
        return self._logits(hidden_states[:, 0])

    @torch.jit.export
    def step(self, cache: Tensor, input_ids: Tensor, slots: Tensor, positions: Tensor, kv_len: int, first_slot: int,
             prompt_embeds: Tensor, prompt_slots: Tensor, prompt_start: Tensor, prompt_kv_len: int,
             logit_index: Tensor, prompt_first_slot: int = -2) -> Tensor:
        """decode(input_ids, slots, positions, kv_len) and forward_cached(prompt_embeds, prompt_slots,
        prompt_start, prompt_kv_len, logit_index) in one call whose products read each weight once:
        logits [N+P, V] float32, the decode rows' then each prompt row's token logit_index[i]."""
        decode_embeds = self.model.decoder.embed_tokens(input_ids.view(-1, 1))
        dec, pre = self.model.decoder.forward_step(cache, decode_embeds, slots, positions, kv_len, first_slot,
                                                   prompt_embeds, prompt_slots, prompt_start, prompt_kv_len,
                                                   prompt_first_slot)
        rows = torch.arange(pre.size(0), device=pre.device)
        return self._logits(torch.cat([dec, pre[rows, logit_index]]))

    @torch.jit.export
    def text_hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids [B,T], attention_mask [B,T] -> last_hidden_state [B,T,E] (after the final layer norm
        and project_out): transformers 5.18's Blip2Model.get_text_features for OPT, i.e.
        `language_model.base_model(input_ids, attention_mask).last_hidden_state`. Equal to HF's at real
        tokens. Pad positions mean nothing: a left pad's query sees no key (its own is masked too),
        every score is finfo.min and its softmax is uniform over all positions, later ones included.
        HF's eager attention computes the same (measured equal); its default sdpa kernel does not
        (measured up to 3.7 apart on the tiny test model), so compare where attention_mask is 1."""
        return self.model.decoder.forward_full(self.model.decoder.embed_tokens(input_ids), attention_mask)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Same as forward_full."""
        return self.forward_full(inputs_embeds, attention_mask)


# The "opt" language_model.pt contract in manifest form (export/README.md): "float" is the model
# dtype, "float32" always float32.
LANGUAGE_MODEL_METHODS = {
    "embed_tokens": {"inputs": ["input_ids: int64[N,T]"], "outputs": ["inputs_embeds: float[N,T,E]"]},
    "forward_full": {"inputs": ["inputs_embeds: float[B,T,E]", "attention_mask: int64[B,T]"],
                     "outputs": ["logits: float32[B,T,V]"]},
    "forward_cached": {"inputs": ["cache: float[L,2,S,H,M,Dh]", "inputs_embeds: float[N,T,E]", "slots: int64[N]",
                                  "start: int64[N]", "kv_len: int", "logit_index: Optional[int64[N]] = None",
                                  "first_slot: int = -2"],
                       "outputs": ["logits: float32[N,T,V] (float32[N,V] with logit_index)"]},
    "decode": {"inputs": ["cache: float[L,2,S,H,M,Dh]", "input_ids: int64[N]", "slots: int64[N]",
                          "positions: int64[N]", "kv_len: int", "first_slot: int = -2"],
               "outputs": ["logits: float32[N,V]"]},
    "step": {"inputs": ["cache: float[L,2,S,H,M,Dh]", "input_ids: int64[N]", "slots: int64[N]",
                        "positions: int64[N]", "kv_len: int", "first_slot: int", "prompt_embeds: float[P,T,E]",
                        "prompt_slots: int64[P]", "prompt_start: int64[P]", "prompt_kv_len: int",
                        "logit_index: int64[P]", "prompt_first_slot: int = -2"],
             "outputs": ["logits: float32[N+P,V]"]},
    "text_hidden_states": {"inputs": ["input_ids: int64[B,T]", "attention_mask: int64[B,T]"],
                           "outputs": ["last_hidden_state: float[B,T,E]"]},
}
