#!/usr/bin/env python3
"""In-house Python baseline: BLIP-2 OPT captioning with our modules run EAGERLY (no TorchScript).

    .venv/bin/python bench/python_eager.py --checkpoint <hf-dir> --batch 1 --new-tokens 20 \
        --threads 2 --runs 5 --warmup 1

Builds export/blip2_export's modules from the HF checkpoint folder, makes seeded random
pixel_values [B,3,H,W], prompts `[<image>]*Q + [bos]` (legacy checkpoints: `[bos]` with the query
embeddings prepended) and runs a Python greedy loop over the same slot KV cache the runtime uses
(preallocated once): image encode, prefill with forward_cached, then one decode step per token. No
early stop at EOS, so every run produces --new-tokens tokens per row.

Prints one JSON line with medians over --runs timed runs (after --warmup untimed ones):
  image_encode_ms  vision + Q-Former + projection
  ttft_ms          image encode + prefill + first token
  ms_per_token     per decode step after the first token
  total_ms         the whole generation
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "export"))

from blip2_export.checkpoint import build_model  # noqa: E402
from blip2_export.greedy import alloc_cache, prompt_embeds  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="Hugging Face BLIP-2 OPT checkpoint folder")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = ap.parse_args()
    if args.batch < 1 or args.new_tokens < 1 or args.runs < 1 or args.warmup < 0:
        ap.error("--batch, --new-tokens and --runs must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"

    model = build_model(args.checkpoint, report=None, dtype=dtype).to(device)
    cfg = model.config
    lm = model.language_model
    q = cfg.num_query_tokens
    bos = cfg.text.bos_token_id
    if cfg.image_token_index is not None:
        prompt = [cfg.image_token_index] * q + [bos]
    else:
        prompt = [bos]
    seq_len = q + 1  # image tokens + BOS either way
    max_len = seq_len + args.new_tokens
    if max_len > cfg.text.max_position_embeddings:
        ap.error(f"{max_len} positions exceed max_position_embeddings {cfg.text.max_position_embeddings}")

    b = args.batch
    g = torch.Generator().manual_seed(args.seed)
    size = cfg.vision.image_size
    pixel_values = torch.randn([b, 3, size, size], generator=g).to(device=device, dtype=dtype)
    t = cfg.text
    cache = alloc_cache(t.num_hidden_layers, t.num_attention_heads, t.head_dim, b, max_len, dtype, str(device))
    slots = torch.arange(b, device=device)
    zeros = torch.zeros(b, dtype=torch.long, device=device)
    last = torch.full([b], seq_len - 1, dtype=torch.long, device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def run():
        sync()
        t0 = time.perf_counter()
        image = model.image_features(pixel_values)                  # [B,Q,E]
        sync()
        t1 = time.perf_counter()
        embeds = torch.stack([prompt_embeds(lm, prompt, image[i], cfg.image_token_index) for i in range(b)])
        logits = lm.forward_cached(cache, embeds, slots, zeros, seq_len, last)
        token = logits.argmax(-1)
        first = token.tolist()                                       # the token reaches the host
        t2 = time.perf_counter()
        tokens = [first]
        for step in range(1, args.new_tokens):
            positions = torch.full([b], seq_len + step - 1, dtype=torch.long, device=device)
            logits = lm.decode(cache, token, slots, positions, seq_len + step)
            token = logits.argmax(-1)
            tokens.append(token.tolist())
        t3 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t0) * 1e3, (t3 - t2) * 1e3 / max(args.new_tokens - 1, 1), (t3 - t0) * 1e3

    with torch.inference_mode():
        for _ in range(args.warmup):
            run()
        results = [run() for _ in range(args.runs)]
    med = [statistics.median(r[i] for r in results) for i in range(4)]
    print(json.dumps({
        "impl": "python-eager", "batch": b, "threads": args.threads,
        "image_encode_ms": round(med[0], 3), "ttft_ms": round(med[1], 3),
        "ms_per_token": round(med[2], 3), "total_ms": round(med[3], 3),
        "new_tokens": args.new_tokens,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
