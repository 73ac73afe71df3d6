import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { Blip2ForConditionalGeneration } from '../lib';
import { fixtureTensor, rowsOf } from './support/fixtures';
import { FIXTURES_DIR, REPO_ROOT, TINY_OPT_CHECKPOINT, pythonWithTorch, tinyOptModel } from './support/python';

const TSX = path.join(REPO_ROOT, 'node_modules', '.bin', 'tsx');
const CLI = path.join(REPO_ROOT, 'lib', 'cli', 'main.ts');

function blip2(args: string[], env: Record<string, string | undefined> = {}) {
  return spawnSync(TSX, [CLI, ...args], { cwd: REPO_ROOT, encoding: 'utf8', env: { ...process.env, ...env } });
}

const shellQuote = (s: string): string => `'${s.replace(/'/g, "'\\''")}'`;

/** util-linux script(1): runs a command on a pseudo-terminal. */
function scriptAvailable(): boolean {
  return spawnSync('script', ['--version'], { encoding: 'utf8' }).status === 0;
}

/** Runs the CLI with stdout and stderr on a pseudo-terminal (script -qefc); what the terminal showed, and the exit code. */
function onPseudoTty(args: string[]): { status: number | null; output: string } {
  const command = [TSX, CLI, ...args].map(shellQuote).join(' ');
  const result = spawnSync('script', ['-qefc', command, '/dev/null'], { cwd: REPO_ROOT, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 120_000 });
  return { status: result.status, output: result.stdout + result.stderr };
}

describe('blip2 CLI', () => {
  it('export: an HF checkpoint becomes a model folder, with progress on stderr; after set-up it needs no flags or environment', () => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'blip2-cli-'));
    // No BLIP2_PYTHON, no virtualenv: the package's own environment (.venv, made at install) is used.
    const result = blip2(['export', TINY_OPT_CHECKPOINT, out, '--max-length', '64'], { BLIP2_PYTHON: undefined, VIRTUAL_ENV: undefined });
    assert.equal(result.status, 0, result.stderr);
    const manifest = JSON.parse(fs.readFileSync(path.join(out, 'manifest.json'), 'utf8'));
    assert.equal(manifest.max_length, 64);
    for (const file of ['image_encoder.pt', 'language_model.pt', 'tokenizer.json', 'preprocessor_config.json', 'generation_config.json']) {
      assert.ok(fs.existsSync(path.join(out, file)), file);
    }

    // Not a terminal: plain lines with the elapsed time, no escape sequences.
    assert.doesNotMatch(result.stderr, /\x1b\[|\r/);
    const lines = result.stderr.split('\n');
    const expectLine = (re: RegExp): void => assert.ok(lines.some((l) => re.test(l)), `no line matches ${re} in:\n${result.stderr}`);
    expectLine(/^\[\d+\.\ds\] checkpoint: 1 file\(s\), 123 tensors$/);
    const weightBytes = manifest.weights.bytes as number;
    expectLine(new RegExp(`^\\[\\d+\\.\\ds\\] weights: ${(weightBytes / 1000).toFixed(1)} kB to write in 1 file\\(s\\)$`));
    expectLine(/^\[\d+\.\ds\] wrote weights\.safetensors: weights ([\d.]+ kB) of \1 \(100%\), file 1\/1$/);
    expectLine(/^\[\d+\.\ds\] scripting image encoder$/);
    expectLine(/^\[\d+\.\ds\] scripted language model \(\d+\.\d s\)$/);
    for (const file of ['image_encoder.pt', 'language_model.pt', 'tokenizer.json', 'manifest.json']) {
      expectLine(new RegExp(`^\\[\\d+\\.\\ds\\] wrote ${file.replace('.', '\\.')} \\([\\d.]+ k?B\\)$`));
    }
    const fileCount = fs.readdirSync(out).length;
    expectLine(new RegExp(`^exported in \\d+\\.\\d s: 2 module\\(s\\) scripted, ${fileCount} file\\(s\\) written$`));

    // The summary of the manifest on stdout: what was made, every file with its bytes.
    assert.match(result.stdout, new RegExp(`^model folder ${out.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} \\(format 2\\)\n`));
    assert.match(result.stdout, /^ {2}architecture {2}opt, dtype float32, exporter [\d.]+ \(torch [\d.]+\)$/m);
    assert.match(result.stdout, /^ {2}vision {8}2 layers, hidden 48, patch 14, images 56x56$/m);
    assert.match(result.stdout, /^ {2}Q-Former {6}2 layers, hidden 32, 6 query tokens$/m);
    assert.match(result.stdout, /^ {2}language {6}2 layers, 4 heads x 12, hidden 48, vocab 392, max length 64$/m);
    if (manifest.classes) assert.match(result.stdout, /^ {2}classes {7}\S/m);
    let total = 0;
    for (const file of fs.readdirSync(out)) {
      const bytes = fs.statSync(path.join(out, file)).size;
      total += bytes;
      assert.match(result.stdout, new RegExp(`^ {4}${file.replace('.', '\\.')} +${bytes.toLocaleString('en-US')} bytes  `, 'm'));
    }
    assert.match(result.stdout, new RegExp(`^ {4}total +${total.toLocaleString('en-US')} bytes  `, 'm'));
    assert.ok(result.stdout.split('\n').length <= 30, 'the summary fits on one screen');
    fs.rmSync(out, { recursive: true, force: true });
  });

  it('export on a terminal: a weights bar, ticks for the modules scripted, the files written', function () {
    if (!scriptAvailable()) this.skip();
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'blip2-cli-tty-'));
    const result = onPseudoTty(['export', TINY_OPT_CHECKPOINT, out, '--max-length', '64']);
    assert.equal(result.status, 0, result.output);
    const screen = result.output;
    assert.match(screen, /\r\x1b\[K. starting the exporter · 0:0\d/);
    assert.match(screen, /\r\x1b\[K. weights \[█*░*\] [\d.]+ k?B\/[\d.]+ kB \d+% · file 1\/1 · 0:\d\d/);
    assert.match(screen, /\r\x1b\[K {2}✓ scripted image encoder \(\d+\.\d s\)\r?\n/);
    assert.match(screen, /\r\x1b\[K {2}✓ scripted language model \(\d+\.\d s\)\r?\n/);
    assert.match(screen, /\r\x1b\[K {2}wrote language_model\.pt \([\d.]+ kB\)\r?\n/);
    assert.match(screen, /exported in \d+\.\d s: 2 module\(s\) scripted, \d+ file\(s\) written/);
    assert.match(screen, /architecture {2}opt/);
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
    assert.deepEqual(Object.keys(entry), ['file', 'text', 'tokens', 'ms']);
    assert.equal(entry.file, 'assets/demo.jpg');
    assert.equal(typeof entry.text, 'string');
    assert.ok(entry.text.length > 0);
    assert.ok(entry.tokens >= 1 && entry.tokens <= 8);
    assert.ok(Number.isInteger(entry.ms) && entry.ms >= 0);
    assert.match(result.stderr, /RANDOM weights/);
  });

  describe('caption on a folder of good and bad images', () => {
    let dir: string;
    let missing: string;
    before(() => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blip2-caption-'));
      fs.mkdirSync(path.join(dir, 'sub', 'deeper'), { recursive: true });
      fs.copyFileSync(path.join(REPO_ROOT, 'assets', 'demo.jpg'), path.join(dir, 'a.jpg'));
      fs.copyFileSync(path.join(FIXTURES_DIR, 'images', 'gradient_64x48.png'), path.join(dir, 'sub', 'b.PNG')); // any case
      fs.copyFileSync(path.join(FIXTURES_DIR, 'images', 'shapes_200x120.jpg'), path.join(dir, 'sub', 'deeper', 'c.jpeg'));
      fs.writeFileSync(path.join(dir, 'truncated.jpg'), fs.readFileSync(path.join(REPO_ROOT, 'assets', 'demo.jpg')).subarray(0, 300));
      fs.writeFileSync(path.join(dir, 'fake.png'), 'not an image\n');
      fs.writeFileSync(path.join(dir, 'notes.txt'), 'not looked at: not an image extension\n');
      missing = path.join(dir, 'missing.jpg');
    });
    after(() => fs.rmSync(dir, { recursive: true, force: true }));

    const good = () => ['a.jpg', 'sub/b.PNG', 'sub/deeper/c.jpeg'].map((f) => path.join(dir, f));
    const bad = () => ['fake.png', 'truncated.jpg'].map((f) => path.join(dir, f));

    it('--jsonl: a row per file as it finishes, errors in their rows and on stderr, exit code 1', () => {
      const result = blip2(['caption', dir, missing, '--model', 'models/tiny-random-opt', '--jsonl', '--max-new-tokens', '6', '--batch', '2', '--concurrency', '2']);
      assert.equal(result.status, 1, result.stderr);
      const rows = result.stdout.trim().split('\n').map((line) => JSON.parse(line));
      assert.deepEqual(rows.map((r) => r.file).sort(), [...good(), ...bad(), missing].sort());
      for (const row of rows) {
        if (good().includes(row.file)) {
          assert.deepEqual(Object.keys(row), ['file', 'text', 'tokens', 'ms']);
          assert.equal(typeof row.text, 'string');
          assert.ok(row.tokens >= 1 && row.tokens <= 6, JSON.stringify(row));
        } else {
          assert.deepEqual(Object.keys(row), ['file', 'text', 'tokens', 'ms', 'error']);
          assert.equal(row.text, null);
          assert.equal(row.tokens, 0);
          assert.match(row.error, row.file === missing ? /^cannot read the file: ENOENT/ : /decoded|not a supported image format/);
          assert.doesNotMatch(row.error, /\n/);
          assert.ok(result.stderr.includes(`blip2: ${row.file}: ${row.error}\n`), result.stderr);
        }
      }
      assert.match(result.stderr, /^3 of 6 file\(s\) captioned in [\d.]+ s \([\d.]+ images\/s\) on cpu; 3 failed$/m);
    });

    it('--json: one array in argument order; batching, concurrency and --attention sdpa do not change the results; exit code 0 when all succeed', () => {
      const run = (extra: string[]) => {
        const result = blip2(['caption', ...good(), '--model', 'models/tiny-random-opt', '--json', '--max-new-tokens', '10', ...extra]);
        assert.equal(result.status, 0, result.stderr);
        return (JSON.parse(result.stdout) as Array<{ file: string; text: string; tokens: number }>).map(({ file, text, tokens }) => ({ file, text, tokens }));
      };
      const one = run(['--batch', '1', '--concurrency', '1']);
      assert.deepEqual(one.map((r) => r.file), good());
      assert.deepEqual(run(['--batch', '2', '--concurrency', '3']), one);
      // --attention sdpa: the same words (the demo model's vision outputs move by ~1e-7).
      assert.deepEqual(run(['--batch', '2', '--attention', 'sdpa']), one);
      // A quoted glob (no shell expansion) finds the same files.
      const globbed = blip2(['caption', path.join(dir, '**', '*.{jpg,jpeg,PNG}'), '--model', 'models/tiny-random-opt', '--json', '--max-new-tokens', '10']);
      assert.equal(globbed.status, 1, globbed.stderr); // truncated.jpg is matched too
      const rows = JSON.parse(globbed.stdout) as Array<{ file: string; text: string | null }>;
      assert.deepEqual(rows.map((r) => r.file).sort(), [...good(), path.join(dir, 'truncated.jpg')].sort());
      for (const r of one) assert.equal(rows.find((g) => g.file === r.file)?.text, r.text);
    });

    it('stderr not a terminal: plain progress lines, no escape sequences', () => {
      const result = blip2(['caption', dir, '--model', 'models/tiny-random-opt', '--max-new-tokens', '4', '--batch', '1', '--concurrency', '1']);
      assert.equal(result.status, 1);
      assert.doesNotMatch(result.stderr, /\x1b\[|\r/);
      assert.match(result.stderr, /^progress: 5\/5 files, [\d.]+ images\/s, ETA 0:00, 2 failed$/m);
      for (const line of result.stderr.split('\n').filter((l) => l.startsWith('progress: '))) {
        assert.match(line, /^progress: \d\/5 files, [\d.]+ images\/s, ETA (\d+:\d\d|--:--)(, \d failed)?$/);
      }
      // Without --json/--jsonl: "file: text" lines on stdout for the files that worked.
      const lines = result.stdout.trim().split('\n');
      assert.deepEqual(lines.map((l) => l.slice(0, l.indexOf(': "'))).sort(), good().sort());
    });

    it('stderr on a terminal: a progress bar with done/total, images/s and ETA, redrawn in place', function () {
      if (!scriptAvailable()) this.skip();
      const result = onPseudoTty(['caption', dir, '--model', 'models/tiny-random-opt', '--max-new-tokens', '4', '--batch', '1', '--concurrency', '1']);
      assert.equal(result.status, 1, result.output);
      const screen = result.output;
      assert.match(screen, /\r\x1b\[K. captioning \[░+\] 0\/5 · 0\.00 images\/s · ETA --:-- · 0:\d\d/);
      assert.match(screen, /\r\x1b\[K✓ captioning \[█+\] 5\/5 · [\d.]+ images\/s · ETA 0:00 · 0:\d\d · 2 failed/);
      for (let done = 1; done < 5; done++) assert.match(screen, new RegExp(`captioning \\[█+░+\\] ${done}/5 · [\\d.]+ images/s · ETA \\d+:\\d\\d`));
      // Errors and captions are printed above the bar, never glued to it.
      assert.match(screen, /\r\x1b\[Kblip2: \S+fake\.png: not a supported image format[^\r\n]*\r?\n/);
      assert.match(screen, /\r\x1b\[K\S+a\.jpg: "[^\r\n]*"\r?\n/);
      // No line is wider than the terminal (80 columns when it says 0).
      for (const line of screen.split(/\r?\n|\r\x1b\[K/)) assert.ok([...line].length <= 80 || !line.includes('captioning ['), line);
      assert.doesNotMatch(screen, /progress: /);
    });
  });

  it('usage errors exit with 2', () => {
    assert.equal(blip2([]).status, 2);
    assert.equal(blip2(['caption', 'assets/demo.jpg']).status, 2);
    assert.equal(blip2(['frobnicate']).status, 2);
    const model = ['--model', 'models/tiny-random-opt'];
    for (const args of [
      ['caption', 'assets/demo.jpg', ...model, '--batch', '0'],
      ['caption', 'assets/demo.jpg', ...model, '--concurrency', 'two'],
      ['caption', 'assets/demo.jpg', ...model, '--json', '--jsonl'],
      ['caption', 'assets/demo.jpg', ...model, '--no-such-flag', '1'],
      ['caption', 'assets/demo.jpg', ...model, '--attention', 'flash'],
      ['serve', ...model, '--attention', 'flash'],
      ['caption', path.join(REPO_ROOT, 'typings'), ...model], // a folder without images: nothing to caption
      ['caption', path.join(REPO_ROOT, 'assets', '*.nothing'), ...model],
    ]) {
      const result = blip2(args);
      assert.equal(result.status, 2, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, /^blip2: /);
    }
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
