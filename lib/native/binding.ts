// Loads the addon (a local build/Release first, then prebuilds/) and connects its errors to ours.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isMainThread } from 'node:worker_threads';

import type { NativeBinding } from '../../typings/binding';
import { errorFromNative } from '../errors';

/** The package root, whether we run from lib/ (tsx) or dist/lib/ (compiled). */
export function packageRoot(): string {
  let dir = __dirname;
  for (;;) {
    const manifest = path.join(dir, 'package.json');
    if (fs.existsSync(manifest)) {
      try {
        if (JSON.parse(fs.readFileSync(manifest, 'utf8')).name === 'blip2-node') return dir;
      } catch {
        // keep walking up
      }
    }
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error('blip2-node: cannot find the package root above ' + __dirname);
    dir = parent;
  }
}

function load(): NativeBinding {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const nodeGypBuild = require('node-gyp-build') as (dir: string) => unknown;
  let binding: NativeBinding;
  // BLIP2_ADDON: a specific build of the addon (CI runs the tests on a CUDA build this way).
  const explicit = process.env.BLIP2_ADDON;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    binding = (explicit ? require(path.resolve(explicit)) : nodeGypBuild(packageRoot())) as NativeBinding;
  } catch (e) {
    const message = (e as Error).message;
    throw new Error(
      `blip2-node: the native addon ${explicit ? `BLIP2_ADDON=${explicit} ` : ''}could not be loaded (${message}).\n` +
        'Rebuild it with `npm rebuild blip2-node`; it needs libtorch 2.x: the install makes the package\'s own Python ' +
        'environment with torch, or set BLIP2_PYTHON to a Python with torch, or LIBTORCH=/path/to/libtorch.',
      { cause: e },
    );
  }
  binding.setErrorFactory(errorFromNative);
  // process.exit(), an uncaught exception and the natural end all emit 'exit' before the C
  // runtime's exit handlers: park the executor threads there, while libtorch is still whole.
  // (A worker's own environment is closed by the addon's cleanup hook instead.)
  if (isMainThread) process.once('exit', () => binding.shutdownForExit());
  return binding;
}

export const binding: NativeBinding = load();
