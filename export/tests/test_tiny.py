"""Seeded random checkpoints (blip2_export.tiny)."""

import json
import os
import unittest

import torch

import _util
from safetensors import torch as st

from blip2_export import greedy, tiny
from blip2_export.checkpoint import build_model
from blip2_export.exporter import export


def generate(model, seed, n=12):
    cfg = model.config
    t = cfg.text
    size = cfg.vision.image_size
    pv = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        image = model.image_features(pv)[0]
        ids = ([cfg.image_token_index] * cfg.num_query_tokens if cfg.image_token_index is not None else []) + [2]
        row = greedy.prompt_embeds(model.language_model, ids, image, cfg.image_token_index)
        cache = greedy.alloc_cache(t.num_hidden_layers, t.num_attention_heads, t.head_dim, 1, 40)
        out, _ = greedy.greedy(model.language_model, cache, [row], n)
    return out[0]


class Tiny(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.root = _util.tempdir()
        cls.new = os.path.join(cls.root, "new")
        cls.legacy = os.path.join(cls.root, "legacy")
        tiny.write_checkpoint(cls.new, "tiny", seed=7)
        tiny.write_checkpoint(cls.legacy, "tiny", seed=7, legacy=True)

    def read(self, d, name):
        with open(os.path.join(d, name), encoding="utf-8") as f:
            return json.load(f)

    def test_files_and_config(self):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "preprocessor_config.json", "generation_config.json",
                     "processor_config.json", "vocab.json", "merges.txt"):
            self.assertTrue(os.path.isfile(os.path.join(self.new, name)), name)
        fixture = self.read(_util.CHECKPOINT, "config.json")
        cfg = self.read(self.new, "config.json")
        for part in ("vision_config", "text_config"):
            for k, v in fixture[part].items():
                self.assertEqual(cfg[part][k], v, f"{part}.{k}")
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "cross_attention_frequency", "encoder_hidden_size"):
            self.assertEqual(cfg["qformer_config"][k], fixture["qformer_config"][k], k)
        self.assertEqual(cfg["num_query_tokens"], 6)
        self.assertEqual(cfg["image_token_index"], 380)
        self.assertNotIn("image_token_index", self.read(self.legacy, "config.json"))
        self.assertEqual(self.read(self.new, "processor_config.json")["num_query_tokens"], 6)
        self.assertNotIn("num_query_tokens", self.read(self.legacy, "processor_config.json"))
        self.assertEqual(self.read(self.new, "preprocessor_config.json"),
                         self.read(_util.CHECKPOINT, "preprocessor_config.json"))
        self.assertEqual(self.read(self.new, "generation_config.json"),
                         self.read(_util.CHECKPOINT, "generation_config.json"))
        sd = st.load_file(os.path.join(self.new, "model.safetensors"))
        self.assertNotIn("language_model.lm_head.weight", sd)
        self.assertEqual(sorted(sd), sorted(st.load_file(os.path.join(_util.CHECKPOINT, "model.safetensors"))))

    def test_tokenizer_structure(self):
        fix = self.read(_util.CHECKPOINT, "tokenizer.json")
        tok = self.read(self.new, "tokenizer.json")
        self.assertEqual(list(tok), list(fix))
        for k in ("pre_tokenizer", "post_processor", "decoder", "normalizer", "truncation", "padding"):
            self.assertEqual(tok[k], fix[k], k)
        self.assertEqual({k: v for k, v in tok["model"].items() if k not in ("vocab", "merges")},
                         {k: v for k, v in fix["model"].items() if k not in ("vocab", "merges")})
        self.assertEqual(tok["added_tokens"], fix["added_tokens"])  # same ids: 4 + 256 + 120 merges = 380
        vocab, merges = tok["model"]["vocab"], tok["model"]["merges"]
        self.assertEqual(len(merges), 120)
        self.assertEqual(sorted(vocab.values()), list(range(len(vocab))))
        for i, m in enumerate(merges):  # every merge is built from tokens that exist before it
            a, b = m.split(" ")
            self.assertLess(max(vocab[a], vocab[b]), vocab[a + b], m)
        self.assertEqual(self.read(self.new, "vocab.json"), vocab)
        self.assertEqual(self.read(self.new, "tokenizer_config.json"), self.read(_util.CHECKPOINT, "tokenizer_config.json"))
        self.assertEqual(self.read(self.new, "special_tokens_map.json"),
                         self.read(_util.CHECKPOINT, "special_tokens_map.json"))
        leg = self.read(self.legacy, "tokenizer.json")
        self.assertNotIn("<image>", [t["content"] for t in leg["added_tokens"]])

    def test_seeded(self):
        again = os.path.join(self.root, "again")
        other = os.path.join(self.root, "other")
        tiny.write_checkpoint(again, "tiny", seed=7)
        tiny.write_checkpoint(other, "tiny", seed=8)

        def read(d):
            with open(os.path.join(d, "model.safetensors"), "rb") as f:
                return f.read()

        self.assertEqual(read(again), read(self.new))
        self.assertNotEqual(read(other), read(self.new))

    def test_loads_exports_and_is_not_degenerate(self):
        model = build_model(self.new, report=None)
        emb = model.language_model.model.decoder.embed_tokens.weight
        self.assertTrue(torch.equal(emb[381:], torch.zeros_like(emb[381:])))
        for seed in range(2):
            tokens = generate(model, seed)
            self.assertGreaterEqual(len(set(tokens)), 4, tokens)
        legacy = build_model(self.legacy, report=None)
        self.assertIsNone(legacy.config.image_token_index)
        self.assertGreaterEqual(len(set(generate(legacy, 0))), 4)
        m = export(self.new, os.path.join(self.root, "model"), report=None)
        self.assertEqual(m["image_token_index"], 380)

    def test_mid_preset_config(self):
        cfg = tiny.config_dict("mid", 423)
        v, q, t = cfg["vision_config"], cfg["qformer_config"], cfg["text_config"]
        self.assertEqual((v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"], v["intermediate_size"],
                          v["image_size"], v["patch_size"]), (384, 6, 6, 1536, 224, 14))
        self.assertEqual((q["hidden_size"], q["num_hidden_layers"], q["num_attention_heads"], q["intermediate_size"],
                          q["cross_attention_frequency"], q["encoder_hidden_size"]), (384, 6, 6, 1536, 2, 384))
        self.assertEqual(cfg["num_query_tokens"], 32)
        self.assertEqual((t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["ffn_dim"],
                          t["vocab_size"], t["max_position_embeddings"]), (768, 12, 12, 3072, 50272, 2048))


if __name__ == "__main__":
    unittest.main()
