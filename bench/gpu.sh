#!/usr/bin/env bash
# Every GPU figure in one go (under 5 minutes on one H100):
#   1. dual-ResNetRS50 training throughput, bf16 + channels-last, input pipeline running,
#      without and with torch.compile, fedsim epoch vs plain loop;
#   2. NCCL fedavg vs a raw NCCL all-reduce of the same bytes;
#   3. batched Macenko/Reinhard on the GPU;
#   4. the CUDA tests (CPU/GPU stain agreement) and a short real run on the NCCL path.
# Writes bench/results/gpu-<date>.json (and copies it to $OUT when that is set).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DATE="$(date -u +%Y-%m-%d)"
RES="bench/results"; TMP="$(mktemp -d)"
mkdir -p "$RES"
export FEDSIM_CACHE="$TMP/cache"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"

BUDGET="${BUDGET:-280}"  # seconds for the whole script (under 5 minutes); later steps are skipped past it
step() { echo; echo "== $* ($(date -u +%T), ${SECONDS}s)"; }
left() { local l=$((BUDGET - SECONDS)); (( l > ${1:-30} )) && echo $(( l < $2 ? l : $2 )) || echo 0; }
run_step() {  # run_step MAX_SECONDS command...: skipped when the budget is spent
  local t; t="$(left 20 "$1")"; shift
  if (( t == 0 )); then echo "skipped: budget spent"; return 0; fi
  timeout "$t" "$@" || echo "step failed or timed out (exit $?)"
}

NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
SMALLDATA=(--set data.synthetic.patients_per_grade=3 --set data.synthetic.images_per_patient=2)

step "training throughput, eager (bf16, channels-last, 6 loader workers)"
run_step 120 "$PY" bench/bench_train.py --device cuda --batch-size 64 --samples 1536 --repeats 3 --json "$TMP/train_eager.json"
step "NCCL fedavg vs raw all-reduce ($NGPU rank(s), one per GPU)"
run_step 60 "$PY" bench/bench_aggregate.py --device cuda --ranks "$NGPU" --rounds 21 --json "$TMP/aggregate.json"
step "stain normalization on the GPU"
run_step 60 "$PY" bench/bench_stain.py --device cuda --json "$TMP/stain.json"
step "CUDA tests (CPU/GPU agreement)"
run_step 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_stain.py tests/test_gradcam.py
step "real run: NCCL path, resnetrs50 at 320/224, bf16"
run_step 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train.py --config configs/demo.toml \
  --backbone resnetrs50 --set data.context_size=320 --set data.detail_size=224 --batch-size 32 --rounds 2 \
  "${SMALLDATA[@]}" --out "$TMP/run_nccl"
step "real run: 3 ranks sharing the GPU(s): gloo on CUDA tensors"
run_step 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=3 train.py --config configs/demo.toml \
  --rounds 1 "${SMALLDATA[@]}" --out "$TMP/run_shared"
step "training throughput, torch.compile"
run_step 200 "$PY" bench/bench_train.py --device cuda --batch-size 64 --samples 1024 --repeats 2 --compile --json "$TMP/train_compiled.json"

"$PY" - "$TMP" "$RES/gpu-$DATE.json" <<'PYEOF'
import json, sys, pathlib
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out = {p.stem: json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))}
for run in ("run_nccl", "run_shared"):
    f = tmp / run / "final.json"
    if f.exists():
        out[run] = {"final_accuracy": json.loads(f.read_text())["accuracy"],
                    "rounds": [json.loads(l)["seconds"] for l in (tmp / run / "metrics.jsonl").read_text().splitlines()]}
dest.write_text(json.dumps(out, indent=2) + "\n")
print("wrote", dest)
PYEOF
if [[ -n "${OUT:-}" ]]; then cp "$RES/gpu-$DATE.json" "$OUT/"; fi
