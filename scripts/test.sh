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
cargo test --workspace --locked
