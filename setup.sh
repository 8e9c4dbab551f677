#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with everything the
# project needs. Safe to re-run. TORCH_SPEC chooses the torch build installed first
# (default torch==2.13.0: whatever build pip's index offers, the CPU wheel on this project's
# CI machines); e.g. TORCH_SPEC=torch==2.13.0+cu128 with PIP_EXTRA_INDEX_URL set on a GPU box.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first: a bare "torch" requirement with no torch installed would pull the CUDA wheels.
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet -e ".[dev]"
python -c "import torch, ray, optuna, nibabel; print(f'ready: torch {torch.__version__}, ray {ray.__version__}, optuna {optuna.__version__}')"
