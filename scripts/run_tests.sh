#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: unit, integration (real
# TorchServe instances on loopback) and e2e. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -q "$@"
