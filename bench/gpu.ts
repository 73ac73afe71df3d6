// The GPU benchmark of issue 11 (bench/gpu.sh runs it, with bench/hf_gpu.py for transformers):
// blip2-node through its public API on one exported model, in one process.
//
//   tsx bench/gpu.ts --model <dir> [--device cuda] [--dtype float16] [--attention eager]
//       [--new-tokens 32] [--runs 5] [--warmup 2] [--encode-batches 1,32] [--batches 1,8,64]
//       [--concurrency 64] [--requests 256] [--max-seconds 60] [--bandwidth-gb-s G] [--threads N]
//       [--encode-batch N (fromPretrained's encodeBatch; default the library's)]
//   tsx bench/gpu.ts --write-pixels <file.f32> --count 64 --size 224   (the pixels hf_gpu.py reads)
//   tsx bench/gpu.ts --report <dir> --out <results.md>                (the tables, from <dir>/*.jsonl)
//
// Inputs: image i is row i of seededPixels(64, size, 1) (float32, made on the model's device once);
// the prompt is [<image>] x num_query_tokens + BOS (OPT) or + </s> (T5: what the tokenizer gives
// for ''), i.e. a caption; greedy; EOS disabled (eosTokenId: []) so every call makes exactly
// --new-tokens tokens, and the count is checked. hf_gpu.py reads the same pixels and ids.
// Figures (JSON lines, then a table); warm: medians of --runs after --warmup untimed calls:
//   encode      getImageFeatures (vision + Q-Former + projection, the generate path's encode)
//               at each --encode-batches size, until a 1-element slice of the result is on the host
//               (so the GPU work is finished, not just queued)
//   caption     batch 1: TTFT = the call until onStep's step 0 (encode + prefill + first choice);
//               ms/token = the rest / (new tokens - 1)
//   decode      one generate() call of B images for B in --batches: ms per step (= ms/token of
//               each sequence) and B x 1000 / that = tokens/s
//   concurrent  closedLoop (bench/common.ts) of --concurrency clients, each one 1-image caption
//               call at a time, after one untimed wave: tokens/s = completed x new tokens /
//               elapsed (encode and prefill included), latency p50/p99, mean rows per decode step
//   floor       the LM's weights one decode step reads (OPT: lmBytesPerStep, the head included;
//               T5: the decoder less its cross-attention k/v, and the head) / --bandwidth-gb-s
//               (what bench/gpubw.py measured: device-to-device copy, read + written bytes)
//   memory      peak RSS here; peak GPU memory is sampled outside (nvidia-smi, bench/gpu.sh)
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { Blip2ForConditionalGeneration, Tensor } from '../lib';

// Arguments are read here without ./common, and ../lib and ./common are imported by the modes
// that measure: they load the addon, which --report must not need (it tabulates whatever the run
// produced, a failed build included).
function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}
function flag(name: string): boolean {
  return process.argv.includes(`--${name}`);
}

const IMAGES = 64; // distinct seeded images; request i uses image i % 64

function ints(name: string, fallback: string): number[] {
  return arg(name, fallback).split(',').filter(Boolean).map(Number);
}

/** Prompt ids of a caption as the model's tokenizer gives them for '' (see the header). */
function captionIds(model: Blip2ForConditionalGeneration): number[] {
  const m = model.manifest;
  if (m.image_token_index === null) throw new Error(`${model.modelDir}: no image_token_index (legacy export); this benchmark wants a 5.x-style checkpoint`);
  const last = m.architecture === 't5' ? m.special_tokens.eos_token_id?.[0] : m.special_tokens.bos_token_id;
  if (last === undefined || last === null) throw new Error(`${model.modelDir}: no ${m.architecture === 't5' ? 'eos' : 'bos'} token id`);
  return [...Array<number>(m.num_query_tokens).fill(m.image_token_index), last];
}

async function bench(): Promise<void> {
  /* eslint-disable @typescript-eslint/no-require-imports */
  const lib = require('../lib') as typeof import('../lib');
  const { closedLoop, floorMs, lmBytesPerStep, machine, median, printJson, quantile, round, rssMb, seededPixels, weightIndex } =
    require('./common') as typeof import('./common');
  /* eslint-enable @typescript-eslint/no-require-imports */
  const { Blip2ForConditionalGeneration: Model, Tensor: TensorClass, devices, setNumThreads, stats, versions } = lib;
  const printed: Row[] = [];
  const emit = (row: Row) => { printJson(row); printed.push(row); };
  const modelDir = arg('model', '');
  if (!modelDir) throw new Error('--model <dir> is required');
  const device = arg('device', 'cuda');
  const dtype = arg('dtype', 'float16') as 'float32' | 'float16' | 'bfloat16';
  const attention = arg('attention', 'eager') as 'eager' | 'sdpa';
  const newTokens = Number(arg('new-tokens', '32'));
  const runs = Number(arg('runs', '5'));
  const warmup = Number(arg('warmup', '2'));
  const encodeBatches = ints('encode-batches', '1,32');
  const batches = ints('batches', '1,8,64');
  const concurrency = Number(arg('concurrency', '64'));
  const requests = Number(arg('requests', String(4 * concurrency)));
  const maxSeconds = Number(arg('max-seconds', '60'));
  const bandwidth = Number(arg('bandwidth-gb-s', 'NaN'));
  const threads = arg('threads', '');
  if (threads) await setNumThreads(Number(threads));
  const base = { bench: 'gpu', impl: 'blip2-node', device, dtype, attention, new_tokens: newTokens };
  emit({ ...base, event: 'setup', model: path.resolve(modelDir), versions, devices: devices(), runs, warmup, ...machine() });

  const slots = Math.max(concurrency, ...batches);
  const manifest = JSON.parse(fs.readFileSync(path.join(modelDir, 'manifest.json'), 'utf8'));
  // Positions per slot: the prompt (queries + 1 for OPT; T5's decoder holds its start id) and the
  // new tokens, rounded up; the whole-context default (512) would make 64 slots of OPT-2.7B 22 GB.
  const promptLength = manifest.architecture === 't5' ? 1 : manifest.num_query_tokens + 1;
  const maxLength = Math.ceil((promptLength + newTokens + 1) / 16) * 16;
  const t0 = performance.now();
  const model = await Model.fromPretrained(modelDir, {
    device, dtype, attention, maxBatchSize: slots, maxLength, kvCacheMaxBytes: 64 * 2 ** 30,
    ...(arg('encode-batch', '') ? { encodeBatch: Number(arg('encode-batch', '')) } : {}),
  });
  const loadMs = performance.now() - t0;
  const size = model.manifest.image_size![0];
  const ms = model.stats();
  emit({ ...base, event: 'load', load_ms: round(loadMs), slots: ms.slots, max_length: ms.maxLength, kv_cache_bytes: ms.kvCacheBytes,
    architecture: model.manifest.architecture, ...rssMb() });

  const all = seededPixels(IMAGES, size, 1);
  const per = 3 * size * size;
  const pixelsOf = (count: number, first = 0) => {
    const data = new Float32Array(count * per);
    for (let i = 0; i < count; i++) data.set(all.subarray(((first + i) % IMAGES) * per, ((first + i) % IMAGES + 1) * per), i * per);
    return TensorClass.from(data, [count, 3, size, size], { device: model.device });
  };
  const ids = captionIds(model);
  const idsOf = (count: number) => ({
    inputIds: TensorClass.from(BigInt64Array.from({ length: count * ids.length }, (_, i) => BigInt(ids[i % ids.length])), [count, ids.length]),
    attentionMask: TensorClass.from(new BigInt64Array(count * ids.length).fill(1n), [count, ids.length]),
  });

  // Image encoding.
  for (const b of encodeBatches) {
    const pixels = pixelsOf(b);
    const once = async () => {
      const t = performance.now();
      const feats = await model.getImageFeatures(pixels);
      const one = await (await feats.narrow(0, 0, 1)).narrow(1, 0, 1);
      await one.toArray(); // waits for the device
      const elapsed = performance.now() - t;
      one.dispose();
      feats.dispose();
      return elapsed;
    };
    for (let i = 0; i < warmup; i++) await once();
    const times: number[] = [];
    for (let i = 0; i < runs; i++) times.push(await once());
    emit({ ...base, event: 'encode', batch: b, ms: round(median(times)), ms_per_image: round(median(times) / b), via: 'getImageFeatures' });
    pixels.dispose();
  }

  // One generate() call of b images: TTFT and ms per decode step.
  const generateOnce = async (pixels: Tensor, prompt: { inputIds: Tensor; attentionMask: Tensor }, b: number) => {
    const start = performance.now();
    let first = 0;
    const out = await model.generate({ pixelValues: pixels, ...prompt }, {
      maxNewTokens: newTokens, eosTokenId: [], onStep: (e: { step: number }) => { if (e.step === 0) first = performance.now(); },
    });
    const end = performance.now();
    const made = out.shape[1] - (model.manifest.architecture === 't5' ? 1 : ids.length);
    const rows = out.shape[0];
    out.dispose();
    if (made !== newTokens || rows !== b) throw new Error(`made ${rows} x ${made} tokens, not ${b} x ${newTokens}`);
    return { ttft_ms: first - start, ms_per_token: (end - first) / Math.max(newTokens - 1, 1), total_ms: end - start };
  };
  for (const b of batches) {
    const pixels = pixelsOf(b);
    const prompt = idsOf(b);
    for (let i = 0; i < warmup; i++) await generateOnce(pixels, prompt, b);
    const results: Array<{ ttft_ms: number; ms_per_token: number; total_ms: number }> = [];
    for (let i = 0; i < runs; i++) results.push(await generateOnce(pixels, prompt, b));
    const m = (key: 'ttft_ms' | 'ms_per_token' | 'total_ms') => median(results.map((r) => r[key]));
    emit({ ...base, event: 'decode', batch: b, ttft_ms: round(m('ttft_ms')), ms_per_token: round(m('ms_per_token')),
      total_ms: round(m('total_ms')), tokens_per_s: round((b * 1000) / m('ms_per_token'), 1),
      e2e_tokens_per_s: round((b * newTokens * 1000) / m('total_ms'), 1) });
    pixels.dispose();
    prompt.inputIds.dispose();
    prompt.attentionMask.dispose();
  }

  // Closed loop of `concurrency` clients, 1-image captions.
  if (concurrency > 0) {
    const singles = Array.from({ length: IMAGES }, (_, i) => pixelsOf(1, i));
    const prompt = idsOf(1);
    const send = async (i: number) => { await generateOnce(singles[i % IMAGES], prompt, 1); };
    await Promise.all(Array.from({ length: concurrency }, (_, i) => send(i))); // one untimed wave
    const before = stats().decodeSteps;
    const loop = await closedLoop(concurrency, requests, maxSeconds, send);
    const steps = stats().decodeSteps - before;
    emit({ ...base, event: 'concurrent', concurrency, completed: loop.completed, seconds: round(loop.seconds),
      tokens_per_s: round((loop.completed * newTokens) / loop.seconds, 1), requests_per_s: round(loop.completed / loop.seconds, 2),
      p50_ms: round(median(loop.latencies_ms)), p99_ms: round(quantile(loop.latencies_ms, 0.99)),
      // Nothing runs before or after the loop, so its decode steps made completed x (N - 1) tokens
      // (the first token of each call comes from its prefill).
      decode_steps: steps, rows_per_step: round((loop.completed * (newTokens - 1)) / Math.max(steps, 1), 2) });
    for (const t of singles) t.dispose();
  }

  const lm = model.manifest.architecture === 't5' ? t5DecoderBytesPerStep(modelDir, weightIndex) : lmBytesPerStep(modelDir);
  emit({ ...base, event: 'floor', lm_bytes_per_step: lm.bytes, lm_dtypes: lm.dtypes, copy_gb_s: bandwidth,
    floor_ms_per_token: Number.isFinite(bandwidth) ? round(floorMs(lm.bytes, bandwidth), 4) : null });
  emit({ ...base, event: 'end', ...rssMb(), model_stats: model.stats() });
  await model.dispose();
  console.log(['', ...figureTable(printed, [])].join('\n'));
}

/**
 * T5's decode step reads the decoder and the head, not the encoder (lmBytesPerStep counts every
 * language_model.* tensor, right for OPT only), nor the cross-attention k/v projections (their
 * keys and values of the encoder output are cached at prefill); the shared embedding: one row.
 */
function t5DecoderBytesPerStep(modelDir: string, index: (dir: string) => Record<string, { dtype: string; data_offsets: [number, number] }>): { bytes: number; dtypes: string[] } {
  let bytes = 0;
  const dtypes = new Set<string>();
  for (const [name, e] of Object.entries(index(modelDir))) {
    const read = name === 'language_model.lm_head.weight' ||
      (name.startsWith('language_model.decoder.') && !/EncDecAttention\.[kv]\.weight$/.test(name) && !name.endsWith('embed_tokens.weight'));
    if (!read) continue;
    bytes += e.data_offsets[1] - e.data_offsets[0];
    dtypes.add(e.dtype);
  }
  return { bytes, dtypes: [...dtypes] };
}

/** The pixels of images 0..count-1 as raw float32, [count, 3, size, size], for hf_gpu.py. */
async function writePixels(): Promise<void> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { seededPixels } = require('./common') as typeof import('./common');
  const file = arg('write-pixels', '');
  const count = Number(arg('count', String(IMAGES)));
  const size = Number(arg('size', '224'));
  const data = seededPixels(count, size, 1);
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  fs.writeFileSync(file, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  fs.writeFileSync(`${file}.json`, JSON.stringify({ shape: [count, 3, size, size], dtype: 'float32', source: 'seededPixels(count, size, 1)' }));
}

// ------------------------------------------------------------------------------------ report

type Row = Record<string, any>;
function readLines(file: string): Row[] {
  if (!fs.existsSync(file)) return [];
  return fs.readFileSync(file, 'utf8').split('\n').filter((l) => l.startsWith('{')).flatMap((l) => {
    try { return [JSON.parse(l)]; } catch { return []; }
  });
}

const fmt = (v: unknown, d = 1) => (typeof v === 'number' && Number.isFinite(v) ? v.toFixed(d) : 'n/a');
const get = (rows: Row[], event: string, pred: (r: Row) => boolean = () => true) => rows.find((r) => r.event === event && pred(r));

/** The figures of one model, blip2-node's and (when there are any) transformers', as markdown rows. */
function figureTable(ours: Row[], hf: Row[]): string[] {
  const batchesOf = (rows: Row[], event: string) => rows.filter((r) => r.event === event).map((r) => r.batch as number);
  const encodeBs = [...new Set([...batchesOf(ours, 'encode'), ...batchesOf(hf, 'encode')])].sort((a, b) => a - b);
  const decodeBs = [...new Set([...batchesOf(ours, 'decode'), ...batchesOf(hf, 'decode')])].sort((a, b) => a - b);
  const conc = get(ours, 'concurrent');
  const hfConc = get(hf, 'static_batch');
  const rows: Array<[string, (r: Row[]) => string]> = [
    ['load s (fromPretrained / from_pretrained + .to(device))', (r) => { const l = get(r, 'load'); return fmt(l?.load_s ?? (l?.load_ms ?? NaN) / 1e3, 2); }],
    ...encodeBs.map((b): [string, (r: Row[]) => string] => [`image encode ms, batch ${b}`, (r) => fmt(get(r, 'encode', (x) => x.batch === b)?.ms)]),
    ['TTFT ms (caption, batch 1)', (r) => fmt(get(r, 'decode', (x) => x.batch === 1)?.ttft_ms)],
    ...decodeBs.map((b): [string, (r: Row[]) => string] => [`ms/token, batch ${b}`, (r) => fmt(get(r, 'decode', (x) => x.batch === b)?.ms_per_token, 2)]),
    ...decodeBs.map((b): [string, (r: Row[]) => string] => [`decode tokens/s, batch ${b}`, (r) => fmt(get(r, 'decode', (x) => x.batch === b)?.tokens_per_s, 0)]),
    [`tokens/s at concurrency ${conc?.concurrency ?? hfConc?.batch ?? ''} (ours: closed loop; transformers: one static batch)`,
      (r) => fmt((get(r, 'concurrent') ?? get(r, 'static_batch'))?.tokens_per_s, 0)],
    ['peak GPU memory MiB (nvidia-smi, above the idle reading)', (r) => fmt(get(r, 'gpu_memory')?.peak_mib, 0)],
    ['torch max_memory_allocated / reserved MiB', (r) => { const e = get(r, 'end'); return e?.max_memory_allocated_mib ? `${fmt(e.max_memory_allocated_mib, 0)} / ${fmt(e.max_memory_reserved_mib, 0)}` : 'n/a'; }],
    ['peak RSS MiB', (r) => fmt(get(r, 'end')?.peak_rss_mb, 0)],
  ];
  const lines = [hf.length ? '| figure | blip2-node | transformers eager |' : '| figure | blip2-node |', hf.length ? '|---|---|---|' : '|---|---|'];
  for (const [name, f] of rows) lines.push(hf.length ? `| ${name} | ${f(ours)} | ${f(hf)} |` : `| ${name} | ${f(ours)} |`);
  return lines;
}

/** results.md from <dir>/{bw,ours-opt,hf-opt,ours-t5,hf-t5}.jsonl (whatever exists). */
function report(): void {
  const dir = arg('report', '');
  const outFile = arg('out', path.join(dir, 'results.md'));
  const bw = readLines(path.join(dir, 'bw.jsonl')).find((r) => r.event === 'bandwidth');
  const lines: string[] = ['# GPU benchmark results (bench/gpu.sh)', ''];
  const setup = readLines(path.join(dir, 'ours-opt.jsonl')).find((r) => r.event === 'setup');
  lines.push(`Generated ${new Date().toISOString()}. ${bw ? `Copy bandwidth: ${fmt(bw.best_gb_s)} GB/s (${bw.device_name ?? bw.device}, read + written bytes, best of ${bw.repeats}). ` : 'No bandwidth measurement. '}` +
    (setup ? `blip2-node ${setup.versions?.package}, libtorch ${setup.versions?.libtorch}, CUDA ${setup.versions?.cuda}; ${setup.device} ${setup.dtype}, attention ${setup.attention}, ${setup.new_tokens} new tokens.` : ''));
  lines.push('');
  for (const family of ['opt', 't5']) {
    const ours = readLines(path.join(dir, `ours-${family}.jsonl`));
    const hf = readLines(path.join(dir, `hf-${family}.jsonl`));
    if (!ours.length && !hf.length) continue;
    const conc = get(ours, 'concurrent');
    const hfConc = get(hf, 'static_batch');
    const floor = get(ours, 'floor');
    lines.push(`## ${family === 'opt' ? 'blip2-opt-2.7b' : 'blip2-flan-t5-xl'} size, random weights`, '');
    lines.push(...figureTable(ours, hf));
    lines.push('');
    const o1 = get(ours, 'decode', (x) => x.batch === 1);
    const h1 = get(hf, 'decode', (x) => x.batch === 1);
    const floorMsPerToken = floor?.floor_ms_per_token as number | undefined;
    const goal = (name: string, value: number, target: string, ok: boolean, how: string) =>
      lines.push(`| ${name} | ${fmt(value, 2)} | ${target} | ${Number.isFinite(value) ? (ok ? 'yes' : 'no') : 'n/a'} | ${how} |`);
    lines.push('| goal (issue 11) | measured | target | met | from |', '|---|---|---|---|---|');
    const r1 = (o1?.ms_per_token ?? NaN) / (floorMsPerToken ?? NaN);
    goal('ms/token at batch 1 / floor', r1, '<= 1.3', r1 <= 1.3,
      `${fmt(o1?.ms_per_token, 2)} ms / ${fmt(floorMsPerToken, 3)} ms (${fmt((floor?.lm_bytes_per_step ?? NaN) / 1e9, 2)} GB per step / ${fmt(floor?.copy_gb_s)} GB/s)`);
    const r2 = (o1?.tokens_per_s ?? NaN) / (h1?.tokens_per_s ?? NaN);
    goal('tokens/s at batch 1, ours / transformers', r2, '>= 3', r2 >= 3, `${fmt(o1?.tokens_per_s, 0)} / ${fmt(h1?.tokens_per_s, 0)} (1000 / ms per token)`);
    const r3 = (conc?.tokens_per_s ?? NaN) / (hfConc?.tokens_per_s ?? NaN);
    goal(`tokens/s at concurrency ${conc?.concurrency ?? ''}, ours / transformers`, r3, '>= 5', r3 >= 5,
      `${fmt(conc?.tokens_per_s, 0)} / ${fmt(hfConc?.tokens_per_s, 0)} (closed loop vs one batch-${hfConc?.batch ?? ''} generate, encode and prefill included)`);
    const r4 = (o1?.ttft_ms ?? NaN) / (h1?.ttft_ms ?? NaN);
    goal('TTFT ours / transformers', r4, '<= 0.5', r4 <= 0.5, `${fmt(o1?.ttft_ms)} / ${fmt(h1?.ttft_ms)} ms`);
    lines.push('');
  }
  fs.writeFileSync(outFile, lines.join('\n'));
  console.log(lines.join('\n'));
}

(flag('report') ? Promise.resolve(report()) : flag('write-pixels') ? writePixels() : bench()).catch((e) => {
  console.error(e);
  process.exit(1);
});
