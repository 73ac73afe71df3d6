"""Seeded random BLIP-2 OPT checkpoints in Hugging Face's folder format, for tests and benchmarks.

    python -m blip2_export.tiny <out-dir> [--preset tiny|small|mid] [--seed N] [--legacy]

Writes config.json (Blip2Config, like the shared tiny-opt fixture), model.safetensors (no lm_head:
tied), a byte-level BPE tokenizer (tokenizer.json in the same structure as the fixture's, plus the
slow GPT2Tokenizer files vocab.json/merges.txt), tokenizer_config.json, special_tokens_map.json,
added_tokens.json, preprocessor_config.json, generation_config.json and processor_config.json.

--legacy writes a pre-4.45 checkpoint: no image_token_index, no `<image>` token, no
num_query_tokens in processor_config.json (the query embeddings are prepended).

Weights follow the fixture's recipe so the random model is not degenerate (greedy decoding does not
repeat one token): HF-style init (normal(0, 0.02) matrices, zero biases, unit LayerNorm), plus
N(0, 0.08) noise on every parameter, plus N(0, 3/sqrt(fan_in)) noise on the language model's
matrices; embedding rows past the tokenizer's length are zero (padded vocab, as in real OPT).
"""

import argparse
import json
import os
import re
import sys
from collections import Counter
from typing import Dict, List, Tuple

import torch
from torch import nn

from .errors import ExportError
from safetensors.torch import save_file

PRESETS = {
    # The shared fixture's sizes.
    "tiny": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    image_size=56, patch_size=14),
        qformer=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     cross_attention_frequency=1, max_position_embeddings=64),
        text=dict(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, vocab_size=392),
        num_query_tokens=6, n_merges=120),
    # Small: language-model matrices of 512x512 and more (the size the runtime hands one-row CPU
    # products to oneDNN from), still quick to export and run in tests.
    "small": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=56, patch_size=14),
        qformer=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     cross_attention_frequency=2, max_position_embeddings=64),
        text=dict(hidden_size=512, ffn_dim=2048, num_hidden_layers=2, num_attention_heads=8,
                  max_position_embeddings=128, vocab_size=1024),
        num_query_tokens=8, n_merges=300),
    # Mid-size: real BLIP-2 OPT structure at about 150M parameters.
    "mid": dict(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                    image_size=224, patch_size=14),
        qformer=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                     cross_attention_frequency=2, max_position_embeddings=512),
        text=dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=2048, vocab_size=50272),
        num_query_tokens=32, n_merges=600),
}

NOISE = 0.08
LM_GAIN = 3.0
CENTER_FC2 = True
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT
IMAGE_TOKEN = "<image>"

# Text the BPE merges are learned from (any English-like text gives plausible merges).
CORPUS = """
Question: what is this? Answer: a photo of a cat sitting on a red sofa next to a window.
Question: how many dogs are there in the picture? Answer: two dogs playing in the park.
a close up of a pizza with cheese and tomatoes on a wooden table
a man riding a bicycle down the street in the rain with an umbrella
there is a small boat floating on the lake near the mountains at sunset
a group of people standing around a kitchen preparing food together
the image shows a bright gradient of colors from blue to green and yellow
random noise pixels with no clear shape, a gray and colorful texture
a red circle and a blue rectangle drawn on a beige background
What color is the car? It is white. What is the woman holding? A cup of coffee.
a lazy dog sleeping under a tree while a quick brown fox jumps over the fence
black and white photograph of an old building with tall windows and a clock
two cats laying on a pink blanket, one of them is looking at the camera
a plate of food with rice, vegetables and chicken, served at a restaurant
children playing soccer on a green field during a sunny afternoon in summer
a train arriving at the station while passengers are waiting on the platform
an airplane flying high in the blue sky above white clouds and the ocean
a bowl of fruit with apples, bananas and oranges on the counter of a kitchen
a person holding a phone and taking a picture of the city skyline at night
many birds sitting on the power lines against a cloudy gray winter sky
"""


# ----------------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# GPT-2's pre-tokenizer regex with ASCII classes in place of \p{L}/\p{N} (enough for CORPUS).
_PRETOKENIZE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


def train_bpe(text: str, n_merges: int) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Byte-level BPE: specials 0..3, the 256 byte symbols 4..259 in byte order, then one id per new
    merged token. Deterministic (ties broken by the pair's text)."""
    b2u = bytes_to_unicode()
    words = Counter("".join(b2u[b] for b in w.encode("utf-8")) for w in _PRETOKENIZE.findall(text))
    splits = {w: list(w) for w in words}
    vocab: Dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    merges: List[Tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, c in words.items():
            s = splits[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2 and merges:
            break
        merges.append((a, b))
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
        for w, s in splits.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
    return vocab, merges


def _added(id_: int, content: str, normalized: bool) -> dict:
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": True}


def tokenizer_json(vocab: Dict[str, int], merges: List[Tuple[str, str]], image_id) -> dict:
    """The HF-tokenizers JSON layout of the fixture's hand-written tokenizer.json."""
    added = [_added(1, "<pad>", True), _added(2, "</s>", True), _added(3, "<unk>", True)]
    if image_id is not None:
        added.append(_added(image_id, IMAGE_TOKEN, False))
    bos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def _special(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def tokenizer_side_files(image_id) -> Dict[str, dict]:
    decoder = {"1": {**_special("<pad>", True), "special": True}, "2": {**_special("</s>", True), "special": True},
               "3": {**_special("<unk>", True), "special": True}}
    tcfg = {"add_bos_token": True, "add_prefix_space": False, "added_tokens_decoder": decoder,
            "bos_token": "</s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "errors": "replace",
            "model_max_length": 512, "pad_token": "<pad>", "padding_side": "left",
            "processor_class": "Blip2Processor", "tokenizer_class": "GPT2Tokenizer", "unk_token": "<unk>"}
    stmap = {"bos_token": _special("</s>", True), "eos_token": _special("</s>", True),
             "pad_token": _special("<pad>", True), "unk_token": _special("<unk>", True)}
    files = {"tokenizer_config.json": tcfg, "special_tokens_map.json": stmap}
    if image_id is not None:
        decoder[str(image_id)] = {**_special(IMAGE_TOKEN, False), "special": True}
        tcfg["additional_special_tokens"] = [IMAGE_TOKEN]
        stmap = {"additional_special_tokens": [_special(IMAGE_TOKEN, False)], **stmap}
        files["special_tokens_map.json"] = stmap
        files["added_tokens.json"] = {IMAGE_TOKEN: image_id}
    tcfg["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    files["tokenizer_config.json"] = dict(sorted(tcfg.items()))
    return files


# ------------------------------------------------------------------------------------- weights


def config_dict(preset: str, image_token_index) -> dict:
    p = PRESETS[preset]
    q = dict(p["qformer"], encoder_hidden_size=p["vision"]["hidden_size"], model_type="blip_2_qformer",
             vocab_size=30522)
    cfg = {
        "architectures": ["Blip2ForConditionalGeneration"],
        "image_text_hidden_size": 256,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "model_type": "blip-2",
        "num_query_tokens": p["num_query_tokens"],
        "qformer_config": dict(sorted(q.items())),
        "text_config": dict(sorted(dict(p["text"], model_type="opt", dropout=0.0,
                                        word_embed_proj_dim=p["text"]["hidden_size"]).items())),
        "torch_dtype": "float32",
        "transformers_version": "4.45.1",
        "use_decoder_only_language_model": True,
        "vision_config": dict(sorted(dict(p["vision"], model_type="blip_2_vision_model").items())),
    }
    if image_token_index is not None:
        cfg["image_token_index"] = image_token_index
    return dict(sorted(cfg.items()))


def random_state_dict(cfg: dict, seed: int, n_real_tokens: int) -> Dict[str, torch.Tensor]:
    from .checkpoint import fast_init
    from .modeling_blip_2 import Blip2Config, Blip2ForConditionalGeneration

    with fast_init(torch.float32):
        model = Blip2ForConditionalGeneration(Blip2Config.from_dict(cfg))
    g = torch.Generator().manual_seed(seed)
    kind: Dict[str, str] = {}
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(m, nn.LayerNorm):
                kind[full] = "one" if pname == "weight" else "zero"
            elif isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                kind[full] = "normal" if pname == "weight" else "zero"
            else:  # query_tokens, class/position embeddings (HF: zeros / trunc_normal(1e-10))
                kind[full] = "zero"
    sd = {}
    with torch.no_grad():
        for name, p in sorted(model.state_dict(keep_vars=True).items()):
            if name == "language_model.lm_head.weight":
                continue  # tied to embed_tokens, not stored (as in HF checkpoints)
            t = torch.zeros(p.shape)
            k = kind[name]
            if k == "one":
                t.fill_(1.0)
            elif k == "normal":
                t.normal_(0.0, 0.02, generator=g)
            t += torch.empty(p.shape).normal_(0.0, NOISE, generator=g)
            if name.startswith("language_model.") and t.dim() == 2:
                t += torch.empty(p.shape).normal_(0.0, LM_GAIN / t.size(-1) ** 0.5, generator=g)
            if CENTER_FC2 and name.startswith("language_model.") and name.endswith(".fc2.weight"):
                # relu(fc1) is non-negative, so fc2 would add the same direction (W2 @ mean) to
                # every token in every layer and one token would win every step; centre the rows.
                t -= t.mean(dim=1, keepdim=True)
            if name == "language_model.model.decoder.embed_tokens.weight":
                t[n_real_tokens:] = 0.0  # padded vocab rows beyond the tokenizer
            sd[name] = t.contiguous()
    return sd


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_checkpoint(out_dir: str, preset: str = "tiny", seed: int = 1000, legacy: bool = False) -> dict:
    """Writes the folder and returns its config dict."""
    if preset not in PRESETS:
        raise ExportError(f"unknown preset {preset!r} (choose {', '.join(PRESETS)})")
    p = PRESETS[preset]
    vocab, merges = train_bpe(CORPUS, p["n_merges"])
    image_id = None if legacy else len(vocab)
    n_real = len(vocab) + (0 if legacy else 1)
    if n_real > p["text"]["vocab_size"]:
        raise ExportError("tokenizer larger than the model vocabulary")
    cfg = config_dict(preset, image_id)
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    save_file(random_state_dict(cfg, seed, n_real), os.path.join(out_dir, "model.safetensors"))
    _write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_json(vocab, merges, image_id))
    _write_json(os.path.join(out_dir, "vocab.json"), dict(sorted(vocab.items())))
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    for name, obj in tokenizer_side_files(image_id).items():
        _write_json(os.path.join(out_dir, name), obj)
    size = p["vision"]["image_size"]
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "BlipImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "Blip2Processor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": size, "width": size}})
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "_from_model_config": True, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
        "transformers_version": "4.45.1"})
    proc = {"processor_class": "Blip2Processor"}
    if not legacy:
        proc = {"num_query_tokens": p["num_query_tokens"], **proc}
    _write_json(os.path.join(out_dir, "processor_config.json"), proc)
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blip2_export.tiny",
                                 description="Write a seeded random BLIP-2 OPT checkpoint folder.")
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--legacy", action="store_true", help="pre-4.45 checkpoint: no image_token_index / <image>")
    args = ap.parse_args(argv)
    try:
        write_checkpoint(args.out_dir, args.preset, args.seed, args.legacy)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
