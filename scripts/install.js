#!/usr/bin/env node
'use strict';
// npm install hook.
//   1. Find libtorch 2.x — $LIBTORCH, or the torch of the Python scripts/python-env.js finds or
//      makes (<package>/.venv; opt out with BLIP2_SKIP_PYTHON_SETUP=1) — and link its lib folder
//      as <package>/.libtorch, where a prebuild's rpath looks.
//   2. Use an existing build or a matching prebuild only if it passes a check in a child process
//      (load it, make a tensor, run one op), as node-llama-cpp tests its binaries before use.
//   3. Otherwise build from source with cmake-js (BLIP2_BUILD_COMMAND replaces that command, for
//      tests of this script), and check the result the same way.
const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.join(__dirname, '..');

/** null when the binary node-gyp-build would load works; else why not. */
function checkBinary() {
  const code = `
    const b = require(require('node-gyp-build').resolve(${JSON.stringify(root)}));
    const t = b.NativeTensor.fromData(new Float32Array([1, 2, 3]), [3], undefined, undefined);
    t.to(undefined, 'float64').then(async (u) => {
      const a = await u.toArray();
      if (a[2] !== 3) throw new Error('wrong result ' + a);
      process.stdout.write('ok ' + b.versions().libtorch);
    }).catch((e) => { console.error(e.message); process.exit(1); });`;
  const r = spawnSync(process.execPath, ['-e', code], { cwd: root, encoding: 'utf8', timeout: 120000, env: { ...process.env, BLIP2_ADDON: '' } });
  if (r.status === 0 && r.stdout.startsWith('ok')) return null;
  return (r.stderr || r.stdout || `exit code ${r.status}`).trim().split('\n').slice(-3).join(' | ');
}

/** <package>/.libtorch → the libtorch lib folder (replaced when it points elsewhere). */
function linkLibtorch(libDir) {
  const link = path.join(root, '.libtorch');
  try {
    if (fs.readlinkSync(link) === libDir) return;
    fs.unlinkSync(link);
  } catch {
    // absent
  }
  try {
    fs.symlinkSync(libDir, link, 'dir');
  } catch (e) {
    process.stderr.write(`blip2-node: cannot link ${link} → ${libDir} (${e.message}); prebuilds will not find libtorch\n`);
  }
}

function main() {
  const { findLibtorch, HOW_TO_GET_ONE } = require('./find-libtorch.js');
  let found;
  try {
    if (!process.env.LIBTORCH) require('./python-env.js').setup();
    found = findLibtorch();
  } catch (e) {
    process.stderr.write(`\nblip2-node: ${e.message}\n\n`);
    return 1;
  }
  if (!found) {
    process.stderr.write(`\n${HOW_TO_GET_ONE}\n\n`);
    return 1;
  }
  linkLibtorch(found.libDir);
  if (process.env.BLIP2_FORCE_BUILD !== '1') {
    const problem = checkBinary();
    if (problem === null) return 0;
    if (!/Could not locate|No native build was found/.test(problem)) {
      process.stderr.write(`blip2-node: the binary at hand does not work with libtorch ${found.version ?? ''} from ${found.source} ` +
        `(${problem}); building from source instead\n`);
    }
  }
  process.stderr.write(`blip2-node: building the addon against libtorch ${found.version ?? ''} from ${found.source}\n`);
  const command = process.env.BLIP2_BUILD_COMMAND;
  const result = command
    ? spawnSync(command, { cwd: root, stdio: 'inherit', shell: true })
    : spawnSync(process.execPath, [require.resolve('cmake-js/bin/cmake-js'), 'compile', '--out', 'build'], { cwd: root, stdio: 'inherit' });
  if (result.status !== 0) return result.status ?? 1;
  const problem = checkBinary();
  if (problem !== null) {
    process.stderr.write(`blip2-node: the addon built but does not work: ${problem}\n`);
    return 1;
  }
  return 0;
}

process.exit(main());
