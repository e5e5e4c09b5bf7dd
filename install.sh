#!/usr/bin/env bash
# Install everything fedneq needs on a fresh Debian/Ubuntu machine:
#   * Fashion-MNIST from Debian's dataset-fashion-mnist package (offline data),
#   * a virtual environment .venv with fedneq and its server-side dependencies (the
#     [server] extra: torch 2.14.1 + torchvision 0.29.1, flwr[simulation] 1.41 with Ray,
#     flwr-datasets, ...; a device needs only fedneq[client], docs/DEPLOY.md).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[server,dev,tracking]"
.venv/bin/python -c "import fedneq, strategies, sims, torchvision, flwr; print('fedneq installed: torch', __import__('torch').__version__, '| flwr', flwr.__version__)"
