# Sourced by scripts/cross_check.sh and scripts/neon_check.sh: the Rust targets named in "$@"
# (`rustup target add`), and zig with cargo-zigbuild from PyPI in a venv under ~/.cache, the C
# compiler and linker for those targets. Idempotent: what is there at the pinned version is kept.
# Puts the venv's bin first on PATH (cargo-zigbuild finds zig as `python3 -m ziglang` when no `zig`
# is on PATH: the venv's python).

VENV=${PHI_LSP_CROSS_VENV:-$HOME/.cache/phi-lsp-cross/venv}
ZIGLANG_VERSION=0.17.1
ZIGBUILD_VERSION=0.24.1

echo "== cross tools: rust targets, zig $ZIGLANG_VERSION and cargo-zigbuild $ZIGBUILD_VERSION (PyPI)"
installed=$(rustup target list --installed)
for target in "$@"; do
  grep -qx "$target" <<<"$installed" || rustup target add "$target"
done
rustup component add clippy >/dev/null 2>&1 || true
if ! "$VENV/bin/cargo-zigbuild" --version 2>/dev/null | grep -q "$ZIGBUILD_VERSION" ||
  ! "$VENV/bin/python" -m ziglang version 2>/dev/null | grep -qx "$ZIGLANG_VERSION"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$ZIGBUILD_VERSION"
fi
export PATH="$VENV/bin:$PATH"
