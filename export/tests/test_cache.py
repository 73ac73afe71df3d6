"""Semantics of forward_cached / decode / step over the slot cache, for the eager and the scripted LM."""

import unittest

import torch

import _util
from blip2_export import greedy


class _Cache:
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.lm = cls.module()
        t = _util.eager_model().config.text
        cls.dims = (t.num_hidden_layers, t.num_attention_heads, t.head_dim)
        g = torch.Generator().manual_seed(5)
        cls.embeds = torch.randn(3, 11, t.word_embed_proj_dim, generator=g)  # 3 sequences of 11 tokens

    def cache(self, slots=4, max_len=24):
        return greedy.alloc_cache(*self.dims, slots, max_len)

    def full(self, i, n):
        """forward_full logits of the first n tokens of sequence i [n,V]."""
        e = self.embeds[i : i + 1, :n]
        return self.lm.forward_full(e, torch.ones(1, n, dtype=torch.long))[0]

    def close(self, a, b, tol=1e-5):
        """Equal up to float32 reordering: tol relative to the largest logit."""
        d = _util.max_abs(a, b)
        self.assertLessEqual(d, tol * max(1.0, b.abs().max().item()))

    def test_chunked_prefill_matches_full_forward(self):
        with torch.inference_mode():
            cache = self.cache()
            s = torch.tensor([1])
            a = self.lm.forward_cached(cache, self.embeds[0:1, :4], s, torch.tensor([0]), 4)
            b = self.lm.forward_cached(cache, self.embeds[0:1, 4:11], s, torch.tensor([4]), 11)
            self.assertEqual(tuple(a.shape), (1, 4, 392))
            self.assertEqual(a.dtype, torch.float32)
            self.close(torch.cat([a[0], b[0]]), self.full(0, 11))

    def test_mixed_rows_slots_and_starts(self):
        """Rows at different positions and slots in one call; kv_len larger than needed; logit_index."""
        with torch.inference_mode():
            cache = self.cache()
            for i, (slot, n) in enumerate([(3, 5), (0, 8), (2, 2)]):
                self.lm.forward_cached(cache, self.embeds[i : i + 1, :n], torch.tensor([slot]), torch.tensor([0]), n)
            before_slot1 = cache[:, :, 1].clone()
            # next 3 tokens of each row, at their own positions
            starts = torch.tensor([5, 8, 2])
            chunk = torch.stack([self.embeds[i, s : s + 3] for i, s in enumerate(starts.tolist())])
            out = self.lm.forward_cached(cache, chunk, torch.tensor([3, 0, 2]), starts, 20)
            last = self.lm.forward_cached(cache.clone(), chunk, torch.tensor([3, 0, 2]), starts, 11,
                                          torch.tensor([2, 0, 1]))
            self.assertTrue(torch.equal(cache[:, :, 1], before_slot1), "untouched slot changed")
            for i, s in enumerate(starts.tolist()):
                self.close(out[i], self.full(i, s + 3)[s:])
            self.assertEqual(tuple(last.shape), (3, 392))
            for i, j in enumerate([2, 0, 1]):
                self.close(last[i], out[i, j])

    def test_decode_matches_full_forward(self):
        with torch.inference_mode():
            cache = self.cache()
            ids = torch.tensor([[5, 17, 301, 2, 99, 42]])
            emb = self.lm.embed_tokens(ids)
            self.lm.forward_cached(cache, emb[:, :5], torch.tensor([2]), torch.tensor([0]), 5)
            step = self.lm.decode(cache, ids[:, 5], torch.tensor([2]), torch.tensor([5]), 6)
            full = self.lm.forward_full(emb, torch.ones(1, 6, dtype=torch.long))
            self.assertEqual(tuple(step.shape), (1, 392))
            self.close(step[0], full[0, 5])

    def test_step_is_decode_and_prefill_in_one_call(self):
        """step = decode of slots 0..N-1 + forward_cached of prompt rows in other slots (logit_index):
        the same logits and the same cache as the two calls, with consecutive and scattered prompt slots."""
        with torch.inference_mode():
            ids = torch.tensor([7, 300])
            for prompt_slots in ([2, 3], [3, 2]):
                caches = []
                for _ in range(2):
                    cache = self.cache()
                    for slot in (0, 1):
                        self.lm.forward_cached(cache, self.embeds[slot : slot + 1, :5], torch.tensor([slot]), torch.tensor([0]), 5)
                    caches.append(cache)
                slots = torch.tensor(prompt_slots)
                # The prompt rows' second chunk (positions 3..8 of rows with 3 and 0 tokens in).
                for cache in caches:
                    self.lm.forward_cached(cache, self.embeds[1:3, :3], slots, torch.tensor([0, 0]), 3)
                chunk = torch.stack([self.embeds[1, 3:9], self.embeds[2, 3:9]])
                start, last = torch.tensor([3, 3]), torch.tensor([5, 2])
                dec = self.lm.decode(caches[0], ids, torch.tensor([0, 1]), torch.tensor([5, 5]), 6, 0)
                pre = self.lm.forward_cached(caches[0], chunk, slots, start, 9, last)
                both = self.lm.step(caches[1], ids, torch.tensor([0, 1]), torch.tensor([5, 5]), 6, 0,
                                    chunk, slots, start, 9, last)
                self.assertEqual(tuple(both.shape), (4, 392))
                # One projection over all rows instead of two: only float32 reordering apart.
                self.close(both[:2], dec)
                self.close(both[2:], pre)
                self.close(caches[1], caches[0])
                # And the prompt's logits are the full forward's.
                self.close(both[2], self.full(1, 9)[8])

    def test_consecutive_and_scattered_slots_agree(self):
        """Consecutive slots are read through a view, others gathered: same logits either way."""
        with torch.inference_mode():
            outs = []
            for slots in ([0, 1], [2, 3], [3, 1], [1, 0]):
                cache = self.cache()
                s = torch.tensor(slots)
                a = self.lm.forward_cached(cache, self.embeds[:2, :7], s, torch.tensor([0, 0]), 7)
                b = self.lm.forward_cached(cache, self.embeds[:2, 7:9], s, torch.tensor([7, 5]), 9)
                outs.append(torch.cat([a, b], dim=1))
            for o in outs[1:]:
                self.close(o, outs[0], 1e-6)

    def test_garbage_past_length_is_harmless(self):
        """NaN/inf in keys and huge finite values beyond a row's length never reach the output."""
        with torch.inference_mode():
            clean = self.cache()
            ref = self.lm.forward_cached(clean, self.embeds[0:1, :6], torch.tensor([0]), torch.tensor([0]), 24)
            dirty = self.cache()
            dirty[:, 0].fill_(float("nan"))
            dirty[:, 0, :, :, 10:].fill_(float("inf"))
            dirty[:, 1].fill_(1e30)
            got = self.lm.forward_cached(dirty, self.embeds[0:1, :6], torch.tensor([0]), torch.tensor([0]), 24)
            self.assertTrue(torch.isfinite(got).all())
            self.close(got, ref, 1e-6)

    def test_bad_arguments(self):
        with torch.inference_mode():
            cache = self.cache(max_len=8)
            e = self.embeds[0:1, :4]
            with self.assertRaises(Exception):
                self.lm.forward_cached(cache, e, torch.tensor([0]), torch.tensor([0]), 9)  # kv_len > max_length
            with self.assertRaises(Exception):
                self.lm.forward_cached(cache[:, :, :, :2], e, torch.tensor([0]), torch.tensor([0]), 4)


class EagerCache(_Cache, unittest.TestCase):
    @classmethod
    def module(cls):
        return _util.eager_model().language_model


class ScriptedCache(_Cache, unittest.TestCase):
    @classmethod
    def module(cls):
        return _util.exported()[3]


if __name__ == "__main__":
    unittest.main()
