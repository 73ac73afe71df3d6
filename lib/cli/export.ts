// `blip2 export`: runs the Python exporter (export/blip2_export) on a Hugging Face checkpoint.
import { spawn, spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { InvalidArgumentError } from '../errors';
import { packageRoot } from '../native/binding';

export interface ExportOptions {
  dtype?: 'float32' | 'float16' | 'bfloat16';
  maxLength?: number;
  /** The Python with torch: this, else what scripts/python-env.js finds. */
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

interface PythonEnv {
  findPython(): { python: string; source: string; torch: string } | null;
}

/** scripts/python-env.js: the one owner of which Python runs the exporter (and builds the addon). */
function pythonEnv(): PythonEnv {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return require(path.join(packageRoot(), 'scripts', 'python-env.js')) as PythonEnv;
}

/**
 * The exporter's Python: `explicit`, else what scripts/python-env.js finds ($BLIP2_PYTHON, the active
 * virtualenv, the package's own .venv made at install). Throws an ExportError saying how to get one.
 */
export function resolvePython(explicit?: string): string {
  if (explicit !== undefined) {
    checkPythonHasTorch(explicit);
    return explicit;
  }
  let found;
  try {
    found = pythonEnv().findPython();
  } catch (e) {
    throw new ExportError((e as Error).message, 2);
  }
  if (!found) {
    throw new ExportError(
      'no Python with torch was found (BLIP2_PYTHON, an active virtualenv, or the package\'s own .venv). ' +
        `Make the package's environment with: node ${path.join(packageRoot(), 'scripts', 'python-env.js')} setup ` +
        '(or pass --python / set BLIP2_PYTHON to a Python with torch 2.x and safetensors).',
      2,
    );
  }
  return found.python;
}

/** Throws an ExportError saying how to get torch when `python` cannot import it. */
function checkPythonHasTorch(python: string): void {
  const probe = spawnSync(python, ['-c', 'import torch, safetensors'], { encoding: 'utf8' });
  if (probe.error || probe.status !== 0) {
    const why = probe.error ? (probe.error as NodeJS.ErrnoException).code === 'ENOENT' ? 'was not found' : probe.error.message : 'cannot import torch and safetensors';
    throw new ExportError(
      `Python '${python}' ${why}. The exporter needs Python 3 with torch 2.x and safetensors ` +
        `(${python} -m pip install torch safetensors), or drop --python to use the package's own environment.`,
      2,
    );
  }
}

/** Exports `checkpointDir` into `modelDir`; resolves when the model folder is complete. */
export function exportCheckpoint(checkpointDir: string, modelDir: string, options: ExportOptions = {}): Promise<void> {
  if (typeof checkpointDir !== 'string' || !checkpointDir) throw InvalidArgumentError.of('checkpointDir', checkpointDir, 'a folder path');
  if (typeof modelDir !== 'string' || !modelDir) throw InvalidArgumentError.of('modelDir', modelDir, 'a folder path');
  const python = resolvePython(options.python);
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
