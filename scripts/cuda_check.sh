#!/usr/bin/env bash
# Issue 24, item 3: `cargo check --features cuda` without a GPU, with the CUDA compiler and runtime
# headers from PyPI (nvidia-cuda-nvcc-cu12, nvidia-cuda-runtime-cu12) in a venv under ~/.cache.
# candle-kernels' build script compiles its .cu files to PTX with nvcc (bindgen_cuda), which needs
# no GPU when CUDA_COMPUTE_CAP names one. Says where it stops and why. Idempotent, no stdin.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PHI_LSP_CUDA_VENV:-$HOME/.cache/phi-lsp-cuda/venv}
if ! [ -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import nvidia.cuda_nvcc, nvidia.cuda_runtime" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12
fi
site=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))")
NVCC_ROOT=$site/nvidia/cuda_nvcc
RUNTIME=$site/nvidia/cuda_runtime
# One CUDA root as bindgen_cuda and cudarc look for it: bin/nvcc, include/ of nvcc and runtime.
ROOT=${PHI_LSP_CUDA_ROOT:-$HOME/.cache/phi-lsp-cuda/root}
if [ -z "${PHI_LSP_CUDA_ROOT:-}" ]; then
mkdir -p "$ROOT/include"
ln -sfn "$NVCC_ROOT/bin" "$ROOT/bin"
ln -sfn "$NVCC_ROOT/nvvm" "$ROOT/nvvm"
for d in "$NVCC_ROOT/include" "$RUNTIME/include"; do
  [ -d "$d" ] && cp -rs "$d/." "$ROOT/include/" 2>/dev/null || true
done
fi
export CUDA_ROOT=$ROOT CUDA_PATH=$ROOT CUDA_TOOLKIT_ROOT_DIR=$ROOT PATH="$ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
if ! command -v nvcc >/dev/null; then
  echo "cuda_check: no nvcc: the PyPI wheel nvidia-cuda-nvcc-cu12 ($("$VENV/bin/pip" show nvidia-cuda-nvcc-cu12 2>/dev/null | sed -n 's/^Version: //p')) ships ptxas, libnvvm and the headers but not the nvcc driver, and candle-kernels' build script (bindgen_cuda) runs nvcc: install a CUDA toolkit and set PHI_LSP_CUDA_ROOT to it" >&2
  exit 2
fi
echo "== nvcc: $(nvcc --version | tail -n 1)"
echo "== cargo check --workspace --all-targets --features cuda (compute cap $CUDA_COMPUTE_CAP)"
start=$SECONDS
if cargo check --workspace --all-targets --features cuda; then
  echo "   ok in $((SECONDS - start)) s"
else
  echo "cuda_check: cargo check --features cuda failed after $((SECONDS - start)) s (see the first error above)" >&2
  exit 1
fi
