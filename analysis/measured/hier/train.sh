#!/bin/sh
# Training with the two-level all-reduce on the emulated cluster (docs/two-level.md, "Training"): run
# as root from the repository root, `sh analysis/measured/hier/train.sh [REPS] [LINK]` (defaults 2 and
# 500mbit). Each rep trains simplecnn on the synthetic set, 32 images per rank, 20 steps, 2 nodes x 2
# ranks behind LINK links, once per algorithm (hier, the flat ring, DDP's Gloo all-reduce) and placement,
# the runs of one rep back to back so slow spells of the shared machine fall on all of them. Each run's
# metrics.json goes to train-2x2-LINK-PLACEMENT-ALGO-REP.json, its output to the .log beside it.
# ALGOS (default "hier ring ddp") may also name hier-ring: hier with hier_inner=ring across the nodes.
set -eu
REPS=${1:-2}
LINK=${2:-500mbit}
ALGOS=${ALGOS:-hier ring ddp}
PY=${PY:-.venv/bin/python}
OUT=analysis/measured/hier
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for rep in $(seq 1 "$REPS"); do
    for placement in contiguous interleaved; do
        for algo in $ALGOS; do
            name="$OUT/train-2x2-$LINK-$placement-$algo-$rep"
            case $algo in
                hier-ring) flags="--algo hier --comm-option hier_inner=ring" ;;
                *) flags="--algo $algo" ;;
            esac
            "$PY" -m analysis.cluster --nodes 2 --ranks-per-node 2 --placement "$placement" --link "$LINK" -- \
                "$PY" launch.py $flags --transport torch --dataset synthetic --batch-size 32 \
                --max-steps 20 --eval-batches 1 --log-every 10 --out "$TMP/$placement-$algo-$rep" \
                2>&1 | grep -v 'hostname of the client socket' > "$name.log"
            cp "$TMP/$placement-$algo-$rep/metrics.json" "$name.json"
        done
    done
done
