#!/usr/bin/env bash
# Everything the GPU machine measures, in one run (device tool: carry .whl, results under $OUT):
#   bash scripts/gpu_check.sh
# .whl holds the transformers wheel this project requires (the machine's own may be older).
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
timeout "${CHECK_TIMEOUT:-150}" python3 scripts/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tail -n 20
timeout "${BENCH_TIMEOUT:-330}" python3 scripts/bench_model.py --device cuda --out "$OUT/bench_model_gpu.json" >"$OUT/bench_model_gpu.log" 2>&1
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
tail -n 5 "$OUT/bench_model_gpu.log"
