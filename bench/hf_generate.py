#!/usr/bin/env python3
"""transformers' own Blip2ForConditionalGeneration.generate on a checkpoint folder: caption latency.

    .venv/bin/python bench/hf_generate.py --checkpoint <hf-dir> [--attn eager|sdpa] [--batch 1]
        [--new-tokens 20] [--threads 2] [--runs 5] [--warmup 2] [--dtype float32|bfloat16]
        [--prompt-ids 5,6,7] [--first-only]

The same workload as bench/generate.ts: seeded random pixel_values, input_ids = num_query_tokens
<image> ids + BOS (+ --prompt-ids), greedy, exactly --new-tokens new tokens (the checkpoint's EOS is
removed from the generation config and the output length is checked).

TTFT is taken with a streamer: generate() hands it the prompt, then each step's tokens as they are
chosen, so its second put() is the first new token reaching the caller (image encoding + prefill +
first choice), as onStep in blip2-node. ms/token = the rest / (new_tokens - 1).

Prints JSON lines: {"event":"load",...} (from_pretrained seconds), {"event":"first",...} (the first
generate after loading: untimed warm-ups come after it), then one line with the medians over --runs
(plus image_features_ms: get_image_features alone, median of --runs) and peak_rss_mb (VmHWM).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class StepClock:
    """A generate() streamer that only records when the first new token arrives."""

    def __init__(self):
        self.puts = 0
        self.first = None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # put 1 is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--prompt-ids", default="", help="comma-separated token ids after BOS (default: none, a caption)")
    ap.add_argument("--first-only", action="store_true", help="stop after the first generate (cold-start runs)")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (ms/token needs a decode step)")

    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(
        args.checkpoint, attn_implementation=args.attn, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    base = dict(impl=f"transformers-{args.attn}", transformers=transformers.__version__,
                torch=torch.__version__.split("+")[0], dtype=args.dtype, batch=args.batch, threads=args.threads,
                new_tokens=args.new_tokens)
    print(json.dumps({**base, "event": "load", "load_s": round(load_s, 3), "rss_mb": round(peak_rss_mb(), 1)}), flush=True)

    cfg = model.config
    q = cfg.num_query_tokens
    bos = model.generation_config.bos_token_id if model.generation_config.bos_token_id is not None else 2
    pad = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else 1
    prompt = [bos] + [int(x) for x in args.prompt_ids.split(",") if x]
    if cfg.image_token_index is not None:
        prompt = [cfg.image_token_index] * q + prompt
    b = args.batch
    input_ids = torch.tensor([prompt] * b, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    g = torch.Generator().manual_seed(args.seed)
    size = cfg.vision_config.image_size
    pixel_values = torch.randn([b, 3, size, size], generator=g).to(dtype)
    gen = model.generation_config
    # No early stop: exactly new_tokens per row. Blip2's generate hands the call to the language
    # model's generate, which fills an unset eos_token_id from its own generation config.
    for g in (gen, model.language_model.generation_config):
        g.eos_token_id = None
    gen.pad_token_id = pad

    def run():
        clock = StepClock()
        start = time.perf_counter()
        out = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                             max_new_tokens=args.new_tokens, min_new_tokens=None, do_sample=False, num_beams=1,
                             generation_config=gen, streamer=clock)
        end = time.perf_counter()
        made = out.shape[1] - input_ids.shape[1]
        if made != args.new_tokens:
            raise SystemExit(f"transformers made {made} new tokens, not {args.new_tokens}")
        ttft = (clock.first - start) * 1e3
        return ttft, (end - clock.first) * 1e3 / (args.new_tokens - 1), (end - start) * 1e3

    with torch.inference_mode():
        first = run()
        print(json.dumps({**base, "event": "first", "ttft_ms": round(first[0], 3), "ms_per_token": round(first[1], 3),
                          "total_ms": round(first[2], 3)}), flush=True)
        if args.first_only:
            return 0
        for _ in range(args.warmup):
            run()
        results = [run() for _ in range(args.runs)]
        feats = []
        for _ in range(args.runs):
            t = time.perf_counter()
            model.get_image_features(pixel_values=pixel_values)
            feats.append((time.perf_counter() - t) * 1e3)
    med = [statistics.median(r[i] for r in results) for i in range(3)]
    print(json.dumps({**base, "event": "warm", "runs": args.runs, "image_features_ms": round(statistics.median(feats), 3),
                      "ttft_ms": round(med[0], 3), "ms_per_token": round(med[1], 3), "total_ms": round(med[2], 3),
                      "peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
