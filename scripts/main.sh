#!/usr/bin/env bash
# Set up .venv and run the main job: `flexmoe train` (arguments are passed through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/flexmoe train "$@"
