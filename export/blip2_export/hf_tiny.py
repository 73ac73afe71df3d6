"""Tiny random BLIP-2 checkpoints made by transformers 5 itself, with a working processor and
transformers' own outputs on seeded inputs, for tests of the exporter and the runtime.

    python -m blip2_export.hf_tiny <out-dir> --kind opt|t5|itm|vision-proj|text-proj
                                   [--seed N] [--preset tiny|mid]

Kinds (the transformers class saved; its config.json architectures):
  opt          Blip2ForConditionalGeneration with an OPT text model
  t5           Blip2ForConditionalGeneration with a Flan-T5-shaped text model (gated-gelu, untied
               lm_head, more decoder than encoder layers, d_kv * heads != d_model)
  itm          Blip2ForImageTextRetrieval (use_qformer_text_input)
  vision-proj  Blip2VisionModelWithProjection (no Q-Former text FFN)
  text-proj    Blip2TextModelWithProjection

The folder holds what `save_pretrained` of the model and of a Blip2Processor write (config.json,
model.safetensors, generation_config.json for the captioning kinds; processor_config.json with
num_query_tokens and the nested image processor, tokenizer.json, tokenizer_config.json), plus the
files older loaders expect: preprocessor_config.json (the image processor's own save) and
special_tokens_map.json. Tokenizers are transformers' classes built from a vocabulary learned on
tiny.CORPUS: GPT2Tokenizer (byte-level BPE, `</s>` prepended, left padding, as OPT's) for opt,
T5Tokenizer (Unigram + Metaspace, `</s>` appended) for t5, BertTokenizer (WordPiece, [CLS] ... [SEP])
for the retrieval kinds; Blip2Processor adds `<image>`, whose id is image_token_index.

reference.safetensors + reference.json: outputs of the saved folder reloaded with
`from_pretrained(attn_implementation="eager")` in float32 (see reference.json for every tensor and
how it was computed), so tests of another runtime compare against transformers without Python.

Weights: transformers' own init (seeded by --seed), then seeded noise so the random model is not
degenerate (tiny.py's recipe): N(0, 0.08) on every parameter (0.5 on the 3-D ones: query tokens,
vision class/position embeddings, which HF initialises to zeros / 1e-10), N(0, 3/sqrt(fan_in)) more
(4/sqrt(fan_in) for T5) on the language model's matrices, OPT fc2 rows centred, T5 layer norms 1 + N(0, 0.3) and relative
attention biases N(0, 1.5); embedding / lm_head rows past the tokenizer are zero (padded vocab).
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
from collections import Counter
from typing import Any, Dict, List, Tuple

import torch

from . import tiny
from .errors import ExportError

KINDS = ("opt", "t5", "itm", "vision-proj", "text-proj")
CLASS_OF_KIND = {
    "opt": "Blip2ForConditionalGeneration", "t5": "Blip2ForConditionalGeneration",
    "itm": "Blip2ForImageTextRetrieval", "vision-proj": "Blip2VisionModelWithProjection",
    "text-proj": "Blip2TextModelWithProjection",
}

# Sizes; "vocab_size": None means the tokenizer's length (with <image>) rounded up to a multiple of 8.
PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    image_size=56, patch_size=14),
        qformer=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     cross_attention_frequency=1, max_position_embeddings=32),
        opt=dict(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, vocab_size=None),
        t5=dict(d_model=48, d_kv=8, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, vocab_size=None),
        qformer_vocab_size=None, num_query_tokens=6, image_text_hidden_size=16, n_merges=120,
        max_new_tokens=10, image_hw=(40, 64)),
    # About 100-150M parameters, real BLIP-2 structure (224 px, 32 query tokens, real vocab sizes).
    "mid": dict(
        vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                    image_size=224, patch_size=14),
        qformer=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                     cross_attention_frequency=2, max_position_embeddings=512),
        opt=dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=2048, vocab_size=50272),
        t5=dict(d_model=512, d_kv=64, d_ff=1024, num_layers=6, num_decoder_layers=6, num_heads=8,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, vocab_size=32128),
        qformer_vocab_size=30522, num_query_tokens=32, image_text_hidden_size=256, n_merges=600,
        max_new_tokens=10, image_hw=(180, 260)),
}

NOISE = 0.08
NOISE_3D = 0.5
# Extra noise on the language model's matrices, in units of 1/sqrt(fan_in): enough that the layers,
# not the input embedding, pick the next token (measured: varied greedy rows at the default seed).
LM_GAIN = {"opt": 3.0, "t5": 4.0}

# Seeded inputs of the reference: prompts (captioning) / texts (retrieval) of different lengths.
PROMPTS = ["", "Question: what is in the picture? Answer:", "a photo of"]
TEXTS = ["a photo of a cat", "two dogs playing in the park on a sunny afternoon", "red"]
NUM_IMAGES = 3

IMAGE_TOKEN = "<image>"


# ----------------------------------------------------------------------------------- tokenizers


def _words(text: str) -> List[str]:
    return re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", text)


def unigram_vocab() -> List[Tuple[str, float]]:
    """T5's layout (<pad> 0, </s> 1, <unk> 2), then "▁", every character of the corpus, and "▁word"
    for each word: scores are log frequencies, characters penalised so whole words win."""
    words = Counter(_words(tiny.CORPUS))
    chars = Counter(c for w, n in words.items() for c in w for _ in range(n))
    total = sum(words.values())
    pieces: List[Tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", math.log(0.5))]
    for c in sorted(chars):
        pieces.append((c, math.log(chars[c] / sum(chars.values())) - 4.0))
    for w in sorted(words, key=lambda w: (-words[w], w)):
        pieces.append(("▁" + w, math.log(words[w] / total)))
    return pieces


def wordpiece_vocab() -> Dict[str, int]:
    """BERT's specials ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4), every character and its ##
    continuation, then the corpus' words, lower-cased."""
    words = Counter(w.lower() for w in _words(tiny.CORPUS))
    chars = sorted({c for w in words for c in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    tokens += [w for w in sorted(words, key=lambda w: (-words[w], w)) if w not in tokens]
    return {t: i for i, t in enumerate(tokens)}


def make_tokenizer(kind: str, preset: dict):
    import transformers

    if kind == "opt":
        vocab, merges = tiny.train_bpe(tiny.CORPUS, preset["n_merges"])
        return transformers.GPT2Tokenizer(vocab=vocab, merges=list(merges), bos_token="</s>", eos_token="</s>",
                                          unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
                                          padding_side="left", model_max_length=512)
    if kind == "t5":
        return transformers.T5Tokenizer(vocab=unigram_vocab(), extra_ids=0, model_max_length=512)
    return transformers.BertTokenizer(vocab=wordpiece_vocab(), do_lower_case=True,
                                      model_max_length=preset["qformer"]["max_position_embeddings"])


def _image_processor(size: int):
    import transformers

    # transformers 5 without torchvision: the PIL backend (BlipImageProcessor would fall back to it
    # with a warning); both save the same preprocessor_config.json.
    cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    return cls(size={"height": size, "width": size})


# -------------------------------------------------------------------------------------- models


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def hf_config(kind: str, preset: dict, image_token_index: int, n_tokens: int):
    import transformers

    q = dict(preset["qformer"])
    if kind in ("opt", "t5"):
        if kind == "opt":
            o = dict(preset["opt"])
            text = dict(o, model_type="opt", vocab_size=o["vocab_size"] or _round8(n_tokens), dropout=0.0,
                        word_embed_proj_dim=o["hidden_size"], bos_token_id=2, eos_token_id=2, pad_token_id=1)
        else:
            t = dict(preset["t5"])
            # Flan-T5's shape: gated-gelu (dense_act_fn gelu_new), untied lm_head (no output scaling).
            text = dict(t, model_type="t5", vocab_size=t["vocab_size"] or _round8(n_tokens),
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    else:
        text = None
        q.update(vocab_size=preset["qformer_vocab_size"] or _round8(n_tokens), pad_token_id=0,
                 use_qformer_text_input=kind != "vision-proj")
    return transformers.Blip2Config(vision_config=dict(preset["vision"]), qformer_config=q, text_config=text,
                                    num_query_tokens=preset["num_query_tokens"],
                                    image_text_hidden_size=preset["image_text_hidden_size"],
                                    image_token_index=image_token_index)


def _is_norm_weight(name: str) -> bool:
    return bool(re.search(r"(layer_norm|layernorm|LayerNorm|_layer_norm)\.weight$", name))


def perturb(model, kind: str, seed: int, n_tokens: int) -> None:
    """The seeded noise of the module docstring, in place, parameters in name order."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g)

    lm = getattr(model, "language_model", None)
    vocab_rows = set()
    if lm is not None:
        vocab_rows = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if kind == "t5" and name.startswith("language_model.") and _is_norm_weight(name):
                p.copy_(1.0 + 0.3 * randn(p.shape))
                continue
            if "relative_attention_bias" in name:
                p.copy_(1.5 * randn(p.shape))  # make positions matter
                continue
            p.add_(randn(p.shape) * (NOISE_3D if p.dim() == 3 else NOISE))
            if name.startswith("language_model.") and p.dim() == 2:
                p.add_(randn(p.shape) * (LM_GAIN[kind] / p.size(-1) ** 0.5))
            if kind == "opt" and name.endswith(".fc2.weight"):
                # relu(fc1) >= 0, so fc2 would add one direction to every token in every layer
                # and one token would win every step: centre its rows (tiny.py).
                p.sub_(p.mean(dim=1, keepdim=True))
            if id(p) in vocab_rows:
                p[n_tokens:] = 0.0


def build_model(kind: str, preset: dict, seed: int, tokenizer):
    import transformers

    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_tokens = len(tokenizer)
    cfg = hf_config(kind, preset, image_token_index, n_tokens)
    torch.manual_seed(seed)
    model = getattr(transformers, CLASS_OF_KIND[kind])(cfg).eval()
    if kind == "t5":
        # transformers 5.18 ties lm_head to shared at init whatever tie_word_embeddings says; Flan-T5
        # checkpoints carry their own head (saved, and kept untied by from_pretrained).
        lm = model.language_model
        lm.lm_head.weight = torch.nn.Parameter(lm.shared.weight.detach().clone())
    perturb(model, kind, seed + 1, n_tokens)
    if kind in ("opt", "t5"):
        t = cfg.text_config
        gen = dict(bos_token_id=2, eos_token_id=2, pad_token_id=1) if kind == "opt" else \
            dict(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
        model.generation_config = transformers.GenerationConfig(**gen)
        assert t.vocab_size >= n_tokens
    return model


# ----------------------------------------------------------------------------------- reference


def _images(preset: dict, seed: int) -> List[Any]:
    """NUM_IMAGES seeded RGB images (uint8 HWC numpy) of a size the processor has to resize:
    noise, a gradient with noise, and blocks."""
    import numpy as np

    h, w = preset["image_hw"]
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    grad = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 255 // (h + w)], -1)
    grad = np.clip(grad + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
    blocks = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w].astype(np.uint8)
    return [noise, grad, blocks]


class _Reference:
    def __init__(self):
        self.tensors: Dict[str, torch.Tensor] = {}
        self.notes: Dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor, note: str) -> None:
        self.tensors[name] = t.detach().contiguous().clone()
        self.notes[name] = note


def _tokenize(processor, side: str, texts: List[str], images=None) -> Dict[str, torch.Tensor]:
    tok = processor.tokenizer
    saved = tok.padding_side
    tok.padding_side = side
    try:
        if images is None:
            enc = tok(texts, padding="longest", return_tensors="pt")
        else:
            enc = processor(images=images, text=texts, padding="longest", return_tensors="pt")
    finally:
        tok.padding_side = saved
    return {k: enc[k] for k in ("input_ids", "attention_mask")} | ({"pixel_values": enc["pixel_values"]}
                                                                    if images is not None else {})


def _load(cls_name: str, out_dir: str):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(out_dir, attn_implementation="eager",
                                                           dtype=torch.float32).eval()


def _vision_and_qformer(ref: _Reference, model, pixel_values) -> torch.Tensor:
    vis = model.vision_model(pixel_values=pixel_values)
    ref.add("vision/last_hidden_state", vis.last_hidden_state, "vision_model(pixel_values).last_hidden_state")
    ref.add("vision/pooler_output", vis.pooler_output, "vision_model(pixel_values).pooler_output")
    image_embeds = vis.last_hidden_state
    q = model.qformer(query_embeds=model.query_tokens.expand(image_embeds.size(0), -1, -1),
                      encoder_hidden_states=image_embeds,
                      encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long))
    ref.add("qformer/last_hidden_state", q.last_hidden_state,
            "qformer(query_embeds=query_tokens, encoder_hidden_states=vision last_hidden_state).last_hidden_state")
    return image_embeds


def _generate_cache(model):
    """A lazily grown cache for encoder-decoder generate: the one transformers 5.18 builds from the
    config has num_layers (encoder) entries and fails when the decoder has more layers."""
    if not model.config.text_config.is_encoder_decoder:
        return {}
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    return {"past_key_values": EncoderDecoderCache(DynamicCache(), DynamicCache())}


def _caption_reference(ref: _Reference, meta: Dict[str, Any], kind: str, out_dir: str, processor, images,
                       preset: dict, seed: int) -> None:
    model = _load("Blip2ForConditionalGeneration", out_dir)
    t5 = kind == "t5"
    new = preset["max_new_tokens"]
    # OPT prompts are left-padded (the tokenizer's side; HF's generate expects it for decoder-only
    # models). T5: both sides. The processor puts the image tokens before the padded prompt, so left
    # padding leaves the pads between them and the prompt, which changes T5's relative positions
    # (HF's numbers); right padding gives what each row alone gives.
    gen_sides = ["right", "left"] if t5 else ["left"]
    encodings = {side: _tokenize(processor, side, PROMPTS, images) for side in ("left", "right")}
    pixel_values = encodings["left"]["pixel_values"]
    ref.add("pixel_values", pixel_values, "processor(images=images) pixel_values")
    for i, img in enumerate(images):
        ref.add(f"images/{i}", torch.from_numpy(img.copy()), "the input image, uint8 [H,W,3] RGB")
    with torch.no_grad():
        _vision_and_qformer(ref, model, pixel_values)
        feats = model.get_image_features(pixel_values=pixel_values)
        ref.add("image/language_model_inputs", feats.pooler_output,
                "get_image_features(pixel_values).pooler_output (language_projection of the Q-Former output)")
        g = torch.Generator().manual_seed(seed + 7)
        dec = torch.randint(3, model.config.text_config.vocab_size, (NUM_IMAGES, 6), generator=g)
        dec[:, 0] = meta["special_tokens"]["decoder_start_token_id"] if t5 else 0
        if t5:
            ref.add("forward/decoder_input_ids", dec, "decoder_input_ids of forward/*/logits: start token, then seeded ids")
        for side, enc in encodings.items():
            ref.add(f"inputs/{side}/input_ids", enc["input_ids"],
                    f"processor(images, text=PROMPTS, padding='longest') with {side} padding: "
                    f"num_query_tokens <image> ids, then the tokenized prompt")
            ref.add(f"inputs/{side}/attention_mask", enc["attention_mask"], "its attention_mask")
            kw = dict(pixel_values=pixel_values, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            logits = model(**kw, decoder_input_ids=dec).logits if t5 else model(**kw).logits
            ref.add(f"forward/{side}/logits", logits,
                    "model(pixel_values, input_ids, attention_mask" + (", decoder_input_ids)" if t5 else ")")
                    + ".logits" + ("" if t5 else " (compare where attention_mask is 1)"))
        for side in gen_sides:
            kw = dict(pixel_values=pixel_values, input_ids=encodings[side]["input_ids"],
                      attention_mask=encodings[side]["attention_mask"], max_new_tokens=new, do_sample=False)
            out = model.generate(**kw, num_beams=1, output_logits=True, return_dict_in_generate=True,
                                 **_generate_cache(model))
            ref.add(f"generate/greedy/{side}/sequences", out.sequences, "generate(num_beams=1).sequences")
            ref.add(f"generate/greedy/{side}/logits", torch.stack(out.logits, 1).float(),
                    "generate(num_beams=1, output_logits=True).logits stacked: raw step logits [B,steps,V]")
            out = model.generate(**kw, num_beams=3, length_penalty=1.0, early_stopping=False, output_scores=True,
                                 return_dict_in_generate=True, **_generate_cache(model))
            ref.add(f"generate/beam3/{side}/sequences", out.sequences, "generate(num_beams=3).sequences")
            ref.add(f"generate/beam3/{side}/sequences_scores", out.sequences_scores,
                    "generate(num_beams=3).sequences_scores (length-penalised log-probabilities)")
            if side == gen_sides[0]:
                # Early stops: the random model rarely emits its eos, so generate again with
                # eos_token_id = the token row 0 produced at step 3 (greedy), at step 2 (beam), so rows
                # stop at different steps (and beams finish before max_new_tokens).
                prompt_len = 1 if t5 else kw["input_ids"].size(1)
                eos = {"greedy": int(ref.tensors[f"generate/greedy/{side}/sequences"][0, prompt_len + 2]),
                       "beam3": int(ref.tensors[f"generate/beam3/{side}/sequences"][0, prompt_len + 1])}
                meta["eos_override"] = {"padding_side": side, **eos}
                out = model.generate(**kw, num_beams=1, eos_token_id=eos["greedy"], **_generate_cache(model))
                ref.add(f"generate/greedy_eos/{side}/sequences", out,
                        "generate(num_beams=1, eos_token_id=eos_override.greedy).sequences")
                out = model.generate(**kw, num_beams=3, length_penalty=1.0, early_stopping=False,
                                     eos_token_id=eos["beam3"], output_scores=True, return_dict_in_generate=True,
                                     **_generate_cache(model))
                ref.add(f"generate/beam3_eos/{side}/sequences", out.sequences,
                        "generate(num_beams=3, eos_token_id=eos_override.beam3).sequences")
                ref.add(f"generate/beam3_eos/{side}/sequences_scores", out.sequences_scores,
                        "generate(num_beams=3, eos_token_id=eos_override.beam3).sequences_scores")
        blip2 = _load("Blip2Model", out_dir)
        for side in ("left", "right"):
            enc = _tokenize(processor, side, PROMPTS[1:])
            ref.add(f"text_inputs/{side}/input_ids", enc["input_ids"], f"tokenizer(PROMPTS[1:]), {side} padding")
            ref.add(f"text_inputs/{side}/attention_mask", enc["attention_mask"], "its attention_mask")
            hs = blip2.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            ref.add(f"text_features/{side}/last_hidden_state", hs.last_hidden_state,
                    "Blip2Model.get_text_features(input_ids, attention_mask).last_hidden_state ("
                    + ("T5 encoder output" if t5 else "OPTModel output; compare where attention_mask is 1") + ")")
    meta["generate"] = {
        "max_new_tokens": new, "do_sample": False,
        "greedy": {"num_beams": 1}, "beam3": {"num_beams": 3, "length_penalty": 1.0, "early_stopping": False},
        "padding_sides": gen_sides,
        "sequences": (("[decoder_start_token_id] + new ids" if t5 else
                       "the input_ids as given (image tokens + padded prompt) + new ids")
                      + "; greedy pads rows that stopped at eos with pad_token_id; beam search cuts all rows to "
                        "the longest best beam and pads with `pad_token_id or eos_token_id[0]` (transformers "
                        "5.18's fill value: eos when pad_token_id is 0)"),
    }
    meta["prompts"] = PROMPTS


def _retrieval_reference(ref: _Reference, meta: Dict[str, Any], kind: str, out_dir: str, processor,
                         images) -> None:
    text_only = {side: _tokenize(processor, side, TEXTS) for side in ("right", "left")}
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    meta["texts"] = TEXTS
    with torch.no_grad():
        if kind != "text-proj":
            ref.add("pixel_values", pixel_values, "processor(images=images) pixel_values")
            for i, img in enumerate(images):
                ref.add(f"images/{i}", torch.from_numpy(img.copy()), "the input image, uint8 [H,W,3] RGB")
        for side, enc in (text_only.items() if kind != "vision-proj" else ()):
            ref.add(f"text_inputs/{side}/input_ids", enc["input_ids"],
                    f"tokenizer(TEXTS, padding='longest'), {side} padding: the Q-Former ids of the texts alone")
            ref.add(f"text_inputs/{side}/attention_mask", enc["attention_mask"], "its attention_mask")
        if kind == "itm":
            model = _load("Blip2ForImageTextRetrieval", out_dir)
            _vision_and_qformer(ref, model, pixel_values)
            for side in ("right", "left"):
                enc = _tokenize(processor, side, TEXTS, images)
                ref.add(f"inputs/{side}/input_ids", enc["input_ids"],
                        f"processor(images, text=TEXTS, padding='longest'), {side} padding: num_query_tokens "
                        f"<image> ids, then the text (HF's forward drops the first num_query_tokens ids)")
                ref.add(f"inputs/{side}/attention_mask", enc["attention_mask"], "its attention_mask")
                out = model(pixel_values=pixel_values, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            use_image_text_matching_head=True)
                ref.add(f"itm/{side}/logits_per_image", out.logits_per_image,
                        "forward(use_image_text_matching_head=True).logits_per_image [B,2]: image i with text i")
                ref.add(f"itm/{side}/logits_per_text", out.logits_per_text, "its logits_per_text [2,B]")
                # ITC: 2 images against the 3 texts.
                out = model(pixel_values=pixel_values[:2], input_ids=enc["input_ids"],
                            attention_mask=enc["attention_mask"])
                for field in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
                    ref.add(f"itc/{side}/{field}", getattr(out, field),
                            f"forward(pixel_values[:2], input_ids, attention_mask).{field} (ITC, 2 images x 3 texts)")
        if kind in ("itm", "vision-proj"):
            model = _load("Blip2VisionModelWithProjection", out_dir)
            if kind == "vision-proj":
                _vision_and_qformer(ref, model, pixel_values)
            out = model(pixel_values=pixel_values)
            ref.add("vision_proj/image_embeds", out.image_embeds,
                    "Blip2VisionModelWithProjection(pixel_values).image_embeds [B,Q,Dp] (L2-normalised)")
            ref.add("vision_proj/last_hidden_state", out.last_hidden_state, "its last_hidden_state (vision model)")
        if kind in ("itm", "text-proj"):
            model = _load("Blip2TextModelWithProjection", out_dir)
            for side, enc in text_only.items():
                out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                ref.add(f"text_proj/{side}/text_embeds", out.text_embeds,
                        "Blip2TextModelWithProjection(text_inputs).text_embeds [B,T,Dp] (L2-normalised per token)")
                ref.add(f"text_proj/{side}/last_hidden_state", out.last_hidden_state, "its last_hidden_state")


def write_reference(out_dir: str, kind: str, preset_name: str, seed: int, processor) -> Dict[str, Any]:
    """reference.safetensors + reference.json from the saved folder (see the module docstring)."""
    import transformers
    from safetensors.torch import save_file

    preset = PRESETS[preset_name]
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    images = _images(preset, seed + 3)
    ref = _Reference()
    meta: Dict[str, Any] = {
        "kind": kind, "class": CLASS_OF_KIND[kind], "preset": preset_name, "seed": seed,
        "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
        "computed_with": "<class>.from_pretrained(folder, attn_implementation='eager', dtype=torch.float32), "
                         "torch.no_grad(), CPU",
        "num_query_tokens": config["num_query_tokens"], "image_token_index": config.get("image_token_index"),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order on every machine
    try:
        if kind in ("opt", "t5"):
            with open(os.path.join(out_dir, "generation_config.json"), encoding="utf-8") as f:
                gen = json.load(f)
            meta["special_tokens"] = {k: gen.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                              "decoder_start_token_id")}
            _caption_reference(ref, meta, kind, out_dir, processor, images, preset, seed)
        else:
            _retrieval_reference(ref, meta, kind, out_dir, processor, images)
    finally:
        torch.set_num_threads(threads)
    names = sorted(ref.tensors)
    meta["tensors"] = {n: {"shape": list(ref.tensors[n].shape), "dtype": str(ref.tensors[n].dtype)[6:],
                           "what": ref.notes[n]} for n in names}
    save_file({n: ref.tensors[n] for n in names}, os.path.join(out_dir, "reference.safetensors"),
              metadata={"format": "pt"})
    tiny._write_json(os.path.join(out_dir, "reference.json"), meta)
    return meta


# ------------------------------------------------------------------------------------ the folder


def write_checkpoint(out_dir: str, kind: str = "opt", preset: str = "tiny", seed: int = 0,
                     reference: bool = True) -> Dict[str, Any]:
    """Writes the checkpoint folder (and the reference files unless reference=False); returns its
    config.json as a dict."""
    import transformers

    if kind not in KINDS:
        raise ExportError(f"unknown kind {kind!r} (choose {', '.join(KINDS)})")
    if preset not in PRESETS:
        raise ExportError(f"unknown preset {preset!r} (choose {', '.join(PRESETS)})")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    p = PRESETS[preset]
    tokenizer = make_tokenizer(kind, p)
    image_processor = _image_processor(p["vision"]["image_size"])
    # Adds <image> (a special token at the next free id) unless the tokenizer has one.
    processor = transformers.Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                            num_query_tokens=p["num_query_tokens"])
    model = build_model(kind, p, seed, processor.tokenizer)
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):  # a stale file of another kind would be copied by the exporter
            path = os.path.join(out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)  # preprocessor_config.json, for loaders before transformers 5
    tiny._write_json(os.path.join(out_dir, "special_tokens_map.json"),
                     dict(sorted(processor.tokenizer.special_tokens_map.items())))
    del model
    if reference:
        write_reference(out_dir, kind, preset, seed, processor)
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blip2_export.hf_tiny",
                                 description="Write a tiny random BLIP-2 checkpoint made by transformers, "
                                             "with a processor and reference outputs.")
    ap.add_argument("out_dir")
    ap.add_argument("--kind", required=True, choices=KINDS)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="skip reference.safetensors / reference.json")
    args = ap.parse_args(argv)
    try:
        write_checkpoint(args.out_dir, args.kind, args.preset, args.seed, reference=not args.no_reference)
    except ImportError as e:
        print(f"error: transformers 5 is needed to build these checkpoints ({e})", file=sys.stderr)
        return 2
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
