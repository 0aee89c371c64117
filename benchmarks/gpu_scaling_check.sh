#!/usr/bin/env bash
# The scale-out runners on a GPU machine (any number of GPUs; written for N, run on 1).
# 1. in-process runner vs one engine process per GPU (--gpus all) on the same shards:
#    same rows, similar img/s (the difference is the engine processes' start-up);
# 2. --gpus all stopped by SIGTERM mid-run, then resumed: every row exactly once;
# 3. the runner tests (CPU engines) and, if Ray is installed, the Ray runner with GPU actors.
# Output: a table on stdout and $OUT/gpu_scaling.json. Run from the repository root.
set -uo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 DVL_BATCH_CACHE=${DVL_BATCH_CACHE:-/tmp/dvl-cache}
OUT=${OUT:-/tmp/out}; DATA=${DATA:-/tmp/scale-data}; mkdir -p "$OUT"
SHARDS=${SHARDS:-48}; PER_SHARD=${PER_SHARD:-64}; ARGS=(--model tiny --max-new-tokens 32 --no-progress)
SINGLE=${SINGLE:-0}; MULTI=${MULTI:-all}  # SINGLE=cpu MULTI=cpu,cpu tries the script without a GPU
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null
python3 -c "from pathlib import Path; from tests.conftest import many_shards; many_shards(Path('$DATA'), $SHARDS, $PER_SHARD)"

declare -A SECONDS_FOR
for run in single multi; do
  mode=$SINGLE; [ $run = multi ] && mode=$MULTI
  rm -rf "${OUT:?}/run-$run"
  start=$(date +%s.%N)
  python3 -m dvl_batch caption "$DATA" -o "$OUT/run-$run" --gpus "$mode" "${ARGS[@]}" 2>&1 | grep -E "shards|images|throughput|error" | tail -4
  SECONDS_FOR[$run]=$(python3 -c "import time; print(round(time.time() - $start, 1))")
done

rm -rf "${OUT:?}/stop"
python3 -m dvl_batch caption "$DATA" -o "$OUT/stop" --gpus "$MULTI" "${ARGS[@]}" > "$OUT/stop.log" 2>&1 &
pid=$!
while [ "$(ls "$OUT"/stop/parts/*.parquet 2>/dev/null | wc -l)" -lt 3 ] && kill -0 $pid 2>/dev/null; do sleep 0.1; done
kill -TERM $pid; wait $pid; STOP_RC=$?
python3 -m dvl_batch caption "$DATA" -o "$OUT/stop" --gpus "$MULTI" "${ARGS[@]}" > "$OUT/resume.log" 2>&1; RESUME_RC=$?

python3 - "$OUT" "$SHARDS" "$PER_SHARD" "${SECONDS_FOR[single]}" "${SECONDS_FOR[multi]}" "$STOP_RC" "$RESUME_RC" <<'EOF'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
out, shards, per_shard = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def rows(folder):
    parts = sorted((folder / "parts").glob("*.parquet"))
    table = [pq.read_table(p, columns=["key", "answer"]).to_pylist() for p in parts]
    return {r["key"]: r["answer"] for t in table for r in t}, sum(len(t) for t in table)
single, n_single = rows(out / "run-single")
multi, n_multi = rows(out / "run-multi")
resumed, n_resumed = rows(out / "stop")
expected = shards * per_shard
report = {
    "images": expected,
    "in_process_seconds": float(sys.argv[4]), "engine_processes_seconds": float(sys.argv[5]),
    "rows_in_process": n_single, "rows_engine_processes": n_multi,
    # greedy answers; in bf16 a different batch mix may flip near-ties of the random tiny model
    "answers_equal_fraction": round(sum(single.get(k) == v for k, v in multi.items()) / max(len(multi), 1), 4),
    "sigterm_exit_code": int(sys.argv[6]), "resume_exit_code": int(sys.argv[7]),
    "rows_after_resume": n_resumed, "unique_after_resume": len(resumed),
}
report["ok"] = (n_single == n_multi == n_resumed == len(resumed) == expected
                and report["sigterm_exit_code"] == 130 and report["resume_exit_code"] == 0)
(out / "gpu_scaling.json").write_text(json.dumps(report, indent=2) + "\n")
for key, value in report.items():
    print(f"{key:<28} {value}")
EOF

python3 -m pytest -q tests/test_runtime_runners.py -k "not ray" 2>&1 | tail -3
if python3 -c "import ray" 2>/dev/null; then
  rm -rf "${OUT:?}/ray"
  python3 -m dvl_batch caption "$DATA" -o "$OUT/ray" --runner ray "${ARGS[@]}" 2>&1 | grep -E "shards|images|throughput|error" | tail -4
  python3 -m pytest -q tests/test_runtime_runners.py tests/test_ray_data.py -k "ray" 2>&1 | tail -3
fi
