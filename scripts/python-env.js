#!/usr/bin/env node
'use strict';
// The one owner of "which Python": the build (its torch gives the addon's libtorch), `blip2 export`,
// the tests and the benchmarks all ask this script. Order:
//   1. $BLIP2_PYTHON (must import torch);
//   2. the active virtualenv ($VIRTUAL_ENV, when it has torch);
//   3. the project-local environment <package>/.venv (made by `setup`, below).
// `setup` makes that environment when none of them is there: `python3 -m venv .venv`, then pip
// installs export/requirements.txt (the pinned torch, safetensors for the exporter, transformers,
// tokenizers and Pillow for the reference tests). BLIP2_SKIP_PYTHON_SETUP=1 opts out.
//
// Usage: node scripts/python-env.js [find | setup | setup-cuda | check]   (find prints the interpreter's path)
const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const ROOT = path.join(__dirname, '..');
const LOCAL_ENV = path.join(ROOT, '.venv');
const REQUIREMENTS = path.join(ROOT, 'export', 'requirements.txt');
const PROBE = 'import json, torch, torch.utils; print(json.dumps({"torch": torch.__version__, "cmake": torch.utils.cmake_prefix_path, ' +
  '"cuda": torch.version.cuda, "abi": int(torch._C._GLIBCXX_USE_CXX11_ABI)}))';

class PythonEnvError extends Error {}

function binOf(envDir) {
  return process.platform === 'win32' ? path.join(envDir, 'Scripts', 'python.exe') : path.join(envDir, 'bin', 'python');
}

/** torch's version and cmake prefix as `python` sees them, or null when it cannot import torch. */
function probe(python) {
  const r = spawnSync(python, ['-c', PROBE], { encoding: 'utf8', timeout: 120000 });
  if (r.error || r.status !== 0) return null;
  try {
    return JSON.parse(r.stdout.trim().split('\n').pop());
  } catch {
    return null;
  }
}

/** { python, source, torch } for the first candidate with torch, or null. Throws when an explicit one is broken. */
function findPython() {
  const explicit = process.env.BLIP2_PYTHON;
  if (explicit) {
    const info = probe(explicit);
    if (!info) {
      throw new PythonEnvError(`BLIP2_PYTHON=${explicit} is set but it cannot import torch; install torch for it ` +
        `(${explicit} -m pip install torch) or unset BLIP2_PYTHON.`);
    }
    return { python: explicit, source: 'BLIP2_PYTHON', ...info };
  }
  const candidates = [];
  if (process.env.VIRTUAL_ENV) candidates.push({ python: binOf(process.env.VIRTUAL_ENV), source: `virtualenv ${process.env.VIRTUAL_ENV}` });
  candidates.push({ python: binOf(LOCAL_ENV), source: `project environment ${LOCAL_ENV}` });
  for (const c of candidates) {
    if (!fs.existsSync(c.python)) continue;
    const info = probe(c.python);
    if (info) return { ...c, ...info };
  }
  return null;
}

/** pip's index arguments: $BLIP2_PIP_INDEX_URL, else the machine's configured indexes as primary (a local
 * wheel store must not sit behind an unreachable PyPI that pip retries for minutes), else pip's defaults. */
function pipIndexArgs(python) {
  if (process.env.BLIP2_PIP_INDEX_URL) return ['--index-url', process.env.BLIP2_PIP_INDEX_URL];
  const get = (key) => {
    const r = spawnSync(python, ['-m', 'pip', 'config', 'get', key], { encoding: 'utf8' });
    return r.status === 0 ? r.stdout.trim().split(/\s+/).filter(Boolean) : [];
  };
  const primary = get('global.index-url');
  if (primary.length > 0) return [];
  const extra = get('global.extra-index-url');
  if (extra.length === 0) return [];
  return ['--index-url', extra[0], ...extra.slice(1).flatMap((u) => ['--extra-index-url', u])];
}

function run(cmd, args, what) {
  process.stderr.write(`blip2-node: ${what}\n  $ ${[cmd, ...args].join(' ')}\n`);
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'inherit', 'inherit'] });
  if (r.error || r.status !== 0) {
    throw new PythonEnvError(`${what} failed (${r.error ? r.error.message : `exit code ${r.status}`}).`);
  }
}

const HOW_TO_FIX = [
  'Fix it with one of:',
  `  - let blip2-node make its own environment: install Python 3 with venv support (Debian: apt-get install python3-venv), then rerun: npm rebuild blip2-node`,
  '  - use your own: python3 -m venv env && env/bin/pip install torch safetensors, then BLIP2_PYTHON=$PWD/env/bin/python npm rebuild blip2-node',
  '  - use an unpacked libtorch for the build only: LIBTORCH=/path/to/libtorch npm rebuild blip2-node (blip2 export then needs BLIP2_PYTHON)',
].join('\n');

/** Finds a Python with torch, or makes <package>/.venv with export/requirements.txt. Returns findPython()'s result. */
function setup() {
  const found = findPython();
  if (found) return found;
  if (process.env.BLIP2_SKIP_PYTHON_SETUP === '1') {
    throw new PythonEnvError('no Python with torch was found (BLIP2_PYTHON, an active virtualenv, ' +
      `${LOCAL_ENV}) and BLIP2_SKIP_PYTHON_SETUP=1 forbids making one.\n${HOW_TO_FIX}`);
  }
  const base = process.env.BLIP2_BASE_PYTHON || 'python3';
  process.stderr.write(`blip2-node: no Python with torch found (looked at BLIP2_PYTHON, VIRTUAL_ENV, ${LOCAL_ENV}); ` +
    `making a project environment with ${base} (opt out: BLIP2_SKIP_PYTHON_SETUP=1)\n`);
  try {
    if (!fs.existsSync(binOf(LOCAL_ENV))) run(base, ['-m', 'venv', LOCAL_ENV], `creating ${LOCAL_ENV}`);
    const python = binOf(LOCAL_ENV);
    run(python, ['-m', 'pip', 'install', '--disable-pip-version-check', '--no-input', ...pipIndexArgs(python), '-r', REQUIREMENTS],
      `installing ${path.relative(ROOT, REQUIREMENTS)} into ${LOCAL_ENV}`);
  } catch (e) {
    throw new PythonEnvError(`${e.message}\n${HOW_TO_FIX}`);
  }
  const made = findPython();
  if (!made) throw new PythonEnvError(`${LOCAL_ENV} was made but its Python cannot import torch.\n${HOW_TO_FIX}`);
  return made;
}

/** .venv-cuda with export/requirements-cuda.txt (--no-deps): for a CUDA-enabled build; returns its Python. */
function setupCuda() {
  const envDir = path.join(ROOT, '.venv-cuda');
  const python = binOf(envDir);
  if (fs.existsSync(python) && probe(python)) return python;
  const base = process.env.BLIP2_BASE_PYTHON || 'python3';
  if (!fs.existsSync(python)) run(base, ['-m', 'venv', envDir], `creating ${envDir}`);
  run(python, ['-m', 'pip', 'install', '--disable-pip-version-check', '--no-input', '--no-deps', ...pipIndexArgs(python),
    '-r', path.join(ROOT, 'export', 'requirements-cuda.txt')], `installing export/requirements-cuda.txt into ${envDir}`);
  if (!probe(python)) throw new PythonEnvError(`${envDir} was made but its Python cannot import torch`);
  return python;
}

module.exports = { findPython, setup, setupCuda, probe, PythonEnvError, LOCAL_ENV, REQUIREMENTS };

if (require.main === module) {
  const command = process.argv[2] || 'find';
  try {
    if (command === 'find') {
      const found = findPython();
      if (!found) throw new PythonEnvError(`no Python with torch found (BLIP2_PYTHON, VIRTUAL_ENV, ${LOCAL_ENV}); run: node scripts/python-env.js setup`);
      process.stdout.write(`${found.python}\n`);
    } else if (command === 'setup') {
      const found = setup();
      process.stderr.write(`blip2-node: Python ${found.python} (${found.source}), torch ${found.torch}\n`);
      process.stdout.write(`${found.python}\n`);
    } else if (command === 'setup-cuda') {
      process.stdout.write(`${setupCuda()}\n`);
    } else if (command === 'check') {
      process.stdout.write(`${JSON.stringify(findPython(), null, 2)}\n`);
    } else {
      throw new PythonEnvError(`unknown command '${command}' (find, setup, setup-cuda or check)`);
    }
  } catch (e) {
    process.stderr.write(`blip2-node: ${e.message}\n`);
    process.exit(1);
  }
}
