// `blip2 export`: runs the Python exporter (export/blip2_export) on a Hugging Face checkpoint.
import { spawn, spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { InvalidArgumentError } from '../errors';
import { packageRoot } from '../native/binding';

export interface ExportOptions {
  dtype?: 'float32' | 'float16' | 'bfloat16';
  maxLength?: number;
  /** The Python with torch: this, else $BLIP2_PYTHON, else python3. */
  python?: string;
  /** Receives the exporter's progress lines ("loading weights 1/3 ...", "scripting language model"...). */
  onProgress?: (line: string) => void;
}

export class ExportError extends Error {
  constructor(message: string, readonly exitCode: number) {
    super(message);
    this.name = 'ExportError';
  }
}

export function resolvePython(explicit?: string): string {
  return explicit ?? process.env.BLIP2_PYTHON ?? 'python3';
}

/** Throws an ExportError saying how to get torch when `python` cannot import it. */
export function checkPythonHasTorch(python: string): string {
  const probe = spawnSync(python, ['-c', 'import torch, sys; print(torch.__version__)'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) {
    const why = probe.error ? (probe.error as NodeJS.ErrnoException).code === 'ENOENT' ? 'was not found' : probe.error.message : 'cannot import torch';
    throw new ExportError(
      `Python '${python}' ${why}. The exporter needs Python 3 with torch:\n` +
        '  - Debian/Ubuntu: apt-get install python3-torch, then use --python /usr/bin/python3 (or BLIP2_PYTHON=/usr/bin/python3)\n' +
        '  - pip: pip install torch (a CUDA build exports for GPUs too)\n' +
        'Point --python or BLIP2_PYTHON at that interpreter.',
      2,
    );
  }
  return probe.stdout.trim();
}

/** Exports `checkpointDir` into `modelDir`; resolves when the model folder is complete. */
export function exportCheckpoint(checkpointDir: string, modelDir: string, options: ExportOptions = {}): Promise<void> {
  if (typeof checkpointDir !== 'string' || !checkpointDir) throw InvalidArgumentError.of('checkpointDir', checkpointDir, 'a folder path');
  if (typeof modelDir !== 'string' || !modelDir) throw InvalidArgumentError.of('modelDir', modelDir, 'a folder path');
  const python = resolvePython(options.python);
  checkPythonHasTorch(python);
  const args = ['-m', 'blip2_export', path.resolve(checkpointDir), path.resolve(modelDir)];
  if (options.dtype) args.push('--dtype', options.dtype);
  if (options.maxLength !== undefined) args.push('--max-length', String(options.maxLength));
  const exportDir = path.join(packageRoot(), 'export');
  return new Promise((resolve, reject) => {
    const child = spawn(python, args, {
      cwd: exportDir,
      env: { ...process.env, PYTHONPATH: [exportDir, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter) },
      stdio: ['ignore', 'inherit', 'pipe'],
    });
    let errors = '';
    let pending = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk: string) => {
      pending += chunk;
      let newline;
      while ((newline = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, newline);
        pending = pending.slice(newline + 1);
        if (line.startsWith('progress: ')) options.onProgress?.(line.slice('progress: '.length));
        else errors += `${line}\n`;
      }
    });
    child.on('error', (e) => reject(new ExportError(`cannot run '${python}': ${e.message}`, 2)));
    child.on('close', (code) => {
      errors += pending;
      if (code === 0) resolve();
      else reject(new ExportError(errors.trim().replace(/^error: /, '') || `the exporter exited with code ${code}`, code ?? 1));
    });
  });
}
