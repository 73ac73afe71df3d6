// Load test of `blip2 serve`: starts the server (a child process, loopback, a free port) unless
// --url names one, then N concurrent clients send chat completions until --requests are done or
// --max-seconds have passed, and prints requests/s, latency percentiles, tokens/s and errors.
//
//   npx tsx bench/serve-load.ts [--model models/tiny-random-opt] [--concurrency 16] [--requests 200]
//     [--max-seconds 60] [--max-tokens 20] [--stream] [--device cpu] [--max-batch-size 16]
//     [--max-queue N] [--image assets/demo.jpg] [--prompt TEXT] [--url http://127.0.0.1:8080]
//
// The last line is the summary as JSON.
import { type ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

const ROOT = path.resolve(__dirname, '..');

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}
const has = (name: string): boolean => process.argv.includes(`--${name}`);
function positive(name: string, fallback: string): number {
  const n = Number(arg(name, fallback));
  if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} must be a number > 0`);
  return n;
}

const modelDir = arg('model', path.join(ROOT, 'models', 'tiny-random-opt'));
const concurrency = positive('concurrency', '16');
const total = positive('requests', '200');
const maxSeconds = positive('max-seconds', '60');
const maxTokens = positive('max-tokens', '20');
const stream = has('stream');
const device = arg('device', 'cpu');
const maxBatchSize = arg('max-batch-size', '16');
const maxQueue = arg('max-queue', '');
const image = arg('image', path.join(ROOT, 'assets', 'demo.jpg'));
const prompt = arg('prompt', '');

/** Starts the server on a free loopback port; resolves to its URL once /health says ok. */
async function startServer(): Promise<{ url: string; child: ChildProcess; exited: Promise<number | null> }> {
  const args = ['--require', 'tsx/cjs', path.join(ROOT, 'lib', 'cli', 'main.ts'), 'serve', '--model', modelDir, '--port', '0', '--host', '127.0.0.1',
    '--device', device, '--max-batch-size', maxBatchSize, ...(maxQueue ? ['--max-queue', maxQueue] : [])];
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'ignore', 'pipe'] });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let stderr = '';
  child.stderr!.setEncoding('utf8');
  const url = await new Promise<string>((resolve, reject) => {
    child.stderr!.on('data', (text: string) => {
      stderr += text;
      const m = /listening on (http:\/\/\S+)/.exec(stderr);
      if (m) resolve(m[1]);
    });
    void exited.then((code) => reject(new Error(`the server exited (${code}):\n${stderr}`)));
  });
  for (const deadline = Date.now() + 120_000; (await fetch(`${url}/health`).catch(() => undefined))?.status !== 200;) {
    if (Date.now() > deadline) throw new Error(`the server did not get ready:\n${stderr}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return { url, child, exited };
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

interface Outcome {
  status: number | 'network' | 'aborted';
  ms: number;
  /** Streams: time to the first content chunk. */
  firstTokenMs?: number;
  tokens: number;
}

async function one(url: string, body: string, signal: AbortSignal): Promise<Outcome> {
  const started = performance.now();
  try {
    const res = await fetch(`${url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body, signal });
    if (!res.ok || !stream) {
      const json = (await res.json()) as { usage?: { completion_tokens: number } };
      return { status: res.status, ms: performance.now() - started, tokens: json.usage?.completion_tokens ?? 0 };
    }
    const decoder = new TextDecoder();
    let text = '';
    let firstTokenMs: number | undefined;
    let tokens = 0;
    for await (const bytes of res.body as unknown as AsyncIterable<Uint8Array>) {
      text += decoder.decode(bytes, { stream: true });
      firstTokenMs ??= /"content":"[^"]/.test(text) ? performance.now() - started : undefined;
    }
    for (const event of text.split('\n\n')) {
      if (!event.startsWith('data: {')) continue;
      const chunk = JSON.parse(event.slice(6)) as { usage?: { completion_tokens: number } | null; error?: unknown };
      if (chunk.error) return { status: 'network', ms: performance.now() - started, tokens };
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
    }
    return { status: 200, ms: performance.now() - started, firstTokenMs, tokens };
  } catch (e) {
    return { status: signal.aborted ? 'aborted' : 'network', ms: performance.now() - started, tokens: 0 };
  }
}

async function main(): Promise<void> {
  const given = arg('url', '');
  const server = given ? undefined : await startServer();
  const url = given || server!.url;
  const bytes = fs.readFileSync(image);
  const body = JSON.stringify({
    model: 'blip2',
    messages: [{ role: 'user', content: [{ type: 'text', text: prompt }, { type: 'image_url', image_url: { url: `data:image/jpeg;base64,${bytes.toString('base64')}` } }] }],
    max_tokens: maxTokens,
    stream,
    ...(stream ? { stream_options: { include_usage: true } } : {}),
  });
  // One request first: the first call pays for lazy set-up (tokenizer, kernels) that a load test should not measure.
  await one(url, body, new AbortController().signal);

  const deadline = new AbortController();
  const timer = setTimeout(() => deadline.abort(), maxSeconds * 1000);
  const outcomes: Outcome[] = [];
  let issued = 0;
  const started = performance.now();
  const client = async (): Promise<void> => {
    while (issued < total && !deadline.signal.aborted) {
      issued++;
      outcomes.push(await one(url, body, deadline.signal));
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, total) }, client));
  const seconds = (performance.now() - started) / 1000;
  clearTimeout(timer);

  const metrics = await (await fetch(`${url}/metrics`)).text();
  const gauge = (name: string): number => Number(/^(\S+) (\S+)$/m.exec(metrics.split('\n').find((l) => l.startsWith(`${name} `)) ?? '')?.[2] ?? NaN);
  if (server) {
    server.child.kill('SIGTERM');
    const code = await server.exited;
    if (code !== 0) process.stderr.write(`the server exited with ${code}\n`);
  }

  const ok = outcomes.filter((o) => o.status === 200);
  const latency = ok.map((o) => o.ms).sort((a, b) => a - b);
  const ttft = ok.map((o) => o.firstTokenMs).filter((v): v is number => v !== undefined).sort((a, b) => a - b);
  const errors: Record<string, number> = {};
  for (const o of outcomes) if (o.status !== 200) errors[String(o.status)] = (errors[String(o.status)] ?? 0) + 1;
  const tokens = ok.reduce((n, o) => n + o.tokens, 0);
  const summary = {
    bench: 'serve-load', model: path.basename(modelDir), device, concurrency, max_batch_size: Number(maxBatchSize), max_tokens: maxTokens, stream,
    requests: outcomes.length, ok: ok.length, errors, seconds: round(seconds),
    requests_per_s: round(ok.length / seconds), tokens_per_s: round(tokens / seconds),
    latency_ms: { p50: round(percentile(latency, 50)), p90: round(percentile(latency, 90)), p99: round(percentile(latency, 99)), max: round(latency.at(-1) ?? NaN) },
    ...(stream ? { first_token_ms: { p50: round(percentile(ttft, 50)), p99: round(percentile(ttft, 99)) } } : {}),
    server_tokens_per_s: round(gauge('blip2_tokens_per_second')),
  };
  process.stdout.write(
    `${summary.requests} requests (${summary.ok} ok${Object.keys(errors).length ? `, errors ${JSON.stringify(errors)}` : ''}) in ${summary.seconds} s `
    + `with ${concurrency} clients, ${maxTokens} new tokens each${stream ? ', streamed' : ''}\n`
    + `  ${summary.requests_per_s} requests/s · ${summary.tokens_per_s} tokens/s · latency p50 ${summary.latency_ms.p50} ms, p99 ${summary.latency_ms.p99} ms`
    + `${stream ? ` · first token p50 ${summary.first_token_ms!.p50} ms` : ''}\n${JSON.stringify(summary)}\n`,
  );
}

const round = (v: number): number => Math.round(v * 100) / 100;

main().catch((e: unknown) => {
  process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
  process.exitCode = 1;
});
