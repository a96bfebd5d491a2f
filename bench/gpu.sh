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

step() { echo; echo "== $* ($(date -u +%T))"; }

step "training throughput, eager"
timeout 150 "$PY" bench/bench_train.py --device cuda --batch-size 64 --samples 1536 --repeats 3 --json "$TMP/train_eager.json" || echo "eager benchmark failed ($?)"
step "training throughput, torch.compile"
timeout 240 "$PY" bench/bench_train.py --device cuda --batch-size 64 --samples 1536 --repeats 3 --compile --json "$TMP/train_compiled.json" || echo "compiled benchmark failed or timed out ($?)"
step "NCCL fedavg vs raw all-reduce (1 rank per GPU)"
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
timeout 120 "$PY" bench/bench_aggregate.py --device cuda --ranks "$NGPU" --rounds 21 --json "$TMP/aggregate.json" || echo "aggregate benchmark failed ($?)"
step "stain normalization on the GPU"
timeout 120 "$PY" bench/bench_stain.py --device cuda --json "$TMP/stain.json" || echo "stain benchmark failed ($?)"
step "CUDA tests"
timeout 180 "$PY" -m pytest -q tests/test_stain.py -k "cuda or gpu" 2>&1 | tail -5 || true
step "real run: NCCL path, 1 rank, resnetrs50, bf16"
timeout 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train.py --config configs/demo.toml \
  --backbone resnetrs50 --set data.context_size=320 --set data.detail_size=224 --batch-size 32 --rounds 1 \
  --num-hospitals "$NGPU" --out "$TMP/run_nccl" 2>&1 | tail -8 || echo "NCCL run failed"
step "real run: 3 ranks sharing the GPU(s) (gloo on CUDA tensors)"
timeout 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node=3 train.py --config configs/demo.toml \
  --rounds 1 --out "$TMP/run_shared" 2>&1 | tail -6 || echo "shared-GPU run failed"

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
