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
# (`ls` fails when either folder has none, so its output is what counts.)
if [ -z "$(ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null || true)" ]; then
  need+=(mesa-vulkan-drivers libvulkan1)
fi
# The desktop app (`ferry gui`) loads the X11 client libraries at run time; its headless test
# draws into Xvfb.
command -v Xvfb >/dev/null 2>&1 || need+=(xvfb xauth)
# The server test drives `ferry serve` with the official OpenAI Python client, in a venv.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv)
for lib in libxkbcommon-x11.so.0:libxkbcommon-x11-0 libXcursor.so.1:libxcursor1 libXrandr.so.2:libxrandr2 \
           libXi.so.6:libxi6 libX11-xcb.so.1:libx11-xcb1; do
  ldconfig -p | grep -q "${lib%%:*}" || need+=("${lib##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need[@]}" >/dev/null
fi
