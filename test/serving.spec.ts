import { strict as assert } from 'node:assert';

import {
  AbortError, Blip2ForConditionalGeneration, DisposedError, InvalidArgumentError, PreTrainedTokenizer, QueueFullError, Tensor, stats,
} from '../lib';
import type { GenerateOptions } from '../lib';
import { expected, fixtureFloats, ids, rowsOf } from './support/fixtures';
import { tinyOptModel } from './support/python';

const IMAGES = ['gradient', 'noise', 'shapes'];
const Q = 6;
const IMAGE_TOKEN = 380;
const BOS = 2;

/** One image's pixel values as a [1,3,56,56] tensor. */
function pixels(image: string): Tensor {
  return Tensor.from(fixtureFloats(`pixel_values/${image}`), [1, 3, 56, 56]);
}

/** Prompt ids: the image placeholders, BOS, then `text` ids (any in-vocabulary ids). */
function prompt(text: number[]): number[] {
  return [...Array(Q).fill(IMAGE_TOKEN), BOS, ...text];
}

/** A cancelled call rejects at once; its slots are freed at the scheduler's next cycle (within a step). */
async function slotsFreed(model: Blip2ForConditionalGeneration, what: string): Promise<void> {
  const deadline = performance.now() + 2000;
  while (model.stats().slotsInUse !== 0) {
    assert.ok(performance.now() < deadline, `${what}: ${model.stats().slotsInUse} slot(s) still in use after 2 s`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

interface Job {
  image: string;
  text: number[];
  options: GenerateOptions;
}

async function runJob(model: Blip2ForConditionalGeneration, job: Job): Promise<number[][]> {
  const out = await model.generate({ pixelValues: pixels(job.image), inputIds: ids([prompt(job.text)]) }, job.options);
  return rowsOf(out);
}

/** Deterministic pseudo-random jobs: prompt lengths, new tokens, greedy / seeded sampling / beams / penalties. */
function jobs(count: number, seed: number): Job[] {
  let state = seed;
  const next = (n: number) => {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    return state % n;
  };
  return Array.from({ length: count }, () => {
    const kind = next(4);
    const options: GenerateOptions = { maxNewTokens: 1 + next(12), eosTokenId: next(3) === 0 ? [] : undefined };
    if (kind === 1) Object.assign(options, { doSample: true, seed: next(1000), topK: 20 });
    if (kind === 2) Object.assign(options, { numBeams: 2 + next(2) });
    if (kind === 3) Object.assign(options, { repetitionPenalty: 1.3, minNewTokens: 2 });
    return { image: IMAGES[next(3)], text: Array.from({ length: next(9) }, () => 4 + next(370)), options };
  });
}

/**
 * Submits `list` to an idle `model` one call after another, `pause` between two, and asserts the
 * results equal `want` and that all the calls' images went through one vision batch.
 */
async function assertSharedEncode(model: Blip2ForConditionalGeneration, list: Job[], want: number[][][],
  pause: () => Promise<unknown>): Promise<void> {
  const before = model.stats();
  const calls: Array<Promise<number[][]>> = [];
  for (const job of list) {
    calls.push(runJob(model, job));
    await pause();
  }
  assert.deepEqual(await Promise.all(calls), want);
  const after = model.stats();
  assert.equal(after.imageEncodes - before.imageEncodes, 1, `one vision batch for the ${list.length} calls`);
  assert.equal(after.encodedImages - before.encodedImages, list.length);
}

describe('serving: continuous batching on one scheduler per model', function () {
  this.timeout(600_000);
  let model: Blip2ForConditionalGeneration;
  before(async () => {
    model = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8 });
  });
  after(() => model.dispose());

  it('concurrent calls give exactly what each gives alone (greedy, seeded sampling, beams, penalties; mixed lengths join and leave)', async () => {
    const list = jobs(40, 7);
    const alone: number[][][] = [];
    for (const job of list) alone.push(await runJob(model, job));
    const before = model.stats();
    const together = await Promise.all(list.map((job) => runJob(model, job)));
    const after = model.stats();
    for (let i = 0; i < list.length; i++) assert.deepEqual(together[i], alone[i], `job ${i} ${JSON.stringify(list[i].options)}`);
    // They really ran together: steps carried several calls' sequences, in fewer steps than alone.
    assert.ok(after.largestStepRows > 4, `largest step ${after.largestStepRows} rows`);
    assert.ok(after.completedCalls - before.completedCalls === list.length);
    assert.equal(after.slotsInUse, 0);
    assert.equal(after.queued, 0);
  });

  it('a long prompt beside short ones: each width group gets its own prefill forward (padding bounded), results as alone', async () => {
    const list: Job[] = [
      { image: 'noise', text: Array.from({ length: 56 }, (_, i) => 4 + ((i * 37) % 370)), options: { maxNewTokens: 4 } },
      ...[0, 1, 2, 1, 0].map((n, k) => ({ image: IMAGES[k % 3], text: Array.from({ length: n }, (_, i) => 10 + i + k), options: { maxNewTokens: 4 } })),
    ];
    const alone: number[][][] = [];
    for (const job of list) alone.push(await runJob(model, job));
    const before = model.stats();
    const together = await Promise.all(list.map((job) => runJob(model, job)));
    const after = model.stats();
    for (let i = 0; i < list.length; i++) assert.deepEqual(together[i], alone[i], `job ${i}`);
    assert.equal(after.imageEncodes - before.imageEncodes, 1, 'the six calls were admitted together');
    // One forward for all would pad each short prompt by >= 54 positions (5 x 54 = 270); the
    // groups pad by at most 8 each.
    const padding = after.prefillPaddingTokens - before.prefillPaddingTokens;
    assert.ok(padding <= 8 * list.length, `padding ${padding} positions`);
    assert.ok(after.prefillTokens - before.prefillTokens === list.reduce((n, j) => n + prompt(j.text).length, 0));
  });

  it('prompts arriving while others decode ride in the decode steps, one chunk per step; results as alone and as with separate prefill calls', async () => {
    // 27- and 33-position prompts in chunks of 5 while a long call decodes: each step's language-model
    // call also writes up to 5 prompt positions (stepPrefillTokens), until the prompts are in.
    const chunk = 5;
    const fused = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8, prefillChunk: chunk });
    process.env.BLIP2_FUSED_PREFILL = 'off';
    const separate = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8, prefillChunk: chunk })
      .finally(() => delete process.env.BLIP2_FUSED_PREFILL);
    try {
      const long: Job = { image: 'noise', text: [5, 6], options: { maxNewTokens: 110, eosTokenId: [] } };
      const late: Job[] = [
        { image: 'gradient', text: Array.from({ length: 20 }, (_, i) => 4 + ((i * 53) % 370)), options: { maxNewTokens: 6 } },
        { image: 'shapes', text: Array.from({ length: 26 }, (_, i) => 7 + ((i * 29) % 370)), options: { maxNewTokens: 5, numBeams: 2 } },
        { image: 'noise', text: Array.from({ length: 20 }, (_, i) => 9 + ((i * 17) % 370)), options: { doSample: true, seed: 3, topK: 20, maxNewTokens: 6 } },
      ];
      const alone: number[][][] = [];
      for (const job of [long, ...late]) alone.push(await runJob(fused, job));
      for (const m of [fused, separate]) {
        const before = m.stats();
        // The late calls are submitted once the long one has its first tokens: it is decoding.
        let started!: () => void;
        const decoding = new Promise<void>((resolve) => { started = resolve; });
        let steps = 0;
        const first = runJob(m, { ...long, options: { ...long.options, onStep: () => { if (++steps === 2) started(); } } });
        await decoding;
        const rest = late.map((job) => runJob(m, job));
        assert.deepEqual(await Promise.all([first, ...rest]), alone);
        const after = m.stats();
        const inSteps = after.stepPrefillTokens - before.stepPrefillTokens;
        const prompts = late.reduce((n, j) => n + prompt(j.text).length, 0);
        if (m === fused) {
          // Every late prompt went through decode steps, at most one chunk per step (rows of one
          // width group: each row's share of the chunk, padded to the group's widest).
          assert.ok(inSteps >= prompts, `${inSteps} positions in steps for ${prompts} prompt positions`);
          assert.ok(inSteps <= late.length * chunk * (after.decodeSteps - before.decodeSteps), `${inSteps} positions in steps`);
        } else {
          assert.equal(inSteps, 0, 'BLIP2_FUSED_PREFILL=off: prompts in calls of their own');
        }
        assert.equal(after.prefillTokens - before.prefillTokens, prompt(long.text).length + prompts);
        assert.equal(after.slotsInUse, 0);
      }
    } finally {
      await fused.dispose();
      await separate.dispose();
    }
  });

  it('images of calls arriving while others decode are encoded in stages beside the decode steps; results as alone and as encoded whole', async () => {
    // The tiny export's vision tower has 2 layers: with encodeLayersPerStep 1 each late image takes
    // two cycles, one layer beside each decode step of the long call.
    const staged = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8, encodeLayersPerStep: 1 });
    const auto = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8 });
    process.env.BLIP2_STAGED_ENCODE = 'off';
    const whole = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8 })
      .finally(() => delete process.env.BLIP2_STAGED_ENCODE);
    try {
      const long: Job = { image: 'noise', text: [5, 6], options: { maxNewTokens: 100, eosTokenId: [] } };
      const late: Job[] = [
        { image: 'gradient', text: [11, 12, 13], options: { maxNewTokens: 6 } },
        { image: 'shapes', text: [7], options: { maxNewTokens: 5, numBeams: 2 } },
        { image: 'noise', text: [9, 10], options: { doSample: true, seed: 3, topK: 20, maxNewTokens: 6 } },
      ];
      const alone: number[][][] = [];
      for (const job of [long, ...late]) alone.push(await runJob(whole, job));
      for (const m of [staged, auto, whole]) {
        const before = m.stats();
        let started!: () => void;
        const decoding = new Promise<void>((resolve) => { started = resolve; });
        let steps = 0;
        const first = runJob(m, { ...long, options: { ...long.options, onStep: () => { if (++steps === 2) started(); } } });
        await decoding;
        // One after the other, each once the previous has its result: every one arrives while the
        // long call decodes (encodeBatch 1 on the CPU: one image per encode).
        const got: number[][][] = [];
        for (const job of late) got.push(await runJob(m, job));
        assert.deepEqual([await first, ...got], alone);
        const after = m.stats();
        const cycles = after.stagedEncodeCycles - before.stagedEncodeCycles;
        assert.equal(after.imageEncodes - before.imageEncodes, 1 + late.length);
        if (m === staged) assert.equal(cycles, 2 * late.length, 'one layer per cycle, two cycles per image');
        else if (m === auto) assert.ok(cycles >= late.length, `${cycles} staged cycles`);
        else assert.equal(cycles, 0, 'BLIP2_STAGED_ENCODE=off: whole encodes');
        assert.equal(after.encodingImages, 0);
        assert.equal(after.slotsInUse, 0);
      }
    } finally {
      await staged.dispose();
      await auto.dispose();
      await whole.dispose();
    }
  });

  it('a call aborted while its image is in a staged encode (or just after) rejects (or with stopOnAbortSignal resolves with its input ids); no slot is left held', async () => {
    const model = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8, encodeLayersPerStep: 1 });
    try {
      let hits = 0;
      for (let i = 0; i < 12; ++i) {
        // A call decoding beside it; the victim is aborted from that call's step callback once its
        // image is seen in the encoder (the executor may be a cycle ahead: then the abort lands in
        // its prefill or first steps, which must behave the same).
        const controller = new AbortController();
        let victim: Promise<Tensor> | undefined;
        const stop = i % 2 === 1;
        const input = prompt([20 + i]);
        let steps = 0;
        const background = model.generate({ pixelValues: pixels('noise') }, {
          maxNewTokens: 100, eosTokenId: [],
          onStep: () => {
            ++steps;
            if (steps === 2) {
              victim = model.generate({ pixelValues: pixels('shapes'), inputIds: ids([input]) },
                { maxNewTokens: 60, signal: controller.signal, stopOnAbortSignal: stop });
              victim.catch(() => undefined);  // awaited below, after the background call
            } else if (steps > 2 && !controller.signal.aborted && (model.stats().encodingImages > 0 || steps > 40)) {
              hits += model.stats().encodingImages > 0 ? 1 : 0;
              controller.abort();
            }
          },
        });
        assert.equal((await background).shape[0], 1);
        assert.ok(victim && controller.signal.aborted);
        if (stop) {
          // Aborted before (or just after) its first token: its input ids, perhaps with a few new ones.
          assert.deepEqual((await rowsOf(await victim))[0].slice(0, input.length), input);
        } else {
          await assert.rejects(victim, AbortError);
        }
        await slotsFreed(model, `after aborted call ${i}`);
        assert.equal(model.stats().encodingImages, 0);
      }
      // 12 of 12 here: the abort is seen at the next cycle's start, while the encode is in progress.
      assert.ok(hits > 0, 'no abort landed inside a staged encode');
    } finally {
      await model.dispose();
    }
  });

  it('calls arriving together at an idle model share one image encode (batchWaitMs); with batchWaitMs 0 the results are the same', async () => {
    const waiting = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8, batchWaitMs: 200 });
    const eager = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8, batchWaitMs: 0 });
    try {
      const list = jobs(6, 11).map((job) => ({ ...job, options: { maxNewTokens: 4 } }));
      const want = await Promise.all(list.map((job) => runJob(eager, job)));
      // Submitted a macrotask apart, as callers woken one by one would be.
      await assertSharedEncode(waiting, list, want, () => new Promise((resolve) => setImmediate(resolve)));
    } finally {
      await waiting.dispose();
      await eager.dispose();
    }
  });

  it('the batchWaitMs window restarts with each arrival: a trickle of calls each closer than it shares one encode', async () => {
    // Five calls 20 ms apart span 80 ms, more than one 60 ms window from the first: a window that
    // did not restart would admit the first ones alone and leave the rest to encodes of their own.
    const waiting = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 8, batchWaitMs: 60 });
    try {
      const list = jobs(5, 13).map((job) => ({ ...job, options: { maxNewTokens: 3 } }));
      const want = await Promise.all(list.map((job) => runJob(waiting, job)));
      await assertSharedEncode(waiting, list, want, () => new Promise((resolve) => setTimeout(resolve, 20)));
    } finally {
      await waiting.dispose();
    }
  });

  it('matches transformers 4.45.1 while batched with other calls (fixture generations)', async () => {
    const gens = expected().generations.filter((g) => !g.kwargs.num_beams || g.kwargs.num_beams === 1 || g.kwargs.num_beams === 3);
    const results = await Promise.all(gens.map((g) => model.generate({ pixelValues: pixels(g.image), inputIds: ids(g.input_ids) }, {
      maxNewTokens: g.kwargs.max_new_tokens as number, minNewTokens: g.kwargs.min_new_tokens as number | undefined,
      numBeams: g.kwargs.num_beams as number | undefined, earlyStopping: g.kwargs.early_stopping as boolean | undefined,
    }).then(rowsOf)));
    gens.forEach((g, i) => {
      // transformers 4.45 returned [bos, new ids]; we return the input ids, then the new ids.
      assert.deepEqual(results[i][0].slice(g.input_ids[0].length), g.sequences[0].slice(1), g.name);
    });
  });

  it('an aborted queued call rejects at once and never runs; a running one stops within a step; its slots are freed', async () => {
    const small = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 1 });
    const long = { maxNewTokens: 100, eosTokenId: [] as number[] };
    const running = small.generate({ pixelValues: pixels('noise') }, long);
    const controller = new AbortController();
    const queued = small.generate({ pixelValues: pixels('gradient') }, { ...long, signal: controller.signal });
    controller.abort();
    await assert.rejects(queued, AbortError);
    const runningController = new AbortController();
    let secondSteps = 0;
    const second = small.generate({ pixelValues: pixels('shapes') }, {
      ...long, signal: runningController.signal,
      onStep: () => {
        if (++secondSteps === 3) runningController.abort();
      },
    });
    const third = small.generate({ pixelValues: pixels('gradient') }, { maxNewTokens: 3 });
    await running;
    await assert.rejects(second, AbortError);
    // The scheduler checks the signal every cycle: the steps already run when the abort reached it
    // may still report (their events were on the way), then nothing more.
    await new Promise((r) => setTimeout(r, 50));
    const reported = secondSteps;
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(secondSteps, reported, 'no steps after the abort took effect');
    assert.ok(secondSteps >= 3 && secondSteps < 50, `${secondSteps} steps of 100`);
    assert.deepEqual((await third).shape, [1, 7 + 3], 'the next call still runs');
    assert.equal(small.stats().slotsInUse, 0);
    await small.dispose();
  });

  it('stopOnAbortSignal resolves with the tokens so far instead of rejecting', async () => {
    const controller = new AbortController();
    let seen = 0;
    const out = await model.generate({ pixelValues: pixels('noise') }, {
      maxNewTokens: 60, eosTokenId: [], stopOnAbortSignal: true, signal: controller.signal,
      onStep: () => {
        if (++seen === 5) controller.abort();
      },
    });
    const [row] = await rowsOf(out);
    const newTokens = row.length - (Q + 1);
    assert.ok(newTokens >= 5 && newTokens < 60, `${newTokens} new tokens`);
    // The partial result is the same prefix the full generation makes.
    const [full] = await rowsOf(await model.generate({ pixelValues: pixels('noise') }, { maxNewTokens: 60, eosTokenId: [] }));
    assert.deepEqual(row, full.slice(0, row.length));
    // Aborted while still queued: the input ids alone.
    const early = new AbortController();
    early.abort();
    const none = await model.generate({ pixelValues: pixels('noise') }, { maxNewTokens: 5, stopOnAbortSignal: true, signal: early.signal });
    assert.deepEqual((await rowsOf(none))[0], prompt([]));
  });

  it('back-pressure: beyond maxQueue a call rejects at once with QueueFullError; calls needing more slots than exist are refused', async () => {
    const small = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 1, maxQueue: 2 });
    const long = { maxNewTokens: 30, eosTokenId: [] as number[] };
    // The first call runs long (120 of the 121 positions maxLength 128 leaves), so that it is still
    // running when the loop below looks, even after a pause of the event loop: a first call that
    // had already finished would leave runningCalls at 0 and no queue to fill.
    const admitted = [small.generate({ pixelValues: pixels('noise') }, { maxNewTokens: 120, eosTokenId: [] })];
    // Let the first one be admitted, so that exactly two wait.
    const deadline = performance.now() + 10_000;
    while (small.stats().runningCalls === 0) {
      assert.ok(performance.now() < deadline, `the first call was not seen running: ${JSON.stringify(small.stats())}`);
      await new Promise((r) => setImmediate(r));
    }
    admitted.push(small.generate({ pixelValues: pixels('noise') }, long), small.generate({ pixelValues: pixels('noise') }, long));
    const started = performance.now();
    await assert.rejects(small.generate({ pixelValues: pixels('noise') }, long), (e: unknown) => {
      assert.ok(e instanceof QueueFullError, String(e));
      assert.equal(e.code, 'ERR_BLIP2_QUEUE_FULL');
      assert.match(e.message, /queue is full \(2 calls waiting, maxQueue 2\)/);
      return true;
    });
    assert.ok(performance.now() - started < 50, 'rejected without waiting');
    await assert.rejects(small.generate({ pixelValues: pixels('noise') }, { numBeams: 2, maxNewTokens: 2 }),
      (e: unknown) => e instanceof InvalidArgumentError && /at most 1 sequences per call/.test(e.message));
    assert.deepEqual((await admitted[0]).shape, [1, 7 + 120]);
    for (const p of admitted.slice(1)) assert.deepEqual((await p).shape, [1, 7 + 30]);
    await small.dispose();
  });

  it('dispose under load: queued and running calls reject with DisposedError, the cache is freed, then dispose resolves', async () => {
    const m = await Blip2ForConditionalGeneration.fromPretrained(tinyOptModel(), { maxBatchSize: 2 });
    const bytes = m.stats().kvCacheBytes;
    assert.ok(bytes > 0);
    const before = stats().kvCacheBytes;
    const calls = Array.from({ length: 10 }, () => m.generate({ pixelValues: pixels('shapes') }, { maxNewTokens: 50, eosTokenId: [] }));
    const outcomes = Promise.allSettled(calls);
    while (m.stats().runningSequences === 0) await new Promise((r) => setImmediate(r));
    await m.dispose();
    for (const o of await outcomes) {
      assert.equal(o.status, 'rejected');
      assert.ok((o as PromiseRejectedResult).reason instanceof DisposedError, String((o as PromiseRejectedResult).reason));
    }
    assert.equal(stats().kvCacheBytes, before - bytes, 'the KV cache is freed by the time dispose() resolves');
    await assert.rejects(m.generate({ pixelValues: pixels('shapes') }), DisposedError);
    assert.equal(m.device, 'cpu', 'device is still known after dispose');
    await m.dispose();  // idempotent
  });

  it('500 mixed concurrent calls all resolve with their alone results', async () => {
    const list = jobs(500, 99);
    const keyOf = (j: Job) => JSON.stringify(j);
    const unique = new Map<string, Job>();
    for (const j of list) unique.set(keyOf(j), j);
    const alone = new Map<string, number[][]>();
    for (const [k, j] of unique) alone.set(k, await runJob(model, j));
    const live = stats().liveTensors;
    const results = await Promise.all(list.map((j) => runJob(model, j)));
    results.forEach((r, i) => assert.deepEqual(r, alone.get(keyOf(list[i])), `call ${i}`));
    assert.equal(model.stats().slotsInUse, 0);
    if (global.gc) global.gc();
    await new Promise((r) => setTimeout(r, 50));
    assert.ok(stats().liveTensors <= live + 2, `live tensors ${stats().liveTensors} vs ${live}`);
  });

  it('generateStream yields UTF-8-safe text deltas that add up to the decoded tokens; break cancels and frees the slots', async () => {
    const tokenizer = PreTrainedTokenizer.fromPretrained(tinyOptModel());
    const deltas: string[] = [];
    const tokenIds: number[] = [];
    for await (const delta of model.generateStream({ pixelValues: pixels('gradient') }, { maxNewTokens: 12 })) {
      assert.equal(delta.sequence, 0);
      tokenIds.push(...delta.tokenIds);
      deltas.push(delta.text);
    }
    const [row] = await rowsOf(await model.generate({ pixelValues: pixels('gradient') }, { maxNewTokens: 12 }));
    assert.deepEqual(tokenIds, row.slice(Q + 1));
    assert.equal(deltas.join(''), tokenizer.decode(tokenIds, { skipSpecialTokens: true }));
    // Random byte-level tokens split characters: no delta may end inside one.
    for (const d of deltas) assert.ok(!d.endsWith('\uFFFD') || d === deltas[deltas.length - 1]);

    let count = 0;
    for await (const delta of model.generateStream({ pixelValues: pixels('noise') }, { maxNewTokens: 100, eosTokenId: [] })) {
      void delta;
      if (++count === 3) break;
    }
    await slotsFreed(model, 'break');
    await assert.rejects(async () => {
      for await (const d of model.generateStream({ pixelValues: pixels('noise') }, { numBeams: 2 })) void d;
    }, (e: unknown) => e instanceof InvalidArgumentError && e.argument === 'onToken');
  });

  it('onToken sees every sequence\'s tokens and text; a throwing onToken rejects the call with its error', async () => {
    const two = Tensor.from(Float32Array.from([...fixtureFloats('pixel_values/gradient'), ...fixtureFloats('pixel_values/noise')]), [2, 3, 56, 56]);
    const seen = new Map<number, number[]>();
    const out = await model.generate({ pixelValues: two }, {
      maxNewTokens: 6, eosTokenId: [],
      onToken: (d) => seen.set(d.sequence, [...(seen.get(d.sequence) ?? []), ...d.tokenIds]),
    });
    const rows = await rowsOf(out);
    assert.deepEqual(seen.get(0), rows[0].slice(Q + 1));
    assert.deepEqual(seen.get(1), rows[1].slice(Q + 1));
    const boom = new Error('boom');
    await assert.rejects(model.generate({ pixelValues: pixels('noise') }, { maxNewTokens: 50, onToken: () => { throw boom; } }), (e) => e === boom);
    await slotsFreed(model, 'a throwing onToken');
  });
});
