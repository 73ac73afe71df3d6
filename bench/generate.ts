// Caption latency benchmark: time to first token and ms per new token, batch 1 and 8, for the tiny
// fixture model and a mid-size random model (vision 384x6 @224, Q-Former 384x6 with cross-attention
// every 2nd layer, 32 queries, OPT 768x12, 50,272 vocabulary), against the same checkpoints run
// eagerly by the exporter's Python modules (bench/python_eager.py) on the same number of threads.
//
//   npx tsx bench/generate.ts [--models tiny,mid] [--batches 1,8] [--threads 2] [--new-tokens 20] [--runs 5]
//
// Prints one JSON line per measurement and a summary table (markdown) at the end.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { Blip2ForConditionalGeneration, Tensor, setNumThreads, stats } from '../lib';
import { resolvePython } from '../lib/cli/export';

const ROOT = path.resolve(__dirname, '..');
const CACHE = path.join(ROOT, 'bench', '.cache');
const PYTHON = resolvePython();

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const models = arg('models', 'tiny,mid').split(',');
const batches = arg('batches', '1,8').split(',').map(Number);
const threads = Number(arg('threads', '2'));
const newTokens = Number(arg('new-tokens', '20'));
const runs = Number(arg('runs', '5'));
// 'auto': the default runtime (the product kernel where the load-time timing chose it); 'plain':
// BLIP2_LINEAR_KERNEL=off (libtorch's products only), to show what the kernel is worth.
const variants = arg('variants', 'auto,plain').split(',');

function run(cmd: string, args: string[], cwd = ROOT): void {
  const r = spawnSync(cmd, args, { cwd, stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed`);
}

/** HF-format checkpoint + exported model folder for a preset, cached in bench/.cache. */
function prepare(preset: string): { checkpoint: string; modelDir: string } {
  const checkpoint = preset === 'tiny' ? path.join(ROOT, 'test', 'fixtures', 'tiny-opt') : path.join(CACHE, `${preset}-checkpoint`);
  const modelDir = path.join(CACHE, `${preset}-model`);
  fs.mkdirSync(CACHE, { recursive: true });
  if (preset !== 'tiny' && !fs.existsSync(path.join(checkpoint, 'model.safetensors'))) {
    run(PYTHON, ['-m', 'blip2_export.tiny', checkpoint, '--preset', preset, '--seed', '1'], path.join(ROOT, 'export'));
  }
  if (!fs.existsSync(path.join(modelDir, 'manifest.json'))) {
    run(PYTHON, ['-m', 'blip2_export', checkpoint, modelDir], path.join(ROOT, 'export'));
  }
  return { checkpoint, modelDir };
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function randomPixels(batch: number, size: number, seed: number): Tensor {
  // Deterministic normal-ish noise (sum of uniforms) so every run sees the same input.
  let state = seed >>> 0 || 1;
  const next = () => ((state = (Math.imul(state, 1664525) + 1013904223) >>> 0) / 4294967296);
  const data = new Float32Array(batch * 3 * size * size);
  for (let i = 0; i < data.length; i++) data[i] = next() + next() + next() - 1.5;
  return Tensor.from(data, [batch, 3, size, size]);
}

interface Row { impl: string; model: string; batch: number; threads: number; ttft_ms: number; ms_per_token: number; total_ms: number; new_tokens: number }

async function benchNode(preset: string, modelDir: string, batch: number, variant: string): Promise<Row> {
  // Read by the runtime when it loads a model.
  if (variant === 'plain') process.env.BLIP2_LINEAR_KERNEL = 'off';
  else delete process.env.BLIP2_LINEAR_KERNEL;
  const model = await Blip2ForConditionalGeneration.fromPretrained(modelDir);
  const pixels = randomPixels(batch, (model.manifest.image_size as [number, number])[0], 1);
  const once = async () => {
    const start = performance.now();
    let first = 0;
    const out = await model.generate({ pixelValues: pixels }, {
      maxNewTokens: newTokens,
      eosTokenId: [], // no early stop: every run makes newTokens tokens per row, like the Python baseline
      onStep: (e) => {
        if (e.step === 0) first = performance.now();
      },
    });
    const end = performance.now();
    out.dispose();
    return { ttft: first - start, perToken: (end - first) / Math.max(newTokens - 1, 1), total: end - start };
  };
  await once(); // warm-up (TorchScript's profiling executor optimises on the first calls)
  await once();
  const results = [];
  for (let i = 0; i < runs; i++) results.push(await once());
  model.dispose();
  return {
    impl: variant === 'plain' ? 'blip2-node (BLIP2_LINEAR_KERNEL=off)' : 'blip2-node', model: preset, batch, threads,
    ttft_ms: +median(results.map((r) => r.ttft)).toFixed(3),
    ms_per_token: +median(results.map((r) => r.perToken)).toFixed(3),
    total_ms: +median(results.map((r) => r.total)).toFixed(3),
    new_tokens: newTokens,
  };
}

function benchPython(preset: string, checkpoint: string, batch: number): Row {
  const out = execFileSync(PYTHON, [path.join(ROOT, 'bench', 'python_eager.py'), '--checkpoint', checkpoint, '--batch', String(batch),
    '--new-tokens', String(newTokens), '--threads', String(threads), '--runs', String(runs), '--warmup', '2'], { encoding: 'utf8' });
  const row = JSON.parse(out.trim().split('\n').pop()!);
  return { impl: 'python-eager', model: preset, batch, threads, ttft_ms: row.ttft_ms, ms_per_token: row.ms_per_token, total_ms: row.total_ms, new_tokens: newTokens };
}

(async () => {
  await setNumThreads(threads);
  const rows: Row[] = [];
  for (const preset of models) {
    const { checkpoint, modelDir } = prepare(preset);
    for (const batch of batches) {
      const measured: Row[] = [];
      for (const variant of variants) measured.push(await benchNode(preset, modelDir, batch, variant));
      measured.push(benchPython(preset, checkpoint, batch));
      for (const row of measured) {
        console.log(JSON.stringify(row));
        rows.push(row);
      }
    }
  }
  console.log(`\nmachine: ${os.cpus()[0].model} x${os.cpus().length}, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB; threads ${threads}; ${newTokens} new tokens; medians of ${runs} runs`);
  console.log('| model | batch | impl | TTFT ms | ms/token | total ms | speed-up (total) |');
  console.log('|---|---|---|---|---|---|---|');
  for (const row of rows) {
    const python = rows.find((r) => r.impl === 'python-eager' && r.model === row.model && r.batch === row.batch)!;
    const speedup = row.impl.startsWith('blip2-node') ? `${(python.total_ms / row.total_ms).toFixed(2)}x` : '';
    console.log(`| ${row.model} | ${row.batch} | ${row.impl} | ${row.ttft_ms} | ${row.ms_per_token} | ${row.total_ms} | ${speedup} |`);
  }
  console.error(`stats: ${JSON.stringify(stats())}`);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
