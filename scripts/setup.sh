#!/usr/bin/env bash
# Everything a fresh Debian machine needs to build and run Ferry, including one without a GPU:
# a C toolchain, and Mesa's software Vulkan driver (lavapipe) when no Vulkan driver is present.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found. Install Rust 1.95 or newer with rustup (https://rustup.rs), then re-run." >&2
  exit 1
fi

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
# A Vulkan driver (ICD) is what wgpu needs; without a GPU driver, lavapipe provides one on the CPU.
if ! ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json >/dev/null 2>&1; then
  need+=(mesa-vulkan-drivers libvulkan1)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need[@]}" >/dev/null
fi
