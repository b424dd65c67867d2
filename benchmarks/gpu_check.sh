#!/usr/bin/env bash
# The checks that need a GPU, in one command (issue 13; docs/benchmarks.md and docs/scale-out.md get the figures):
#   1. SimSiam ResNet-18 img/s at 32 px, bf16 and fp32: our on-device pipeline against the PIL + DataLoader one,
#      and with train.compile (torch.compile);
#   2. with 2+ GPUs, the data-parallel equivalence on NCCL: 2 processes at global batch B against 1 at B,
#      SimCLR (gathered negatives, SyncBN), SimSiam (SyncBN) and ExCB (all-reduced sizes), final weights compared;
#   3. one paper-preset run: SimSiam on CIFAR-10-LT p=100, ResNet-18, batch 1,024, $EPOCHS epochs (300 = Table 1).
# About 10-15 minutes on an H100-class GPU at EPOCHS=300; every step writes under $OUT (default gpu-check/).
#
#   bash benchmarks/gpu_check.sh [CIFAR10_ARCHIVE]        # default ../shared/data/cifar10-jpg.tar.gz
#   EPOCHS=30 STEPS=only-throughput bash benchmarks/gpu_check.sh   # STEPS: all | only-throughput | no-paper-run
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-jpg.tar.gz}
OUT=${OUT:-gpu-check}
EPOCHS=${EPOCHS:-300}
STEPS=${STEPS:-all}
PY=${PYTHON:-python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
GPUS=$(wc -l < "$OUT/gpus.txt")

echo "== 1. throughput: ours vs PIL + DataLoader, ResNet-18 and the small CNN, 32 px"
$PY benchmarks/throughput.py --device cuda --data-path "$DATA" --models resnet18,small_cnn \
    --images resnet18=32768,small_cnn=65536 --precision bf16,fp32 --batch-size 512 --workers 0,4,8 \
    --stream --out "$OUT/throughput.json" | tee "$OUT/throughput.md"
$PY benchmarks/throughput.py --device cuda --data-path "$DATA" --models resnet18 --images resnet18=32768 \
    --precision bf16 --batch-size 512 --workers 0 --warmup 10 --compile --out "$OUT/throughput-compiled.json" \
    | tee "$OUT/throughput-compiled.md"
[ "$STEPS" = only-throughput ] && exit 0

if [ "$GPUS" -ge 2 ]; then
    echo "== 2. equivalence on NCCL: 2 processes at global batch 64 against 1"
    for method in simclr simsiam excb; do  # digits: seconds per run
        config=simsiam-digits; [ $method = excb ] && config=excb-digits
        common=(--set method.name=$method --set optim.epochs=2 --set optim.batch_size=64 --set train.device=cuda
                --set train.sync_batchnorm=true --set train.progress=false --no-eval)
        $PY -m imbssl pretrain $config "${common[@]}" --run-dir "$OUT/equivalence/$method-1proc"
        torchrun --standalone --nproc-per-node 2 -m imbssl pretrain $config "${common[@]}" \
            --run-dir "$OUT/equivalence/$method-2proc"
    done
    $PY - "$OUT/equivalence" <<'EOF' | tee "$OUT/equivalence.md"
import sys
from pathlib import Path
import torch
root = Path(sys.argv[1])
print("| method | backbone tensors | largest abs difference, 2 processes - 1 |\n| --- | --- | --- |")
for method in ("simclr", "simsiam", "excb"):
    one, two = (torch.load(root / f"{method}-{n}proc" / "backbone.pt", weights_only=True) for n in (1, 2))
    one, two = one["backbone"], two["backbone"]
    diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one if one[k].is_floating_point())
    print(f"| {method} | {len(one)} | {diff:.2e} |")
EOF
else
    echo "== 2. skipped: one GPU (the NCCL equivalence needs two)"
fi
[ "$STEPS" = no-paper-run ] && exit 0

echo "== 3. paper preset: SimSiam, CIFAR-10-LT p=100, ResNet-18, $EPOCHS epochs, seed 0"
start=$SECONDS
$PY -m imbssl reproduce experiment-1 --preset paper --data "$DATA" --out "$OUT/paper-run" \
    --set 'methods=[simsiam]' --set 'subset_keys=[imbalanced-p100]' --set 'seeds=[0]' --set "base.optim.epochs=$EPOCHS"
echo "paper run: $((SECONDS - start)) s wall" | tee "$OUT/paper-run.time"
