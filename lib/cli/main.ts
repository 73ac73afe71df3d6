#!/usr/bin/env node
// The `blip2` command: export checkpoints, caption images, serve a model over HTTP.
import { Blip2Error } from '../errors';
import { packageRoot } from '../native/binding';
import { integerRange, isInteger } from '../validation';
import { versions } from '../runtime/device';
import { CaptionUsageError, runCaption } from './caption';
import { ExportDisplay, manifestSummary } from './export-display';
import { ExportError, exportCheckpoint } from './export';
import { IMAGE_EXTENSIONS } from './files';
import { runServe } from './serve';
import { DEFAULT_MAX_BODY_BYTES } from '../server/server';

const DEFAULT_BATCH = 8;
const DEFAULT_CONCURRENCY = 2;

const USAGE = `blip2 — BLIP-2 for Node.js

Usage:
  blip2 export <hf-checkpoint-dir> <model-dir> [--dtype float32|float16|bfloat16] [--max-length N] [--python PATH]
      Turns a Hugging Face BLIP-2 OPT checkpoint (model.safetensors, sharded safetensors or
      pytorch_model.bin) into a model folder. Needs Python 3 with torch (--python, $BLIP2_PYTHON, python3).
      Shows the weights written, the modules scripted and the files written, then a summary.
  blip2 caption <file|folder|glob>... --model <model-dir> [--prompt TEXT] [--json | --jsonl]
                [--batch N] [--concurrency N] [--max-new-tokens N] [--num-beams N] [--device cpu|cuda[:N]]
                [--attention eager|sdpa]
      Captions images (or answers --prompt about them, e.g. --prompt "Question: what is shown? Answer:").
      Folders are searched recursively for ${IMAGE_EXTENSIONS.join(', ')} files.
      --json: one JSON array at the end; --jsonl: one JSON line per file as it finishes; each
      { file, text, tokens, ms } (and error for a file that failed). Otherwise lines "file: text".
      --batch N: images per generate call (default ${DEFAULT_BATCH}); --concurrency N: calls in flight
      (default ${DEFAULT_CONCURRENCY}); --device: default cpu; --max-new-tokens, --num-beams: default the
      model's generation_config.json; --attention: the vision model's (default eager; sdpa is faster,
      within float rounding). A file that cannot be read or decoded is reported and the run
      goes on. Exit status: 0 all captioned, 1 some failed, 2 usage error.
  blip2 serve --model <model-dir> [--port 8080] [--host 127.0.0.1] [--device cpu|cuda[:N]] [--allow-local-images DIR]
              [--max-batch-size N] [--max-queue N] [--max-length N] [--max-body-bytes N] [--max-image-pixels N]
              [--request-timeout S] [--shutdown-timeout S] [--model-name NAME] [--attention eager|sdpa]
      Serves the model over HTTP with OpenAI's chat completions API (POST /v1/chat/completions, one
      image per request as a data: URL; streaming with "stream": true), GET /v1/models, GET /health
      and GET /metrics (Prometheus). --port 0 picks a free port. --allow-local-images DIR: image URLs
      may also be paths or file: URLs of files inside DIR. --max-batch-size: sequences decoded
      together (default 16); --max-queue: requests waiting for them before 429 (default 1024);
      --max-body-bytes: default ${DEFAULT_MAX_BODY_BYTES} (413 above); --max-image-pixels: default 100000000;
      --request-timeout S: stop a request after S seconds (504; default none); --shutdown-timeout S:
      on SIGTERM/SIGINT requests in flight get S seconds to finish (default 30), then are cancelled;
      --attention: the vision model's (default eager; sdpa is faster, within float rounding).
  blip2 version
`;

/** Flags each command takes; `true`: a switch without a value. */
const FLAGS: Record<string, Record<string, boolean>> = {
  export: { dtype: false, 'max-length': false, python: false },
  caption: {
    model: false, prompt: false, device: false, 'max-new-tokens': false, 'num-beams': false, batch: false, concurrency: false,
    json: true, jsonl: true, attention: false,
  },
  serve: {
    model: false, port: false, host: false, device: false, 'allow-local-images': false, 'max-batch-size': false, 'max-queue': false,
    'max-length': false, 'max-body-bytes': false, 'max-image-pixels': false, 'request-timeout': false, 'shutdown-timeout': false,
    'model-name': false, attention: false,
  },
};

interface Parsed {
  positional: string[];
  flags: Map<string, string | true>;
}

function parse(command: string, argv: string[]): Parsed {
  const known = FLAGS[command] ?? {};
  const positional: string[] = [];
  const flags = new Map<string, string | true>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (a === '-h' || a === '--help') {
      flags.set('help', true);
    } else if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = a.slice(2, eq < 0 ? undefined : eq);
      if (!(name in known)) throw new UsageError(`unknown option --${name}${command in FLAGS ? ` for ${command}` : ''}`);
      if (known[name]) {
        if (eq >= 0) throw new UsageError(`--${name} takes no value`);
        flags.set(name, true);
      } else if (eq >= 0) flags.set(name, a.slice(eq + 1));
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

function intFlag(p: Parsed, name: string, min = 1): number | undefined {
  const v = flag(p, name);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === '' || !isInteger(n, min)) throw new UsageError(`--${name} must be ${integerRange(min)}, got '${v}'`);
  return n;
}

/** A duration flag in seconds (fractions allowed), as milliseconds. */
function secondsFlag(p: Parsed, name: string): number | undefined {
  const v = flag(p, name);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || n < 0) throw new UsageError(`--${name} must be a number of seconds >= 0, got '${v}'`);
  return Math.round(n * 1000);
}

function attentionFlag(p: Parsed): 'eager' | 'sdpa' | undefined {
  const v = flag(p, 'attention');
  if (v !== undefined && v !== 'eager' && v !== 'sdpa') throw new UsageError(`--attention must be eager or sdpa, got '${v}'`);
  return v;
}

async function runServeCommand(p: Parsed): Promise<number> {
  const modelDir = flag(p, 'model');
  if (!modelDir) throw new UsageError('serve needs --model <model-dir>');
  if (p.positional.length > 0) throw new UsageError(`serve takes no positional arguments, got '${p.positional[0]}'`);
  const port = intFlag(p, 'port', 0);
  if (port !== undefined && port > 65535) throw new UsageError(`--port must be from 0 to 65535, got '${port}'`);
  const requestTimeoutMs = secondsFlag(p, 'request-timeout');
  return runServe({
    modelDir,
    modelName: flag(p, 'model-name'),
    host: flag(p, 'host'),
    port,
    device: flag(p, 'device'),
    allowLocalImages: flag(p, 'allow-local-images'),
    maxBatchSize: intFlag(p, 'max-batch-size'),
    maxQueue: intFlag(p, 'max-queue', 0),
    maxLength: intFlag(p, 'max-length'),
    maxBodyBytes: intFlag(p, 'max-body-bytes'),
    maxImagePixels: intFlag(p, 'max-image-pixels'),
    requestTimeoutMs: requestTimeoutMs || undefined,
    shutdownTimeoutMs: secondsFlag(p, 'shutdown-timeout') ?? 30_000,
    attention: attentionFlag(p),
  });
}

async function runExport(p: Parsed): Promise<void> {
  const [checkpoint, out, extra] = p.positional;
  if (!checkpoint || !out) throw new UsageError('export needs <hf-checkpoint-dir> and <model-dir>');
  if (extra !== undefined) throw new UsageError(`export takes two folders, got also '${extra}'`);
  const dtype = flag(p, 'dtype');
  if (dtype !== undefined && !['float32', 'float16', 'bfloat16'].includes(dtype)) throw new UsageError(`--dtype must be float32, float16 or bfloat16, got '${dtype}'`);
  process.stderr.write(`blip2 export: ${checkpoint} → ${out}\n`);
  const display = new ExportDisplay(process.stderr, out);
  const onSigint = (): void => {
    display.finish(false);
    process.exit(130);
  };
  process.once('SIGINT', onSigint);
  try {
    await exportCheckpoint(checkpoint, out, {
      dtype: dtype as 'float32' | undefined,
      maxLength: intFlag(p, 'max-length'),
      python: flag(p, 'python'),
      onProgress: (line) => display.line(line),
    });
  } catch (e) {
    display.finish(false);
    throw e;
  } finally {
    process.removeListener('SIGINT', onSigint);
  }
  display.finish(true);
  process.stdout.write(manifestSummary(out));
}

async function runCaptionCommand(p: Parsed): Promise<number> {
  const modelDir = flag(p, 'model');
  if (p.positional.length === 0) throw new UsageError('caption needs at least one image, folder or pattern');
  if (!modelDir) throw new UsageError('caption needs --model <model-dir>');
  if (p.flags.has('json') && p.flags.has('jsonl')) throw new UsageError('--json and --jsonl exclude each other');
  try {
    return await runCaption({
      inputs: p.positional,
      modelDir,
      prompt: flag(p, 'prompt') ?? '',
      device: flag(p, 'device') ?? 'cpu',
      batch: intFlag(p, 'batch') ?? DEFAULT_BATCH,
      concurrency: intFlag(p, 'concurrency') ?? DEFAULT_CONCURRENCY,
      maxNewTokens: intFlag(p, 'max-new-tokens'),
      numBeams: intFlag(p, 'num-beams'),
      output: p.flags.has('json') ? 'json' : p.flags.has('jsonl') ? 'jsonl' : 'text',
      attention: attentionFlag(p),
    });
  } catch (e) {
    if (e instanceof CaptionUsageError) throw new UsageError(e.message);
    throw e;
  }
}

export async function main(argv: string[]): Promise<number> {
  try {
    const command = argv[0];
    const parsed = parse(command, argv.slice(1));
    if (!command || command === 'help' || command === '--help' || command === '-h' || parsed.flags.has('help')) {
      process.stdout.write(USAGE);
      return command ? 0 : 2;
    }
    switch (command) {
      case 'export': await runExport(parsed); return 0;
      case 'caption': return await runCaptionCommand(parsed);
      case 'serve': return await runServeCommand(parsed);
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
