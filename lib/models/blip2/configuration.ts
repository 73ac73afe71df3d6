// transformers 5.18's BLIP-2 configuration classes in TypeScript: Blip2VisionConfig,
// Blip2QFormerConfig and Blip2Config (models/blip_2/configuration_blip_2.py), OPTConfig
// (models/opt/configuration_opt.py), T5Config (models/t5/configuration_t5.py) over the common part
// of PreTrainedConfig (configuration_utils.py), and GenerationConfig
// (generation/configuration_utils.py) for the generation parameters blip2-node uses.
//
// Each class is built from a config.json object (snake_case) with transformers' defaults and
// derived fields, and toJSON() gives back what transformers' to_dict() writes, so that
// `new Blip2Config(cfg.toJSON())` equals cfg. Unlike to_dict(), every key of the input is kept
// (transformers drops some: see PreTrainedConfig), and transformers_version / _name_or_path are
// written only when the input had them.
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { isDeepStrictEqual } from 'node:util';

import { InvalidArgumentError, ModelLoadError, describeValue } from '../../errors';
import { readJson } from '../model-folder';
import { isInteger } from '../../validation';

/** A config as a JSON object with transformers' snake_case keys (config.json's content). */
export type ConfigJSON = Record<string, unknown>;

/**
 * The keys every config has (transformers' PreTrainedConfig), snake_case as in config.json; any
 * other key is allowed and kept. Defaults: see the accessors of {@link PreTrainedConfig}.
 */
export interface PreTrainedConfigJSON {
  model_type?: string;
  architectures?: string[] | null;
  transformers_version?: string | null;
  dtype?: string | null;
  /** transformers 4's name of `dtype`; read as `dtype` and not written back. */
  torch_dtype?: string | null;
  is_encoder_decoder?: boolean;
  [key: string]: unknown;
}

/** config.json's `vision_config` (Blip2VisionConfig); defaults: see {@link Blip2VisionConfig}'s accessors. */
export interface Blip2VisionConfigJSON extends PreTrainedConfigJSON {
  hidden_size?: number;
  intermediate_size?: number;
  num_hidden_layers?: number;
  num_attention_heads?: number;
  image_size?: number | number[];
  patch_size?: number | number[];
  hidden_act?: string;
  layer_norm_eps?: number;
  attention_dropout?: number;
  initializer_range?: number;
  qkv_bias?: boolean;
}

/** config.json's `qformer_config` (Blip2QFormerConfig); defaults: see {@link Blip2QFormerConfig}'s accessors. */
export interface Blip2QFormerConfigJSON extends PreTrainedConfigJSON {
  vocab_size?: number;
  hidden_size?: number;
  num_hidden_layers?: number;
  num_attention_heads?: number;
  intermediate_size?: number;
  hidden_act?: string;
  hidden_dropout_prob?: number;
  attention_probs_dropout_prob?: number;
  max_position_embeddings?: number;
  initializer_range?: number;
  layer_norm_eps?: number;
  pad_token_id?: number | null;
  cross_attention_frequency?: number;
  encoder_hidden_size?: number;
  use_qformer_text_input?: boolean;
}

/** An OPT `text_config` (OPTConfig); defaults: see {@link OPTConfig}'s accessors. */
export interface OPTConfigJSON extends PreTrainedConfigJSON {
  vocab_size?: number;
  hidden_size?: number;
  num_hidden_layers?: number;
  ffn_dim?: number;
  max_position_embeddings?: number;
  do_layer_norm_before?: boolean;
  word_embed_proj_dim?: number | null;
  dropout?: number;
  attention_dropout?: number;
  num_attention_heads?: number;
  activation_function?: string;
  layerdrop?: number;
  init_std?: number;
  use_cache?: boolean;
  pad_token_id?: number | null;
  bos_token_id?: number | null;
  eos_token_id?: number | number[] | null;
  enable_bias?: boolean;
  layer_norm_elementwise_affine?: boolean;
  tie_word_embeddings?: boolean;
}

/** A T5 / Flan-T5 `text_config` (T5Config); defaults: see {@link T5Config}'s accessors. */
export interface T5ConfigJSON extends PreTrainedConfigJSON {
  vocab_size?: number;
  d_model?: number;
  d_kv?: number;
  d_ff?: number;
  num_layers?: number;
  num_decoder_layers?: number | null;
  num_heads?: number;
  relative_attention_num_buckets?: number;
  relative_attention_max_distance?: number;
  dropout_rate?: number;
  layer_norm_epsilon?: number;
  initializer_factor?: number;
  feed_forward_proj?: string;
  use_cache?: boolean;
  pad_token_id?: number | null;
  eos_token_id?: number | number[] | null;
  decoder_start_token_id?: number | null;
  classifier_dropout?: number;
  is_decoder?: boolean;
}

/**
 * A checkpoint's config.json (transformers' Blip2Config), snake_case as in the file. In the
 * constructor of {@link Blip2Config} each sub-config may also be a config instance. Defaults:
 * see {@link Blip2Config}'s accessors.
 */
export interface Blip2ConfigJSON extends PreTrainedConfigJSON {
  num_query_tokens?: number;
  image_text_hidden_size?: number;
  image_token_index?: number | null;
  /** Alias of image_token_index (transformers' attribute_map); read, not written back. */
  image_token_id?: number | null;
  initializer_factor?: number;
  initializer_range?: number;
  use_decoder_only_language_model?: boolean;
  vision_config?: Blip2VisionConfigJSON | null;
  qformer_config?: Blip2QFormerConfigJSON | null;
  text_config?: OPTConfigJSON | T5ConfigJSON | null;
}

/** generation_config.json (transformers' GenerationConfig), snake_case as in the file; defaults: see {@link GenerationConfig}'s accessors. */
export interface GenerationConfigJSON {
  max_length?: number | null;
  max_new_tokens?: number | null;
  min_length?: number | null;
  min_new_tokens?: number | null;
  early_stopping?: boolean | 'never' | null;
  do_sample?: boolean | null;
  num_beams?: number | null;
  use_cache?: boolean | null;
  temperature?: number | null;
  top_k?: number | null;
  top_p?: number | null;
  repetition_penalty?: number | null;
  length_penalty?: number | null;
  no_repeat_ngram_size?: number | null;
  num_return_sequences?: number | null;
  bos_token_id?: number | null;
  eos_token_id?: number | number[] | null;
  pad_token_id?: number | null;
  decoder_start_token_id?: number | number[] | null;
  [key: string]: unknown;
}

// ---------------------------------------------------------------------------------------------
// Field kinds and checks (transformers' @strict dataclass validation, in JSON's types: a float
// field takes any finite number, since JSON's 1.0 reads as 1).

interface Kind {
  readonly expected: string;
  test(value: unknown): boolean;
}

const kind = (expected: string, test: (value: unknown) => boolean): Kind => ({ expected, test });
const INT = kind('an integer', (v) => isInteger(v));
const NUMBER = kind('a finite number', (v) => typeof v === 'number' && Number.isFinite(v));
const BOOL = kind('a boolean', (v) => typeof v === 'boolean');
const STRING = kind('a string', (v) => typeof v === 'string');
const INT_OR_INTS = kind('an integer or a list of integers', (v) => isInteger(v) || (Array.isArray(v) && v.every((e) => isInteger(e))));
const STRINGS = kind('a list of strings', (v) => Array.isArray(v) && v.every((s) => typeof s === 'string'));
const OBJECT = kind('an object', (v) => isPlainObject(v));
const EARLY_STOPPING = kind("true, false or 'never'", (v) => typeof v === 'boolean' || v === 'never');
const PROBLEM_TYPES = ['regression', 'single_label_classification', 'multi_label_classification'];
const PROBLEM_TYPE = kind(PROBLEM_TYPES.map((t) => `'${t}'`).join(', '), (v) => PROBLEM_TYPES.includes(v as string));
const orNull = (k: Kind): Kind => kind(`${k.expected} or null`, (v) => v === null || k.test(v));

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return false;
  const proto = Object.getPrototypeOf(value) as unknown;
  return proto === Object.prototype || proto === null;
}

function fieldError(field: string, value: unknown, expected: string): InvalidArgumentError {
  const shown = describeValue(value);
  return new InvalidArgumentError(`config field '${field}' is ${shown}; expected ${expected}`, { argument: field, value: shown, expected });
}

/** Runs `build` with `prefix` (e.g. 'text_config.') put before the field its errors name. */
function withPrefix<T>(prefix: string, build: () => T): T {
  try {
    return build();
  } catch (e) {
    if (e instanceof InvalidArgumentError && e.argument !== undefined && e.expected !== undefined) {
      const argument = `${prefix}${e.argument}`;
      throw new InvalidArgumentError(`config field '${argument}' is ${e.value}; expected ${e.expected}`, { argument, value: e.value, expected: e.expected });
    }
    throw e;
  }
}

/** A deep copy of a JSON value; anything JSON cannot hold is an error naming `field`. */
function cloneJson(value: unknown, field: string): unknown {
  if (value === null || typeof value === 'boolean' || typeof value === 'string') return value;
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw fieldError(field, value, 'a JSON value (a finite number)');
    return value;
  }
  if (Array.isArray(value)) return value.map((v, i) => cloneJson(v, `${field}[${i}]`));
  if (isPlainObject(value)) {
    const out: ConfigJSON = {};
    for (const [k, v] of Object.entries(value)) if (v !== undefined) out[k] = cloneJson(v, `${field}.${k}`);
    return out;
  }
  throw fieldError(field, value, 'a JSON value (null, a boolean, a number, a string, a list or an object)');
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === 'object' && !Object.isFrozen(value)) {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}

function sortKeys(json: ConfigJSON): ConfigJSON {
  const out: ConfigJSON = {};
  for (const key of Object.keys(json).sort()) out[key] = json[key];
  return out;
}

// Python's json writes a float 1.0 as 1.0, JavaScript's as 1, and transformers 5's strict
// dataclasses reject an int for a float field: toJSONString() marks integral values of float
// fields and writes them back with the decimal point.
const FLOAT_MARK = '\u0000float:';

/** A deep copy of `value` with every object's keys sorted (Python's sort_keys=True). */
function sortedDeep(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(sortedDeep);
  if (value !== null && typeof value === 'object') {
    const out: ConfigJSON = {};
    for (const key of Object.keys(value).sort()) out[key] = sortedDeep((value as ConfigJSON)[key]);
    return out;
  }
  return value;
}

/** `json` (sorted, a copy) with the integral values of the `floats` keys marked. */
function markFloats(json: ConfigJSON, floats: ReadonlySet<string>): ConfigJSON {
  const out: ConfigJSON = {};
  for (const key of Object.keys(json).sort()) {
    const value = json[key];
    out[key] = floats.has(key) && typeof value === 'number' && /^-?\d+$/.test(String(value)) ? `${FLOAT_MARK}${value}` : sortedDeep(value);
  }
  return out;
}

/** JSON text as Python's json.dumps(indent=2, sort_keys=True) writes it, marked floats with their decimal point. */
function writeJson(marked: unknown): string {
  return `${JSON.stringify(marked, null, 2).replace(/"\\u0000float:(-?\d+)"/g, '$1.0')}\n`;
}

const floatKeys = (specs: readonly Spec[]): ReadonlySet<string> => new Set(specs.filter(([, k]) => k === NUMBER).map(([key]) => key));

function requireObject(input: unknown, what: string): Record<string, unknown> {
  if (!isPlainObject(input)) throw InvalidArgumentError.of(what, input, 'an object (a config.json content)');
  return input;
}

// ---------------------------------------------------------------------------------------------
// PreTrainedConfig's dataclass fields, then the normalisation every config goes through
// (PreTrainedConfig.__post_init__).

type Spec = readonly [key: string, kind: Kind, fallback: unknown];

const BASE_FIELDS: readonly Spec[] = [
  ['architectures', orNull(STRINGS), null],
  ['output_hidden_states', orNull(BOOL), false],
  ['return_dict', orNull(BOOL), true],
  ['dtype', orNull(STRING), null],
  ['chunk_size_feed_forward', INT, 0],
  ['is_encoder_decoder', BOOL, false],
  ['id2label', orNull(kind('an object of label names', (v) => isPlainObject(v) && Object.values(v).every((s) => typeof s === 'string'))), null],
  ['label2id', orNull(OBJECT), null],
  ['problem_type', orNull(PROBLEM_TYPE), null],
  // Popped from the keyword arguments into _output_attentions, written back as output_attentions.
  ['output_attentions', orNull(BOOL), false],
];

/** A config being built: its dataclass fields, and the other keys (Python's **kwargs). */
interface Draft {
  fields: ConfigJSON;
  extra: ConfigJSON;
}

interface ClassSpec {
  modelType: string;
  fields: readonly Spec[];
  attributeMap: Readonly<Record<string, string>>;
  /** Attributes __post_init__ derives that a file may also set (the file wins, as in Python): checked when given. */
  derived: Readonly<Record<string, Kind>>;
}

function takeFields(input: Record<string, unknown>, spec: ClassSpec): Draft {
  const fields: ConfigJSON = {};
  const extra: ConfigJSON = {};
  const all = [...BASE_FIELDS, ...spec.fields];
  const known = new Set(all.map(([key]) => key));
  for (const [key, k, fallback] of all) {
    const given = Object.hasOwn(input, key) ? input[key] : undefined;
    if (given === undefined) {
      fields[key] = fallback;
      continue;
    }
    if (!k.test(given)) throw fieldError(key, given, k.expected);
    fields[key] = cloneJson(given, key);
  }
  for (const [key, value] of Object.entries(input)) {
    if (!known.has(key) && value !== undefined) extra[key] = cloneJson(value, key);
  }
  return { fields, extra };
}

function labels(count: number): { id2label: ConfigJSON; label2id: ConfigJSON } {
  const id2label: ConfigJSON = {};
  const label2id: ConfigJSON = {};
  for (let i = 0; i < count; i++) {
    id2label[String(i)] = `LABEL_${i}`;
    label2id[`LABEL_${i}`] = i;
  }
  return { id2label, label2id };
}

/** PreTrainedConfig.__post_init__ (after the class's own): aliases, dtype, labels; returns the config's JSON. */
function finish(draft: Draft, spec: ClassSpec): ConfigJSON {
  const { fields, extra } = draft;
  const kinds = new Map<string, Kind>([...BASE_FIELDS, ...spec.fields].map(([key, k]) => [key, k]));
  const take = (key: string, k: Kind): unknown => {
    const value = extra[key];
    delete extra[key];
    if (value !== undefined && !k.test(value)) throw fieldError(key, value, k.expected);
    return value;
  };
  // BC for torch_dtype: dtype wins when both are set.
  const torchDtype = take('torch_dtype', orNull(STRING));
  if (torchDtype !== undefined && torchDtype !== null && fields.dtype === null) fields.dtype = torchDtype;
  // num_labels is not stored: it sizes id2label (whose JSON keys are ints in Python).
  const numLabels = take('num_labels', kind('an integer >= 0', (v) => isInteger(v, 0))) as number | undefined;
  if (fields.id2label === null) {
    Object.assign(fields, labels(numLabels ?? 2));
  } else {
    const id2label: ConfigJSON = {};
    for (const [key, name] of Object.entries(fields.id2label as ConfigJSON)) {
      if (!/^\s*[+-]?\d+\s*$/.test(key)) throw fieldError('id2label', fields.id2label, 'an object with integer keys');
      id2label[String(Number(key))] = name;
    }
    fields.id2label = id2label;
    if (numLabels !== undefined && Object.keys(id2label).length !== numLabels) Object.assign(fields, labels(numLabels));
  }
  if (fields.problem_type === 'single_label_classification' && Object.keys(fields.id2label as ConfigJSON).length === 1) {
    throw fieldError('problem_type', fields.problem_type, "'regression' for a single label ('single_label_classification' needs two or more)");
  }
  const nameOrPath = take('name_or_path', STRING);
  if (nameOrPath !== undefined && !('_name_or_path' in extra)) extra._name_or_path = nameOrPath;
  const outputAttentions = take('_output_attentions', orNull(BOOL));
  if (outputAttentions !== undefined) fields.output_attentions = outputAttentions;
  // attribute_map: an alias given as a keyword argument sets its field (after the field itself).
  for (const [alias, target] of Object.entries(spec.attributeMap)) {
    const k = kinds.get(target) ?? spec.derived[target];
    const value = k ? take(alias, k) : undefined;
    if (value !== undefined) fields[target] = value;
  }
  for (const [key, k] of Object.entries({ transformers_version: orNull(STRING), _name_or_path: STRING, ...spec.derived })) {
    if (key in extra && !k.test(extra[key])) throw fieldError(key, extra[key], k.expected);
  }
  return { ...fields, ...extra, model_type: spec.modelType };
}

/** What PreTrainedConfig.fromPretrained() needs of `this`: a config class. */
export interface ConfigClass<T extends PreTrainedConfig> {
  /** Builds the config from a config.json object. */
  new (config?: ConfigJSON): T;
  /** transformers' model_type of the class. */
  readonly modelType: string;
  /** The key of the class's config inside a composite config.json ('' when none). */
  readonly baseConfigKey: string;
}

/** `location` as a file: a directory's `name`, else the path itself. */
async function configFile(location: unknown, name: string): Promise<string> {
  if (typeof location !== 'string' || location.length === 0) {
    throw InvalidArgumentError.of('location', location, `a model folder or checkpoint directory, or the path of its ${name}`);
  }
  const stat = await fs.stat(location).catch(() => null);
  return stat?.isDirectory() ? path.join(location, name) : location;
}

/** Builds a config read from `file`; a field of the wrong type is a ModelLoadError naming the file. */
function fromFile<T>(file: string, build: () => T): T {
  try {
    return build();
  } catch (e) {
    if (e instanceof InvalidArgumentError) throw new ModelLoadError(`'${file}' is damaged: ${e.message}`, { file });
    throw e;
  }
}

/**
 * What every configuration class has (transformers' PreTrainedConfig): the common fields, raw
 * access by snake_case key, toJSON() and fromPretrained().
 *
 * Every key of the input is kept, unknown ones included; differences from transformers' to_dict():
 * transformers_version and _name_or_path are written only when the input had them (to_dict()
 * writes its own version and ''); generation parameters in a config.json (max_length, num_beams,
 * ... of transformers 4 files), _commit_hash, attn_implementation and the like, which transformers 5
 * drops on reading, are kept. Keys read under another name are written under transformers' name:
 * torch_dtype as dtype, the aliases of attributeMap (image_token_id as image_token_index, T5's
 * hidden_size as d_model, ...), name_or_path as _name_or_path; num_labels only sizes id2label.
 */
export abstract class PreTrainedConfig {
  /** transformers' model_type of the class (written as `model_type`, whatever the input said). */
  static readonly modelType: string = '';
  /** The key of this class's config inside a composite config.json, e.g. 'vision_config' ('' when none). */
  static readonly baseConfigKey: string = '';
  /** Alias → field (transformers' attribute_map): reading or setting an alias means the field. Default: none. */
  static readonly attributeMap: Readonly<Record<string, string>> = {};

  readonly #json: ConfigJSON;
  readonly #floats: ReadonlySet<string>;
  readonly #parts: Readonly<Record<string, PreTrainedConfig>>;

  /** @internal `floats`: the float fields; `parts`: the sub-configs held under their keys. */
  protected constructor(json: ConfigJSON, floats: ReadonlySet<string>, parts: Record<string, PreTrainedConfig> = {}) {
    this.#json = deepFreeze(sortKeys(json));
    this.#floats = floats;
    this.#parts = parts;
  }

  #marked(): ConfigJSON {
    const out = markFloats(this.#json, this.#floats);
    for (const [key, part] of Object.entries(this.#parts)) out[key] = part.#marked();
    return out;
  }

  /** @internal A field of the config JSON (frozen). */
  protected field<T>(key: string): T {
    return this.#json[key] as T;
  }

  /** transformers' model_type: 'blip-2', 'blip_2_vision_model', 'blip_2_qformer', 'opt' or 't5'. */
  get modelType(): string {
    return this.#json.model_type as string;
  }

  /** The model classes the checkpoint's weights are for (e.g. ['Blip2ForConditionalGeneration']); default null. */
  get architectures(): readonly string[] | null {
    return this.field('architectures');
  }

  /** The weights' dtype ('float32', 'float16', 'bfloat16'; transformers 4 files call it torch_dtype); default null. */
  get dtype(): string | null {
    return this.field('dtype');
  }

  /** Whether the model is an encoder-decoder (T5 and BLIP-2 over T5: true); default false. */
  get isEncoderDecoder(): boolean {
    return this.field('is_encoder_decoder');
  }

  /** The transformers version that wrote the file; null when the input did not say. */
  get transformersVersion(): string | null {
    return (this.#json.transformers_version as string | undefined) ?? null;
  }

  /** The value of snake_case `key` (or of the field an attributeMap alias names), unknown keys included; undefined when absent. */
  get(key: string): unknown {
    const target = (this.constructor as typeof PreTrainedConfig).attributeMap[key] ?? key;
    const value = Object.hasOwn(this.#json, target) ? this.#json[target] : undefined;
    return value !== null && typeof value === 'object' ? structuredClone(value) : value;
  }

  /** transformers' snake_case keys and values (a fresh copy, keys sorted): `new Class(config.toJSON())` equals `config`. */
  toJSON(): ConfigJSON {
    return structuredClone(this.#json);
  }

  /**
   * config.json text as transformers writes it (to_json_string(use_diff=False)): toJSON() with keys
   * sorted, a 2-space indent and float fields written with a decimal point (transformers 5 rejects
   * `1` for a float field such as initializer_factor, which JSON.stringify would write).
   */
  toJSONString(): string {
    return writeJson(this.#marked());
  }

  /** Whether `other` is a config of the same class with the same JSON (transformers' `==`). */
  equals(other: unknown): boolean {
    return other instanceof PreTrainedConfig && other.constructor === this.constructor && isDeepStrictEqual(this.#json, other.#json);
  }

  /**
   * Reads `location`'s config.json (a model folder or checkpoint directory, or the path of a JSON
   * file), as transformers' from_pretrained(): a sub-config class takes its part of a composite
   * file (baseConfigKey, or the part whose model_type is the class's). Throws ModelLoadError
   * naming the file when it is missing or damaged, a field of the wrong type included.
   */
  static async fromPretrained<T extends PreTrainedConfig>(this: ConfigClass<T>, location: string): Promise<T> {
    const file = await configFile(location, 'config.json');
    let json = (await readJson(file, true)) as ConfigJSON;
    let prefix = '';
    if (this.baseConfigKey && isPlainObject(json[this.baseConfigKey])) {
      prefix = `${this.baseConfigKey}.`;
      json = json[this.baseConfigKey] as ConfigJSON;
    }
    if ('model_type' in json && json.model_type !== this.modelType) {
      for (const [key, value] of Object.entries(json)) {
        if (isPlainObject(value) && value.model_type === this.modelType) {
          prefix = `${prefix}${key}.`;
          json = value;
        }
      }
    }
    return fromFile(file, () => withPrefix(prefix, () => new this(json)));
  }
}

// ---------------------------------------------------------------------------------------------
// Blip2VisionConfig

const VISION: ClassSpec = {
  modelType: 'blip_2_vision_model',
  fields: [
    ['hidden_size', INT, 1408],
    ['intermediate_size', INT, 6144],
    ['num_hidden_layers', INT, 39],
    ['num_attention_heads', INT, 16],
    ['image_size', INT_OR_INTS, 224],
    ['patch_size', INT_OR_INTS, 14],
    ['hidden_act', STRING, 'gelu'],
    ['layer_norm_eps', NUMBER, 1e-6],
    ['attention_dropout', NUMBER, 0.0],
    ['initializer_range', NUMBER, 1e-10],
    ['qkv_bias', BOOL, true],
  ],
  attributeMap: {},
  derived: {},
};

/** transformers' Blip2VisionConfig: the ViT image encoder (config.json's `vision_config`). */
export class Blip2VisionConfig extends PreTrainedConfig {
  /** 'blip_2_vision_model'. */
  static override readonly modelType: string = VISION.modelType;
  /** 'vision_config'. */
  static override readonly baseConfigKey: string = 'vision_config';

  /** Builds the config from a `vision_config` object (snake_case), with transformers' defaults for what it lacks. */
  constructor(config: Blip2VisionConfigJSON | ConfigJSON = {}) {
    super(finish(takeFields(requireObject(config, 'config'), VISION), VISION), floatKeys(VISION.fields));
  }

  /** Width of the patch embeddings and encoder layers; default 1408. */
  get hiddenSize(): number { return this.field('hidden_size'); }
  /** Width of the MLP inside each encoder layer; default 6144. */
  get intermediateSize(): number { return this.field('intermediate_size'); }
  /** Encoder layers; default 39. */
  get numHiddenLayers(): number { return this.field('num_hidden_layers'); }
  /** Attention heads per layer; default 16. */
  get numAttentionHeads(): number { return this.field('num_attention_heads'); }
  /** Input resolution in pixels (one number: square); default 224. */
  get imageSize(): number | readonly number[] { return this.field('image_size'); }
  /** Patch size in pixels; default 14. */
  get patchSize(): number | readonly number[] { return this.field('patch_size'); }
  /** Activation of the MLPs; default 'gelu'. */
  get hiddenAct(): string { return this.field('hidden_act'); }
  /** Epsilon of the layer norms; default 1e-6. */
  get layerNormEps(): number { return this.field('layer_norm_eps'); }
  /** Dropout of the attention probabilities; default 0. */
  get attentionDropout(): number { return this.field('attention_dropout'); }
  /** Standard deviation of the weight initialisation; default 1e-10. */
  get initializerRange(): number { return this.field('initializer_range'); }
  /** Whether the query and value projections have a bias; default true. */
  get qkvBias(): boolean { return this.field('qkv_bias'); }
}

// ---------------------------------------------------------------------------------------------
// Blip2QFormerConfig

const QFORMER: ClassSpec = {
  modelType: 'blip_2_qformer',
  fields: [
    ['vocab_size', INT, 30522],
    ['hidden_size', INT, 768],
    ['num_hidden_layers', INT, 12],
    ['num_attention_heads', INT, 12],
    ['intermediate_size', INT, 3072],
    ['hidden_act', STRING, 'gelu'],
    ['hidden_dropout_prob', NUMBER, 0.1],
    ['attention_probs_dropout_prob', NUMBER, 0.1],
    ['max_position_embeddings', INT, 512],
    ['initializer_range', NUMBER, 0.02],
    ['layer_norm_eps', NUMBER, 1e-12],
    ['pad_token_id', orNull(INT), 0],
    ['cross_attention_frequency', INT, 2],
    ['encoder_hidden_size', INT, 1408],
    ['use_qformer_text_input', BOOL, false],
  ],
  attributeMap: {},
  derived: {},
};

/** transformers' Blip2QFormerConfig: the querying transformer (config.json's `qformer_config`). */
export class Blip2QFormerConfig extends PreTrainedConfig {
  /** 'blip_2_qformer'. */
  static override readonly modelType: string = QFORMER.modelType;
  /** 'qformer_config'. */
  static override readonly baseConfigKey: string = 'qformer_config';

  /** Builds the config from a `qformer_config` object (snake_case), with transformers' defaults for what it lacks. */
  constructor(config: Blip2QFormerConfigJSON | ConfigJSON = {}) {
    super(finish(takeFields(requireObject(config, 'config'), QFORMER), QFORMER), floatKeys(QFORMER.fields));
  }

  /** Vocabulary of the Q-Former's text embeddings (image-text retrieval); default 30522. */
  get vocabSize(): number { return this.field('vocab_size'); }
  /** Width of the query tokens and layers; default 768. */
  get hiddenSize(): number { return this.field('hidden_size'); }
  /** Transformer layers; default 12. */
  get numHiddenLayers(): number { return this.field('num_hidden_layers'); }
  /** Attention heads per layer; default 12. */
  get numAttentionHeads(): number { return this.field('num_attention_heads'); }
  /** Width of the MLPs; default 3072. */
  get intermediateSize(): number { return this.field('intermediate_size'); }
  /** Activation of the MLPs; default 'gelu'. */
  get hiddenAct(): string { return this.field('hidden_act'); }
  /** Dropout of the embeddings and layer outputs; default 0.1. */
  get hiddenDropoutProb(): number { return this.field('hidden_dropout_prob'); }
  /** Dropout of the attention probabilities; default 0.1. */
  get attentionProbsDropoutProb(): number { return this.field('attention_probs_dropout_prob'); }
  /** Text positions of the Q-Former's embeddings; default 512. */
  get maxPositionEmbeddings(): number { return this.field('max_position_embeddings'); }
  /** Standard deviation of the weight initialisation; default 0.02. */
  get initializerRange(): number { return this.field('initializer_range'); }
  /** Epsilon of the layer norms; default 1e-12. */
  get layerNormEps(): number { return this.field('layer_norm_eps'); }
  /** Padding token of the Q-Former's text input; default 0. */
  get padTokenId(): number | null { return this.field('pad_token_id'); }
  /** A cross-attention to the image features every this many layers; default 2. */
  get crossAttentionFrequency(): number { return this.field('cross_attention_frequency'); }
  /** Width of the image features cross-attended to; default 1408 (in a Blip2Config: the vision hidden size, always). */
  get encoderHiddenSize(): number { return this.field('encoder_hidden_size'); }
  /** Whether the Q-Former has text embeddings (instruction / retrieval checkpoints); default false. */
  get useQformerTextInput(): boolean { return this.field('use_qformer_text_input'); }
}

// ---------------------------------------------------------------------------------------------
// OPTConfig

const OPT: ClassSpec = {
  modelType: 'opt',
  fields: [
    ['vocab_size', INT, 50272],
    ['hidden_size', INT, 768],
    ['num_hidden_layers', INT, 12],
    ['ffn_dim', INT, 3072],
    ['max_position_embeddings', INT, 2048],
    ['do_layer_norm_before', BOOL, true],
    ['_remove_final_layer_norm', BOOL, false],
    ['word_embed_proj_dim', orNull(INT), null],
    ['dropout', NUMBER, 0.1],
    ['attention_dropout', NUMBER, 0.0],
    ['num_attention_heads', INT, 12],
    ['activation_function', STRING, 'relu'],
    ['layerdrop', NUMBER, 0.0],
    ['init_std', NUMBER, 0.02],
    ['use_cache', BOOL, true],
    ['pad_token_id', orNull(INT), 1],
    ['bos_token_id', orNull(INT), 2],
    ['eos_token_id', orNull(INT_OR_INTS), 2],
    ['enable_bias', BOOL, true],
    ['layer_norm_elementwise_affine', BOOL, true],
    ['tie_word_embeddings', BOOL, true],
  ],
  attributeMap: {},
  derived: {},
};

/** transformers' OPTConfig: the decoder-only language model of blip2-opt checkpoints (config.json's `text_config`). */
export class OPTConfig extends PreTrainedConfig {
  /** 'opt'. */
  static override readonly modelType: string = OPT.modelType;

  /** Builds the config from an OPT `text_config` object (snake_case), with transformers' defaults for what it lacks. */
  constructor(config: OPTConfigJSON | ConfigJSON = {}) {
    const draft = takeFields(requireObject(config, 'config'), OPT);
    draft.fields.word_embed_proj_dim ??= draft.fields.hidden_size;
    super(finish(draft, OPT), floatKeys(OPT.fields));
  }

  /** Vocabulary size; default 50272. */
  get vocabSize(): number { return this.field('vocab_size'); }
  /** Width of the decoder layers; default 768. */
  get hiddenSize(): number { return this.field('hidden_size'); }
  /** Decoder layers; default 12. */
  get numHiddenLayers(): number { return this.field('num_hidden_layers'); }
  /** Width of the MLPs; default 3072. */
  get ffnDim(): number { return this.field('ffn_dim'); }
  /** Positions of the learned position embeddings; default 2048. */
  get maxPositionEmbeddings(): number { return this.field('max_position_embeddings'); }
  /** Layer norm before (true) or after each block; default true. */
  get doLayerNormBefore(): boolean { return this.field('do_layer_norm_before'); }
  /** Width of the word embeddings (projected to hiddenSize when different, as opt-350m); default: hiddenSize. */
  get wordEmbedProjDim(): number { return this.field('word_embed_proj_dim'); }
  /** Dropout of the layer outputs; default 0.1. */
  get dropout(): number { return this.field('dropout'); }
  /** Dropout of the attention probabilities; default 0. */
  get attentionDropout(): number { return this.field('attention_dropout'); }
  /** Attention heads per layer; default 12. */
  get numAttentionHeads(): number { return this.field('num_attention_heads'); }
  /** Activation of the MLPs; default 'relu'. */
  get activationFunction(): string { return this.field('activation_function'); }
  /** LayerDrop probability; default 0. */
  get layerdrop(): number { return this.field('layerdrop'); }
  /** Standard deviation of the weight initialisation; default 0.02. */
  get initStd(): number { return this.field('init_std'); }
  /** Whether the model returns its key/value cache; default true. */
  get useCache(): boolean { return this.field('use_cache'); }
  /** Padding token; default 1. */
  get padTokenId(): number | null { return this.field('pad_token_id'); }
  /** Beginning-of-sequence token; default 2. */
  get bosTokenId(): number | null { return this.field('bos_token_id'); }
  /** End-of-sequence token(s); default 2. */
  get eosTokenId(): number | readonly number[] | null { return this.field('eos_token_id'); }
  /** Whether the attention and MLP linears have biases; default true. */
  get enableBias(): boolean { return this.field('enable_bias'); }
  /** Whether the layer norms have learnable weights; default true. */
  get layerNormElementwiseAffine(): boolean { return this.field('layer_norm_elementwise_affine'); }
  /** Whether the output projection shares the input embeddings; default true. */
  get tieWordEmbeddings(): boolean { return this.field('tie_word_embeddings'); }
}

// ---------------------------------------------------------------------------------------------
// T5Config

const T5: ClassSpec = {
  modelType: 't5',
  fields: [
    ['vocab_size', INT, 32128],
    ['d_model', INT, 512],
    ['d_kv', INT, 64],
    ['d_ff', INT, 2048],
    ['num_layers', INT, 6],
    ['num_decoder_layers', orNull(INT), null],
    ['num_heads', INT, 8],
    ['relative_attention_num_buckets', INT, 32],
    ['relative_attention_max_distance', INT, 128],
    ['dropout_rate', NUMBER, 0.1],
    ['layer_norm_epsilon', NUMBER, 1e-6],
    ['initializer_factor', NUMBER, 1.0],
    ['feed_forward_proj', STRING, 'relu'],
    ['is_encoder_decoder', BOOL, true],
    ['use_cache', BOOL, true],
    ['pad_token_id', orNull(INT), 0],
    ['eos_token_id', orNull(INT_OR_INTS), 1],
    ['classifier_dropout', NUMBER, 0.0],
    ['is_decoder', BOOL, false],
  ],
  attributeMap: { hidden_size: 'd_model', num_attention_heads: 'num_heads', num_hidden_layers: 'num_layers', head_dim: 'd_kv' },
  derived: {
    dense_act_fn: STRING, is_gated_act: BOOL, scale_decoder_outputs: BOOL,
    decoder_start_token_id: orNull(INT),
  },
};

/** transformers' T5Config: the encoder-decoder language model of blip2-flan-t5 checkpoints (config.json's `text_config`). */
export class T5Config extends PreTrainedConfig {
  /** 't5'. */
  static override readonly modelType: string = T5.modelType;
  /** hidden_size → d_model, num_attention_heads → num_heads, num_hidden_layers → num_layers, head_dim → d_kv. */
  static override readonly attributeMap: Readonly<Record<string, string>> = T5.attributeMap;

  /**
   * Builds the config from a T5 `text_config` object (snake_case), with transformers' defaults for
   * what it lacks and its derived fields: num_decoder_layers (default: num_layers), dense_act_fn and
   * is_gated_act parsed from feed_forward_proj ('gated-gelu' → 'gelu_new', gated), and
   * scale_decoder_outputs (false when the input says tie_word_embeddings: false, which is then true).
   */
  constructor(config: T5ConfigJSON | ConfigJSON = {}) {
    const draft = takeFields(requireObject(config, 'config'), T5);
    const { fields, extra } = draft;
    // Before the aliases are applied (PreTrainedConfig.__post_init__), as in transformers.
    fields.num_decoder_layers ??= fields.num_layers;
    const proj = fields.feed_forward_proj as string;
    const act = proj.split('-');
    if ((act.length > 1 && act[0] !== 'gated') || act.length > 2) {
      throw fieldError('feed_forward_proj', proj, "an activation 'gated-{ACT_FN}' or '{ACT_FN}', e.g. 'gated-gelu' or 'relu'");
    }
    fields.dense_act_fn = proj === 'gated-gelu' ? 'gelu_new' : act[act.length - 1];
    fields.is_gated_act = act[0] === 'gated';
    const tie = extra.tie_word_embeddings;
    delete extra.tie_word_embeddings;
    if (tie !== undefined && !orNull(BOOL).test(tie)) throw fieldError('tie_word_embeddings', tie, 'a boolean or null');
    fields.scale_decoder_outputs = tie !== false;
    fields.tie_word_embeddings = true;
    super(finish(draft, T5), floatKeys(T5.fields));
  }

  /** Vocabulary size; default 32128. */
  get vocabSize(): number { return this.field('vocab_size'); }
  /** Width of the layers (transformers' hidden_size); default 512. */
  get dModel(): number { return this.field('d_model'); }
  /** Alias of dModel. Default 512. */
  get hiddenSize(): number { return this.dModel; }
  /** Width of each attention head (transformers' head_dim); default 64. */
  get dKv(): number { return this.field('d_kv'); }
  /** Alias of dKv. Default 64. */
  get headDim(): number { return this.dKv; }
  /** Width of the MLPs; default 2048. */
  get dFf(): number { return this.field('d_ff'); }
  /** Encoder layers (transformers' num_hidden_layers); default 6. */
  get numLayers(): number { return this.field('num_layers'); }
  /** Alias of numLayers. Default 6. */
  get numHiddenLayers(): number { return this.numLayers; }
  /** Decoder layers; default: numLayers. */
  get numDecoderLayers(): number { return this.field('num_decoder_layers'); }
  /** Attention heads per layer (transformers' num_attention_heads); default 8. */
  get numHeads(): number { return this.field('num_heads'); }
  /** Alias of numHeads. Default 8. */
  get numAttentionHeads(): number { return this.numHeads; }
  /** Buckets of the relative position bias; default 32. */
  get relativeAttentionNumBuckets(): number { return this.field('relative_attention_num_buckets'); }
  /** Longest distance the relative position buckets tell apart; default 128. */
  get relativeAttentionMaxDistance(): number { return this.field('relative_attention_max_distance'); }
  /** Dropout; default 0.1. */
  get dropoutRate(): number { return this.field('dropout_rate'); }
  /** Epsilon of the RMS layer norms; default 1e-6. */
  get layerNormEpsilon(): number { return this.field('layer_norm_epsilon'); }
  /** Scale of the weight initialisation; default 1. */
  get initializerFactor(): number { return this.field('initializer_factor'); }
  /** The MLP: '{ACT_FN}' or 'gated-{ACT_FN}' (Flan-T5: 'gated-gelu'); default 'relu'. */
  get feedForwardProj(): string { return this.field('feed_forward_proj'); }
  /** The MLP's activation, from feedForwardProj ('gated-gelu' gives 'gelu_new'); default 'relu'. */
  get denseActFn(): string { return this.field('dense_act_fn'); }
  /** Whether the MLP is gated (feedForwardProj 'gated-...'); default false. */
  get isGatedAct(): boolean { return this.field('is_gated_act'); }
  /** Whether decoder outputs are scaled by dModel^-0.5 (false when the file says tie_word_embeddings: false, as T5 v1.1); default true. */
  get scaleDecoderOutputs(): boolean { return this.field('scale_decoder_outputs'); }
  /** Always true in transformers 5 (the embeddings are tied; see scaleDecoderOutputs). */
  get tieWordEmbeddings(): boolean { return this.field('tie_word_embeddings'); }
  /** Whether the model returns its key/value cache; default true. */
  get useCache(): boolean { return this.field('use_cache'); }
  /** Padding token (also the decoder's start token in T5 checkpoints); default 0. */
  get padTokenId(): number | null { return this.field('pad_token_id'); }
  /** End-of-sequence token(s); default 1. */
  get eosTokenId(): number | readonly number[] | null { return this.field('eos_token_id'); }
  /** The decoder's first token when the file sets decoder_start_token_id (not a T5Config field; Flan-T5 files say 0); default null. */
  get decoderStartTokenId(): number | null { return (this.get('decoder_start_token_id') as number | null | undefined) ?? null; }
  /** Dropout of the classification head; default 0. */
  get classifierDropout(): number { return this.field('classifier_dropout'); }
  /** Whether this is a decoder-only stack; default false. */
  get isDecoder(): boolean { return this.field('is_decoder'); }
}

// ---------------------------------------------------------------------------------------------
// Blip2Config

/** The language model config of a BLIP-2 checkpoint: OPTConfig (blip2-opt) or T5Config (blip2-flan-t5). */
export type Blip2TextConfig = OPTConfig | T5Config;

const BLIP2: ClassSpec = {
  modelType: 'blip-2',
  fields: [
    ['num_query_tokens', INT, 32],
    ['image_text_hidden_size', INT, 256],
    ['image_token_index', orNull(INT), null],
    ['initializer_factor', NUMBER, 1.0],
    ['initializer_range', NUMBER, 0.02],
  ],
  attributeMap: { image_token_id: 'image_token_index' },
  derived: { use_decoder_only_language_model: BOOL },
};

// transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, for the language models supported here.
const CAUSAL_LM_TYPES = new Set(['opt']);

function subConfig<T extends PreTrainedConfig>(key: string, value: unknown, cls: new (config?: ConfigJSON) => T): T {
  if (value === undefined || value === null) return new cls();
  if (value instanceof cls) return value;
  if (isPlainObject(value)) return withPrefix(`${key}.`, () => new cls(value));
  throw fieldError(key, value, `an object or a ${cls.name}`);
}

function textConfig(value: unknown): Blip2TextConfig {
  if (value instanceof OPTConfig || value instanceof T5Config) return value;
  if (value === undefined || value === null) return new OPTConfig();
  if (!isPlainObject(value)) throw fieldError('text_config', value, 'an object, an OPTConfig or a T5Config');
  const modelType = value.model_type ?? 'opt';
  if (modelType === 'opt') return withPrefix('text_config.', () => new OPTConfig(value));
  if (modelType === 't5') return withPrefix('text_config.', () => new T5Config(value));
  throw fieldError('text_config.model_type', modelType, "'opt' or 't5' (the language models of the BLIP-2 checkpoints blip2-node runs)");
}

/**
 * transformers' Blip2Config: a BLIP-2 checkpoint's config.json, with its vision, Q-Former and
 * language model configs. Built as transformers does: an absent sub-config gets its class's
 * defaults (text_config: OPT), qformer_config.encoder_hidden_size is always the vision hidden
 * size, use_decoder_only_language_model follows the language model's type (unless the file says
 * otherwise) and is_encoder_decoder is always the language model's.
 */
export class Blip2Config extends PreTrainedConfig {
  /** 'blip-2'. */
  static override readonly modelType: string = BLIP2.modelType;
  /** image_token_id → image_token_index. */
  static override readonly attributeMap: Readonly<Record<string, string>> = BLIP2.attributeMap;

  readonly #vision: Blip2VisionConfig;
  readonly #qformer: Blip2QFormerConfig;
  readonly #text: Blip2TextConfig;

  /** Builds the config from a config.json object (snake_case; each sub-config an object or a config instance), with transformers' defaults. */
  constructor(config: Blip2ConfigJSON | ConfigJSON = {}) {
    const { vision_config: visionJson, qformer_config: qformerJson, text_config: textJson, ...rest } = requireObject(config, 'config');
    const text = textConfig(textJson);
    const vision = subConfig('vision_config', visionJson, Blip2VisionConfig);
    let qformer = subConfig('qformer_config', qformerJson, Blip2QFormerConfig);
    if (qformer.encoderHiddenSize !== vision.hiddenSize) {
      qformer = new Blip2QFormerConfig({ ...qformer.toJSON(), encoder_hidden_size: vision.hiddenSize });
    }
    const draft = takeFields(rest, BLIP2);
    draft.fields.use_decoder_only_language_model = CAUSAL_LM_TYPES.has(text.modelType);
    const json = finish(draft, BLIP2);
    json.is_encoder_decoder = text.isEncoderDecoder;
    json.vision_config = vision.toJSON();
    json.qformer_config = qformer.toJSON();
    json.text_config = text.toJSON();
    super(json, floatKeys(BLIP2.fields), { vision_config: vision, qformer_config: qformer, text_config: text });
    this.#vision = vision;
    this.#qformer = qformer;
    this.#text = text;
  }

  /**
   * A Blip2Config from its three parts (transformers 4's from_vision_qformer_text_configs; in
   * transformers 5, Blip2Config(vision_config=..., ...)). `text` defaults to OPTConfig's defaults;
   * `extra` holds the other fields (num_query_tokens, image_token_index, ...; default none).
   */
  static fromVisionQformerTextConfigs(
    vision: Blip2VisionConfig, qformer: Blip2QFormerConfig, text?: Blip2TextConfig | null, extra: Blip2ConfigJSON | ConfigJSON = {},
  ): Blip2Config {
    if (!(vision instanceof Blip2VisionConfig)) throw InvalidArgumentError.of('vision', vision, 'a Blip2VisionConfig');
    if (!(qformer instanceof Blip2QFormerConfig)) throw InvalidArgumentError.of('qformer', qformer, 'a Blip2QFormerConfig');
    if (text !== undefined && text !== null && !(text instanceof OPTConfig) && !(text instanceof T5Config)) {
      throw InvalidArgumentError.of('text', text, 'an OPTConfig, a T5Config or null');
    }
    requireObject(extra, 'extra');
    for (const key of ['vision_config', 'qformer_config', 'text_config']) {
      if (Object.hasOwn(extra, key)) throw InvalidArgumentError.of(`extra.${key}`, extra[key], `no ${key} in extra (it is an argument)`);
    }
    return new Blip2Config({ ...extra, vision_config: vision, qformer_config: qformer, text_config: text ?? null });
  }

  /** The vision encoder's config; default: Blip2VisionConfig's defaults. */
  get visionConfig(): Blip2VisionConfig { return this.#vision; }
  /** The Q-Former's config (encoderHiddenSize = visionConfig.hiddenSize); default: Blip2QFormerConfig's defaults. */
  get qformerConfig(): Blip2QFormerConfig { return this.#qformer; }
  /** The language model's config (OPTConfig or T5Config, by text_config.model_type, default 'opt'); default: OPTConfig's defaults. */
  get textConfig(): Blip2TextConfig { return this.#text; }
  /** Learned query tokens (the image's length in the language model); default 32. */
  get numQueryTokens(): number { return this.field('num_query_tokens'); }
  /** Width of the shared image-text embedding space (image-text retrieval); default 256. */
  get imageTextHiddenSize(): number { return this.field('image_text_hidden_size'); }
  /** The `<image>` placeholder token in prompts (transformers 4.47+ checkpoints); default null (no placeholders). */
  get imageTokenIndex(): number | null { return this.field('image_token_index'); }
  /** Alias of imageTokenIndex (transformers' image_token_id). Default null. */
  get imageTokenId(): number | null { return this.imageTokenIndex; }
  /** Scale of the weight initialisation; default 1. */
  get initializerFactor(): number { return this.field('initializer_factor'); }
  /** Standard deviation of the weight initialisation; default 0.02. */
  get initializerRange(): number { return this.field('initializer_range'); }
  /** Whether the language model is decoder-only; default: true for OPT, false for T5 (a file's own value wins). */
  get useDecoderOnlyLanguageModel(): boolean { return this.field('use_decoder_only_language_model'); }
}

// ---------------------------------------------------------------------------------------------
// GenerationConfig

// transformers 5 stores null for an unset parameter and applies
// GenerationConfig._get_default_generation_params() at generate time: the third column.
const GENERATION_FIELDS: readonly Spec[] = [
  ['max_length', orNull(INT), 20],
  ['max_new_tokens', orNull(INT), null],
  ['min_length', orNull(INT), 0],
  ['min_new_tokens', orNull(INT), null],
  ['early_stopping', orNull(EARLY_STOPPING), false],
  ['do_sample', orNull(BOOL), false],
  ['num_beams', orNull(INT), 1],
  ['use_cache', orNull(BOOL), true],
  ['temperature', orNull(NUMBER), 1.0],
  ['top_k', orNull(INT), 50],
  ['top_p', orNull(NUMBER), 1.0],
  ['repetition_penalty', orNull(NUMBER), 1.0],
  ['length_penalty', orNull(NUMBER), 1.0],
  ['no_repeat_ngram_size', orNull(INT), 0],
  ['num_return_sequences', orNull(INT), 1],
  ['bos_token_id', orNull(INT), null],
  ['eos_token_id', orNull(INT_OR_INTS), null],
  ['pad_token_id', orNull(INT), null],
  ['decoder_start_token_id', orNull(INT_OR_INTS), null],
];
const GENERATION_FLOATS = new Set(GENERATION_FIELDS.filter(([, k]) => k.expected.startsWith(NUMBER.expected)).map(([key]) => key));
const GENERATION_DEFAULTS = new Map(GENERATION_FIELDS.map(([key, , fallback]) => [key, fallback]));

/**
 * transformers' GenerationConfig (generation_config.json) for the parameters blip2-node uses.
 * toJSON() writes null for an unset one, as transformers 5; each accessor gives the value
 * generate() uses: the file's, else transformers' default (_get_default_generation_params()).
 * Every other key of the input is kept (transformers drops them when _from_model_config is true).
 */
export class GenerationConfig {
  readonly #json: ConfigJSON;

  /** Builds the config from a generation_config.json object (snake_case). */
  constructor(config: GenerationConfigJSON | ConfigJSON = {}) {
    const input = requireObject(config, 'config');
    const json: ConfigJSON = {};
    for (const [key, k] of GENERATION_FIELDS) {
      const given = Object.hasOwn(input, key) ? input[key] : undefined;
      if (given !== undefined && !k.test(given)) throw fieldError(key, given, k.expected);
      json[key] = given === undefined ? null : cloneJson(given, key);
    }
    const meta: Record<string, Kind> = { _from_model_config: orNull(BOOL), transformers_version: orNull(STRING) };
    for (const [key, value] of Object.entries(input)) {
      if (GENERATION_DEFAULTS.has(key) || value === undefined) continue;
      if (meta[key] && !meta[key].test(value)) throw fieldError(key, value, meta[key].expected);
      json[key] = cloneJson(value, key);
    }
    this.#json = deepFreeze(sortKeys(json));
  }

  /**
   * Reads `location`'s generation_config.json (a model folder or checkpoint directory, or the
   * path of a JSON file); ModelLoadError naming the file when it is missing or damaged.
   */
  static async fromPretrained(location: string): Promise<GenerationConfig> {
    const file = await configFile(location, 'generation_config.json');
    const json = (await readJson(file, true)) as ConfigJSON;
    return fromFile(file, () => new GenerationConfig(json));
  }

  #value<T>(key: string): T {
    const value = this.#json[key];
    return (value === null ? GENERATION_DEFAULTS.get(key) : value) as T;
  }

  /** Longest output, prompt included (BLIP-2 counts new tokens when max_new_tokens is unset); default 20. */
  get maxLength(): number { return this.#value('max_length'); }
  /** New tokens at most; default null (maxLength decides). */
  get maxNewTokens(): number | null { return this.#value('max_new_tokens'); }
  /** Shortest output, prompt included; default 0. */
  get minLength(): number { return this.#value('min_length'); }
  /** New tokens at least; default null (minLength decides). */
  get minNewTokens(): number | null { return this.#value('min_new_tokens'); }
  /** Beam search's stopping rule: true, false (heuristic) or 'never'; default false. */
  get earlyStopping(): boolean | 'never' { return this.#value('early_stopping'); }
  /** Sampling (true) or greedy / beam search; default false. */
  get doSample(): boolean { return this.#value('do_sample'); }
  /** Beams; default 1 (no beam search). */
  get numBeams(): number { return this.#value('num_beams'); }
  /** Whether generation uses the key/value cache; default true. */
  get useCache(): boolean { return this.#value('use_cache'); }
  /** Sampling temperature; default 1. */
  get temperature(): number { return this.#value('temperature'); }
  /** Top-k filtering (0: off); default 50. */
  get topK(): number { return this.#value('top_k'); }
  /** Nucleus (top-p) filtering; default 1 (off). */
  get topP(): number { return this.#value('top_p'); }
  /** Repetition penalty; default 1 (none). */
  get repetitionPenalty(): number { return this.#value('repetition_penalty'); }
  /** Beam search's length penalty exponent; default 1. */
  get lengthPenalty(): number { return this.#value('length_penalty'); }
  /** Forbids repeating n-grams of this size; default 0 (off). */
  get noRepeatNgramSize(): number { return this.#value('no_repeat_ngram_size'); }
  /** Sequences returned per input; default 1. */
  get numReturnSequences(): number { return this.#value('num_return_sequences'); }
  /** Beginning-of-sequence token; default null. */
  get bosTokenId(): number | null { return this.#value('bos_token_id'); }
  /** End-of-sequence token(s); default null (the model config's). */
  get eosTokenId(): number | readonly number[] | null { return this.#value('eos_token_id'); }
  /** Padding token; default null (the model config's, else the first EOS). */
  get padTokenId(): number | null { return this.#value('pad_token_id'); }
  /** Encoder-decoder models: the decoder's first token; default null (the model config's). */
  get decoderStartTokenId(): number | readonly number[] | null { return this.#value('decoder_start_token_id'); }
  /** The transformers version that wrote the file; null when the input did not say. */
  get transformersVersion(): string | null { return (this.#json.transformers_version as string | undefined) ?? null; }

  /** The value of snake_case `key` as in the file (null for an unset known parameter), unknown keys included; undefined when absent. */
  get(key: string): unknown {
    const value = Object.hasOwn(this.#json, key) ? this.#json[key] : undefined;
    return value !== null && typeof value === 'object' ? structuredClone(value) : value;
  }

  /** transformers' snake_case keys (a fresh copy, keys sorted; null for an unset known parameter): `new GenerationConfig(c.toJSON())` equals `c`. */
  toJSON(): ConfigJSON {
    return structuredClone(this.#json);
  }

  /** generation_config.json text as transformers writes it: keys sorted, a 2-space indent, float parameters with a decimal point. */
  toJSONString(): string {
    return writeJson(markFloats(this.#json, GENERATION_FLOATS));
  }

  /** Whether `other` is a GenerationConfig with the same JSON. */
  equals(other: unknown): boolean {
    return other instanceof GenerationConfig && isDeepStrictEqual(this.#json, other.#json);
  }
}
