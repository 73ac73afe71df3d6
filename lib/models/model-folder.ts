// Reads and checks a blip2-node model folder (the exporter's output; format in export/README.md)
// before any native code touches it, so a missing or damaged file is named precisely.
import * as fs from 'node:fs/promises';
import * as path from 'node:path';

import { InvalidArgumentError, ModelLoadError } from '../errors';

export interface ManifestModule {
  file: string;
  bytes: number;
  methods: Record<string, { inputs: string[]; outputs: string[] }>;
}

export interface Manifest {
  format: 'blip2-node-model';
  format_version: 1;
  architecture: 'opt' | 't5' | 'itm';
  dtype: 'float32' | 'float16' | 'bfloat16';
  exporter: { version: string; torch: string };
  num_query_tokens: number;
  image_token_index: number | null;
  image_size: [number, number];
  max_length: number;
  vocab_size: number;
  special_tokens: {
    bos_token_id: number | null;
    eos_token_id: number[] | null;
    pad_token_id: number | null;
    decoder_start_token_id: number | null;
  };
  language_model: { num_layers: number; num_heads: number; head_dim: number; hidden_size: number; embed_dim: number; max_position_embeddings: number };
  vision: { hidden_size: number; num_layers: number; patch_size: number; num_positions: number };
  qformer: { hidden_size: number; num_layers: number };
  modules: Record<string, ManifestModule>;
}

export interface ModelFolder {
  dir: string;
  manifest: Manifest;
  /** config.json of the checkpoint (Blip2Config), or {} when absent. */
  config: Record<string, unknown>;
  /** generation_config.json, or null when absent. */
  generationConfig: Record<string, unknown> | null;
  modulePath(name: string): string;
}

const SUPPORTED_FORMAT_VERSION = 1;

async function readJson(file: string, required: boolean): Promise<Record<string, unknown> | null> {
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
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min) {
    throw new ModelLoadError(`'${file}' is damaged: '${key}' is ${JSON.stringify(value)}; expected an integer >= ${min}`, { file });
  }
  return value;
}

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
  for (const key of ['num_query_tokens', 'max_length', 'vocab_size', 'language_model.num_layers', 'language_model.num_heads',
    'language_model.head_dim', 'language_model.embed_dim', 'image_size.0', 'image_size.1']) {
    requireNumber(manifestJson, key, manifestPath);
  }
  const manifest = manifestJson as unknown as Manifest;
  if (!manifest.modules || typeof manifest.modules !== 'object') {
    throw new ModelLoadError(`'${manifestPath}' is damaged: no 'modules'`, { file: manifestPath });
  }
  for (const [name, module] of Object.entries(manifest.modules)) {
    const file = path.join(dir, module.file);
    const fileStat = await fs.stat(file).catch(() => null);
    if (!fileStat?.isFile()) throw new ModelLoadError(`model file '${file}' (${name}) is missing`, { file });
    if (fileStat.size !== module.bytes) {
      throw new ModelLoadError(
        `model file '${file}' (${name}) is damaged: it has ${fileStat.size} bytes, the manifest says ${module.bytes}`,
        { file },
      );
    }
  }
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
  };
}
