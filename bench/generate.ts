// One-by-one caption latency: blip2-node (its default runtime and the plain path,
// BLIP2_LINEAR_KERNEL=off) against transformers' own Blip2ForConditionalGeneration.generate (eager
// and sdpa attention, bench/hf_generate.py) and the exporter's modules run eagerly
// (bench/python_eager.py), on the same checkpoint, the same torch and the same threads, in one run.
//
//   npx tsx bench/generate.ts [--model mid|tiny|small] [--impls ours,ours-sdpa,plain,hf-eager,hf-sdpa,python-eager]
//       [--threads 2] [--new-tokens 20] [--runs 5] [--warmup 2] [--cold-runs 3]
//
// Workload: a caption from pixels alone (prompt: Q <image> ids + BOS), greedy, EOS disabled so every
// impl makes exactly --new-tokens tokens; seeded random pixels; batch 1.
//   TTFT      the call until the first new token reaches the caller (image encoding + prefill + choice)
//   ms/token  the rest / (new tokens - 1): one decode step each
//   first     the first caption after loading, in a fresh process per measurement (--cold-runs of
//             them, medians), against the warm medians (after --warmup untimed captions)
//   load      fromPretrained / from_pretrained in that fresh process, page cache warm
//   image features  vision + Q-Former + projection alone (getImageFeatures / get_image_features)
//   floor     the LM's bytes per decode step (weights incl. the head) / this machine's read
//             bandwidth measured in the same run (bench/membw.py)
// One JSON line per measurement, then a markdown summary.
import * as path from 'node:path';

import { Blip2ForConditionalGeneration, Tensor, setNumThreads } from '../lib';

import {
  arg, imageSize, floorMs, flag, list, lmBytesPerStep, machine, measureBandwidth, median, prepare, printJson, round, rssMb,
  runChild, runPython, ROOT, seededPixels, warmPageCache,
} from './common';

const threads = Number(arg('threads', '2'));
const newTokens = Number(arg('new-tokens', '20'));
const runs = Number(arg('runs', '5'));
const warmup = Number(arg('warmup', '2'));
const coldRuns = Number(arg('cold-runs', '3'));

interface Timing { ttft_ms: number; ms_per_token: number; total_ms: number; image_features_ms?: number }

/** Child: one fresh process loads the model, captions once (the first caption), then optionally warm ones. */
async function child(): Promise<void> {
  await setNumThreads(threads);
  const modelDir = arg('model-dir', '');
  const warmRuns = Number(arg('warm-runs', '0'));
  const t0 = performance.now();
  const attention = arg('attention', 'eager') as 'eager' | 'sdpa';
  const model = await Blip2ForConditionalGeneration.fromPretrained(modelDir, { attention });
  const loadMs = performance.now() - t0;
  printJson({ event: 'load', load_ms: round(loadMs), ...rssMb() });
  if (flag('print-kernels')) printJson({ event: 'kernels', linearKernels: model.linearKernels });
  const size = imageSize(model);
  const pixels = Tensor.from(seededPixels(1, size, 1), [1, 3, size, size]);
  const once = async (): Promise<Timing> => {
    const start = performance.now();
    let first = 0;
    const out = await model.generate({ pixelValues: pixels }, {
      maxNewTokens: newTokens,
      eosTokenId: [], // no early stop: exactly newTokens tokens, like the Python impls
      onStep: (e) => {
        if (e.step === 0) first = performance.now();
      },
    });
    const end = performance.now();
    const made = out.shape[1] - (model.manifest.num_query_tokens + 1);
    out.dispose();
    if (made !== newTokens) throw new Error(`made ${made} new tokens, not ${newTokens}`);
    return { ttft_ms: first - start, ms_per_token: (end - first) / Math.max(newTokens - 1, 1), total_ms: end - start };
  };
  const first = await once();
  printJson({ event: 'first', ...roundTiming(first) });
  if (warmRuns > 0) {
    for (let i = 0; i < warmup; i++) await once();
    const results: Timing[] = [];
    for (let i = 0; i < warmRuns; i++) results.push(await once());
    // Vision + Q-Former + projection alone, as transformers' get_image_features.
    const features: number[] = [];
    for (let i = 0; i < warmRuns; i++) {
      const t = performance.now();
      (await model.getImageFeatures(pixels)).dispose();
      features.push(performance.now() - t);
    }
    printJson({ event: 'warm', runs: warmRuns, image_features_ms: round(median(features)), ...roundTiming(medianTiming(results)), ...rssMb() });
  }
  await model.dispose();
}

function roundTiming(t: Timing): Timing {
  return { ttft_ms: round(t.ttft_ms), ms_per_token: round(t.ms_per_token), total_ms: round(t.total_ms) };
}
function medianTiming(ts: Timing[]): Timing {
  return { ttft_ms: median(ts.map((t) => t.ttft_ms)), ms_per_token: median(ts.map((t) => t.ms_per_token)), total_ms: median(ts.map((t) => t.total_ms)) };
}

interface Result { impl: string; load_ms: number; first: Timing; warm: Timing; peak_rss_mb?: number }

/** `coldRuns` fresh processes; the first also measures warm captions. */
async function measure(impl: string, start: (i: number) => Promise<Array<Record<string, any>>>): Promise<Result> {
  const loads: number[] = [];
  const firsts: Timing[] = [];
  let warm: Timing | undefined;
  let peak: number | undefined;
  for (let i = 0; i < coldRuns; i++) {
    for (const line of await start(i)) {
      printJson({ bench: 'generate', ...line, impl, process: i });
      if (line.event === 'load') loads.push(line.load_ms ?? line.load_s * 1e3);
      if (line.event === 'first') firsts.push(line as unknown as Timing);
      if (line.event === 'warm') {
        warm = line as unknown as Timing;
        peak = line.peak_rss_mb;
      }
    }
  }
  return { impl, load_ms: median(loads), first: medianTiming(firsts), warm: warm!, peak_rss_mb: peak };
}

async function main(): Promise<void> {
  const preset = arg('model', 'mid');
  const impls = list('impls', 'ours,ours-sdpa,plain,hf-eager,hf-sdpa,python-eager');
  const { checkpoint, modelDir } = prepare(preset);
  warmPageCache(modelDir);
  warmPageCache(checkpoint);
  const setup = { bench: 'generate', setup: true, model: preset, threads, new_tokens: newTokens, runs, warmup, cold_runs: coldRuns, ...machine() };
  printJson(setup);
  const bw = measureBandwidth(threads);
  printJson({ bench: 'generate', ...bw });
  const lm = lmBytesPerStep(modelDir);
  const floor = floorMs(lm.bytes, bw.best_gb_s);
  printJson({ bench: 'generate', event: 'floor', lm_bytes_per_step: lm.bytes, lm_dtypes: lm.dtypes, read_gb_s: bw.best_gb_s, floor_ms_per_token: round(floor) });

  const script = __filename;
  const common = ['--child', '--model-dir', modelDir, '--threads', String(threads), '--new-tokens', String(newTokens), '--warmup', String(warmup)];
  const hf = (attn: string) => (i: number) => Promise.resolve(runPython(path.join(ROOT, 'bench', 'hf_generate.py'), [
    '--checkpoint', checkpoint, '--attn', attn, '--threads', String(threads), '--new-tokens', String(newTokens),
    '--runs', String(runs), '--warmup', String(warmup), ...(i > 0 ? ['--first-only'] : [])]));
  const results: Result[] = [];
  for (const impl of impls) {
    if (impl === 'ours' || impl === 'ours-sdpa' || impl === 'plain') {
      const env = impl === 'plain' ? { BLIP2_LINEAR_KERNEL: 'off' } : {};
      const name = { ours: 'blip2-node', 'ours-sdpa': "blip2-node attention: 'sdpa'", plain: 'blip2-node plain (BLIP2_LINEAR_KERNEL=off)' }[impl];
      results.push(await measure(name, (i) => runChild(script, [...common, '--warm-runs', i === 0 ? String(runs) : '0',
        '--attention', impl === 'ours-sdpa' ? 'sdpa' : 'eager', ...(i === 0 && impl === 'ours' ? ['--print-kernels'] : [])], env)));
    } else if (impl === 'hf-eager' || impl === 'hf-sdpa') {
      results.push(await measure(`transformers ${impl.slice(3)}`, hf(impl.slice(3))));
    } else if (impl === 'python-eager') {
      // The exporter's modules without TorchScript over the runtime's slot cache (warm only).
      const [row] = runPython(path.join(ROOT, 'bench', 'python_eager.py'), ['--checkpoint', checkpoint, '--batch', '1',
        '--new-tokens', String(newTokens), '--threads', String(threads), '--runs', String(runs), '--warmup', String(warmup)]);
      printJson({ bench: 'generate', ...row, event: 'warm' });
      const nan = { ttft_ms: NaN, ms_per_token: NaN, total_ms: NaN };
      results.push({ impl: 'python-eager (exporter modules)', load_ms: NaN, first: nan, warm: { ...row, image_features_ms: row.image_encode_ms } as Timing });
    } else {
      throw new Error(`unknown impl ${impl}`);
    }
  }

  const fmt = (v: number, d = 1) => (Number.isFinite(v) ? v.toFixed(d) : '');
  console.log(`\nmachine: ${setup.cpu} x${setup.cpus}, ${setup.mem_gib} GiB, load average ${setup.loadavg_1m} at the start; ` +
    `model ${preset}; ${threads} threads; ${newTokens} new tokens; warm: medians of ${runs} after ${warmup} warm-ups; ` +
    `first: medians of ${coldRuns} fresh processes; read bandwidth ${bw.best_gb_s} GB/s; LM ${(lm.bytes / 1e6).toFixed(1)} MB per step ` +
    `(${lm.dtypes.join('/')}) -> floor ${floor.toFixed(1)} ms/token`);
  console.log('| impl | load ms | first caption ms | image features ms | warm TTFT ms | warm ms/token | warm total ms | first / warm | ms/token / floor |');
  console.log('|---|---|---|---|---|---|---|---|---|');
  for (const r of results) {
    console.log(`| ${r.impl} | ${fmt(r.load_ms, 0)} | ${fmt(r.first.total_ms, 0)} | ${fmt(r.warm.image_features_ms ?? NaN)} | ${fmt(r.warm.ttft_ms)} | ${fmt(r.warm.ms_per_token, 2)} | ` +
      `${fmt(r.warm.total_ms, 0)} | ${fmt(r.first.total_ms / r.warm.total_ms, 2)} | ${fmt(r.warm.ms_per_token / floor, 2)} |`);
  }
  const ours = results.filter((r) => r.impl.startsWith('blip2-node'));
  const theirs = results.filter((r) => r.impl.startsWith('transformers'));
  if (ours.length && theirs.length) {
    console.log('\nours / transformers (time ratios, below 1 = ours faster)');
    console.log('| ours | transformers | TTFT | ms/token | total |');
    console.log('|---|---|---|---|---|');
    for (const o of ours) {
      for (const t of theirs) {
        console.log(`| ${o.impl} | ${t.impl} | ${fmt(o.warm.ttft_ms / t.warm.ttft_ms, 2)} | ${fmt(o.warm.ms_per_token / t.warm.ms_per_token, 2)} | ` +
          `${fmt(o.warm.total_ms / t.warm.total_ms, 2)} |`);
      }
    }
  }
}

(flag('child') ? child() : main()).catch((e) => {
  console.error(e);
  process.exit(1);
});
