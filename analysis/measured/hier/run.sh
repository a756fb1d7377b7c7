#!/bin/sh
# The two-level all-reduce on the emulated cluster (docs/two-level.md): run as root from the repository
# root, `sh analysis/measured/hier/run.sh [NODES] [REPS]` (defaults 2 and 3). Each rep runs the same
# bench (gloo, the flat ring and hier interleaved in one world, 16 MiB) once per placement, the two
# placements alternating, so slow spells of the shared machine fall on both; every run's table goes
# to NODESx2-PLACEMENT-REP.log and its rows to the .json beside it.
set -eu
NODES=${1:-2}
REPS=${2:-3}
PY=${PY:-.venv/bin/python}
OUT=analysis/measured/hier
for rep in $(seq 1 "$REPS"); do
    for placement in contiguous interleaved; do
        name="$OUT/${NODES}x2-$placement-$rep"
        "$PY" -m analysis.cluster --nodes "$NODES" --ranks-per-node 2 --placement "$placement" --link 500mbit -- \
            "$PY" -m ringcomm.bench --algos gloo,ring,hier --sizes 16M --reps 5 --warmup 2 --json "$name.json" \
            2>&1 | grep -v 'hostname of the client socket' > "$name.log"
    done
done
