// The tokenizer's worker thread: builds the same backend as its PreTrainedTokenizer (from the same
// tokenizer.json text, config and added tokens) and runs large encode/decode calls off the JS thread.
import { parentPort, workerData } from 'node:worker_threads';

import { type DecodePlan, type EncodePlan, type JsonObject, buildBackend, decodeRows, encodeBatch, toWireError } from './tokenizer-core';

export interface WorkerInit {
  tokenizerJson: string;
  config: JsonObject;
  ensureTokens: string[];
  specialTokenIds: number[];
}

export type WorkerRequest =
  | { id: number; kind: 'encode'; texts: string[]; plan: EncodePlan }
  | { id: number; kind: 'decode'; flat: Int32Array | BigInt64Array | Int16Array | Int8Array | Uint8Array; rows: number; width: number; plan: DecodePlan };

if (parentPort) {
  const port = parentPort;
  const init = workerData as WorkerInit;
  const { backend } = buildBackend(JSON.parse(init.tokenizerJson) as JsonObject, init.config, init.ensureTokens);
  const special = new Set(init.specialTokenIds);
  port.on('message', (request: WorkerRequest) => {
    try {
      if (request.kind === 'encode') {
        const out = encodeBatch(backend, request.texts, request.plan);
        port.postMessage({ id: request.id, ok: out }, [out.ids.buffer, out.mask.buffer, out.lengths.buffer] as ArrayBuffer[]);
      } else {
        const { flat, rows, width } = request;
        const list = Array.from({ length: rows }, (_, r) => flat.subarray(r * width, (r + 1) * width));
        port.postMessage({ id: request.id, ok: decodeRows(backend, special, list, request.plan) });
      }
    } catch (error) {
      port.postMessage({ id: request.id, error: toWireError(error) });
    }
  });
}
