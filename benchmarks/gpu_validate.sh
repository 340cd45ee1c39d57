#!/usr/bin/env bash
# One pass of GPU validation, sized for a short lease on one CUDA GPU (about 7 minutes on an H100):
#   1. the benchmarks on CUDA, first, on a quiet machine: training at the paper's setting (d 768, width 24,576,
#      batch 16,384, bfloat16 and float32), extraction of a ViT-B/16 with parallel decoding, mining at widths
#      6,144 and 24,576;
#   2. the `gpu`-marked tests (CUDA against CPU parity: extract, train relu/topk/batchtopk in float32 and
#      bfloat16, mine, eval recon, probe; faiss-gpu when installed), each error recorded in parity.jsonl;
#   3. the rest of the suite with CUDA visible (pytest-xdist when present).
# Needs saevctl's dependencies and test extras importable (typer needs pydantic to run a command).
# Usage: bash benchmarks/gpu_validate.sh OUTDIR [PYTHON] [TARBALL]   (from the repository root; saevctl importable)
# Every step writes its log and JSON under OUTDIR and has its own time limit, so a slow step cannot hide the rest;
# with TARBALL, OUTDIR is packed into it after every step (one file to copy back, complete up to the last step).
set -u
OUT=${1:?usage: gpu_validate.sh OUTDIR [PYTHON] [TARBALL]}
PY=${2:-python3}
TARBALL=${3:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SAEVCTL_PARITY_LOG="$OUT/parity.jsonl"
step() {  # step NAME SECONDS CMD...: run with a limit, keep the log, print its tail and the exit code
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    tail -n 6 "$OUT/$name.log"
    [ -z "$TARBALL" ] || tar czf "$TARBALL" -C "$OUT" .
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)" \
    | tee -a "$OUT/gpu.txt"
"$PY" -c "import faiss; print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)" \
    | tee -a "$OUT/gpu.txt"

# A ViT-B/16 with random weights as a local-dir: model (the speed of a forward does not depend on its weights).
"$PY" - /tmp/vitb <<'EOF'
import sys, timm, torch
from timm.models._hub import save_for_hf
torch.manual_seed(0)
save_for_hf(timm.create_model("vit_base_patch16_224", pretrained=False), sys.argv[1], safe_serialization=True)
EOF
step bench-train 70 "$PY" benchmarks/train.py --device cuda --d 768 --widths 24576 --batch 16384 \
    --precisions bf16,fp32 --reps 5 --json "$OUT/bench-train.json"
step bench-extract 80 "$PY" benchmarks/extract.py --device cuda --model "local-dir:/tmp/vitb" --images 2048 \
    --batch-size 256 --layers 6,10 --repeats 3 --workers 12 --json "$OUT/bench-extract.json"
step bench-mine 80 "$PY" benchmarks/mine.py --quick --device cuda --images 8192 --repeats 3 \
    --json "$OUT/bench-mine.json"
rm -rf /tmp/vitb

XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
step gpu-tests 110 "$PY" -m pytest -v -m gpu -p no:cacheprovider -rs --tb=short tests/
step suite 240 "$PY" -m pytest -v $XDIST -m "not gpu" -p no:cacheprovider -rfs --tb=short --durations=10 tests/

echo "== parity"; cat "$OUT/parity.jsonl" 2>/dev/null
echo "== failures"; grep -h "FAILED\|ERROR " "$OUT"/*.log | sort -u | head -40
[ -z "$TARBALL" ] || tar czf "$TARBALL" -C "$OUT" .
