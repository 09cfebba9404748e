#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: a real TorchServe from the bundled
# config (started and stopped with `bray-archive server start|stop`) and an RL-shaped loop
# (a trainer publishing, actors forwarding, every N-th step archived as a version, a
# league through bray.ModelPool; report and win-rate plot in results/main_job/). Extra
# arguments go to main_job.py (see --help): --duration-s, --hidden, --engine, --actors,
# --workers, --league-every, --game-steps, --report-dir.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/main_job.py "$@"
