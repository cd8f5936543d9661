#!/usr/bin/env bash
# The main job on the built-in default model: set up, build, and stream generated text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo run --locked -p ferry -- generate --prompt "${1:-Once upon a time}" --max-new-tokens "${2:-48}"
