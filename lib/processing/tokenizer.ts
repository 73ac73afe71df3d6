// A Hugging Face tokenizer: tokenizer.json run by @huggingface/tokenizers (pure JS), with the
// behaviour of transformers' `tokenizer(...)`, `decode` and `batch_decode` on top: special tokens
// added by the tokenizer's post-processor (OPT prepends </s>, T5 appends </s>), padding and
// truncation on the configured sides, and the settings of tokenizer_config.json /
// special_tokens_map.json.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { Tokenizer } from '@huggingface/tokenizers';

import { InvalidArgumentError, ModelLoadError, describeValue } from '../errors';
import { Tensor } from '../tensor/tensor';

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
  /** Length limit for truncation and for padding 'max_length' (special tokens included, as in transformers). Default: model_max_length where a limit is needed. */
  maxLength?: number;
  /** Pad the length up to a multiple of this (default: no rounding). */
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

interface AddedTokenJson {
  id: number;
  content: string;
  single_word?: boolean;
  lstrip?: boolean;
  rstrip?: boolean;
  normalized?: boolean;
  special?: boolean;
}

type JsonObject = Record<string, unknown>;

const SPECIAL_KEYS = ['bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token'] as const;
/** transformers' VERY_LARGE_INTEGER: model_max_length when a checkpoint sets none. */
const VERY_LARGE = 1e30;

function tokenContent(value: unknown): string | undefined {
  if (typeof value === 'string') return value;
  if (value && typeof value === 'object' && typeof (value as JsonObject).content === 'string') return (value as JsonObject).content as string;
  return undefined;
}

function readJson(file: string, required: boolean): JsonObject | undefined {
  if (!fs.existsSync(file)) {
    if (required) throw new ModelLoadError(`missing ${path.basename(file)} in ${path.dirname(file)}`, { file });
    return undefined;
  }
  try {
    const parsed = JSON.parse(fs.readFileSync(file, 'utf8')) as unknown;
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error('not a JSON object');
    return parsed as JsonObject;
  } catch (error) {
    throw new ModelLoadError(`${file} is not valid JSON: ${(error as Error).message}`, { file });
  }
}

function requireLength(value: unknown, argument: string): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 1) throw InvalidArgumentError.of(argument, value, 'an integer >= 1');
  return value;
}

/** transformers' PreTrainedTokenizerFast over a checkpoint's tokenizer.json (Hugging Face tokenizers), with tokenizer_config.json's settings. */
export class PreTrainedTokenizer {
  /** The @huggingface/tokenizers instance doing the work. */
  readonly backend: Tokenizer;
  readonly paddingSide: 'left' | 'right';
  readonly truncationSide: 'left' | 'right';
  readonly modelMaxLength: number;
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

  /**
   * @param tokenizerJson the parsed tokenizer.json
   * @param config tokenizer_config.json merged with special_tokens_map.json (see fromPretrained)
   * @param ensureTokens tokens to add as special tokens when the vocabulary lacks them (as
   *   `tokenizer.add_tokens([...], special_tokens=True)` does: the next free id)
   */
  constructor(tokenizerJson: JsonObject, config: JsonObject = {}, ensureTokens: string[] = []) {
    const json: JsonObject & { added_tokens: AddedTokenJson[] } = {
      ...tokenizerJson,
      added_tokens: [...((tokenizerJson.added_tokens as AddedTokenJson[] | undefined) ?? [])],
    };
    let backend = PreTrainedTokenizer.#build(json, config);
    const missing = ensureTokens.filter((t) => backend.token_to_id(t) === undefined);
    if (missing.length > 0) {
      let next = backend.get_vocab(true).size;
      for (const content of missing) {
        json.added_tokens.push({ id: next++, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
      }
      backend = PreTrainedTokenizer.#build(json, config);
    }
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
  }

  static #build(json: JsonObject, config: JsonObject): Tokenizer {
    // The backend only reads a few flags from the config; the special tokens come from tokenizer.json.
    const backendConfig: JsonObject = {
      clean_up_tokenization_spaces: false,
      remove_space: config.remove_space,
      do_lowercase_and_remove_accent: config.do_lowercase_and_remove_accent,
      additional_special_tokens: [],
    };
    return new Tokenizer(json, backendConfig);
  }

  /**
   * Loads tokenizer.json plus tokenizer_config.json and special_tokens_map.json from a checkpoint
   * or model folder. Only the fast-tokenizer file is supported (vocab.json/merges.txt or
   * spiece.model alone are not: save the tokenizer with transformers to get tokenizer.json).
   */
  static fromPretrained(dir: string, options: { ensureTokens?: string[] } = {}): PreTrainedTokenizer {
    const file = path.join(dir, 'tokenizer.json');
    if (!fs.existsSync(file)) {
      const slow = ['vocab.json', 'spiece.model', 'vocab.txt'].filter((f) => fs.existsSync(path.join(dir, f)));
      throw new ModelLoadError(
        `missing tokenizer.json in ${dir}` +
          (slow.length ? ` (found ${slow.join(', ')}: slow-tokenizer files are not supported; run AutoTokenizer.from_pretrained(dir).save_pretrained(dir) with transformers to write tokenizer.json)` : ''),
        { file },
      );
    }
    const tokenizerJson = readJson(file, true)!;
    const config = readJson(path.join(dir, 'tokenizer_config.json'), false) ?? {};
    const specialMap = readJson(path.join(dir, 'special_tokens_map.json'), false) ?? {};
    // transformers: with `added_tokens_decoder` in tokenizer_config.json (4.34+) the config's own
    // special tokens win; older configs take them from special_tokens_map.json.
    const merged: JsonObject = 'added_tokens_decoder' in config ? { ...specialMap, ...config } : { ...config, ...specialMap };
    try {
      return new PreTrainedTokenizer(tokenizerJson, merged, options.ensureTokens ?? []);
    } catch (error) {
      if (error instanceof ModelLoadError) throw error;
      throw new ModelLoadError(`${file} cannot be loaded: ${(error as Error).message}`, { file });
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

  /** The ids of one text (with the post-processor's special tokens unless addSpecialTokens is false). */
  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    if (typeof text !== 'string') throw InvalidArgumentError.of('text', text, 'a string');
    return this.backend.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
  }

  /** transformers' `tokenizer(texts, padding=..., truncation=..., max_length=...)` for single sequences. */
  call(texts: string | readonly string[], options: TokenizeOptions = {}): BatchEncoding {
    const list = typeof texts === 'string' ? [texts] : texts;
    if (!Array.isArray(list)) throw InvalidArgumentError.of('text', texts, 'a string or an array of strings');
    list.forEach((text, index) => {
      if (typeof text !== 'string') {
        const argument = typeof texts === 'string' ? 'text' : `text[${index}]`;
        throw new InvalidArgumentError(`argument '${argument}' is ${describeValue(text)}; expected a string`, {
          argument, value: describeValue(text), expected: 'a string', index,
        });
      }
    });
    const addSpecialTokens = options.addSpecialTokens ?? true;
    if (typeof addSpecialTokens !== 'boolean') throw InvalidArgumentError.of('addSpecialTokens', addSpecialTokens, 'a boolean');
    const maxLength = options.maxLength === undefined ? undefined : requireLength(options.maxLength, 'maxLength');
    const padToMultipleOf = options.padToMultipleOf === undefined ? undefined : requireLength(options.padToMultipleOf, 'padToMultipleOf');

    let padding: 'longest' | 'max_length' | 'none';
    const p = options.padding ?? false;
    if (p === true || p === 'longest') padding = 'longest';
    else if (p === 'max_length') padding = 'max_length';
    else if (p === false || p === 'do_not_pad') padding = 'none';
    else throw InvalidArgumentError.of('padding', p, "true, false, 'longest', 'max_length' or 'do_not_pad'");

    let truncate: boolean;
    const t = options.truncation;
    if (t === undefined) {
      // transformers: max_length without padding and without an explicit truncation truncates ('longest_first').
      truncate = maxLength !== undefined && padding === 'none';
    } else if (t === true || t === 'longest_first' || t === 'only_first') truncate = true;
    else if (t === false || t === 'do_not_truncate') truncate = false;
    else throw InvalidArgumentError.of('truncation', t, "true, false, 'longest_first', 'only_first' or 'do_not_truncate'");

    const limit = maxLength ?? (this.modelMaxLength < VERY_LARGE ? this.modelMaxLength : undefined);
    if (truncate && limit === undefined) {
      throw InvalidArgumentError.of('maxLength', maxLength, 'a length: truncation needs maxLength when the tokenizer has no model_max_length');
    }
    if (padding === 'max_length' && limit === undefined) {
      throw InvalidArgumentError.of('maxLength', maxLength, "a length: padding 'max_length' needs maxLength when the tokenizer has no model_max_length");
    }
    const paddingSide = options.paddingSide ?? this.paddingSide;
    if (paddingSide !== 'left' && paddingSide !== 'right') throw InvalidArgumentError.of('paddingSide', paddingSide, "'left' or 'right'");

    const rows = list.map((text, index) => {
      const ids = this.backend.encode(text, { add_special_tokens: addSpecialTokens }).ids;
      if (!truncate || ids.length <= limit!) return ids;
      return this.#truncate(text, ids, addSpecialTokens, limit!, index);
    });

    if (padding !== 'none') {
      let target = padding === 'max_length' ? limit! : Math.max(...rows.map((r) => r.length));
      if (padToMultipleOf !== undefined && target % padToMultipleOf !== 0) target = (Math.floor(target / padToMultipleOf) + 1) * padToMultipleOf;
      const needsPad = rows.some((r) => r.length < target);
      if (needsPad && this.padTokenId === undefined) {
        throw new InvalidArgumentError(
          'asked to pad, but the tokenizer has no padding token (no pad_token in tokenizer_config.json / special_tokens_map.json)',
          { argument: 'padding', value: String(p), expected: 'a tokenizer with a pad token, or padding: false' },
        );
      }
      const inputIds: number[][] = [];
      const attentionMask: number[][] = [];
      for (const row of rows) {
        const pad = Math.max(0, target - row.length);
        const pads = new Array<number>(pad).fill(this.padTokenId ?? 0);
        const zeros = new Array<number>(pad).fill(0);
        const ones = new Array<number>(row.length).fill(1);
        inputIds.push(paddingSide === 'left' ? [...pads, ...row] : [...row, ...pads]);
        attentionMask.push(paddingSide === 'left' ? [...zeros, ...ones] : [...ones, ...zeros]);
      }
      return { inputIds, attentionMask };
    }
    return { inputIds: rows, attentionMask: rows.map((r) => new Array<number>(r.length).fill(1)) };
  }

  /** Truncates the text part only, keeping the special tokens the post-processor adds around it (as the Rust tokenizer does). */
  #truncate(text: string, full: number[], addSpecialTokens: boolean, limit: number, index: number): number[] {
    const core = addSpecialTokens ? this.backend.encode(text, { add_special_tokens: false }).ids : full;
    let prefix: number[] = [];
    let suffix: number[] = [];
    if (addSpecialTokens) {
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
    const kept = this.truncationSide === 'left' ? core.slice(core.length - room) : core.slice(0, room);
    return [...prefix, ...kept, ...suffix];
  }

  /** transformers' `decode`: ids → text (unknown ids are skipped, as the Rust tokenizer does). */
  decode(ids: Tensor, options?: DecodeOptions): Promise<string>;
  decode(ids: TokenIds, options?: DecodeOptions): string;
  decode(ids: TokenIds | Tensor, options: DecodeOptions = {}): string | Promise<string> {
    if (ids instanceof Tensor) {
      if (ids.shape.length > 1 && !(ids.shape.length === 2 && ids.shape[0] === 1)) {
        throw InvalidArgumentError.of('ids', ids.toString(), 'a 1-D tensor of token ids (or [1, N]); use batchDecode for batches');
      }
      return ids.toArray().then((data) => this.#decodeRow(Array.from(data as ArrayLike<number | bigint>), options, 'ids'));
    }
    return this.#decodeRow(ids, options, 'ids');
  }

  /** transformers' `batch_decode`: rows of ids (arrays, or a 2-D int tensor) → texts. */
  batchDecode(sequences: Tensor, options?: DecodeOptions): Promise<string[]>;
  batchDecode(sequences: readonly TokenIds[], options?: DecodeOptions): string[];
  batchDecode(sequences: readonly TokenIds[] | Tensor, options: DecodeOptions = {}): string[] | Promise<string[]> {
    if (sequences instanceof Tensor) {
      const shape = sequences.shape;
      if (shape.length !== 2) throw InvalidArgumentError.of('sequences', sequences.toString(), 'a 2-D tensor of token ids [batch, length]');
      return sequences.toArray().then((data) => {
        const flat = data as ArrayLike<number | bigint>;
        const rows: string[] = [];
        for (let r = 0; r < shape[0]; r++) {
          const row = Array.prototype.slice.call(flat, r * shape[1], (r + 1) * shape[1]) as Array<number | bigint>;
          rows.push(this.#decodeRow(row, options, `sequences[${r}]`));
        }
        return rows;
      });
    }
    if (!Array.isArray(sequences)) throw InvalidArgumentError.of('sequences', sequences, 'an array of id arrays or a 2-D Tensor');
    return sequences.map((row, r) => this.#decodeRow(row, options, `sequences[${r}]`));
  }

  #decodeRow(ids: TokenIds, options: DecodeOptions, argument: string): string {
    if (ids === null || typeof ids !== 'object' || typeof (ids as ArrayLike<unknown>).length !== 'number') {
      throw InvalidArgumentError.of(argument, ids, 'an array of token ids');
    }
    if (options === null || typeof options !== 'object') throw InvalidArgumentError.of('options', options, 'an object');
    const skip = options.skipSpecialTokens ?? false;
    const cleanUp = options.cleanUpTokenizationSpaces ?? this.cleanUpTokenizationSpaces;
    const kept: number[] = [];
    for (let i = 0; i < ids.length; i++) {
      const raw = ids[i];
      const id = typeof raw === 'bigint' ? Number(raw) : raw;
      if (typeof id !== 'number' || !Number.isInteger(id)) {
        throw InvalidArgumentError.of(`${argument}[${i}]`, raw, 'an integer token id');
      }
      if (id < 0 || this.backend.id_to_token(id) === undefined) continue; // unknown (e.g. padded LM vocab rows)
      if (skip && this.specialTokenIds.has(id)) continue;
      kept.push(id);
    }
    if (kept.length === 0) return '';
    return this.backend.decode(kept, { skip_special_tokens: false, clean_up_tokenization_spaces: cleanUp });
  }
}
