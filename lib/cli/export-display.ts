// What `blip2 export` shows while the exporter runs (its `progress:` lines, export/blip2_export) and
// the summary of the model folder it made.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { StatusLine, type StatusStream, formatBytes, formatCount, formatDuration, withBar } from './progress';

interface FileStamp {
  size: number;
  mtimeMs: number;
}

function listFiles(dir: string): Map<string, FileStamp> {
  const files = new Map<string, FileStamp>();
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return files;
  }
  for (const name of names) {
    if (name.endsWith('.tmp')) continue; // being written; renamed when complete
    try {
      const stat = fs.statSync(path.join(dir, name));
      if (stat.isFile()) files.set(name, { size: stat.size, mtimeMs: stat.mtimeMs });
    } catch {
      // removed meanwhile
    }
  }
  return files;
}

/**
 * Turns the exporter's progress lines into a display: on a TTY a status line (weights bar with
 * bytes written / total, the current step, elapsed time) with finished steps and written files
 * above it; otherwise one plain line per event, prefixed with the elapsed time.
 */
export class ExportDisplay {
  readonly #status: StatusLine;
  readonly #outDir: string;
  readonly #started = performance.now();
  #known: Map<string, FileStamp>;
  #step = 'starting the exporter';
  #stepStarted = performance.now();
  #weights: { done: number; total: number; files: number; written: number } | null = null;
  #modulesScripted = 0;
  #filesWritten = 0;

  constructor(stream: StatusStream, outDir: string, options: { tty?: boolean } = {}) {
    this.#outDir = outDir;
    this.#known = listFiles(outDir); // a re-export: files already there count once rewritten
    this.#status = new StatusLine(stream, (spin, width) => this.#render(spin, width), { tty: options.tty });
    this.#status.update(true);
  }

  get tty(): boolean {
    return this.#status.tty;
  }

  /** One progress line of the exporter, without its `progress: ` prefix. */
  line(text: string): void {
    if (!text.startsWith('weights ')) {
      // Any other line ends the step before it: report that, then the files it wrote.
      this.#endScripting();
      this.#noteWrittenFiles();
    }
    let m: RegExpMatchArray | null;
    if ((m = text.match(/^checkpoint: (\d+) file\(s\), (\d+) tensors$/))) {
      this.#log(`checkpoint: ${m[1]} file(s), ${formatCount(Number(m[2]))} tensors`);
      this.#setStep('planning the weights');
    } else if ((m = text.match(/^weights to write: (\d+) bytes in (\d+) file\(s\)$/))) {
      this.#weights = { done: 0, total: Number(m[1]), files: Number(m[2]), written: 0 };
      this.#log(`weights: ${formatBytes(this.#weights.total)} to write in ${m[2]} file(s)`);
      this.#setStep('writing weights');
    } else if ((m = text.match(/^weights written (\d+)\/(\d+) bytes \((.+)\)$/))) {
      const done = Number(m[1]);
      const total = Number(m[2]);
      const w = (this.#weights ??= { done: 0, total, files: 0, written: 0 });
      w.done = done;
      w.total = total;
      w.written++;
      const of = w.files > 0 ? `${w.written}/${w.files}` : `${w.written}`;
      const percent = total > 0 ? ` (${Math.floor((done / total) * 100)}%)` : '';
      this.#log(`wrote ${m[3]}: weights ${formatBytes(done)} of ${formatBytes(total)}${percent}, file ${of}`);
      const stamp = listFiles(this.#outDir).get(m[3]);
      if (stamp) this.#known.set(m[3], stamp);
      this.#filesWritten++;
      this.#setStep(done >= total ? 'weights written' : 'writing weights');
    } else if ((m = text.match(/^scripting (.+)$/))) {
      this.#setStep(`scripting ${m[1]}`);
      if (!this.tty) this.#log(text);
    } else if (text === 'copying side files') {
      this.#setStep('copying side files');
    } else if (text === 'done') {
      this.#setStep('done');
    } else {
      this.#log(text);
    }
    this.#status.update(true);
  }

  /** Stops the status line; `ok` says whether the export succeeded. */
  finish(ok: boolean): void {
    if (ok) {
      this.#endScripting();
      this.#noteWrittenFiles();
    }
    this.#status.stop(!ok);
    const seconds = ((performance.now() - this.#started) / 1000).toFixed(1);
    if (ok) {
      this.#status.log(`exported in ${seconds} s: ${this.#modulesScripted} module(s) scripted, ${this.#filesWritten} file(s) written`);
    }
  }

  #setStep(step: string): void {
    this.#step = step;
    this.#stepStarted = performance.now();
  }

  #endScripting(): void {
    if (!this.#step.startsWith('scripting ')) return;
    this.#modulesScripted++;
    this.#step = this.#step.replace(/^scripting/, 'scripted');
    this.#log(`${this.tty ? '✓ ' : ''}${this.#step} (${((performance.now() - this.#stepStarted) / 1000).toFixed(1)} s)`);
  }

  /** Logs the files of the output folder that are new or rewritten since the last look. */
  #noteWrittenFiles(): void {
    const now = listFiles(this.#outDir);
    // In the order they were written (the progress lines may arrive several at once).
    for (const [name, stamp] of [...now].sort(([a, x], [b, y]) => x.mtimeMs - y.mtimeMs || (a < b ? -1 : 1))) {
      // Weights files are reported by their own progress line ("weights written ...").
      if (/^weights(-\d+-of-\d+)?\.safetensors$/.test(name) && this.#weights !== null) continue;
      const before = this.#known.get(name);
      if (before && before.size === stamp.size && before.mtimeMs === stamp.mtimeMs) continue;
      this.#filesWritten++;
      this.#log(`wrote ${name} (${formatBytes(stamp.size)})`);
    }
    this.#known = now;
  }

  #log(text: string): void {
    this.#status.log(this.tty ? `  ${text}` : `[${((performance.now() - this.#started) / 1000).toFixed(1)}s] ${text}`);
  }

  #render(spin: string, width: number): string {
    const elapsed = formatDuration(performance.now() - this.#started);
    const w = this.#weights;
    if (w && this.#step === 'writing weights') {
      const file = w.files > 0 ? ` · file ${Math.min(w.written + 1, w.files)}/${w.files}` : '';
      const fraction = w.total > 0 ? w.done / w.total : 0;
      return withBar(`${spin} weights {bar} ${formatBytes(w.done)}/${formatBytes(w.total)} ${Math.floor(fraction * 100)}%${file} · ${elapsed}`, fraction, width);
    }
    const modules = this.#modulesScripted > 0 ? ` · ${this.#modulesScripted} module(s) scripted` : '';
    return `${spin} ${this.#step}${modules} · ${elapsed}`;
  }
}

interface ManifestLike {
  format_version?: number;
  architecture?: string;
  dtype?: string;
  classes?: unknown;
  exporter?: { version?: string; torch?: string };
  num_query_tokens?: number;
  image_size?: [number, number];
  max_length?: number;
  vocab_size?: number;
  language_model?: Record<string, unknown>;
  vision?: Record<string, unknown>;
  qformer?: Record<string, unknown>;
  weights?: { bytes?: number; files?: Array<{ file: string; bytes: number }> };
  modules?: Record<string, { file: string; bytes: number; methods?: Record<string, unknown> }>;
}

function layersOf(part: Record<string, unknown> | undefined): string {
  if (!part) return '?';
  const { num_layers: layers, num_encoder_layers: enc, num_decoder_layers: dec } = part as Record<string, number | undefined>;
  if (enc !== undefined || dec !== undefined) return `${enc ?? '?'} encoder + ${dec ?? '?'} decoder layers`;
  return `${layers ?? '?'} layers`;
}

/** A one-screen summary of the model folder at `modelDir` (its manifest.json and its files). */
export function manifestSummary(modelDir: string): string {
  const manifest = JSON.parse(fs.readFileSync(path.join(modelDir, 'manifest.json'), 'utf8')) as ManifestLike;
  const lines: string[] = [];
  const row = (label: string, value: string): void => {
    lines.push(`  ${label.padEnd(14)}${value}`);
  };
  lines.push(`model folder ${modelDir} (format ${manifest.format_version ?? '?'})`);
  row('architecture', `${manifest.architecture ?? '?'}, dtype ${manifest.dtype ?? '?'}` +
    (manifest.exporter ? `, exporter ${manifest.exporter.version ?? '?'} (torch ${manifest.exporter.torch ?? '?'})` : ''));
  if (manifest.classes !== undefined && manifest.classes !== null) {
    const classes = Array.isArray(manifest.classes) ? manifest.classes.map(String) : typeof manifest.classes === 'object' ? Object.keys(manifest.classes) : [String(manifest.classes)];
    row('classes', classes.join(', '));
  }
  const v = manifest.vision as Record<string, number> | undefined;
  if (v) {
    const size = manifest.image_size ? `, images ${manifest.image_size[0]}x${manifest.image_size[1]}` : '';
    row('vision', `${layersOf(v)}, hidden ${v.hidden_size ?? '?'}, patch ${v.patch_size ?? '?'}${size}`);
  }
  const q = manifest.qformer as Record<string, number> | undefined;
  if (q) row('Q-Former', `${layersOf(q)}, hidden ${q.hidden_size ?? '?'}, ${manifest.num_query_tokens ?? '?'} query tokens`);
  const lm = manifest.language_model as Record<string, number> | undefined;
  if (lm) {
    row('language', `${layersOf(lm)}, ${lm.num_heads ?? '?'} heads x ${lm.head_dim ?? '?'}, hidden ${lm.hidden_size ?? '?'}, ` +
      `vocab ${manifest.vocab_size !== undefined ? formatCount(manifest.vocab_size) : '?'}, max length ${manifest.max_length ?? '?'}`);
  }
  if (manifest.modules) {
    row('modules', Object.entries(manifest.modules).map(([name, m]) => `${name} (${Object.keys(m.methods ?? {}).length} methods)`).join(', '));
  }
  if (manifest.weights?.bytes !== undefined) {
    row('weights', `${formatBytes(manifest.weights.bytes)} of tensors in ${manifest.weights.files?.length ?? '?'} file(s)`);
  }
  const files = [...listFiles(modelDir)].sort(([a], [b]) => (a < b ? -1 : 1));
  const width = Math.max(...files.map(([name]) => name.length), 4);
  const numbers = files.map(([, s]) => formatCount(s.size));
  const numberWidth = Math.max(...numbers.map((n) => n.length), 1);
  lines.push('  files');
  files.forEach(([name, stamp], i) => lines.push(`    ${name.padEnd(width)}  ${numbers[i].padStart(numberWidth)} bytes  ${formatBytes(stamp.size)}`));
  const total = files.reduce((sum, [, s]) => sum + s.size, 0);
  lines.push(`    ${'total'.padEnd(width)}  ${formatCount(total).padStart(numberWidth)} bytes  ${formatBytes(total)}`);
  return `${lines.join('\n')}\n`;
}
