import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { REPO_ROOT, tinyOptModel } from './support/python';

const LIB = path.join(REPO_ROOT, 'lib');

/** Runs `body` (CommonJS, `blip2` = the package, `model` = a loaded tiny model, `pixels`) in a child process. */
function child(body: string, timeout = 60_000) {
  const script = `
    const blip2 = require(${JSON.stringify(LIB)});
    (async () => {
      const model = await blip2.Blip2ForConditionalGeneration.fromPretrained(${JSON.stringify(tinyOptModel())}, { maxBatchSize: 4 });
      const pixels = blip2.Tensor.from(new Float32Array(3 * 56 * 56).map((_, i) => Math.sin(i)), [1, 3, 56, 56]);
      const long = { maxNewTokens: 120, eosTokenId: [] };
      ${body}
    })();`;
  return spawnSync(process.execPath, ['--require', 'tsx/cjs', '-e', script], { cwd: REPO_ROOT, encoding: 'utf8', timeout });
}

function assertExit(result: ReturnType<typeof child>, code: number, what: string) {
  assert.equal(result.signal, null, `${what}: the process died of ${result.signal}\n${result.stderr}`);
  assert.equal(result.status, code, `${what}: exit code ${result.status}\n${result.stderr}`);
}

describe('lifecycle: no crash at exit, on uncaught errors or worker termination while native work runs', function () {
  this.timeout(600_000);

  it('process.exit() while generations run: exits with its code, 8 times out of 8', () => {
    for (let i = 0; i < 8; i++) {
      const r = child(`
        for (let k = 0; k < 4; k++) model.generate({ pixelValues: pixels }, long).catch(() => {});
        let steps = 0;
        model.generate({ pixelValues: pixels }, { ...long, onStep: () => { if (++steps === ${1 + (i % 5)}) process.exit(7); } });`);
      assertExit(r, 7, `run ${i}`);
    }
  });

  it('an uncaught exception while generations run: exit code 1 with the error printed, 5 times out of 5', () => {
    for (let i = 0; i < 5; i++) {
      const r = child(`
        for (let k = 0; k < 4; k++) model.generate({ pixelValues: pixels }, long).catch(() => {});
        setTimeout(() => { throw new Error('uncaught on purpose'); }, ${5 + i * 7});`);
      assertExit(r, 1, `run ${i}`);
      assert.match(r.stderr, /uncaught on purpose/);
    }
  });

  it('abort, then exit at once ("graceful"), and exit while forward() and the image processor work', () => {
    const aborted = child(`
      const c = new AbortController();
      const calls = Array.from({ length: 6 }, () => model.generate({ pixelValues: pixels }, { ...long, signal: c.signal }).catch(() => {}));
      setTimeout(() => { c.abort(); process.exit(0); }, 10);`);
    assertExit(aborted, 0, 'abort then exit');
    const busy = child(`
      const processor = await blip2.Blip2Processor.fromPretrained(${JSON.stringify(tinyOptModel())});
      const images = Array.from({ length: 16 }, () => ${JSON.stringify(path.join(REPO_ROOT, 'assets', 'demo.jpg'))});
      processor.process({ images, text: images.map(() => '') }).catch(() => {});
      model.forward({ pixelValues: pixels }).catch(() => {});
      model.generate({ pixelValues: pixels }, long).catch(() => {});
      setImmediate(() => process.exit(3));`);
    assertExit(busy, 3, 'exit while forward/preprocess/generate run');
  });

  it('a process whose work is done exits by itself (the addon keeps no handle open); dispose() resolves first', () => {
    const r = child(`
      const out = await model.generate({ pixelValues: pixels }, { maxNewTokens: 3 });
      console.log('shape', JSON.stringify(out.shape));
      await model.dispose();
      console.log('disposed');`, 30_000);
    assertExit(r, 0, 'natural exit');
    assert.match(r.stdout, /shape \[1,10\]\ndisposed/);
  });

  it('worker.terminate() while the worker loads a model or generates: only the worker ends; the process goes on', () => {
    for (const when of ['load', 'generate']) {
      const script = `
        const { Worker } = require('node:worker_threads');
        const code = ${JSON.stringify(`
          const { parentPort } = require('node:worker_threads');
          const blip2 = require(${JSON.stringify(LIB)});
          (async () => {
            parentPort.postMessage('loading');
            const model = await blip2.Blip2ForConditionalGeneration.fromPretrained(${JSON.stringify(tinyOptModel())});
            const pixels = blip2.Tensor.from(new Float32Array(3 * 56 * 56), [1, 3, 56, 56]);
            let n = 0;
            await Promise.all(Array.from({ length: 4 }, () => model.generate({ pixelValues: pixels }, { maxNewTokens: 120, eosTokenId: [],
              onStep: () => { if (++n === 3) parentPort.postMessage('generating'); } })));
          })();`)};
        const w = new Worker("require('tsx/cjs');" + code, { eval: true });
        w.on('message', (m) => { if (m === ${JSON.stringify(when === 'load' ? 'loading' : 'generating')}) w.terminate(); });
        w.on('exit', (c) => { console.log('worker exit ' + c); setTimeout(() => console.log('main alive'), 300); });`;
      for (let i = 0; i < 3; i++) {
        const r = spawnSync(process.execPath, ['-e', script], { cwd: REPO_ROOT, encoding: 'utf8', timeout: 60_000 });
        assertExit(r, 0, `terminate while ${when}, run ${i}`);
        assert.match(r.stdout, /worker exit 1\nmain alive/, r.stderr);
      }
    }
  });
});
