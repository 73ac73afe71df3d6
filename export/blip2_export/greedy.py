"""Reference host-side use of the language model methods over the slot cache: prompt embeddings
(image tokens replaced by the query embeddings, or the legacy prepend), cache allocation, a
greedy loop (prefill with forward_cached, then decode steps) and transformers' beam search over
any step function (`beam_search`). Used by the tests and by bench/python_eager.py; works with the
eager modules and with the scripted/loaded ones alike.
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


def _gather_beams(tensor: Tensor, indices: Tensor) -> Tensor:
    """tensor [B,K,...], indices [B,N] -> [B,N,...] (HF's GenerationMixin._gather_beams)."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.gather(tensor, 1, indices.expand(*indices.shape[:2], *tensor.shape[2:]))


def beam_search(step, first_logits: Tensor, batch_size: int, num_beams: int, max_new_tokens: int,
                eos_token_ids: Sequence[int], length_penalty: float = 1.0) -> Tuple[List[List[int]], Tensor]:
    """transformers 5.18's beam search (GenerationMixin._beam_search with early_stopping=False, no
    logits processors, one returned sequence per row), over any step function, so that a runtime's
    slot-cache loop can be checked against HF's generate token for token.

    first_logits [B*num_beams, V]: the prompt's last logits for every beam (row b's beams are rows
    b*num_beams ... of every tensor). step(tokens [B*num_beams], source [B*num_beams]) -> logits
    [B*num_beams, V]: first reorder the caches so beam i continues beam source[i] (a flat index),
    then feed tokens[i] to beam i. Returns (new token ids of each row's best beam, HF's
    sequences_scores [B]): sum of log-probabilities / (new tokens ** length_penalty); rows are not
    padded (HF pads them to the longest)."""
    n_eos = len(eos_token_ids)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long)
    b, nb = batch_size, num_beams
    keep = max(2, 1 + n_eos) * nb
    top_num_beam_mask = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(keep - nb, dtype=torch.bool)])
    running = torch.full((b, nb, max_new_tokens), -1, dtype=torch.long)
    sequences = running.clone()
    running_scores = torch.zeros(b, nb)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((b, nb), -1e9)
    finished = torch.zeros(b, nb, dtype=torch.bool)
    unsatisfied = torch.ones(b, 1, dtype=torch.bool)
    running_src = torch.full((b, nb, max_new_tokens), -1, dtype=torch.long)
    lengths = torch.zeros(b, nb, dtype=torch.long)  # new tokens of the finished hypotheses
    logits = first_logits
    cur = 0
    while True:
        vocab = logits.size(-1)
        log_probs = torch.log_softmax(logits.float(), dim=-1).view(b, nb, vocab) + running_scores[:, :, None]
        topk_log_probs, topk_indices = torch.topk(log_probs.reshape(b, nb * vocab), k=keep)
        topk_beam = topk_indices // vocab
        topk_ids = topk_indices % vocab
        topk_running = _gather_beams(running, topk_beam)
        topk_running[:, :, cur] = topk_ids
        topk_src = _gather_beams(running_src, topk_beam)
        topk_src[:, :, cur] = topk_beam + torch.arange(b).view(-1, 1) * nb
        hits = torch.isin(topk_ids, eos) | (cur + 1 >= max_new_tokens)
        # the next running beams: the best candidates that did not stop
        masked = topk_log_probs + hits.float() * -1.0e9
        nxt = torch.topk(masked, k=nb)[1]
        running = _gather_beams(topk_running, nxt)
        running_scores = _gather_beams(masked, nxt)
        running_src = _gather_beams(topk_src, nxt)
        # the finished hypotheses: the best num_beams of those so far and the top candidates that stopped
        just = hits & top_num_beam_mask[None, :]
        scores = topk_log_probs / ((cur + 1) ** length_penalty)
        scores = scores + (~unsatisfied).float() * -1.0e9
        scores = scores + (~just) * -1.0e9
        merged = torch.topk(torch.cat([beam_scores, scores], 1), k=nb)[1]
        sequences = _gather_beams(torch.cat([sequences, topk_running], 1), merged)
        beam_scores = _gather_beams(torch.cat([beam_scores, scores], 1), merged)
        finished = _gather_beams(torch.cat([finished, just], 1), merged)
        lengths = _gather_beams(torch.cat([lengths, torch.full((b, keep), cur + 1)], 1), merged)
        source = running_src[:, :, cur].reshape(-1)
        cur += 1
        worst = torch.where(finished, beam_scores.min(dim=1, keepdim=True)[0], torch.tensor(-1.0e9))
        unsatisfied = unsatisfied & (running_scores[:, :1] / (cur ** length_penalty) > worst).any(-1, keepdim=True)
        if not bool(unsatisfied.any()) or bool(hits.all()):
            break
        logits = step(running[:, :, cur - 1].reshape(-1), source)
    ids = [sequences[i, 0, : int(lengths[i, 0])].tolist() for i in range(b)]
    return ids, beam_scores[:, 0]
