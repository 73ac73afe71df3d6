"""The exporter: CLI end to end on the fixture folder, manifest, error handling, dtypes."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import unittest

import torch

import _util
from blip2_export import __main__ as cli
from blip2_export.exporter import IMAGE_ENCODER_METHODS, LANGUAGE_MODEL_METHODS, SIDE_FILES, export


def run_cli(*args):
    """In-process CLI: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


class CommandLine(unittest.TestCase):
    def test_end_to_end(self):
        out = os.path.join(_util.tempdir(), "model")
        env = dict(os.environ, PYTHONPATH=_util.EXPORT_DIR)
        p = subprocess.run([_util.PYTHON, "-m", "blip2_export", _util.CHECKPOINT, out, "--max-length", "64"],
                           env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        lines = p.stderr.splitlines()
        self.assertTrue(lines and all(line.startswith("progress: ") for line in lines), p.stderr)
        self.assertIn("progress: loading weights 1/1 model.safetensors", lines)
        self.assertIn("progress: scripting language model", lines)

        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        self.assertEqual(m["format"], "blip2-node-model")
        self.assertEqual(m["format_version"], 1)
        self.assertEqual(m["architecture"], "opt")
        self.assertEqual(m["dtype"], "float32")
        self.assertEqual(m["exporter"], {"version": "0.1.0", "torch": torch.__version__})
        self.assertEqual(m["num_query_tokens"], 6)
        self.assertEqual(m["image_token_index"], 380)
        self.assertEqual(m["image_size"], [56, 56])
        self.assertEqual(m["max_length"], 64)
        self.assertEqual(m["vocab_size"], 392)
        self.assertEqual(m["special_tokens"], {"bos_token_id": 2, "eos_token_id": [2], "pad_token_id": 1,
                                               "decoder_start_token_id": None})
        self.assertEqual(m["language_model"], {"num_layers": 2, "num_heads": 4, "head_dim": 12, "hidden_size": 48,
                                               "embed_dim": 48, "max_position_embeddings": 128})
        self.assertEqual(m["vision"], {"hidden_size": 48, "num_layers": 2, "patch_size": 14, "num_positions": 17})
        self.assertEqual(m["qformer"], {"hidden_size": 32, "num_layers": 2})
        self.assertEqual(list(m)[:3], ["format", "format_version", "architecture"])

        modules = m["modules"]
        self.assertEqual(sorted(modules), ["image_encoder", "language_model"])
        for key, methods in (("image_encoder", IMAGE_ENCODER_METHODS), ("language_model", LANGUAGE_MODEL_METHODS)):
            entry = modules[key]
            self.assertEqual(entry["file"], f"{key}.pt")
            path = os.path.join(out, entry["file"])
            self.assertEqual(entry["bytes"], os.path.getsize(path))
            self.assertEqual(entry["methods"], methods)
            loaded = torch.jit.load(path)
            for name in methods:
                self.assertTrue(hasattr(loaded, name), f"{key}.{name}")
        self.assertEqual(sorted(IMAGE_ENCODER_METHODS), ["forward", "language_projection", "qformer", "vision_model"])
        self.assertEqual(sorted(LANGUAGE_MODEL_METHODS), ["decode", "embed_tokens", "forward_cached", "forward_full"])

        for name in SIDE_FILES:
            src = os.path.join(_util.CHECKPOINT, name)
            if os.path.isfile(src):
                with open(src, "rb") as a, open(os.path.join(out, name), "rb") as b:
                    self.assertEqual(a.read(), b.read(), name)
        self.assertFalse(os.path.exists(os.path.join(out, "spiece.model")))
        self.assertFalse([f for f in os.listdir(out) if f.endswith(".tmp")])

    def test_user_errors_exit_2_with_one_line(self):
        root = _util.tempdir()

        def variant(name, edit):
            d = os.path.join(root, name)
            shutil.copytree(_util.CHECKPOINT, d)
            with open(os.path.join(d, "config.json")) as f:
                c = json.load(f)
            edit(c)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(c, f)
            return d

        t5 = variant("t5", lambda c: c["text_config"].update(model_type="t5"))
        itm = variant("itm", lambda c: c.update(architectures=["Blip2ForImageTextRetrieval"]))
        out = os.path.join(root, "out")
        cases = [
            ((t5, out), "T5"),
            ((itm, out), "Blip2ForImageTextRetrieval"),
            ((_util.CHECKPOINT, out, "--max-length", "129"), "max_position_embeddings"),
            ((_util.CHECKPOINT, out, "--max-length", "6"), "image tokens"),
            ((_util.CHECKPOINT, out, "--max-length", "0"), "positive"),
            ((_util.CHECKPOINT, out, "--dtype", "int8"), "dtype"),
            ((os.path.join(root, "nope"), out), "not a directory"),
            ((_util.CHECKPOINT, _util.CHECKPOINT), "differ"),
            ((_util.CHECKPOINT,), "required"),
        ]
        for args, needle in cases:
            code, err = run_cli(*args)
            self.assertEqual(code, 2, (args, err))
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertTrue(err.startswith("error: "), err)
            self.assertIn(needle, err)
        self.assertFalse(os.path.exists(os.path.join(out, "manifest.json")))

    def test_error_through_subprocess(self):
        env = dict(os.environ, PYTHONPATH=_util.EXPORT_DIR)
        p = subprocess.run([_util.PYTHON, "-m", "blip2_export", os.path.join(_util.tempdir(), "x"), "y"],
                           env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 2)
        self.assertRegex(p.stderr, r"^error: .*not a directory\n$")


class Dtypes(unittest.TestCase):
    def test_default_max_length_and_low_precision(self):
        for dtype, tdtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            out = os.path.join(_util.tempdir(), dtype)
            m = export(_util.CHECKPOINT, out, dtype=dtype, report=None)
            self.assertEqual(m["dtype"], dtype)
            self.assertEqual(m["max_length"], 128)
            for f in ("image_encoder.pt", "language_model.pt"):
                mod = torch.jit.load(os.path.join(out, f))
                self.assertEqual({p.dtype for p in mod.parameters()}, {tdtype}, f)
            if dtype == "bfloat16":  # float16 matmuls are not implemented on CPU in torch 1.13
                self.run_bf16(out)

    def run_bf16(self, out):
        from blip2_export import greedy
        t, meta = _util.expected()
        enc = torch.jit.load(os.path.join(out, "image_encoder.pt"))
        lm = torch.jit.load(os.path.join(out, "language_model.pt"))
        with torch.inference_mode():
            image = enc(t["pixel_values/gradient"].bfloat16())
            self.assertEqual(image.dtype, torch.bfloat16)
            row = greedy.prompt_embeds(lm, [380] * 6 + [2], image[0], 380)
            cache = greedy.alloc_cache(2, 4, 12, 1, 32, torch.bfloat16)
            ids, steps = greedy.greedy(lm, cache, [row], 12)
        self.assertEqual(steps.dtype, torch.float32)
        self.assertLess(_util.max_abs(steps, t["gen_step_logits/greedy/gradient/empty"]), 2.0)
        _util.record("bfloat16 export: cached step logits (loose)", _util.max_abs(
            steps, t["gen_step_logits/greedy/gradient/empty"]))


if __name__ == "__main__":
    unittest.main()
