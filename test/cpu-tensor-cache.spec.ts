import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { Tensor, stats } from '../lib';
import { binding } from '../lib/native/binding';

/** x·wᵀ through at::linear on the CPU executor: a [rows, n] float32 result (rows·n·4 bytes). */
async function product(rows: number, n: number, seed: number): Promise<Float32Array> {
  const x = Tensor.from(Float32Array.from({ length: rows * 64 }, (_, i) => Math.sin(i * 0.01 + seed)), [rows, 64]);
  const w = Tensor.from(Float32Array.from({ length: n * 64 }, (_, i) => Math.cos(i * 0.003)), [n, 64]);
  const out = Tensor.fromNative(await binding.linearForTesting(Tensor.native(x, 'x'), Tensor.native(w, 'w'), null, 'plain'));
  const values = (await out.toArray()) as Float32Array;
  x.dispose();
  w.dispose();
  out.dispose();
  return values;
}

async function until(what: string, test: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!test()) {
    if (Date.now() > end) assert.fail(`${what} within ${ms} ms: ${JSON.stringify(stats().cpuTensorCache)}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

describe('the CPU tensor cache (libtorch CPU allocator, native/core/cpu_tensor_cache)', () => {
  it('is installed, and a freed large block serves the next tensor of its size', async () => {
    const before = stats().cpuTensorCache;
    assert.equal(before.installed, true);
    // 1,024 x 512 float32 = 2 MB results, computed five times: one block mapped, then reused.
    const first = await product(1024, 512, 1);
    for (let i = 0; i < 4; i++) assert.deepEqual(await product(1024, 512, 1), first);
    const after = stats().cpuTensorCache;
    assert.ok(after.reuses - before.reuses >= 4, `reuses ${before.reuses} -> ${after.reuses}`);
    assert.ok(after.maps - before.maps <= 3, `maps ${before.maps} -> ${after.maps}`);
    assert.ok(after.mappedBytes >= after.idleBytes && after.idleBytes >= 1024 * 512 * 4, JSON.stringify(after));
  });

  it('gives its idle blocks back to the kernel after a second without CPU work', async function () {
    this.timeout(10_000);
    await product(1024, 512, 2);
    assert.ok(stats().cpuTensorCache.idleBytes > 0);
    await until('idle blocks released', () => stats().cpuTensorCache.idleBytes === 0, 5_000);
    // The blocks held by live tensors stay mapped; a later allocation maps afresh and works.
    const maps = stats().cpuTensorCache.maps;
    assert.deepEqual(await product(1024, 512, 2), await product(1024, 512, 2));
    assert.ok(stats().cpuTensorCache.maps > maps);
  });

  it('BLIP2_CPU_TENSOR_CACHE=off (in a child process) keeps libtorch\'s allocator, with the same results', async function () {
    this.timeout(60_000);
    const ours = await product(700, 300, 3);
    const script = `
      const { Tensor, stats } = require('./lib');
      const { binding } = require('./lib/native/binding');
      (async () => {
        const x = Tensor.from(Float32Array.from({ length: 700 * 64 }, (_, i) => Math.sin(i * 0.01 + 3)), [700, 64]);
        const w = Tensor.from(Float32Array.from({ length: 300 * 64 }, (_, i) => Math.cos(i * 0.003)), [300, 64]);
        const out = Tensor.fromNative(await binding.linearForTesting(Tensor.native(x, 'x'), Tensor.native(w, 'w'), null, 'plain'));
        const values = Array.from(await out.toArray());
        console.log(JSON.stringify({ cache: stats().cpuTensorCache, values }));
      })();`;
    const root = path.join(__dirname, '..');
    const result = spawnSync(process.execPath, ['--import', 'tsx', '-e', script],
      { cwd: root, encoding: 'utf8', maxBuffer: 64 << 20, env: { ...process.env, BLIP2_CPU_TENSOR_CACHE: 'off' } });
    assert.equal(result.status, 0, result.stderr);
    const child = JSON.parse(result.stdout.trim().split('\n').pop()!);
    assert.deepEqual(child.cache, { installed: false, mappedBytes: 0, idleBytes: 0, reuses: 0, maps: 0 });
    assert.deepEqual(Float32Array.from(child.values), ours);
  });
});
