#!/usr/bin/env bash
# Set up a fresh machine for bray-serve: Java 17+ (TorchServe's front end), a virtual
# environment in .venv with torch 2.13.0 (CPU), TorchServe 0.12, ONNX Runtime and the
# package itself (editable), plus test and benchmark tools. Idempotent: a second run
# only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${BRAY_VENV:-.venv}

java_major() {
  java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'
}
if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 17 ]; then
  echo "setup: Java 17+ not found; installing openjdk-17-jre-headless with apt-get"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi
echo "setup: java $(java_major) ok"

# Debian's prometheus and chromium, for the observability tests (a real Prometheus scraping
# TorchServe; the dashboard page in a headless browser). Optional: where apt-get cannot
# install them, those tests skip and say how to install them. On a host with systemd the
# package also enables a system prometheus on :9090; the tests start their own on free ports.
missing=""
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo -n"; fi
  echo "setup: installing$missing with apt-get (optional)"
  if ! { command -v apt-get >/dev/null 2>&1 && $SUDO apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null; }; then
    echo "setup: could not install$missing; the tests that need them will skip"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.bray-setup-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  $PIP install -q --upgrade pip
  # torch first and pinned: 2.13.0 CPU is on this kind of machine's disk; an unpinned
  # torch would pull a multi-GB CUDA build.
  $PIP install -q "torch==2.13.0"
  # torchserve 0.12's wheel forgets PyYAML, which its worker imports: pyproject lists it.
  $PIP install -q -e ".[onnx,test,bench,metrics]"
  # KServe's CRD classes for the manifest checks (tests/unit/test_kserve_export.py): the
  # wheel only, not installed, since its model-server dependencies would downgrade
  # protobuf and psutil; the test loads the generated classes from it.
  mkdir -p "$VENV/share/bray-kserve"
  $PIP download -q --no-deps "kserve==0.21.0" -d "$VENV/share/bray-kserve"
  rm -f "$VENV"/.bray-setup-*
  touch "$stamp"
fi
"$VENV/bin/python" -c "import torch, ts, model_archiver, yaml, onnxruntime, bray; print('setup: torch', torch.__version__, '| torchserve', ts.__version__ if hasattr(ts, '__version__') else '0.12', '| onnxruntime', onnxruntime.__version__)"
