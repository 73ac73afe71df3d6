// A bounded fuzz run (about a minute): random option objects, tensors of random shapes and dtypes
// into every public model method, and mutated manifests and configs. Each call must resolve with a
// well-formed result or reject with one of our typed errors — never crash, hang, or throw
// synchronously from a promise method.
import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import {
  Blip2Error, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2QFormerModel, Blip2VisionModel, Tensor, liveTensorCount,
} from '../lib';
import type { DType } from '../lib';
import { settleFinalizers } from './support/gc';
import { hfTinyModel, tinyOptModel } from './support/python';

const BUDGET_MS = Number(process.env.BLIP2_FUZZ_MS ?? 45_000);

function rng(seed: number) {
  let s = seed >>> 0 || 1;
  const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296);
  return {
    next,
    int: (n: number) => Math.floor(next() * n),
    pick: <T>(xs: readonly T[]): T => xs[Math.floor(next() * xs.length)],
  };
}

const DTYPES: DType[] = ['float32', 'float16', 'bfloat16', 'float64', 'int64', 'int32', 'int16', 'int8', 'uint8', 'bool'];
const WEIRD: unknown[] = [undefined, null, 0, -1, 1.5, 2 ** 53, NaN, Infinity, '', 'x', true, [], {}, [1, 2], () => 1, Symbol('s'), 10n];

async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms); });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Runs `call`: a rejection must be one of ours (or a plain TypeError from JS itself for wrong `this`), never a sync throw. */
async function expectTyped(what: string, call: () => Promise<unknown>, counts: Record<string, number>): Promise<unknown> {
  let promise: Promise<unknown>;
  try {
    promise = call();
  } catch (e) {
    assert.fail(`${what} threw synchronously: ${(e as Error)?.message ?? String(e)}`);
  }
  assert.ok(promise instanceof Promise, `${what} did not return a promise`);
  try {
    const value = await within(promise, 60_000, what);
    counts.resolved = (counts.resolved ?? 0) + 1;
    return value;
  } catch (e) {
    assert.ok(e instanceof Blip2Error, `${what} rejected with an untyped error: ${(e as Error)?.stack ?? String(e)}`);
    counts[(e as Blip2Error).name] = (counts[(e as Blip2Error).name] ?? 0) + 1;
    return undefined;
  }
}

function randomTensor(r: ReturnType<typeof rng>): Tensor {
  const rank = r.int(5);
  const shape = Array.from({ length: rank }, () => r.pick([0, 1, 2, 3, 6, 7, 17, 56]));
  const numel = shape.reduce((a, b) => a * b, 1);
  if (numel > 60_000) return Tensor.from(new Float32Array(3 * 56 * 56), [1, 3, 56, 56]);
  const dtype = r.pick(DTYPES);
  const values = Array.from({ length: numel }, () => (dtype === 'bool' ? r.int(2) === 1 : r.int(8)));
  return Tensor.from(values.length ? (dtype === 'int64' ? values.map((v) => BigInt(v as number)) : values) as never : new Float32Array(0), shape,
    { dtype: dtype === 'int64' && !values.length ? 'float32' : dtype });
}

function randomOptions(r: ReturnType<typeof rng>): Record<string, unknown> {
  const keys = ['maxNewTokens', 'minNewTokens', 'doSample', 'temperature', 'topK', 'topP', 'repetitionPenalty', 'numBeams', 'lengthPenalty',
    'earlyStopping', 'numReturnSequences', 'eosTokenId', 'padTokenId', 'seed', 'signal', 'onStep', 'onToken', 'stopOnAbortSignal',
    'returnDictInGenerate', 'bogus'];
  const sane: Record<string, () => unknown> = {
    maxNewTokens: () => 1 + r.int(6), minNewTokens: () => r.int(3), doSample: () => r.int(2) === 1, temperature: () => 0.5 + r.next(),
    topK: () => r.int(50), topP: () => 0.1 + 0.9 * r.next(), repetitionPenalty: () => 1 + r.next(), numBeams: () => 1 + r.int(3),
    numReturnSequences: () => 1, seed: () => r.int(1000),
  };
  const out: Record<string, unknown> = {};
  for (let i = r.int(5); i > 0; i--) {
    const key = r.pick(keys);
    out[key] = sane[key] && r.next() < 0.6 ? sane[key]() : r.pick(WEIRD);
  }
  if (typeof out.maxNewTokens !== 'number') out.maxNewTokens = 3;  // keep calls short
  return out;
}

describe('fuzz (bounded)', function () {
  this.timeout(BUDGET_MS * 4 + 120_000);

  it(`random tensors and options into every public model method, mutated manifests and configs: typed errors or correct results, ${BUDGET_MS} ms`, async () => {
    const r = rng(20261201);
    const counts: Record<string, number> = {};
    const caption = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8 });
    const itmDir = hfTinyModel('itm').modelDir;
    const itm = await Blip2ForImageTextRetrieval.fromPretrained(itmDir);
    const vision = await Blip2VisionModel.fromPretrained(tinyOptModel());
    const qformer = await Blip2QFormerModel.fromPretrained(tinyOptModel());
    const good = Tensor.from(new Float32Array(3 * 56 * 56).map((_, i) => Math.sin(i)), [1, 3, 56, 56]);
    const reference = await caption.generate({ pixelValues: good }, { maxNewTokens: 4 });
    const referenceIds = await reference.toList();
    await settleFinalizers();
    const before = liveTensorCount();
    const deadline = Date.now() + BUDGET_MS;
    let calls = 0;
    const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'blip2-fuzz-'));
    while (Date.now() < deadline) {
      calls++;
      const a = r.next() < 0.5 ? good : randomTensor(r);
      const b = randomTensor(r);
      const c = randomTensor(r);
      const inputs = r.pick([{ pixelValues: a }, { pixelValues: a, inputIds: b }, { pixelValues: a, inputIds: b, attentionMask: c }, a, null, {}, 'x']);
      switch (r.int(9)) {
        case 0: case 1: await expectTyped('generate', () => caption.generate(inputs as never, randomOptions(r) as never), counts); break;
        case 2: await expectTyped('forward', () => caption.forward(inputs as never, r.pick([{}, { signal: {} }, undefined]) as never), counts); break;
        case 3: await expectTyped('getImageFeatures', () => caption.getImageFeatures(a, r.pick([{}, { signal: 1 }]) as never), counts); break;
        case 4: await expectTyped('itm.forward', () => itm.forward({ pixelValues: a, inputIds: b, attentionMask: r.pick([c, undefined]), useImageTextMatchingHead: r.pick([true, false, 'x']) } as never), counts); break;
        case 5: await expectTyped('vision.forward', () => vision.forward({ pixelValues: a }), counts); break;
        case 6: await expectTyped('qformer.forward', () => qformer.forward({ queryEmbeds: b, encoderHiddenStates: c, encoderAttentionMask: r.pick([a, undefined]) } as never), counts); break;
        case 7: await expectTyped('tensor ops', async () => {
          const t = randomTensor(r);
          const op = r.int(4);
          if (op === 0) return t.narrow(r.int(3), r.int(3), r.int(3));
          if (op === 1) return t.select(r.int(3), r.int(4));
          if (op === 2) return t.to({ dtype: r.pick([...DTYPES, 'nope' as DType]) });
          return t.toArray();
        }, counts); break;
        case 8: {
          // A model folder with one manifest or config field mutated.
          const dir = path.join(scratch, `m${calls}`);
          fs.cpSync(tinyOptModel(), dir, { recursive: true });
          const file = path.join(dir, r.pick(['manifest.json', 'manifest.json', 'config.json', 'generation_config.json']));
          const json = JSON.parse(fs.readFileSync(file, 'utf8'));
          const paths: string[][] = [];
          (function walk(node: unknown, at: string[]) {
            if (node && typeof node === 'object' && at.length < 4) for (const k of Object.keys(node)) { paths.push([...at, k]); walk((node as never)[k], [...at, k]); }
          })(json, []);
          const target = r.pick(paths);
          let owner = json;
          for (const k of target.slice(0, -1)) owner = owner[k];
          owner[target[target.length - 1]] = r.pick(WEIRD.filter((w) => typeof w !== 'function' && typeof w !== 'symbol' && typeof w !== 'bigint'));
          fs.writeFileSync(file, JSON.stringify(json));
          const loaded = await expectTyped(`fromPretrained (${path.basename(file)}: ${target.join('.')})`, () => Blip2ForConditionalGeneration.fromPretrained(dir), counts) as Blip2ForConditionalGeneration | undefined;
          if (loaded) {
            await expectTyped('generate on a mutated folder', () => loaded.generate({ pixelValues: good }, { maxNewTokens: 2 }), counts);
            await loaded.dispose();
          }
          fs.rmSync(dir, { recursive: true, force: true });
          break;
        }
      }
    }
    console.log(`      fuzz: ${calls} calls ${JSON.stringify(counts)}`);
    // The models still give correct results, and nothing leaked.
    assert.deepEqual(await (await caption.generate({ pixelValues: good }, { maxNewTokens: 4 })).toList(), referenceIds);
    for (const m of [caption, itm, vision, qformer]) await m.dispose();
    fs.rmSync(scratch, { recursive: true, force: true });
    await settleFinalizers();
    assert.ok(liveTensorCount() <= before + 8, `live tensors ${liveTensorCount()} vs ${before}`);
    assert.ok(calls > 50, `only ${calls} calls`);
  });
});
