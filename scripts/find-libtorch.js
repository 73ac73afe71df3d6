#!/usr/bin/env node
'use strict';
// Finds libtorch for both build paths (CMakeLists.txt and binding.gyp call this one script, so the
// two can never disagree). Order: $LIBTORCH (an unpacked libtorch folder) → the torch of the
// Python scripts/python-env.js finds ($BLIP2_PYTHON, the active virtualenv, <package>/.venv).
// libtorch 2.x only: Debian's libtorch-dev (1.13) is not used, even when it is installed.
//
// Usage: node scripts/find-libtorch.js [--json | --field NAME | --gyp-cflags | --gyp-includes | --gyp-libs | --gyp-ldflags]

const fs = require('node:fs');
const path = require('node:path');

const { findPython, LOCAL_ENV } = require('./python-env.js');

const MIN_MAJOR = 2;

const HOW_TO_GET_ONE = [
  'blip2-node needs libtorch 2.x to build its native addon, and none was found. It looked at:',
  '  LIBTORCH (an unpacked libtorch folder), BLIP2_PYTHON, the active virtualenv (VIRTUAL_ENV), ' + LOCAL_ENV,
  'The one command that fixes it (makes ' + LOCAL_ENV + ' with the pinned torch, then builds):',
  '  node scripts/python-env.js setup && npm rebuild blip2-node',
  'Or point BLIP2_PYTHON at a Python with torch 2.x (a CUDA build of torch gives a CUDA addon),',
  'or LIBTORCH at an unpacked libtorch 2.x from pytorch.org.',
].join('\n');

function torchConfigIn(dir) {
  return dir && fs.existsSync(path.join(dir, 'TorchConfig.cmake')) ? dir : null;
}

function abiFromConfig(cmakeDir) {
  try {
    const text = fs.readFileSync(path.join(cmakeDir, 'TorchConfig.cmake'), 'utf8');
    const m = /_GLIBCXX_USE_CXX11_ABI=(\d)/.exec(text);
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

function describe(source, cmakeDir, extra = {}) {
  // TorchConfig.cmake lives in <prefix>/share/cmake/Torch (pip wheels and the libtorch zip alike).
  const root = path.resolve(cmakeDir, '..', '..', '..');
  const libDir = path.join(root, 'lib');
  if (!fs.existsSync(path.join(libDir, 'libtorch_cpu.so'))) {
    throw new Error(`${source} points at ${root}, which has no lib/libtorch_cpu.so; it is not a usable libtorch`);
  }
  const includeDirs = [path.join(root, 'include'), path.join(root, 'include', 'torch', 'csrc', 'api', 'include')]
    .filter((d) => fs.existsSync(d));
  const version = extra.version ?? null;
  const major = version ? Number(version.split('.')[0]) : null;
  if (major !== null && major < MIN_MAJOR) {
    throw new Error(`${source} has libtorch ${version}; blip2-node needs libtorch ${MIN_MAJOR}.x or newer`);
  }
  return {
    source,
    cmakeDir,
    cmakePrefix: path.resolve(cmakeDir, '..'),
    root,
    includeDirs,
    libDir,
    cxx11Abi: extra.cxx11Abi ?? abiFromConfig(cmakeDir) ?? 1,
    cuda: fs.existsSync(path.join(libDir, 'libtorch_cuda.so')),
    cudaVersion: extra.cudaVersion ?? null,
    version,
  };
}

function fromLibtorchEnv() {
  const dir = process.env.LIBTORCH;
  if (!dir) return null;
  const cmakeDir = torchConfigIn(path.join(dir, 'share', 'cmake', 'Torch'));
  if (!cmakeDir) {
    throw new Error(`LIBTORCH=${dir} is set but ${path.join(dir, 'share/cmake/Torch/TorchConfig.cmake')} does not exist; ` +
      'point LIBTORCH at an unpacked libtorch folder (the one holding include/, lib/, share/).');
  }
  let version = null;
  try { version = fs.readFileSync(path.join(dir, 'build-version'), 'utf8').trim(); } catch { /* optional */ }
  return describe('LIBTORCH', cmakeDir, { version });
}

function fromPython() {
  const found = findPython();
  if (!found) return null;
  const cmakeDir = torchConfigIn(path.join(found.cmake, 'Torch'));
  if (!cmakeDir) throw new Error(`the torch of ${found.python} (${found.source}) has no CMake files in ${found.cmake}`);
  return describe(`python ${found.python} (${found.source})`, cmakeDir,
    { cxx11Abi: found.abi, cudaVersion: found.cuda, version: found.torch });
}

function findLibtorch() {
  return fromLibtorchEnv() || fromPython();
}

module.exports = { findLibtorch, HOW_TO_GET_ONE };

if (require.main === module) {
  let found;
  try {
    found = findLibtorch();
  } catch (e) {
    process.stderr.write(`blip2-node: ${e.message}\n`);
    process.exit(1);
  }
  if (!found) {
    process.stderr.write(`${HOW_TO_GET_ONE}\n`);
    process.exit(1);
  }
  const arg = process.argv[2] || '--json';
  switch (arg) {
    case '--json': process.stdout.write(`${JSON.stringify(found, null, 2)}\n`); break;
    case '--field': process.stdout.write(`${found[process.argv[3]]}\n`); break;
    // node-gyp reads these through <!(...) expansions; one item per line.
    case '--gyp-includes': process.stdout.write(found.includeDirs.join('\n')); break;
    case '--gyp-cflags': process.stdout.write(`-D_GLIBCXX_USE_CXX11_ABI=${found.cxx11Abi}${found.cuda ? '\n-DBLIP2_WITH_CUDA=1' : ''}`); break;
    case '--gyp-libs': {
      // Full paths, not -L/-l: a system libtorch (Debian's 1.13) must never be picked up instead.
      const lib = (name) => path.join(found.libDir, `lib${name}.so`);
      const libs = [lib('torch'), lib('torch_cpu'), lib('c10')];
      if (found.cuda) libs.push('-Wl,--no-as-needed', lib('torch_cuda'), lib('c10_cuda'), '-Wl,--as-needed');
      process.stdout.write(libs.join('\n'));
      break;
    }
    // $ORIGIN is added in binding.gyp itself: gyp's <!@() splitting would strip its quotes.
    case '--gyp-ldflags': process.stdout.write(`-Wl,-rpath,${found.libDir}`); break;
    default:
      process.stderr.write(`unknown option ${arg}\n`);
      process.exit(2);
  }
}
