#!/usr/bin/env node
'use strict';
// npm install hook: use a matching prebuild (prebuilds/) or an existing local build when it
// loads; otherwise build from source with cmake-js against the libtorch find-libtorch.js finds.
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.join(__dirname, '..');

function loadsAlready() {
  try {
    const nodeGypBuild = require('node-gyp-build');
    require(nodeGypBuild.resolve(root));
    return true;
  } catch {
    return false;
  }
}

if (process.env.BLIP2_FORCE_BUILD !== '1' && loadsAlready()) {
  process.exit(0);
}

const { findLibtorch, HOW_TO_GET_ONE } = require('./find-libtorch.js');
let found;
try {
  found = findLibtorch();
} catch (e) {
  process.stderr.write(`\nblip2-node: ${e.message}\n\n`);
  process.exit(1);
}
if (!found) {
  process.stderr.write(`\n${HOW_TO_GET_ONE}\n\n`);
  process.exit(1);
}
process.stderr.write(`blip2-node: building the addon against libtorch ${found.version ?? ''} from ${found.source} (${found.root})\n`);
const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
const result = spawnSync(process.execPath, [cmakeJs, 'compile', '--out', 'build'], { cwd: root, stdio: 'inherit' });
process.exit(result.status ?? 1);
