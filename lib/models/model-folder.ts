// Reads and checks a blip2-node model folder (the exporter's output; format in export/README.md)
// before any native code touches it, so a missing or damaged file is named precisely. Module files
// are TorchScript, i.e. code: each must match the sha256 the manifest records. Weights are
// safetensors files whose headers are read here; native code maps them and parses no JSON.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';

import type { NativeDType, NativeWeights } from '../../typings/binding';
import { InvalidArgumentError, ModelLoadError } from '../errors';
import { integerRange, isInteger } from '../validation';

export interface ManifestModule {
  file: string;
  bytes: number;
  sha256: string;
  methods: Record<string, { inputs: string[]; outputs: string[] }>;
  /** Parameter path inside the module → weight key in the safetensors files. */
  parameters: Record<string, string>;
}

export interface ManifestWeights {
  files: Array<{ file: string; bytes: number; sha256: string }>;
  bytes: number;
  /** Keys that stay float32 when the model runs in float16 (transformers 5's _keep_in_fp32_modules). */
  keep_float32: string[];
}

/** A model folder's manifest.json (export/README.md describes every field). */
export interface Manifest {
  format: 'blip2-node-model';
  format_version: 2;
  architecture: 'opt' | 't5' | 'itm';
  /** config.json's architectures[0]. */
  checkpoint_class?: string;
  /** The transformers classes this folder can be loaded as (Blip2ForConditionalGeneration, Blip2Model, ...). */
  classes: string[];
  /** T5: encoder positions (image queries + prompt) a cache slot holds. */
  max_encoder_length?: number;
  /** itm: the Q-Former/projection parts the checkpoint has. */
  parts?: Record<string, boolean>;
  /** itm: the width of the shared image-text embedding space. */
  image_text_hidden_size?: number;
  dtype: 'float32' | 'float16' | 'bfloat16';
  exporter: { version: string; torch: string };
  num_query_tokens: number;
  image_token_index: number | null;
  /** [height, width]; null for a folder without a vision model (Blip2TextModelWithProjection). */
  image_size: [number, number] | null;
  max_length: number;
  vocab_size: number;
  special_tokens: {
    bos_token_id: number | null;
    eos_token_id: number[] | null;
    pad_token_id: number | null;
    decoder_start_token_id: number | null;
  };
  /** opt / t5 (absent for itm). num_layers: decoder layers; num_encoder_layers: T5 only. */
  language_model: {
    num_layers: number; num_heads: number; head_dim: number; hidden_size: number; embed_dim: number; vocab_size?: number;
    max_position_embeddings?: number; num_encoder_layers?: number;
  };
  vision: { hidden_size: number; num_layers: number; patch_size: number; num_positions: number } | null;
  qformer: {
    hidden_size: number; num_layers: number; encoder_hidden_size?: number; vocab_size?: number; max_position_embeddings?: number;
    use_qformer_text_input?: boolean;
  };
  weights: ManifestWeights;
  modules: Record<string, ManifestModule>;
}

/** One tensor of the weights files, from their safetensors headers. */
export interface WeightTensor {
  key: string;
  file: number;
  offset: number;
  nbytes: number;
  dtype: NativeDType;
  shape: number[];
}

/** A checked model folder: its manifest, configs and weight tensors (what readModelFolder() returns). */
export interface ModelFolder {
  dir: string;
  manifest: Manifest;
  /** config.json of the checkpoint (Blip2Config), or {} when absent. */
  config: Record<string, unknown>;
  /** generation_config.json, or null when absent. */
  generationConfig: Record<string, unknown> | null;
  /** The path of module `name`'s TorchScript file ('image_encoder', 'language_model'). */
  modulePath(name: string): string;
  /** Every tensor of the weights files by key. */
  weights: Map<string, WeightTensor>;
  /** What the native loader needs for `modules`: files, tensors, and each module's parameter bindings. */
  nativeWeights(modules: string[]): { weights: NativeWeights; modules: Record<string, { path: string; parameters: Array<[string, number]> }> };
}

const SUPPORTED_FORMAT_VERSION = 2;

const SAFETENSORS_DTYPES: Record<string, NativeDType> = {
  F32: 'float32', F16: 'float16', BF16: 'bfloat16', F64: 'float64', I64: 'int64', I32: 'int32', I16: 'int16', I8: 'int8', U8: 'uint8', BOOL: 'bool',
};
const ELEMENT_BYTES: Record<NativeDType, number> = {
  float32: 4, float16: 2, bfloat16: 2, float64: 8, int64: 8, int32: 4, int16: 2, int8: 1, uint8: 1, bool: 1,
};
// The reference implementation's limit: a larger header is a corrupt length field.
const MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024;

async function sha256Of(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** The tensors of one safetensors file from its header, each checked to lie inside the file. */
async function readSafetensorsHeader(file: string, fileIndex: number, size: number): Promise<WeightTensor[]> {
  const damaged = (why: string) => new ModelLoadError(`weights file '${file}' is damaged: ${why}`, { file });
  const handle = await fs.open(file, 'r').catch((e: Error) => {
    throw new ModelLoadError(`cannot open weights file '${file}': ${e.message}`, { file });
  });
  try {
    if (size < 8) throw damaged(`it has ${size} bytes, too few for a safetensors header`);
    const prefix = Buffer.alloc(8);
    await handle.read(prefix, 0, 8, 0);
    const headerBytes = Number(prefix.readBigUInt64LE(0));
    if (headerBytes > MAX_SAFETENSORS_HEADER || 8 + headerBytes > size) throw damaged(`its header length field says ${headerBytes} bytes`);
    const text = Buffer.alloc(headerBytes);
    await handle.read(text, 0, headerBytes, 8);
    let header: Record<string, unknown>;
    try {
      header = JSON.parse(text.toString('utf8')) as Record<string, unknown>;
    } catch (e) {
      throw damaged(`its header is not JSON (${(e as Error).message})`);
    }
    const dataStart = 8 + headerBytes;
    const tensors: WeightTensor[] = [];
    for (const [key, entry] of Object.entries(header)) {
      if (key === '__metadata__') continue;
      const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
      const dtype = typeof e.dtype === 'string' ? SAFETENSORS_DTYPES[e.dtype] : undefined;
      const shape = e.shape;
      const offsets = e.data_offsets;
      if (!dtype) throw damaged(`tensor '${key}' has dtype ${JSON.stringify(e.dtype)}`);
      if (!Array.isArray(shape) || !shape.every((d) => isInteger(d, 0))) throw damaged(`tensor '${key}' has shape ${JSON.stringify(shape)}`);
      if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((d) => isInteger(d, 0)) || offsets[1] < offsets[0]) {
        throw damaged(`tensor '${key}' has data_offsets ${JSON.stringify(offsets)}`);
      }
      const nbytes = offsets[1] - offsets[0];
      const numel = (shape as number[]).reduce((a, b) => a * b, 1);
      if (numel * ELEMENT_BYTES[dtype] !== nbytes) throw damaged(`tensor '${key}' has ${nbytes} bytes for shape [${shape.join(', ')}] of ${dtype}`);
      if (dataStart + offsets[1] > size) throw damaged(`tensor '${key}' lies past the end of the file`);
      tensors.push({ key, file: fileIndex, offset: dataStart + offsets[0], nbytes, dtype, shape: shape as number[] });
    }
    return tensors;
  } finally {
    await handle.close();
  }
}

const DTYPES = ['float32', 'float16', 'bfloat16'];

/**
 * The manifest's numbers must describe the weights it ships: a hand-edited or mismatched manifest
 * fails here, naming the field, instead of inside the first generate().
 */
function checkAgainstWeights(manifest: Manifest, weights: Map<string, WeightTensor>, file: string): void {
  const damaged = (field: string, value: unknown, expected: string) =>
    new ModelLoadError(`'${file}' is damaged: '${field}' is ${JSON.stringify(value)}; ${expected}`, { file });
  if (!DTYPES.includes(manifest.dtype)) throw damaged('dtype', manifest.dtype, `expected one of ${DTYPES.join(', ')}`);
  const keep = new Set(manifest.weights.keep_float32);
  for (const [key, t] of weights) {
    const floating = t.dtype === 'float32' || t.dtype === 'float16' || t.dtype === 'bfloat16';
    const expected = keep.has(key) && manifest.dtype === 'float16' ? 'float32' : manifest.dtype;
    if (floating && t.dtype !== expected) throw damaged('dtype', manifest.dtype, `the weights are ${t.dtype} (tensor '${key}')`);
  }
  const tokens = manifest.special_tokens as unknown as Record<string, unknown> | undefined;
  if (tokens === null || typeof tokens !== 'object') throw damaged('special_tokens', tokens, 'expected an object of token ids');
  const vocab = manifest.architecture === 'itm' ? manifest.qformer.vocab_size : manifest.vocab_size;
  const isId = (v: unknown) => v === null || isInteger(v, 0, vocab === undefined ? Number.MAX_SAFE_INTEGER : vocab - 1);
  for (const name of ['bos_token_id', 'pad_token_id', 'decoder_start_token_id']) {
    if (tokens[name] !== undefined && !isId(tokens[name])) throw damaged(`special_tokens.${name}`, tokens[name], `expected null or a token id below ${vocab}`);
  }
  const eos = tokens.eos_token_id;
  if (eos !== undefined && eos !== null && !(Array.isArray(eos) && eos.every(isId))) {
    throw damaged('special_tokens.eos_token_id', eos, `expected null or a list of token ids below ${vocab}`);
  }
  if (manifest.architecture === 'itm') return;
  const lm = manifest.modules.language_model?.parameters;
  if (!lm) throw damaged('modules.language_model', undefined, 'expected the language model module');
  const shape = (parameter: string) => weights.get(lm[parameter])?.shape;
  // The head's rows are the vocabulary, its columns the embedding width.
  const head = shape('lm_head.weight');
  if (head && (head[0] !== manifest.vocab_size || head[1] !== manifest.language_model.embed_dim)) {
    throw damaged(head[0] !== manifest.vocab_size ? 'vocab_size' : 'language_model.embed_dim',
      head[0] !== manifest.vocab_size ? manifest.vocab_size : manifest.language_model.embed_dim, `the LM head is [${head.join(', ')}]`);
  }
  // Decoder layers and their attention width.
  const layer = manifest.architecture === 't5' ? /^decoder\.block\.(\d+)\./ : /^model\.decoder\.layers\.(\d+)\./;
  let layers = 0;
  for (const parameter of Object.keys(lm)) {
    const m = layer.exec(parameter);
    if (m) layers = Math.max(layers, Number(m[1]) + 1);
  }
  if (layers !== manifest.language_model.num_layers) {
    throw damaged('language_model.num_layers', manifest.language_model.num_layers, `the weights have ${layers} decoder layers`);
  }
  const q = shape(manifest.architecture === 't5' ? 'decoder.block.0.layer.0.SelfAttention.q.weight' : 'model.decoder.layers.0.self_attn.q_proj.weight');
  const width = manifest.language_model.num_heads * manifest.language_model.head_dim;
  if (q && q[0] !== width) {
    throw damaged('language_model.head_dim', manifest.language_model.head_dim,
      `num_heads x head_dim is ${width} but the attention projections are ${q[0]} wide`);
  }
}

function safeChild(dir: string, name: unknown, manifestPath: string, what: string): string {
  // Model folders are code: a manifest must not point outside its folder.
  if (typeof name !== 'string' || name.length === 0 || path.isAbsolute(name) || name.split(/[\\/]/).includes('..')) {
    throw new ModelLoadError(`'${manifestPath}' is damaged: ${what} is ${JSON.stringify(name)}; expected a file name inside the model folder`, { file: manifestPath });
  }
  return path.join(dir, name);
}

/** Reads JSON object `file` (lib's one JSON reader); null when absent and not `required`; ModelLoadError naming the file when unreadable or damaged. */
export async function readJson(file: string, required: boolean): Promise<Record<string, unknown> | null> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (e) {
    if (!required && (e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new ModelLoadError(`cannot read '${file}': ${(e as Error).message}`, { file });
  }
  try {
    const value = JSON.parse(text) as unknown;
    if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new Error('not a JSON object');
    return value as Record<string, unknown>;
  } catch (e) {
    throw new ModelLoadError(`'${file}' is damaged: ${(e as Error).message}`, { file });
  }
}

function requireNumber(manifest: Record<string, unknown>, key: string, file: string, min = 1): number {
  const value = key.split('.').reduce<unknown>((node, k) => (node as Record<string, unknown> | undefined)?.[k], manifest);
  if (!isInteger(value, min)) throw new ModelLoadError(`'${file}' is damaged: '${key}' is ${JSON.stringify(value)}; expected ${integerRange(min)}`, { file });
  return value;
}

/** Reads and checks the model folder `dir` (manifest, module hashes, safetensors headers); throws ModelLoadError naming what is missing or damaged. */
export async function readModelFolder(dir: string): Promise<ModelFolder> {
  if (typeof dir !== 'string' || dir.length === 0) throw InvalidArgumentError.of('modelDir', dir, 'a model folder path');
  const stat = await fs.stat(dir).catch(() => null);
  if (!stat?.isDirectory()) throw new ModelLoadError(`model folder '${dir}' does not exist or is not a folder`, { file: dir });
  const manifestPath = path.join(dir, 'manifest.json');
  const manifestJson = await readJson(manifestPath, false);
  if (manifestJson === null) {
    const isCheckpoint = await fs.stat(path.join(dir, 'config.json')).then(() => true, () => false);
    throw new ModelLoadError(
      isCheckpoint
        ? `'${dir}' is a Hugging Face checkpoint, not a blip2-node model folder; export it first: npx blip2 export ${dir} <model-dir>`
        : `'${manifestPath}' is missing: '${dir}' is not a blip2-node model folder (see npx blip2 export)`,
      { file: manifestPath },
    );
  }
  if (manifestJson.format !== 'blip2-node-model') {
    throw new ModelLoadError(`'${manifestPath}' is not a blip2-node manifest (format ${JSON.stringify(manifestJson.format)})`, { file: manifestPath });
  }
  if (manifestJson.format_version !== SUPPORTED_FORMAT_VERSION) {
    throw new ModelLoadError(
      `'${manifestPath}' has format_version ${JSON.stringify(manifestJson.format_version)}; this blip2-node reads version ${SUPPORTED_FORMAT_VERSION} (re-export the checkpoint)`,
      { file: manifestPath },
    );
  }
  const architecture = manifestJson.architecture;
  if (architecture !== 'opt' && architecture !== 't5' && architecture !== 'itm') {
    throw new ModelLoadError(`'${manifestPath}' is damaged: 'architecture' is ${JSON.stringify(architecture)}; expected "opt", "t5" or "itm"`, { file: manifestPath });
  }
  const numbers = ['num_query_tokens', 'qformer.hidden_size', 'qformer.num_layers'];
  if (architecture !== 'itm') {
    numbers.push('max_length', 'vocab_size', 'language_model.num_layers', 'language_model.num_heads', 'language_model.head_dim',
      'language_model.embed_dim', 'image_size.0', 'image_size.1');
  }
  if (architecture === 't5') numbers.push('max_encoder_length', 'language_model.num_encoder_layers');
  for (const key of numbers) requireNumber(manifestJson, key, manifestPath);
  if (!Array.isArray(manifestJson.classes) || !manifestJson.classes.every((c) => typeof c === 'string')) {
    throw new ModelLoadError(`'${manifestPath}' is damaged: 'classes' is ${JSON.stringify(manifestJson.classes)}; expected a list of class names`, { file: manifestPath });
  }
  const manifest = manifestJson as unknown as Manifest;
  if (!manifest.modules || typeof manifest.modules !== 'object') {
    throw new ModelLoadError(`'${manifestPath}' is damaged: no 'modules'`, { file: manifestPath });
  }
  for (const [name, module] of Object.entries(manifest.modules)) {
    const file = safeChild(dir, module?.file, manifestPath, `modules.${name}.file`);
    const fileStat = await fs.stat(file).catch(() => null);
    if (!fileStat?.isFile()) throw new ModelLoadError(`model file '${file}' (${name}) is missing`, { file });
    if (fileStat.size !== module.bytes) {
      throw new ModelLoadError(
        `model file '${file}' (${name}) is damaged: it has ${fileStat.size} bytes, the manifest says ${module.bytes}`,
        { file },
      );
    }
    // TorchScript runs code: only the exact file the exporter wrote is loaded.
    const digest = await sha256Of(file);
    if (digest !== module.sha256) {
      throw new ModelLoadError(`model file '${file}' (${name}) does not match the sha256 in the manifest (${digest} vs ${JSON.stringify(module.sha256)}): it was changed after export`, { file });
    }
    if (!module.parameters || typeof module.parameters !== 'object') {
      throw new ModelLoadError(`'${manifestPath}' is damaged: modules.${name}.parameters is missing`, { file: manifestPath });
    }
  }
  const weightFiles = manifest.weights?.files;
  if (!Array.isArray(weightFiles) || weightFiles.length === 0 || !Array.isArray(manifest.weights.keep_float32)) {
    throw new ModelLoadError(`'${manifestPath}' is damaged: 'weights' must list files and keep_float32`, { file: manifestPath });
  }
  const weights = new Map<string, WeightTensor>();
  const weightPaths: Array<{ path: string; bytes: number }> = [];
  for (const [i, entry] of weightFiles.entries()) {
    const file = safeChild(dir, entry?.file, manifestPath, `weights.files[${i}].file`);
    const fileStat = await fs.stat(file).catch(() => null);
    if (!fileStat?.isFile()) throw new ModelLoadError(`weights file '${file}' is missing`, { file });
    if (fileStat.size !== entry.bytes) {
      throw new ModelLoadError(`weights file '${file}' is damaged: it has ${fileStat.size} bytes, the manifest says ${entry.bytes}`, { file });
    }
    weightPaths.push({ path: file, bytes: entry.bytes });
    for (const tensor of await readSafetensorsHeader(file, i, fileStat.size)) {
      if (weights.has(tensor.key)) throw new ModelLoadError(`weights file '${file}' repeats tensor '${tensor.key}'`, { file });
      weights.set(tensor.key, tensor);
    }
  }
  const keepFloat32 = new Set(manifest.weights.keep_float32);
  for (const [name, module] of Object.entries(manifest.modules)) {
    for (const [parameter, key] of Object.entries(module.parameters)) {
      if (!weights.has(key)) {
        throw new ModelLoadError(`'${manifestPath}' is damaged: parameter '${parameter}' of ${name} needs weight '${key}', which no weights file holds`, { file: manifestPath });
      }
    }
  }
  checkAgainstWeights(manifest, weights, manifestPath);
  const config = (await readJson(path.join(dir, 'config.json'), false)) ?? {};
  const generationConfig = await readJson(path.join(dir, 'generation_config.json'), false);
  return {
    dir,
    manifest,
    config,
    generationConfig,
    modulePath(name: string): string {
      const module = manifest.modules[name];
      if (!module) throw new ModelLoadError(`'${manifestPath}' lists no module '${name}'`, { file: manifestPath });
      return path.join(dir, module.file);
    },
    weights,
    nativeWeights(names: string[]) {
      // Only the tensors these modules bind, each once (tied parameters share an index).
      const tensors: NativeWeights['tensors'] = [];
      const indexOf = new Map<string, number>();
      const modules: Record<string, { path: string; parameters: Array<[string, number]> }> = {};
      for (const name of names) {
        const module = manifest.modules[name];
        if (!module) throw new ModelLoadError(`'${manifestPath}' lists no module '${name}'`, { file: manifestPath });
        const parameters: Array<[string, number]> = [];
        for (const [parameter, key] of Object.entries(module.parameters)) {
          let index = indexOf.get(key);
          if (index === undefined) {
            const t = weights.get(key) as WeightTensor;
            index = tensors.length;
            indexOf.set(key, index);
            tensors.push({ ...t, keepFloat32: keepFloat32.has(key) });
          }
          parameters.push([parameter, index]);
        }
        modules[name] = { path: path.join(dir, module.file), parameters };
      }
      return { weights: { files: weightPaths, tensors }, modules };
    },
  };
}
