import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';

import { Blip2ForConditionalGeneration, Blip2Processor } from '../lib';
import type { CaptionWorkerData, CaptionWorkerResult } from './support/caption-worker';
import { REPO_ROOT } from './support/python';

const MODEL = path.join(REPO_ROOT, 'models', 'tiny-random-opt');
const IMAGE = path.join(REPO_ROOT, 'assets', 'demo.jpg');
const WORKER = path.join(REPO_ROOT, 'test', 'support', 'caption-worker.ts');
const MAX_NEW_TOKENS = 12;

/** The worker script runs TypeScript through tsx's CommonJS hook, registered inside the worker. */
function startWorker(data: CaptionWorkerData): Worker {
  return new Worker(`require('tsx/cjs'); require(${JSON.stringify(WORKER)});`, { eval: true, workerData: data });
}

/** Runs a worker to its end: its result message and its exit code. */
function runWorker(data: CaptionWorkerData): Promise<{ result: CaptionWorkerResult | undefined; error: string | undefined; code: number }> {
  return new Promise((resolve, reject) => {
    const worker = startWorker(data);
    let result: CaptionWorkerResult | undefined;
    let error: string | undefined;
    worker.on('message', (m: CaptionWorkerResult & { error?: string }) => {
      if (m.error !== undefined) error = m.error;
      else result = m;
    });
    worker.on('error', reject);
    worker.on('exit', (code) => resolve({ result, error, code }));
  });
}

async function captionOnMainThread(): Promise<{ ids: number[][]; texts: string[] }> {
  const processor = await Blip2Processor.fromPretrained(MODEL);
  const model = await Blip2ForConditionalGeneration.fromPretrained(MODEL);
  try {
    const inputs = await processor.process({ images: [IMAGE], text: [''], padding: 'longest', dtype: model.dtype });
    const sequences = await model.generate(inputs, { maxNewTokens: MAX_NEW_TOKENS });
    const flat = Array.from((await sequences.toArray()) as BigInt64Array, Number);
    const width = sequences.shape[1];
    const ids = Array.from({ length: sequences.shape[0] }, (_, r) => flat.slice(r * width, (r + 1) * width));
    const texts = await processor.batchDecode(sequences, { skipSpecialTokens: true });
    for (const t of [sequences, inputs.pixelValues, inputs.inputIds, inputs.attentionMask]) t.dispose();
    return { ids, texts };
  } finally {
    model.dispose();
  }
}

describe('worker_threads', () => {
  let expected: { ids: number[][]; texts: string[] };
  before(async () => {
    expected = await captionOnMainThread();
    assert.equal(expected.ids[0].length > MAX_NEW_TOKENS, true);
  });

  it('a worker thread loads its own model and gets the main thread\'s tokens and text; it exits with 0', async () => {
    const { result, error, code } = await runWorker({ modelDir: MODEL, image: IMAGE, maxNewTokens: MAX_NEW_TOKENS });
    assert.equal(error, undefined, error);
    assert.equal(code, 0);
    assert.ok(result && result.threadId > 0, 'ran in a worker');
    assert.deepEqual(result.ids, expected.ids);
    assert.deepEqual(result.texts, expected.texts);
  });

  it('two workers at once, each with its own model, both equal to the main thread; both exit with 0', async () => {
    const data = { modelDir: MODEL, image: IMAGE, maxNewTokens: MAX_NEW_TOKENS, streamSteps: true };
    const runs = await Promise.all([runWorker(data), runWorker(data)]);
    for (const { result, error, code } of runs) {
      assert.equal(error, undefined, error);
      assert.equal(code, 0);
      assert.deepEqual(result!.ids, expected.ids);
      assert.deepEqual(result!.texts, expected.texts);
    }
    assert.notEqual(runs[0].result!.threadId, runs[1].result!.threadId);
    // The main thread's own model still works after the workers' models are gone.
    assert.deepEqual(await captionOnMainThread(), expected);
  });

  it('a worker that fails reports its error and its exit code', async () => {
    const { result, error, code } = await runWorker({ modelDir: path.join(REPO_ROOT, 'no-such-model'), image: IMAGE, maxNewTokens: 4 });
    assert.equal(result, undefined);
    assert.equal(code, 3);
    assert.match(error ?? '', /ModelLoadError|no-such-model/);
  });

  // Runs in a child process so that a crash could not take mocha down with it.
  it('terminating a worker mid-generation ends only that worker (exit 1); the process goes on', () => {
    const script = `
      const { Worker } = require('node:worker_threads');
      const w = new Worker(${JSON.stringify(`require('tsx/cjs'); require(${JSON.stringify(WORKER)});`)}, { eval: true,
        workerData: { modelDir: ${JSON.stringify(MODEL)}, image: ${JSON.stringify(IMAGE)}, maxNewTokens: 100, streamSteps: true } });
      w.on('message', (m) => { if (m.step === 2) w.terminate(); });
      w.on('exit', (code) => { console.log('worker exit ' + code); setTimeout(() => console.log('main alive'), 200); });`;
    const child = spawnSync(process.execPath, ['-e', script], { cwd: REPO_ROOT, encoding: 'utf8', timeout: 60_000 });
    assert.equal(child.signal, null, `the process died of ${child.signal}: ${child.stderr}`);
    assert.equal(child.status, 0, child.stderr);
    assert.match(child.stdout, /worker exit 1\nmain alive/);
  });

  it('examples/caption-in-worker.mjs captions the demo image from a worker (needs an up-to-date dist/: npm run build:ts)', function () {
    // The example imports the package ('blip2-node', i.e. dist/): skipped when dist/ is missing or
    // older than lib/ (.ci/run builds it before the tests).
    const built = path.join(REPO_ROOT, 'dist', 'lib', 'index.js');
    if (!fs.existsSync(built)) this.skip();
    const builtAt = fs.statSync(built).mtimeMs;
    const sources = fs.readdirSync(path.join(REPO_ROOT, 'lib'), { recursive: true, encoding: 'utf8' }).filter((f) => f.endsWith('.ts'));
    if (sources.some((f) => fs.statSync(path.join(REPO_ROOT, 'lib', f)).mtimeMs > builtAt)) this.skip();
    const child = spawnSync(process.execPath, [path.join(REPO_ROOT, 'examples', 'caption-in-worker.mjs'), IMAGE, '--model', MODEL], {
      cwd: REPO_ROOT, encoding: 'utf8', timeout: 60_000,
    });
    assert.equal(child.status, 0, child.stderr);
    assert.match(child.stdout, /^assets\/demo\.jpg: ".*"\n$/);
  });
});
