// `blip2 caption`: many files, batched and pipelined, with per-file errors that do not stop the run.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { Blip2Error, ImageDecodeError, InvalidArgumentError } from '../errors';
import { Blip2ForConditionalGeneration } from '../models/blip2/modeling-blip2';
import { Blip2Processor } from '../processing';
import { expandInputs } from './files';
import { StatusLine, type StatusStream, formatDuration, withBar } from './progress';

export interface CaptionCliOptions {
  /** Files, folders and glob patterns. */
  inputs: string[];
  modelDir: string;
  /** '' captions; a prompt asks a question ("Question: ... Answer:"). */
  prompt: string;
  device: string;
  /** Images per generate call. */
  batch: number;
  /** Generate calls in flight at once (the next batch is decoded while one generates). */
  concurrency: number;
  maxNewTokens?: number;
  numBeams?: number;
  output: 'text' | 'json' | 'jsonl';
  /** The vision model's attention (fromPretrained's); default 'eager'. */
  attention?: 'eager' | 'sdpa';
}

/** One row of --json / --jsonl. */
export interface CaptionRow {
  /** The path as given (a folder's files: joined to the folder as given). */
  file: string;
  /** The caption or answer (trimmed), null when the file failed. */
  text: string | null;
  /** New tokens generated, the end-of-sequence token included. */
  tokens: number;
  /** Wall time of the batch the file was in (read, decode, preprocess, generate), in ms. */
  ms: number;
  /** Why the file failed; absent when it did not. */
  error?: string;
}

export interface CaptionIo {
  stdout: { write(text: string): boolean };
  stderr: StatusStream;
}

/** Thrown for a run that cannot start: no files to work on. The CLI exits with 2. */
export class CaptionUsageError extends Error {}

interface Entry {
  index: number;
  file: string;
  bytes?: Buffer;
}

/** Runs the captioning; resolves to the exit code (0: every file captioned, 1: some failed). */
export async function runCaption(options: CaptionCliOptions, io: CaptionIo = { stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  const { files, empty } = await expandInputs(options.inputs);
  for (const what of empty) io.stderr.write(`blip2: warning: ${what}\n`);
  if (files.length === 0) throw new CaptionUsageError('no images to caption');

  const loadStarted = performance.now();
  const loading = new StatusLine(io.stderr, (spin) => `${spin} loading ${options.modelDir} on ${options.device} · ${formatDuration(performance.now() - loadStarted)}`);
  loading.update(true);
  let processor: Blip2Processor;
  let model: Blip2ForConditionalGeneration;
  try {
    [processor, model] = await Promise.all([
      Blip2Processor.fromPretrained(options.modelDir),
      Blip2ForConditionalGeneration.fromPretrained(options.modelDir, { device: options.device, attention: options.attention }),
    ]);
  } finally {
    loading.stop(false);
  }
  try {
    return await captionFiles(files, processor, model, options, io);
  } finally {
    model.dispose();
  }
}

async function captionFiles(files: string[], processor: Blip2Processor, model: Blip2ForConditionalGeneration, options: CaptionCliOptions, io: CaptionIo): Promise<number> {
  const total = files.length;
  const rows: CaptionRow[] = new Array(total);
  let done = 0;
  let failed = 0;
  const started = performance.now();
  const elapsed = (): number => performance.now() - started;
  const rate = (): number => (done > 0 ? done / (elapsed() / 1000) : 0);
  const eta = (): string => (done > 0 && done < total ? formatDuration(((total - done) / rate()) * 1000) : done >= total ? '0:00' : '--:--');
  const failedNote = (): string => (failed > 0 ? ` · ${failed} failed` : '');

  const status = new StatusLine(io.stderr, (spin, width) => withBar(
    `${done < total ? spin : '✓'} captioning {bar} ${done}/${total} · ${rate().toFixed(2)} images/s · ETA ${eta()} · ${formatDuration(elapsed())}${failedNote()}`,
    done / total, width));
  // Off a terminal: a plain progress line per finished batch, at most every 2 s, and the last one.
  let lastPlain = 0;
  const plainProgress = (force: boolean): void => {
    if (status.tty || (!force && performance.now() - lastPlain < 2000)) return;
    lastPlain = performance.now();
    status.log(`progress: ${done}/${total} files, ${rate().toFixed(2)} images/s, ETA ${eta()}${failed > 0 ? `, ${failed} failed` : ''}`);
  };
  const onSigint = (): void => {
    status.stop();
    io.stderr.write(`blip2: interrupted after ${done}/${total} files\n`);
    process.exit(130);
  };
  process.once('SIGINT', onSigint);
  status.update(true);

  const finish = (entry: Entry, text: string | null, tokens: number, ms: number, error?: string): void => {
    const row: CaptionRow = { file: entry.file, text, tokens, ms: Math.round(ms) };
    if (error !== undefined) row.error = error;
    rows[entry.index] = row;
    entry.bytes = undefined;
    done++;
    if (error !== undefined) {
      failed++;
      status.log(`blip2: ${entry.file}: ${error}`);
    }
    if (options.output === 'jsonl') {
      status.clear();
      io.stdout.write(`${JSON.stringify(row)}\n`);
    } else if (options.output === 'text' && text !== null) {
      status.clear();
      io.stdout.write(`${entry.file}: ${JSON.stringify(text)}\n`);
    }
    status.update(true);
  };

  const eos = new Set<number>([...(model.manifest.special_tokens.eos_token_id ?? []), ...toIds(model.generationConfig?.eos_token_id)]);

  /** One generate call for `entries` (all readable): texts and token counts, in order. */
  const generate = async (entries: Entry[]): Promise<Array<{ text: string; tokens: number }>> => {
    const inputs = await processor.process({
      images: entries.map((e) => e.bytes!), text: options.prompt, padding: 'longest', device: model.device, dtype: model.dtype,
    });
    try {
      const sequences = await model.generate(inputs, { maxNewTokens: options.maxNewTokens, numBeams: options.numBeams });
      try {
        const ids = (await sequences.toArray()) as BigInt64Array;
        const width = sequences.shape[1];
        const promptLength = inputs.inputIds.shape[1];
        return entries.map((_, i) => {
          const fresh = Array.from(ids.subarray(i * width + promptLength, (i + 1) * width), Number);
          const end = fresh.findIndex((id) => eos.has(id));
          return { text: processor.decode(fresh, { skipSpecialTokens: true }).trim(), tokens: end < 0 ? fresh.length : end + 1 };
        });
      } finally {
        sequences.dispose();
      }
    } finally {
      inputs.pixelValues.dispose();
      inputs.inputIds.dispose();
      inputs.attentionMask.dispose();
    }
  };

  /** Captions readable entries; a failing image is taken out (and reported) and the rest retried. */
  const captionReadable = async (entries: Entry[], since: number): Promise<void> => {
    let pending = entries;
    while (pending.length > 0) {
      try {
        const out = await generate(pending);
        const ms = performance.now() - since;
        pending.forEach((e, i) => finish(e, out[i].text, out[i].tokens, ms));
        return;
      } catch (error) {
        if (!(error instanceof Blip2Error)) throw error; // a bug: stop
        const index = (error as ImageDecodeError | InvalidArgumentError).index;
        if ((error instanceof ImageDecodeError || error instanceof InvalidArgumentError) && typeof index === 'number' && index >= 0 && index < pending.length) {
          finish(pending[index], null, 0, performance.now() - since, describeError(error));
          pending = pending.filter((_, i) => i !== index);
        } else if (pending.length > 1) {
          // Not one image's fault as far as we can tell (e.g. out of memory): each on its own.
          for (const entry of pending) await captionReadable([entry], performance.now());
          return;
        } else {
          finish(pending[0], null, 0, performance.now() - since, describeError(error));
          return;
        }
      }
    }
  };

  const captionBatch = async (batch: Entry[]): Promise<void> => {
    const since = performance.now();
    const readable: Entry[] = [];
    await Promise.all(batch.map(async (entry) => {
      try {
        entry.bytes = await fs.promises.readFile(entry.file);
        readable.push(entry);
      } catch (error) {
        const e = error as NodeJS.ErrnoException;
        finish(entry, null, 0, performance.now() - since, `cannot read the file: ${oneLine(e.message)}`);
      }
    }));
    readable.sort((a, b) => a.index - b.index);
    await captionReadable(readable, since);
  };

  const batches: Entry[][] = [];
  for (let i = 0; i < total; i += options.batch) {
    batches.push(files.slice(i, i + options.batch).map((file, j) => ({ index: i + j, file })));
  }
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < batches.length) {
      await captionBatch(batches[next++]);
      plainProgress(false);
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(options.concurrency, batches.length) }, worker));
  } finally {
    process.removeListener('SIGINT', onSigint);
    plainProgress(true);
    status.stop();
  }

  if (options.output === 'json') io.stdout.write(`${JSON.stringify(rows)}\n`);
  const seconds = elapsed() / 1000;
  io.stderr.write(`${done - failed} of ${total} file(s) captioned in ${seconds.toFixed(1)} s (${rate().toFixed(2)} images/s) on ${model.device}` +
    `${failed > 0 ? `; ${failed} failed` : ''}\n`);
  const readme = path.join(options.modelDir, 'README.md');
  if (fs.existsSync(readme) && /RANDOM weights/.test(fs.readFileSync(readme, 'utf8'))) {
    io.stderr.write('note: this model has RANDOM weights (a demo), so its captions are gibberish.\n');
  }
  return failed > 0 ? 1 : 0;
}

function toIds(value: unknown): number[] {
  if (typeof value === 'number') return [value];
  return Array.isArray(value) ? value.filter((v): v is number => typeof v === 'number') : [];
}

/** The error's message without the batch position (the CLI names the file instead). */
function describeError(error: Blip2Error): string {
  return oneLine(error.message.replace(/^image at index \d+: /, ''));
}

/** libvips reports a line per warning, often the same ones again: each once, on one line. */
function oneLine(message: string): string {
  return [...new Set(message.split('\n').map((l) => l.trim()).filter(Boolean))].join('; ');
}
