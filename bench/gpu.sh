#!/usr/bin/env bash
# The GPU benchmark of issue 11 as one command, for a lent GPU machine (python3 with a CUDA torch,
# cmake, ninja; no Node.js, no network): Node from .gpu/ (bench/gpu-prepare.sh packs it here),
# the addon built against that machine's torch, random-weight real-size models exported, the CUDA
# tests, blip2-node (bench/gpu.ts) against transformers (bench/hf_gpu.py), and the issue's ratios.
#
#   bash bench/gpu.sh                                   on the GPU machine (carry .gpu)
#   BENCH_DEVICE=cpu BENCH_REDUCED=1 bash bench/gpu.sh  the same steps on a CPU machine, small
#
# Everything that comes back is in $OUT (default bench/.cache/gpu-out): console.log (all output),
# summary.txt (each step: exit code, seconds), results.md (the tables), results.jsonl (every JSON
# line) and logs.tar.gz (each step's own log and JSON lines: the lent machine returns at most 8
# files, so the per-step files travel packed, refreshed after every step). Checkpoints, exports
# and the unpacked logs live in $BENCH_WORK (default bench/.cache/gpu-work; ~31 GB at full size).
# A failed step is recorded and the steps that do not depend on it still run; the exit code is
# the number of failed steps (0: all ran).
#
# Settings (environment):
#   BENCH_DEVICE     cuda (default) | cpu
#   BENCH_REDUCED=1  2 vision / 2 Q-Former / 2 text layers of the real widths, 8 new tokens,
#                    batches 1,2, concurrency 2, 1 run (validates the script on 2 cores: float16
#                    runs slowly on a CPU)
#   BENCH_SKIP_T5=1  skip the Flan-T5-XL-size part (it also skips itself when started later than
#                    BENCH_T5_START_BY seconds into the run: default 270 on cuda)
#   BENCH_PYTHON     default python3 (cuda) / .venv/bin/python (cpu); BLIP2_PYTHON is set to it
#   BENCH_DTYPE (float16), BENCH_NEW_TOKENS (32), BENCH_ENCODE_BATCHES (1,32), BENCH_BATCHES
#   (1,8,64), BENCH_CONCURRENCY (64), BENCH_REQUESTS (4 x concurrency), BENCH_RUNS (5),
#   BENCH_WARMUP (2), BENCH_THREADS (cpu: 2), BENCH_BUILD_DIR (build-gpu-check),
#   BENCH_DEADLINE (cuda: 480 s; no step starts later, and a running one is stopped then: the
#   run tool's limit is 600 s), BENCH_KEEP=1 (keep the OPT files when the T5 part needs the disk)
set -euo pipefail
cd "$(dirname "$0")/.."
export ROOT=$PWD

export DEVICE=${BENCH_DEVICE:-cuda}
REDUCED=${BENCH_REDUCED:-0}
export OUT=${OUT:-$ROOT/bench/.cache/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export WORK=${BENCH_WORK:-$ROOT/bench/.cache/gpu-work}
export BUILD=${BENCH_BUILD_DIR:-$ROOT/build-gpu-check}
export ADDON=$BUILD/Release/blip2_node.node
export LOGS=$WORK/logs RES=$WORK/res
rm -rf "$LOGS" "$RES" "$WORK/rc"
mkdir -p "$LOGS" "$RES" "$WORK/rc"
rm -f "$OUT/summary.txt" "$OUT/results.md" "$OUT/results.jsonl" "$OUT/logs.tar.gz" "$OUT/console.log"
exec > >(tee -a "$OUT/console.log") 2>&1

if [ "$DEVICE" = cuda ]; then
  export PY=${BENCH_PYTHON:-python3}
  DEADLINE=${BENCH_DEADLINE:-480}
  T5_START_BY=${BENCH_T5_START_BY:-270}
  export THREADS=${BENCH_THREADS:-}
else
  export PY=${BENCH_PYTHON:-$ROOT/.venv/bin/python}
  DEADLINE=${BENCH_DEADLINE:-0}   # 0: none
  T5_START_BY=${BENCH_T5_START_BY:-100000}
  export THREADS=${BENCH_THREADS:-2}
fi
export BLIP2_PYTHON=$PY PYTHONUNBUFFERED=1
if [ "$REDUCED" = 1 ]; then
  LAYERS_V=2 LAYERS_Q=2 LAYERS_OPT=2 LAYERS_T5=2
  d_tokens=8 d_encode=1,2 d_batches=1,2 d_conc=2 d_runs=1 d_warmup=1 d_bw_mb=256
else
  LAYERS_V=39 LAYERS_Q=12 LAYERS_OPT=32 LAYERS_T5=24
  d_tokens=32 d_encode=1,32 d_batches=1,8,64 d_conc=64 d_runs=5 d_warmup=2 d_bw_mb=2048
fi
export DTYPE=${BENCH_DTYPE:-float16}
export NEW_TOKENS=${BENCH_NEW_TOKENS:-$d_tokens} ENCODE_BATCHES=${BENCH_ENCODE_BATCHES:-$d_encode}
export BATCHES=${BENCH_BATCHES:-$d_batches} CONCURRENCY=${BENCH_CONCURRENCY:-$d_conc}
export REQUESTS=${BENCH_REQUESTS:-$((4 * ${BENCH_CONCURRENCY:-$d_conc}))}
export RUNS=${BENCH_RUNS:-$d_runs} WARMUP=${BENCH_WARMUP:-$d_warmup} BW_MB=${BENCH_BW_MB:-$d_bw_mb}
export NODE_DIR=$ROOT/.gpu/node
export PATH=$NODE_DIR/bin:$PATH   # the packed node, wherever another one may be installed
export TSX=$ROOT/node_modules/tsx/dist/cli.mjs
# Cached by name, so reruns on one machine skip what is made (a lent machine always starts bare).
tag() { echo "$1-v$LAYERS_V-q$LAYERS_Q-t$2-$DTYPE"; }
export OPT_CKPT=$WORK/$(tag opt $LAYERS_OPT)-checkpoint OPT_MODEL=$WORK/$(tag opt $LAYERS_OPT)-model
export T5_CKPT=$WORK/$(tag t5 $LAYERS_T5)-checkpoint T5_MODEL=$WORK/$(tag t5 $LAYERS_T5)-model
export LAYERS_V LAYERS_Q LAYERS_OPT LAYERS_T5

failed=0
now() { date +%s.%N; }
# (a temporary name per process: the background build packs too)
pack_logs() { tar -czf "$OUT/.logs.$BASHPID.tgz" -C "$WORK" logs res && mv "$OUT/.logs.$BASHPID.tgz" "$OUT/logs.tar.gz"; }
record() { # name rc seconds note
  printf '%-14s rc=%-4s %8ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$OUT/summary.txt"
  echo "$2" >"$WORK/rc/$1"
}
ok() { [ "$(cat "$WORK/rc/$1" 2>/dev/null)" = 0 ]; }
# The shared machine here: heavy steps wait while another engineer's benchmark holds the lock.
wait_lock() {
  local waited=0
  while [ -e /tmp/bench.lock ]; do
    [ $waited = 0 ] && echo "waiting for /tmp/bench.lock to go ($1)"
    sleep 30
    waited=$((waited + 30))
  done
  [ $waited = 0 ] || echo "waited ${waited}s for /tmp/bench.lock"
}
# step NAME [--heavy] [--needs A,B] -- FUNCTION ARGS...: runs FUNCTION under `set -e` in its own
# bash (timeout kills its whole process group at the deadline), output to $LOGS/NAME.log.
step() {
  local name=$1 heavy=0 needs='' dep
  shift
  while [ "$1" != -- ]; do
    case $1 in --heavy) heavy=1 ;; --needs) needs=$2; shift ;; esac
    shift
  done
  shift
  for dep in ${needs//,/ }; do
    if ! ok "$dep"; then record "$name" skip 0 "needs $dep"; return 0; fi
  done
  local limit=0
  if [ "$DEADLINE" != 0 ]; then
    limit=$((DEADLINE - SECONDS))
    if [ $limit -le 5 ]; then record "$name" skip 0 "past the ${DEADLINE}s deadline"; return 0; fi
  fi
  [ $heavy = 1 ] && wait_lock "$name"
  echo "== $name (${SECONDS}s into the run)"
  local t0 rc
  t0=$(now)
  set +e
  timeout -k 10 "$limit" bash -c 'set -euo pipefail; "$@"' "$name" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  set -e
  local secs
  secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  local note=''
  [ $rc = 0 ] || { note="see logs/$name.log"; [ $rc = 124 ] && note="stopped at the deadline; $note"; tail -n 15 "$LOGS/$name.log" | sed 's/^/    /'; }
  record "$name" $rc "$secs" "$note"
  pack_logs
}

# ---------------------------------------------------------------------------------------- steps
# Each runs in a child bash (export -f below); they read the exported settings above.

env_info() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -a)"
  echo "cores: $(nproc)  memory: $(free -g | awk '/Mem:/ { print $2 " GiB" }')  disk: $(df -h "$ROOT" | tail -1)"
  echo "python: $PY  cmake: $(cmake --version | head -1)  ninja: $(ninja --version 2>/dev/null || echo none)"
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "transformers", transformers.__version__); print("cmake prefix", torch.utils.cmake_prefix_path)'
  if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
  echo "settings: device $DEVICE dtype $DTYPE reduced ${BENCH_REDUCED:-0} layers v$LAYERS_V q$LAYERS_Q opt$LAYERS_OPT t5$LAYERS_T5 new tokens $NEW_TOKENS encode $ENCODE_BATCHES batches $BATCHES concurrency $CONCURRENCY requests $REQUESTS runs $RUNS warmup $WARMUP"
}

untar_xz() { # archive dir: tar -J needs the xz program; Python's lzma does without it
  if command -v xz >/dev/null; then tar -C "$2" -xJf "$1"; else
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$1" "$2"; fi
}

unpack_node() {
  ls -la "$ROOT/.gpu"
  cat "$ROOT/.gpu/MANIFEST.txt" || true
  rm -rf "$NODE_DIR"
  mkdir -p "$NODE_DIR"
  untar_xz "$ROOT/.gpu/node.tar.xz" "$NODE_DIR"
  # Never over a node_modules that npm made (a developer's checkout): the marker says it is ours.
  if [ -d "$ROOT/node_modules" ] && [ ! -f "$ROOT/node_modules/.gpu-unpacked" ]; then
    echo "node_modules exists and was not unpacked from .gpu: refusing to touch it" >&2
    exit 1
  fi
  rm -rf "$ROOT/node_modules"
  mkdir -p "$ROOT/node_modules"
  untar_xz "$ROOT/.gpu/node_modules.tar.xz" "$ROOT"
  touch "$ROOT/node_modules/.gpu-unpacked"
  echo "node: $(command -v node) $(node -v) execPath $(node -p process.execPath)"
  (cd "$ROOT" && node -e '
    for (const p of ["node-addon-api", "node-api-headers", "node-gyp-build", "@huggingface/tokenizers", "sharp", "tsx", "mocha"]) {
      const dir = require("path").join("node_modules", p);
      console.log(p.padEnd(26), require(require("path").resolve(dir, "package.json")).version, dir);
    }
    require("sharp"); console.log("sharp loads");
    require("@huggingface/tokenizers"); console.log("tokenizers loads");')
  ls "$ROOT/node_modules" | tr '\n' ' '; echo
}

build_addon() {
  local gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  echo "torch cmake prefix: $("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  # Plain cmake in place of `npx cmake-js compile` (which would fetch node headers): the N-API
  # headers from node-api-headers, the addon where cmake-js puts it (Release/).
  cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_JS_INC="$ROOT/node_modules/node-api-headers/include" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$BUILD/Release" -DCMAKE_POLICY_VERSION_MINIMUM=3.5
  cmake --build "$BUILD" -j "$(nproc)"
  ls -la "$ADDON"
  ldd "$ADDON"
  if [ "$DEVICE" = cuda ]; then
    ldd "$ADDON" | grep 'libtorch_cuda' || { echo "the addon does not link libtorch_cuda" >&2; exit 1; }
  fi
  node -e "
    const b = require('$ADDON');
    console.log(JSON.stringify({ versions: b.versions(), devices: b.devices() }));
    if ('$DEVICE' === 'cuda' && !b.devices().some((d) => d.startsWith('cuda'))) throw new Error('the addon sees no CUDA device');"
}

make_checkpoint() { # family layers dir
  local fill=cpu
  [ "$DEVICE" = cuda ] && fill=cuda   # seconds instead of a minute of CPU noise
  if [ -f "$3/config.json" ] && [ -f "$3/.complete" ]; then echo "cached: $3"; return 0; fi
  rm -rf "$3"
  if ! "$PY" "$ROOT/bench/hf_real_size.py" "$3" --family "$1" --dtype "$DTYPE" --device "$fill" \
      --vision-layers "$LAYERS_V" --qformer-layers "$LAYERS_Q" --text-layers "$2"; then
    [ "$fill" = cpu ] && exit 1
    echo "filling on $fill failed: again on the CPU"
    rm -rf "$3"
    "$PY" "$ROOT/bench/hf_real_size.py" "$3" --family "$1" --dtype "$DTYPE" --device cpu \
      --vision-layers "$LAYERS_V" --qformer-layers "$LAYERS_Q" --text-layers "$2"
  fi
  touch "$3/.complete"
  du -sh "$3"
}

export_model() { # checkpoint dir [exporter args]
  if [ -f "$2/manifest.json" ]; then echo "cached: $2"; return 0; fi
  rm -rf "$2"
  (cd "$ROOT/export" && "$PY" -m blip2_export "$1" "$2" --dtype "$DTYPE" "${@:3}")
  du -sh "$2"
}

cuda_test() {
  # scripts/mocha-one.sh's flags, with the packed mocha and the build above (BLIP2_ADDON);
  # test/cuda.spec.ts skips itself where the addon sees no GPU: on cuda a skip is a failure.
  cd "$ROOT"
  local strict=()
  [ "$DEVICE" = cuda ] && strict=(--forbid-pending)
  BLIP2_ADDON=$ADDON node node_modules/mocha/bin/mocha.js --no-config --require tsx --node-option expose-gc \
    --timeout 300000 "${strict[@]}" test/cuda.spec.ts
}

bandwidth() {
  "$PY" "$ROOT/bench/gpubw.py" --device "$DEVICE" --mb "$BW_MB" ${THREADS:+--threads "$THREADS"} | tee "$RES/bw.jsonl"
}

write_pixels() {
  cd "$ROOT"
  BLIP2_ADDON=$ADDON node "$TSX" bench/gpu.ts --write-pixels "$WORK/pixels.f32" --count 64 --size 224
  ls -la "$WORK/pixels.f32"
}

# Peak device memory of one process, from nvidia-smi every 100 ms (what the process holds:
# weights, KV cache, activations, its CUDA context and allocator cache), above the idle reading.
with_gpu_memory() { # jsonl command...
  local out=$1
  shift
  if [ "$DEVICE" != cuda ] || ! command -v nvidia-smi >/dev/null; then "$@"; return; fi
  local idle samples=$WORK/gpumem.$$ pid
  idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 >"$samples" &
  pid=$!
  local rc=0
  "$@" || rc=$?   # the sampler must stop either way
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  awk -v idle="$idle" 'BEGIN { m = 0 } $1 + 0 > m { m = $1 + 0 } END { printf "{\"event\":\"gpu_memory\",\"how\":\"nvidia-smi memory.used every 100 ms, peak - idle\",\"idle_mib\":%d,\"peak_mib\":%d,\"samples\":%d}\n", idle, m - idle, NR }' "$samples" | tee -a "$out"
  rm -f "$samples"
  return $rc
}

ours() { # model dir jsonl
  cd "$ROOT"
  local bw
  bw=$(node -p 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").pop()).best_gb_s' "$RES/bw.jsonl" 2>/dev/null) || bw=NaN
  with_gpu_memory "$2" run_ours "$1" "$2" "$bw"
}
run_ours() { # model jsonl bandwidth
  BLIP2_ADDON=$ADDON node "$TSX" bench/gpu.ts --model "$1" --device "$DEVICE" --dtype "$DTYPE" \
    --new-tokens "$NEW_TOKENS" --runs "$RUNS" --warmup "$WARMUP" --encode-batches "$ENCODE_BATCHES" --batches "$BATCHES" \
    --concurrency "$CONCURRENCY" --requests "$REQUESTS" --max-seconds 60 --bandwidth-gb-s "$3" \
    ${THREADS:+--threads "$THREADS"} | tee "$2"
}

theirs() { # checkpoint dir jsonl
  with_gpu_memory "$2" run_theirs "$1" "$2"
}
run_theirs() { # checkpoint jsonl
  "$PY" "$ROOT/bench/hf_gpu.py" --checkpoint "$1" --device "$DEVICE" --dtype "$DTYPE" --attn eager \
    --new-tokens "$NEW_TOKENS" --runs "$RUNS" --warmup "$WARMUP" --encode-batches "$ENCODE_BATCHES" --batches "$BATCHES" \
    --concurrency "$CONCURRENCY" --pixels "$WORK/pixels.f32" ${THREADS:+--threads "$THREADS"} | tee "$2"
}

report() {
  cd "$ROOT"
  node "$TSX" bench/gpu.ts --report "$RES" --out "$OUT/results.md"
}

free_opt() { rm -rf "$OPT_CKPT" "$OPT_MODEL"; df -h "$WORK" | tail -1; }

export -f env_info untar_xz unpack_node build_addon make_checkpoint export_model cuda_test bandwidth write_pixels \
  with_gpu_memory ours run_ours theirs run_theirs report free_opt

# ------------------------------------------------------------------------------------ the run
echo "bench/gpu.sh: device $DEVICE, out $OUT, work $WORK, build $BUILD"
step env -- env_info
step node -- unpack_node
if [ "$DEVICE" = cuda ]; then
  # 16 cores: the compile, then the CUDA test (a tiny model), run beside the checkpoint fill and
  # the export (mostly I/O and one core), saving two minutes of the lease; nothing is timed
  # until both are done. Their logs and exit codes are their own all the same.
  { step build --needs node -- build_addon; step cuda-test --needs build -- cuda_test; } &
  build_pid=$!
else
  step build --heavy --needs node -- build_addon
  step cuda-test --heavy --needs build -- cuda_test
fi
step checkpoint-opt --heavy -- make_checkpoint opt "$LAYERS_OPT" "$OPT_CKPT"
step export-opt --heavy --needs checkpoint-opt -- export_model "$OPT_CKPT" "$OPT_MODEL"
[ -n "${build_pid:-}" ] && wait "$build_pid"
step bandwidth --heavy -- bandwidth
step pixels --needs build -- write_pixels
step ours-opt --heavy --needs build,export-opt -- ours "$OPT_MODEL" "$RES/ours-opt.jsonl"
step hf-opt --heavy --needs checkpoint-opt -- theirs "$OPT_CKPT" "$RES/hf-opt.jsonl"
step report --needs node -- report

if [ "${BENCH_SKIP_T5:-0}" = 1 ]; then
  record t5 skip 0 "BENCH_SKIP_T5=1"
elif [ $SECONDS -gt "$T5_START_BY" ]; then
  record t5 skip 0 "${SECONDS}s into the run, past BENCH_T5_START_BY=${T5_START_BY}s"
else
  # Both real-size models at once need ~31 GB of the lent machine's 64 GiB disk: the OPT files go.
  [ "$DEVICE" = cuda ] && [ "${BENCH_KEEP:-0}" != 1 ] && step free-opt -- free_opt
  step checkpoint-t5 --heavy -- make_checkpoint t5 "$LAYERS_T5" "$T5_CKPT"
  # A caption needs 33 encoder and 1 + new-tokens decoder positions: small caches for 64 slots.
  step export-t5 --heavy --needs checkpoint-t5 -- export_model "$T5_CKPT" "$T5_MODEL" --max-length 128 --max-encoder-length 64
  step ours-t5 --heavy --needs build,export-t5 -- ours "$T5_MODEL" "$RES/ours-t5.jsonl"
  step hf-t5 --heavy --needs checkpoint-t5 -- theirs "$T5_CKPT" "$RES/hf-t5.jsonl"
  step report-t5 --needs node -- report
fi

cat "$RES"/*.jsonl >"$OUT/results.jsonl" 2>/dev/null || true
failed=$(grep -cv 'rc=0 \|rc=skip' "$OUT/summary.txt" || true)
echo
echo "== summary (${SECONDS}s)"
cat "$OUT/summary.txt"
echo
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
pack_logs
exit "$failed"
