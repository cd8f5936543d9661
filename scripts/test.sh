#!/usr/bin/env bash
# The test command: set up the machine, then formatting, lints and every test. CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
