#!/usr/bin/env node
'use strict';
// Finds libtorch for both build paths (CMakeLists.txt and binding.gyp call this one script, so the
// two can never disagree). Order: $LIBTORCH (an unpacked libtorch folder) → the Python torch of
// $BLIP2_PYTHON or python3 (torch.utils.cmake_prefix_path) → the system's (Debian libtorch-dev).
//
// Usage: node scripts/find-libtorch.js [--json | --field NAME | --gyp-cflags | --gyp-includes | --gyp-libs | --gyp-ldflags]

const fs = require('node:fs');
const path = require('node:path');
const { execFileSync } = require('node:child_process');

const HOW_TO_GET_ONE = [
  'blip2-node needs libtorch to build its native addon, and none was found.',
  'Get one of these:',
  '  - Debian/Ubuntu:  apt-get install -y libtorch-dev libopenblas0-pthread   (CPU)',
  '  - a Python torch: pip install torch   then  export BLIP2_PYTHON=$(which python3)   (CUDA builds of torch give a CUDA addon)',
  '  - an unpacked libtorch from pytorch.org:  export LIBTORCH=/path/to/libtorch',
  'Then run the install again (npm rebuild blip2-node).',
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

function libDirOf(prefix) {
  const candidates = [path.join(prefix, 'lib'), path.join(prefix, 'lib', 'x86_64-linux-gnu'),
    path.join(prefix, 'lib', 'aarch64-linux-gnu'), '/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu'];
  return candidates.find((d) => fs.existsSync(path.join(d, 'libtorch_cpu.so'))) || null;
}

function describe(source, cmakeDir, extra = {}) {
  // TorchConfig.cmake lives in <prefix>/share/cmake/Torch (pip, libtorch zip) or
  // <prefix>/lib/<triplet>/cmake/Torch (Debian); its own rule is "four levels up".
  const prefix = path.resolve(cmakeDir, '..', '..', '..', '..');
  const sharePrefix = path.resolve(cmakeDir, '..', '..', '..');
  const root = fs.existsSync(path.join(sharePrefix, 'include', 'torch')) ? sharePrefix : prefix;
  const libDir = libDirOf(root);
  if (!libDir) return null;
  const includeDirs = [path.join(root, 'include'), path.join(root, 'include', 'torch', 'csrc', 'api', 'include')]
    .filter((d) => fs.existsSync(d));
  const cuda = fs.existsSync(path.join(libDir, 'libtorch_cuda.so'));
  return {
    source,
    cmakeDir,
    cmakePrefix: path.resolve(cmakeDir, '..'),
    root,
    includeDirs,
    libDir,
    cxx11Abi: extra.cxx11Abi ?? abiFromConfig(cmakeDir) ?? 1,
    cuda,
    cudaVersion: extra.cudaVersion ?? null,
    version: extra.version ?? null,
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
  const python = process.env.BLIP2_PYTHON || 'python3';
  const code = 'import json, torch, torch.utils\n' +
    'print(json.dumps({"cmake": torch.utils.cmake_prefix_path, "abi": int(torch._C._GLIBCXX_USE_CXX11_ABI),' +
    ' "cuda": torch.version.cuda, "version": torch.__version__}))';
  let info;
  try {
    info = JSON.parse(execFileSync(python, ['-c', code], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 60000 }));
  } catch {
    if (process.env.BLIP2_PYTHON) {
      throw new Error(`BLIP2_PYTHON=${python} is set but it cannot import torch; install torch for it or unset BLIP2_PYTHON.`);
    }
    return null;
  }
  const cmakeDir = torchConfigIn(path.join(info.cmake, 'Torch'));
  if (!cmakeDir) return null; // Debian's python3-torch has no cmake files; the system libtorch-dev does
  return describe(`python (${python})`, cmakeDir, { cxx11Abi: info.abi, cudaVersion: info.cuda, version: info.version });
}

function fromSystem() {
  const dirs = ['/usr/lib/x86_64-linux-gnu/cmake/Torch', '/usr/lib/aarch64-linux-gnu/cmake/Torch',
    '/usr/local/share/cmake/Torch', '/usr/share/cmake/Torch', '/usr/local/lib/cmake/Torch', '/usr/lib/cmake/Torch'];
  for (const d of dirs) {
    if (torchConfigIn(d)) {
      let version = null;
      try {
        const text = fs.readFileSync(path.join(d, 'TorchConfigVersion.cmake'), 'utf8');
        version = (/PACKAGE_VERSION "([^"]+)"/.exec(text) || [])[1] || null;
      } catch { /* optional */ }
      const found = describe('system', d, { version });
      if (found) return found;
    }
  }
  return null;
}

function findLibtorch() {
  return fromLibtorchEnv() || fromPython() || fromSystem();
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
  const rpath = [found.libDir];
  switch (arg) {
    case '--json': process.stdout.write(`${JSON.stringify(found, null, 2)}\n`); break;
    case '--field': process.stdout.write(`${found[process.argv[3]]}\n`); break;
    // node-gyp reads these through <!(...) expansions; one item per line.
    case '--gyp-includes': process.stdout.write(found.includeDirs.join('\n')); break;
    case '--gyp-cflags': process.stdout.write(`-D_GLIBCXX_USE_CXX11_ABI=${found.cxx11Abi}${found.cuda ? '\n-DBLIP2_WITH_CUDA=1' : ''}`); break;
    case '--gyp-libs': {
      const libs = ['-ltorch', '-ltorch_cpu', '-lc10'];
      if (found.cuda) libs.push('-Wl,--no-as-needed', '-ltorch_cuda', '-lc10_cuda', '-Wl,--as-needed');
      process.stdout.write([`-L${found.libDir}`, ...libs].join('\n'));
      break;
    }
    // $ORIGIN is added in binding.gyp itself: gyp's <!@() splitting would strip its quotes.
    case '--gyp-ldflags': process.stdout.write(rpath.map((d) => `-Wl,-rpath,${d}`).join('\n')); break;
    default:
      process.stderr.write(`unknown option ${arg}\n`);
      process.exit(2);
  }
}
