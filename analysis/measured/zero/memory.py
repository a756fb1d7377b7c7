"""Peak memory and optimizer state per rank for --zero 0/1/2: one ``launch.py`` process tree per run.

``peak_memory_bytes`` is each rank's ``ru_maxrss``, a high-water mark of the whole process, so every
run needs processes of its own (``steptime.py`` runs several in one world and cannot measure it).
Runs ``launch.py`` of the tree given by ``--tree`` (default: this checkout), ResNet-18 with AdamW on
the synthetic set (no download), a few steps of a small batch; prints one JSON line per run and
writes them all to ``--json``.

    python analysis/measured/zero/memory.py --world-sizes 2 4 --json analysis/measured/zero/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[3]


def run_one(tree: Path, world_size: int, zero: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable, "launch.py", "--algo", "ring", "--transport", "torch", "--world-size", str(world_size),
        "--model", args.model, "--optimizer", "adamw", "--lr", "1e-3", "--zero", str(zero),
        "--dataset", "synthetic", "--synthetic-size", "512", "--batch-size", str(args.batch_size),
        "--max-steps", str(args.steps), "--eval-batches", "1", "--eval-batch-size", "16", "--log-every", "1000",
        "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, timeout=1200)
    m = json.loads((out / "metrics.json").read_text())
    return {
        "tree": str(tree), "world_size": world_size, "zero": zero, "model": args.model, "optimizer": "adamw",
        "steps": m["steps"], "batch_size": args.batch_size, "parameters": m["parameters"],
        "optimizer_state_bytes_per_rank": m["optimizer_state_bytes_per_rank"],
        "peak_memory_bytes_per_rank": m["peak_memory_bytes_per_rank"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=HERE)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--zeros", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for p in args.world_sizes:
            for zero in args.zeros:
                row = run_one(args.tree.resolve(), p, zero, args, Path(root) / f"p{p}-z{zero}")
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
