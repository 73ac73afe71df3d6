"""The BLIP-2 family's vision/Q-Former side against Hugging Face transformers 5.18, on tiny random
models built by transformers itself: the full Q-Former (text embeddings, text FFN, masks),
Blip2ForImageTextRetrieval (ITM and ITC), Blip2TextModelWithProjection,
Blip2VisionModelWithProjection, Blip2QFormerModel.forward with custom query embeds and an encoder
mask, Blip2Model.get_image_features/get_qformer_features/get_text_features; eager and scripted
(torch.jit.script + save + load); float32 against HF's eager and sdpa attention, and float16 /
bfloat16 loaded as transformers 5 loads them (query_tokens and qformer kept in float32 for float16).

Run with BLIP2_PRINT_DIFFS=1 to print the measured max differences."""

import io
import json
import os
import unittest

import torch

import _util
from _util import max_abs, record

from blip2_export import checkpoint
from blip2_export.errors import ExportError
from blip2_export.modeling_blip_2 import (
    RETRIEVAL_ARCHITECTURES, Blip2Config, Blip2ForConditionalGeneration, Blip2ImageEncoder,
    Blip2RetrievalEncoder, Blip2RetrievalModel, to_dtype_like_hf)

try:
    import transformers
    from transformers import (Blip2ForImageTextRetrieval, Blip2Model, Blip2TextModelWithProjection,
                              Blip2VisionModelWithProjection)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    HAVE_HF = True
except ImportError:  # the exporter itself needs no transformers
    HAVE_HF = False

ACT_TOL = 1e-5     # hidden states and embeddings, float32
LOGIT_TOL = 1e-4   # ITM / ITC logits, float32
# Half precision: against HF's eager attention we run the same ops in the same order with the
# same casts, which is exact (measured 0); HF's default sdpa kernels round differently (measured
# up to 2e-3 in float16 and 8e-3 in bfloat16 on the outputs compared here).
HALF_EXACT_TOL = 1e-5
HALF_SDPA_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}

# Two shapes: hidden sizes, head sizes (6 is not a power of 4, so HF's *head_size**-0.5 and
# /sqrt(head_size) differ in rounding), cross_attention_frequency 1 and 2, query counts,
# activations, text lengths, and B with image_token_index (HF's forward strips the Q image tokens
# its processor prepends).
SHAPES = {
    "A": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=16, patch_size=8),
              qformer=dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
                           cross_attention_frequency=1, vocab_size=50, max_position_embeddings=20, pad_token_id=0),
              num_query_tokens=3, image_text_hidden_size=16, image_token_index=None, text_len=7),
    "B": dict(vision=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
                          image_size=24, patch_size=8),
              qformer=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=8, intermediate_size=48,
                           cross_attention_frequency=2, vocab_size=70, max_position_embeddings=24, pad_token_id=1,
                           hidden_act="gelu_new"),
              num_query_tokens=5, image_text_hidden_size=12, image_token_index=69, text_len=9),
}
TINY_OPT = dict(model_type="opt", hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=40, max_position_embeddings=32, word_embed_proj_dim=16)


def hf_config(shape: str, text_config=None, use_qformer_text_input=True):
    s = SHAPES[shape]
    return transformers.Blip2Config(
        vision_config=dict(s["vision"]),
        qformer_config=dict(s["qformer"], use_qformer_text_input=use_qformer_text_input),
        text_config=text_config, num_query_tokens=s["num_query_tokens"],
        image_text_hidden_size=s["image_text_hidden_size"], image_token_index=s["image_token_index"])


def hf_model(cls, shape: str, seed: int, **cfg_kwargs):
    """HF's model with its own init plus seeded noise on every parameter (HF zeroes query_tokens and
    initialises the vision tower at 1e-10, which would make outputs degenerate)."""
    torch.manual_seed(seed)
    model = cls(hf_config(shape, **cfg_kwargs)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 3 else 0.1))
    return model


def config_dict(model) -> dict:
    """config.json as save_pretrained writes it (architectures included)."""
    d = model.config.to_dict()
    d["architectures"] = [type(model).__name__]
    return json.loads(json.dumps(d))


def script(module):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    buf.seek(0)
    return torch.jit.load(buf).eval()


def text_inputs(shape: str, batch: int, seed: int):
    """Q-Former (BERT) ids and mask of `batch` texts: right padding, no padding, left padding."""
    s = SHAPES[shape]
    q, t = s["qformer"], s["text_len"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, q["vocab_size"] - 1, (batch, t), generator=g)  # never the image token
    mask = torch.ones(batch, t, dtype=torch.long)
    mask[0, t - 3:] = 0
    if batch > 2:
        mask[2, :2] = 0
    ids[mask == 0] = q["pad_token_id"]
    return ids, mask


def with_image_tokens(shape: str, ids, mask):
    """input_ids/attention_mask kwargs as HF's processor hands them to Blip2ForImageTextRetrieval:
    when image_token_index is set, Q image tokens (mask 1) before the text, which HF's forward
    strips again."""
    s = SHAPES[shape]
    if s["image_token_index"] is not None:
        q = s["num_query_tokens"]
        ids = torch.cat([torch.full((ids.size(0), q), s["image_token_index"]), ids], 1)
        mask = torch.cat([torch.ones(ids.size(0), q, dtype=mask.dtype), mask], 1)
    return {"input_ids": ids, "attention_mask": mask}


def pixels(shape: str, batch: int, seed: int, dtype=torch.float32):
    size = SHAPES[shape]["vision"]["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


_models = {}


def cached(key, build):
    if key not in _models:
        _models[key] = build()
    return _models[key]


def hf_retrieval(shape):
    return cached(("itr", shape), lambda: hf_model(Blip2ForImageTextRetrieval, shape, 10))


def hf_text(shape):
    return cached(("text", shape), lambda: hf_model(Blip2TextModelWithProjection, shape, 20))


def hf_vision(shape):
    # Without the text FFN: the vision-only architecture must not need it.
    return cached(("vision", shape), lambda: hf_model(Blip2VisionModelWithProjection, shape, 30,
                                                      use_qformer_text_input=False))


def hf_blip2_model(shape):
    return cached(("blip2", shape), lambda: hf_model(Blip2Model, shape, 40, text_config=dict(TINY_OPT),
                                                     use_qformer_text_input=False))


def hf_caption(shape):
    return cached(("gen", shape), lambda: hf_model(transformers.Blip2ForConditionalGeneration, shape, 50,
                                                   text_config=dict(TINY_OPT), use_qformer_text_input=False))


@unittest.skipUnless(HAVE_HF, "transformers is not installed")
class _Parity:
    scripted = False
    kind = ""

    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)

    def wrap(self, module):
        return script(module) if self.scripted else module.eval()

    def retrieval_encoder(self, hf, architecture=None):
        key = ("enc", id(hf), architecture, self.scripted)
        return cached(key, lambda: self.wrap(Blip2RetrievalEncoder(
            Blip2RetrievalModel.from_hf(config_dict(hf), hf.state_dict(), architecture))))

    def image_encoder(self, hf):
        key = ("imgenc", id(hf), self.scripted)
        return cached(key, lambda: self.wrap(Blip2ImageEncoder(
            Blip2ForConditionalGeneration.from_hf(config_dict(hf), hf.state_dict()))))

    def check(self, name, got, want, tol):
        d = max_abs(got, want)
        record(f"retrieval {self.kind}: {name}", d)
        self.assertLessEqual(d, tol, f"{name}: max abs diff {d}")

    def each(self, hf):
        """HF's model under both of its attention implementations (sdpa is the default)."""
        for impl in ("sdpa", "eager"):
            hf.set_attn_implementation(impl)
            yield impl
        hf.set_attn_implementation("sdpa")

    # --------------------------------------------------------------- Blip2ForImageTextRetrieval

    def test_itm(self):
        for shape in SHAPES:
            hf = hf_retrieval(shape)
            enc = self.retrieval_encoder(hf)
            pv = pixels(shape, 3, 1)
            ids, mask = text_inputs(shape, 3, 2)
            with torch.no_grad():
                image_embeds = enc.vision_model(pv)[0]
                got = enc.itm(image_embeds, ids, mask)
                fwd = enc(pv, ids, mask, True)
                self.assertEqual(got.dtype, torch.float32)
                self.assertEqual(tuple(got.shape), (3, 2))
                self.assertGreater(got.std().item(), 1e-3)
                for impl in self.each(hf):
                    want = hf(pixel_values=pv, **with_image_tokens(shape, ids, mask),
                              use_image_text_matching_head=True)
                    self.check(f"ITM logits_per_image ({impl})", got, want.logits_per_image, LOGIT_TOL)
                    self.check(f"forward(ITM) logits_per_image ({impl})", fwd[0], want.logits_per_image, LOGIT_TOL)
                    self.check(f"forward(ITM) logits_per_text ({impl})", fwd[1], want.logits_per_text, LOGIT_TOL)

    def test_itm_pairs(self):
        """Every image with every text: HF's ITM on the repeated pairs."""
        shape = "A"
        hf = hf_retrieval(shape)
        enc = self.retrieval_encoder(hf)
        pv = pixels(shape, 2, 3)
        ids, mask = text_inputs(shape, 3, 4)
        with torch.no_grad():
            got = enc.itm_pairs(enc.vision_model(pv)[0], ids, mask)
            self.assertEqual(tuple(got.shape), (2, 3, 2))
            want = hf(pixel_values=pv.repeat_interleave(3, 0), input_ids=ids.repeat(2, 1),
                      attention_mask=mask.repeat(2, 1), use_image_text_matching_head=True).logits_per_image
            self.check("itm_pairs", got, want.view(2, 3, 2), LOGIT_TOL)

    def test_itc(self):
        """Head off: 2 images against 3 texts (HF does not need B == Bt)."""
        for shape in SHAPES:
            hf = hf_retrieval(shape)
            enc = self.retrieval_encoder(hf)
            pv = pixels(shape, 2, 5)
            ids, mask = text_inputs(shape, 3, 6)
            q, dp = SHAPES[shape]["num_query_tokens"], SHAPES[shape]["image_text_hidden_size"]
            with torch.no_grad():
                lpi, lpt, text_embeds, image_embeds = enc.itc(enc.vision_model(pv)[0], ids, mask)
                fwd = enc(pv, ids, mask, False)
                self.assertEqual((tuple(lpi.shape), tuple(lpt.shape), tuple(text_embeds.shape),
                                  tuple(image_embeds.shape)), ((2, 3), (3, 2), (3, dp), (2, q, dp)))
                self.assertEqual(lpi.dtype, torch.float32)
                self.assertGreater(lpi.std().item(), 1e-3)
                cached_lpi, cached_lpt = enc.itc_logits(image_embeds, text_embeds)
                self.check("itc_logits == itc", cached_lpi, lpi, 0.0)
                self.check("itc_logits transpose", cached_lpt, lpt, 0.0)
                for impl in self.each(hf):
                    want = hf(pixel_values=pv, **with_image_tokens(shape, ids, mask))
                    self.check(f"ITC logits_per_image ({impl})", lpi, want.logits_per_image, LOGIT_TOL)
                    self.check(f"ITC logits_per_text ({impl})", lpt, want.logits_per_text, LOGIT_TOL)
                    self.check(f"ITC text_embeds ({impl})", text_embeds, want.text_embeds, ACT_TOL)
                    self.check(f"ITC image_embeds ({impl})", image_embeds, want.image_embeds, ACT_TOL)
                    self.check(f"forward(ITC) logits_per_image ({impl})", fwd[0], want.logits_per_image, LOGIT_TOL)
                    self.check(f"forward(ITC) logits_per_text ({impl})", fwd[1], want.logits_per_text, LOGIT_TOL)
                    vis = hf.vision_model(pixel_values=pv)
                    got_vis = enc.vision_model(pv)
                    self.check(f"vision last_hidden_state ({impl})", got_vis[0], vis.last_hidden_state, ACT_TOL)
                    self.check(f"vision pooler_output ({impl})", got_vis[1], vis.pooler_output, ACT_TOL)

    def test_with_projection_from_retrieval_checkpoint(self):
        """HF's docs load both *WithProjection classes from the retrieval checkpoint; so do we
        (the parts they lack are dropped), with the retrieval model's numbers."""
        shape = "B"
        hf = hf_retrieval(shape)
        text_enc = self.retrieval_encoder(hf, "Blip2TextModelWithProjection")
        vision_enc = self.retrieval_encoder(hf, "Blip2VisionModelWithProjection")
        full = self.retrieval_encoder(hf)
        pv = pixels(shape, 2, 7)
        ids, mask = text_inputs(shape, 3, 8)
        with torch.no_grad():
            want = hf(pixel_values=pv, **with_image_tokens(shape, ids, mask))
            self.check("text-only model: text_embeds[:, 0] vs ITC", text_enc.text_embeds(ids, mask)[0][:, 0],
                       want.text_embeds, ACT_TOL)
            self.check("vision-only model: image_embeds vs ITC",
                       vision_enc.image_embeds(vision_enc.vision_model(pv)[0])[0], want.image_embeds, ACT_TOL)
            self.check("full model: text_embeds[:, 0] vs ITC", full.text_embeds(ids, mask)[0][:, 0],
                       want.text_embeds, ACT_TOL)
            with self.assertRaisesRegex(Exception, "no vision model"):
                text_enc.vision_model(pv)
            with self.assertRaisesRegex(Exception, "no text embeddings|no text_projection"):
                vision_enc.text_embeds(ids, mask)
            with self.assertRaisesRegex(Exception, "no itm_head"):
                vision_enc.itm(vision_enc.vision_model(pv)[0], ids[:2], mask[:2])

    # ------------------------------------------------------------------ the *WithProjection models

    def test_text_model_with_projection(self):
        for shape in SHAPES:
            hf = hf_text(shape)
            enc = self.retrieval_encoder(hf)
            ids, mask = text_inputs(shape, 3, 9)
            with torch.no_grad():
                text_embeds, last = enc.text_embeds(ids, mask)
                t, dp = SHAPES[shape]["text_len"], SHAPES[shape]["image_text_hidden_size"]
                self.assertEqual(tuple(text_embeds.shape), (3, t, dp))
                for impl in self.each(hf):
                    want = hf(input_ids=ids, attention_mask=mask)
                    self.check(f"TextWithProjection text_embeds ({impl})", text_embeds, want.text_embeds, ACT_TOL)
                    self.check(f"TextWithProjection last_hidden_state ({impl})", last, want.last_hidden_state,
                               ACT_TOL)

    def test_vision_model_with_projection(self):
        for shape in SHAPES:
            hf = hf_vision(shape)
            enc = self.retrieval_encoder(hf)
            pv = pixels(shape, 2, 11)
            with torch.no_grad():
                last, _ = enc.vision_model(pv)
                image_embeds, query_output = enc.image_embeds(last)
                for impl in self.each(hf):
                    want = hf(pixel_values=pv)
                    self.check(f"VisionWithProjection image_embeds ({impl})", image_embeds, want.image_embeds, ACT_TOL)
                    self.check(f"VisionWithProjection last_hidden_state ({impl})", last, want.last_hidden_state,
                               ACT_TOL)
                    q = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=last)
                    self.check(f"VisionWithProjection query output ({impl})", query_output, q.last_hidden_state,
                               ACT_TOL)

    # ------------------------------------------------------------------------ Q-Former, Blip2Model

    def test_qformer_forward_custom_queries_and_encoder_mask(self):
        """Blip2QFormerModel.forward(query_embeds, encoder_hidden_states, encoder_attention_mask)
        with query embeds that are not the query tokens (another count) and image positions masked,
        through both wrappers."""
        for shape in SHAPES:
            s = SHAPES[shape]
            dq, dv = s["qformer"]["hidden_size"], s["vision"]["hidden_size"]
            p = (s["vision"]["image_size"] // s["vision"]["patch_size"]) ** 2 + 1
            g = torch.Generator().manual_seed(12)
            query_embeds = torch.randn(2, s["num_query_tokens"] + 2, dq, generator=g)
            image = torch.randn(2, p, dv, generator=g)
            encoder_mask = torch.ones(2, p, dtype=torch.long)
            encoder_mask[0, p // 2:] = 0
            encoder_mask[1, 0] = 0
            for hf, enc in ((hf_retrieval(shape), self.retrieval_encoder(hf_retrieval(shape))),
                            (hf_blip2_model(shape), self.image_encoder(hf_blip2_model(shape)))):
                with torch.no_grad():
                    last, pooled = enc.qformer_forward(query_embeds, image, encoder_mask)
                    self.assertEqual(tuple(last.shape), (2, s["num_query_tokens"] + 2, dq))
                    for impl in self.each(hf):
                        want = hf.qformer(query_embeds=query_embeds, encoder_hidden_states=image,
                                          encoder_attention_mask=encoder_mask)
                        name = type(hf).__name__
                        self.check(f"{name}.qformer last_hidden_state ({impl})", last, want.last_hidden_state, ACT_TOL)
                        self.check(f"{name}.qformer pooler_output ({impl})", pooled, want.pooler_output, ACT_TOL)
                    unmasked = hf.qformer(query_embeds=query_embeds, encoder_hidden_states=image)
                    self.assertGreater(max_abs(unmasked.last_hidden_state, last), 1e-2)  # the mask mattered

    def test_blip2_model_features(self):
        for shape in SHAPES:
            hf = hf_blip2_model(shape)
            enc = self.image_encoder(hf)
            pv = pixels(shape, 2, 13)
            with torch.no_grad():
                last, pooled = enc.vision_model(pv)
                query_output = enc.qformer(last)
                for impl in self.each(hf):
                    feats = hf.get_image_features(pixel_values=pv)
                    self.check(f"Blip2Model.get_image_features last_hidden_state ({impl})", last,
                               feats.last_hidden_state, ACT_TOL)
                    self.check(f"Blip2Model.get_image_features pooler_output ({impl})", pooled,
                               feats.pooler_output, ACT_TOL)
                    self.check(f"Blip2Model.get_qformer_features ({impl})", query_output,
                               hf.get_qformer_features(pixel_values=pv), ACT_TOL)
            gen = hf_caption(shape)
            enc = self.image_encoder(gen)
            with torch.no_grad():
                got = enc(pv)
                for impl in self.each(gen):
                    self.check(f"Blip2ForConditionalGeneration.get_image_features pooler_output ({impl})", got,
                               gen.get_image_features(pixel_values=pv).pooler_output, ACT_TOL)


class EagerRetrievalParity(_Parity, unittest.TestCase):
    kind = "eager"

    def test_get_text_features_is_the_opt_decoder(self):
        """Blip2Model.get_text_features (OPT) = the language model's decoder output before lm_head,
        which OPTDecoder.forward_full computes (language_model.pt exports only its logits). Pad
        positions differ from transformers 5 (HF 5's OPT masks them differently); compared at
        the real tokens."""
        hf = hf_blip2_model("A")
        ours = Blip2ForConditionalGeneration.from_hf(config_dict(hf), hf.state_dict())
        ids = torch.randint(3, TINY_OPT["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(14))
        mask = torch.ones(3, 6, dtype=torch.long)
        mask[0, :2] = 0   # OPT checkpoints pad on the left
        mask[2, 5:] = 0
        ids[mask == 0] = 1
        lm = ours.language_model
        with torch.no_grad():
            got = lm.model.decoder.forward_full(lm.embed_tokens(ids), mask)
            for impl in self.each(hf):
                want = hf.get_text_features(input_ids=ids, attention_mask=mask).last_hidden_state
                self.check(f"Blip2Model.get_text_features at real tokens ({impl})", got[mask == 1],
                           want[mask == 1], ACT_TOL)


class ScriptedRetrievalParity(_Parity, unittest.TestCase):
    kind = "scripted"
    scripted = True


# ------------------------------------------------------------------------------ half precision


@unittest.skipUnless(HAVE_HF, "transformers is not installed")
class HalfPrecision(unittest.TestCase):
    """HF loaded with from_pretrained(dtype=...) from a saved checkpoint; ours built from the same
    folder (checkpoint.load_checkpoint) in float32 and cast with to_dtype_like_hf."""

    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.dirs = {}
        for name, build in (("itr", lambda: hf_retrieval("A")), ("itr_b", lambda: hf_retrieval("B")),
                            ("gen", lambda: hf_caption("A"))):
            d = os.path.join(_util.tempdir(), name)
            build().save_pretrained(d)
            cls.dirs[name] = d

    def check(self, name, got, want, tol, same_dtype=True):
        if same_dtype:
            self.assertEqual(got.dtype, want.dtype, name)
        d = max_abs(got, want)
        record(f"half: {name}", d)
        self.assertLessEqual(d, tol, f"{name}: max abs diff {d}")

    def assert_hf_dtypes(self, ours, theirs):
        want = {k: v.dtype for k, v in theirs.state_dict().items()}
        got = {k: v.dtype for k, v in ours.state_dict().items()}
        self.assertEqual(got, {k: want[k] for k in got})

    def cases(self):
        # (dtype, HF attention, tolerance); bf16 "mixed" is not what from_pretrained does but what
        # our casts must also handle (float32 Q-Former, bfloat16 rest).
        for dtype in (torch.float16, torch.bfloat16):
            for impl in ("eager", "sdpa"):
                yield dtype, impl, (HALF_EXACT_TOL if impl == "eager" else HALF_SDPA_TOL[dtype])

    def test_retrieval(self):
        for key, shape in (("itr", "A"), ("itr_b", "B")):
            config, sd = checkpoint.load_checkpoint(self.dirs[key], report=None)
            pv = pixels(shape, 3, 15)
            ids, mask = text_inputs(shape, 3, 16)
            for dtype, impl, tol in self.cases():
                tag = f"{shape} {str(dtype)[6:]} {impl}"
                hf = Blip2ForImageTextRetrieval.from_pretrained(self.dirs[key], dtype=dtype,
                                                                attn_implementation=impl).eval()
                model = to_dtype_like_hf(Blip2RetrievalModel.from_hf(config, sd), dtype)
                self.assert_hf_dtypes(model, hf)
                if dtype == torch.float16:
                    self.assertEqual(model.qformer.layernorm.weight.dtype, torch.float32)
                    self.assertEqual(model.query_tokens.dtype, torch.float32)
                    self.assertEqual(model.embeddings.word_embeddings.weight.dtype, torch.float16)
                for scripted in (False, True):
                    enc = Blip2RetrievalEncoder(model).eval()
                    enc = script(enc) if scripted else enc
                    t = f"{tag}{' scripted' if scripted else ''}"
                    with torch.no_grad():
                        image = enc.vision_model(pv.to(dtype))[0]
                        want = hf(pixel_values=pv.to(dtype), **with_image_tokens(shape, ids, mask),
                                  use_image_text_matching_head=True)
                        got = enc.itm(image, ids, mask)
                        self.assertEqual(got.dtype, torch.float32)
                        self.check(f"ITM {t}", got, want.logits_per_image.float(), tol)
                        want = hf(pixel_values=pv[:2].to(dtype), **with_image_tokens(shape, ids, mask))
                        lpi, lpt, text_embeds, image_embeds = enc.itc(image[:2], ids, mask)
                        self.check(f"ITC logits_per_image {t}", lpi, want.logits_per_image.float(), tol)
                        self.check(f"ITC logits_per_text {t}", lpt, want.logits_per_text.float(), tol)
                        self.check(f"ITC text_embeds {t}", text_embeds, want.text_embeds, tol)
                        self.check(f"ITC image_embeds {t}", image_embeds, want.image_embeds, tol)
                        q = enc.image_embeds(image)[1]
                        self.assertEqual(q.dtype, model.qformer.layernorm.weight.dtype)
            # bfloat16 with a float32 Q-Former (HF arranged by hand the same way)
            hf = Blip2ForImageTextRetrieval.from_pretrained(self.dirs[key], attn_implementation="eager").eval()
            hf.to(torch.bfloat16)
            hf.qformer.float()
            hf.query_tokens.data = hf.query_tokens.data.float()
            reference = Blip2ForImageTextRetrieval.from_pretrained(self.dirs[key]).eval()
            hf.qformer.load_state_dict(reference.qformer.state_dict())
            hf.query_tokens.data.copy_(reference.query_tokens.data)
            model = Blip2RetrievalModel.from_hf(config, sd)
            to_dtype_like_hf(model, torch.bfloat16)
            model.qformer.float()
            model.qformer.load_state_dict(reference.qformer.state_dict())
            model.query_tokens.data = reference.query_tokens.data.clone()
            self.assert_hf_dtypes(model, hf)
            enc = script(Blip2RetrievalEncoder(model))
            with torch.no_grad():
                image = enc.vision_model(pv.to(torch.bfloat16))[0]
                want = hf(pixel_values=pv.to(torch.bfloat16), **with_image_tokens(shape, ids, mask),
                          use_image_text_matching_head=True)
                self.check(f"ITM {shape} bf16+fp32 qformer", enc.itm(image, ids, mask),
                           want.logits_per_image.float(), HALF_EXACT_TOL)
                want = hf(pixel_values=pv.to(torch.bfloat16), **with_image_tokens(shape, ids, mask))
                got = enc.itc(image, ids, mask)
                self.check(f"ITC logits_per_image {shape} bf16+fp32 qformer", got[0], want.logits_per_image.float(),
                           HALF_EXACT_TOL)
                self.check(f"ITC text_embeds {shape} bf16+fp32 qformer", got[2], want.text_embeds, HALF_EXACT_TOL)

    def test_with_projection_models(self):
        """Blip2TextModelWithProjection / Blip2VisionModelWithProjection.from_pretrained of the
        retrieval checkpoint in float16 (HF keeps their qformer and query_tokens in float32 too)."""
        config, sd = checkpoint.load_checkpoint(self.dirs["itr"], report=None)
        pv = pixels("A", 2, 17, torch.float16)
        ids, mask = text_inputs("A", 3, 18)
        for impl, tol in (("eager", HALF_EXACT_TOL), ("sdpa", HALF_SDPA_TOL[torch.float16])):
            hf_t = Blip2TextModelWithProjection.from_pretrained(self.dirs["itr"], dtype=torch.float16,
                                                                attn_implementation=impl).eval()
            hf_v = Blip2VisionModelWithProjection.from_pretrained(self.dirs["itr"], dtype=torch.float16,
                                                                  attn_implementation=impl).eval()
            text = to_dtype_like_hf(Blip2RetrievalModel.from_hf(config, sd, "Blip2TextModelWithProjection"),
                                    torch.float16)
            vision = to_dtype_like_hf(Blip2RetrievalModel.from_hf(config, sd, "Blip2VisionModelWithProjection"),
                                      torch.float16)
            self.assert_hf_dtypes(text, hf_t)
            self.assert_hf_dtypes(vision, hf_v)
            for scripted in (False, True):
                te, ve = Blip2RetrievalEncoder(text).eval(), Blip2RetrievalEncoder(vision).eval()
                if scripted:
                    te, ve = script(te), script(ve)
                t = f"fp16 {impl}{' scripted' if scripted else ''}"
                with torch.no_grad():
                    want = hf_t(input_ids=ids, attention_mask=mask)
                    got = te.text_embeds(ids, mask)
                    self.check(f"TextWithProjection text_embeds {t}", got[0], want.text_embeds, tol)
                    self.check(f"TextWithProjection last_hidden_state (float32) {t}", got[1],
                               want.last_hidden_state, tol)
                    want = hf_v(pixel_values=pv)
                    last = ve.vision_model(pv)[0]
                    self.check(f"VisionWithProjection last_hidden_state {t}", last, want.last_hidden_state, tol)
                    self.check(f"VisionWithProjection image_embeds {t}", ve.image_embeds(last)[0],
                               want.image_embeds, tol)

    def test_caption_image_encoder(self):
        """Blip2ForConditionalGeneration in float16 (vision/projection/LM float16, Q-Former float32):
        image_encoder.pt's methods against get_image_features / the Q-Former."""
        config, sd = checkpoint.load_checkpoint(self.dirs["gen"], report=None)
        pv = pixels("A", 2, 19, torch.float16)
        for impl, tol in (("eager", HALF_EXACT_TOL), ("sdpa", HALF_SDPA_TOL[torch.float16])):
            hf = transformers.Blip2ForConditionalGeneration.from_pretrained(
                self.dirs["gen"], dtype=torch.float16, attn_implementation=impl).eval()
            model = Blip2ForConditionalGeneration.from_hf(config, sd)
            to_dtype_like_hf(model, torch.float16)
            self.assert_hf_dtypes(model, hf)
            for scripted in (False, True):
                enc = Blip2ImageEncoder(model).eval()
                enc = script(enc) if scripted else enc
                t = f"fp16 {impl}{' scripted' if scripted else ''}"
                with torch.no_grad():
                    feats = hf.get_image_features(pixel_values=pv)
                    self.check(f"caption forward {t}", enc(pv), feats.pooler_output, tol)
                    last = enc.vision_model(pv)[0]
                    self.check(f"caption vision last_hidden_state {t}", last, feats.last_hidden_state, tol)
                    query = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=last,
                                       encoder_attention_mask=torch.ones(last.shape[:2], dtype=torch.long))
                    self.check(f"caption qformer (cast to float16) {t}", enc.qformer(last),
                               query.last_hidden_state.to(torch.float16), tol)
                    got = enc.qformer_forward(hf.query_tokens.expand(2, -1, -1), last,
                                              torch.ones(last.shape[:2], dtype=torch.long))
                    self.check(f"caption qformer_forward (float32) {t}", got[0], query.last_hidden_state, tol)
                    self.check(f"caption language_projection {t}", enc.language_projection(query.last_hidden_state),
                               feats.pooler_output, tol)


# ------------------------------------------------------------------- config and state dict rules


def retrieval_config_dict(architecture="Blip2ForImageTextRetrieval", use_qformer_text_input=True, **top):
    """config.json of a tiny retrieval checkpoint, written by hand (no transformers needed)."""
    s = SHAPES["A"]
    d = {"model_type": "blip-2", "architectures": [architecture],
         "vision_config": dict(s["vision"]),
         "qformer_config": dict(s["qformer"], use_qformer_text_input=use_qformer_text_input),
         "num_query_tokens": s["num_query_tokens"], "image_text_hidden_size": s["image_text_hidden_size"]}
    d.update(top)
    return d


class RetrievalConfigAndStateDict(unittest.TestCase):
    def test_from_dict_accepts_retrieval_architectures(self):
        for arch in RETRIEVAL_ARCHITECTURES:
            for text in (None, {"model_type": "opt"}, {"model_type": "t5"}):  # text_config is not used
                d = retrieval_config_dict(arch)
                if text is not None:
                    d["text_config"] = text
                cfg = Blip2Config.from_dict(d)
                self.assertTrue(cfg.is_retrieval)
                self.assertEqual(cfg.architecture, arch)
                self.assertEqual(cfg.image_text_hidden_size, 16)
                self.assertEqual((cfg.qformer.vocab_size, cfg.qformer.max_position_embeddings,
                                  cfg.qformer.pad_token_id), (50, 20, 0))
                with self.assertRaisesRegex(ExportError, f"{arch}.*no language model"):
                    cfg.text.max_position_embeddings
        cfg = Blip2Config.from_dict({"model_type": "blip-2", "architectures": ["Blip2ForImageTextRetrieval"],
                                     "qformer_config": {"use_qformer_text_input": True}})
        self.assertEqual((cfg.image_text_hidden_size, cfg.qformer.vocab_size, cfg.qformer.max_position_embeddings,
                          cfg.num_query_tokens), (256, 30522, 512, 32))  # HF's defaults

    def test_text_architectures_need_the_text_ffn(self):
        for arch in ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection"):
            with self.assertRaisesRegex(ExportError, f"{arch}.*use_qformer_text_input"):
                Blip2Config.from_dict(retrieval_config_dict(arch, use_qformer_text_input=False))
        cfg = Blip2Config.from_dict(retrieval_config_dict("Blip2VisionModelWithProjection", False))
        self.assertNotIn("qformer.encoder.layer.0.intermediate.dense.weight", Blip2RetrievalModel(cfg).state_dict())

    def test_captioning_configs_unchanged(self):
        config = checkpoint.load_config(_util.CHECKPOINT)
        cfg = Blip2Config.from_dict(config)
        self.assertFalse(cfg.is_retrieval)
        self.assertEqual(cfg.text.vocab_size, config["text_config"]["vocab_size"])
        other = json.loads(json.dumps(config))
        other["text_config"]["model_type"] = "llama"
        with self.assertRaisesRegex(ExportError, "text_config.model_type"):
            Blip2Config.from_dict(other)
        mixed = dict(config, architectures=["Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval"])
        with self.assertRaisesRegex(ExportError, "both"):
            Blip2Config.from_dict(mixed)
        with self.assertRaisesRegex(ExportError, "retrieval"):
            Blip2ForConditionalGeneration(Blip2Config.from_dict(retrieval_config_dict()))
        with self.assertRaisesRegex(ExportError, "not a retrieval architecture"):
            Blip2RetrievalModel(cfg)

    def model(self, arch="Blip2ForImageTextRetrieval"):
        torch.manual_seed(0)
        return Blip2RetrievalModel(Blip2Config.from_dict(retrieval_config_dict(arch)))

    def test_strict_load_lists_every_key(self):
        m = self.model()
        sd = dict(m.state_dict())
        self.assertIn("embeddings.word_embeddings.weight", sd)
        self.assertIn("qformer.encoder.layer.0.intermediate.dense.weight", sd)
        self.assertIn("itm_head.weight", sd)
        removed = sorted(k for k in sd if k.startswith("qformer.encoder.layer."))[:40]  # > 30: nothing cut
        for k in removed:
            del sd[k]
        sd["qformer.embeddings.word_embeddings.weight"] = torch.zeros(1)  # an older layout: not ignored here
        sd["bogus"] = torch.zeros(1)
        with self.assertRaises(ExportError) as cm:
            m.load_hf_state_dict(sd)
        msg = str(cm.exception)
        self.assertIn("40 missing", msg)
        self.assertIn("2 unexpected", msg)
        for k in removed + ["qformer.embeddings.word_embeddings.weight", "bogus"]:
            self.assertIn(k, msg)

    def test_rules(self):
        m = self.model()
        sd = dict(m.state_dict())
        sd["embeddings.position_ids"] = torch.arange(20)[None]         # HF's non-persistent buffers
        sd["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
        pre = "vision_model.encoder.layers.0.self_attn."
        qkv = sd.pop(pre + "qkv.bias")
        sd[pre + "q_bias"], sd[pre + "v_bias"] = qkv[:32].clone(), qkv[64:].clone()  # pre-4.45 layout
        fresh = self.model()
        fresh.load_hf_state_dict(sd)
        want = torch.cat([qkv[:32], torch.zeros(32), qkv[64:]])
        self.assertTrue(torch.equal(fresh.state_dict()[pre + "qkv.bias"], want))
        # The rules run on meta tensors too (the exporter plans the weights that way); copies are
        # the checkpoint's own tensors.
        meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
        prepared = fresh.prepare_state_dict(meta)
        self.assertEqual(sorted(prepared), sorted(fresh.state_dict()))
        self.assertIs(prepared["itm_head.weight"], meta["itm_head.weight"])
        sd["text_projection.weight"] = torch.zeros(3, 3)
        with self.assertRaisesRegex(ExportError, "text_projection.weight"):
            fresh.load_hf_state_dict(sd)

    def test_subsets_of_the_retrieval_checkpoint(self):
        sd = self.model().state_dict()
        cfg = Blip2Config.from_dict(retrieval_config_dict())
        text = Blip2RetrievalModel(cfg, "Blip2TextModelWithProjection")
        text.load_hf_state_dict(sd)
        self.assertIsNone(text.vision_model)
        self.assertTrue(torch.equal(text.text_projection.weight, sd["text_projection.weight"]))
        vision = Blip2RetrievalModel(cfg, "Blip2VisionModelWithProjection")
        vision.load_hf_state_dict(sd)
        self.assertIsNone(vision.embeddings)
        # ... but not the other way round
        text_sd = Blip2RetrievalModel(Blip2Config.from_dict(retrieval_config_dict("Blip2TextModelWithProjection"))
                                      ).state_dict()
        with self.assertRaisesRegex(ExportError, r"missing key\(s\): .*itm_head.weight.*vision_model"):
            self.model().load_hf_state_dict(text_sd)

    def test_to_dtype_like_hf(self):
        for dtype, kept in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
            m = to_dtype_like_hf(self.model(), dtype)
            for k, v in m.state_dict().items():
                top = k.split(".")[0]
                self.assertEqual(v.dtype, kept if top in ("qformer", "query_tokens") else dtype, k)


if __name__ == "__main__":
    unittest.main()
