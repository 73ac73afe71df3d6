import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { REPO_ROOT, pythonWithTorch } from './support/python';

describe('exporter (Python unit tests in export/tests)', () => {
  it('our PyTorch modules and their TorchScript exports equal transformers on the fixtures; loaders, CLI, tiny maker', () => {
    const result = spawnSync(pythonWithTorch(), ['-m', 'unittest', 'discover', '-s', path.join('export', 'tests')], {
      cwd: REPO_ROOT,
      encoding: 'utf8',
    });
    assert.equal(result.status, 0, `${result.stdout}\n${result.stderr}`);
    assert.match(result.stderr, /\nOK/);
  });
});
