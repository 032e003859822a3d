#!/usr/bin/env bash
# Training throughput of the BASE preset (~100M parameters at a 10k vocabulary) on one GPU, in under 8 minutes:
# tokens/s, MFU and padding waste for foresight.train (DeepSpeed, bf16, ZeRO-1), and tokens/s of a plain HF
# Trainer on the same model and rows, 2 rounds each (bench/train.py). Needs no input data: the timelines are
# synthetic (4,000 subjects, log-normal lengths), written once under bench/out/.
#
# On the lent GPU machine (python3 there has torch, transformers, accelerate, matplotlib; not deepspeed):
#   here, once:  echo /.whl/ >> .git/info/exclude
#                .venv/bin/pip wheel --no-deps -w .whl deepspeed==0.19.8          # DeepSpeed ships as an sdist
#                .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                    --platform manylinux_2_17_x86_64 -d .whl hjson pydantic pydantic-core annotated-types \
#                    typing-inspection
#   then run:    bash bench/gpu_train.sh            (carry: .whl)
# Record the card it prints next to the figures in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import deepspeed" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/foresight/torch_extensions}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import torch, transformers
from foresight.model import flash_attention_available
print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {torch.cuda.get_device_name(0)}, "
      f"flash-attention-2 {'yes (varlen packing)' if flash_attention_available() else 'no (SDPA with the packed mask)'}")
PY
timeout 450 "$PY" bench/train.py --synthetic 4000 --preset base --seq-len 2048 --micro-batch 16 --steps 40 \
    --warmup 10 --repeats 2 --deepspeed-config deploy/deepspeed/single_gpu.json "$@"
