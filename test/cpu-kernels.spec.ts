import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { Blip2ForConditionalGeneration, Tensor, getNumThreads, setNumThreads, versions } from '../lib';
import { binding } from '../lib/native/binding';
import { ids, rowsOf } from './support/fixtures';
import { loadWithKernelMode } from './support/kernels';
import { smallModel } from './support/python';
import { referenceGreedy } from './support/reference';

/** Deterministic values in [-1, 1). */
function values(n: number, seed: number): Float32Array {
  let state = seed >>> 0 || 1;
  return Float32Array.from({ length: n }, () => ((state = (Math.imul(state, 1664525) + 1013904223) >>> 0) / 2147483648) - 1);
}

async function linear(x: Tensor, w: Tensor, b: Tensor | null, path: 'kernel' | 'onednn' | 'plain' | 'kernel-prefetch'): Promise<Float32Array> {
  const out = Tensor.fromNative(await binding.linearForTesting(Tensor.native(x, 'x'), Tensor.native(w, 'w'), b ? Tensor.native(b, 'b') : null, path));
  const f32 = out.dtype === 'float32' ? out : await out.to({ dtype: 'float32' });
  return (await f32.toArray()) as Float32Array;
}

/** Seeded x [rows, inn], w [out, inn], b [out] in `dtype`, and their values as rounded to it (float32 arrays). */
async function operands(dtype: 'float32' | 'bfloat16' | 'float16', rows: number, out: number, inn: number) {
  const x = await Tensor.from(values(rows * inn, 1 + rows), [rows, inn]).to({ dtype });
  const w = await Tensor.from(values(out * inn, 7 + out), [out, inn]).to({ dtype });
  const b = await Tensor.from(values(out, 3), [out]).to({ dtype });
  const [xr, wr, br] = await Promise.all([x, w, b].map(async (t) => (await (await t.to({ dtype: 'float32' })).toArray()) as Float32Array));
  return { x, w, b, xr, wr, br };
}

/** The exact (float64) output [r, o] of those rounded values, with or without the bias. */
function exact(xr: Float32Array, wr: Float32Array, br: Float32Array | null, inn: number, r: number, o: number): number {
  let e = br ? br[o] : 0;
  for (let k = 0; k < inn; k++) e += xr[r * inn + k] * wr[o * inn + k];
  return e;
}

describe('blip2::linear, the CPU matrix-product kernel (native/kernels/linear)', () => {
  it('the kernel with prefetch gives the same bits as without, 1 to 4 rows (it is chosen by timing alone)', async function () {
    if (versions.linearKernel === 'none') this.skip();
    for (const dtype of ['float32', 'bfloat16', 'float16'] as const) {
      for (const [out, inn] of [[64, 48], [37, 129], [1000, 768], [5, 3]]) {
        for (const rows of [1, 2, 3, 4, 5]) {
          const { x, w, b } = await operands(dtype, rows, out, inn);
          for (const bias of [b, null]) {
            const plain = await linear(x, w, bias, 'kernel');
            const prefetched = await linear(x, w, bias, 'kernel-prefetch');
            assert.deepEqual(Array.from(prefetched), Array.from(plain), `${dtype} ${rows}x${inn} by ${out}x${inn}`);
          }
        }
      }
    }
  });

  it('rejects an unknown path by name in the test binding', async () => {
    const { x, w } = await operands('float32', 1, 4, 4);
    await assert.rejects(async () => linear(x, w, null, 'fast' as never), /path.*fast.*'plain', 'kernel', 'onednn' or 'kernel-prefetch'/s);
  });

  it(`equals at::linear for float32, bfloat16 and float16 weights, 1 to 300 rows, sizes with vector tails (${versions.linearKernel})`, async function () {
    if (versions.linearKernel === 'none') this.skip();
    for (const dtype of ['float32', 'bfloat16', 'float16'] as const) {
      for (const [out, inn] of [[64, 48], [37, 129], [1000, 768], [40, 777], [5, 3]]) {
        for (const rows of [1, 2, 3, 4, 5, 8, 13, 16, 33, 64, 300]) {
          // The exact product of the values as rounded to `dtype`, in float64.
          const { x, w, b, xr, wr, br } = await operands(dtype, rows, out, inn);
          for (const bias of [b, null]) {
            const ours = await linear(x, w, bias, 'kernel');
            const ref = await linear(x, w, bias, 'plain');
            // Ours accumulates in float32 and rounds once to `dtype`: within one unit in the last
            // place of the exact value (plus float32 accumulation error). libtorch may accumulate
            // otherwise (oneDNN's bfloat16 GEMM is off by 2 ulp here), so against it allow 3.
            const ulp = dtype === 'float32' ? 0 : dtype === 'bfloat16' ? 2 ** -7 : 2 ** -10;
            const acc = 2e-5 * Math.sqrt(inn);
            let worstExact = 0;
            let worstRef = 0;
            for (let r = 0; r < rows; r++) {
              for (let o = 0; o < out; o++) {
                const e = exact(xr, wr, bias ? br : null, inn, r, o);
                const i = r * out + o;
                worstExact = Math.max(worstExact, Math.abs(ours[i] - e) / (acc + ulp * Math.abs(e)));
                worstRef = Math.max(worstRef, Math.abs(ours[i] - ref[i]) / (acc + 3 * ulp * Math.abs(e)));
              }
            }
            const what = `${dtype} [${rows}x${inn}]·[${out}x${inn}]ᵀ bias=${bias !== null}`;
            assert.ok(worstExact <= 1, `${what}: off the exact product by ${worstExact.toFixed(2)}x the tolerance`);
            assert.ok(worstRef <= 1, `${what}: off at::linear by ${worstRef.toFixed(2)}x the tolerance`);
          }
        }
      }
    }
  });

  it('oneDNN\'s product, the third path timed at load, is within the same tolerance of the exact product (float32, bfloat16; 1 to 300 rows)', async function () {
    if (!versions.onednnLinear) this.skip();
    for (const dtype of ['float32', 'bfloat16'] as const) {
      for (const [out, inn] of [[64, 48], [37, 129], [1000, 768]]) {
        for (const rows of [1, 3, 16, 33, 300]) {
          const { x, w, b, xr, wr, br } = await operands(dtype, rows, out, inn);
          for (const bias of [b, null]) {
            const got = await linear(x, w, bias, 'onednn');
            // float32: accumulation error only; bfloat16: one rounding to bfloat16 on top.
            const ulp = dtype === 'float32' ? 0 : 2 ** -7;
            const acc = 2e-5 * Math.sqrt(inn);
            let worst = 0;
            for (let r = 0; r < rows; r++) {
              for (let o = 0; o < out; o++) {
                const e = exact(xr, wr, bias ? br : null, inn, r, o);
                worst = Math.max(worst, Math.abs(got[r * out + o] - e) / (acc + ulp * Math.abs(e)));
              }
            }
            assert.ok(worst <= 1, `${dtype} [${rows}x${inn}]·[${out}x${inn}]ᵀ bias=${bias !== null}: off the exact product by ${worst.toFixed(2)}x the tolerance`);
          }
        }
      }
    }
  });

  it('gives the same bits on one thread as on two (two threads hand out output chunks as they get free)', async function () {
    if (versions.linearKernel === 'none') this.skip();
    const before = await getNumThreads();
    try {
      // 809 outputs: 50 blocks of 16 and a 9-row tail. 7 to 64 x rows take the dynamic split on
      // two threads; 1 to 4, 65 and 300 the even one.
      for (const [out, inn] of [[809, 768], [3072, 200]]) {
        const w = Tensor.from(values(out * inn, 11), [out, inn]);
        for (const rows of [1, 3, 4, 7, 16, 64, 65, 300]) {
          const x = Tensor.from(values(rows * inn, 5 + rows), [rows, inn]);
          await setNumThreads(1);
          const one = await linear(x, w, null, 'kernel');
          await setNumThreads(2);
          const two = await linear(x, w, null, 'kernel');
          assert.deepEqual(Buffer.from(two.buffer), Buffer.from(one.buffer), `[${rows}x${inn}]·[${out}x${inn}]ᵀ`);
        }
      }
    } finally {
      await setNumThreads(before);
    }
  });

  it('the AVX2 kernels (BLIP2_LINEAR_ISA=avx2, in a child process) pass the same comparisons (products and attention)', function () {
    if (versions.linearKernel !== 'avx512' || process.env.BLIP2_LINEAR_ISA) this.skip();
    this.timeout(600_000);
    const root = path.join(__dirname, '..');
    const result = spawnSync(path.join(root, 'node_modules', '.bin', 'mocha'),
      ['--no-config', '--require', 'tsx', '--timeout', '600000', path.join('test', 'cpu-kernels.spec.ts'), '--grep', 'equals at::linear|equal the exact product and at::matmul'],
      { cwd: root, encoding: 'utf8', env: { ...process.env, BLIP2_LINEAR_ISA: 'avx2' } });
    assert.equal(result.status, 0, result.stdout + result.stderr);
    assert.equal(result.stdout.match(/\(avx2\)/g)?.length, 2, result.stdout);
    assert.match(result.stdout, /2 passing/);
  });

  it('is chosen per weight shape by timing at load; greedy tokens equal the plain path and a forward()-only decoder', async () => {
    const modelDir = smallModel();
    const timed = await Blip2ForConditionalGeneration.fromPretrained(modelDir);
    const decisions = timed.linearKernels.map((d) => ({ ...d }));  // a copy: paths can change online
    if (versions.linearKernel !== 'none') {
      // Every matrix shape of both modules, at 1, 4, 16, 64 and 256 rows, was timed both ways.
      assert.ok(decisions.length >= 20, JSON.stringify(decisions));
      assert.deepEqual([...new Set(decisions.map((d) => d.rows))].sort((a, b) => a - b), [1, 4, 16, 64, 256]);
      // Each path that runs here was timed; the one taken is the fastest of them.
      for (const d of decisions) {
        const timedPaths = ([['plain', d.plainMs], ['kernel', d.kernelMs], ['onednn', d.onednnMs]] as const).filter(([, ms]) => ms > 0);
        assert.ok(d.plainMs > 0 && d.kernelMs > 0 && (d.onednnMs > 0 || !versions.onednnLinear), JSON.stringify(d));
        const fastest = timedPaths.reduce((a, b) => (b[1] < a[1] ? b : a));
        assert.equal(d.path, fastest[0], JSON.stringify(d));
      }
    }
    const forced = await loadWithKernelMode(modelDir, 'on');
    const onednn = await loadWithKernelMode(modelDir, 'onednn');
    const plain = await loadWithKernelMode(modelDir, 'off');
    assert.deepEqual(plain.linearKernels, []);
    if (versions.linearKernel !== 'none') assert.ok(forced.linearKernels.every((d) => d.path === 'kernel'));
    // float32 weights: oneDNN runs every product when forced.
    if (versions.onednnLinear) assert.ok(onednn.linearKernels.length > 0 && onednn.linearKernels.every((d) => d.path === 'onednn'));

    const pixels = Tensor.from(new Float32Array(3 * 56 * 56).map((_, i) => Math.sin(i * 0.37)), [1, 3, 56, 56]);
    const prompt = [...Array(8).fill(timed.manifest.image_token_index), 2, 40, 41, 42];
    const generate = async (model: Blip2ForConditionalGeneration) =>
      (await rowsOf(await model.generate({ pixelValues: pixels, inputIds: ids([prompt]) }, { maxNewTokens: 16, eosTokenId: [] })))[0];
    const reference = await referenceGreedy(plain, pixels, prompt, 16);
    for (const model of [timed, forced, onednn, plain]) assert.deepEqual((await generate(model)).slice(prompt.length), reference);
    // After decoding, only up-to-4-row products the kernel won may have moved to its prefetching
    // variant (compared on the decode calls); every other decision is as timed at load.
    timed.linearKernels.forEach((d, i) => {
      const atLoad = decisions[i];
      if (atLoad.path === 'kernel' && d.rows <= 4) assert.ok(d.path === 'kernel' || d.path === 'kernel-prefetch', JSON.stringify(d));
      else assert.equal(d.path, atLoad.path, JSON.stringify(d));
    });
    // Batched steps (2 rows) go through the 4-row kernel when forced.
    const two = Tensor.from(new Float32Array(2 * 3 * 56 * 56).map((_, i) => Math.sin((i % (3 * 56 * 56)) * 0.37)), [2, 3, 56, 56]);
    const rows = await rowsOf(await forced.generate({ pixelValues: two, inputIds: ids([prompt, prompt]) }, { maxNewTokens: 16, eosTokenId: [] }));
    assert.deepEqual(rows[0].slice(prompt.length), reference);
    assert.deepEqual(rows[1].slice(prompt.length), reference);
    for (const model of [timed, forced, onednn, plain]) model.dispose();
  });
});

async function attentionMatmul(a: Tensor, b: Tensor, transpose: boolean, positions: number, path: 'plain' | 'kernel'): Promise<Float32Array> {
  const out = Tensor.fromNative(await binding.attentionMatmulForTesting(Tensor.native(a, 'a'), Tensor.native(b, 'b'), transpose, positions, path));
  const f32 = out.dtype === 'float32' ? out : await out.to({ dtype: 'float32' });
  return (await f32.toArray()) as Float32Array;
}

describe('blip2::matmul, the CPU kernel for the cached attention\'s products (native/kernels/attention)', () => {
  /** a [...batch, 1, K] and a cache-like b [...batch, maxPositions, D] in `dtype`, with their rounded values. */
  async function cacheOperands(dtype: 'float32' | 'bfloat16' | 'float16', batch: number[], k: number, maxPositions: number, d: number) {
    const count = batch.reduce((x, y) => x * y, 1);
    const a = await Tensor.from(values(count * k, 3 + k), [...batch, 1, k]).to({ dtype });
    const b = await Tensor.from(values(count * maxPositions * d, 9 + d), [...batch, maxPositions, d]).to({ dtype });
    const [ar, br] = await Promise.all([a, b].map(async (t) => (await (await t.to({ dtype: 'float32' })).toArray()) as Float32Array));
    return { a, b, ar, br, count };
  }

  it(`scores (q·Kᵀ) and values (p·V) equal the exact product and at::matmul over strided cache views, float32/bfloat16/float16, head dims with vector tails (${versions.linearKernel})`, async function () {
    if (versions.linearKernel === 'none') this.skip();
    for (const dtype of ['float32', 'bfloat16', 'float16'] as const) {
      const ulp = dtype === 'float32' ? 0 : dtype === 'bfloat16' ? 2 ** -7 : 2 ** -10;
      for (const batch of [[1, 12], [16, 12], [3, 5], [7]]) {
        for (const headDim of [64, 80, 17, 8]) {
          for (const positions of [1, 7, 16, 45, 150]) {
            const maxPositions = positions + 13;
            for (const product of ['scores', 'values'] as const) {
              // scores: a = q [.., 1, D] times the first `positions` cached keys transposed;
              // values: a = p [.., 1, positions] times the first `positions` cached values.
              const k = product === 'scores' ? headDim : positions;
              const n = product === 'scores' ? positions : headDim;
              const { a, b, ar, br, count } = await cacheOperands(dtype, batch, k, maxPositions, headDim);
              const ours = await attentionMatmul(a, b, product === 'scores', positions, 'kernel');
              const ref = await attentionMatmul(a, b, product === 'scores', positions, 'plain');
              assert.equal(ours.length, count * n);
              const acc = 2e-5 * Math.sqrt(k);
              let worstExact = 0;
              let worstRef = 0;
              for (let i = 0; i < count; i++) {
                for (let j = 0; j < n; j++) {
                  let e = 0;
                  for (let t = 0; t < k; t++) {
                    const bv = product === 'scores' ? br[(i * maxPositions + j) * headDim + t] : br[(i * maxPositions + t) * headDim + j];
                    e += ar[i * k + t] * bv;
                  }
                  worstExact = Math.max(worstExact, Math.abs(ours[i * n + j] - e) / (acc + ulp * Math.abs(e)));
                  worstRef = Math.max(worstRef, Math.abs(ours[i * n + j] - ref[i * n + j]) / (acc + 3 * ulp * Math.abs(e)));
                }
              }
              const what = `${dtype} ${product} batch [${batch}] head dim ${headDim} positions ${positions}`;
              assert.ok(worstExact <= 1, `${what}: off the exact product by ${worstExact.toFixed(2)}x the tolerance`);
              assert.ok(worstRef <= 1, `${what}: off at::matmul by ${worstRef.toFixed(2)}x the tolerance`);
            }
          }
        }
      }
    }
  });

  it('gives each batch the same bits whatever the batch count and the threads (a sequence decodes the same batched or alone)', async function () {
    if (versions.linearKernel === 'none') this.skip();
    const before = await getNumThreads();
    try {
      for (const product of ['scores', 'values'] as const) {
        const headDim = 64;
        const positions = 45;
        const k = product === 'scores' ? headDim : positions;
        const { a, b } = await cacheOperands('float32', [16, 12], k, 64, headDim);
        const aAll = (await a.toArray()) as Float32Array;
        const bAll = (await b.toArray()) as Float32Array;
        await setNumThreads(2);
        const all = await attentionMatmul(a, b, product === 'scores', positions, 'kernel');
        await setNumThreads(1);
        const allOne = await attentionMatmul(a, b, product === 'scores', positions, 'kernel');
        assert.deepEqual(Buffer.from(allOne.buffer), Buffer.from(all.buffer), `${product}: one thread against two`);
        await setNumThreads(2);
        // Sequence 5 alone (its 12 heads).
        const a5 = Tensor.from(aAll.slice(5 * 12 * k, 6 * 12 * k), [1, 12, 1, k]);
        const b5 = Tensor.from(bAll.slice(5 * 12 * 64 * headDim, 6 * 12 * 64 * headDim), [1, 12, 64, headDim]);
        const alone = await attentionMatmul(a5, b5, product === 'scores', positions, 'kernel');
        const n = product === 'scores' ? positions : headDim;
        assert.deepEqual(Array.from(alone), Array.from(all.slice(5 * 12 * n, 6 * 12 * n)), `${product}: sequence 5 alone against batched`);
      }
    } finally {
      await setNumThreads(before);
    }
  });

  it('writes the cache as index_copy_ does (the same bits, float32/bfloat16/float16), and rejects an index out of bounds', async () => {
    const write = async (self: Tensor, index: Tensor, source: Tensor, path: 'plain' | 'kernel') =>
      Tensor.fromNative(await binding.cacheWriteForTesting(Tensor.native(self, 'self'), Tensor.native(index, 'index'), Tensor.native(source, 'source'), path));
    const bits = async (t: Tensor) => Buffer.from(((await t.toArray()) as Float32Array | Uint16Array).buffer);
    for (const dtype of ['float32', 'bfloat16', 'float16'] as const) {
      for (const [rows, width, n] of [[6144, 64, 192], [640, 80, 32], [50, 17, 7], [10, 1, 3]]) {
        const self = await Tensor.from(values(rows * width, 4), [rows, width]).to({ dtype });
        const source = await Tensor.from(values(n * width, 6 + n), [n, width]).to({ dtype });
        // Distinct, unordered rows (as the slots' positions are), the last one included.
        const index = Tensor.from(BigInt64Array.from({ length: n }, (_, i) => BigInt((i * 7919 + (i === 0 ? rows - 1 : 0)) % rows)), [n]);
        const ours = await write(self, index, source, 'kernel');
        const ref = await write(self, index, source, 'plain');
        assert.equal(ours.dtype, dtype);
        assert.deepEqual(await bits(ours), await bits(ref), `${dtype} [${rows}, ${width}] <- ${n} rows`);
      }
    }
    const self = Tensor.from(new Float32Array(4 * 8), [4, 8]);
    const source = Tensor.from(new Float32Array(2 * 8).fill(1), [2, 8]);
    await assert.rejects(write(self, Tensor.from(BigInt64Array.from([1n, 4n]), [2]), source, 'kernel'), /index 4 is out of bounds for dimension 0 with size 4/);
    await assert.rejects(write(self, Tensor.from(BigInt64Array.from([-1n, 0n]), [2]), source, 'kernel'), /index -1 is out of bounds/);
  });

  it('rejects what it does not apply to (the operator then calls at::matmul), and an unknown path in the test binding', async function () {
    if (versions.linearKernel === 'none') this.skip();
    const two = Tensor.from(values(2 * 2 * 8, 1), [2, 2, 8]);  // two query rows per batch
    const cache = Tensor.from(values(2 * 16 * 8, 2), [2, 16, 8]);
    await assert.rejects(attentionMatmul(two, cache, true, 2, 'kernel'), /does not apply/);
    assert.equal((await attentionMatmul(two, cache, true, 16, 'plain')).length, 2 * 2 * 16);
    await assert.rejects(attentionMatmul(two, cache, true, 2, 'fast' as never), /path.*fast.*'plain' or 'kernel'/s);
    await assert.rejects(attentionMatmul(two, cache, true, 17, 'plain'), /positions.*17/s);
  });

  it('is chosen at load per product by timing both on cache-shaped tensors; greedy tokens with it forced equal the plain path', async function () {
    const modelDir = smallModel();
    const timed = await Blip2ForConditionalGeneration.fromPretrained(modelDir);
    const decisions = timed.attentionKernels;
    assert.deepEqual(decisions.map((d) => d.product), ['scores', 'values', 'cache-write']);
    for (const d of decisions) {
      assert.equal(d.dtype, 'float32');
      assert.equal(d.headDim, timed.manifest.language_model.head_dim);
      if (versions.linearKernel === 'none') {
        assert.equal(d.path, 'plain');
        continue;
      }
      for (const rows of [1, 16] as const) assert.ok(d.plainMs[rows] > 0 && d.kernelMs[rows] > 0, JSON.stringify(d));
      const wins = d.kernelMs[1] <= d.plainMs[1] && d.kernelMs[16] <= d.plainMs[16];
      assert.equal(d.path, wins ? 'kernel' : 'plain', JSON.stringify(d));
    }
    const forced = await loadWithKernelMode(modelDir, 'on');
    const plain = await loadWithKernelMode(modelDir, 'off');
    assert.deepEqual(plain.attentionKernels, []);
    if (versions.linearKernel !== 'none') assert.ok(forced.attentionKernels.every((d) => d.path === 'kernel'), JSON.stringify(forced.attentionKernels));
    const pixels = Tensor.from(new Float32Array(3 * 56 * 56).map((_, i) => Math.cos(i * 0.21)), [1, 3, 56, 56]);
    const prompt = [...Array(8).fill(timed.manifest.image_token_index), 2, 40, 41, 42];
    const reference = await referenceGreedy(plain, pixels, prompt, 24);
    // Alone and as 3 rows of one call, whose decode steps attend 3 slots at once.
    const three = Tensor.from(new Float32Array(3 * 3 * 56 * 56).map((_, i) => Math.cos((i % (3 * 56 * 56)) * 0.21)), [3, 3, 56, 56]);
    for (const model of [forced, timed]) {
      const alone = (await rowsOf(await model.generate({ pixelValues: pixels, inputIds: ids([prompt]) }, { maxNewTokens: 24, eosTokenId: [] })))[0];
      assert.deepEqual(alone.slice(prompt.length), reference);
      const rows = await rowsOf(await model.generate({ pixelValues: three, inputIds: ids([prompt, prompt, prompt]) }, { maxNewTokens: 24, eosTokenId: [] }));
      for (const row of rows) assert.deepEqual(row.slice(prompt.length), reference);
    }
    for (const model of [timed, forced, plain]) await model.dispose();
  });
});
