"""Our safetensors reader/writer."""

import json
import os
import struct
import unittest

import torch

import _util
from blip2_export import safetensors_io as st


class SafetensorsIO(unittest.TestCase):
    def setUp(self):
        self.dir = _util.tempdir()

    def path(self, name):
        return os.path.join(self.dir, name)

    def test_roundtrip_all_dtypes(self):
        g = torch.Generator().manual_seed(0)
        tensors = {
            "f32": torch.randn(3, 4, generator=g),
            "f16": torch.randn(5, generator=g).half(),
            "bf16": torch.randn(2, 3, generator=g).bfloat16(),
            "f64": torch.randn(2, generator=g).double(),
            "i64": torch.arange(-3, 4, dtype=torch.int64),
            "i32": torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32),
            "i16": torch.tensor([-7, 7], dtype=torch.int16),
            "i8": torch.tensor([-128, 127], dtype=torch.int8),
            "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4),
            "noncontig": torch.randn(4, 6, generator=g).t(),
        }
        p = self.path("a.safetensors")
        st.save_file(tensors, p, metadata={"note": "x"})
        back = st.load_file(p)
        self.assertEqual(sorted(back), sorted(tensors))
        for k, v in tensors.items():
            self.assertEqual(back[k].dtype, v.dtype, k)
            self.assertEqual(tuple(back[k].shape), tuple(v.shape), k)
            self.assertTrue(torch.equal(back[k], v), k)
        header, meta, start = st.read_header(p)
        self.assertEqual(meta, {"format": "pt", "note": "x"})

    def test_header_layout(self):
        p = self.path("b.safetensors")
        st.save_file({"zz": torch.ones(3), "aa": torch.zeros(2, 2), "mm": torch.ones(1, dtype=torch.int64)}, p)
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            raw = f.read(n)
        self.assertEqual(n % 8, 0)
        self.assertTrue(raw.endswith(b"}") or raw.rstrip(b" ").endswith(b"}"))
        header = json.loads(raw)
        keys = list(header)
        self.assertEqual(keys[0], "__metadata__")
        self.assertEqual(header["__metadata__"], {"format": "pt"})
        self.assertEqual(keys[1:], ["aa", "mm", "zz"])
        self.assertEqual(header["aa"]["data_offsets"], [0, 16])
        self.assertEqual(header["mm"], {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]})
        self.assertEqual(os.path.getsize(p), 8 + n + 16 + 8 + 12)

    def test_fixture_rewrites_byte_identical(self):
        """HF's writer and ours produce the same bytes for the fixture checkpoint."""
        src = os.path.join(_util.CHECKPOINT, "model.safetensors")
        tensors = st.load_file(src)
        self.assertEqual(len(tensors), 123)
        out = self.path("c.safetensors")
        st.save_file(tensors, out)
        with open(src, "rb") as a, open(out, "rb") as b:
            self.assertEqual(a.read(), b.read())

    def test_corrupt_files(self):
        p = self.path("d.safetensors")
        st.save_file({"w": torch.ones(100)}, p)
        with open(p, "rb") as f:
            data = f.read()
        cases = {
            "truncated": data[:-10],
            "short": data[:5],
            "bad length": struct.pack("<Q", 10**12) + data[8:],
            "bad json": data[:8] + b"{" * (len(data) - 8),
        }
        for name, blob in cases.items():
            with open(p, "wb") as f:
                f.write(blob)
            with self.assertRaises(st.SafetensorsError, msg=name) as cm:
                st.load_file(p)
            self.assertIn(p, str(cm.exception))


if __name__ == "__main__":
    unittest.main()
