#!/usr/bin/env bash
# The NEON kernels' proof (issue 24, item 2): the engine's kernel unit tests built for
# aarch64-unknown-linux-gnu and run under qemu's user-mode emulator. The tests compare every
# implementation the CPU probe lists on aarch64 (NEON and portable) against the portable kernels
# and candle's own dot products, as they do on x86-64. What this proves: the NEON kernels compute
# the right numbers (qemu emulates the instructions exactly). What it does not: their speed (an
# emulator's timings say nothing about an ARM core), Apple Silicon (macOS is not emulated; the
# code is the same aarch64 NEON), and the model end to end (only the kernel tests run).
#
# Idempotent and non-interactive (CI=true, no stdin): it installs what is missing by package name
# and skips what is there: the Rust target and zig/cargo-zigbuild (scripts/cross_tools.sh, as the
# cross checks), and from Debian `qemu-user` (qemu-aarch64) with `libc6-arm64-cross` and
# `libgcc-s1-arm64-cross` (the aarch64 loader and libraries the test binary links, under
# /usr/aarch64-linux-gnu). Usage: scripts/neon_check.sh [TEST FILTER...] (default: the kernels).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
if [ $# -eq 0 ]; then
  set -- qmatmul:: cpu:: kernels::
fi

# shellcheck source=scripts/cross_tools.sh
source scripts/cross_tools.sh "$TARGET"

echo "== qemu-user and the aarch64 C library (Debian packages)"
apt_missing=()
for pkg in qemu-user libc6-arm64-cross libgcc-s1-arm64-cross; do
  dpkg -s "$pkg" >/dev/null 2>&1 || apt_missing+=("$pkg")
done
if ((${#apt_missing[@]} > 0)); then
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    if ! sudo -n true 2>/dev/null; then
      echo "missing Debian packages: sudo apt-get install ${apt_missing[*]}" >&2
      exit 1
    fi
    sudo=(sudo -n)
  fi
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${apt_missing[@]}"
fi
qemu-aarch64 --version | head -1

# cargo runs each test binary through the runner; qemu finds the aarch64 loader under -L.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $SYSROOT"
start=$SECONDS
echo "== build: phi-engine's unit tests for $TARGET (zig as linker)"
cargo-zigbuild test --target "$TARGET" -p phi-engine --lib --no-run
echo "   built in $((SECONDS - start)) s"
start=$SECONDS
echo "== run under qemu-aarch64: tests matching $*"
cargo-zigbuild test --target "$TARGET" -p phi-engine --lib -- "$@"
echo "   ran in $((SECONDS - start)) s"
