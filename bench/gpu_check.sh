#!/usr/bin/env bash
# The prepared GPU check, one command: bash bench/gpu_check.sh [--cpu] [more flags of bench/gpu_check.py]
#
# On a machine with one GPU it finishes in under 8 minutes (bf16 FSDP2 SFT and GSPO steps on a
# random-init 3B-class Qwen2.5-VL, bf16 vs fp32 on the 74M model, a 2-process gradient check when
# there are 2 GPUs); --cpu runs the same stages at tiny sizes (CI). Wheels in .whl/ (e.g. math-verify
# and its dependencies, carried to a machine that lacks them) are installed first into /tmp/site.
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
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.device_count())"
exec timeout --signal=INT 470 "$PYTHON" bench/gpu_check.py "$@"
