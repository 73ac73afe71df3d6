#!/usr/bin/env node
'use strict';
// prebuildify runs its "node-gyp" with node-gyp's arguments; we ignore them and build with
// cmake-js, which leaves build/Release/blip2_node.node where prebuildify collects it.
const path = require('node:path');
const { spawnSync } = require('node:child_process');

const root = path.join(__dirname, '..');
const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
const result = spawnSync(process.execPath, [cmakeJs, 'rebuild', '--out', 'build'], { cwd: root, stdio: 'inherit' });
process.exit(result.status ?? 1);
