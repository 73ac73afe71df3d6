// The tokenizer's work, as plain functions of a @huggingface/tokenizers instance: building it from
// tokenizer.json, encoding a batch (truncation, padding, image-token prefix) into flat typed arrays,
// and decoding rows of ids. PreTrainedTokenizer runs them on the JS thread for small inputs and in
// its worker thread (tokenizer-worker.ts) for large ones, so this module imports nothing native.
import { Tokenizer } from '@huggingface/tokenizers';

import { Blip2Error, InvalidArgumentError } from '../errors';
import { isInteger } from '../validation';

export type JsonObject = Record<string, unknown>;

interface AddedTokenJson {
  id: number;
  content: string;
  single_word?: boolean;
  lstrip?: boolean;
  rstrip?: boolean;
  normalized?: boolean;
  special?: boolean;
}

/**
 * How much text one call takes. The synchronous methods (encode, call, decode and batchDecode of
 * arrays) run on the JS thread and take only what runs there in about 10 ms (measured worst case:
 * CJK text, ~13 µs per character on a busy 2-core machine; ~30 µs per distinct text). The async
 * ones (Blip2Processor.process, callAsync, encodeAsync, decode/batchDecode of a Tensor) take more:
 * beyond the synchronous sizes they tokenize in a worker thread, and their own bounds keep one call
 * to about 2 s of that thread's time and a few MB of results.
 */
export const TEXT_LIMITS = Object.freeze({
  /** Characters (UTF-16 code units) of a call's distinct texts, synchronous methods. */
  syncChars: 1024,
  /** Distinct texts (or rows to decode) of one synchronous call. */
  syncTexts: 64,
  /** Token ids one synchronous call returns or decodes (rows x padded length). */
  syncTokens: 16_384,
  /** Characters of a call's distinct texts, async methods. */
  maxChars: 131_072,
  /** Texts (rows) of one call: checking 65,536 of them alone took the JS thread 20-30 ms. */
  maxTexts: 4096,
  /** Token ids one async call makes or decodes (rows x padded length, image tokens included): 64 rows of 2,048. */
  maxTokens: 131_072,
  /** maxLength bound of a tokenizer whose model length is unknown (no model_max_length, no model folder). */
  defaultMaxLengthBound: 65_536,
});

/** The backend for tokenizer.json, with `ensureTokens` added as special tokens at the next free ids when missing. */
export function buildBackend(tokenizerJson: JsonObject, config: JsonObject, ensureTokens: readonly string[]): { backend: Tokenizer; json: JsonObject & { added_tokens: AddedTokenJson[] } } {
  const json: JsonObject & { added_tokens: AddedTokenJson[] } = {
    ...tokenizerJson,
    added_tokens: [...((tokenizerJson.added_tokens as AddedTokenJson[] | undefined) ?? [])],
  };
  let backend = newBackend(json, config);
  const missing = ensureTokens.filter((t) => backend.token_to_id(t) === undefined);
  if (missing.length > 0) {
    let next = backend.get_vocab(true).size;
    for (const content of missing) {
      json.added_tokens.push({ id: next++, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
    }
    backend = newBackend(json, config);
  }
  return { backend, json };
}

function newBackend(json: JsonObject, config: JsonObject): Tokenizer {
  // The backend only reads a few flags from the config; the special tokens come from tokenizer.json.
  const backendConfig: JsonObject = {
    clean_up_tokenization_spaces: false,
    remove_space: config.remove_space,
    do_lowercase_and_remove_accent: config.do_lowercase_and_remove_accent,
    additional_special_tokens: [],
  };
  return new Tokenizer(json, backendConfig);
}

/** A tokenizer call with every option resolved and checked (PreTrainedTokenizer builds it). */
export interface EncodePlan {
  addSpecialTokens: boolean;
  /** Cut rows longer than `limit` (text tokens, special tokens included). */
  truncate: boolean;
  /** The truncation length and the length of padding 'max_length'. */
  limit?: number;
  truncationSide: 'left' | 'right';
  padding: 'none' | 'longest' | 'max_length';
  padToMultipleOf?: number;
  paddingSide: 'left' | 'right';
  padTokenId?: number;
  /** `count` copies of token `id` before each row (Blip2Processor's image tokens). */
  prefix?: { id: number; count: number };
  /** Largest rows x row length; beyond it the call is rejected before the arrays are made. */
  maxTokens: number;
  /** What to do instead, for the message of that rejection. */
  maxTokensHint: string;
  /** The caller's `padding`, for error messages. */
  paddingValue: string;
}

/** A tokenized batch as flat arrays: row r is ids[r * width, r * width + lengths[r]). */
export interface EncodedBatch {
  rows: number;
  /** The longest row (padded, prefix included). */
  width: number;
  /** Each row's length (padded, prefix included); shorter rows are followed by zeros. */
  lengths: Int32Array;
  ids: Int32Array;
  mask: Uint8Array;
}

export function encodeBatch(backend: Tokenizer, texts: readonly string[], plan: EncodePlan): EncodedBatch {
  // A text given for several images (or repeated) is tokenized once.
  const seen = new Map<string, number[]>();
  const tokenized = texts.map((text, index) => {
    let ids = seen.get(text);
    if (ids === undefined) {
      ids = encodeOne(backend, text, plan, index);
      seen.set(text, ids);
    }
    return ids;
  });
  const longest = tokenized.reduce((m, row) => Math.max(m, row.length), 0);
  let target = longest;
  if (plan.padding !== 'none') {
    if (plan.padding === 'max_length') target = plan.limit!;
    const multiple = plan.padToMultipleOf;
    if (multiple !== undefined && target % multiple !== 0) target = (Math.floor(target / multiple) + 1) * multiple;
  }
  const prefix = plan.prefix?.count ?? 0;
  const rows = tokenized.length;
  // Rows longer than the padded length (max_length without truncation) stay longer, as in transformers.
  const width = prefix + Math.max(target, longest);
  if (rows * width > plan.maxTokens) {
    throw new InvalidArgumentError(
      `the texts make ${rows} row${rows === 1 ? '' : 's'} of ${width} tokens (${rows * width} tokens), above the limit of ${plan.maxTokens} tokens per call; ${plan.maxTokensHint}`,
      { argument: 'text', value: `${rows} x ${width} tokens`, expected: `at most ${plan.maxTokens} tokens per call` },
    );
  }
  if (plan.padding !== 'none' && plan.padTokenId === undefined && tokenized.some((row) => row.length < target)) {
    throw new InvalidArgumentError(
      'asked to pad, but the tokenizer has no padding token (no pad_token in tokenizer_config.json / special_tokens_map.json)',
      { argument: 'padding', value: plan.paddingValue, expected: 'a tokenizer with a pad token, or padding: false' },
    );
  }
  const ids = new Int32Array(rows * width);
  const mask = new Uint8Array(rows * width);
  const lengths = new Int32Array(rows);
  const pad = plan.padTokenId ?? 0;
  for (let r = 0; r < rows; r++) {
    const row = tokenized[r];
    const start = r * width;
    if (prefix > 0) {
      ids.fill(plan.prefix!.id, start, start + prefix);
      mask.fill(1, start, start + prefix);
    }
    const pads = plan.padding === 'none' ? 0 : Math.max(0, target - row.length);
    const at = start + prefix + (plan.paddingSide === 'left' ? pads : 0);
    ids.set(row, at);
    mask.fill(1, at, at + row.length);
    if (pads > 0) {
      const padAt = plan.paddingSide === 'left' ? start + prefix : at + row.length;
      ids.fill(pad, padAt, padAt + pads);
    }
    lengths[r] = prefix + pads + row.length;
  }
  return { rows, width, lengths, ids, mask };
}

function encodeOne(backend: Tokenizer, text: string, plan: EncodePlan, index: number): number[] {
  const full = backend.encode(text, { add_special_tokens: plan.addSpecialTokens }).ids;
  if (!plan.truncate || full.length <= plan.limit!) return full;
  return truncate(backend, text, full, plan, index);
}

/** Truncates the text part only, keeping the special tokens the post-processor adds around it (as the Rust tokenizer does). */
function truncate(backend: Tokenizer, text: string, full: number[], plan: EncodePlan, index: number): number[] {
  const limit = plan.limit!;
  const core = plan.addSpecialTokens ? backend.encode(text, { add_special_tokens: false }).ids : full;
  let prefix: number[] = [];
  let suffix: number[] = [];
  if (plan.addSpecialTokens) {
    const extra = full.length - core.length;
    let at = -1;
    for (let k = 0; k <= extra && at < 0; k++) {
      let same = true;
      for (let j = 0; j < core.length && same; j++) same = full[k + j] === core[j];
      if (same) at = k;
    }
    if (at < 0) at = 0; // a post-processor that rewrites tokens: treat everything as text
    prefix = full.slice(0, at);
    suffix = full.slice(at + core.length);
  }
  const room = limit - prefix.length - suffix.length;
  if (room < 0) {
    throw new InvalidArgumentError(
      `cannot truncate text ${index} to maxLength ${limit}: the tokenizer adds ${prefix.length + suffix.length} special tokens`,
      { argument: 'maxLength', value: String(limit), expected: `at least ${prefix.length + suffix.length}`, index },
    );
  }
  const kept = plan.truncationSide === 'left' ? core.slice(core.length - room) : core.slice(0, room);
  return [...prefix, ...kept, ...suffix];
}

export interface DecodePlan {
  skipSpecialTokens: boolean;
  cleanUpTokenizationSpaces: boolean;
  /** Ids from 0 to vocabSize - 1 are accepted (those without a token decode to nothing). */
  vocabSize: number;
  /** 'ids' (one row) or 'sequences' (rows), for error messages. */
  argument: string;
  batched: boolean;
}

/** Rows of ids → texts; an id that is not an integer in [0, vocabSize) is an InvalidArgumentError naming its row and position. */
export function decodeRows(backend: Tokenizer, specialTokenIds: ReadonlySet<number>, rows: ReadonlyArray<ArrayLike<number | bigint>>, plan: DecodePlan): string[] {
  const vocab = plan.vocabSize;
  const vocabBig = BigInt(vocab);
  return rows.map((row, r) => {
    const kept: number[] = [];
    for (let j = 0; j < row.length; j++) {
      const raw = row[j];
      const ok = typeof raw === 'bigint' ? raw >= 0n && raw < vocabBig : isInteger(raw, 0, vocab - 1);
      if (!ok) {
        const argument = plan.batched ? `${plan.argument}[${r}][${j}]` : `${plan.argument}[${j}]`;
        const shown = typeof raw === 'bigint' ? String(raw) : typeof raw === 'number' ? String(raw) : typeof raw;
        const expected = `a token id: an integer from 0 to ${vocab - 1}`;
        throw new InvalidArgumentError(`argument '${argument}' is ${shown}; expected ${expected}`, {
          argument, value: shown, expected, index: plan.batched ? r : j,
        });
      }
      const id = Number(raw);
      // Ids below vocabSize without a token are the padded rows of an LM vocabulary (OPT: 50272 rows
      // for 50265 tokens): the Rust tokenizer decodes them to nothing, and so do we.
      if (backend.id_to_token(id) === undefined) continue;
      if (plan.skipSpecialTokens && specialTokenIds.has(id)) continue;
      kept.push(id);
    }
    if (kept.length === 0) return '';
    return backend.decode(kept, { skip_special_tokens: false, clean_up_tokenization_spaces: plan.cleanUpTokenizationSpaces });
  });
}

/** An error as it crosses from the worker thread: what errorFromNative needs to rebuild its class. */
export interface WireError {
  code: string;
  message: string;
  details: Record<string, string>;
}

export function toWireError(error: unknown): WireError {
  if (error instanceof Blip2Error) {
    const details: Record<string, string> = {};
    for (const key of ['argument', 'value', 'expected', 'file', 'index'] as const) {
      const v = (error as unknown as Record<string, unknown>)[key];
      if (v !== undefined) details[key] = String(v);
    }
    return { code: error.code, message: error.message, details };
  }
  return { code: 'ERR_BLIP2_INTERNAL', message: `tokenizer worker: ${error instanceof Error ? error.message : String(error)}`, details: {} };
}
