import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

import { REPO_ROOT } from './support/python';

describe('PIL-exact resampler (native/image/pil_resample.cc)', () => {
  it('equals Pillow 9.4 Image.resize byte for byte: random cases, all filters, filter weights, fixture images', function () {
    // The checker needs Debian's Python with Pillow 9.4 (the version transformers used for the fixtures).
    const python = '/usr/bin/python3';
    const probe = spawnSync(python, ['-c', 'import PIL, numpy; assert PIL.__version__.startswith("9.4")']);
    if (probe.status !== 0) this.skip();
    const result = spawnSync(python, [path.join(REPO_ROOT, 'native', 'image', 'test', 'check_pil_resample.py'), '--cases', '300'], {
      cwd: REPO_ROOT,
      encoding: 'utf8',
    });
    assert.equal(result.status, 0, `${result.stdout}\n${result.stderr}`);
    assert.match(result.stdout, /ALL MATCH/);
  });
});
