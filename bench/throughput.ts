// Serving throughput: N concurrent clients on one model (the native scheduler batches their
// generate() calls), against our one-by-one (N = 1) and transformers' static batches of the same
// sizes (bench/hf_throughput.py), on the same checkpoint, torch and threads, in one run.
//
//   npx tsx bench/throughput.ts [--model mid] [--concurrency 1,4,16,64] [--requests R] [--seconds 120] [--rounds 1]
//       [--threads 2] [--new-tokens 20] [--attention sdpa|eager] [--hf-batches 1,4,16,64] [--hf-runs 2] [--hf-attn sdpa] [--no-hf]
//
// --stagger MS: client c of a level starts c * MS after the first, so calls arrive out of step (as
// real traffic does) instead of in waves; then the child also records every request's gaps between
// two steps (onStep) and prints their p50/p90/p99/max: how long running sequences were held up by
// the encodes and prefills of calls arriving meanwhile. --prefill-chunk N / --encode-batch N /
// --encode-layers N / --stall-budget X: the model's options prefillChunk, encodeBatch,
// encodeLayersPerStep, stallBudget (default: the library's).
//
// --rounds R: every level R times, the order reversed in every other round, so each level is
// measured next to the others (this VM's speed moves 20-40% within minutes, and a memory-bound
// one-by-one run gains more in a fast phase than a compute-bound batched one). The table gives
// per-level medians; each round's ratios to one by one come from the runs of that round.
//
// --attention: ours' vision attention (default sdpa, as transformers 5's default it is compared with).
//
// Requests: 8 seeded images (320x240, through the model folder's Blip2Processor) with 4 prompts of
// different lengths, request i = item i % 8; greedy, exactly --new-tokens tokens (EOS disabled).
// Ours: a fresh process per concurrency level loads the model (maxBatchSize 16, 64 for levels
// above 16), runs one untimed wave of N requests, then a closed loop: N clients each send their
// next request when the last one answered, until --requests (default max(48, 4N): one by one that
// is ~15 s, so the ratios' denominator is not decided by a few slow requests) were sent or
// --seconds passed; the ones in flight finish. requests/s = completed / elapsed (the final drain
// included), latency = the generate() call until its sequences, event-loop delay = p99 of
// perf_hooks.monitorEventLoopDelay over the loop.
// Transformers: batch B = the first B requests (left-padded), one generate() call each (image
// encoding included): requests/s = B / the median call time of --hf-runs calls after one warm-up.
import * as fs from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import * as path from 'node:path';

import { Blip2ForConditionalGeneration, Tensor, setNumThreads } from '../lib';

import {
  arg, imageSize, CACHE, closedLoop, flag, list, machine, makeRequests, prepare, printJson, quantile, round, rssMb,
  runChild, runPython, ROOT, writeRequests,
} from './common';

const threads = Number(arg('threads', '2'));
const newTokens = Number(arg('new-tokens', '20'));
const seconds = Number(arg('seconds', '120'));
const attention = arg('attention', 'sdpa') as 'eager' | 'sdpa';
const ITEMS = 8;

async function child(): Promise<void> {
  await setNumThreads(threads);
  const modelDir = arg('model-dir', '');
  const concurrency = Number(arg('concurrency', '1'));
  const maxBatchSize = Number(arg('max-batch', '16'));
  const requests = Number(arg('requests', '16'));
  const stagger = Number(arg('stagger', '0'));
  const optional = (name: string) => {
    const value = arg(name, '');
    return value === '' ? undefined : Number(value);
  };
  const prefillChunk = optional('prefill-chunk');
  const encodeBatch = optional('encode-batch');
  const encodeLayersPerStep = optional('encode-layers');
  const stallBudget = optional('stall-budget');
  const model = await Blip2ForConditionalGeneration.fromPretrained(modelDir, {
    maxBatchSize, attention, prefillChunk, encodeBatch, encodeLayersPerStep, stallBudget,
  });
  const size = imageSize(model);
  const inputs = (await makeRequests(modelDir, ITEMS)).map((r) => ({
    pixelValues: Tensor.from(r.pixels, [1, 3, size, size]),
    inputIds: Tensor.from(BigInt64Array.from(r.ids.map(BigInt)), [1, r.ids.length]),
    attentionMask: Tensor.from(BigInt64Array.from(r.ids.map(() => 1n)), [1, r.ids.length]),
  }));
  const gaps: number[] = [];
  const send = async (i: number) => {
    let last = 0;
    const onStep = stagger > 0 ? () => {
      const now = performance.now();
      if (last) gaps.push(now - last);
      last = now;
    } : undefined;
    const out = await model.generate(inputs[i % ITEMS], { maxNewTokens: newTokens, eosTokenId: [], onStep });
    out.dispose();
  };
  await closedLoop(concurrency, concurrency, seconds, send); // warm-up wave: every batch shape once
  const before = model.stats();
  const delay = monitorEventLoopDelay({ resolution: 5 });
  delay.enable();
  gaps.length = 0;
  const r = await closedLoop(concurrency, requests, seconds, send, stagger);
  delay.disable();
  const after = model.stats();
  const steps = after.decodeSteps - before.decodeSteps;
  printJson({
    event: 'ours', concurrency, max_batch_size: maxBatchSize, slots: after.slots, requests: r.completed, seconds: round(r.seconds),
    requests_per_s: round(r.completed / r.seconds), tokens_per_s: round((r.completed * newTokens) / r.seconds, 1),
    p50_ms: round(quantile(r.latencies_ms, 0.5), 1), p99_ms: round(quantile(r.latencies_ms, 0.99), 1),
    event_loop_delay_p99_ms: round(delay.percentile(99) / 1e6, 2), event_loop_delay_max_ms: round(delay.max / 1e6, 2),
    decode_steps: steps, // Each request's first token comes from its prefill, the rest from decode steps.
    mean_step_rows: round((after.generatedTokens - before.generatedTokens - r.completed) / Math.max(steps, 1), 2),
    largest_step_rows: after.largestStepRows,
    mean_encode_images: round((after.encodedImages - before.encodedImages) / Math.max(after.imageEncodes - before.imageEncodes, 1), 2),
    staged_encode_cycles: after.stagedEncodeCycles - before.stagedEncodeCycles, step_prefill_budget: after.stepPrefillBudget,
    ...(stagger > 0 ? {
      stagger_ms: stagger, step_gap_p50_ms: round(quantile(gaps, 0.5), 1), step_gap_p90_ms: round(quantile(gaps, 0.9), 1),
      step_gap_p99_ms: round(quantile(gaps, 0.99), 1), step_gap_max_ms: round(quantile(gaps, 1), 1),
    } : {}),
    ...rssMb(),
  });
  for (const t of inputs) {
    t.pixelValues.dispose();
    t.inputIds.dispose();
    t.attentionMask.dispose();
  }
  await model.dispose();
}

async function main(): Promise<void> {
  const preset = arg('model', 'mid');
  const levels = list('concurrency', '1,4,16,64').map(Number);
  const hfBatches = flag('no-hf') ? [] : list('hf-batches', levels.join(',')).map(Number);
  const hfAttn = list('hf-attn', 'sdpa');
  const { checkpoint, modelDir } = prepare(preset);
  const setup = { bench: 'throughput', setup: true, model: preset, threads, new_tokens: newTokens, seconds, attention, ...machine() };
  printJson(setup);

  const rounds = Number(arg('rounds', '1'));
  // The child options given here, passed on as they are.
  const passed = ['stagger', 'prefill-chunk', 'encode-batch', 'encode-layers', 'stall-budget'].flatMap((name) => (arg(name, '') ? [`--${name}`, arg(name, '')] : []));
  const runs = new Map<number, Record<string, any>[]>(levels.map((c) => [c, []]));  // per level, in round order
  for (let roundIndex = 0; roundIndex < rounds; roundIndex++) {
    for (const c of roundIndex % 2 === 0 ? levels : [...levels].reverse()) {
      const requests = arg('requests', String(Math.max(48, 4 * c)));
      const maxBatch = c > 16 ? 64 : 16;
      const [row] = (await runChild(__filename, ['--child', '--model-dir', modelDir, '--concurrency', String(c), '--max-batch', String(maxBatch),
        '--requests', requests, '--threads', String(threads), '--new-tokens', String(newTokens), '--seconds', String(seconds), '--attention', attention,
        ...passed]))
        .filter((l) => l.event === 'ours');
      printJson({ bench: 'throughput', impl: 'blip2-node', round: roundIndex, ...row });
      runs.get(c)!.push(row);
    }
  }
  // Per level, the run of median requests/s stands for it (its other figures come with it).
  const ours = new Map<number, Record<string, any>>();
  for (const [c, rows] of runs) ours.set(c, [...rows].sort((a, b) => a.requests_per_s - b.requests_per_s)[Math.floor((rows.length - 1) / 2)]);

  const hf = new Map<string, Record<string, any>>();
  if (hfBatches.length) {
    const base = path.join(CACHE, `requests-${preset}`);
    const imageSize = Number(JSON.parse(fs.readFileSync(path.join(modelDir, 'manifest.json'), 'utf8')).image_size[0]);
    writeRequests(base, await makeRequests(modelDir, ITEMS), imageSize);
    for (const attn of hfAttn) {
      for (const row of runPython(path.join(ROOT, 'bench', 'hf_throughput.py'), ['--checkpoint', checkpoint, '--requests', base,
        '--batches', hfBatches.join(','), '--runs', arg('hf-runs', '2'), '--threads', String(threads), '--new-tokens', String(newTokens),
        '--attn', attn])) {
        printJson({ bench: 'throughput', ...row });
        if (row.event === 'batch') hf.set(`${attn}:${row.batch}`, row);
      }
    }
  }

  const fmt = (v: number | undefined, d = 2) => (v !== undefined && Number.isFinite(v) ? v.toFixed(d) : '');
  console.log(`\nmachine: ${setup.cpu} x${setup.cpus}, ${setup.mem_gib} GiB, load average ${setup.loadavg_1m} at the start; model ${preset}; ` +
    `${threads} threads; ${newTokens} new tokens per request; ours with attention '${attention}'`);
  console.log('| concurrency | requests | req/s | tokens/s | p50 ms | p99 ms | event-loop p99 ms | mean rows/step | mean images/encode | vs our one-by-one |' +
    hfAttn.map((a) => ` transformers ${a} batch req/s | ours / transformers ${a} |`).join(''));
  console.log('|---|---|---|---|---|---|---|---|---|---|' + hfAttn.map(() => '---|---|').join(''));
  const one = ours.get(1)?.requests_per_s;
  for (const c of levels) {
    const o = ours.get(c)!;
    const cells = hfAttn.map((a) => {
      const h = hf.get(`${a}:${c}`);
      return ` ${fmt(h?.requests_per_s)} | ${h ? fmt(o.requests_per_s / h.requests_per_s) + 'x' : ''} |`;
    }).join('');
    console.log(`| ${c} | ${o.requests} | ${fmt(o.requests_per_s)} | ${fmt(o.tokens_per_s, 1)} | ${fmt(o.p50_ms, 0)} | ${fmt(o.p99_ms, 0)} | ` +
      `${fmt(o.event_loop_delay_p99_ms, 1)} | ${fmt(o.mean_step_rows)} | ${fmt(o.mean_encode_images)} | ${one ? fmt(o.requests_per_s / one) + 'x' : ''} |${cells}`);
  }
  for (const c of levels) {
    const o = ours.get(c)!;
    if (o.stagger_ms) {
      console.log(`${c} concurrent, clients ${o.stagger_ms} ms apart: gaps between two steps of a request p50 ${fmt(o.step_gap_p50_ms, 0)}, ` +
        `p90 ${fmt(o.step_gap_p90_ms, 0)}, p99 ${fmt(o.step_gap_p99_ms, 0)}, max ${fmt(o.step_gap_max_ms, 0)} ms`);
    }
  }
  if (rounds > 1 && runs.has(1)) {
    for (const c of levels.filter((l) => l !== 1)) {
      const ratios = runs.get(c)!.map((r, i) => r.requests_per_s / runs.get(1)![i].requests_per_s);
      console.log(`${c} concurrent / one by one, per round: ${ratios.map((r) => r.toFixed(2) + 'x').join(', ')}`);
    }
  }
  const o16 = ours.get(16);
  if (o16 && one) {
    const h16 = hf.get(`${hfAttn[0]}:16`);
    console.log(`\ngoals at 16 concurrent: ${(o16.requests_per_s / one).toFixed(2)}x our one-by-one (goal >= 4x)` +
      (h16 ? `, ${(o16.requests_per_s / h16.requests_per_s).toFixed(2)}x transformers ${hfAttn[0]} static batch 16 (goal >= 1.25x)` : ''));
  }
}

(flag('child') ? child() : main()).catch((e) => {
  console.error(e);
  process.exit(1);
});
