"""Step time of ring training against --zero 1 and --zero 2, in one world (start-up paid once).

Runs ``trainer.loop.train`` from whatever tree is first on ``PYTHONPATH`` (so the same script
times an older checkout: ``PYTHONPATH=/path/to/old python analysis/measured/zero/steptime.py``),
``--rounds`` times the three runs ring, --zero 1, --zero 2 in turn (interleaved: a slow minute
of a shared machine falls on all three), simplecnn on the synthetic set, the torch transport.
Prints one JSON line: per stage, each round's median and fastest step time (seconds) over steps
6..N (the first five hold the warm-up), from rank 0's ``step_records``. On a machine shared with
other jobs the fastest step is the steadier figure: contention only ever adds time.

    PYTHONPATH=. python analysis/measured/zero/steptime.py --world-size 4 --steps 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any


def _worker(rank: int, world_size: int, root: str, steps: int, rounds: int, optimizer: str) -> dict[str, Any]:
    import torch

    from trainer.loop import TrainConfig, train

    times: dict[str, list[float]] = {"0": [], "1": [], "2": []}
    fastest: dict[str, list[float]] = {"0": [], "1": [], "2": []}
    for r in range(rounds):
        for zero in (0, 1, 2):
            cfg = TrainConfig(
                algo="ring", transport="torch", dataset="synthetic", max_steps=steps, eval_batches=1,
                log_every=1000, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3, zero=zero,
                out=str(Path(root) / f"r{r}-z{zero}"),
            )
            metrics = train(cfg, rank, world_size, torch.device("cpu"))
            if metrics is not None:
                step_times = [rec["step_time_s"] for rec in metrics["step_records"][5:]]
                times[str(zero)].append(statistics.median(step_times))
                fastest[str(zero)].append(min(step_times))
    return {"median": times, "min": fastest}


def main() -> None:
    from ringcomm.tools.spawn import run_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = run_world(
            _worker, args.world_size, (root, args.steps, args.rounds, args.optimizer), timeout=1800
        )
    print(json.dumps({"label": args.label, "world_size": args.world_size, "optimizer": args.optimizer,
                      "median_step_time_s": results[0]["median"], "min_step_time_s": results[0]["min"]}))


if __name__ == "__main__":
    main()
