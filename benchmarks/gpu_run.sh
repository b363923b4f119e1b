#!/usr/bin/env bash
# The GPU check: the `gpu` tests, then the benchmarks whose CUDA figures
# BENCHMARKS.md reports. Run from the repository root; reports and logs go to ${OUT:-gpu-out}.
#   bash benchmarks/gpu_run.sh [quick]      (quick: tests and the two LoRA benchmarks only)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 120 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
timeout 80 python3 -m benchmarks.lora_overhead --device cuda --out "$OUT/lora_overhead_cuda.json" >/dev/null 2>"$OUT/lo.err" \
  || tail -5 "$OUT/lo.err"
timeout 80 python3 -m benchmarks.lora_overhead --device cuda --adapter-dtype float16 \
  --out "$OUT/lora_overhead_fp16_cuda.json" >/dev/null 2>"$OUT/lo16.err" || tail -5 "$OUT/lo16.err"
timeout 120 python3 -m benchmarks.engine_lora --device cuda --out "$OUT/engine_lora_cuda.json" >/dev/null 2>"$OUT/el.err" \
  || tail -5 "$OUT/el.err"
if [ "${1:-}" != quick ]; then
timeout 200 python3 -m benchmarks.train_fused --device cuda --steps 20 --rounds 1 --out "$OUT/train_fused_cuda.json" \
  >/dev/null 2>"$OUT/tf.err" || tail -5 "$OUT/tf.err"
fi
for f in "$OUT"/*.json; do python3 - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[1].split("/")[-1], {k: v for k, v in r.items() if "ratio" in k or "over" in k or k.endswith("_best")})
PY
done
