// `blip2 serve`: the OpenAI-compatible HTTP server, run as the CLI runs it (a child process) and,
// for the paths that need no signals, in-process.
import { strict as assert } from 'node:assert';
import { type ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';

import sharp from 'sharp';

import { Blip2ForConditionalGeneration, Blip2Processor } from '../lib';
import { Blip2Server } from '../lib/server/server';
import { REPO_ROOT, smallModel } from './support/python';

const CLI = path.join(REPO_ROOT, 'lib', 'cli', 'main.ts');
const DEMO_MODEL = path.join(REPO_ROOT, 'models', 'tiny-random-opt');
const DEMO_IMAGE = path.join(REPO_ROOT, 'assets', 'demo.jpg');
const DEMO_BYTES = fs.readFileSync(DEMO_IMAGE);
const dataUrl = (bytes: Buffer, mime = 'image/jpeg'): string => `data:${mime};base64,${bytes.toString('base64')}`;

interface Child {
  url: string;
  process: ChildProcess;
  stderr: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Starts `blip2 serve --port 0 ...args` and resolves once /health answers 200. */
async function startServer(args: string[]): Promise<Child> {
  const child = spawn(process.execPath, ['--require', 'tsx/cjs', CLI, 'serve', '--port', '0', ...args], { cwd: REPO_ROOT, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8');
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  const url = await new Promise<string>((resolve, reject) => {
    child.stderr!.on('data', (text: string) => {
      stderr += text;
      const m = /listening on (http:\/\/\S+)/.exec(stderr);
      if (m) resolve(m[1]);
    });
    void exited.then(({ code }) => reject(new Error(`the server exited (${code}) before listening:\n${stderr}`)));
  });
  for (const deadline = Date.now() + 120_000; ;) {
    const health = await fetch(`${url}/health`).catch(() => undefined);
    if (health?.status === 200) break;
    if (Date.now() > deadline) throw new Error(`the server did not get ready:\n${stderr}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return { url, process: child, stderr: () => stderr, exited };
}

async function stopServer(child: Child | undefined): Promise<void> {
  if (!child || child.process.exitCode !== null || child.process.signalCode !== null) return;
  child.process.kill('SIGTERM');
  await child.exited;
}

interface Reply {
  status: number;
  headers: Headers;
  json: any; // eslint-disable-line @typescript-eslint/no-explicit-any
}

async function post(url: string, body: unknown, headers: Record<string, string> = { 'content-type': 'application/json' }): Promise<Reply> {
  const res = await fetch(`${url}/v1/chat/completions`, { method: 'POST', headers, body: typeof body === 'string' ? body : JSON.stringify(body) });
  const text = await res.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    json = text;
  }
  return { status: res.status, headers: res.headers, json };
}

/** A chat request for one image and a prompt. */
function chat(image: string, prompt = '', extra: Record<string, unknown> = {}): Record<string, unknown> {
  const content: unknown[] = [{ type: 'image_url', image_url: { url: image } }];
  if (prompt) content.unshift({ type: 'text', text: prompt });
  return { model: 'blip2-test', messages: [{ role: 'user', content }], ...extra };
}

/** The events of an SSE stream: each `data:` payload, parsed (the final '[DONE]' as the string). */
async function readSse(res: Response): Promise<unknown[]> {
  const text = await res.text();
  return text.split('\n\n').filter((block) => block.trim() !== '').map((block) => {
    assert.match(block, /^data: /, `not an SSE data line: ${block}`);
    const data = block.slice('data: '.length);
    return data === '[DONE]' ? data : JSON.parse(data);
  });
}

/** A metric's value from /metrics (labels as written, e.g. '{reason="disconnect"}'). */
async function metric(url: string, name: string, labels = ''): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels} `));
  assert.ok(line, `no ${name}${labels} in /metrics:\n${text}`);
  return Number(line.split(' ')[1]);
}

async function until(what: string, check: () => Promise<boolean>, ms = 30_000): Promise<void> {
  for (const deadline = Date.now() + ms; !(await check());) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A raw HTTP request (for bodies fetch will not send: a lying Content-Length, chunked uploads). */
function rawRequest(url: string, options: http.RequestOptions, write: (req: http.ClientRequest) => void): Promise<{ status: number; body: any }> { // eslint-disable-line @typescript-eslint/no-explicit-any
  return new Promise((resolve, reject) => {
    const req = http.request(`${url}/v1/chat/completions`, { method: 'POST', ...options }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => { text += c; });
      res.on('end', () => resolve({ status: res.statusCode!, body: JSON.parse(text) }));
    });
    req.on('error', reject);
    write(req);
  });
}

function assertError(reply: Reply, status: number, code: string, param: string | null, message?: RegExp): void {
  assert.equal(reply.status, status, JSON.stringify(reply.json));
  assert.deepEqual(Object.keys(reply.json), ['error']);
  assert.deepEqual(Object.keys(reply.json.error).sort(), ['code', 'message', 'param', 'type']);
  assert.equal(reply.json.error.code, code, JSON.stringify(reply.json));
  assert.equal(reply.json.error.param, param, JSON.stringify(reply.json));
  const type = { 404: 'not_found_error', 429: 'rate_limit_error', 504: 'timeout_error' }[status] ?? (status >= 500 ? 'server_error' : 'invalid_request_error');
  assert.equal(reply.json.error.type, type);
  if (message) assert.match(reply.json.error.message, message);
}

describe('blip2 serve: OpenAI chat completions over HTTP', function () {
  this.timeout(300_000);
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blip2-serve-'));
  const allowed = path.join(tmp, 'allowed');
  let server: Child;
  let processor: Blip2Processor;
  let model: Blip2ForConditionalGeneration;

  before(async () => {
    fs.mkdirSync(allowed);
    fs.copyFileSync(DEMO_IMAGE, path.join(allowed, 'demo.jpg'));
    fs.copyFileSync(DEMO_IMAGE, path.join(tmp, 'secret.jpg'));
    fs.symlinkSync(path.join(tmp, 'secret.jpg'), path.join(allowed, 'link.jpg'));
    [server, processor, model] = await Promise.all([
      startServer(['--model', DEMO_MODEL, '--allow-local-images', allowed, '--max-body-bytes', '300000', '--max-image-pixels', '1000000']),
      Blip2Processor.fromPretrained(DEMO_MODEL),
      Blip2ForConditionalGeneration.fromPretrained(DEMO_MODEL),
    ]);
  });
  after(async () => {
    await stopServer(server);
    await model?.dispose();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  /** What model.generate + processor.batchDecode give in-process: the whole decoded rows, and the new tokens' text. */
  async function reference(prompt: string, maxNewTokens: number): Promise<{ full: string; answer: string }> {
    const inputs = await processor.process({ images: [DEMO_BYTES], text: prompt });
    const sequences = await model.generate(inputs, { maxNewTokens });
    const [full] = await processor.batchDecode(sequences, { skipSpecialTokens: true });
    const width = inputs.inputIds.shape[1];
    const ids = Array.from((await sequences.toArray()) as BigInt64Array, Number);
    const [answer] = processor.batchDecode([ids.slice(width)], { skipSpecialTokens: true });
    return { full, answer };
  }

  it('a caption is what model.generate + processor.batchDecode give (greedy), with usage and finish_reason; local files give the same', async () => {
    const expected = await reference('', 12);
    const reply = await post(server.url, chat(dataUrl(DEMO_BYTES), '', { max_tokens: 12 }));
    assert.equal(reply.status, 200, JSON.stringify(reply.json));
    const body = reply.json;
    assert.equal(body.object, 'chat.completion');
    assert.match(body.id, /^chatcmpl-/);
    assert.equal(body.model, 'blip2-test');
    assert.equal(body.choices.length, 1);
    assert.equal(body.choices[0].message.role, 'assistant');
    assert.equal(body.choices[0].message.content, expected.full); // a caption's prompt decodes to ''
    assert.equal(body.choices[0].finish_reason, 'length');
    assert.deepEqual(body.usage, { prompt_tokens: 7, completion_tokens: 12, total_tokens: 19 }); // 6 image queries + BOS

    // A question: the answer only, not the prompt.
    const prompt = 'Question: what is shown? Answer:';
    const question = await reference(prompt, 9);
    const answered = await post(server.url, chat(dataUrl(DEMO_BYTES), prompt, { max_completion_tokens: 9 }));
    assert.equal(answered.json.choices[0].message.content, question.answer);
    assert.ok(question.full.startsWith(prompt));

    for (const local of ['demo.jpg', path.join(allowed, 'demo.jpg'), pathToFileURL(path.join(allowed, 'demo.jpg')).href]) {
      const fromFile = await post(server.url, chat(local, '', { max_tokens: 12 }));
      assert.equal(fromFile.status, 200, JSON.stringify(fromFile.json));
      assert.equal(fromFile.json.choices[0].message.content, expected.full, local);
    }
    // Unknown fields are ignored, as OpenAI-compatible servers do; a string image_url is taken too.
    const extras = await post(server.url, { ...chat(dataUrl(DEMO_BYTES), '', { max_tokens: 12 }), user: 'me', store: false, foo: { bar: 1 }, stop: null });
    assert.equal(extras.json.choices[0].message.content, expected.full);
    assert.equal(extras.json.model, 'blip2-test');
  });

  it('streaming: chat.completion.chunk deltas concatenate to the same text, then finish_reason, usage and [DONE]', async () => {
    const expected = await post(server.url, chat(dataUrl(DEMO_BYTES), '', { max_tokens: 15 }));
    const res = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify(chat(dataUrl(DEMO_BYTES), '', { max_tokens: 15, stream: true, stream_options: { include_usage: true } })),
    });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /^text\/event-stream/);
    const events = await readSse(res);
    assert.equal(events.at(-1), '[DONE]');
    const chunks = events.slice(0, -1) as any[]; // eslint-disable-line @typescript-eslint/no-explicit-any
    const id = chunks[0].id;
    for (const c of chunks) {
      assert.equal(c.object, 'chat.completion.chunk');
      assert.equal(c.id, id);
      assert.equal(c.model, 'blip2-test');
    }
    assert.deepEqual(chunks[0].choices[0].delta, { role: 'assistant', content: '' });
    const usageChunk = chunks.at(-1);
    assert.deepEqual(usageChunk.choices, []);
    assert.deepEqual(usageChunk.usage, expected.json.usage);
    const final = chunks.at(-2);
    assert.deepEqual(final.choices[0].delta, {});
    assert.equal(final.choices[0].finish_reason, expected.json.choices[0].finish_reason);
    const text = chunks.slice(1, -2).map((c) => {
      assert.equal(c.choices[0].finish_reason, null);
      return c.choices[0].delta.content as string;
    }).join('');
    assert.equal(text, expected.json.choices[0].message.content);
    assert.ok(chunks.length > 5, 'one chunk per token, not one for all');
  });

  it('sampling: temperature, top_p, seed (reproducible) and n choices, streamed with one index per choice', async () => {
    const body = chat(dataUrl(DEMO_BYTES), '', { max_tokens: 10, temperature: 0.9, top_p: 0.95, seed: 42, n: 3 });
    const a = await post(server.url, body);
    const b = await post(server.url, body);
    assert.equal(a.status, 200, JSON.stringify(a.json));
    assert.deepEqual(a.json.choices.map((c: { index: number }) => c.index), [0, 1, 2]);
    assert.deepEqual(a.json.choices, b.json.choices);
    assert.ok(a.json.usage.completion_tokens >= 3 && a.json.usage.completion_tokens <= 30, JSON.stringify(a.json.usage));

    const res = await fetch(`${server.url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }) });
    const chunks = (await readSse(res)).slice(0, -1) as any[]; // eslint-disable-line @typescript-eslint/no-explicit-any
    const texts = ['', '', ''];
    const finish: string[] = [];
    for (const c of chunks) {
      for (const choice of c.choices) {
        texts[choice.index] += choice.delta.content ?? '';
        if (choice.finish_reason) finish[choice.index] = choice.finish_reason;
      }
    }
    assert.deepEqual(texts, a.json.choices.map((c: { message: { content: string } }) => c.message.content));
    assert.deepEqual(finish, a.json.choices.map((c: { finish_reason: string }) => c.finish_reason));
  });

  it('GET /health, /metrics (Prometheus text) and /v1/models', async () => {
    const health = await fetch(`${server.url}/health`);
    assert.equal(health.status, 200);
    const h = await health.json() as Record<string, unknown>;
    assert.equal(h.status, 'ok');
    assert.equal(h.model, 'tiny-random-opt');
    assert.equal(h.device, 'cpu');
    assert.equal(typeof h.uptime_s, 'number');

    const res = await fetch(`${server.url}/metrics`);
    assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
    const text = await res.text();
    for (const name of ['blip2_http_requests_total', 'blip2_http_requests_in_flight', 'blip2_completion_tokens_total', 'blip2_queue_length',
      'blip2_running_sequences', 'blip2_slots_in_use', 'blip2_slots', 'blip2_kv_cache_bytes', 'blip2_tokens_per_second',
      'blip2_request_duration_seconds', 'process_resident_memory_bytes']) {
      assert.match(text, new RegExp(`^# TYPE ${name} (counter|gauge|histogram)$`, 'm'), name);
    }
    assert.match(text, /^blip2_http_requests_total\{route="\/v1\/chat\/completions",code="200"\} \d+$/m);
    assert.match(text, /^blip2_request_duration_seconds_bucket\{le="\+Inf"\} [1-9]\d*$/m);
    assert.equal(await metric(server.url, 'blip2_slots'), 16);
    assert.equal(await metric(server.url, 'blip2_slots_in_use'), 0);
    assert.ok(await metric(server.url, 'blip2_completion_tokens_total') >= 12);
    assert.ok(await metric(server.url, 'process_resident_memory_bytes') > 1e6);

    const models = await (await fetch(`${server.url}/v1/models`)).json() as { data: Array<{ id: string }> };
    assert.deepEqual(models.data.map((m) => m.id), ['tiny-random-opt']);
  });

  it('bad requests: the documented status and OpenAI error JSON naming the field', async () => {
    const url = server.url;
    const image = dataUrl(DEMO_BYTES);
    const field = 'messages[0].content[0].image_url.url';
    assertError(await post(url, '{"messages": [', {}), 415, 'unsupported_media_type', null);
    assertError(await post(url, '{"messages": ['), 400, 'invalid_json', null, /not valid JSON/);
    assertError(await post(url, '[]'), 400, 'invalid_body', null);
    assertError(await post(url, { messages: [] }), 400, 'missing_messages', 'messages');
    assertError(await post(url, { messages: [{ role: 'user', content: 'Describe it.' }] }), 400, 'missing_image', 'messages[0].content', /exactly one/);
    assertError(await post(url, { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: image } }, { type: 'text', text: 'x' }, { type: 'image_url', image_url: { url: image } }] }] }),
      400, 'too_many_images', 'messages[0].content[2]', /exactly one image per request/);
    assertError(await post(url, { messages: [{ role: 'system', content: 'be nice' }, { role: 'user', content: [{ type: 'image_url', image_url: { url: image } }] }] }),
      400, 'invalid_value', 'messages', /one user message/);
    assertError(await post(url, { messages: [{ role: 'assistant', content: 'hi' }] }), 400, 'invalid_value', 'messages[0].role');
    assertError(await post(url, { messages: [{ role: 'user', content: [{ type: 'input_audio', input_audio: {} }] }] }), 400, 'unsupported_content_part', 'messages[0].content[0].type');

    assertError(await post(url, chat('data:text/plain;base64,aGVsbG8=')), 400, 'invalid_image_url', field, /data:image/);
    assertError(await post(url, chat('data:image/png;base64,@@not base64@@')), 400, 'invalid_image_url', field, /base64/);
    assertError(await post(url, chat('data:image/png,rawbytes')), 400, 'invalid_image_url', field);
    assertError(await post(url, chat(dataUrl(Buffer.from('this is no image at all'), 'image/png'))), 400, 'invalid_image', field, /cannot be used: not a supported image format/);
    const big = await sharp({ create: { width: 1200, height: 1000, channels: 3, background: '#808080' } }).png().toBuffer();
    assertError(await post(url, chat(dataUrl(big, 'image/png'))), 400, 'invalid_image', field, /1200000 pixels .*limit of 1000000/);
    assertError(await post(url, chat('https://example.com/cat.jpg')), 400, 'invalid_image_url', field, /not fetched/);

    // Local files: only inside the allowed folder, after following links.
    assertError(await post(url, chat('../secret.jpg')), 400, 'path_outside_allowed_dir', field);
    assertError(await post(url, chat(path.join(tmp, 'secret.jpg'))), 400, 'path_outside_allowed_dir', field);
    assertError(await post(url, chat(`${allowed}/../secret.jpg`)), 400, 'path_outside_allowed_dir', field);
    assertError(await post(url, chat(pathToFileURL(path.join(tmp, 'secret.jpg')).href)), 400, 'path_outside_allowed_dir', field);
    assertError(await post(url, chat('link.jpg')), 400, 'path_outside_allowed_dir', field);
    assertError(await post(url, chat('/etc/passwd')), 400, 'path_outside_allowed_dir', field);
    assertError(await post(url, chat('missing.jpg')), 400, 'image_not_found', field);

    for (const [value, param] of [[0, 'max_tokens'], [1.5, 'max_tokens'], ['10', 'max_tokens'], [-3, 'max_tokens']] as const) {
      assertError(await post(url, chat(image, '', { [param]: value })), 400, 'invalid_value', param, /expected an integer >= 1/);
    }
    assertError(await post(url, chat(image, '', { max_tokens: 500 })), 400, 'context_length_exceeded', 'max_tokens', /at most 121 new tokens fit/);
    assertError(await post(url, chat(image, '', { max_completion_tokens: 500 })), 400, 'context_length_exceeded', 'max_completion_tokens');
    assertError(await post(url, chat(image, 'word '.repeat(200))), 400, 'context_length_exceeded', 'messages', /shorten the prompt/);
    for (const value of [-1, 2.5, 'hot']) {
      assertError(await post(url, chat(image, '', { temperature: value })), 400, 'invalid_value', 'temperature', /from 0 to 2/);
    }
    assertError(await post(url, chat(image, '', { top_p: 0 })), 400, 'invalid_value', 'top_p');
    assertError(await post(url, chat(image, '', { n: 2 })), 400, 'invalid_value', 'n', /temperature > 0/);
    assertError(await post(url, chat(image, '', { n: 17, temperature: 1 })), 400, 'invalid_value', 'n', /at most 16 choices/);
    assertError(await post(url, chat(image, '', { seed: -1 })), 400, 'invalid_value', 'seed');
    assertError(await post(url, chat(image, '', { stream: 'yes' })), 400, 'invalid_value', 'stream');
    assertError(await post(url, chat(image, '', { stream_options: { include_usage: true } })), 400, 'invalid_value', 'stream_options');
    assertError(await post(url, chat(image, '', { stop: ['\n'] })), 400, 'unsupported_parameter', 'stop', /not supported/);
    assertError(await post(url, chat(image, '', { logprobs: true })), 400, 'unsupported_parameter', 'logprobs');
    assertError(await post(url, chat(image, '', { model: 7 })), 400, 'invalid_value', 'model');

    // Routes and methods.
    const unknown = await fetch(`${url}/v1/completions`, { method: 'POST' });
    assertError({ status: unknown.status, headers: unknown.headers, json: await unknown.json() }, 404, 'unknown_route', null);
    const wrong = await fetch(`${url}/v1/chat/completions`);
    assert.equal(wrong.headers.get('allow'), 'POST');
    assertError({ status: wrong.status, headers: wrong.headers, json: await wrong.json() }, 405, 'method_not_allowed', null);
    const wrongHealth = await fetch(`${url}/health`, { method: 'DELETE' });
    assert.equal(wrongHealth.status, 405);

    // Too large: a declared Content-Length, a chunked body that grows past the limit, and fetch's own.
    const declared = await rawRequest(url, { headers: { 'content-type': 'application/json', 'content-length': '400000' } }, (req) => req.end('{}'));
    assert.equal(declared.status, 413);
    assert.equal(declared.body.error.code, 'body_too_large');
    const chunked = await rawRequest(url, { headers: { 'content-type': 'application/json' } }, (req) => {
      for (let i = 0; i < 40; i++) req.write('x'.repeat(10_000));
      req.end();
    });
    assert.equal(chunked.status, 413);
    assertError(await post(url, chat(dataUrl(Buffer.alloc(250_000, 7)))), 413, 'body_too_large', null, /300000 bytes/);

    // The server is still fine.
    assert.equal((await post(url, chat(image, '', { max_tokens: 2 }))).status, 200);
    assert.match(await (await fetch(`${url}/metrics`)).text(), /^blip2_http_requests_total\{route="\/v1\/chat\/completions",code="400"\} [1-9]\d*$/m);
  });

  describe('one slot, a queue of one: back-pressure, disconnects and SIGTERM', function () {
    let small: Child;
    before(async () => {
      small = await startServer(['--model', smallModel(), '--max-batch-size', '1', '--max-queue', '1']);
    });
    after(() => stopServer(small));

    it('local paths are refused without --allow-local-images', async () => {
      assertError(await post(small.url, chat(DEMO_IMAGE)), 400, 'local_images_disabled', 'messages[0].content[0].image_url.url', /--allow-local-images/);
      assertError(await post(small.url, chat(pathToFileURL(DEMO_IMAGE).href)), 400, 'local_images_disabled', 'messages[0].content[0].image_url.url');
    });

    it('back-pressure: past the running request and the queue of one, 429 with Retry-After; served again once the slot is free', async () => {
      const replies = await Promise.all(Array.from({ length: 6 }, () => post(small.url, chat(dataUrl(DEMO_BYTES), '', { max_tokens: 30 }))));
      const statuses = replies.map((r) => r.status).sort();
      assert.ok(statuses.every((s) => s === 200 || s === 429), statuses.join(' '));
      // One runs; whether the next one waits or is refused depends on whether the scheduler had
      // admitted the first when it came (the queue holds calls not yet admitted).
      assert.ok(statuses.includes(200), statuses.join(' '));
      const refused = replies.find((r) => r.status === 429);
      assert.ok(refused, statuses.join(' '));
      assertError(refused, 429, 'queue_full', null, /queue is full/);
      assert.equal(refused.headers.get('retry-after'), '1');
      assert.equal((await post(small.url, chat(dataUrl(DEMO_BYTES), '', { max_tokens: 3 }))).status, 200);
    });

    it('a client leaving mid-stream cancels its generation and frees the slot', async () => {
      const tokensBefore = await metric(small.url, 'blip2_model_generated_tokens_total');
      const controller = new AbortController();
      const res = await fetch(`${small.url}/v1/chat/completions`, {
        method: 'POST', headers: { 'content-type': 'application/json' }, signal: controller.signal,
        body: JSON.stringify(chat(dataUrl(DEMO_BYTES), '', { max_tokens: 110, stream: true })),
      });
      assert.equal(res.status, 200);
      const reader = res.body!.getReader();
      await reader.read(); // the role chunk and maybe the first tokens
      controller.abort();
      await until('the cancellation', async () => await metric(small.url, 'blip2_generations_cancelled_total', '{reason="disconnect"}') === 1);
      await until('the slot to be free', async () => await metric(small.url, 'blip2_slots_in_use') === 0 && await metric(small.url, 'blip2_running_calls') === 0);
      const generated = await metric(small.url, 'blip2_model_generated_tokens_total') - tokensBefore;
      assert.ok(generated < 110, `${generated} tokens generated: the generation was not stopped`);
      // The request leaves the server's books just after the scheduler freed its slot.
      await until('the request to end', async () => await metric(small.url, 'blip2_http_requests_in_flight') === 0);
      // The one slot serves the next request.
      const next = await post(small.url, chat(dataUrl(DEMO_BYTES), '', { max_tokens: 5 }));
      assert.equal(next.status, 200);
      assert.equal(next.json.usage.completion_tokens <= 5, true);
    });

    it('SIGTERM while a request runs: it finishes, new connections are refused, the process exits 0', async () => {
      const running = post(small.url, chat(dataUrl(DEMO_BYTES), '', { max_tokens: 60 }));
      await until('the request to run', async () => await metric(small.url, 'blip2_running_calls') === 1);
      small.process.kill('SIGTERM');
      // The listening socket closes at once; the request already in flight goes on.
      await until('the listener to close', () => fetch(`${small.url}/health`).then(() => false, () => true), 10_000);
      const reply = await running;
      assert.equal(reply.status, 200, JSON.stringify(reply.json));
      assert.ok(reply.json.usage.completion_tokens === 60 || reply.json.choices[0].finish_reason === 'stop', JSON.stringify(reply.json.usage));
      const { code, signal } = await small.exited;
      assert.equal(signal, null, small.stderr());
      assert.equal(code, 0, small.stderr());
      assert.match(small.stderr(), /SIGTERM: shutting down/);
      assert.match(small.stderr(), /stopped\n$/);
      await assert.rejects(fetch(`${small.url}/health`));
    });
  });

  describe('in-process: loading, request timeout, shutdown that cancels', function () {
    it('/health and chat answer 503 while the model loads; a slow request gets 504; shutdown cancels what outlives its timeout (503)', async () => {
      // 20 ms: far below 115 tokens of the small model on any machine (it is about 2-20 ms per token).
      const server = new Blip2Server({ modelDir: smallModel(), port: 0, requestTimeoutMs: 20 });
      try {
        await inProcess(server);
      } finally {
        await server.shutdown(0);
      }
    });

    async function inProcess(server: Blip2Server): Promise<void> {
      const { port } = await server.listen();
      const url = `http://127.0.0.1:${port}`;
      const health = await fetch(`${url}/health`);
      assert.equal(health.status, 503);
      assert.equal(((await health.json()) as { status: string }).status, 'loading');
      assertError(await post(url, chat(dataUrl(DEMO_BYTES))), 503, 'loading', null);
      assert.equal(await metric(url, 'blip2_up'), 0);
      await server.load();
      assert.equal((await fetch(`${url}/health`)).status, 200);

      assertError(await post(url, chat(dataUrl(DEMO_BYTES), '', { max_tokens: 115 })), 504, 'request_timeout', null, /0\.02 s/);
      assert.equal(await metric(url, 'blip2_generations_cancelled_total', '{reason="timeout"}'), 1);
      await until('the slot to be free', async () => await metric(url, 'blip2_slots_in_use') === 0);

      // Streaming, then the shutdown with 50 ms for it to finish: cancelled mid-stream (an error
      // event). On a server without the request timeout, so only the shutdown can end it.
      await server.shutdown(0);
      const untimed = new Blip2Server({ modelDir: smallModel(), port: 0 });
      const address = await untimed.listen();
      await untimed.load();
      await streamThenShutdown(untimed, `http://127.0.0.1:${address.port}`);
    }

    async function streamThenShutdown(server: Blip2Server, url: string): Promise<void> {
      const res = await fetch(`${url}/v1/chat/completions`, {
        method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(chat(dataUrl(DEMO_BYTES), '', { max_tokens: 115, stream: true })),
      });
      assert.equal(res.status, 200);
      const events = readSse(res);
      await server.shutdown(50);
      assert.equal(server.state, 'closed');
      const got = await events;
      assert.equal(got.at(-1), '[DONE]');
      const error = got.at(-2) as { error: { code: string } };
      assert.equal(error.error.code, 'shutting_down', JSON.stringify(error));
      assert.equal(server.model!.stats().disposed, true);
    }
  });
});
