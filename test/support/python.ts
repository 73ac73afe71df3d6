import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

export const REPO_ROOT = path.resolve(__dirname, '..', '..');
export const CACHE_DIR = path.join(REPO_ROOT, 'test', '.cache');

/** A Python with torch: $BLIP2_PYTHON, else Debian's /usr/bin/python3, else python3. */
export function pythonWithTorch(): string {
  const candidates = [process.env.BLIP2_PYTHON, '/usr/bin/python3', 'python3'].filter((p): p is string => !!p);
  for (const python of candidates) {
    try {
      execFileSync(python, ['-c', 'import torch'], { stdio: 'ignore' });
      return python;
    } catch {
      // try the next one
    }
  }
  throw new Error(`no Python with torch found (tried ${candidates.join(', ')}); install python3-torch or set BLIP2_PYTHON`);
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
