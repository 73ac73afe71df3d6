import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

import { resolvePython } from '../../lib/cli/export';

export const REPO_ROOT = path.resolve(__dirname, '..', '..');
export const CACHE_DIR = path.join(REPO_ROOT, 'test', '.cache');

/** The project's Python with torch (scripts/python-env.js: $BLIP2_PYTHON, VIRTUAL_ENV, .venv). */
export function pythonWithTorch(): string {
  return resolvePython();
}

/** Runs `build(out)` once per cache key and returns the cached path (test/.cache/<name>). */
export function cached(name: string, build: (out: string) => void, inputs: string[] = []): string {
  fs.mkdirSync(CACHE_DIR, { recursive: true });
  const out = path.join(CACHE_DIR, name);
  const stamp = `${out}.stamp`;
  const newestInput = Math.max(0, ...inputs.map((p) => fs.statSync(p).mtimeMs));
  if (fs.existsSync(out) && fs.existsSync(stamp) && fs.statSync(stamp).mtimeMs >= newestInput) return out;
  fs.rmSync(out, { recursive: true, force: true });
  build(out);
  fs.writeFileSync(stamp, '');
  return out;
}

export function testModulePath(): string {
  const script = path.join(REPO_ROOT, 'test', 'python', 'make_test_module.py');
  return cached('ops.pt', (out) => {
    execFileSync(pythonWithTorch(), [script, out], { stdio: 'inherit' });
  }, [script]);
}

export const FIXTURES_DIR = path.join(REPO_ROOT, 'test', 'fixtures');
export const TINY_OPT_CHECKPOINT = path.join(FIXTURES_DIR, 'tiny-opt');

/** Runs the exporter (python -m blip2_export) with `args`; throws with its stderr on failure. */
export function runExporter(args: string[]): string {
  const result = spawnSync(pythonWithTorch(), ['-m', 'blip2_export', ...args], {
    cwd: path.join(REPO_ROOT, 'export'),
    encoding: 'utf8',
  });
  if (result.status !== 0) throw new Error(`exporter failed (${result.status}): ${result.stderr}`);
  return result.stderr;
}

/** Python snippet with the exporter package importable. */
export function runPython(code: string): string {
  return execFileSync(pythonWithTorch(), ['-c', code], { cwd: path.join(REPO_ROOT, 'export'), encoding: 'utf8' });
}

/** The fixture checkpoint exported once per change of the exporter or the fixture (test/.cache). */
export function tinyOptModel(): string {
  return cached('tiny-opt-model', (out) => runExporter([TINY_OPT_CHECKPOINT, out]), exporterInputs());
}

export function exporterInputs(): string[] {
  const dir = path.join(REPO_ROOT, 'export', 'blip2_export');
  return fs.readdirSync(dir).filter((f) => f.endsWith('.py')).map((f) => path.join(dir, f))
    .concat([path.join(TINY_OPT_CHECKPOINT, 'model.safetensors'), path.join(TINY_OPT_CHECKPOINT, 'config.json')]);
}

/** A seeded 'small' random checkpoint (LM matrices >= 512x512) exported once (test/.cache). */
export function smallModel(): string {
  const checkpoint = cached('small-checkpoint', (out) => {
    runPython(`from blip2_export.tiny import write_checkpoint; write_checkpoint(${JSON.stringify(out)}, "small", 5)`);
  }, exporterInputs());
  return cached('small-model', (out) => runExporter([checkpoint, out]), [path.join(checkpoint, 'model.safetensors')]);
}

export type HfTinyKind = 'opt' | 't5' | 'itm' | 'vision-proj' | 'text-proj';

/**
 * A tiny checkpoint made by transformers 5 itself (export/blip2_export/hf_tiny.py, with its
 * reference outputs in reference.safetensors / reference.json) and its export, both cached.
 */
export function hfTinyModel(kind: HfTinyKind, seed = 5): { checkpoint: string; modelDir: string } {
  const checkpoint = cached(`hf-${kind}-${seed}-checkpoint`, (out) => {
    const result = spawnSync(pythonWithTorch(), ['-m', 'blip2_export.hf_tiny', out, '--kind', kind, '--seed', String(seed)], {
      cwd: path.join(REPO_ROOT, 'export'), encoding: 'utf8',
    });
    if (result.status !== 0) throw new Error(`hf_tiny failed (${result.status}): ${result.stderr}`);
  }, exporterInputs());
  const modelDir = cached(`hf-${kind}-${seed}-model`, (out) => runExporter([checkpoint, out]), [path.join(checkpoint, 'model.safetensors')]);
  return { checkpoint, modelDir };
}
