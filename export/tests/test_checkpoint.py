"""Checkpoint layouts and strict state-dict loading."""

import json
import os
import shutil
import unittest

import torch

import _util
from safetensors import torch as st

from blip2_export import checkpoint
from blip2_export.errors import ExportError
from blip2_export.modeling_blip_2 import Blip2Config, Blip2ForConditionalGeneration

SIDE = ("config.json", "generation_config.json")


class Layouts(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sd = st.load_file(os.path.join(_util.CHECKPOINT, "model.safetensors"))
        cls.keys = sorted(cls.sd)

    def folder(self):
        d = os.path.join(_util.tempdir(), "ckpt")
        os.makedirs(d)
        for name in SIDE:
            shutil.copy(os.path.join(_util.CHECKPOINT, name), d)
        return d

    def shard_names(self, n, ext):
        return [f"{'model' if ext == 'safetensors' else 'pytorch_model'}-{i + 1:05d}-of-{n:05d}.{ext}"
                for i in range(n)]

    def write_sharded(self, d, n, ext):
        names = self.shard_names(n, ext)
        weight_map = {}
        for i, name in enumerate(names):
            part = {k: self.sd[k] for k in self.keys[i::n]}
            weight_map.update({k: name for k in part})
            path = os.path.join(d, name)
            if ext == "safetensors":
                st.save_file(part, path)
            else:
                torch.save(part, path)
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        with open(os.path.join(d, index), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
        return names

    def assert_same(self, loaded):
        self.assertEqual(sorted(loaded), self.keys)
        for k in self.keys:
            self.assertEqual(loaded[k].dtype, self.sd[k].dtype, k)
            self.assertTrue(torch.equal(loaded[k], self.sd[k]), k)

    def test_sharded_safetensors(self):
        d = self.folder()
        names = self.write_sharded(d, 3, "safetensors")
        lines = []
        self.assert_same(checkpoint.load_state_dict(d, report=lines.append))
        self.assertEqual(lines, [f"loading shard {i + 1}/3 {n}" for i, n in enumerate(names)])

    def test_pytorch_model_bin(self):
        d = self.folder()
        torch.save(dict(self.sd), os.path.join(d, "pytorch_model.bin"))
        self.assert_same(checkpoint.load_state_dict(d, report=None))

    def test_sharded_bin(self):
        d = self.folder()
        self.write_sharded(d, 2, "bin")
        self.assert_same(checkpoint.load_state_dict(d, report=None))

    def test_models_from_all_layouts_identical(self):
        ref = checkpoint.build_model(_util.CHECKPOINT, report=None).state_dict()
        d = self.folder()
        self.write_sharded(d, 2, "bin")
        got = checkpoint.build_model(d, report=None).state_dict()
        self.assertEqual(sorted(got), sorted(ref))
        for k in ref:
            self.assertTrue(torch.equal(got[k], ref[k]), k)

    def test_progress_lines_on_stderr(self):
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            checkpoint.load_state_dict(_util.CHECKPOINT)
        self.assertEqual(buf.getvalue(), "progress: loading weights 1/1 model.safetensors\n")

    def test_missing_and_broken_files(self):
        d = self.folder()
        with self.assertRaisesRegex(ExportError, "no weights"):
            checkpoint.load_state_dict(d, report=None)
        names = self.write_sharded(d, 2, "safetensors")
        os.remove(os.path.join(d, names[1]))
        with self.assertRaisesRegex(ExportError, names[1]):
            checkpoint.load_state_dict(d, report=None)
        with open(os.path.join(d, names[0]), "r+b") as f:
            f.truncate(100)
        shutil.copy(os.path.join(d, names[0]), os.path.join(d, "model.safetensors"))
        with self.assertRaisesRegex(ExportError, "model.safetensors"):
            checkpoint.load_state_dict(d, report=None)
        os.remove(os.path.join(d, "config.json"))
        with self.assertRaisesRegex(ExportError, "config.json"):
            checkpoint.load_config(d)


class StrictLoading(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.config = checkpoint.load_config(_util.CHECKPOINT)
        cls.sd = st.load_file(os.path.join(_util.CHECKPOINT, "model.safetensors"))

    def load(self, sd, config=None):
        m = Blip2ForConditionalGeneration(Blip2Config.from_dict(config or self.config))
        m.load_hf_state_dict(sd)
        return m

    def test_unexpected_and_missing_keys_are_named(self):
        sd = dict(self.sd)
        sd["vision_model.encoder.layers.0.self_attn.bogus.weight"] = torch.zeros(1)
        sd["something_else"] = torch.zeros(1)
        del sd["qformer.layernorm.weight"]
        del sd["language_model.model.decoder.layers.1.fc2.bias"]
        with self.assertRaises(ExportError) as cm:
            self.load(sd)
        msg = str(cm.exception)
        for k in ("vision_model.encoder.layers.0.self_attn.bogus.weight", "something_else",
                  "qformer.layernorm.weight", "language_model.model.decoder.layers.1.fc2.bias"):
            self.assertIn(k, msg)
        self.assertIn("2 missing", msg)
        self.assertIn("2 unexpected", msg)

    def test_shape_mismatch_is_named(self):
        sd = dict(self.sd)
        sd["language_projection.weight"] = torch.zeros(48, 33)
        with self.assertRaisesRegex(ExportError, "language_projection.weight"):
            self.load(sd)

    def test_keys_hf_ignores_are_dropped(self):
        sd = dict(self.sd)
        sd["qformer.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(64, 32)
        sd["qformer.encoder.layer.1.output.LayerNorm.bias"] = torch.zeros(32)
        sd["qformer.embeddings.word_embeddings.weight"] = torch.zeros(10, 32)
        sd["qformer.embeddings.position_ids"] = torch.arange(5)[None]
        sd["language_model.lm_head.weight"] = sd["language_model.model.decoder.embed_tokens.weight"].clone()
        m = self.load(sd)
        self.assertIs(m.language_model.lm_head.weight, m.language_model.model.decoder.embed_tokens.weight)
        # ... but not lookalikes
        sd["qformer.encoder.layer.0.intermediate.extra.weight"] = torch.zeros(1)
        with self.assertRaisesRegex(ExportError, "intermediate.extra.weight"):
            self.load(sd)

    def test_tied_head_must_match(self):
        sd = dict(self.sd)
        sd["language_model.lm_head.weight"] = torch.zeros_like(sd["language_model.model.decoder.embed_tokens.weight"])
        with self.assertRaisesRegex(ExportError, "tie_word_embeddings"):
            self.load(sd)

    def test_untied_head(self):
        config = json.loads(json.dumps(self.config))
        config["text_config"]["tie_word_embeddings"] = False
        with self.assertRaisesRegex(ExportError, "language_model.lm_head.weight"):
            self.load(dict(self.sd), config)
        sd = dict(self.sd)
        sd["language_model.lm_head.weight"] = torch.ones(392, 48)
        m = self.load(sd, config)
        self.assertIsNot(m.language_model.lm_head.weight, m.language_model.model.decoder.embed_tokens.weight)
        self.assertTrue(torch.equal(m.language_model.lm_head.weight, torch.ones(392, 48)))

    def test_separate_q_v_biases_are_fused(self):
        """Pre-4.45 layout: q_bias / v_bias instead of qkv.bias (k bias zero)."""
        sd = dict(self.sd)
        ref = {}
        for i in range(2):
            pre = f"vision_model.encoder.layers.{i}.self_attn."
            q, _, v = sd.pop(pre + "qkv.bias").chunk(3)
            sd[pre + "q_bias"], sd[pre + "v_bias"] = q, v
            ref[pre + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        got = self.load(sd).state_dict()
        for k, v in ref.items():
            self.assertTrue(torch.equal(got[k], v))


if __name__ == "__main__":
    unittest.main()
