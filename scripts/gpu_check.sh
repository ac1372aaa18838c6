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
if [ "${RUN_SWEEP:-0}" = 1 ] && [ -d .gpu_data ]; then
  # Short-run stability study: recipe variants of the cifar10 recipe side by side on one GPU.
  variants=(
    "base:"
    "ls0.1:model.layerscale_value=0.1"
    "ls1:model.layerscale_value=1.0"
    "nobias:dino.head_mlp_bias=false"
    "ls1_sk:model.layerscale_value=1.0 centering=sinkhorn_knopp"
    "warm5:schedule.warmup_epochs=5"
  )
  for variant in "${variants[@]}"; do
    name=${variant%%:*}; overrides=${variant#*:}
    [ -n "${SWEEP_ONLY:-}" ] && [[ " $SWEEP_ONLY " != *" $name "* ]] && continue
    timeout "${SWEEP_TIMEOUT:-280}" python3 scripts/gpu_ssl_check.py --data .gpu_data --steps "${SWEEP_STEPS:-2000}" \
      --batch-size 128 --workers "${SWEEP_WORKERS:-2}" --knn-every 500 --knn-images 10000 --override $overrides \
      --out "$OUT/sweep_$name.json" >"$OUT/sweep_$name.log" 2>&1 &
  done
  wait
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
for log in sorted(pathlib.Path(sys.argv[1]).glob("sweep_*.log")):
    rows = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "step" in record:
            rows.append(f"{record['step']}:{record['dino_local_crops_loss']:.2f}/{record['teacher_entropy']:.3f}" + (f"/knn{record['knn_top1']:.3f}" if "knn_top1" in record else ""))
        elif "knn_top1_final" in record:
            rows.append(f"init {record['knn_top1_init']:.3f} final {record['knn_top1_final']:.3f} {record['img_per_s']} img/s")
    print(log.stem, " ".join(rows[::2] + rows[-1:]))
PY
fi
if [ "${RUN_CIFAR:-0}" = 1 ] && [ -d .gpu_data ]; then
  # [learns]: the cifar10 recipe as shipped on one GPU, its schedule fitted to CIFAR_STEPS, stopped by CIFAR_TIMEOUT
  # (the goal: 85% kNN within 15 GPU-minutes; one device call runs at most 10 minutes here). kNN of the EMA teacher
  # every CIFAR_KNN_EVERY steps: the first 5,000 training images as memory, the first 1,000 test images as queries.
  # (The SIGTERM of the timeout makes the trainer write a checkpoint and stop.)
  timeout -s TERM "${CIFAR_TIMEOUT:-540}" python3 -m dinov2_hf.cli train --config cifar10 "data.source=.gpu_data/train-*.parquet" \
    "monitor.source=.gpu_data/train-00000-of-00005.parquet" "monitor.test_source=.gpu_data/test-00000-of-00001.parquet" \
    monitor.train_images=5000 monitor.test_images=1000 "monitor.every=${CIFAR_KNN_EVERY:-500}" "train.max_steps=${CIFAR_STEPS:-8000}" \
    "train.num_workers=${CIFAR_WORKERS:-12}" train.log_with=none "train.save_every=${CIFAR_STEPS:-8000}" \
    "train.batch_size_per_device=${CIFAR_BATCH:-256}" train.output_dir=/tmp/cifar_run ${CIFAR_ARGS:-} >"$OUT/cifar_run.log" 2>&1
  echo "cifar exit $?"; cp /tmp/cifar_run/metrics.jsonl "$OUT/cifar_metrics.jsonl" 2>/dev/null
  python3 - "$OUT/cifar_metrics.jsonl" "${CIFAR_BATCH:-256}" <<'PY'
import json, sys
seconds, rows, batch = 0.0, [], int(sys.argv[2])
for line in open(sys.argv[1]):
    record = json.loads(line)
    seconds += batch / max(record["images_per_second"], 1e-9)  # the step's own time (kNN passes not counted)
    if "knn_top1" in record:
        rows.append(f"step {record['step'] + 1} ({seconds / 60:.1f} min): kNN {100 * record['knn_top1']:.1f}%, "
                    f"teacher entropy {record.get('teacher_entropy', float('nan')):.3f}")
print("\n".join(rows) or "no kNN logged")
PY
fi
if [ "${RUN_DISTILL:-0}" = 1 ] && [ -d .gpu_data ]; then
  # Issue 7's comparison at a scale where the teacher learns: RUN_DISTILL=1 RUN_SSL=0 RUN_DATA=0 RUN_CHECK=0 RUN_BENCH=0
  timeout "${DISTILL_TIMEOUT:-540}" python3 scripts/bench_distill.py --recipe cifar10 --data .gpu_data/train-00000-of-00005.parquet \
    --knn-source .gpu_data/test-00000-of-00001.parquet --knn-train 5000 --knn-test 2000 --batch 128 --precision bf16 \
    --teacher-steps "${DISTILL_TEACHER_STEPS:-4000}" --student-steps "${DISTILL_STUDENT_STEPS:-1000}" --prototypes 4096 --head-hidden 1024 \
    --local-crops 6 --teacher-width 384 --teacher-blocks 6 --student-width 192 --student-blocks 4 --workdir /tmp/bench_distill --workers 8 \
    --out "$OUT/bench_distill_gpu.json" >"$OUT/bench_distill_gpu.log" 2>&1
  echo "distill exit $?"; grep -E '^(teacher|scratch|distilled_[a-z]+): ' "$OUT/bench_distill_gpu.log"
  # The teacher alone (bf16, its recipe and trainer state beside it) comes back: a distillation teacher for CPU tests.
  python3 - "$OUT/distill_teacher" /tmp/bench_distill/teacher/checkpoints/checkpoint-"${DISTILL_TEACHER_STEPS:-4000}" <<'PY'
import pathlib, shutil, sys
from safetensors.torch import load_file, save_file
out, checkpoint = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
weights = load_file(checkpoint / "model.safetensors")
save_file({k: v.bfloat16().contiguous() for k, v in weights.items() if k.startswith("teacher.")}, out / "model.safetensors")
for name in ("train_config.yaml", "trainer_state.json"):
    shutil.copy(checkpoint / name, out / name)
print("teacher", sum(v.numel() for k, v in weights.items() if k.startswith("teacher.")), "parameters ->", out)
PY
fi
if [ "${RUN_TRAIN:-0}" = 1 ]; then
  timeout "${TRAIN_TIMEOUT:-240}" python3 scripts/bench_train.py --device cuda --models ${TRAIN_MODELS:-vits14 vitb14 vitl14} --batch 64 \
    --steps 10 --compile --out "$OUT/bench_train_gpu.json" 2>&1 | tail -n 6
fi
if [ "${RUN_DATA:-1}" = 1 ]; then
  timeout "${DATA_TIMEOUT:-90}" python3 scripts/bench_data.py --device cuda --workers "${DATA_WORKERS:-8}" --count 2048 --batch-size 64 \
    --out "$OUT/bench_data_gpu.json" 2>&1 | tail -n 12
  # CIFAR scale: crops.resize=device cuts the crops on the GPU (issue 18 item 2: feed 20,000 img/s).
  timeout "${DATA_TIMEOUT:-90}" python3 scripts/bench_data.py --device cuda --workers "${DATA_WORKERS:-8}" --images cifar \
    --global-size 32 --local-size 16 --count 8192 --batch-size 256 --out "$OUT/bench_data_gpu_cifar.json" 2>&1 | tail -n 12
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
