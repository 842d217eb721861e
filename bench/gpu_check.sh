#!/usr/bin/env bash
# The prepared GPU check, one command: bash bench/gpu_check.sh [--cpu] [more flags of bench/gpu_check.py]
#
# For one GPU lent for 15 minutes (e.g. an H200; torch and transformers installed, no vLLM, no network):
# the stages of bench/gpu_check.py inside its 8-minute budget, each printing PASS/FAIL and rewriting
# bench/results/gpu_check.json as it ends; a hard stop at 470 s keeps what was written. --cpu runs every
# stage at tiny sizes on the CPU (the test suite does). Wheels in .whl/ (e.g. math-verify, carried to a
# machine that lacks them) are installed first into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export HF_HUB_OFFLINE=1  # every model here is built locally; nothing is downloaded
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation between stages
exec timeout --signal=INT 470 "$PYTHON" bench/gpu_check.py "$@"
