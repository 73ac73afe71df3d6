import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { REPO_ROOT, pythonWithTorch } from './support/python';

const BUILT = path.join(REPO_ROOT, 'build', 'Release', 'blip2_node.node');

/** A package folder with the install hook and no build of its own. */
function packageCopy(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blip2-install-'));
  fs.cpSync(path.join(REPO_ROOT, 'scripts'), path.join(dir, 'scripts'), { recursive: true });
  fs.copyFileSync(path.join(REPO_ROOT, 'package.json'), path.join(dir, 'package.json'));
  fs.symlinkSync(path.join(REPO_ROOT, 'node_modules'), path.join(dir, 'node_modules'), 'dir');
  fs.mkdirSync(path.join(dir, 'prebuilds', `${process.platform}-${process.arch}`), { recursive: true });
  return dir;
}

function install(dir: string, env: Record<string, string>) {
  return spawnSync(process.execPath, [path.join(dir, 'scripts', 'install.js')], {
    cwd: dir, encoding: 'utf8', timeout: 120_000, env: { ...process.env, BLIP2_PYTHON: pythonWithTorch(), ...env },
  });
}

describe('install: prebuilt binaries are checked in a child process before they are used', function () {
  this.timeout(300_000);
  const prebuild = (dir: string) => path.join(dir, 'prebuilds', `${process.platform}-${process.arch}`, 'node.napi.node');

  it('a working prebuild is used as is (no build); .libtorch links the libtorch it was found with', () => {
    const dir = packageCopy();
    fs.copyFileSync(BUILT, prebuild(dir));
    const r = install(dir, { BLIP2_BUILD_COMMAND: 'echo SHOULD-NOT-BUILD; exit 9' });
    assert.equal(r.status, 0, r.stderr);
    assert.doesNotMatch(r.stdout + r.stderr, /SHOULD-NOT-BUILD|building the addon/);
    assert.ok(fs.existsSync(path.join(dir, '.libtorch', 'libtorch_cpu.so')));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('a broken prebuild is detected, reported, and the source build is used (then checked too)', () => {
    const dir = packageCopy();
    fs.writeFileSync(prebuild(dir), Buffer.from('this is not an ELF file'));
    // The "source build" here copies the tree's own build: what matters is that the hook chose it.
    const r = install(dir, { BLIP2_BUILD_COMMAND: `mkdir -p build/Release && cp ${JSON.stringify(BUILT)} build/Release/ && echo SOURCE-BUILD` });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /the binary at hand does not work .*building from source instead/);
    assert.match(r.stdout, /SOURCE-BUILD/);
    // A source build that does not work fails the install with the reason.
    const bad = packageCopy();
    fs.writeFileSync(prebuild(bad), Buffer.from('broken'));
    const r2 = install(bad, { BLIP2_BUILD_COMMAND: 'mkdir -p build/Release && echo broken > build/Release/blip2_node.node' });
    assert.notEqual(r2.status, 0);
    assert.match(r2.stderr, /the addon built but does not work/);
    for (const d of [dir, bad]) fs.rmSync(d, { recursive: true, force: true });
  });

  it('no libtorch: an error that names what was looked for and the one command that fixes it', () => {
    const dir = packageCopy();
    const r = install(dir, { BLIP2_PYTHON: '', VIRTUAL_ENV: '', BLIP2_SKIP_PYTHON_SETUP: '1', LIBTORCH: '' });
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /no Python with torch was found \(BLIP2_PYTHON, an active virtualenv/);
    assert.match(r.stderr, /BLIP2_SKIP_PYTHON_SETUP=1 forbids making one/);
    assert.match(r.stderr, /npm rebuild blip2-node/);
    const broken = install(dir, { BLIP2_PYTHON: '/nonexistent/python3' });
    assert.notEqual(broken.status, 0);
    assert.match(broken.stderr, /BLIP2_PYTHON=\/nonexistent\/python3 is set but it cannot import torch/);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});
