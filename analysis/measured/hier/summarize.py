"""The table of docs/two-level.md from this folder's runs (``run.sh``), beside the alpha-beta model.

    python analysis/measured/hier/summarize.py          # from the repository root

The training table comes from ``train.sh``'s runs (``train-2x2-LINK-PLACEMENT-ALGO-REP.json``, each a
launch.py metrics.json): images per second as launch.py reports it (all 20 steps) and over steps
2-20 (the first step also builds the groups and warms up), each run's share of time in the hook, and
per rep the ratio to hier's run of the same rep. ``hier-ring`` is hier with ``hier_inner=ring``.

Each run's bench row holds the median of its samples (slowest rank); across the runs of one
placement the table shows the median of those medians and their range, and the median of each
run's ratio to hier's time in that run. The model: beta from the
link (8 bits per byte over 500 Mbit/s, 1514-byte frames carrying 1448 bytes of data), alpha the
shipped torch fit's per-message cost (``auto.DEFAULT_FITS``, P = nodes for hier's network level,
P = N for the flat ones), shared memory's ring fit inside the node (``cost.HIER``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from ringcomm import cost
from ringcomm.auto import DEFAULT_FITS

HERE = Path(__file__).resolve().parent
BETA_LINK = 8 / 500e6 * 1514 / 1448  # seconds per byte of data on a 500 Mbit/s Ethernet link
SIZE = 16 << 20


def _alpha(p: int, algo: str = "ring") -> float:
    fits = DEFAULT_FITS["torch"]
    return fits[min(fits, key=lambda q: (abs(q - p), q))][algo][0]


def model(nodes: int, g: int) -> dict[str, float]:
    """Predicted seconds of hier and of the flat ring in either placement (Gloo's: the contiguous ring's)."""
    world = nodes * g
    shm = DEFAULT_FITS["shm"][min(DEFAULT_FITS["shm"], key=lambda q: (abs(q - g), q))]["ring"]
    hier = cost.HIER.time(nodes, g, SIZE, shm, (_alpha(nodes), BETA_LINK))
    flat = {
        placement: 2 * (world - 1) * _alpha(world) + cost.flat_ring_link_bytes(nodes, g, SIZE, placement) * BETA_LINK
        for placement in cost.PLACEMENTS
    }
    return {"hier": hier, "ring contiguous": flat["contiguous"], "ring interleaved": flat["interleaved"]}


def runs_of(nodes: int, g: int = 2) -> list[tuple[str, dict[str, float]]]:
    """(placement, {algo: seconds}) of every run of ``nodes`` x ``g``, right rows only."""
    out = []
    for path in sorted(HERE.glob(f"{nodes}x{g}-*.json")):
        rows = json.loads(path.read_text())["rows"]
        out.append((path.stem.split("-")[1], {r["algo"]: r["time_us"] / 1e6 for r in rows if r["size_bytes"] == SIZE and not r["wrong"]}))
    return out


def table(nodes: int, g: int = 2) -> str:
    """Per algorithm and placement: the median time over the runs (and its range), the model, and the
    median over the runs of time / hier's time in the same run (the same world, the same minute)."""
    runs = runs_of(nodes, g)
    if not runs:
        return f"(no runs of {nodes} x {g} in {HERE})"
    predicted = model(nodes, g)
    lines = [
        f"{nodes} nodes x {g} ranks, 16 MiB float32, 500 Mbit/s links, {len(runs)} runs",
        "",
        "| algorithm, placement | time: median (range) | model | / hier, same run: median (range) | / hier, model |",
        "|---|---|---|---|---|",
    ]
    for algo in ("hier", "ring", "gloo"):
        for placement in cost.PLACEMENTS:
            mine = [r for p, r in runs if p == placement and algo in r and "hier" in r]
            if not mine:
                continue
            times = [r[algo] for r in mine]
            ratios = [r[algo] / r["hier"] for r in mine]
            want = predicted["hier"] if algo == "hier" else predicted[f"ring {placement}"]
            lines.append(
                f"| {algo}, {placement} | {statistics.median(times) * 1e3:.0f} ms ({min(times) * 1e3:.0f}–"
                f"{max(times) * 1e3:.0f}) | {want * 1e3:.0f} ms | {statistics.median(ratios):.2f} "
                f"({min(ratios):.2f}–{max(ratios):.2f}) | {want / predicted['hier']:.2f} |"
            )
    return "\n".join(lines)


def _steady_img_s(m: dict) -> float:
    """Images per second over steps 2..: the global batch over the mean step time after the first."""
    steps = [r["step_time_s"] for r in m["step_records"][1:]]
    return m["global_batch_size"] / (sum(steps) / len(steps))


def train_table(link: str) -> str:
    """Per placement and algorithm: img/s (launch.py's, and steps 2-20), comm share, and / hier's run of
    the same rep (img/s over steps 2-20: above 1 is faster than hier), median (range) over the reps."""
    runs: dict[tuple[str, str], dict[str, dict]] = {}
    for path in sorted(HERE.glob(f"train-2x2-{link}-*.json")):
        parts = path.stem.split("-")  # train, 2x2, LINK, PLACEMENT, ALGO (hier-ring has a dash), REP
        placement, algo, rep = parts[3], "-".join(parts[4:-1]), parts[-1]
        runs.setdefault((placement, rep), {})[algo] = json.loads(path.read_text())
    if not runs:
        return f"(no training runs at {link} in {HERE})"

    def cell(values: list[float], fmt: str) -> str:
        med = format(statistics.median(values), fmt)
        return med if len(values) == 1 else f"{med} ({format(min(values), fmt)}–{format(max(values), fmt)})"

    reps = len({rep for _, rep in runs})
    lines = [
        f"2 nodes x 2 ranks, {link} links, simplecnn, 32 images per rank, 20 steps, {reps} rep(s)",
        "",
        "| placement | algo | img/s (launch.py) | img/s, steps 2-20 | comm share | / hier, steps 2-20 |",
        "|---|---|---|---|---|---|",
    ]
    for placement in cost.PLACEMENTS:
        for algo in ("hier", "hier-ring", "ring", "ddp"):
            mine = [by_algo for (pl, _), by_algo in runs.items() if pl == placement and algo in by_algo]
            if not mine:
                continue
            ms = [r[algo] for r in mine]
            ratios = [_steady_img_s(r[algo]) / _steady_img_s(r["hier"]) for r in mine if "hier" in r]
            shares = [m["comm_share"] for m in ms if m.get("comm_share") is not None]
            lines.append(
                f"| {placement} | {algo} | {cell([m['throughput_img_s'] for m in ms], '.0f')} | "
                f"{cell([_steady_img_s(m) for m in ms], '.0f')} | {cell([s * 100 for s in shares], '.0f') + ' %' if shares else '–'} | "
                f"{cell(ratios, '.2f') if ratios else '–'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    for nodes in [int(a) for a in sys.argv[1:]] or [2, 4]:
        print(table(nodes))
        print()
    for link in ("500mbit", "100mbit"):
        print(train_table(link))
        print()
