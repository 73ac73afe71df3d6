import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { Blip2ForConditionalGeneration } from '../lib';
import { fixtureTensor, rowsOf } from './support/fixtures';
import { REPO_ROOT, TINY_OPT_CHECKPOINT, pythonWithTorch, tinyOptModel } from './support/python';

const TSX = path.join(REPO_ROOT, 'node_modules', '.bin', 'tsx');
const CLI = path.join(REPO_ROOT, 'lib', 'cli', 'main.ts');

function blip2(args: string[], env: Record<string, string | undefined> = {}) {
  return spawnSync(TSX, [CLI, ...args], { cwd: REPO_ROOT, encoding: 'utf8', env: { ...process.env, ...env } });
}

describe('blip2 CLI', () => {
  it('export: an HF checkpoint becomes a model folder, with progress on stderr; after set-up it needs no flags or environment', () => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'blip2-cli-'));
    // No BLIP2_PYTHON, no virtualenv: the package's own environment (.venv, made at install) is used.
    const result = blip2(['export', TINY_OPT_CHECKPOINT, out, '--max-length', '64'], { BLIP2_PYTHON: undefined, VIRTUAL_ENV: undefined });
    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stderr, /scripting language model/);
    const manifest = JSON.parse(fs.readFileSync(path.join(out, 'manifest.json'), 'utf8'));
    assert.equal(manifest.max_length, 64);
    for (const file of ['image_encoder.pt', 'language_model.pt', 'tokenizer.json', 'preprocessor_config.json', 'generation_config.json']) {
      assert.ok(fs.existsSync(path.join(out, file)), file);
    }
    fs.rmSync(out, { recursive: true, force: true });
  });

  it('export: a Python without torch gets a message saying how to fix it', () => {
    const result = blip2(['export', TINY_OPT_CHECKPOINT, path.join(os.tmpdir(), 'never')], { BLIP2_PYTHON: '/nonexistent/python3' });
    assert.equal(result.status, 2);
    assert.match(result.stderr, /BLIP2_PYTHON=\/nonexistent\/python3 is set but it cannot import torch/);
    assert.match(result.stderr, /pip install torch/);
    const flag = blip2(['export', TINY_OPT_CHECKPOINT, path.join(os.tmpdir(), 'never'), '--python', '/nonexistent/python3']);
    assert.equal(flag.status, 2);
    assert.match(flag.stderr, /'\/nonexistent\/python3' was not found/);
  });

  it('export: exporter errors come back as one line with a non-zero exit', () => {
    const result = blip2(['export', path.join(REPO_ROOT, 'test'), path.join(os.tmpdir(), 'never2')], { BLIP2_PYTHON: pythonWithTorch() });
    assert.notEqual(result.status, 0);
    assert.match(result.stderr, /blip2 export: .*config\.json/);
  });

  it('caption: the bundled demo model captions the bundled image and says its weights are random', () => {
    const result = blip2(['caption', 'assets/demo.jpg', '--model', 'models/tiny-random-opt', '--json', '--max-new-tokens', '8']);
    assert.equal(result.status, 0, result.stderr);
    const [entry] = JSON.parse(result.stdout);
    assert.equal(entry.image, 'assets/demo.jpg');
    assert.equal(typeof entry.caption, 'string');
    assert.ok(entry.caption.length > 0);
    assert.match(result.stderr, /RANDOM weights/);
  });

  it('usage errors exit with 2', () => {
    assert.equal(blip2([]).status, 2);
    assert.equal(blip2(['caption', 'assets/demo.jpg']).status, 2);
    assert.equal(blip2(['frobnicate']).status, 2);
  });
});

describe('bundled demo model (models/tiny-random-opt)', () => {
  it('is the current export of the fixture checkpoint: every file byte for byte, and the same tokens', async () => {
    const bundledDir = path.join(REPO_ROOT, 'models', 'tiny-random-opt');
    const freshDir = tinyOptModel();
    const files = fs.readdirSync(bundledDir).filter((f) => f !== 'README.md').sort();
    assert.deepEqual(files, fs.readdirSync(freshDir).sort());
    for (const file of files) {
      assert.ok(fs.readFileSync(path.join(bundledDir, file)).equals(fs.readFileSync(path.join(freshDir, file))),
        `${file} differs from a fresh export (run npm run make:demo-model)`);
    }
    const bundled = await Blip2ForConditionalGeneration.fromPretrained(bundledDir);
    const fresh = await Blip2ForConditionalGeneration.fromPretrained(freshDir);
    for (const image of ['gradient', 'noise', 'shapes']) {
      const a = await rowsOf(await bundled.generate({ pixelValues: fixtureTensor(`pixel_values/${image}`) }, { maxNewTokens: 12 }));
      const b = await rowsOf(await fresh.generate({ pixelValues: fixtureTensor(`pixel_values/${image}`) }, { maxNewTokens: 12 }));
      assert.deepEqual(a, b);
    }
    assert.match(fs.readFileSync(path.join(REPO_ROOT, 'models', 'tiny-random-opt', 'README.md'), 'utf8'), /RANDOM weights/);
  });
});
