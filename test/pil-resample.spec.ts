import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { REPO_ROOT, pythonWithTorch } from './support/python';

describe('PIL-exact resampler (native/image/pil_resample.cc)', () => {
  it("equals Pillow's Image.resize byte for byte: random cases, all filters, filter weights, fixture images", function () {
    // The project environment's Pillow (export/requirements.txt, 12.3); Pillow 9.4, which made the
    // transformers fixtures, was checked equal as well, and the fixture pixel values pin it down.
    this.timeout(300_000);
    const python = pythonWithTorch();
    const result = spawnSync(python, [path.join(REPO_ROOT, 'native', 'image', 'test', 'check_pil_resample.py'), '--cases', '300'], {
      cwd: REPO_ROOT,
      encoding: 'utf8',
    });
    assert.equal(result.status, 0, `${result.stdout}\n${result.stderr}`);
    assert.match(result.stdout, /ALL MATCH/);
  });
});
