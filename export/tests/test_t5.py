"""Parity of the T5 / Flan-T5 language model (blip2_export.modeling_t5) with transformers'
T5ForConditionalGeneration (eager attention): encoder, uncached forward, greedy decoding over the slot
caches against HF's generate, the scripted + saved + reloaded module, bfloat16/float16 with `wo` in
float32, config parsing and the bounds checks.

Tiny random models built by transformers itself, weights perturbed so that attention, the relative
position buckets (log bins included) and the layer norms all matter. BLIP2_PRINT_DIFFS=1 prints the
measured max differences at exit.
"""

import copy
import io
import os
import sys
import unittest

import torch
import transformers
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.t5 import modeling_t5 as hf_t5

# Importable as `tests.test_t5` (python -m unittest tests.test_t5 from export/) and by discovery.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402
from blip2_export import modeling_t5  # noqa: E402
from blip2_export.errors import ExportError  # noqa: E402

COMMON = dict(dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# Flan-T5 / T5 v1.1 shape: gated-GELU, untied lm_head (no output scaling), more decoder than encoder
# layers, few buckets and a short max_distance so that sequences of ~10-20 reach the log bins.
FLAN = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=8,
            relative_attention_max_distance=12)
# T5 v1.0 shape: ReLU, tied lm_head with the d_model**-0.5 scaling, d_kv * heads != d_model, fewer
# decoder than encoder layers, HF's default buckets.
V10 = dict(vocab_size=80, d_model=24, d_kv=10, d_ff=48, num_layers=3, num_decoder_layers=2, num_heads=3,
           feed_forward_proj="relu", tie_word_embeddings=True)

START, EOS = 0, 1


def hf_model(kw, seed, gain=1.0):
    """A perturbed random HF T5ForConditionalGeneration (float32, eval, eager attention); gain scales
    the attention and feed-forward output projections (so that the layers, not the input embedding,
    decide the next token)."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**kw, **COMMON)
    model = transformers.T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        if kw["tie_word_embeddings"] is False:
            # HF 5.18 ties lm_head to shared at init whatever the config says; Flan-T5 checkpoints
            # carry their own lm_head, which from_pretrained then keeps untied.
            model.lm_head.weight = nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * 0.5)
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p) * 1.5)  # make positions matter
            else:
                p.add_(torch.randn_like(p) * 0.3 * p.std())
            if name.endswith((".o.weight", ".wo.weight")):
                p.mul_(gain)
    return model.eval()


def wo_modules(model):
    return [m for m in model.modules() if isinstance(m, (hf_t5.T5DenseActDense, hf_t5.T5DenseGatedActDense))]


def hf_half(model, dtype):
    """`model.to(dtype)` then each `wo` back to float32, as the brief asks of the bfloat16 check (and
    as transformers' from_pretrained does for float16)."""
    model = copy.deepcopy(model).to(dtype)
    for m in wo_modules(model):
        m.wo.float()
    return model


def scripted(model):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    buf.seek(0)
    return torch.jit.load(buf).eval()


def padded(rows, left):
    """Rows [T_i,D] -> (batch [B,T,D], attention_mask [B,T]) padded with zeros on the left or right."""
    t = max(r.size(0) for r in rows)
    batch = rows[0].new_zeros([len(rows), t, rows[0].size(1)])
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - r.size(0), t) if left else slice(0, r.size(0))
        batch[i, sl] = r
        mask[i, sl] = 1
    return batch, mask


def hf_generate(hf, batch, mask, max_new):
    """HF greedy ids per row (decoder start dropped, cut after EOS) and their raw step logits."""
    # A lazily grown cache: the one generate builds from the config has num_layers layers, not
    # num_decoder_layers (transformers 5.18 raises IndexError when the decoder has more).
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        out = hf.generate(inputs_embeds=batch, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                          decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=0, past_key_values=cache,
                          output_logits=True, return_dict_in_generate=True)
    ids, logits = [], []
    for i in range(batch.size(0)):
        row = out.sequences[i, 1:].tolist()
        if EOS in row:
            row = row[: row.index(EOS) + 1]
        ids.append(row)
        logits.append(torch.stack([out.logits[s][i] for s in range(len(row))]).float())
    return ids, logits


def alloc(cfg, slots, max_len, max_enc, dtype):
    """Self and cross caches pre-filled with garbage that masking must keep out: NaN keys, huge values."""
    shape = [cfg.num_decoder_layers, 2, slots, cfg.num_heads, max_len, cfg.d_kv]
    self_cache = torch.empty(shape, dtype=dtype)
    shape[4] = max_enc
    cross_cache = torch.empty(shape, dtype=dtype)
    for c in (self_cache, cross_cache):
        c[:, 0] = float("nan")
        c[:, 1] = 6e4 if dtype == torch.float16 else 1e30  # finite (0 * inf would be NaN)
    return self_cache, cross_cache


def slot_greedy(lm, cfg, enc_rows, enc_real, slots, starts, max_new, dtype=torch.float32, num_slots=6,
                max_len=24, max_enc=24, first_slot=-2):
    """Greedy decoding over the slot caches, the way the runtime runs it: row i's cross cache filled
    beforehand (enc_rows[i] [T_i,D] are its encoder states, enc_real[i] = (start, end) the real
    ones), then one
    decode call per step for all rows that are running; row i joins at step starts[i], so rows at
    different decoder positions (and with different encoder lengths) share a call. Returns ids per
    row (cut after EOS) and step logits [n_i,V] per row."""
    n = len(enc_rows)
    self_cache, cross_cache = alloc(cfg, num_slots, max_len, max_enc, dtype)
    for i in range(n):
        lm.fill_cross_cache(cross_cache, enc_rows[i][None], torch.tensor([slots[i]]))
    gen = [[] for _ in range(n)]
    logits = [[] for _ in range(n)]
    done = [False] * n
    step = 0
    while not all(done):
        active = [i for i in range(n) if starts[i] <= step and not done[i]]
        step += 1
        if not active:
            continue
        ids = torch.tensor([gen[i][-1] if gen[i] else START for i in active])
        positions = torch.tensor([len(gen[i]) for i in active])
        enc_len = max(enc_rows[i].size(0) for i in active)
        enc_mask = torch.zeros(len(active), enc_len, dtype=torch.long)
        for j, i in enumerate(active):
            lo, hi = enc_real[i]
            enc_mask[j, lo:hi] = 1
        kv_len = min(max_len, int(positions.max()) + 1 + step % 3)  # sometimes more than needed
        out = lm.decode(self_cache, cross_cache, ids, torch.tensor([slots[i] for i in active]), positions, kv_len,
                        enc_mask, first_slot)
        assert out.dtype == torch.float32 and tuple(out.shape) == (len(active), cfg.vocab_size)
        for j, i in enumerate(active):
            tok = int(out[j].argmax())
            gen[i].append(tok)
            logits[i].append(out[j])
            done[i] = tok == EOS or len(gen[i]) == max_new
    return gen, [torch.stack(x) for x in logits]


class _Parity:
    """One model shape (kw, seed, gain), one flavour of our module (eager or scripted + saved + loaded)."""

    kw = FLAN
    seed = 0
    gain = 1.0
    script = False

    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.hf = hf_model(cls.kw, cls.seed, cls.gain)
        cls.cfg = modeling_t5.T5Config.from_dict(cls.hf.config.to_dict())
        cls.eager = modeling_t5.from_state_dict(cls.cfg, cls.hf.state_dict())
        cls.lm = scripted(cls.eager) if cls.script else cls.eager
        g = torch.Generator().manual_seed(cls.seed + 100)
        d = cls.kw["d_model"]
        cls.rows = [torch.randn(t, d, generator=g) for t in (9, 4, 14, 7)]  # encoder inputs of 4 prompts
        cls.name = f"t5 {'flan' if cls.kw is FLAN else 'v1.0'} {'scripted' if cls.script else 'eager'}"

    def close(self, got, want, tol, what):
        d = _util.max_abs(got, want)
        _util.record(f"{self.name} {what}", d)
        self.assertLessEqual(d, tol, what)

    def test_state_dict_keys_equal_hf(self):
        self.assertEqual(set(self.eager.state_dict().keys()), set(self.hf.state_dict().keys()))

    def test_encode_padded_batch(self):
        with torch.no_grad():
            for left in (False, True):
                batch, mask = padded(self.rows, left)
                want = self.hf.encoder(inputs_embeds=batch, attention_mask=mask).last_hidden_state
                got = self.lm.encode(batch, mask)
                self.close(got, want, 1e-5, "encode vs HF encoder")
                # padding changes nothing for the real tokens (relative positions, masked keys)
                for i, r in enumerate(self.rows):
                    alone = self.lm.encode(r[None], torch.ones(1, r.size(0), dtype=torch.long))[0]
                    sl = slice(batch.size(1) - r.size(0), None) if left else slice(0, r.size(0))
                    self.close(got[i, sl], alone, 1e-5, "encode padded vs alone")

    def test_forward_full(self):
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for left in (False, True):
                batch, mask = padded(self.rows, left)
                dec = torch.randint(0, self.cfg.vocab_size, (batch.size(0), 13), generator=g)
                dec[:, 0] = START
                want = self.hf(inputs_embeds=batch, attention_mask=mask, decoder_input_ids=dec).logits
                got = self.lm.forward_full(batch, mask, dec)
                self.assertEqual(got.dtype, torch.float32)
                self.close(got, want, 1e-4, "forward_full vs HF")
                self.close(self.lm(batch, mask, dec), got, 0.0, "forward vs forward_full")

    def _check_greedy(self, got_ids, got_logits, want_ids, want_logits, what, tol=1e-4):
        self.assertEqual(got_ids, want_ids, what)
        for g_, w_ in zip(got_logits, want_logits):
            self.close(g_, w_, tol, what + " step logits")
        # the test means something only if the rows differ and some decode past a few steps
        self.assertGreater(len({tuple(r) for r in want_ids}), 1)
        self.assertGreater(max(len(r) for r in want_ids), 4)

    def test_greedy_rows_encoded_alone(self):
        """Each row encoded unpadded (different encoder lengths E_i in one decode call), scattered
        slots, rows joining at different steps; vs HF generate on the right- and left-padded batch."""
        max_new = 12
        with torch.no_grad():
            enc = [self.lm.encode(r[None], torch.ones(1, r.size(0), dtype=torch.long))[0] for r in self.rows]
            ids, logits = slot_greedy(self.lm, self.cfg, enc, [(0, r.size(0)) for r in self.rows],
                                      slots=[4, 0, 5, 2], starts=[0, 2, 1, 3], max_new=max_new)
            for left in (False, True):
                want_ids, want_logits = hf_generate(self.hf, *padded(self.rows, left), max_new)
                self._check_greedy(ids, logits, want_ids, want_logits, "greedy (rows alone)")

    def test_greedy_padded_batch_encoded_once(self):
        """One encode of the left-padded batch, one fill_cross_cache for all rows (pads in the cross
        cache, masked by encoder_mask), consecutive slots (view path)."""
        max_new = 12
        with torch.no_grad():
            batch, mask = padded(self.rows, left=True)
            enc = self.lm.encode(batch, mask)
            self_cache, cross_cache = alloc(self.cfg, 6, 24, 24, torch.float32)
            n = self.lm.fill_cross_cache(cross_cache, enc, torch.tensor([1, 2, 3, 4]))
            self.assertEqual((n.dim(), int(n)), (0, 4))
            ids, logits = self._greedy_prefilled(self_cache, cross_cache, mask, max_new)
            want_ids, want_logits = hf_generate(self.hf, batch, mask, max_new)
            self._check_greedy(ids, logits, want_ids, want_logits, "greedy (padded batch)")

    def _greedy_prefilled(self, self_cache, cross_cache, mask, max_new):
        """All rows in lockstep at slots 1..4 (consecutive: first_slot given, detected, and -1 must agree)."""
        n = mask.size(0)
        slots = torch.arange(1, n + 1)
        gen = [[] for _ in range(n)]
        logits = [[] for _ in range(n)]
        token = torch.full([n], START, dtype=torch.long)
        for s in range(max_new):
            positions = torch.full([n], s, dtype=torch.long)
            outs = [self.lm.decode(c, cross_cache, token, slots, positions, s + 1, mask, fs)
                    for c, fs in ((self_cache.clone(), -1), (self_cache.clone(), -2), (self_cache, 1))]
            self.close(outs[0], outs[2], 1e-6, "gather vs view slots")
            self.close(outs[1], outs[2], 0.0, "detected vs given first_slot")
            out = outs[2]
            token = out.argmax(-1)
            for i in range(n):
                if gen[i] and gen[i][-1] == EOS:
                    continue
                gen[i].append(int(token[i]))
                logits[i].append(out[i])
        return gen, [torch.stack(x) for x in logits]

    def test_out_of_bounds_raises_and_writes_nothing(self):
        with torch.no_grad():
            self_cache, cross_cache = alloc(self.cfg, 3, 8, 16, torch.float32)
            enc = self.lm.encode(self.rows[0][None], torch.ones(1, 9, dtype=torch.long))
            self.lm.fill_cross_cache(cross_cache, enc, torch.tensor([1]))
            before = (self_cache.clone(), cross_cache.clone())
            ids, mask = torch.tensor([START]), torch.ones(1, 9, dtype=torch.long)

            def unchanged():
                self.assertTrue(torch.equal(self_cache.isnan(), before[0].isnan()))
                self.assertTrue(torch.equal(self_cache.nan_to_num(), before[0].nan_to_num()))
                self.assertTrue(torch.equal(cross_cache.nan_to_num(), before[1].nan_to_num()))

            bad = [  # (slots, positions, kv_len)
                ([1], [8], 8),    # position == max_length: would write into the next head / slot
                ([1], [-1], 8),   # negative position: would write into the previous one
                ([1], [5], 5),    # position >= kv_len: the token would not see itself
                ([3], [0], 1),    # slot == number of slots
                ([-1], [0], 1),   # negative slot
            ]
            for slots, positions, kv_len in bad:
                with self.assertRaises(Exception, msg=f"slots {slots} positions {positions} kv_len {kv_len}"):
                    self.lm.decode(self_cache, cross_cache, ids, torch.tensor(slots), torch.tensor(positions),
                                   kv_len, mask)
                unchanged()
            with self.assertRaises(Exception):  # kv_len > max_length
                self.lm.decode(self_cache, cross_cache, ids, torch.tensor([1]), torch.tensor([0]), 9, mask)
            with self.assertRaises(Exception):  # E > cross max length
                self.lm.decode(self_cache, cross_cache, ids, torch.tensor([1]), torch.tensor([0]), 1,
                               torch.ones(1, 17, dtype=torch.long))
            with self.assertRaises(Exception):  # slot out of range in fill_cross_cache
                self.lm.fill_cross_cache(cross_cache, enc, torch.tensor([3]))
            with self.assertRaises(Exception):  # encoder longer than the cross cache
                self.lm.fill_cross_cache(cross_cache, torch.zeros(1, 17, self.cfg.d_model), torch.tensor([0]))
            unchanged()
            # a good call after the failed ones works and touches only its own slot
            self.lm.decode(self_cache, cross_cache, ids, torch.tensor([1]), torch.tensor([7]), 8, mask)
            self.assertTrue(torch.equal(self_cache[:, :, [0, 2]].nan_to_num(), before[0][:, :, [0, 2]].nan_to_num()))
            self.assertFalse(torch.equal(self_cache[:, :, 1].nan_to_num(), before[0][:, :, 1].nan_to_num()))


class FlanEager(_Parity, unittest.TestCase):
    kw, seed, script = FLAN, 0, False


class _ScriptedEqualsEager:
    def test_scripted_equals_eager(self):
        with torch.no_grad():
            batch, mask = padded(self.rows, left=True)
            dec = torch.tensor([[START, 5, 9, 3, 40, 2]] * batch.size(0))
            self.close(self.lm.forward_full(batch, mask, dec), self.eager.forward_full(batch, mask, dec), 1e-6,
                       "scripted vs eager forward_full")
            self.close(self.lm.encode(batch, mask), self.eager.encode(batch, mask), 1e-6, "scripted vs eager encode")
            self.close(self.lm.embed_tokens(dec), self.eager.embed_tokens(dec), 0.0, "scripted vs eager embed")
            enc = [self.eager.encode(r[None], torch.ones(1, r.size(0), dtype=torch.long))[0] for r in self.rows]
            args = dict(enc_rows=enc, enc_real=[(0, r.size(0)) for r in self.rows], slots=[4, 0, 5, 2],
                        starts=[0, 2, 1, 3], max_new=10)
            ids_s, logits_s = slot_greedy(self.lm, self.cfg, **args)
            ids_e, logits_e = slot_greedy(self.eager, self.cfg, **args)
            self.assertEqual(ids_s, ids_e)
            for a, b in zip(logits_s, logits_e):
                self.close(a, b, 1e-6, "scripted vs eager decode")


class FlanScripted(_ScriptedEqualsEager, _Parity, unittest.TestCase):
    kw, seed, script = FLAN, 0, True


class V10Eager(_Parity, unittest.TestCase):
    kw, seed, gain, script = V10, 2, 5.0, False  # one row ends with EOS after 3 tokens

    def test_lm_head_tied_and_scaled(self):
        self.assertTrue(self.cfg.scale_decoder_outputs)
        self.assertIs(self.eager.lm_head.weight, self.eager.shared.weight)


class V10Scripted(_ScriptedEqualsEager, _Parity, unittest.TestCase):
    kw, seed, gain, script = V10, 2, 5.0, True


class HalfPrecision(unittest.TestCase):
    """Half-precision models with `wo` in float32 (and float16 with wo in float16), compared with HF
    converted the same way: same weights, same casts."""

    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.hf32 = hf_model(FLAN, 0)
        cls.cfg = modeling_t5.T5Config.from_dict(cls.hf32.config.to_dict())
        g = torch.Generator().manual_seed(100)
        cls.rows = [torch.randn(t, FLAN["d_model"], generator=g) for t in (9, 4, 14, 7)]

    def _run(self, dtype, wo_float32, tol_logits, script=False, max_new=10):
        name = f"t5 flan {str(dtype)[6:]} wo {'fp32' if wo_float32 else 'half'}{' scripted' if script else ''}"
        hf = hf_half(self.hf32, dtype) if wo_float32 else copy.deepcopy(self.hf32).to(dtype)
        wo_dtype = torch.float32 if wo_float32 else dtype
        lm = modeling_t5.from_state_dict(self.cfg, hf.state_dict(), dtype=dtype, wo_dtype=wo_dtype)
        for m in lm.modules():
            if isinstance(m, (modeling_t5.T5DenseActDense, modeling_t5.T5DenseGatedActDense)):
                self.assertEqual(m.wo.weight.dtype, wo_dtype)
        self.assertEqual(lm.shared.weight.dtype, dtype)
        if script:
            lm = scripted(lm)
        rows = [r.to(dtype) for r in self.rows]
        with torch.no_grad():
            batch, mask = padded(rows, left=False)
            enc_hf = hf.encoder(inputs_embeds=batch, attention_mask=mask).last_hidden_state
            enc = lm.encode(batch, mask)
            self.assertEqual(enc.dtype, dtype)
            d_enc = _util.max_abs(enc, enc_hf)
            dec = torch.tensor([[START, 5, 9, 3, 40, 2, 17, 60]] * batch.size(0))
            want = hf(inputs_embeds=batch, attention_mask=mask, decoder_input_ids=dec).logits.float()
            got = lm.forward_full(batch, mask, dec)
            d_full = _util.max_abs(got, want)
            _util.record(f"{name} encode vs HF", d_enc)
            _util.record(f"{name} forward_full vs HF", d_full)
            self.assertLessEqual(d_enc, 0.0, "same ops in the same dtypes: bitwise equal")
            self.assertLessEqual(d_full, 0.0, "same ops in the same dtypes: bitwise equal")
            want_ids, want_logits = hf_generate(hf, batch, mask, max_new)
            enc_rows = [lm.encode(r[None], torch.ones(1, r.size(0), dtype=torch.long))[0] for r in rows]
            ids, logits = slot_greedy(lm, self.cfg, enc_rows, [(0, r.size(0)) for r in rows], slots=[4, 0, 5, 2],
                                      starts=[0, 2, 1, 3], max_new=max_new, dtype=dtype)
            self.assertEqual(ids, want_ids)
            d_step = max(_util.max_abs(a, b) for a, b in zip(logits, want_logits))
            scale = max(w.abs().max().item() for w in want_logits)
            _util.record(f"{name} greedy step logits vs HF", d_step)
            self.assertLessEqual(d_step, tol_logits * scale, f"{name}: step logits {d_step} (max |logit| {scale})")

    def test_bfloat16_wo_float32(self):
        # Our decode reads a longer, masked cache than HF's generate (other reduction lengths, other
        # matmul shapes): allowed 1e-2 of the largest logit (about 2.5 bfloat16 ulps); measured 0 on CPU.
        self._run(torch.bfloat16, True, 1e-2)

    def test_bfloat16_wo_float32_scripted(self):
        self._run(torch.bfloat16, True, 1e-2, script=True)

    def test_float16_wo_float32(self):
        # What transformers' from_pretrained(dtype=float16) gives (_keep_in_fp32_modules = ["wo"]);
        # allowed 2e-3 of the largest logit (about 2 float16 ulps); measured 0 on CPU.
        self._run(torch.float16, True, 2e-3)

    def test_float16(self):
        self._run(torch.float16, False, 2e-3)

    def test_float16_clamp(self):
        """Hidden states past float16's range: HF clamps them after each sub-layer; so do we."""
        hf = copy.deepcopy(self.hf32).half()
        with torch.no_grad():  # attention outputs large enough to push a residual at the float16 max to inf
            hf.encoder.block[0].layer[0].SelfAttention.o.weight.mul_(30)
        lm = modeling_t5.from_state_dict(self.cfg, hf.state_dict(), dtype=torch.float16, wo_dtype=torch.float16)
        with torch.no_grad():
            x = torch.randn(2, 6, FLAN["d_model"]) * 3e4
            x[..., :8] = 65504.0 * torch.sign(x[..., :8])  # at float16's max: the attention residual overflows
            x = x.clamp(-65504, 65504).half()
            mask = torch.ones(2, 6, dtype=torch.long)
            want = hf.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state
            block_out = hf.encoder.block[0].layer[0](x, attention_mask=None)[0]
            self.assertTrue(torch.isinf(block_out).any(), "the test input must overflow float16")
            got = lm.encode(x, mask)
            self.assertTrue(torch.isfinite(want).all())
            self.assertEqual(_util.max_abs(got, want), 0.0)


class Config(unittest.TestCase):
    # google/flan-t5-xl's config.json (as the BLIP-2 Flan-T5 text_config), written by transformers 4.x
    FLAN_T5_XL = {
        "architectures": ["T5ForConditionalGeneration"], "d_ff": 5120, "d_kv": 64, "d_model": 2048,
        "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
        "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
        "num_decoder_layers": 24, "num_heads": 32, "num_layers": 24, "output_past": True, "pad_token_id": 0,
        "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False, "vocab_size": 32128,
    }

    def _same_as_hf(self, d):
        ours = modeling_t5.T5Config.from_dict(d)
        hf = transformers.T5Config.from_dict(d)
        for f in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                  "feed_forward_proj", "dense_act_fn", "is_gated_act", "scale_decoder_outputs", "pad_token_id",
                  "eos_token_id"):
            self.assertEqual(getattr(ours, f), getattr(hf, f), f"{f} of {d}")
        self.assertEqual(ours.decoder_start_token_id, getattr(hf, "decoder_start_token_id", None))
        return ours

    def test_parsing_matches_transformers(self):
        c = self._same_as_hf(self.FLAN_T5_XL)
        self.assertEqual((c.dense_act_fn, c.is_gated_act, c.scale_decoder_outputs, c.head_dim), ("gelu_new", True, False, 64))
        self._same_as_hf({})  # HF's defaults: t5-small shape, relu, scaled
        self._same_as_hf({"num_layers": 3, "num_decoder_layers": None})
        self._same_as_hf({"feed_forward_proj": "gated-silu", "tie_word_embeddings": True})
        self._same_as_hf({"feed_forward_proj": "gelu"})
        self._same_as_hf({"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_pytorch_tanh"})  # HF: given wins
        self._same_as_hf({"tie_word_embeddings": False, "scale_decoder_outputs": True})
        self._same_as_hf(transformers.T5Config(tie_word_embeddings=False).to_dict())  # HF 5.18's own output

    def test_unsupported_configs_name_the_field(self):
        for d, field in (({"feed_forward_proj": "gated-gelu-fast"}, "feed_forward_proj"),
                         ({"feed_forward_proj": "double-gelu"}, "feed_forward_proj"),
                         ({"feed_forward_proj": "gated-mish"}, "dense_act_fn"),
                         ({"model_type": "umt5"}, "model_type"),
                         ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets"),
                         ({"num_heads": 0}, "num_heads")):
            with self.assertRaises(ExportError, msg=str(d)) as cm:
                modeling_t5.T5Config.from_dict(d)
            self.assertIn(field, str(cm.exception))


class StateDict(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(1)
        cls.hf = {"flan": hf_model(FLAN, 0), "v10": hf_model(V10, 2, 5.0)}

    def _inputs(self, d):
        g = torch.Generator().manual_seed(3)
        return torch.randn(2, 5, d, generator=g), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), \
            torch.tensor([[START, 4, 8], [START, 7, 7]])

    def test_checkpoint_without_tied_keys(self):
        """A checkpoint as saved (tied copies left out, HF's ignored EncDecAttention bias present)."""
        for name, hf in self.hf.items():
            sd = dict(hf.state_dict())
            for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
                del sd[k]
            if name == "v10":
                del sd["lm_head.weight"]
            sd[modeling_t5.UNUSED_KEYS[0]] = torch.zeros(FLAN["relative_attention_num_buckets"], 1)
            cfg = modeling_t5.T5Config.from_dict(hf.config.to_dict())
            lm = modeling_t5.from_state_dict(cfg, sd)
            self.assertEqual(lm.lm_head.weight is lm.shared.weight, name == "v10")
            x, mask, dec = self._inputs(cfg.d_model)
            with torch.no_grad():
                self.assertEqual(_util.max_abs(lm.forward_full(x, mask, dec),
                                               hf(inputs_embeds=x, attention_mask=mask, decoder_input_ids=dec).logits), 0.0)
            # only shared.weight: the encoder/decoder embeddings and (absent) lm_head follow it
            self.assertIs(modeling_t5.prepare_state_dict(sd)["decoder.embed_tokens.weight"], sd["shared.weight"])

    def test_bad_state_dicts(self):
        hf = self.hf["flan"]
        cfg = modeling_t5.T5Config.from_dict(hf.config.to_dict())
        sd = dict(hf.state_dict())
        sd["decoder.embed_tokens.weight"] = sd["shared.weight"] + 1
        with self.assertRaises(ExportError):
            modeling_t5.from_state_dict(cfg, sd)
        sd = {k: v for k, v in hf.state_dict().items() if "embed_tokens" not in k and k != "shared.weight"}
        lm = modeling_t5.from_state_dict(cfg, sd)  # shared recovered from lm_head, as HF's symmetric tying does
        self.assertTrue(torch.equal(lm.shared.weight, hf.lm_head.weight))
        sd = dict(hf.state_dict())
        del sd["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
        with self.assertRaises(ExportError):
            modeling_t5.from_state_dict(cfg, sd)
        with self.assertRaises(ExportError):  # config and checkpoint disagree
            modeling_t5.from_state_dict(modeling_t5.T5Config.from_dict(dict(hf.config.to_dict(), d_ff=80)),
                                        hf.state_dict())


if __name__ == "__main__":
    unittest.main()
