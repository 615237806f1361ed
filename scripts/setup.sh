#!/usr/bin/env bash
# Install robkit and everything it needs into ./.venv (idempotent; safe to re-run).
#   ROBKIT_TORCH="torch==2.14.1 torchvision==0.29.1"  the PyTorch pair to install first
#   ROBKIT_EXTRAS="all,dev"                               pip extras of robkit to install
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${ROBKIT_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${ROBKIT_EXTRAS:-all,dev}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null
# PyTorch first, pinned, so that nothing later pulls a different build.
if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "$VPY" -m pip install -q $TORCH_SPEC
fi
echo "[setup] installing robkit[$EXTRAS]"
"$VPY" -m pip install -q -e ".[$EXTRAS]"

# The embedded default data set (Fashion-MNIST idx files, Debian package dataset-fashion-mnist).
if ! "$VPY" -c "from robkit.data.datasets import find_fashion_mnist; find_fashion_mnist()" 2>/dev/null; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing dataset-fashion-mnist with apt-get"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null))
  else
    echo "[setup] Fashion-MNIST not found: install the Debian package dataset-fashion-mnist, or set"
    echo "        ROBKIT_FASHION_MNIST to a folder with train-images-idx3-ubyte.gz and friends."
  fi
fi
"$VPY" -m robkit.cli --version
