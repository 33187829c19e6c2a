#!/usr/bin/env bash
# Prepare a fresh machine: Fashion-MNIST from Debian (when apt is available), a virtual environment
# in .venv with the CPU build of PyTorch 2.13.0, and cfdg installed in editable mode with dev tools.
# Running it again only checks what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

data_dir=/usr/share/datasets/fashion-mnist
if [ ! -f "$data_dir/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: warning: apt-get could not install dataset-fashion-mnist; the demo will use scikit-learn's digits"
  else
    echo "setup: Fashion-MNIST not found in $data_dir and apt-get is not usable here;" \
      "the demo will use scikit-learn's digits (install dataset-fashion-mnist as root to change that)"
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e '.[dev]'
echo "setup: ready ($(.venv/bin/python -c 'import torch, cfdg; print("torch", torch.__version__, "cfdg", cfdg.__version__)'))"
