#!/usr/bin/env bash
# The native tests under AddressSanitizer (not in CI: ~10 min on 2 cores). Our addon is built
# instrumented into build-asan; libtorch and node are not, so ASan checks our code's memory
# accesses (heap/stack overflows, use after free) in every call the tests make. Leak checking is
# off: node and libtorch keep allocations until exit by design.
#   bash scripts/asan-test.sh [spec files...]
set -euo pipefail
cd "$(dirname "$0")/.."
npx cmake-js compile --out build-asan --CDCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer" \
  --CDCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address" >/dev/null
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(test/tensor.spec.ts test/script-module.spec.ts test/generation.spec.ts test/generation-options.spec.ts
  test/serving.spec.ts test/family.spec.ts test/cpu-kernels.spec.ts test/fuzz.spec.ts)
LD_PRELOAD="$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
  BLIP2_ADDON=build-asan/Release/blip2_node.node BLIP2_FUZZ_MS=20000 bash scripts/mocha-one.sh "${specs[@]}"
