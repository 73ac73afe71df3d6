// A Hugging Face tokenizer: tokenizer.json run by @huggingface/tokenizers (pure JS), with the
// behaviour of transformers' `tokenizer(...)`, `decode` and `batch_decode` on top: special tokens
// added by the tokenizer's post-processor (OPT prepends </s>, T5 appends </s>), padding and
// truncation on the configured sides, and the settings of tokenizer_config.json /
// special_tokens_map.json.
//
// Tokenizing is synchronous JS (~1-13 µs per character), so the JS thread only runs small calls
// (TEXT_LIMITS.sync*); the async methods hand larger ones to a worker thread, and every call is
// bounded (TEXT_LIMITS, maxLengthBound) before any tokenizing starts.
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { Tokenizer } from '@huggingface/tokenizers';

import { DTypeError, InvalidArgumentError, ModelLoadError, describeValue } from '../errors';
import { isIntegerDType } from '../tensor/dtype';
import { Tensor } from '../tensor/tensor';
import { integer, integerRange, isInteger } from '../validation';
import {
  type DecodePlan, type EncodePlan, type EncodedBatch, type JsonObject, TEXT_LIMITS, buildBackend, decodeRows, encodeBatch,
} from './tokenizer-core';
import { TokenizerThread } from './tokenizer-thread';

/** transformers' `padding`: true / 'longest' pads to the longest row, 'max_length' to maxLength. */
export type PaddingStrategy = boolean | 'longest' | 'max_length' | 'do_not_pad';
/** transformers' `truncation` (single sequences: every strategy truncates the one sequence). */
export type TruncationStrategy = boolean | 'longest_first' | 'only_first' | 'do_not_truncate';

/** Options of PreTrainedTokenizer.call(). */
export interface TokenizeOptions {
  /** Add the special tokens of the tokenizer's post-processor (default true), as transformers' `add_special_tokens`. */
  addSpecialTokens?: boolean;
  /** Pad the rows to one length (default false: none). */
  padding?: PaddingStrategy;
  /** Truncate to maxLength (default: only when maxLength is given without padding, as transformers). */
  truncation?: TruncationStrategy;
  /** Length limit for truncation and for padding 'max_length' (special tokens included, as in transformers); at most maxLengthBound. Default: model_max_length where a limit is needed. */
  maxLength?: number;
  /** Pad the length up to a multiple of this, at most maxLengthBound (default: no rounding). */
  padToMultipleOf?: number;
  /** Overrides the tokenizer's padding side for this call; default: the tokenizer's (paddingSide). */
  paddingSide?: 'left' | 'right';
}

/** Token ids and attention masks, one row per text. */
export interface BatchEncoding {
  inputIds: number[][];
  attentionMask: number[][];
}

/** Options of decode() and batchDecode(). */
export interface DecodeOptions {
  /** Drop special tokens (bos/eos/pad/unk/added special tokens such as <image>); default false. */
  skipSpecialTokens?: boolean;
  /** Default: the tokenizer's `clean_up_tokenization_spaces` setting (false when unset, as in transformers >= 4.45). */
  cleanUpTokenizationSpaces?: boolean;
}

/** Token ids: numbers or bigints (an array or a typed array). */
export type TokenIds = ArrayLike<number | bigint>;

/** Options of the PreTrainedTokenizer constructor and fromPretrained(). */
export interface TokenizerOptions {
  /**
   * The largest maxLength / padToMultipleOf accepted: what the model holds. Default: the smaller
   * of tokenizer_config.json's model_max_length and (fromPretrained) the folder's language model
   * length; TEXT_LIMITS.defaultMaxLengthBound when neither is known.
   */
  maxLengthBound?: number;
  /**
   * The model's vocabulary size when it is larger than the tokenizer's (padded LM vocabularies);
   * decode accepts ids below it. Default: the tokenizer's own size (fromPretrained: the folder's
   * model vocabulary when larger).
   */
  vocabSize?: number;
}

const SPECIAL_KEYS = ['bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token'] as const;
/** transformers' VERY_LARGE_INTEGER: model_max_length when a checkpoint sets none. */
const VERY_LARGE = 1e30;

/** @internal Blip2Processor's entry: tokenize with image-token prefixes and the processor's bound. */
export const encodeForProcessor = Symbol('encodeForProcessor');

/** @internal what Blip2Processor adds to a tokenizer call */
export interface ProcessorEncodeExtra {
  /** The processor's own bound and where it comes from; default the tokenizer's. */
  maxLengthBound?: number;
  boundSource?: string;
  prefix?: { id: number; count: number };
  signal?: AbortSignal;
}

function tokenContent(value: unknown): string | undefined {
  if (typeof value === 'string') return value;
  if (value && typeof value === 'object' && typeof (value as JsonObject).content === 'string') return (value as JsonObject).content as string;
  return undefined;
}

function readJsonText(file: string, required: boolean): { text: string; json: JsonObject } | undefined {
  if (!fs.existsSync(file)) {
    if (required) throw new ModelLoadError(`missing ${path.basename(file)} in ${path.dirname(file)}`, { file });
    return undefined;
  }
  try {
    const text = fs.readFileSync(file, 'utf8');
    const parsed = JSON.parse(text) as unknown;
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error('not a JSON object');
    return { text, json: parsed as JsonObject };
  } catch (error) {
    throw new ModelLoadError(`${file} is not valid JSON: ${(error as Error).message}`, { file });
  }
}

/** A length option: an integer from 1 to `bound`, checked before anything is allocated. */
function requireLength(value: unknown, argument: string, bound: number, boundSource: string): number {
  return integer(argument, value, 1, bound, `${integerRange(1, bound)} (${boundSource})`);
}

function requireBound(value: unknown, argument: string): number {
  return integer(argument, value, 1);
}

/** What fromPretrained read for the constructor it calls: tokenizer.json's text (for the worker thread) and the model's bound. */
let loading: { text: string; bound?: { value: number; source: string } } | undefined;

/**
 * What the language model of a folder holds: from a model folder's manifest.json (the positions
 * its input cache holds: max_length for OPT, max_encoder_length for T5; none for retrieval) or a
 * checkpoint's config.json (text_config.max_position_embeddings: absolute positions, as OPT has;
 * T5's relative ones give none), less the query tokens, whose embeddings take positions before
 * the text in either input layout; and its vocabulary size.
 */
function modelLimits(dir: string): { maxText?: number; source?: string; vocabSize?: number } {
  const manifest = readJsonText(path.join(dir, 'manifest.json'), false)?.json;
  const config = readJsonText(path.join(dir, 'config.json'), false)?.json ?? {};
  const text = (config.text_config ?? {}) as JsonObject;
  const queries = manifest?.num_query_tokens ?? config.num_query_tokens;
  const vocabSize = isInteger(manifest?.vocab_size, 1) ? manifest.vocab_size : isInteger(text.vocab_size, 1) ? text.vocab_size : undefined;
  const key = manifest?.architecture === 't5' ? 'max_encoder_length' : manifest?.architecture === 'itm' ? undefined : 'max_length';
  const fromManifest = key === undefined ? undefined : manifest?.[key];
  const [positions, where] = isInteger(fromManifest, 1) ? [fromManifest, `manifest.json ${key}`]
    : !manifest && isInteger(text.max_position_embeddings, 1) ? [text.max_position_embeddings, 'config.json text_config.max_position_embeddings'] : [undefined, ''];
  if (positions === undefined || !isInteger(queries, 1) || positions <= queries) return { vocabSize };
  return { maxText: positions - queries, source: `the language model's ${positions} positions (${where}) less its ${queries} query tokens`, vocabSize };
}

/** transformers' PreTrainedTokenizerFast over a checkpoint's tokenizer.json (Hugging Face tokenizers), with tokenizer_config.json's settings. */
export class PreTrainedTokenizer {
  /** The @huggingface/tokenizers instance doing the work (on the JS thread). */
  readonly backend: Tokenizer;
  readonly paddingSide: 'left' | 'right';
  readonly truncationSide: 'left' | 'right';
  readonly modelMaxLength: number;
  /** The largest maxLength / padToMultipleOf this tokenizer accepts (see TokenizerOptions.maxLengthBound). */
  readonly maxLengthBound: number;
  readonly cleanUpTokenizationSpaces: boolean;
  readonly padToken?: string;
  readonly padTokenId?: number;
  readonly bosTokenId?: number;
  readonly eosTokenId?: number;
  readonly unkTokenId?: number;
  /** Ids dropped by `skipSpecialTokens`. */
  readonly specialTokenIds: ReadonlySet<number>;
  /** len(tokenizer) in transformers: the vocabulary including added tokens. */
  readonly length: number;
  /** decode accepts ids from 0 to vocabSize - 1: max(length, the model's vocabulary). */
  readonly vocabSize: number;
  /** Where maxLengthBound comes from, for error messages. */
  readonly #boundSource: string;
  /** False when maxLengthBound is only our default: no model length to truncate or pad to. */
  readonly #boundKnown: boolean;
  readonly #thread: TokenizerThread;

  /**
   * @param tokenizerJson the parsed tokenizer.json
   * @param config tokenizer_config.json merged with special_tokens_map.json (see fromPretrained)
   * @param ensureTokens tokens to add as special tokens when the vocabulary lacks them (as
   *   `tokenizer.add_tokens([...], special_tokens=True)` does: the next free id)
   */
  constructor(tokenizerJson: JsonObject, config: JsonObject = {}, ensureTokens: string[] = [], options: TokenizerOptions = {}) {
    if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
    const { backend, json } = buildBackend(tokenizerJson, config, ensureTokens);
    this.backend = backend;

    const padding = json.padding as JsonObject | null | undefined;
    const truncation = json.truncation as JsonObject | null | undefined;
    const side = (value: unknown, fallback: 'left' | 'right'): 'left' | 'right' => {
      const v = typeof value === 'string' ? value.toLowerCase() : undefined;
      return v === 'left' || v === 'right' ? v : fallback;
    };
    this.paddingSide = side(config.padding_side, side(padding?.direction, 'right'));
    this.truncationSide = side(config.truncation_side, side(truncation?.direction, 'right'));
    const maxLength = config.model_max_length;
    this.modelMaxLength = typeof maxLength === 'number' && maxLength > 0 ? maxLength : VERY_LARGE;
    if (options.maxLengthBound !== undefined) {
      this.maxLengthBound = requireBound(options.maxLengthBound, 'maxLengthBound');
      this.#boundSource = 'the maxLengthBound option';
      this.#boundKnown = true;
    } else if (loading?.bound && !(this.modelMaxLength < loading.bound.value)) {
      this.maxLengthBound = loading.bound.value;
      this.#boundSource = loading.bound.source;
      this.#boundKnown = true;
    } else if (this.modelMaxLength < VERY_LARGE) {
      this.maxLengthBound = Math.max(1, Math.floor(this.modelMaxLength));
      this.#boundSource = "tokenizer_config.json's model_max_length";
      this.#boundKnown = true;
    } else {
      this.maxLengthBound = TEXT_LIMITS.defaultMaxLengthBound;
      this.#boundSource = 'the default bound; the tokenizer has no model_max_length';
      this.#boundKnown = false;
    }
    this.cleanUpTokenizationSpaces = config.clean_up_tokenization_spaces === true;

    const idOf = (key: string): number | undefined => {
      const content = tokenContent(config[key]);
      return content === undefined ? undefined : backend.token_to_id(content);
    };
    this.padToken = tokenContent(config.pad_token) ?? (typeof padding?.pad_token === 'string' ? padding.pad_token : undefined);
    this.padTokenId = idOf('pad_token') ?? (typeof padding?.pad_id === 'number' && padding.pad_token ? padding.pad_id : undefined);
    this.bosTokenId = idOf('bos_token');
    this.eosTokenId = idOf('eos_token');
    this.unkTokenId = idOf('unk_token');

    const special = new Set<number>();
    for (const token of json.added_tokens) if (token.special) special.add(token.id);
    for (const key of SPECIAL_KEYS) {
      const id = idOf(key);
      if (id !== undefined) special.add(id);
    }
    const extra = config.additional_special_tokens;
    if (Array.isArray(extra)) {
      for (const token of extra) {
        const content = tokenContent(token);
        const id = content === undefined ? undefined : backend.token_to_id(content);
        if (id !== undefined) special.add(id);
      }
    }
    this.specialTokenIds = special;
    this.length = backend.get_vocab(true).size;
    this.vocabSize = Math.max(this.length, options.vocabSize === undefined ? 0 : requireBound(options.vocabSize, 'vocabSize'));

    // The worker builds the same backend from the same inputs. The text is kept (not the object,
    // which the caller may change later); fromPretrained already has it.
    const text = loading?.text ?? JSON.stringify(tokenizerJson);
    const workerConfig = JSON.parse(JSON.stringify(config)) as JsonObject;
    const tokens = [...ensureTokens];
    const specialIds = [...special];
    this.#thread = new TokenizerThread(() => ({ tokenizerJson: text, config: workerConfig, ensureTokens: tokens, specialTokenIds: specialIds }));
  }

  /**
   * Loads tokenizer.json plus tokenizer_config.json and special_tokens_map.json from a checkpoint
   * or model folder. Only the fast-tokenizer file is supported (vocab.json/merges.txt or
   * spiece.model alone are not: save the tokenizer with transformers to get tokenizer.json).
   * The folder's model sets the defaults of the options: maxLengthBound = the smaller of
   * model_max_length and the language model's positions less its query tokens (manifest.json
   * max_length or config.json text_config.max_position_embeddings), vocabSize = its vocabulary.
   */
  static fromPretrained(dir: string, options: TokenizerOptions & { ensureTokens?: string[] } = {}): PreTrainedTokenizer {
    const file = path.join(dir, 'tokenizer.json');
    if (!fs.existsSync(file)) {
      const slow = ['vocab.json', 'spiece.model', 'vocab.txt'].filter((f) => fs.existsSync(path.join(dir, f)));
      throw new ModelLoadError(
        `missing tokenizer.json in ${dir}` +
          (slow.length ? ` (found ${slow.join(', ')}: slow-tokenizer files are not supported; run AutoTokenizer.from_pretrained(dir).save_pretrained(dir) with transformers to write tokenizer.json)` : ''),
        { file },
      );
    }
    const tokenizer = readJsonText(file, true)!;
    const config = readJsonText(path.join(dir, 'tokenizer_config.json'), false)?.json ?? {};
    const specialMap = readJsonText(path.join(dir, 'special_tokens_map.json'), false)?.json ?? {};
    // transformers: with `added_tokens_decoder` in tokenizer_config.json (4.34+) the config's own
    // special tokens win; older configs take them from special_tokens_map.json.
    const merged: JsonObject = 'added_tokens_decoder' in config ? { ...specialMap, ...config } : { ...config, ...specialMap };
    const { ensureTokens = [], ...rest } = options;
    const limits = modelLimits(dir);
    try {
      loading = { text: tokenizer.text, bound: limits.maxText === undefined ? undefined : { value: limits.maxText, source: limits.source! } };
      return new PreTrainedTokenizer(tokenizer.json, merged, ensureTokens, { ...rest, vocabSize: rest.vocabSize ?? limits.vocabSize });
    } catch (error) {
      if (error instanceof ModelLoadError || error instanceof InvalidArgumentError) throw error;
      throw new ModelLoadError(`${file} cannot be loaded: ${(error as Error).message}`, { file });
    } finally {
      loading = undefined;
    }
  }

  /** The id of `token`, or undefined when the vocabulary lacks it. */
  tokenToId(token: string): number | undefined {
    return this.backend.token_to_id(token);
  }

  /** The token of `id`, or undefined when out of the vocabulary. */
  idToToken(id: number): string | undefined {
    return this.backend.id_to_token(id);
  }

  /**
   * The ids of one text (with the post-processor's special tokens unless addSpecialTokens is
   * false), on the JS thread: at most TEXT_LIMITS.syncChars characters (encodeAsync takes more).
   */
  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    const { list, plan } = this.#plan(text, options, this.#syncPlan());
    this.#requireSync(list, plan, 'encode', 'encodeAsync');
    const out = encodeBatch(this.backend, list, plan);
    return Array.from(out.ids.subarray(0, out.lengths[0]));
  }

  /** encode() for texts of any accepted size (up to TEXT_LIMITS.maxChars): large ones are tokenized in the worker thread. */
  async encodeAsync(text: string, options: { addSpecialTokens?: boolean } = {}): Promise<number[]> {
    const { list, plan } = this.#plan(text, options, this.#asyncPlan());
    const out = await this.#encode(list, plan);
    return Array.from(out.ids.subarray(0, out.lengths[0]));
  }

  /**
   * transformers' `tokenizer(texts, padding=..., truncation=..., max_length=...)` for single
   * sequences, on the JS thread: at most TEXT_LIMITS.syncChars characters, syncTexts distinct
   * texts and syncTokens ids per call (callAsync takes more).
   */
  call(texts: string | readonly string[], options: TokenizeOptions = {}): BatchEncoding {
    const { list, plan } = this.#plan(texts, options, this.#syncPlan());
    this.#requireSync(list, plan, 'call', 'callAsync');
    return toBatchEncoding(encodeBatch(this.backend, list, plan), plan);
  }

  /** call() for inputs of any accepted size (TEXT_LIMITS.max*): large ones are tokenized in the worker thread. */
  async callAsync(texts: string | readonly string[], options: TokenizeOptions = {}): Promise<BatchEncoding> {
    const { list, plan } = this.#plan(texts, options, this.#asyncPlan());
    return toBatchEncoding(await this.#encode(list, plan), plan);
  }

  /** @internal */
  async [encodeForProcessor](texts: readonly string[], options: TokenizeOptions, extra: ProcessorEncodeExtra): Promise<EncodedBatch> {
    const { list, plan } = this.#plan(texts, options, {
      maxLengthBound: extra.maxLengthBound ?? this.maxLengthBound, boundSource: extra.boundSource ?? this.#boundSource,
      boundKnown: extra.maxLengthBound !== undefined || this.#boundKnown, prefix: extra.prefix,
      maxTokens: TEXT_LIMITS.maxTokens, maxTokensHint: 'truncate (truncation + maxLength) or split the batch', maxChars: TEXT_LIMITS.maxChars,
    });
    return this.#encode(list, plan, extra.signal);
  }

  #syncPlan(): PlanExtra {
    return {
      maxLengthBound: this.maxLengthBound, boundSource: this.#boundSource, boundKnown: this.#boundKnown, maxChars: TEXT_LIMITS.maxChars,
      maxTokens: TEXT_LIMITS.syncTokens, maxTokensHint: 'use callAsync() (or Blip2Processor.process()), which takes larger batches',
    };
  }

  #asyncPlan(): PlanExtra {
    return {
      maxLengthBound: this.maxLengthBound, boundSource: this.#boundSource, boundKnown: this.#boundKnown, maxChars: TEXT_LIMITS.maxChars,
      maxTokens: TEXT_LIMITS.maxTokens, maxTokensHint: 'truncate (truncation + maxLength) or split the batch',
    };
  }

  /** Small calls run here; the rest in the worker thread, so the JS thread never tokenizes for more than a few ms. */
  #encode(list: readonly string[], plan: EncodePlan, signal?: AbortSignal): Promise<EncodedBatch> {
    if (fitsSync(list, plan)) return Promise.resolve(encodeBatch(this.backend, list, plan));
    return this.#thread.run<EncodedBatch>({ kind: 'encode', texts: [...list], plan }, [], signal);
  }

  #requireSync(list: readonly string[], plan: EncodePlan, method: string, instead: string): void {
    if (fitsSync(list, plan)) return;
    const { chars, distinct } = measure(list);
    const value = `${distinct} distinct texts of ${chars} characters${plan.truncate ? ' (truncated: tokenized twice)' : ''}`;
    const expected = `at most ${TEXT_LIMITS.syncTexts} distinct texts and ${TEXT_LIMITS.syncChars} characters (truncation counts them twice) for the synchronous ${method}()`;
    throw new InvalidArgumentError(`argument 'text' is ${value}; expected ${expected}; use ${instead}(), which tokenizes large inputs in a worker thread`, {
      argument: 'text', value, expected,
    });
  }

  /** Checks a call's options and texts and resolves them into an EncodePlan; nothing is tokenized yet. */
  #plan(texts: unknown, options: unknown, extra: PlanExtra): { list: readonly string[]; plan: EncodePlan } {
    const list = typeof texts === 'string' ? [texts] : texts;
    if (!Array.isArray(list)) throw InvalidArgumentError.of('text', texts, 'a string or an array of strings');
    // The count first: a huge array is rejected before it is walked.
    if (list.length > TEXT_LIMITS.maxTexts) throw InvalidArgumentError.of('text', texts, `at most ${TEXT_LIMITS.maxTexts} texts per call`);
    list.forEach((text, index) => {
      if (typeof text !== 'string') {
        const argument = typeof texts === 'string' ? 'text' : `text[${index}]`;
        throw new InvalidArgumentError(`argument '${argument}' is ${describeValue(text)}; expected a string`, {
          argument, value: describeValue(text), expected: 'a string', index,
        });
      }
    });
    const { chars } = measure(list as string[]);
    if (chars > extra.maxChars) {
      const expected = `at most ${extra.maxChars} characters per call (distinct texts counted once)`;
      throw new InvalidArgumentError(`argument 'text' holds ${chars} characters; expected ${expected}`, { argument: 'text', value: `${chars} characters`, expected });
    }
    if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
    const o = options as TokenizeOptions;
    const addSpecialTokens = o.addSpecialTokens ?? true;
    if (typeof addSpecialTokens !== 'boolean') throw InvalidArgumentError.of('addSpecialTokens', addSpecialTokens, 'a boolean');
    const bound = extra.maxLengthBound;
    const maxLength = o.maxLength === undefined ? undefined : requireLength(o.maxLength, 'maxLength', bound, extra.boundSource);
    const padToMultipleOf = o.padToMultipleOf === undefined ? undefined : requireLength(o.padToMultipleOf, 'padToMultipleOf', bound, extra.boundSource);

    let padding: EncodePlan['padding'];
    const p = o.padding ?? false;
    if (p === true || p === 'longest') padding = 'longest';
    else if (p === 'max_length') padding = 'max_length';
    else if (p === false || p === 'do_not_pad') padding = 'none';
    else throw InvalidArgumentError.of('padding', p, "true, false, 'longest', 'max_length' or 'do_not_pad'");

    let truncate: boolean;
    const t = o.truncation;
    if (t === undefined) {
      // transformers: max_length without padding and without an explicit truncation truncates ('longest_first').
      truncate = maxLength !== undefined && padding === 'none';
    } else if (t === true || t === 'longest_first' || t === 'only_first') truncate = true;
    else if (t === false || t === 'do_not_truncate') truncate = false;
    else throw InvalidArgumentError.of('truncation', t, "true, false, 'longest_first', 'only_first' or 'do_not_truncate'");

    // Without maxLength: model_max_length as in transformers, but never more than the bound; a
    // bound that is only our default is no model length to truncate or pad to.
    const modelLimit = this.modelMaxLength < VERY_LARGE ? Math.min(Math.floor(this.modelMaxLength), bound) : extra.boundKnown ? bound : undefined;
    const limit = maxLength ?? modelLimit;
    if (truncate && limit === undefined) {
      throw InvalidArgumentError.of('maxLength', maxLength, 'a length: truncation needs maxLength when the tokenizer has no model_max_length');
    }
    if (padding === 'max_length' && limit === undefined) {
      throw InvalidArgumentError.of('maxLength', maxLength, "a length: padding 'max_length' needs maxLength when the tokenizer has no model_max_length");
    }
    const paddingSide = o.paddingSide ?? this.paddingSide;
    if (paddingSide !== 'left' && paddingSide !== 'right') throw InvalidArgumentError.of('paddingSide', paddingSide, "'left' or 'right'");
    return {
      list: list as string[],
      plan: {
        addSpecialTokens, truncate, limit, truncationSide: this.truncationSide, padding, padToMultipleOf, paddingSide,
        padTokenId: this.padTokenId, prefix: extra.prefix, maxTokens: extra.maxTokens, maxTokensHint: extra.maxTokensHint, paddingValue: String(p),
      },
    };
  }

  /**
   * transformers' `decode`: ids → text. Ids must be integers from 0 to vocabSize - 1; those with
   * no token (the padded rows of an LM vocabulary) decode to nothing, as in the Rust tokenizer.
   * Arrays are decoded on the JS thread (at most TEXT_LIMITS.syncTokens ids); a Tensor (integer
   * dtype) is read and, when large, decoded in the worker thread.
   */
  decode(ids: Tensor, options?: DecodeOptions): Promise<string>;
  decode(ids: TokenIds, options?: DecodeOptions): string;
  decode(ids: TokenIds | Tensor, options: DecodeOptions = {}): string | Promise<string> {
    if (ids instanceof Tensor) return this.#decodeTensor(ids, options, false).then((rows) => rows[0]);
    if (ids === null || typeof ids !== 'object' || typeof (ids as ArrayLike<unknown>).length !== 'number') {
      throw InvalidArgumentError.of('ids', ids, 'an array of token ids');
    }
    const plan = this.#decodePlan(options, 'ids', false);
    this.#requireSyncDecode(1, ids.length, 'decode');
    return decodeRows(this.backend, this.specialTokenIds, [ids], plan)[0];
  }

  /** transformers' `batch_decode`: rows of ids (arrays, on the JS thread within TEXT_LIMITS.sync*; or a 2-D integer Tensor) → texts. */
  batchDecode(sequences: Tensor, options?: DecodeOptions): Promise<string[]>;
  batchDecode(sequences: readonly TokenIds[], options?: DecodeOptions): string[];
  batchDecode(sequences: readonly TokenIds[] | Tensor, options: DecodeOptions = {}): string[] | Promise<string[]> {
    if (sequences instanceof Tensor) return this.#decodeTensor(sequences, options, true);
    if (!Array.isArray(sequences)) throw InvalidArgumentError.of('sequences', sequences, 'an array of id arrays or a 2-D Tensor');
    const plan = this.#decodePlan(options, 'sequences', true);
    if (sequences.length > TEXT_LIMITS.syncTexts) this.#requireSyncDecode(sequences.length, 0, 'batchDecode');
    let total = 0;
    sequences.forEach((row, r) => {
      if (row === null || typeof row !== 'object' || typeof (row as ArrayLike<unknown>).length !== 'number') {
        throw InvalidArgumentError.of(`sequences[${r}]`, row, 'an array of token ids');
      }
      total += row.length;
    });
    this.#requireSyncDecode(sequences.length, total, 'batchDecode');
    return decodeRows(this.backend, this.specialTokenIds, sequences, plan);
  }

  async #decodeTensor(tensor: Tensor, options: DecodeOptions, batched: boolean): Promise<string[]> {
    const argument = batched ? 'sequences' : 'ids';
    const shape = tensor.shape;
    if (batched ? shape.length !== 2 : shape.length > 1 && !(shape.length === 2 && shape[0] === 1)) {
      throw InvalidArgumentError.of(argument, tensor.toString(), batched ? 'a 2-D tensor of token ids [batch, length]' : 'a 1-D tensor of token ids (or [1, N]); use batchDecode for batches');
    }
    if (!isIntegerDType(tensor.dtype)) {
      const expected = 'an integer dtype (int64, int32, int16, int8 or uint8)';
      throw new DTypeError(`argument '${argument}' is a ${tensor.dtype} tensor; token ids need ${expected}`, { argument, value: tensor.dtype, expected });
    }
    const plan = this.#decodePlan(options, argument, batched);
    const rows = batched ? shape[0] : 1;
    const width = batched ? shape[1] : (shape[shape.length - 1] ?? 1);
    if (rows * width > TEXT_LIMITS.maxTokens) {
      const expected = `at most ${TEXT_LIMITS.maxTokens} ids per call`;
      throw new InvalidArgumentError(`argument '${argument}' holds ${rows * width} ids; expected ${expected}`, { argument, value: `${rows * width} ids`, expected });
    }
    const flat = (await tensor.toArray()) as Int32Array | BigInt64Array | Int16Array | Int8Array | Uint8Array;
    if (rows <= TEXT_LIMITS.syncTexts && rows * width <= TEXT_LIMITS.syncTokens) {
      const list = Array.from({ length: rows }, (_, r) => flat.subarray(r * width, (r + 1) * width));
      return decodeRows(this.backend, this.specialTokenIds, list, plan);
    }
    return this.#thread.run<string[]>({ kind: 'decode', flat, rows, width, plan }, [flat.buffer as ArrayBuffer]);
  }

  #decodePlan(options: unknown, argument: string, batched: boolean): DecodePlan {
    if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
    const o = options as DecodeOptions;
    const skip = o.skipSpecialTokens ?? false;
    if (typeof skip !== 'boolean') throw InvalidArgumentError.of('skipSpecialTokens', skip, 'a boolean');
    const cleanUp = o.cleanUpTokenizationSpaces ?? this.cleanUpTokenizationSpaces;
    if (typeof cleanUp !== 'boolean') throw InvalidArgumentError.of('cleanUpTokenizationSpaces', cleanUp, 'a boolean');
    return { skipSpecialTokens: skip, cleanUpTokenizationSpaces: cleanUp, vocabSize: this.vocabSize, argument, batched };
  }

  #requireSyncDecode(rows: number, ids: number, method: string): void {
    if (rows <= TEXT_LIMITS.syncTexts && ids <= TEXT_LIMITS.syncTokens) return;
    const argument = method === 'decode' ? 'ids' : 'sequences';
    const value = `${rows} rows of ${ids} ids`;
    const expected = `at most ${TEXT_LIMITS.syncTexts} rows and ${TEXT_LIMITS.syncTokens} ids for the synchronous ${method}()`;
    throw new InvalidArgumentError(`argument '${argument}' is ${value}; expected ${expected}; pass a Tensor (Tensor.from(ids, undefined, { dtype: 'int64' })) to decode larger inputs asynchronously`, {
      argument, value, expected,
    });
  }
}

interface PlanExtra {
  maxLengthBound: number;
  boundSource: string;
  boundKnown: boolean;
  prefix?: { id: number; count: number };
  maxTokens: number;
  maxTokensHint: string;
  maxChars: number;
}

function measure(list: readonly string[]): { chars: number; distinct: number } {
  const distinct = new Set(list);
  let chars = 0;
  for (const text of distinct) chars += text.length;
  return { chars, distinct: distinct.size };
}

/** Whether a call is small enough for the JS thread (truncation tokenizes a long text twice). */
function fitsSync(list: readonly string[], plan: EncodePlan): boolean {
  const { chars, distinct } = measure(list);
  return distinct <= TEXT_LIMITS.syncTexts && chars * (plan.truncate ? 2 : 1) <= TEXT_LIMITS.syncChars;
}

function toBatchEncoding(out: EncodedBatch, plan: EncodePlan): BatchEncoding {
  const inputIds: number[][] = [];
  const attentionMask: number[][] = [];
  for (let r = 0; r < out.rows; r++) {
    const start = r * out.width;
    const n = out.lengths[r];
    const ids = new Array<number>(n);
    const mask = new Array<number>(n);
    for (let j = 0; j < n; j++) {
      ids[j] = out.ids[start + j];
      mask[j] = plan.padding === 'none' ? 1 : out.mask[start + j];
    }
    inputIds.push(ids);
    attentionMask.push(mask);
  }
  return { inputIds, attentionMask };
}
