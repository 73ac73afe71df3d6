// Helpers shared by the benchmarks: arguments, cached models, seeded inputs, statistics, child
// processes, the machine's read bandwidth and the language model's bytes per decode step.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { type Blip2ForConditionalGeneration, Blip2Processor } from '../lib';
import { resolvePython } from '../lib/cli/export';

export const ROOT = path.resolve(__dirname, '..');
export const CACHE = path.join(ROOT, 'bench', '.cache');
let python: string | undefined;
/** The project's Python (scripts/python-env.js), looked up on first use: children that never run Python skip the probe. */
export function pythonBin(): string {
  python ??= resolvePython();
  return python;
}

export function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}
export function flag(name: string): boolean {
  return process.argv.includes(`--${name}`);
}
export function list(name: string, fallback: string): string[] {
  return arg(name, fallback).split(',').filter(Boolean);
}

export function run(cmd: string, args: string[], cwd = ROOT, env: NodeJS.ProcessEnv = process.env): void {
  const r = spawnSync(cmd, args, { cwd, env, stdio: ['ignore', 'inherit', 'inherit'] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal})`);
}

/** HF-format checkpoint + exported model folder for a tiny.py preset ('tiny': the test fixture), cached in bench/.cache. */
export function prepare(preset: string): { checkpoint: string; modelDir: string } {
  const checkpoint = preset === 'tiny' ? path.join(ROOT, 'test', 'fixtures', 'tiny-opt') : path.join(CACHE, `${preset}-checkpoint`);
  const modelDir = path.join(CACHE, `${preset}-model`);
  fs.mkdirSync(CACHE, { recursive: true });
  // bench/real-size.ts makes and exports the real-size models (bfloat16, sharded): used as they are.
  if (preset.startsWith('real-size')) {
    if (!fs.existsSync(path.join(modelDir, 'manifest.json'))) throw new Error(`${modelDir} is missing: run bench/real-size.ts first`);
    return { checkpoint, modelDir };
  }
  if (preset !== 'tiny' && !fs.existsSync(path.join(checkpoint, 'model.safetensors'))) {
    run(pythonBin(), ['-m', 'blip2_export.tiny', checkpoint, '--preset', preset, '--seed', '1'], path.join(ROOT, 'export'));
  }
  // Exported again when the exporter changed since (new methods reach cached benchmark models).
  const manifest = path.join(modelDir, 'manifest.json');
  const exporter = path.join(ROOT, 'export', 'blip2_export');
  const exporterMs = Math.max(...fs.readdirSync(exporter).filter((f) => f.endsWith('.py')).map((f) => fs.statSync(path.join(exporter, f)).mtimeMs));
  if (!fs.existsSync(manifest) || fs.statSync(manifest).mtimeMs < exporterMs) {
    fs.rmSync(modelDir, { recursive: true, force: true });
    run(pythonBin(), ['-m', 'blip2_export', checkpoint, modelDir], path.join(ROOT, 'export'));
  }
  return { checkpoint, modelDir };
}

/** Reads every file of a folder once so that later loads find it in the page cache. */
export function warmPageCache(dir: string): void {
  const buf = Buffer.allocUnsafe(16 << 20);
  for (const name of fs.readdirSync(dir)) {
    const file = path.join(dir, name);
    if (!fs.statSync(file).isFile()) continue;
    const fd = fs.openSync(file, 'r');
    try {
      while (fs.readSync(fd, buf, 0, buf.length, null) > 0);
    } finally {
      fs.closeSync(fd);
    }
  }
}

/** Deterministic normal-ish pixels (sum of uniforms), [batch, 3, size, size]: every run sees the same input. */
export function seededPixels(batch: number, size: number, seed: number): Float32Array {
  let state = seed >>> 0 || 1;
  const next = () => ((state = (Math.imul(state, 1664525) + 1013904223) >>> 0) / 4294967296);
  const data = new Float32Array(batch * 3 * size * size);
  for (let i = 0; i < data.length; i++) data[i] = next() + next() + next() - 1.5;
  return data;
}

export function median(values: number[]): number {
  return quantile(values, 0.5);
}
/** Linear-interpolated quantile (q in [0, 1]). */
export function quantile(values: number[], q: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}
export function round(value: number, digits = 3): number {
  return Number.isFinite(value) ? +value.toFixed(digits) : value;
}

/** This process's resident set and its peak (VmHWM), MiB. */
export function rssMb(): { rss_mb: number; peak_rss_mb: number } {
  const status = fs.readFileSync('/proc/self/status', 'utf8');
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? NaN);
  return { rss_mb: round(kb('VmRSS') / 1024, 1), peak_rss_mb: round(kb('VmHWM') / 1024, 1) };
}

export interface Machine { cpu: string | undefined; cpus: number; mem_gib: number; node: string; loadavg_1m: number; date: string }
export function machine(): Machine {
  const load = os.loadavg();
  return {
    cpu: os.cpus()[0]?.model, cpus: os.cpus().length, mem_gib: round(os.totalmem() / 2 ** 30, 1), node: process.version,
    loadavg_1m: round(load[0], 2), date: new Date().toISOString(),
  };
}

/**
 * Runs this same script (through tsx, as it was started) in a fresh Node process with `args` and
 * `env` added, and returns the JSON lines it printed on stdout (its stderr passes through).
 */
export function runChild(script: string, args: string[], env: NodeJS.ProcessEnv = {}, nodeArgs: string[] = []): Promise<Array<Record<string, any>>> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...nodeArgs, ...process.execArgv, script, ...args], {
      cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk: string) => { out += chunk; });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (code !== 0) reject(new Error(`${path.basename(script)} ${args.join(' ')} exited with ${code ?? signal}`));
      else resolve(parseJsonLines(out));
    });
  });
}

/** Runs a Python script (the project's Python) and returns the JSON lines it printed. */
export function runPython(script: string, args: string[], env: NodeJS.ProcessEnv = {}): Array<Record<string, any>> {
  const out = execFileSync(pythonBin(), [script, ...args], {
    cwd: ROOT, env: { ...process.env, ...env }, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 64 << 20,
  });
  return parseJsonLines(out);
}

function parseJsonLines(text: string): Array<Record<string, any>> {
  return text.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
}

/** The machine's read bandwidth (bench/membw.py: best of several multi-threaded sums over 1 GiB). */
export function measureBandwidth(threads: number): { best_gb_s: number; [k: string]: unknown } {
  const counts = [...new Set([1, threads])].join(',');
  const [row] = runPython(path.join(ROOT, 'bench', 'membw.py'), ['--mb', '1024', '--threads', counts, '--repeats', '7']);
  return row as { best_gb_s: number };
}

interface SafetensorsEntry { dtype: string; shape: number[]; data_offsets: [number, number] }

function safetensorsHeader(file: string): Record<string, SafetensorsEntry> {
  const fd = fs.openSync(file, 'r');
  try {
    const len = Buffer.alloc(8);
    fs.readSync(fd, len, 0, 8, 0);
    const n = Number(len.readBigUInt64LE(0));
    const json = Buffer.alloc(n);
    fs.readSync(fd, json, 0, n, 8);
    const header = JSON.parse(json.toString('utf8'));
    delete header.__metadata__;
    return header;
  } finally {
    fs.closeSync(fd);
  }
}

/** Every tensor of a safetensors folder (model folder or HF checkpoint), name → entry. */
export function weightIndex(dir: string): Record<string, SafetensorsEntry> {
  const all: Record<string, SafetensorsEntry> = {};
  for (const name of fs.readdirSync(dir).filter((n) => n.endsWith('.safetensors') && !n.startsWith('reference'))) {
    Object.assign(all, safetensorsHeader(path.join(dir, name)));
  }
  return all;
}

/**
 * Bytes of the language model's weights one decode step reads: every language_model.* tensor except
 * the embedding tables, of which one row each is read, plus the LM head (lm_head.weight, or the tied
 * embed_tokens it is read from).
 */
export function lmBytesPerStep(dir: string): { bytes: number; dtypes: string[] } {
  const index = weightIndex(dir);
  const bytesOf = (e: SafetensorsEntry) => e.data_offsets[1] - e.data_offsets[0];
  let bytes = 0;
  const dtypes = new Set<string>();
  const names = Object.keys(index).filter((n) => n.startsWith('language_model.'));
  const head = names.find((n) => n.endsWith('lm_head.weight')) ?? names.find((n) => n.endsWith('embed_tokens.weight'));
  for (const name of names) {
    if ((/embed_(tokens|positions)\.weight$/.test(name) || name.endsWith('lm_head.weight')) && name !== head) continue;
    bytes += bytesOf(index[name]);
    dtypes.add(index[name].dtype);
  }
  return { bytes, dtypes: [...dtypes] };
}

/** The decode step's weight-read floor: LM bytes / read bandwidth, in ms. */
export function floorMs(bytes: number, gbPerS: number): number {
  return (bytes / (gbPerS * 1e9)) * 1e3;
}

export function printJson(row: Record<string, unknown>): void {
  console.log(JSON.stringify(row));
}

/** Prompts of different lengths ('' = a caption), shared by the serving benchmarks and the Python side. */
export const PROMPTS = ['', 'a photo of', 'Question: what is in the picture? Answer:', 'Question: how many dogs are there in the park? Answer:'];

/** Image k of the serving benchmarks: a 320x240 RGB gradient with seeded noise (resized, rescaled and normalised like a photo). */
export function seededImage(k: number): { data: Uint8Array; width: number; height: number; channels: 3 } {
  const width = 320;
  const height = 240;
  const data = new Uint8Array(width * height * 3);
  let state = (k + 1) * 7919;
  const next = () => ((state = (Math.imul(state, 1664525) + 1013904223) >>> 0) >>> 24);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      data[i] = ((x * 255) / width + next() / 4 + k * 37) & 255;
      data[i + 1] = ((y * 255) / height + next() / 4) & 255;
      data[i + 2] = (next() + k * 91) & 255;
    }
  }
  return { data, width, height, channels: 3 };
}

/** One request's inputs: pixel values [1,3,H,W] and its input ids ([<image>] x Q, BOS, prompt). */
export interface RequestInput { pixels: Float32Array; ids: number[] }

/** `count` seeded requests through the model folder's Blip2Processor: seededImage(k) with prompt k % PROMPTS. */
export async function makeRequests(modelDir: string, count: number, prompts: string[] = PROMPTS): Promise<RequestInput[]> {
  const processor = await Blip2Processor.fromPretrained(modelDir);
  const out: RequestInput[] = [];
  for (let k = 0; k < count; k++) {
    const inputs = await processor.process({ images: seededImage(k), text: prompts[k % prompts.length] });
    // float32 whatever the folder's dtype (a bfloat16 model's processor gives bfloat16 pixels).
    const pixels = await inputs.pixelValues.to({ dtype: 'float32' });
    out.push({ pixels: (await pixels.toArray()) as Float32Array, ids: (await inputs.inputIds.toList()).map(Number) });
    pixels.dispose();
    inputs.pixelValues.dispose();
    inputs.inputIds.dispose();
    inputs.attentionMask.dispose();
  }
  return out;
}

/** Writes requests for bench/hf_*.py: <base>.f32 (pixel values, concatenated) and <base>.json ({ shape, ids }). */
export function writeRequests(base: string, requests: RequestInput[], imageSize: number): void {
  fs.mkdirSync(path.dirname(base), { recursive: true });
  const all = new Float32Array(requests.length * requests[0].pixels.length);
  requests.forEach((r, i) => all.set(r.pixels, i * r.pixels.length));
  fs.writeFileSync(`${base}.f32`, Buffer.from(all.buffer, all.byteOffset, all.byteLength));
  fs.writeFileSync(`${base}.json`, JSON.stringify({ shape: [requests.length, 3, imageSize, imageSize], ids: requests.map((r) => r.ids) }));
}

export interface LoopResult {
  completed: number;
  seconds: number;
  latencies_ms: number[];
}

/**
 * A closed loop: `concurrency` clients, each sending its next request as soon as its last one
 * answered, until `maxRequests` were sent or `maxSeconds` passed (then the ones in flight finish).
 * `staggerMs`: client c starts c * staggerMs after the first, so the clients are out of step.
 */
export async function closedLoop(concurrency: number, maxRequests: number, maxSeconds: number,
  send: (index: number) => Promise<void>, staggerMs = 0): Promise<LoopResult> {
  const start = performance.now();
  const deadline = start + maxSeconds * 1e3;
  const latencies: number[] = [];
  let issued = 0;
  const client = async (_: unknown, c: number) => {
    if (staggerMs > 0 && c > 0) await new Promise((resolve) => setTimeout(resolve, c * staggerMs));
    while (issued < maxRequests && performance.now() < deadline) {
      const index = issued++;
      const t = performance.now();
      await send(index);
      latencies.push(performance.now() - t);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, client));
  return { completed: latencies.length, seconds: (performance.now() - start) / 1e3, latencies_ms: latencies };
}

/** The square input size of a captioning model's images. */
export function imageSize(model: Blip2ForConditionalGeneration): number {
  const size = model.manifest.image_size?.[0];
  if (!size) throw new Error(`${model.modelDir}: the manifest has no image_size`);
  return size;
}
