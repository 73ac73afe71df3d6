#!/usr/bin/env python3
"""transformers' Blip2ForConditionalGeneration.generate: bench/gpu.ts's figures, for bench/gpu.sh.

    python3 bench/hf_gpu.py --checkpoint <hf-dir> [--device cuda] [--dtype float16] [--attn eager]
        [--new-tokens 32] [--runs 5] [--warmup 2] [--encode-batches 1,32] [--batches 1,8,64]
        [--concurrency 64] [--concurrency-runs 2] [--pixels file.f32] [--threads N]

The same workload as bench/gpu.ts: the pixels it wrote (--pixels: [64, 3, S, S] float32, image i
= row i; without the file, seeded torch.randn, said in the setup line), input_ids =
num_query_tokens <image> ids + BOS (OPT) or + </s> (T5), all-ones attention mask, greedy, exactly
--new-tokens new tokens (EOS removed from both generation configs, the output length checked).

  encode      get_image_features at each --encode-batches size, then torch.cuda.synchronize()
  decode      one generate() of B rows for B in --batches: TTFT (a streamer's first put after the
              prompt: generate hands it each step's tokens after .cpu(), so the step is done),
              ms/token = the rest / (new tokens - 1), tokens/s = B x 1000 / ms per token
  static_batch  transformers has no continuous batching: its answer to --concurrency clients is one
              generate() of that many rows (encode and prefill included); tokens/s = rows x new
              tokens / the call's seconds, median of --concurrency-runs after one warm-up
  end         torch.cuda.max_memory_allocated / max_memory_reserved over the process (weights
              included), peak RSS
JSON lines on stdout, medians of --runs after --warmup untimed calls.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

# The helpers of the CPU benchmark (this file runs from bench/, so it is on sys.path).
from hf_generate import DTYPES, StepClock, peak_rss_mb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--encode-batches", default="1,32")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--concurrency-runs", type=int, default=2)
    ap.add_argument("--pixels", default="")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (ms/token needs a decode step)")

    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    base = dict(bench="gpu", impl="transformers-" + args.attn, transformers=transformers.__version__,
                torch=torch.__version__, device=args.device, dtype=args.dtype, attention=args.attn,
                new_tokens=args.new_tokens)
    t0 = time.perf_counter()
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(
        args.checkpoint, attn_implementation=args.attn, dtype=dtype).to(device).eval()
    sync()
    load_s = time.perf_counter() - t0
    cfg = model.config
    t5 = cfg.text_config.model_type == "t5"
    print(json.dumps({**base, "event": "load", "load_s": round(load_s, 3), "architecture": "t5" if t5 else "opt",
                      "gpu": torch.cuda.get_device_name(device) if cuda else None, "rss_mb": round(peak_rss_mb(), 1)}),
          flush=True)

    size = cfg.vision_config.image_size
    need = max([args.concurrency] + [int(b) for b in args.batches.split(",") if b] +
               [int(b) for b in args.encode_batches.split(",") if b])
    if args.pixels and os.path.exists(args.pixels):
        flat = torch.from_numpy(__import__("numpy").fromfile(args.pixels, dtype="float32"))
        images = flat.view(-1, 3, size, size)
        source = args.pixels
    else:
        images = torch.randn([64, 3, size, size], generator=torch.Generator().manual_seed(1))
        source = "torch.randn (no --pixels file)"
    rows = images[torch.arange(need) % images.shape[0]].to(device=device, dtype=dtype)  # image i = row i % 64
    gen = model.generation_config
    # No early stop: exactly new_tokens per row. Blip2's generate hands the call to the language
    # model's generate, which fills an unset eos_token_id from its own generation config.
    eos = gen.eos_token_id if gen.eos_token_id is not None else cfg.text_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    bos = gen.bos_token_id if gen.bos_token_id is not None else getattr(cfg.text_config, "bos_token_id", None)
    for g in (gen, model.language_model.generation_config):
        g.eos_token_id = None
    if gen.pad_token_id is None:
        gen.pad_token_id = cfg.text_config.pad_token_id
    prompt = [cfg.image_token_index] * cfg.num_query_tokens + [eos if t5 else bos]
    print(json.dumps({**base, "event": "setup", "pixels": source, "prompt_length": len(prompt), "runs": args.runs,
                      "warmup": args.warmup}), flush=True)

    def inputs(b):
        ids = torch.tensor([prompt] * b, dtype=torch.long, device=device)
        return dict(pixel_values=rows[:b], input_ids=ids, attention_mask=torch.ones_like(ids))

    def generate(b):
        kw = inputs(b)
        clock = StepClock()
        sync()
        start = time.perf_counter()
        out = model.generate(**kw, max_new_tokens=args.new_tokens, min_new_tokens=None, do_sample=False, num_beams=1,
                             generation_config=gen, streamer=clock)
        sync()
        end = time.perf_counter()
        made = out.shape[1] - (1 if t5 else kw["input_ids"].shape[1])  # T5: decoder start id, then the new ids
        if made != args.new_tokens or out.shape[0] != b:
            raise SystemExit(f"transformers made {out.shape[0]} x {made} tokens, not {b} x {args.new_tokens}")
        return (clock.first - start) * 1e3, (end - clock.first) * 1e3 / (args.new_tokens - 1), (end - start) * 1e3

    with torch.inference_mode():
        for b in [int(x) for x in args.encode_batches.split(",") if x]:
            def encode():
                sync()
                t = time.perf_counter()
                model.get_image_features(pixel_values=rows[:b])
                sync()
                return (time.perf_counter() - t) * 1e3
            for _ in range(args.warmup):
                encode()
            ms = statistics.median(encode() for _ in range(args.runs))
            print(json.dumps({**base, "event": "encode", "batch": b, "ms": round(ms, 3), "ms_per_image": round(ms / b, 3),
                              "via": "get_image_features"}), flush=True)
        for b in [int(x) for x in args.batches.split(",") if x]:
            for _ in range(args.warmup):
                generate(b)
            results = [generate(b) for _ in range(args.runs)]
            med = [statistics.median(r[i] for r in results) for i in range(3)]
            print(json.dumps({**base, "event": "decode", "batch": b, "ttft_ms": round(med[0], 3),
                              "ms_per_token": round(med[1], 3), "total_ms": round(med[2], 3),
                              "tokens_per_s": round(b * 1000 / med[1], 1),
                              "e2e_tokens_per_s": round(b * args.new_tokens * 1000 / med[2], 1)}), flush=True)
        if args.concurrency > 0:
            b = args.concurrency
            generate(b)
            totals = [generate(b)[2] for _ in range(max(args.concurrency_runs, 1))]
            call_s = statistics.median(totals) / 1e3
            print(json.dumps({**base, "event": "static_batch", "batch": b, "call_s": round(call_s, 3),
                              "tokens_per_s": round(b * args.new_tokens / call_s, 1),
                              "requests_per_s": round(b / call_s, 2)}), flush=True)
    end = {**base, "event": "end", "peak_rss_mb": round(peak_rss_mb(), 1)}
    if cuda:
        end.update(max_memory_allocated_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                   max_memory_reserved_mib=round(torch.cuda.max_memory_reserved(device) / 2**20, 1))
    print(json.dumps(end), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
