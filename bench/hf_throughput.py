#!/usr/bin/env python3
"""transformers' static batches: one Blip2ForConditionalGeneration.generate call per batch of B requests.

    .venv/bin/python bench/hf_throughput.py --checkpoint <hf-dir> --requests <base> [--batches 1,4,16,64]
        [--runs 2] [--warmup 1] [--threads 2] [--new-tokens 20] [--attn sdpa|eager]

<base>.f32 / <base>.json are the requests bench/throughput.ts serves (pixel values of its seeded
images after Blip2Processor, and each request's input ids). Batch B takes requests 0..B-1 (cycling),
left-pads the ids with the pad id (attention mask 0 there, as the processor's padding='longest'
would), and generates greedily exactly --new-tokens tokens (EOS removed from the generation config).
The call includes the image encoding. requests/s = B / median call seconds. One JSON line per batch.
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--requests", required=True, help="base path of the .f32 / .json request files")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"])
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    with open(args.requests + ".json") as f:
        meta = json.load(f)
    pixels = torch.from_numpy(np.fromfile(args.requests + ".f32", dtype=np.float32).reshape(meta["shape"]))
    ids = meta["ids"]
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(
        args.checkpoint, attn_implementation=args.attn, dtype=torch.float32).eval()
    gen = model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else 1
    # No early stop: exactly new_tokens per row. Blip2's generate hands the call to the language
    # model's generate, which fills an unset eos_token_id from its own generation config.
    for g in (gen, model.language_model.generation_config):
        g.eos_token_id = None
    gen.pad_token_id = pad

    for b in [int(x) for x in args.batches.split(",")]:
        rows = [ids[i % len(ids)] for i in range(b)]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        pixel_values = pixels[torch.arange(b) % pixels.shape[0]].contiguous()

        def call():
            t = time.perf_counter()
            out = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                 max_new_tokens=args.new_tokens, do_sample=False, num_beams=1, generation_config=gen)
            s = time.perf_counter() - t
            if out.shape[1] - width != args.new_tokens:
                raise SystemExit(f"made {out.shape[1] - width} tokens, not {args.new_tokens}")
            return s

        with torch.inference_mode():
            for _ in range(args.warmup):
                call()
            times = [call() for _ in range(args.runs)]
        s = statistics.median(times)
        print(json.dumps({"event": "batch", "impl": f"transformers-{args.attn} static batch",
                          "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
                          "batch": b, "threads": args.threads, "new_tokens": args.new_tokens, "runs": args.runs,
                          "call_s": round(s, 3), "calls_s": [round(t, 3) for t in times],
                          "requests_per_s": round(b / s, 3), "tokens_per_s": round(b * args.new_tokens / s, 1)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
