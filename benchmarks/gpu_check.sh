#!/usr/bin/env bash
# One device call: install carried wheels, check the environment, run the GPU tests,
# profile the engine's phases and run the product benchmark. Output under $OUT.
# The GPU box is offline and lacks webdataset/typer/torchao: first, on a machine with PyPI,
#   pip download --no-deps -d .whl webdataset braceexpand "typer<0.20" "click<8.3" annotated-doc shellingham rich markdown-it-py mdurl pygments torchao
# (plus pydantic if the box lacks it; check with `python3 -c "import pydantic"`)
# and carry .whl with the call. Usage: bash benchmarks/gpu_check.sh tests|profile|attn|bench|all
set -uo pipefail
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 DVL_BATCH_CACHE=/tmp/dvl-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
STEP=${1:-all}
if [[ $STEP == all || $STEP == tests ]]; then
  python3 -m pytest -q -s -p no:warnings tests/test_gpu.py 2>&1 | grep -E "passed|failed|FAILED|Error|assert|bfloat16" | cut -c1-400 | head -20
fi
if [[ $STEP == all || $STEP == profile ]]; then
  python3 benchmarks/profile_engine.py --out "$OUT/profile.json" 2>&1 | grep -v Warning | tail -60
fi
if [[ $STEP == all || $STEP == attn ]]; then
  python3 benchmarks/prefill_attention.py --json "$OUT/prefill-attention.json" 2>&1 | grep -v Warning | tail -40
fi
if [[ $STEP == all || $STEP == bench ]]; then
  python3 -m dvl_batch bench --profile ${PROFILE:-both} --requests ${REQUESTS:-2048} --out "$OUT/bench.json" --data-dir /tmp/bench-data ${BENCH_ARGS:-} 2>&1 | tail -40
fi
