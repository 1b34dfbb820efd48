#!/usr/bin/env bash
# The cross checks (issue 24, item 1): `cargo check` and `cargo clippy --all-targets -D warnings`
# of the whole workspace for targets this machine cannot run:
#   aarch64-unknown-linux-gnu              Linux on ARM (the portable kernels)
#   aarch64-apple-darwin --features metal  Apple Silicon with candle's Metal backend
# Nothing is linked or run: a check proves the code compiles there, without warnings or dead code,
# not that it works. The C code of the dependencies' build scripts (ring through rustls, onig
# through tokenizers) needs a C cross compiler: zig, through cargo-zigbuild, both from PyPI.
#
# Idempotent and non-interactive (CI=true, no stdin): it installs what is missing by package name
# (`rustup target add`, pip into a venv under ~/.cache) and skips what is there. Artefacts go to
# cargo's per-target folders under target/. Usage: scripts/cross_check.sh [TARGET...] (default both).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -eq 0 ]; then
  set -- aarch64-unknown-linux-gnu aarch64-apple-darwin
fi

# shellcheck source=scripts/cross_tools.sh
source scripts/cross_tools.sh "$@"

for target in "$@"; do
  features=()
  case "$target" in
    *-apple-darwin) features=(--features metal) ;;
  esac
  for job in check clippy; do
    start=$SECONDS
    echo "== cargo $job --workspace --all-targets --target $target ${features[*]}"
    if [ "$job" = clippy ]; then
      cargo-zigbuild clippy --workspace --all-targets --target "$target" "${features[@]}" -- -D warnings
    else
      # Warnings fail the clippy run that follows (RUSTFLAGS would rebuild every dependency).
      cargo-zigbuild check --workspace --all-targets --target "$target" "${features[@]}"
    fi
    echo "   ok in $((SECONDS - start)) s"
  done
done
