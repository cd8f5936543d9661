#!/usr/bin/env bash
# The test command: set up the machine, then formatting, lints and every test. CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all --check
# Clippy lints Ferry's crates while the test build compiles them: clippy-driver as the workspace
# wrapper is what `cargo clippy` runs, and -D warnings travels as `cargo clippy -- -D warnings`
# passes it. A separate `cargo clippy` would first check every dependency in check mode, a second
# pass over burn/wgpu/egui that cost a third of a clean run. The workspace has no bench or example
# targets, so the test build covers what `--all-targets` would.
export RUSTC_WORKSPACE_WRAPPER
RUSTC_WORKSPACE_WRAPPER="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)" || {
  echo "test: clippy-driver not found; install it with 'rustup component add clippy'" >&2
  exit 1
}
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
# CLIPPY_ARGS is clippy's private encoding; were it to change, clippy-driver would take the lints
# as plain warnings and the build would pass. Two guards against that. First, the wrapper must
# refuse a file with a default clippy warning (`&Vec<u8>` parameter: clippy::ptr_arg).
scratch="$(mktemp -d)"
build_log="$scratch/build.log"
trap 'rm -rf "$scratch"' EXIT
echo 'pub fn probe(v: &Vec<u8>) -> usize { v.len() }' >"$scratch/probe.rs"
if "$RUSTC_WORKSPACE_WRAPPER" rustc --crate-type lib --emit metadata --out-dir "$scratch" \
  "$scratch/probe.rs" >"$scratch/probe.log" 2>&1 || ! grep -q 'ptr_arg' "$scratch/probe.log"; then
  cat "$scratch/probe.log" >&2
  echo "test: clippy-driver did not deny clippy::ptr_arg with CLIPPY_ARGS=$CLIPPY_ARGS; its encoding may have changed" >&2
  exit 1
fi
# Second, the build of Ferry's crates must print no warning at all (with -D warnings in force
# every lint is an error; dependencies build with lints capped). Fetching first, for this host
# only, keeps download retries out of the checked log; the build still streams to the console,
# and pipefail fails the script with cargo's status if the build fails.
cargo fetch --locked --target "$(rustc -vV | sed -n 's/^host: //p')"
cargo test --workspace --locked --no-run 2>&1 | tee "$build_log"
if grep -E '^warning(:|\[)' "$build_log" >"$scratch/warnings"; then
  echo "test: the build printed warnings; with -D warnings in force it prints none (has CLIPPY_ARGS' encoding changed?):" >&2
  cat "$scratch/warnings" >&2
  exit 1
fi
cargo test --workspace --locked
# The official OpenAI Python client (pinned) streams a chat from `ferry serve` on the default model.
client_env=target/openai-client
[ -x "$client_env/bin/python" ] || python3 -m venv "$client_env"
"$client_env/bin/pip" install -q --disable-pip-version-check -r tests/client/requirements.txt
"$client_env/bin/python" tests/client/openai_stream.py target/debug/ferry
