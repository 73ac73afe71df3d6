"""Parity with the Hugging Face reference outputs (transformers v4.45.1) of the tiny-opt fixture,
for our eager modules and for the scripted modules after torch.jit.save + torch.jit.load."""

import unittest

import torch

import _util
from _util import expected, max_abs, record

from blip2_export import greedy
from blip2_export.modeling_blip_2 import Blip2ImageEncoder

IMAGES = ("gradient", "noise", "shapes")
PROMPTS = ("empty", "question")
FEATURE_TOL = 1e-4   # vision / Q-Former / projection / forward logits
STEP_TOL = 1e-3      # logits of the cached generation steps


class _Parity:
    kind = ""

    @classmethod
    def modules(cls):
        raise NotImplementedError

    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.enc, cls.lm = cls.modules()
        cls.t, cls.meta = expected()
        m = _util.eager_model().config
        cls.image_token_index = m.image_token_index
        cls.text = m.text

    def check(self, name, got, want, tol):
        d = max_abs(got, want)
        record(f"{self.kind}: {name}", d)
        self.assertLessEqual(d, tol, f"{name}: max abs diff {d}")

    def cache(self, slots, max_len=48):
        t = self.text
        return greedy.alloc_cache(t.num_hidden_layers, t.num_attention_heads, t.head_dim, slots, max_len)

    def image(self, img):
        return self.enc(self.t[f"pixel_values/{img}"])

    # ------------------------------------------------------------------ image side

    def test_image_stages(self):
        with torch.inference_mode():
            for img in IMAGES:
                pv = self.t[f"pixel_values/{img}"]
                last, pooled = self.enc.vision_model(pv)
                self.check("vision last_hidden_state", last, self.t[f"vision/last_hidden_state/{img}"], FEATURE_TOL)
                self.check("vision pooler_output", pooled, self.t[f"vision/pooler_output/{img}"], FEATURE_TOL)
                q = self.enc.qformer(last)
                self.check("qformer last_hidden_state", q, self.t[f"qformer/last_hidden_state/{img}"], FEATURE_TOL)
                proj = self.enc.language_projection(q)
                self.check("language_projection", proj, self.t[f"language_projection/{img}"], FEATURE_TOL)
                self.check("forward (pixels -> projection)", self.enc(pv), self.t[f"language_projection/{img}"],
                           FEATURE_TOL)

    # ------------------------------------------------------------------ forward_full

    def embeds_new_path(self, input_ids, image):
        """HF's new path: embed all ids, scatter the query embeddings over the <image> positions."""
        ids = torch.tensor(input_ids)
        emb = self.lm.embed_tokens(ids).clone()
        emb[ids == self.image_token_index] = image.reshape(-1, image.size(-1))
        return emb

    def test_forward_logits(self):
        with torch.inference_mode():
            for img in IMAGES:
                image = self.image(img)
                for p in PROMPTS:
                    po = self.meta["processor_outputs"][f"{img}/{p}"]
                    logits = self.lm.forward_full(self.embeds_new_path(po["input_ids"], image),
                                                  torch.tensor(po["attention_mask"]))
                    self.assertEqual(logits.dtype, torch.float32)
                    self.check("forward_full logits", logits, self.t[f"logits/{img}/{p}"], FEATURE_TOL)

    def test_batched_forward_logits(self):
        """Left and right padded batches (pads between image tokens and BOS on the left)."""
        with torch.inference_mode():
            for b in self.meta["batched_generations"]:
                if "forward_logits_tensor" not in b:
                    continue
                pv = torch.cat([self.t[f"pixel_values/{i}"] for i in b["images"]])
                image = self.enc(pv)
                emb = self.embeds_new_path(b["input_ids"], image)
                logits = self.lm.forward_full(emb, torch.tensor(b["attention_mask"]))
                self.check(f"forward_full batched logits ({b['padding_side']})", logits,
                           self.t[b["forward_logits_tensor"]], FEATURE_TOL)

    def test_legacy_forward_logits(self):
        with torch.inference_mode():
            image = self.image("gradient")
            for p in PROMPTS:
                want = self.t[f"legacy/logits/gradient/{p}"]
                ids = self.meta["processor_outputs"][f"gradient/{p}"]["input_ids"][0]
                text_ids = [i for i in ids if i != self.image_token_index]
                emb = torch.cat([image, self.lm.embed_tokens(torch.tensor([text_ids]))], dim=1)
                logits = self.lm.forward_full(emb, torch.ones(emb.shape[:2], dtype=torch.long))
                self.check("forward_full legacy logits", logits, want, FEATURE_TOL)

    # ------------------------------------------------------------------ cached generation

    def test_greedy_generations(self):
        gens = [g for g in self.meta["generations"] if "step_logits_tensor" in g]
        self.assertEqual(len(gens), 12)
        with torch.inference_mode():
            for g in gens:
                image = self.image(g["image"])[0]
                row = greedy.prompt_embeds(self.lm, g["input_ids"][0], image, self.image_token_index)
                ids, steps = greedy.greedy(self.lm, self.cache(1), [row], g["kwargs"]["max_new_tokens"])
                # HF returns [bos] + new tokens
                self.assertEqual(ids[0], g["sequences"][0][1:], g["name"])
                self.check("cached step logits", steps, self.t[g["step_logits_tensor"]], STEP_TOL)

    def test_batched_generations(self):
        """Both rows in one cache (slots 2 and 0 of 3), pads dropped, different prompt lengths:
        one prefill call, then decode steps at different positions per row."""
        with torch.inference_mode():
            n = 0
            for b in self.meta["batched_generations"]:
                if "images" not in b:
                    continue
                n += 1
                rows = []
                for i, img in enumerate(b["images"]):
                    ids = [t for t, a in zip(b["input_ids"][i], b["attention_mask"][i]) if a == 1]
                    rows.append(greedy.prompt_embeds(self.lm, ids, self.image(img)[0], self.image_token_index))
                cache = self.cache(3)
                cache.fill_(1e30)  # garbage beyond what is written must not leak (no NaN/inf)
                ids, _ = greedy.greedy(self.lm, cache, rows, b["kwargs"]["max_new_tokens"], slots=[2, 0])
                self.assertEqual(ids, [s[1:] for s in b["sequences"]], b["name"])
            self.assertEqual(n, 4)

    def test_legacy_generations(self):
        with torch.inference_mode():
            for g in self.meta["legacy_path"]:
                image = self.image(g["image"])[0]
                ids = g["input_ids"][0] if "input_ids" in g else [self.text.bos_token_id]
                row = greedy.prompt_embeds(self.lm, ids, image, None)
                out, _ = greedy.greedy(self.lm, self.cache(1), [row], g["kwargs"]["max_new_tokens"])
                self.assertEqual(out[0], g["sequences"][0][1:], g["name"])


class EagerParity(_Parity, unittest.TestCase):
    kind = "eager"

    @classmethod
    def modules(cls):
        m = _util.eager_model()
        return Blip2ImageEncoder(m).eval(), m.language_model


class ScriptedParity(_Parity, unittest.TestCase):
    kind = "scripted"

    @classmethod
    def modules(cls):
        _, _, enc, lm = _util.exported()
        return enc, lm


if __name__ == "__main__":
    unittest.main()
