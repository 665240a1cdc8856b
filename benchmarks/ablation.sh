#!/bin/sh
# The runs behind the README's ablation table ("How far can an MLP go"), in its row order.
# Each is a plain `train`; its figures land in runs/ablation/<row>-seed<seed>/metrics.json. The table's runs
# used one BLAS thread each, two at a time (OPENBLAS_NUM_THREADS=1); with another thread count
# the figures differ by a few tenths. Each row takes 2-10 minutes on a 2-core machine.
# Usage: [SEED=1] sh benchmarks/ablation.sh [ROW ...]   (default: every row, seed 42)
set -e
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
flags() {
    # Rows 3-16 build on row 4, the best recipe before AdamW (L2 instead of weight decay);
    # rows 17-22 vary today's --recipe best, which is row 19.
    b4="--recipe best --l2 1e-4 --weight-decay 0"
    case "$1" in
        0)  echo "" ;;
        1)  echo "--flip 0.5" ;;
        2)  echo "--flip 0.5 --hidden 1024,512,256" ;;
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
        17) echo "--recipe best --weight-decay 0.05" ;;
        18) echo "--recipe best --weight-decay 0.2" ;;
        19) echo "--recipe best" ;;
        20) echo "--recipe best --weight-decay 1" ;;
        21) echo "--recipe best --epochs 100" ;;
        22) echo "--recipe best --hidden 2048,512,256" ;;
        c1) echo "--lr-schedule cosine --epochs 60 --patience 0" ;;
        c2) echo "$b4 --flip 0 --no-flip-average" ;;
        c3) echo "$b4 --limit 40000" ;;
        *)  echo "unknown row $1" >&2; exit 2 ;;
    esac
}
for row in ${@:-0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 c1 c2 c3}; do
    f=$(flags "$row")
    echo "row $row: python fmnist.py train $f"
    out="runs/ablation/$row-seed${SEED:-42}"
    mkdir -p runs/ablation
    python fmnist.py train $f --seed "${SEED:-42}" --out "$out" --quiet > "$out.log"  # set -e stops on failure
    grep -E "^(best epoch|test:)" "$out.log"
done
