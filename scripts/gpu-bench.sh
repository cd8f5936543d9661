#!/usr/bin/env bash
# One-shot GPU check: correctness on the GPU adapter, then the benchmarks whose figures a real GPU
# must confirm, all written under OUT (default ./gpu-out). Meant for a lent machine with no
# network: run it with binaries built here and carried, or let it build where cargo can fetch.
#
#   Prepare here (once per change; both binaries stripped and compressed fit a 64 MiB carry):
#     cargo build --release -p ferry && cargo test --release -p ferry --test ferry-tests --no-run
#     mkdir -p .gpu && cp target/release/ferry .gpu/ && cp "$(ls -t target/release/deps/ferry_tests-* | grep -v '\.d$' | head -1)" .gpu/ferry-tests
#     strip .gpu/ferry .gpu/ferry-tests && zstd -19 --rm .gpu/ferry .gpu/ferry-tests
#   Run there (device tool: carry [".gpu"], OUT=$OUT):  bash scripts/gpu-bench.sh
#
# Environment: FERRY_BIN_DIR (default .gpu, else target/release), OUT, QUICK=1 (small shapes, for a
# dry run on lavapipe), LAYERS (random models' layers, default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
BIN_DIR="${FERRY_BIN_DIR:-.gpu}"
LAYERS="${LAYERS:-4}"
log() { echo "[gpu-bench $(date +%T)] $*" | tee -a "$OUT/gpu-bench.log" >&2; }

# Binaries: carried (compressed or not), else built here.
for b in ferry ferry-tests; do
  if [ -f "$BIN_DIR/$b.zst" ] && [ ! -x "$BIN_DIR/$b" ]; then
    zstd -d -q "$BIN_DIR/$b.zst" -o "$BIN_DIR/$b" && chmod +x "$BIN_DIR/$b"
  fi
done
if [ -x "$BIN_DIR/ferry" ]; then
  FERRY="$BIN_DIR/ferry"
  TESTS="$BIN_DIR/ferry-tests"
else
  log "no carried binaries in $BIN_DIR: building (needs the crates, so a network or a vendor folder)"
  cargo build --release -p ferry
  cargo test --release -p ferry --test ferry-tests --no-run
  FERRY=target/release/ferry
  TESTS="$(ls -t target/release/deps/ferry_tests-* | grep -v '\.d$' | head -1)"
fi

# 1. The adapter, and that it is not a CPU one (the figures below are for a GPU).
"$FERRY" devices --json >"$OUT/devices.json"
log "adapters: $(tr -d '\n' <"$OUT/devices.json" | cut -c1-300)"

# 2. Correctness on this adapter: the golden fixtures against transformers, offloaded equal to
#    resident bit for bit, long prompts in pages and passes, split projections. The test binary
#    opens the default adapter, the GPU here.
if [ -x "$TESTS" ]; then
  # (Tests that run the `ferry` binary find it by its build-time path, so they stay here.)
  "$TESTS" golden:: offload:: long_context::decode long_context::a_long long_context::an_eight \
    --test-threads 2 >"$OUT/correctness.log" 2>&1 \
    && log "correctness: $(grep -E '^test result' "$OUT/correctness.log")" \
    || { log "correctness FAILED: see correctness.log"; tail -40 "$OUT/correctness.log" >&2; }
else
  log "no test binary: correctness skipped"
fi

# 3. Benchmarks on random models with released shapes (random weights, real sizes).
models="$OUT/../gpu-models"
mkdir -p "$models"
presets="olmoe-1b-7b qwen3-30b-a3b"
[ "${QUICK:-0}" = 1 ] && presets="default"
for preset in $presets; do
  dir="$models/$preset"
  [ -d "$dir" ] || "$FERRY" random-model --preset "$preset" --layers "$LAYERS" --out "$dir" >/dev/null
  # Decode: resident and 25% / 12.5% budgets, the adapter's link and an emulated 16 GB/s one,
  # f32 and bf16 experts and projections (launch, unit and byte figures are in the JSON).
  "$FERRY" bench --model "$dir" --vram-budget 25% --vram-budget 12.5% --link-gbps none,16 \
    --expert-dtype f32,bf16 --dense-dtype f32,bf16 --prompt-len 64 --gen-len 32 --rounds 3 --json \
    >"$OUT/bench-$preset.json" \
    2>>"$OUT/gpu-bench.log" || log "bench $preset failed"
  log "bench $preset: $(head -c 200 "$OUT/bench-$preset.json")"
  # What this GPU must confirm: the same decode with whole dot products and burn's uploads (the
  # shapes and path before issue 22), against the run above (split and staged: --decode-split
  # auto, --upload auto).
  "$FERRY" bench --model "$dir" --vram-budget 25% --link-gbps none --decode-split 1 --upload burn \
    --prompt-len 64 --gen-len 32 --rounds 3 --json >"$OUT/bench-$preset-whole-burn.json" \
    2>>"$OUT/gpu-bench.log" || log "bench $preset (whole, burn) failed"
  # Routing on the device against the host (one read-back per MoE layer) in one run: resident
  # decode is where the routes stay on the device (--route-on auto is device on a GPU).
  "$FERRY" bench --model "$dir" --vram-budget 25% --link-gbps none --route-on host,device \
    --prompt-len 64 --gen-len 32 --rounds 3 --json >"$OUT/bench-$preset-route-on.json" \
    2>>"$OUT/gpu-bench.log" || log "bench $preset (route-on) failed"
  # Missed experts uploaded, computed on the host, or chosen per miss (issue 23): on a GPU the
  # device's reads are nearly free, so `auto` must find where the link stops paying.
  "$FERRY" bench --model "$dir" --vram-budget 0% --vram-budget 25% --link-gbps 8,16 \
    --miss-policy upload,cpu,auto --prompt-len 64 --gen-len 32 --rounds 3 --json \
    >"$OUT/bench-$preset-miss-policy.json" 2>>"$OUT/gpu-bench.log" || log "bench $preset (miss policy) failed"
  # Prefill by prompt length: time, KV bytes, attention scratch.
  lengths="1k,4k,16k"
  [ "${QUICK:-0}" = 1 ] && lengths="64,200"
  "$FERRY" bench --model "$dir" --prefill-curve "$lengths" --json >"$OUT/prefill-$preset.json" \
    2>>"$OUT/gpu-bench.log" || log "prefill curve $preset failed"
done
log "done: $(ls "$OUT" | tr '\n' ' ')"
