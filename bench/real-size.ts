// The real size: a random-weight bfloat16 checkpoint with blip2-opt-2.7b's configuration (ViT-g
// 1408 x 39 at 224, Q-Former 768 x 12, 32 queries, OPT-2.7B 2560 x 32, vocabulary 50272), made by
// transformers 5 without float32 weights (bench/hf_real_size.py), exported by us in bfloat16, then
// captioned by blip2-node and by transformers 5.18 in bfloat16, in one run.
//
//   npx tsx bench/real-size.ts [--skip checkpoint,export,ours,hf] [--force] [--threads 2] [--new-tokens 20]
//       [--runs 3] [--warmup 1] [--reduced | --vision-layers N --qformer-layers N --text-layers N]
//
// Stages, each in its own process, one after another (the 7.7 GB of weights are never in two
// processes at once):
//   checkpoint  bench/hf_real_size.py -> bench/.cache/<name>-checkpoint (sharded safetensors, 2 GB
//               shards); kept when present (--force remakes it)
//   export      python -m blip2_export <checkpoint> <model> --dtype bfloat16 (what `blip2 export
//               --dtype bfloat16` runs) -> bench/.cache/<name>-model; kept when present
//   ours        page cache warmed, then a fresh Node process: fromPretrained (load ms, RSS), the
//               first caption, --warmup more, then --runs captions (TTFT, ms/token) and
//               getImageFeatures, peak RSS (VmHWM); bench/generate.ts's measuring child
//   hf          page cache warmed, then bench/hf_generate.py --dtype bfloat16 --attn sdpa: the same
//               figures for transformers' Blip2ForConditionalGeneration.generate
// Peak RSS of the checkpoint and export processes: /usr/bin/time -v. The weight-read floor: the
// exported LM's bytes per decode step (bfloat16, the head included) / the read bandwidth measured at
// the start. --skip leaves stages out (a skipped checkpoint/export must already be cached).
// --reduced: 2 vision, 2 Q-Former and 2 OPT layers of the real widths (bench/.cache/real-size-reduced-*),
// to validate the script in minutes.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

import {
  arg, CACHE, flag, floorMs, list, lmBytesPerStep, machine, measureBandwidth, printJson, pythonBin, round, runChild,
  runPython, ROOT, warmPageCache,
} from './common';

const threads = Number(arg('threads', '2'));
const newTokens = Number(arg('new-tokens', '20'));
const runs = Number(arg('runs', '3'));
const warmup = Number(arg('warmup', '1'));
const skip = new Set(list('skip', ''));
const force = flag('force');
const reduced = flag('reduced');
const layers = {
  vision: Number(arg('vision-layers', reduced ? '2' : '39')),
  qformer: Number(arg('qformer-layers', reduced ? '2' : '12')),
  text: Number(arg('text-layers', reduced ? '2' : '32')),
};
const full = layers.vision === 39 && layers.qformer === 12 && layers.text === 32;
const name = full ? 'real-size' : `real-size-v${layers.vision}-q${layers.qformer}-t${layers.text}`;
const checkpoint = path.join(CACHE, `${name}-checkpoint`);
const modelDir = path.join(CACHE, `${name}-model`);

/** Runs a command under /usr/bin/time -v (when there is one): its exit status, seconds, peak RSS and stdout. */
function timed(cmd: string, args: string[], cwd: string): { seconds: number; peak_rss_mb: number | null; stdout: string } {
  const haveTime = fs.existsSync('/usr/bin/time');
  const start = performance.now();
  const r = haveTime
    ? spawnSync('/usr/bin/time', ['-v', cmd, ...args], { cwd, encoding: 'utf8', maxBuffer: 64 << 20 })
    : spawnSync(cmd, args, { cwd, encoding: 'utf8', maxBuffer: 64 << 20 });
  const seconds = (performance.now() - start) / 1e3;
  const rss = /Maximum resident set size \(kbytes\): (\d+)/.exec(r.stderr ?? '');
  if (r.status !== 0) {
    process.stderr.write(r.stderr ?? '');
    throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal})`);
  }
  return { seconds, peak_rss_mb: rss ? round(Number(rss[1]) / 1024, 1) : null, stdout: r.stdout };
}

async function main(): Promise<void> {
  const setup = { bench: 'real-size', setup: true, name, layers, threads, new_tokens: newTokens, runs, warmup, skip: [...skip], ...machine() };
  printJson(setup);
  const bw = measureBandwidth(threads);
  printJson({ bench: 'real-size', ...bw });
  const summary: Record<string, Record<string, any>> = {};

  if (!skip.has('checkpoint')) {
    if (force || !fs.existsSync(path.join(checkpoint, 'config.json'))) {
      fs.rmSync(checkpoint, { recursive: true, force: true });
      const t = timed(pythonBin(), [path.join(ROOT, 'bench', 'hf_real_size.py'), checkpoint, '--vision-layers', String(layers.vision),
        '--qformer-layers', String(layers.qformer), '--text-layers', String(layers.text)], ROOT);
      const made = JSON.parse(t.stdout.trim().split('\n').filter((l) => l.startsWith('{')).pop()!);
      summary.checkpoint = { ...made, seconds: round(t.seconds, 1), peak_rss_mb: t.peak_rss_mb };
    } else {
      summary.checkpoint = { cached: true };
    }
    printJson({ bench: 'real-size', stage: 'checkpoint', dir: checkpoint, ...summary.checkpoint });
  }
  if (!skip.has('export')) {
    if (force || !fs.existsSync(path.join(modelDir, 'manifest.json'))) {
      fs.rmSync(modelDir, { recursive: true, force: true });
      const t = timed(pythonBin(), ['-m', 'blip2_export', checkpoint, modelDir, '--dtype', 'bfloat16'], path.join(ROOT, 'export'));
      summary.export = { seconds: round(t.seconds, 1), peak_rss_mb: t.peak_rss_mb };
    } else {
      summary.export = { cached: true };
    }
    printJson({ bench: 'real-size', stage: 'export', dir: modelDir, ...summary.export });
  }

  let floor: number | undefined;
  if (fs.existsSync(path.join(modelDir, 'manifest.json'))) {
    const lm = lmBytesPerStep(modelDir);
    floor = floorMs(lm.bytes, bw.best_gb_s);
    printJson({ bench: 'real-size', event: 'floor', lm_bytes_per_step: lm.bytes, lm_dtypes: lm.dtypes, read_gb_s: bw.best_gb_s, floor_ms_per_token: round(floor) });
  }

  const measureArgs = ['--threads', String(threads), '--new-tokens', String(newTokens), '--warmup', String(warmup)];
  if (!skip.has('ours')) {
    warmPageCache(modelDir);
    const lines = await runChild(path.join(ROOT, 'bench', 'generate.ts'), ['--child', '--model-dir', modelDir, '--warm-runs', String(runs),
      '--print-kernels', ...measureArgs]);
    const row: Record<string, any> = { impl: 'blip2-node' };
    for (const l of lines) {
      printJson({ bench: 'real-size', stage: 'ours', ...l });
      if (l.event === 'load') Object.assign(row, { load_s: round(l.load_ms / 1e3, 2), rss_after_load_mb: l.rss_mb });
      if (l.event === 'first') row.first = l;
      if (l.event === 'warm') row.warm = l;
    }
    summary.ours = row;
  }
  if (!skip.has('hf')) {
    warmPageCache(checkpoint);
    const row: Record<string, any> = { impl: 'transformers sdpa' };
    for (const l of runPython(path.join(ROOT, 'bench', 'hf_generate.py'), ['--checkpoint', checkpoint, '--dtype', 'bfloat16', '--attn', 'sdpa',
      '--runs', String(runs), ...measureArgs])) {
      printJson({ bench: 'real-size', stage: 'hf', ...l });
      if (l.event === 'load') Object.assign(row, { load_s: l.load_s, rss_after_load_mb: l.rss_mb });
      if (l.event === 'first') row.first = l;
      if (l.event === 'warm') row.warm = l;
    }
    summary.hf = row;
  }

  const fmt = (v: unknown, d = 1) => (typeof v === 'number' && Number.isFinite(v) ? v.toFixed(d) : '');
  console.log(`\nmachine: ${setup.cpu} x${setup.cpus}, ${setup.mem_gib} GiB, load average ${setup.loadavg_1m} at the start; ${name} ` +
    `(vision ${layers.vision}, Q-Former ${layers.qformer}, OPT ${layers.text} layers), bfloat16; ${threads} threads; ${newTokens} new tokens; ` +
    `warm: medians of ${runs} after ${warmup + 1} captions; read bandwidth ${bw.best_gb_s} GB/s` + (floor ? `; floor ${floor.toFixed(1)} ms/token` : ''));
  if (summary.checkpoint || summary.export) {
    console.log('| stage | seconds | peak RSS MiB |');
    console.log('|---|---|---|');
    for (const stage of ['checkpoint', 'export']) {
      const s = summary[stage];
      if (s) console.log(`| ${stage} | ${s.cached ? 'cached' : fmt(s.seconds)} | ${s.cached ? '' : fmt(s.peak_rss_mb, 0)} |`);
    }
  }
  const impls = [summary.ours, summary.hf].filter(Boolean);
  if (impls.length) {
    console.log('');
    console.log('| impl | load s | RSS after load MiB | first caption: TTFT ms | ms/token | image features ms | TTFT ms | ms/token | ms/token / floor | peak RSS MiB |');
    console.log('|---|---|---|---|---|---|---|---|---|---|');
    for (const r of impls) {
      console.log(`| ${r.impl} | ${fmt(r.load_s, 2)} | ${fmt(r.rss_after_load_mb, 0)} | ${fmt(r.first?.ttft_ms, 0)} | ${fmt(r.first?.ms_per_token)} | ` +
        `${fmt(r.warm?.image_features_ms, 0)} | ${fmt(r.warm?.ttft_ms, 0)} | ${fmt(r.warm?.ms_per_token)} | ` +
        `${floor ? fmt(r.warm?.ms_per_token / floor, 2) : ''} | ${fmt(r.warm?.peak_rss_mb, 0)} |`);
    }
  }
  if (summary.ours?.warm && summary.hf?.warm) {
    const o = summary.ours.warm;
    const h = summary.hf.warm;
    console.log(`\nours / transformers (time): TTFT ${(o.ttft_ms / h.ttft_ms).toFixed(2)}, ms/token ${(o.ms_per_token / h.ms_per_token).toFixed(2)}, ` +
      `total ${(o.total_ms / h.total_ms).toFixed(2)}; peak RSS ${(o.peak_rss_mb / h.peak_rss_mb).toFixed(2)}`);
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
