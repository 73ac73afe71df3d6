#!/usr/bin/env bash
# Packs what bench/gpu.sh needs on the lent GPU machine, which has python3 with a CUDA torch,
# cmake and ninja, but no Node.js and no network: it gets the git working tree plus up to 8
# carried ignored paths, 64 MiB in all (the tracked tree is ~4 MiB of that). Writes .gpu/:
#   node.tar.xz          bin/node: this machine's node (a self-contained build that links only
#                        glibc and libstdc++), stripped: its debug info is 13 MB we never use
#   node_modules.tar.xz  the packages the build, the CUDA test and the benchmark load, with their
#                        dependency closure (dependencies + optionalDependencies that are installed)
#   MANIFEST.txt         what was packed, with sizes
# and adds /.gpu/ and /build-gpu-check/ to .git/info/exclude. Carry `.gpu` (one path).
#
#   bash bench/gpu-prepare.sh [--force]     (--force repacks node even when its tarball is current)
#
# Why these packages and no others (each was checked by running bench/gpu.sh from a copy of the
# tree that had only these, see bench/RESULTS.md):
#   node-addon-api     napi.h, for the build (CMakeLists.txt asks node for its include_dir)
#   node-api-headers   node_api.h & co.: the build runs plain cmake with these as CMAKE_JS_INC, so
#                      neither cmake-js nor the 54 MB of /usr/include/node (V8, uv, openssl) travel;
#                      the addon is N-API only (NAPI_VERSION=8)
#   node-gyp-build     lib/native/binding.ts requires it even when BLIP2_ADDON names the build
#   @huggingface/tokenizers  lib/processing imports it at load
#   sharp (+ @img/sharp-linux-x64, @img/sharp-libvips-linux-x64)  lib/processing/image-decode.ts
#                      imports sharp at load (lib/index re-exports it), so `import '../lib'` needs it
#                      although the benchmark decodes no image file (it feeds pixel tensors)
#   tsx (+ esbuild, @esbuild/linux-x64)  runs bench/gpu.ts and test/cuda.spec.ts as the other
#                      benchmarks and tests run (compiling them instead would move __dirname, which
#                      the test support and bench/common.ts resolve paths from)
#   mocha              the CUDA test (scripts/mocha-one.sh's flags)
# Not packed: cmake-js (plain cmake instead: cmake-js would want to download node headers),
# typescript (tsx does not type-check), tinyglobby (only the CLI's file globbing uses it), @types/*.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
force=0
[ "${1:-}" = "--force" ] && force=1

out=.gpu
mkdir -p "$out"
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
for line in /.gpu/ /build-gpu-check/; do
  grep -qxF "$line" "$exclude" || echo "$line" >>"$exclude"
done

node_bin=${NODE_BIN:-$(command -v node)}
node_version=$("$node_bin" -v)
stamp="$node_version $(sha256sum "$node_bin" | cut -c1-16)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# node: ~22 MB compressed, the biggest item; repacked only when the binary changed (xz -9 of 86 MB
# takes over a minute on one core).
if [ "$force" = 1 ] || [ ! -f "$out/node.tar.xz" ] || [ "$(cat "$out/node.stamp" 2>/dev/null)" != "$stamp" ]; then
  mkdir -p "$tmp/node/bin"
  cp "$node_bin" "$tmp/node/bin/node"
  strip "$tmp/node/bin/node"
  "$tmp/node/bin/node" -e 'process.exit(0)'  # the stripped copy runs
  tar -C "$tmp/node" -cf - bin | xz -T0 -9 >"$out/node.tar.xz.new"
  mv "$out/node.tar.xz.new" "$out/node.tar.xz"
  echo "$stamp" >"$out/node.stamp"
fi

# The dependency closure of the roots, resolved as Node resolves (the nearest node_modules up
# the tree); optional dependencies for other platforms are simply not installed, so not found.
roots='node-addon-api node-api-headers node-gyp-build @huggingface/tokenizers sharp tsx mocha'
"$node_bin" - "$root" $roots >"$tmp/packages" <<'EOF'
const fs = require('node:fs');
const path = require('node:path');
const [root, ...roots] = process.argv.slice(2);
const seen = new Set();
function find(name, from) {
  for (let dir = from; ; dir = path.dirname(dir)) {
    const candidate = path.join(dir, 'node_modules', name);
    if (fs.existsSync(path.join(candidate, 'package.json'))) return candidate;
    if (dir === root || dir === path.dirname(dir)) return null;
  }
}
function visit(dir, required, what) {
  if (!dir) {
    if (required) throw new Error(`${what} is not installed: run npm ci first`);
    return;
  }
  if (seen.has(dir)) return;
  seen.add(dir);
  const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
  for (const [field, req] of [['dependencies', true], ['optionalDependencies', false], ['peerDependencies', false]]) {
    for (const dep of Object.keys(pkg[field] ?? {})) visit(find(dep, dir), req && !(pkg.optionalDependencies ?? {})[dep], `${dep} (a dependency of ${pkg.name})`);
  }
}
for (const name of roots) visit(find(name, root), true, name);
for (const dir of [...seen].sort()) console.log(path.relative(root, dir));
EOF
tar -C "$root" -cf - $(cat "$tmp/packages") | xz -T0 -9 >"$out/node_modules.tar.xz.new"
mv "$out/node_modules.tar.xz.new" "$out/node_modules.tar.xz"

size() { stat -c %s "$1"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
{
  echo "packed $(date -u +%Y-%m-%dT%H:%M:%SZ) by bench/gpu-prepare.sh"
  echo "node $node_version from $node_bin (stripped): .gpu/node.tar.xz $(mib "$(size "$out/node.tar.xz")")"
  echo "node_modules: .gpu/node_modules.tar.xz $(mib "$(size "$out/node_modules.tar.xz")"), $(wc -l <"$tmp/packages") packages, unpacked $(cd "$root" && du -sc $(cat "$tmp/packages") | tail -1 | cut -f1) KiB:"
  while read -r p; do printf '  %-50s %s\n' "$p" "$(cd "$root" && du -sh "$p" | cut -f1)"; done <"$tmp/packages"
  tree_bytes=$( (git ls-files -z --cached --others --exclude-standard 2>/dev/null || true) | xargs -0 -r stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
  carried=$(du -sb "$out" | cut -f1)
  echo "working tree (tracked + untracked, not ignored): $(mib "$tree_bytes")"
  echo "carried .gpu/: $(mib "$carried"); together $(mib $((tree_bytes + carried))) of the 64 MiB limit"
} | tee "$out/MANIFEST.txt"
