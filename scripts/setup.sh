#!/usr/bin/env bash
# Create .venv (if needed) and install flexmoe with the given extras, e.g. `scripts/setup.sh dev,bench`.
# Installs torch from requirements/torch-cpu.txt unless a torch is already in the venv
# (a GPU user installs their CUDA torch into .venv first; see README), and holds
# transformers at the version the tests check (requirements/tested.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.flexmoe-setup-$(cat pyproject.toml requirements/torch-cpu.txt requirements/tested.txt | sha256sum | cut -c1-16)-${extras//,/_}"
if [ -f "$stamp" ]; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" -r requirements/torch-cpu.txt
fi
"${pip[@]}" -c requirements/tested.txt -e ".[${extras}]"
touch "$stamp"
