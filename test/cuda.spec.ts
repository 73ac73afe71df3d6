// CUDA: runs only where a GPU is visible (skipped elsewhere); bench/gpu.sh runs it on a lent GPU machine.
import { strict as assert } from 'node:assert';

import { Blip2ForConditionalGeneration, OutOfMemoryError, ScriptModule, Tensor, cudaAvailable } from '../lib';
import { fixtureFloats, rowsOf } from './support/fixtures';
import { testModulePath, tinyOptModel } from './support/python';

(cudaAvailable() ? describe : describe.skip)('CUDA', function () {
  this.timeout(300_000);
  const pixels = (device: string) => Tensor.from(fixtureFloats('pixel_values/gradient'), [1, 3, 56, 56], { device });

  it('tensors go up and come back unchanged (through pinned memory)', async () => {
    const data = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i));
    const t = Tensor.from(data, [10, 100], { device: 'cuda' });
    assert.equal(t.device, 'cuda:0');
    assert.deepEqual(await t.toArray(), data);
  });

  it('the tiny model gives the same greedy and beam tokens on cuda:0 as on the CPU, alone and batched', async () => {
    const cpu = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel());
    const gpu = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { device: 'cuda' });
    for (const options of [{ maxNewTokens: 12 }, { maxNewTokens: 8, numBeams: 3 }]) {
      const want = await rowsOf(await cpu.generate({ pixelValues: pixels('cpu') }, options));
      const got = await Promise.all(Array.from({ length: 8 }, () => gpu.generate({ pixelValues: pixels('cuda') }, options).then(rowsOf)));
      for (const rows of got) assert.deepEqual(rows, want);
    }
    const half = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { device: 'cuda', dtype: 'float16' });
    const ids = await rowsOf(await half.generate({ pixelValues: pixels('cuda') }, { maxNewTokens: 6 }));
    assert.equal(ids[0].length, 7 + 6);
    for (const m of [cpu, gpu, half]) await m.dispose();
  });

  it('CUDA out of memory rejects that call with OutOfMemoryError; the module keeps working', async () => {
    const ops = await ScriptModule.load(testModulePath(), { device: 'cuda' });
    await assert.rejects(ops.call('zeros', [2 ** 42]), OutOfMemoryError);
    const ok = (await ops.call('zeros', [4])) as Tensor;
    assert.deepEqual(await ok.toList(), [0, 0, 0, 0]);
    ops.dispose();
  });
});
