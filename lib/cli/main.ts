#!/usr/bin/env node
// The `blip2` command: export checkpoints, caption images.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { Blip2Error } from '../errors';
import { Blip2ForConditionalGeneration } from '../models/blip2/modeling-blip2';
import { packageRoot } from '../native/binding';
import { Blip2Processor } from '../processing';
import { versions } from '../runtime/device';
import { ExportError, exportCheckpoint } from './export';

const USAGE = `blip2 — BLIP-2 for Node.js

Usage:
  blip2 export <hf-checkpoint-dir> <model-dir> [--dtype float32|float16|bfloat16] [--max-length N] [--python PATH]
      Turns a Hugging Face BLIP-2 OPT checkpoint (model.safetensors, sharded safetensors or
      pytorch_model.bin) into a model folder. Needs Python 3 with torch (--python, $BLIP2_PYTHON, python3).
  blip2 caption <image>... --model <model-dir> [--prompt TEXT] [--device cpu|cuda[:N]]
                [--max-new-tokens N] [--num-beams N] [--json]
      Captions images (or answers --prompt about them), e.g. --prompt "Question: what is shown? Answer:".
  blip2 version
`;

interface Parsed {
  positional: string[];
  flags: Map<string, string | true>;
}

function parse(argv: string[]): Parsed {
  const positional: string[] = [];
  const flags = new Map<string, string | true>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('--')) {
      const [name, inline] = a.slice(2).split('=', 2);
      if (inline !== undefined) flags.set(name, inline);
      else if (['json', 'help'].includes(name)) flags.set(name, true);
      else if (i + 1 < argv.length) flags.set(name, argv[++i]);
      else throw new UsageError(`--${name} needs a value`);
    } else {
      positional.push(a);
    }
  }
  return { positional, flags };
}

class UsageError extends Error {}

function flag(p: Parsed, name: string): string | undefined {
  const v = p.flags.get(name);
  return typeof v === 'string' ? v : undefined;
}

function intFlag(p: Parsed, name: string): number | undefined {
  const v = flag(p, name);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n)) throw new UsageError(`--${name} must be an integer, got '${v}'`);
  return n;
}

async function runExport(p: Parsed): Promise<void> {
  const [checkpoint, out] = p.positional;
  if (!checkpoint || !out) throw new UsageError('export needs <hf-checkpoint-dir> and <model-dir>');
  const dtype = flag(p, 'dtype');
  if (dtype !== undefined && !['float32', 'float16', 'bfloat16'].includes(dtype)) throw new UsageError(`--dtype must be float32, float16 or bfloat16, got '${dtype}'`);
  const started = Date.now();
  await exportCheckpoint(checkpoint, out, {
    dtype: dtype as 'float32' | undefined,
    maxLength: intFlag(p, 'max-length'),
    python: flag(p, 'python'),
    onProgress: (line) => process.stderr.write(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${line}\n`),
  });
  process.stderr.write(`exported ${checkpoint} → ${out}\n`);
}

async function runCaption(p: Parsed): Promise<void> {
  const images = p.positional;
  const modelDir = flag(p, 'model');
  if (images.length === 0) throw new UsageError('caption needs at least one image');
  if (!modelDir) throw new UsageError('caption needs --model <model-dir>');
  const device = flag(p, 'device') ?? 'cpu';
  const [processor, model] = await Promise.all([
    Blip2Processor.fromPretrained(modelDir),
    Blip2ForConditionalGeneration.fromPretrained(modelDir, { device }),
  ]);
  const prompt = flag(p, 'prompt') ?? '';
  const started = performance.now();
  const inputs = await processor.process({ images, text: images.map(() => prompt), padding: 'longest', device, dtype: model.dtype });
  const sequences = await model.generate(inputs, { maxNewTokens: intFlag(p, 'max-new-tokens'), numBeams: intFlag(p, 'num-beams') });
  // The sequences start with the prompt; the caption is what follows it.
  const promptLength = inputs.inputIds.shape[1];
  const rows = (await sequences.toArray()) as BigInt64Array;
  const width = sequences.shape[1];
  const captions = images.map((_, i) => processor.decode(Array.from(rows.subarray(i * width + promptLength, (i + 1) * width), Number), { skipSpecialTokens: true }));
  const ms = performance.now() - started;
  if (p.flags.get('json')) {
    process.stdout.write(`${JSON.stringify(images.map((image, i) => ({ image, caption: captions[i] })))}\n`);
  } else {
    images.forEach((image, i) => process.stdout.write(`${image}: ${JSON.stringify(captions[i])}\n`));
    process.stderr.write(`${images.length} image(s) in ${ms.toFixed(0)} ms on ${model.device}\n`);
  }
  const manifestNote = path.join(modelDir, 'README.md');
  if (fs.existsSync(manifestNote) && /RANDOM weights/.test(fs.readFileSync(manifestNote, 'utf8'))) {
    process.stderr.write('note: this model has RANDOM weights (a demo), so its captions are gibberish.\n');
  }
  model.dispose();
}

export async function main(argv: string[]): Promise<number> {
  let parsed: Parsed;
  try {
    parsed = parse(argv.slice(1));
    const command = argv[0];
    if (!command || command === 'help' || parsed.flags.has('help')) {
      process.stdout.write(USAGE);
      return command ? 0 : 2;
    }
    switch (command) {
      case 'export': await runExport(parsed); return 0;
      case 'caption': await runCaption(parsed); return 0;
      case 'version': process.stdout.write(`blip2-node ${versions.package} (libtorch ${versions.libtorch}, CUDA ${versions.cuda ?? 'none'}, ${packageRoot()})\n`); return 0;
      default: throw new UsageError(`unknown command '${command}'`);
    }
  } catch (e) {
    if (e instanceof UsageError) {
      process.stderr.write(`blip2: ${e.message}\n\n${USAGE}`);
      return 2;
    }
    if (e instanceof ExportError) {
      process.stderr.write(`blip2 export: ${e.message}\n`);
      return e.exitCode || 1;
    }
    if (e instanceof Blip2Error) {
      process.stderr.write(`blip2: ${e.name} (${e.code}): ${e.message}\n`);
      return 1;
    }
    throw e;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (e: unknown) => {
    process.stderr.write(`blip2: ${(e as Error).stack ?? String(e)}\n`);
    process.exitCode = 1;
  });
}
