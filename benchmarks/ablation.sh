#!/bin/sh
# The runs behind the README's ablation table ("How far can an MLP go"), in its row order.
# Each is a plain `train`; its figures land in runs/ablation/<row>-seed<seed>/metrics.json. The table's runs
# used one BLAS thread each, two at a time (OPENBLAS_NUM_THREADS=1); with another thread count
# the figures differ by a few tenths. Each row takes 2-10 minutes on a 2-core machine.
# Usage: [SEED=1] sh benchmarks/ablation.sh [ROW ...]   (default: every row, seed 42)
# A row whose run finished before is skipped (delete its folder to redo it); an interrupted one
# is resumed. Each run's output goes to runs/ablation/<row>-seed<seed>.log.
set -e
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
flags() {
    # Rows 3-16 build on row 4, the best recipe before AdamW (L2 instead of weight decay);
    # rows 17-23 and 30 vary row 19 (AdamW), rows 24-29 and 31 row 23 (one-pixel shifts).
    # Rows 0-16 and c1-c3 ran when the L2 term's gradient was 2 lambda W, the report's term as
    # written; since the default became (lambda/2) sum ||W||^2 (README: Results), that is --l2 2e-4.
    # Row 0b is the report's recipe as `train` runs it now.
    r0="--l2 2e-4"
    b19="--recipe best-bn --no-batch-norm"
    b4="$b19 --l2 2e-4 --weight-decay 0"
    case "$1" in
        0)  echo "$r0" ;;
        0b) echo "" ;;
        1)  echo "$r0 --flip 0.5" ;;
        2)  echo "$r0 --flip 0.5 --hidden 1024,512,256" ;;
        3)  echo "$b4 --no-flip-average" ;;
        4)  echo "$b4" ;;
        5)  echo "$b4 --label-smoothing 0.1" ;;
        6)  echo "$b4 --average 0.5" ;;
        7)  echo "$b4 --shift 1" ;;
        8)  echo "$b4 --epochs 100" ;;
        9)  echo "$b4 --epochs 100 --dropout 0.4" ;;
        10) echo "$b4 --dropout 0.2" ;;
        11) echo "$b4 --lr 2e-3" ;;
        12) echo "$b4 --hidden 2048,512,256" ;;
        13) echo "$b4 --hidden 1024,1024,512,256" ;;
        14) echo "$b4 --input-dropout 0.1" ;;
        15) echo "$b4 --input-dropout 0.2" ;;
        16) echo "$b4 --cutout 8" ;;
        17) echo "$b19 --weight-decay 0.05" ;;
        18) echo "$b19 --weight-decay 0.2" ;;
        19) echo "$b19" ;;
        20) echo "$b19 --weight-decay 1" ;;
        21) echo "$b19 --epochs 100" ;;
        22) echo "$b19 --hidden 2048,512,256" ;;
        23) echo "$b19 --shift 1" ;;
        24) echo "$b19 --shift 1 --dropout 0.1" ;;
        25) echo "$b19 --shift 1 --dropout 0" ;;
        26) echo "--recipe best-shift" ;;                  # 25 with weight decay 0.2
        27) echo "--recipe best-shift --weight-decay 0.1" ;;
        28) echo "$b19 --shift 1 --dropout 0 --epochs 100" ;;
        29) echo "--recipe best-shift --shift 2" ;;
        30) echo "--recipe best-bn" ;;                     # 19 + batch norm
        31) echo "--recipe best-single" ;;                 # 26 + batch norm
        32) echo "--recipe best" ;;                        # the ensemble of 30 and 26
        c4) echo "$b19 --dropout 0" ;;
        c1) echo "$r0 --lr-schedule cosine --epochs 60 --patience 0" ;;
        c2) echo "$b4 --flip 0 --no-flip-average" ;;
        c3) echo "$b4 --limit 40000" ;;
        *)  echo "unknown row $1" >&2; exit 2 ;;
    esac
}
for row in ${@:-0 0b 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 c1 c2 c3 c4}; do
    f=$(flags "$row")
    echo "row $row: python fmnist.py train $f"
    out="runs/ablation/$row-seed${SEED:-42}"
    mkdir -p runs/ablation
    if [ -f "$out/metrics.json" ]; then          # finished before: keep it (delete it to redo)
        echo "  already done in $out"
    elif [ -f "$out/state.npz" ] || [ -f "$out/ensemble.json" ]; then   # interrupted: continue it, bit for bit
        python fmnist.py train --resume "$out" --quiet > "$out.log.part"   # set -e stops on failure
        mv "$out.log.part" "$out.log"
    else
        python fmnist.py train $f --seed "${SEED:-42}" --out "$out" --quiet > "$out.log.part"
        mv "$out.log.part" "$out.log"
    fi
    grep -E "^(best epoch|test:)" "$out.log" || true
done
