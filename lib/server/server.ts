// `blip2 serve`: one model and one processor behind node:http, OpenAI's chat completions API on
// top. Requests are not batched here: each one calls generate() (or generateStream()) and the
// model's continuous-batching scheduler decodes concurrent calls together.
import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as path from 'node:path';

import { AbortError, InvalidArgumentError } from '../errors';
import type { GenerateOptions } from '../generation/options';
import { Blip2ForConditionalGeneration, type ModelStats } from '../models/blip2/modeling-blip2';
import { Blip2Processor, DEFAULT_MAX_PIXELS } from '../processing';
import type { Tensor } from '../tensor/tensor';
import {
  type ChatRequest, type FinishReason, type ResponseHead, chatChunk, chatCompletion, completionId, parseChatRequest, usage, usageChunk,
} from './chat';
import { HttpError, type ParamNames, badRequest, requestTimedOut, shuttingDown, toHttpError } from './http-error';
import { loadImage } from './images';
import { type CancelReason, Metrics } from './metrics';

/** Options of a Blip2Server (the flags of `blip2 serve`). */
export interface ServeOptions {
  /** A model folder made by `blip2 export`. */
  modelDir: string;
  /** The name /v1/models lists and responses carry when a request names none (default: the folder's name). */
  modelName?: string;
  /** 'cpu' (default), 'cuda' or 'cuda:N'. */
  device?: string;
  /** Default 127.0.0.1 (loopback only). */
  host?: string;
  /** Default 8080; 0 picks a free port. */
  port?: number;
  /** A folder local image paths and file: URLs may point into; default none (data URLs only). */
  allowLocalImages?: string;
  /** Largest request body (and local image file), in bytes; default 20 MiB. */
  maxBodyBytes?: number;
  /** Largest image, in pixels (the processor's maxPixels); default the processor's (100,000,000). */
  maxImagePixels?: number;
  /** A request still running after this many ms is stopped and answered 504; default none. */
  requestTimeoutMs?: number;
  /** fromPretrained's maxBatchSize (KV-cache slots), maxQueue and maxLength; default the model's defaults. */
  maxBatchSize?: number;
  maxQueue?: number;
  maxLength?: number;
  /** fromPretrained's attention for the vision model; default 'eager'. */
  attention?: 'eager' | 'sdpa';
  /** Where the server reports what it does (one line each); default: nowhere. */
  log?: (line: string) => void;
}

export const DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024;

type State = 'loading' | 'ready' | 'shutting_down' | 'closed';

/** One chat request being served: cancelled by a client disconnect, its timeout or the shutdown. */
interface Flight {
  controller: AbortController;
  reason?: CancelReason;
  done: Promise<void>;
  abort(reason: CancelReason): void;
  end(): void;
}

/** Raised inside a request whose generation was cancelled; answered by its reason. */
class Cancelled extends Error {}

const SSE_HEADERS = { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', 'x-accel-buffering': 'no' };

export class Blip2Server {
  readonly options: Readonly<ServeOptions>;
  readonly modelName: string;
  readonly #http: http.Server;
  readonly #metrics = new Metrics();
  readonly #flights = new Set<Flight>();
  readonly #started = performance.now();
  readonly #localRoot: string | undefined;
  readonly #maxBodyBytes: number;
  readonly #log: (line: string) => void;
  readonly #loadController = new AbortController();
  #state: State = 'loading';
  #model: Blip2ForConditionalGeneration | undefined;
  #processor: Blip2Processor | undefined;
  #eos = new Set<number>();
  #loading: Promise<void> | undefined;
  #closing: Promise<void> | undefined;

  constructor(options: ServeOptions) {
    this.options = { ...options };
    this.modelName = options.modelName ?? path.basename(path.resolve(options.modelDir));
    this.#maxBodyBytes = options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;
    this.#log = options.log ?? (() => {});
    if (options.allowLocalImages !== undefined) {
      // The real path: what requests resolve to is compared with it after following links.
      let root: string;
      try {
        root = fs.realpathSync(options.allowLocalImages);
      } catch {
        throw InvalidArgumentError.of('allowLocalImages', options.allowLocalImages, 'an existing folder');
      }
      if (!fs.statSync(root).isDirectory()) throw InvalidArgumentError.of('allowLocalImages', options.allowLocalImages, 'a folder');
      this.#localRoot = root;
    }
    this.#http = http.createServer((req, res) => this.#onRequest(req, res));
    // Without a model to wait for, a slow client must not hold a connection for long.
    this.#http.headersTimeout = 30_000;
  }

  /** 'loading' until load() resolves, 'ready', then 'shutting_down' and 'closed'. */
  get state(): State {
    return this.#state;
  }

  get model(): Blip2ForConditionalGeneration | undefined {
    return this.#model;
  }

  /** Starts accepting connections (the model may still be loading: /health answers 503 until it is); resolves to the address. */
  listen(): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      this.#http.once('error', reject);
      this.#http.listen(this.options.port ?? 8080, this.options.host ?? '127.0.0.1', () => {
        this.#http.removeListener('error', reject);
        resolve(this.#http.address() as AddressInfo);
      });
    });
  }

  /** Loads the processor and the model; requests are served once it resolves. */
  load(): Promise<void> {
    this.#loading ??= this.#load();
    return this.#loading;
  }

  async #load(): Promise<void> {
    const { modelDir } = this.options;
    const [processor, model] = await Promise.allSettled([
      Blip2Processor.fromPretrained(modelDir),
      Blip2ForConditionalGeneration.fromPretrained(modelDir, {
        device: this.options.device ?? 'cpu', maxBatchSize: this.options.maxBatchSize, maxQueue: this.options.maxQueue,
        maxLength: this.options.maxLength, attention: this.options.attention, signal: this.#loadController.signal,
      }),
    ]);
    if (processor.status === 'rejected' || model.status === 'rejected') {
      if (model.status === 'fulfilled') await model.value.dispose();
      throw processor.status === 'rejected' ? processor.reason : (model as PromiseRejectedResult).reason;
    }
    this.#processor = processor.value;
    this.#model = model.value;
    const gc = model.value.generationConfig?.eos_token_id;
    this.#eos = new Set([...(model.value.manifest.special_tokens.eos_token_id ?? []), ...(Array.isArray(gc) ? gc : typeof gc === 'number' ? [gc] : [])]);
    if (this.#state === 'loading') this.#state = 'ready';
  }

  /**
   * Stops accepting connections, lets the requests in flight finish (for at most `timeoutMs`,
   * then cancels them: they are answered 503), then disposes of the model. Idempotent.
   */
  shutdown(timeoutMs = 30_000): Promise<void> {
    this.#closing ??= this.#shutdown(timeoutMs);
    return this.#closing;
  }

  async #shutdown(timeoutMs: number): Promise<void> {
    this.#state = 'shutting_down';
    this.#loadController.abort();
    const closed = new Promise<void>((resolve) => this.#http.close(() => resolve()));
    this.#http.closeIdleConnections();
    const flights = [...this.#flights];
    if (flights.length > 0) this.#log(`shutting down: waiting for ${flights.length} request(s) in flight (at most ${timeoutMs / 1000} s)`);
    const drained = Promise.all(flights.map((f) => f.done));
    if (!(await within(drained, timeoutMs))) {
      this.#log(`shutting down: cancelling ${this.#flights.size} request(s) still running`);
      for (const f of this.#flights) f.abort('shutdown');
      // A cancelled call stops within one decoding step; this bound only guards against a bug.
      await within(drained, 10_000);
    }
    this.#http.closeAllConnections();
    await closed;
    await this.#loading?.catch(() => {});
    await this.#model?.dispose();
    this.#state = 'closed';
  }

  #onRequest(req: http.IncomingMessage, res: http.ServerResponse): void {
    const started = performance.now();
    const pathname = (req.url ?? '/').split('?')[0];
    const route = ROUTES[pathname];
    res.once('close', () => this.#metrics.request(route ? pathname : 'other', res.statusCode));
    if (this.#state !== 'loading' && this.#state !== 'ready') res.setHeader('connection', 'close');
    let params: ParamNames = { image: 'messages', maxTokens: 'max_tokens' };
    const handle = async (): Promise<void> => {
      if (!route) throw new HttpError(404, `no route ${pathname}; this server has ${Object.keys(ROUTES).map((r) => `${ROUTES[r].method} ${r}`).join(', ')}`, { type: 'not_found_error', code: 'unknown_route' });
      if (req.method !== route.method) {
        throw new HttpError(405, `${pathname} takes ${route.method}, not ${req.method}`, { code: 'method_not_allowed', headers: { allow: route.method } });
      }
      switch (route.name) {
        case 'health': return this.#health(res);
        case 'metrics': return this.#metricsPage(res);
        case 'models': return this.#models(res);
        case 'chat': return this.#chat(req, res, started, (p) => { params = p; });
      }
    };
    handle().catch((error: unknown) => this.#fail(res, toHttpError(error, params), error));
  }

  #fail(res: http.ServerResponse, error: HttpError, cause: unknown): void {
    if (error.status >= 500 && error.code === 'internal_error') this.#log(`internal error: ${(cause as Error)?.stack ?? String(cause)}`);
    if (res.destroyed || res.writableEnded) return;
    if (res.headersSent) {
      // Mid-stream: the status is sent already; OpenAI streams an error event.
      res.write(`data: ${JSON.stringify(error.body())}\n\n`);
      res.end('data: [DONE]\n\n');
      return;
    }
    sendJson(res, error.status, error.body(), error.headers);
  }

  #health(res: http.ServerResponse): void {
    const ready = this.#state === 'ready';
    const stats = this.#stats();
    sendJson(res, ready ? 200 : 503, {
      status: ready ? 'ok' : this.#state,
      model: this.modelName,
      model_dir: path.resolve(this.options.modelDir),
      device: this.#model?.device ?? this.options.device ?? 'cpu',
      uptime_s: Math.round((performance.now() - this.#started) / 10) / 100,
      ...(stats ? { slots: stats.slots, slots_in_use: stats.slotsInUse, queued: stats.queued, requests_in_flight: this.#flights.size } : {}),
    }, ready ? {} : { 'retry-after': '1' });
  }

  #metricsPage(res: http.ServerResponse): void {
    const body = this.#metrics.render(this.#stats(), { uptimeSeconds: (performance.now() - this.#started) / 1000, ready: this.#state === 'ready' });
    res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  }

  #models(res: http.ServerResponse): void {
    sendJson(res, 200, { object: 'list', data: [{ id: this.modelName, object: 'model', created: Math.floor(Date.now() / 1000), owned_by: 'blip2-node' }] });
  }

  #stats(): ModelStats | null {
    try {
      return this.#model && this.#state !== 'closed' ? this.#model.stats() : null;
    } catch {
      return null;
    }
  }

  /** Tracks a chat request from its first byte to its response's end. */
  #begin(res: http.ServerResponse): Flight {
    let end!: () => void;
    const done = new Promise<void>((resolve) => { end = resolve; });
    const controller = new AbortController();
    const flight: Flight = {
      controller,
      done,
      abort: (reason) => {
        if (flight.reason !== undefined) return;
        flight.reason = reason;
        this.#metrics.cancelled(reason);
        controller.abort(new AbortError(`cancelled: ${reason}`));
      },
      end: () => {
        clearTimeout(timer);
        if (this.#flights.delete(flight)) this.#metrics.inFlight--;
        end();
      },
    };
    const timeout = this.options.requestTimeoutMs;
    const timer = timeout ? setTimeout(() => flight.abort('timeout'), timeout) : undefined;
    // 'close' before the response finished: the client went away. Stop decoding, free the slots.
    res.once('close', () => {
      if (!res.writableFinished) flight.abort('disconnect');
    });
    this.#flights.add(flight);
    this.#metrics.inFlight++;
    return flight;
  }

  async #chat(req: http.IncomingMessage, res: http.ServerResponse, started: number, setParams: (p: ParamNames) => void): Promise<void> {
    if (this.#state === 'loading') throw new HttpError(503, 'the model is still loading', { code: 'loading', headers: { 'retry-after': '1' } });
    if (this.#state !== 'ready') throw shuttingDown();
    const contentType = req.headers['content-type'] ?? '';
    if (!/^application\/json\s*(;|$)/i.test(contentType)) {
      throw new HttpError(415, `expected Content-Type: application/json, got ${contentType ? JSON.stringify(contentType) : 'none'}`, { code: 'unsupported_media_type' });
    }
    const flight = this.#begin(res);
    try {
      await this.#serveChat(req, res, started, flight, setParams);
    } catch (error) {
      if (flight.reason === 'disconnect') return; // no one to answer
      if (flight.reason === 'timeout') throw requestTimedOut(this.options.requestTimeoutMs!);
      if (flight.reason === 'shutdown') throw shuttingDown();
      throw error;
    } finally {
      flight.end();
    }
  }

  async #serveChat(req: http.IncomingMessage, res: http.ServerResponse, started: number, flight: Flight, setParams: (p: ParamNames) => void): Promise<void> {
    const model = this.#model!;
    const processor = this.#processor!;
    const signal = flight.controller.signal;
    const raw = await readBody(req, this.#maxBodyBytes, signal);
    let json: unknown;
    try {
      json = JSON.parse(raw.toString('utf8'));
    } catch (e) {
      throw badRequest(null, `the body is not valid JSON: ${(e as Error).message}`, 'invalid_json');
    }
    const request = parseChatRequest(json, model.generationConfig?.do_sample === true);
    setParams({ image: request.image.param, maxTokens: request.maxTokensParam });
    const image = await loadImage(request.image.url, request.image.param, { localRoot: this.#localRoot, maxFileBytes: this.#maxBodyBytes });
    if (signal.aborted) throw new Cancelled();
    const inputs = await processor.process({
      images: [image], text: request.prompt, device: model.device, dtype: model.dtype, signal,
      maxPixels: this.options.maxImagePixels ?? DEFAULT_MAX_PIXELS,
    });
    try {
      const promptTokens = inputs.inputIds.shape[1];
      const options = this.#fitOptions(request, promptTokens);
      const head: ResponseHead = { id: completionId(), created: Math.floor(Date.now() / 1000), model: request.model ?? this.modelName };
      if (request.stream) await this.#stream(res, inputs, options, request, head, promptTokens, flight, started);
      else await this.#complete(res, inputs, options, head, promptTokens, flight, started);
    } finally {
      inputs.pixelValues.dispose();
      inputs.inputIds.dispose();
      inputs.attentionMask.dispose();
    }
  }

  /** The request's options within what the model holds: new tokens fit beside the prompt, choices within the slots. */
  #fitOptions(request: ChatRequest, promptTokens: number): GenerateOptions {
    const model = this.#model!;
    const { maxLength, slots } = model.stats();
    const queries = model.manifest.num_query_tokens;
    const room = maxLength - promptTokens;
    const where = `the prompt takes ${promptTokens} of the ${maxLength} positions a sequence may use (${queries} image query tokens and ${promptTokens - queries} text tokens)`;
    if (room < 1) throw badRequest('messages', `${where}: no room is left for an answer; shorten the prompt`, 'context_length_exceeded');
    const asked = request.options.maxNewTokens;
    if (asked !== undefined && asked > room) {
      throw badRequest(request.maxTokensParam, `${request.maxTokensParam} is ${asked}, but ${where}: at most ${room} new tokens fit`, 'context_length_exceeded');
    }
    if (request.n > slots) throw badRequest('n', `n is ${request.n}; at most ${slots} choices per request (the server's --max-batch-size)`);
    // Without max_tokens: the model's default (generate()'s rule), cut to the room left.
    const gc = model.generationConfig;
    const byDefault = gc?.max_new_tokens ?? gc?.max_length ?? 20;
    return { ...request.options, maxNewTokens: asked ?? Math.min(byDefault, room) };
  }

  async #complete(res: http.ServerResponse, inputs: { pixelValues: Tensor; inputIds: Tensor; attentionMask: Tensor }, options: GenerateOptions,
    head: ResponseHead, promptTokens: number, flight: Flight, started: number): Promise<void> {
    // stopOnAbortSignal: a cancelled call settles once the scheduler has freed its slots, so a
    // request is out of flight only when its slots are.
    const sequences = await this.#model!.generate(inputs, { ...options, signal: flight.controller.signal, stopOnAbortSignal: true });
    let rows: Array<{ ids: number[]; tokens: number; finishReason: FinishReason }>;
    try {
      if (flight.reason !== undefined) throw new Cancelled();
      rows = await this.#answers(sequences, promptTokens);
    } finally {
      sequences.dispose();
    }
    const completionTokens = rows.reduce((sum, r) => sum + r.tokens, 0);
    this.#count(promptTokens, completionTokens);
    const choices = rows.map((r) => ({ text: this.#processor!.decode(r.ids, { skipSpecialTokens: true }), finishReason: r.finishReason }));
    sendJson(res, 200, chatCompletion(head, choices, usage(promptTokens, completionTokens)));
    this.#metrics.latency((performance.now() - started) / 1000);
  }

  /** Each row's new ids up to its end-of-sequence token, the tokens it took (that token included) and why it ended. */
  async #answers(sequences: Tensor, promptTokens: number) {
    const ids = (await sequences.toArray()) as BigInt64Array;
    const [count, width] = sequences.shape;
    return Array.from({ length: count }, (_, i) => {
      const fresh = Array.from(ids.subarray(i * width + promptTokens, (i + 1) * width), Number);
      const end = fresh.findIndex((id) => this.#eos.has(id));
      return end < 0
        ? { ids: fresh, tokens: fresh.length, finishReason: 'length' as FinishReason }
        : { ids: fresh.slice(0, end), tokens: end + 1, finishReason: 'stop' as FinishReason };
    });
  }

  async #stream(res: http.ServerResponse, inputs: { pixelValues: Tensor; inputIds: Tensor; attentionMask: Tensor }, options: GenerateOptions,
    request: ChatRequest, head: ResponseHead, promptTokens: number, flight: Flight, started: number): Promise<void> {
    const n = request.n;
    const tokens = new Array<number>(n).fill(0);
    const last = new Array<number>(n).fill(-1);
    // generateStream waits, when cancelled, until the scheduler has stopped the call and freed its slots.
    const deltas = this.#model!.generateStream(inputs, { ...options, signal: flight.controller.signal })[Symbol.asyncIterator]();
    const send = (value: unknown): boolean => res.write(`data: ${JSON.stringify(value)}\n\n`);
    try {
      // The status waits for the first token, so that a full queue or a bad input is still a
      // plain 429 / 400 rather than an error event.
      let next = await deltas.next();
      res.writeHead(200, SSE_HEADERS);
      send(chatChunk(head, Array.from({ length: n }, (_, index) => ({ index, delta: { role: 'assistant', content: '' }, finishReason: null })), request.includeUsage));
      while (!next.done) {
        const delta = next.value;
        tokens[delta.sequence] += delta.tokenIds.length;
        if (delta.tokenIds.length > 0) last[delta.sequence] = delta.tokenIds[delta.tokenIds.length - 1];
        if (delta.text) send(chatChunk(head, [{ index: delta.sequence, delta: { content: delta.text }, finishReason: null }], request.includeUsage));
        next = await deltas.next();
      }
    } finally {
      this.#count(0, tokens.reduce((a, b) => a + b, 0));
    }
    if (flight.reason !== undefined) throw new Cancelled();
    this.#count(promptTokens, 0);
    send(chatChunk(head, last.map((id, index) => ({ index, delta: {}, finishReason: this.#eos.has(id) ? 'stop' : 'length' })), request.includeUsage));
    if (request.includeUsage) send(usageChunk(head, usage(promptTokens, tokens.reduce((a, b) => a + b, 0))));
    res.end('data: [DONE]\n\n');
    this.#metrics.latency((performance.now() - started) / 1000);
  }

  #count(promptTokens: number, completionTokens: number): void {
    this.#metrics.promptTokens += promptTokens;
    this.#metrics.completionTokens += completionTokens;
  }
}

const ROUTES: Record<string, { method: string; name: 'health' | 'metrics' | 'models' | 'chat' }> = {
  '/v1/chat/completions': { method: 'POST', name: 'chat' },
  '/v1/models': { method: 'GET', name: 'models' },
  '/health': { method: 'GET', name: 'health' },
  '/metrics': { method: 'GET', name: 'metrics' },
};

function sendJson(res: http.ServerResponse, status: number, value: unknown, headers: Record<string, string> = {}): void {
  const body = JSON.stringify(value);
  res.writeHead(status, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

/** The body, at most `limit` bytes; a larger one is a 413 (and the connection is closed, not read to its end). */
function readBody(req: http.IncomingMessage, limit: number, signal: AbortSignal): Promise<Buffer> {
  const tooLarge = (): HttpError => new HttpError(413, `the request body is larger than the server's limit of ${limit} bytes (--max-body-bytes)`, {
    code: 'body_too_large', headers: { connection: 'close' },
  });
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > limit) {
    req.resume();
    return Promise.reject(tooLarge());
  }
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const cleanup = (): void => {
      req.removeListener('data', onData);
      req.removeListener('end', onEnd);
      req.removeListener('error', onError);
      signal.removeEventListener('abort', onAbort);
    };
    const onData = (chunk: Buffer): void => {
      size += chunk.length;
      if (size > limit) {
        cleanup();
        req.resume(); // discard the rest until the connection closes
        reject(tooLarge());
      } else {
        chunks.push(chunk);
      }
    };
    const onEnd = (): void => {
      cleanup();
      resolve(Buffer.concat(chunks, size));
    };
    const onError = (error: Error): void => {
      cleanup();
      reject(error);
    };
    const onAbort = (): void => {
      cleanup();
      reject(new Cancelled());
    };
    req.on('data', onData);
    req.once('end', onEnd);
    req.once('error', onError);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

/** Whether `promise` settled within `ms`. */
async function within(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(false), ms); });
  try {
    return await Promise.race([promise.then(() => true), timedOut]);
  } finally {
    clearTimeout(timer);
  }
}
