"""Reference host-side use of the language model methods over the slot cache: prompt embeddings
(image tokens replaced by the query embeddings, or the legacy prepend), cache allocation, and a
greedy loop (prefill with forward_cached, then decode steps). Used by the tests and by
bench/python_eager.py; works with the eager modules and with the scripted/loaded ones alike.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def prompt_embeds(lm, input_ids: Sequence[int], image_embeds: Tensor, image_token_index: Optional[int]) -> Tensor:
    """Embeddings [T,E] of one prompt. New path (image_token_index set): embed_tokens(input_ids) with
    the image-token positions overwritten, in order, by image_embeds [Q,E] (HF's masked_scatter);
    there must be exactly Q of them. Legacy path: [image_embeds ; embed_tokens(input_ids)]."""
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=image_embeds.device)
    embeds = lm.embed_tokens(ids)[0]
    if image_token_index is None:
        return torch.cat([image_embeds.to(embeds.dtype), embeds], dim=0)
    where = ids[0] == image_token_index
    n = int(where.sum())
    if n != image_embeds.size(0):
        raise ValueError(f"prompt has {n} image tokens, expected {image_embeds.size(0)}")
    embeds = embeds.clone()
    embeds[where] = image_embeds.to(embeds.dtype)
    return embeds


def alloc_cache(num_layers: int, num_heads: int, head_dim: int, slots: int, max_length: int,
                dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
    return torch.zeros([num_layers, 2, slots, num_heads, max_length, head_dim], dtype=dtype, device=device)


def prefill(lm, cache: Tensor, rows: List[Tensor], slots: Sequence[int]) -> Tensor:
    """Right-pads the rows [T_i,E] into one batch, runs forward_cached from position 0 and returns
    the logits of each row's last real token [N,V]."""
    n, t = len(rows), max(r.size(0) for r in rows)
    batch = rows[0].new_zeros([n, t, rows[0].size(1)])
    for i, r in enumerate(rows):
        batch[i, : r.size(0)] = r
    dev = batch.device
    lengths = torch.tensor([r.size(0) for r in rows], dtype=torch.long, device=dev)
    return lm.forward_cached(cache, batch, torch.tensor(list(slots), dtype=torch.long, device=dev),
                             torch.zeros(n, dtype=torch.long, device=dev), t, lengths - 1)


def greedy(lm, cache: Tensor, rows: List[Tensor], new_tokens: int,
           slots: Optional[Sequence[int]] = None) -> Tuple[List[List[int]], Tensor]:
    """Greedy decoding of `new_tokens` tokens for each row (no early stop). Returns the token ids
    per row and the raw step logits [N,new_tokens,V]."""
    n = len(rows)
    slots = list(range(n)) if slots is None else list(slots)
    dev = rows[0].device
    slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
    lengths = torch.tensor([r.size(0) for r in rows], dtype=torch.long, device=dev)
    logits = prefill(lm, cache, rows, slots)
    steps = [logits]
    token = logits.argmax(-1)
    out = [token]
    for s in range(1, new_tokens):
        positions = lengths + (s - 1)
        kv_len = int(positions.max()) + 1
        logits = lm.decode(cache, token, slot_t, positions, kv_len)
        steps.append(logits)
        token = logits.argmax(-1)
        out.append(token)
    ids = torch.stack(out, dim=1).tolist()
    return ids, torch.stack(steps, dim=1)
