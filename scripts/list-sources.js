#!/usr/bin/env node
'use strict';
// The addon's C++ sources for binding.gyp (CMakeLists.txt globs the same set).
const fs = require('node:fs');
const path = require('node:path');

const root = path.join(__dirname, '..');
const sources = [];
(function walk(dir) {
  for (const entry of fs.readdirSync(path.join(root, dir), { withFileTypes: true })) {
    const rel = path.posix.join(dir, entry.name);
    if (entry.isDirectory()) {
      if (entry.name !== 'test') walk(rel);
    } else if (entry.name.endsWith('.cc')) {
      sources.push(rel);
    }
  }
})('native');
process.stdout.write(sources.sort().join('\n'));
