#!/usr/bin/env bash
# Everything the GPU machine measures, in one run (device tool: carry .whl and .gpu_data; results under $OUT):
#   bash scripts/gpu_check.sh
# .whl holds the transformers wheel this project requires (the machine's own may be older);
# .gpu_data holds CIFAR-10 parquet shards for the SSL check (copied from ../shared/data, never committed).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "${RUN_SSL:-1}" = 1 ] && [ -d .gpu_data ]; then
  timeout "${SSL_TIMEOUT:-200}" python3 scripts/gpu_ssl_check.py --data .gpu_data --steps "${SSL_STEPS:-1500}" --workers 12 \
    --out "$OUT/gpu_ssl_check.json" >"$OUT/gpu_ssl_check.log" 2>&1
  echo "ssl check exit $?"; tail -n 4 "$OUT/gpu_ssl_check.log"
fi
if [ "${RUN_DATA:-1}" = 1 ]; then
  timeout "${DATA_TIMEOUT:-90}" python3 scripts/bench_data.py --device cuda --workers "${DATA_WORKERS:-8}" --count 2048 --batch-size 64 \
    --out "$OUT/bench_data_gpu.json" 2>&1 | tail -n 12
fi
if [ "${RUN_CHECK:-1}" = 1 ]; then
  timeout "${CHECK_TIMEOUT:-150}" python3 scripts/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tail -n 20
fi
if [ "${RUN_BENCH:-1}" = 1 ]; then
  timeout "${BENCH_TIMEOUT:-330}" python3 scripts/bench_model.py --device cuda ${BENCH_ARGS:-} --out "$OUT/bench_model_gpu.json" >"$OUT/bench_model_gpu.log" 2>&1
  echo "bench exit $?"
  python3 - "$OUT/bench_model_gpu.json" <<'PY'
import json, sys
try:
    document = json.load(open(sys.argv[1]))
except Exception as error:
    sys.exit(f"no bench json: {error}")
for row in document["results"]:
    print({k: v for k, v in row.items() if k in ("case", "impl", "mode", "model", "compiled", "img_per_s", "peak_mem_mib", "error")})
print(document["summary"])
PY
fi
