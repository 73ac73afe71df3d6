#!/usr/bin/env python3
"""A random-weight 16-bit checkpoint with blip2-opt-2.7b's (or blip2-flan-t5-xl's) configuration, made by transformers 5.

    .venv/bin/python bench/hf_real_size.py <out-dir> [--seed 0] [--max-shard-size 2GB]
        [--family opt|t5] [--dtype bfloat16|float16] [--device cpu|cuda]
        [--vision-layers 39] [--qformer-layers 12] [--text-layers 32 (opt) / 24 (t5)]

Sizes (Salesforce/blip2-opt-2.7b): ViT-g 1408 x 39 layers (16 heads, ffn 6144) at 224 px, patch 14;
Q-Former 768 x 12 (cross-attention every 2nd layer), 32 queries; OPT-2.7B: hidden 2560, 32 layers,
32 heads, ffn 10240, vocabulary 50272, 2048 positions; about 3.9B parameters, 7.7 GB in bfloat16.
--family t5 (Salesforce/blip2-flan-t5-xl): the same vision model and Q-Former, Flan-T5-XL: d_model
2048, 24 encoder and 24 decoder layers, 32 heads of 64, gated-gelu ffn 5120, vocabulary 32128,
untied head; about 3.9B parameters. The --*-layers options make a reduced model of the same widths
(--text-layers: T5's encoder and decoder each), to validate the benchmarks quickly.

float32 weights are never held: the model is built on the meta device with --dtype (default
bfloat16) as the default dtype, its storage allocated once in that dtype (to_empty) on --device
(cuda fills a 7.7 GB model in seconds; save_pretrained copies it out), then every parameter is
filled in place with seeded noise (its own generator per tensor, seeded from --seed and the tensor's
name order): LayerNorm weights 1 + N(0, 0.02), every other parameter N(0, 0.02) (the same seeds
give other numbers on cuda than on the CPU). save_pretrained writes sharded safetensors. OPT: the
tokenizer and processor files are tiny.py's (a small byte-level BPE, <image> right after it: the
ids fit the 50272-row vocabulary); T5: hf_tiny.py's Unigram T5Tokenizer through a Blip2Processor.
generation_config.json as the real checkpoint's. Prints one JSON line (parameters, bytes, seconds,
peak RSS).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "export"))

from blip2_export import tiny  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def config(vision_layers: int, qformer_layers: int, text_layers: int, image_token_index: int, family: str = "opt",
           dtype: str = "bfloat16"):
    import transformers

    vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=vision_layers, num_attention_heads=16,
                  image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
    qformer = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=qformer_layers, num_attention_heads=12,
                   cross_attention_frequency=2, encoder_hidden_size=1408, max_position_embeddings=512,
                   vocab_size=30522)
    if family == "t5":
        text = dict(model_type="t5", d_model=2048, d_kv=64, d_ff=5120, num_layers=text_layers,
                    num_decoder_layers=text_layers, num_heads=32, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, vocab_size=32128, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, layer_norm_epsilon=1e-6, dropout_rate=0.0, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0)
    else:
        text = dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=text_layers,
                    num_attention_heads=32, max_position_embeddings=2048, vocab_size=50272, word_embed_proj_dim=2560,
                    do_layer_norm_before=True, activation_function="relu", dropout=0.0, bos_token_id=2,
                    eos_token_id=50118, pad_token_id=1)
    return transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                                    num_query_tokens=32, image_token_index=image_token_index, dtype=dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--vision-layers", type=int, default=39)
    ap.add_argument("--qformer-layers", type=int, default=12)
    ap.add_argument("--text-layers", type=int, default=None, help="default 32 (opt) / 24 (t5)")
    ap.add_argument("--family", default="opt", choices=["opt", "t5"])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu", help="where the weights are filled (cpu or cuda)")
    args = ap.parse_args()
    t5 = args.family == "t5"
    if args.text_layers is None:
        args.text_layers = 24 if t5 else 32

    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    processor = None
    if t5:
        from blip2_export import hf_tiny

        # Adds <image> (a special token at the next free id, well inside the 32128 rows).
        processor = transformers.Blip2Processor(image_processor=hf_tiny._image_processor(224),
                                                tokenizer=hf_tiny.make_tokenizer("t5", {}), num_query_tokens=32)
        image_id = processor.tokenizer.convert_tokens_to_ids(hf_tiny.IMAGE_TOKEN)
    else:
        vocab, merges = tiny.train_bpe(tiny.CORPUS, 600)
        image_id = len(vocab)
    cfg = config(args.vision_layers, args.qformer_layers, args.text_layers, image_id, args.family, args.dtype)

    torch.set_default_dtype(DTYPES[args.dtype])
    with torch.device("meta"):
        model = transformers.Blip2ForConditionalGeneration(cfg)
    model.to_empty(device=args.device)  # 16-bit storage, uninitialised
    lm = model.language_model
    if t5:
        # to_empty gives each module its own tensor: the encoder's and decoder's embed_tokens share
        # `shared` again (set_input_embeddings ties both); the head stays apart (Flan-T5 has its own).
        lm.set_input_embeddings(lm.get_input_embeddings())
        for stack in (lm.encoder, lm.decoder):
            assert stack.embed_tokens.weight.data_ptr() == lm.shared.weight.data_ptr()
        assert lm.get_output_embeddings().weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr()
    else:
        model.tie_weights()  # to_empty gives each module its own tensor: tie lm_head to embed_tokens again
        assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        # Buffers (position ids) were not materialised by to_empty: rebuild them as the modules do.
        for name, buf in model.named_buffers():
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
        params = 0
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            g = torch.Generator(device=args.device).manual_seed(args.seed * 1_000_003 + i)
            p.normal_(0.0, 0.02, generator=g)
            if p.dim() == 1 and ("layer_norm" in name or "layernorm" in name or "LayerNorm" in name) and name.endswith("weight"):
                p.add_(1.0)
            params += p.numel()
    if args.device != "cpu":
        getattr(torch, torch.device(args.device).type).synchronize()
    fill_s = time.perf_counter() - t0
    os.makedirs(args.out_dir, exist_ok=True)
    model.generation_config = (transformers.GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0) if t5
                               else transformers.GenerationConfig(bos_token_id=2, eos_token_id=50118, pad_token_id=1))
    model.save_pretrained(args.out_dir, max_shard_size=args.max_shard_size)
    del model
    if t5:
        processor.save_pretrained(args.out_dir)
        processor.image_processor.save_pretrained(args.out_dir)  # preprocessor_config.json, as hf_tiny.py
        tiny._write_json(os.path.join(args.out_dir, "special_tokens_map.json"),
                         dict(sorted(processor.tokenizer.special_tokens_map.items())))
    else:
        write_opt_tokenizer(args.out_dir, vocab, merges, image_id)
    files = [n for n in os.listdir(args.out_dir) if n.endswith(".safetensors")]
    print(json.dumps({"event": "checkpoint", "out_dir": args.out_dir, "family": args.family, "dtype": args.dtype,
                      "device": args.device, "parameters": params,
                      "safetensors_bytes": sum(os.path.getsize(os.path.join(args.out_dir, n)) for n in files),
                      "shards": len(files), "layers": {"vision": args.vision_layers, "qformer": args.qformer_layers,
                                                       "text": args.text_layers},
                      "fill_s": round(fill_s, 1), "total_s": round(time.perf_counter() - t0, 1),
                      "peak_rss_mb": round(peak_rss_mb(), 1)}))
    return 0


def write_opt_tokenizer(out_dir: str, vocab, merges, image_id: int) -> None:
    """tiny.py's tokenizer, vocab/merges, special-token and processor files."""
    tiny._write_json(os.path.join(out_dir, "tokenizer.json"), tiny.tokenizer_json(vocab, merges, image_id))
    tiny._write_json(os.path.join(out_dir, "vocab.json"), dict(sorted(vocab.items())))
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    for name, obj in tiny.tokenizer_side_files(image_id).items():
        tiny._write_json(os.path.join(out_dir, name), obj)
    tiny._write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "BlipImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "Blip2Processor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}})
    tiny._write_json(os.path.join(out_dir, "processor_config.json"),
                     {"num_query_tokens": 32, "processor_class": "Blip2Processor"})


if __name__ == "__main__":
    sys.exit(main())
