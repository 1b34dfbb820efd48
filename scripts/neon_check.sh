#!/usr/bin/env bash
# The NEON kernels' proof (issue 24, item 2): the engine's kernel unit tests built for
# aarch64-unknown-linux-gnu and run under qemu's user-mode emulator. The tests compare every
# implementation the CPU probe lists on aarch64 (NEON and portable) against the portable kernels
# and candle's own dot products, as they do on x86-64. What this proves: the NEON kernels compute
# the right numbers (qemu emulates the instructions exactly), and so does the whole model on them:
# tests/reference.rs (the committed tiny checkpoint against transformers' logits and greedy tokens)
# runs too. What it does not prove: their speed (an emulator's timings say nothing about an ARM
# core), Apple Silicon itself (macOS is not emulated; the kernels are the same aarch64 code), and
# what the other tests check (the server, the editors).
#
# Idempotent and non-interactive (CI=true, no stdin): it installs what is missing by package name
# and skips what is there: the Rust target and zig/cargo-zigbuild (scripts/cross_tools.sh, as the
# cross checks), and from Debian `qemu-user` (qemu-aarch64) with `libc6-arm64-cross` and
# `libgcc-s1-arm64-cross` (the aarch64 loader and libraries the test binary links, under
# /usr/aarch64-linux-gnu). Usage: scripts/neon_check.sh [TEST FILTER...]: by default the kernel
# unit tests (qmatmul::, cpu::, kernels::; synthetic::, a random model in every dtype) and the
# reference tests; with filters, the unit tests they match alone.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
FILTERED=${1:-}
if [ $# -eq 0 ]; then
  set -- qmatmul:: cpu:: kernels:: synthetic::
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
echo "== build: phi-engine's unit tests and tests/reference.rs for $TARGET (zig as linker)"
cargo-zigbuild test --target "$TARGET" -p phi-engine --lib --test reference --no-run
echo "   built in $((SECONDS - start)) s"

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
# `run WHAT ARGS...`: the tests ARGS name, under qemu, their summary kept for the last line.
run() {
  local what=$1 start=$SECONDS
  shift
  echo "== under qemu-aarch64: $what"
  "$@" 2>&1 | tee -a "$LOG" | { grep -vE '^test .* ok$' || true; }
  echo "   ran in $((SECONDS - start)) s"
}
run "the unit tests matching $*" cargo-zigbuild test --target "$TARGET" -p phi-engine --lib -- "$@"
if [ -z "$FILTERED" ]; then
  # The whole model on the NEON kernels: logits within 1e-4 of transformers' and greedy tokens
  # (f32), and greedy tokens with f16 weights (the dense NEON row kernel on 16-bit weights).
  run "tests/reference.rs (f32)" cargo-zigbuild test --target "$TARGET" -p phi-engine --test reference
  run "tests/reference.rs greedy tokens (f16)" env PHI_ENGINE_TEST_DTYPE=f16 \
    cargo-zigbuild test --target "$TARGET" -p phi-engine --test reference -- greedy
fi
passed=$(grep -oE '^test result: ok\. [0-9]+ passed' "$LOG" | awk '{s += $4} END {print s + 0}')
echo "neon_check: $passed tests passed under qemu-aarch64"
