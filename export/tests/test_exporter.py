"""The exporter: CLI end to end on the fixture folder, manifest, error handling, dtypes."""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import unittest

import torch

import _util
from blip2_export import __main__ as cli
from blip2_export.exporter import IMAGE_ENCODER_METHODS, LANGUAGE_MODEL_METHODS, SIDE_FILES, export
from blip2_export.torchscript import load_model_folder


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
        self.assertIn("progress: checkpoint: 1 file(s), 123 tensors", lines)
        self.assertIn("progress: scripting language model", lines)
        self.assertTrue(any(re.match(r"progress: weights written (\d+)/\1 bytes", line) for line in lines), lines)
        # blip2 export (lib/cli/export-display.ts) shows the total from the start with this line.
        self.assertTrue(any(re.match(r"progress: weights to write: \d+ bytes in 1 file\(s\)$", line) for line in lines), lines)

        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        self.assertEqual(m["format"], "blip2-node-model")
        self.assertEqual(m["format_version"], 2)
        self.assertEqual(m["architecture"], "opt")
        self.assertEqual(m["dtype"], "float32")
        self.assertEqual(m["exporter"], {"version": "0.1.0", "torch": torch.__version__.split("+")[0]})
        self.assertEqual(m["num_query_tokens"], 6)
        self.assertEqual(m["image_token_index"], 380)
        self.assertEqual(m["image_size"], [56, 56])
        self.assertEqual(m["max_length"], 64)
        self.assertEqual(m["vocab_size"], 392)
        self.assertEqual(m["special_tokens"], {"bos_token_id": 2, "eos_token_id": [2], "pad_token_id": 1,
                                               "decoder_start_token_id": None})
        self.assertEqual(m["language_model"], {"num_layers": 2, "num_heads": 4, "head_dim": 12, "hidden_size": 48,
                                               "embed_dim": 48, "max_position_embeddings": 128, "vocab_size": 392})
        self.assertEqual(m["vision"], {"hidden_size": 48, "num_layers": 2, "patch_size": 14, "num_positions": 17})
        self.assertEqual(m["qformer"], {"hidden_size": 32, "num_layers": 2, "encoder_hidden_size": 48})
        self.assertEqual(m["checkpoint_class"], "Blip2ForConditionalGeneration")
        self.assertEqual(m["classes"], ["Blip2ForConditionalGeneration", "Blip2Model", "Blip2VisionModel",
                                        "Blip2QFormerModel"])
        self.assertEqual(list(m)[:3], ["format", "format_version", "architecture"])

        modules = m["modules"]
        self.assertEqual(sorted(modules), ["image_encoder", "language_model"])
        for key, methods in (("image_encoder", IMAGE_ENCODER_METHODS), ("language_model", LANGUAGE_MODEL_METHODS)):
            entry = modules[key]
            self.assertEqual(entry["file"], f"{key}.pt")
            path = os.path.join(out, entry["file"])
            self.assertEqual(entry["bytes"], os.path.getsize(path))
            with open(path, "rb") as f:
                self.assertEqual(entry["sha256"], hashlib.sha256(f.read()).hexdigest())
            self.assertEqual(entry["methods"], methods)
            loaded = torch.jit.load(path)
            for name in methods:
                self.assertTrue(hasattr(loaded, name), f"{key}.{name}")
            # Weight-free code: every parameter is an empty placeholder the manifest maps to a key.
            self.assertEqual({n for n, _ in loaded.named_parameters()} - set(entry["parameters"]), set())
            self.assertTrue(all(p.numel() == 0 for p in loaded.parameters()))
            self.assertLess(entry["bytes"], 200_000)
        weights = m["weights"]
        self.assertEqual([f["file"] for f in weights["files"]], ["weights.safetensors"])
        from safetensors import safe_open
        with safe_open(os.path.join(out, "weights.safetensors"), framework="pt") as f:
            stored = set(f.keys())
        # Tied lm_head is stored once, under the checkpoint's own embed_tokens name.
        self.assertEqual(modules["language_model"]["parameters"]["lm_head.weight"],
                         "language_model.model.decoder.embed_tokens.weight")
        self.assertNotIn("language_model.lm_head.weight", stored)
        for entry in modules.values():
            self.assertEqual(set(entry["parameters"].values()) - stored, set())
        self.assertEqual(sorted(IMAGE_ENCODER_METHODS), ["encode_finish", "encode_layers", "encode_start", "forward",
                                                         "language_projection", "num_vision_layers", "qformer",
                                                         "qformer_forward", "vision_model"])
        self.assertEqual(sorted(LANGUAGE_MODEL_METHODS), ["decode", "embed_tokens", "forward_cached", "forward_full",
                                                          "step", "text_hidden_states"])

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

        llama = variant("llama", lambda c: c["text_config"].update(model_type="llama"))
        itm = variant("itm", lambda c: c.update(architectures=["Blip2ForImageTextRetrieval"]))
        out = os.path.join(root, "out")
        cases = [
            ((llama, out), "text_config.model_type is 'llama'"),
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
            modules = load_model_folder(out)
            lm_dtypes = {p.dtype for p in modules["language_model"].parameters()}
            self.assertEqual(lm_dtypes, {tdtype})
            # transformers 5 keeps query_tokens and the Q-Former in float32 under float16 (only).
            enc = dict(modules["image_encoder"].named_parameters())
            kept = torch.float32 if tdtype == torch.float16 else tdtype
            self.assertEqual({p.dtype for n, p in enc.items() if n.startswith(("q_former.", "query_tokens"))}, {kept})
            self.assertEqual({p.dtype for n, p in enc.items() if n.startswith("vision.")}, {tdtype})
            self.assertEqual(set(m["weights"]["keep_float32"]),
                             {k for k in m["modules"]["image_encoder"]["parameters"].values()
                              if k.startswith(("qformer.", "query_tokens"))})
            self.run_half(modules)

    def run_half(self, modules):
        from blip2_export import greedy
        t, meta = _util.expected()
        enc, lm = modules["image_encoder"], modules["language_model"]
        dtype = next(lm.parameters()).dtype
        with torch.inference_mode():
            image = enc(t["pixel_values/gradient"].to(dtype))
            self.assertEqual(image.dtype, dtype)
            row = greedy.prompt_embeds(lm, [380] * 6 + [2], image[0], 380)
            cache = greedy.alloc_cache(2, 4, 12, 1, 32, dtype)
            ids, steps = greedy.greedy(lm, cache, [row], 12)
        self.assertEqual(steps.dtype, torch.float32)
        diff = _util.max_abs(steps, t["gen_step_logits/greedy/gradient/empty"])
        self.assertLess(diff, 2.0)
        _util.record(f"{dtype} export: cached step logits (loose)", diff)


class Reproducible(unittest.TestCase):
    def test_same_bytes_from_clones_at_different_paths(self):
        """Two clones of the exporter at paths of different lengths, two output folders: the
        module files, weights and manifests are byte identical and name no absolute path."""
        root = _util.tempdir()
        outs = []
        for clone in ("a", os.path.join("much", "longer", "path", "to", "clone-b")):
            pkg = os.path.join(root, clone, "export")
            shutil.copytree(os.path.join(_util.EXPORT_DIR, "blip2_export"), os.path.join(pkg, "blip2_export"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            out = os.path.join(root, clone, "out-" + str(len(outs)))
            env = dict(os.environ, PYTHONPATH=pkg)
            p = subprocess.run([_util.PYTHON, "-m", "blip2_export", _util.CHECKPOINT, out], cwd=pkg, env=env,
                               capture_output=True, text=True, timeout=300)
            self.assertEqual(p.returncode, 0, p.stderr)
            outs.append(out)
        names = sorted(os.listdir(outs[0]))
        self.assertEqual(names, sorted(os.listdir(outs[1])))
        for name in names:
            with open(os.path.join(outs[0], name), "rb") as a, open(os.path.join(outs[1], name), "rb") as b:
                data = a.read()
                self.assertEqual(data, b.read(), name)
            for needle in (root.encode(), _util.REPO.encode(), os.path.dirname(torch.__file__).encode()):
                self.assertNotIn(needle, data, name)


if __name__ == "__main__":
    unittest.main()
