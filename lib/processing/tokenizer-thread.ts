// One worker thread per tokenizer, started at its first large call and reused; it exits after
// IDLE_MS without work and never keeps the process alive while idle. Requests run in order.
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';

import { AbortError, InternalError, OutOfMemoryError, errorFromNative } from '../errors';
import type { WireError } from './tokenizer-core';
import type { WorkerInit, WorkerRequest } from './tokenizer-worker';

// Starting a worker costs the JS thread ~10 ms (and the worker ~250 ms): keep it a while.
const IDLE_MS = 60_000;

type Pending = { resolve: (value: unknown) => void; reject: (error: unknown) => void };
type Reply = { id: number; ok?: unknown; error?: WireError };
type Request = WorkerRequest extends infer R ? (R extends unknown ? Omit<R, 'id'> : never) : never;

function startWorker(init: WorkerInit): Worker {
  const ext = path.extname(__filename);
  const entry = path.join(__dirname, `tokenizer-worker${ext}`);
  if (ext === '.js') return new Worker(entry, { workerData: init });
  // Running from the TypeScript sources (tsx, tests): the worker needs tsx's loader too.
  const loader = require.resolve('tsx/cjs');
  return new Worker(`require(${JSON.stringify(loader)}); require(${JSON.stringify(entry)});`, { eval: true, workerData: init });
}

export class TokenizerThread {
  readonly #init: () => WorkerInit;
  #worker: Worker | undefined;
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  #idle: NodeJS.Timeout | undefined;

  /** `init` is called when a worker starts (again after an idle exit or a crash). */
  constructor(init: () => WorkerInit) {
    this.#init = init;
  }

  run<T>(request: Request, transfer: ArrayBuffer[] = [], signal?: AbortSignal): Promise<T> {
    if (signal?.aborted) return Promise.reject(abortError(signal));
    const worker = this.#ensure();
    const id = this.#nextId++;
    return new Promise<T>((resolve, reject) => {
      const onAbort = (): void => {
        // The worker finishes the request (at most the bounded work of one call); its reply is dropped.
        if (this.#pending.delete(id)) this.#settled();
        reject(abortError(signal!));
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#pending.set(id, {
        resolve: (value) => { signal?.removeEventListener('abort', onAbort); resolve(value as T); },
        reject: (error) => { signal?.removeEventListener('abort', onAbort); reject(error); },
      });
      worker.ref();
      worker.postMessage({ ...request, id }, transfer);
    });
  }

  #ensure(): Worker {
    if (this.#idle) clearTimeout(this.#idle);
    this.#idle = undefined;
    if (this.#worker) return this.#worker;
    const worker = startWorker(this.#init());
    worker.on('message', (reply: Reply) => {
      const pending = this.#pending.get(reply.id);
      if (!pending) return;
      this.#pending.delete(reply.id);
      if (reply.error) pending.reject(errorFromNative(reply.error.code, reply.error.message, reply.error.details));
      else pending.resolve(reply.ok);
      this.#settled();
    });
    const fail = (error: Error): void => {
      if (this.#worker !== worker) return;
      this.#worker = undefined;
      const wrapped = (error as { code?: string }).code === 'ERR_WORKER_OUT_OF_MEMORY'
        ? new OutOfMemoryError(`the tokenizer's worker thread ran out of memory: ${error.message}`)
        : new InternalError(`the tokenizer's worker thread stopped: ${error.message}`);
      for (const pending of this.#pending.values()) pending.reject(wrapped);
      this.#pending.clear();
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`exit code ${code}`)));
    this.#worker = worker;
    return worker;
  }

  #settled(): void {
    const worker = this.#worker;
    if (!worker || this.#pending.size > 0) return;
    worker.unref();
    this.#idle = setTimeout(() => {
      if (this.#worker === worker && this.#pending.size === 0) {
        this.#worker = undefined;
        void worker.terminate();
      }
    }, IDLE_MS);
    this.#idle.unref();
  }
}

function abortError(signal: AbortSignal): AbortError {
  return signal.reason instanceof AbortError ? signal.reason : new AbortError('The operation was aborted', { cause: signal.reason });
}
