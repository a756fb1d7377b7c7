"""Does ``--zero 1`` train as plain ring training does? 40 steps from the same seed, side by side.

Issue 23's correctness goal: a ``--zero 1`` run and a plain ring run from the same seed end with
train losses within 0.5 % of each other after 40 steps and test accuracies within 1 point, for sgd
and adamw, P = 2, 3, 4, over the torch and shm transports. simplecnn's two ZeRO buckets hold 93,472
and 1,049,994 elements: at P = 3 the first is padded by 2, at P = 4 the second (uneven shards); P = 2
divides both. Both runs see the same batches in the same order from the same initial weights; the
gradient means differ only in the order of their additions (the ring all-reduce's chunks are not
ZeRO's blocks), so any gap beyond float32 rounding amplified by 40 steps is a bug.

One world per (P, transport), start-up paid once; in it, one after another, for sgd (lr 0.05) and
adamw (lr 1e-3): ring, then ``--zero 1``; ``--zero 2`` for adamw where ``--zero2-at`` says (default
P = 3). Each run is ``trainer.loop.train`` of whatever tree is first on ``PYTHONPATH``: simplecnn,
the synthetic set (10,000 training images, 2,000 test), batch 32 per rank, 40 steps, launch.py's
other defaults (cosine schedule over the 40 steps, seed 0), then the test accuracy over the whole
test split: 2,000 images, so 1 point is 20 images.

"Final train loss" is ``metrics.json``'s ``final_train_loss``, what launch.py prints: the mean of the
per-sample cross-entropy over the 40 steps and every rank (40·32·P images). Not the last step's loss
alone (the mean over ranks of step 40, ``last step`` in the table): SGD at lr 0.05 is chaotic here
(the loss jumps from step to step), and one batch's loss at step 40 moves by 1.5 % at P = 3 between
two *plain ring* runs whose initial weights differ by 1e-8 relative: ``--nudge 1e-8`` runs that
control (a plain ring run from nudged weights, row ``nudged``), so a ZeRO gap can be read against
the gap that rounding alone makes. ``max/step`` is the largest relative gap of the per-step loss
(mean over ranks) over the 40 steps; ``weights`` is ``||w - w_ring|| / ||w_ring||`` of the final
models (parameters and BatchNorm statistics), from the checkpoints. The per-step losses come from
wrapping ``trainer.loop._train_step`` in each rank (a measurement's hook, not the loop's API).

Writes one JSON file (``--json``) and prints the table. About 25 minutes on 2 cores shared with
other jobs (load average 20), less on a quiet machine.

    PYTHONPATH=. python analysis/measured/zero/agreement.py --json analysis/measured/zero/agreement.json
    PYTHONPATH=. python analysis/measured/zero/agreement.py --world-sizes 3 --transports torch --zero2-at \\
        --nudge 1e-8 --json analysis/measured/zero/agreement-control-p3.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

LR = {"sgd": 0.05, "adamw": 1e-3}  # adamw at launch.py's --lr 0.05 diverges (docs/zero.md)
LOSS_REL = 0.005  # the goal: train losses within 0.5 %
ACC_POINTS = 1.0  # test accuracies within 1 point


def _worker(
    rank: int, world_size: int, root: str, transport: str, steps: int, zero2: bool, synthetic_size: int,
    optimizers: list[str], nudge: float,
) -> dict[str, Any]:
    import torch

    from trainer import loop
    from trainer.loop import TrainConfig, train

    losses: list[float] = []
    step_fn = loop._train_step

    def recording(*args: Any, **kwargs: Any) -> Any:
        loss, logits = step_fn(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss, logits

    loop._train_step = recording  # _train_epoch looks the name up at each step
    build_model = loop.build_model

    def nudged(name: str) -> torch.nn.Module:  # the control: the same model, each weight times (1 + nudge * N(0, 1))
        model = build_model(name)
        g = torch.Generator().manual_seed(1234)  # the same nudge on every rank (rank 0's is broadcast anyway)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + nudge * torch.randn(p.shape, generator=g))
        return model

    runs = [(opt, tag) for opt in optimizers for tag in ("z0", "z1")]
    runs += [("adamw", "z2")] if zero2 and "adamw" in optimizers else []
    runs += [(opt, "nudged") for opt in optimizers] if nudge else []
    out: dict[str, Any] = {}
    for opt, tag in runs:
        losses.clear()
        loop.build_model = nudged if tag == "nudged" else build_model
        cfg = TrainConfig(
            algo="ring", transport=transport, comm_timeout=300, dataset="synthetic", synthetic_size=synthetic_size,
            max_steps=steps, optimizer=opt, lr=LR[opt], zero=0 if tag == "nudged" else int(tag[1]), log_every=1000,
            out=str(Path(root) / f"{opt}-{tag}"),
        )
        start = time.perf_counter()
        metrics = train(cfg, rank, world_size, torch.device("cpu"))
        entry: dict[str, Any] = {"step_losses": list(losses), "wall_s": time.perf_counter() - start}
        if metrics is not None:
            entry.update(
                steps=metrics["steps"], epoch_mean_train_loss=metrics["final_train_loss"],
                test_accuracy=metrics["final_test_accuracy"], test_images=int(sum(map(sum, metrics["confusion_matrix"]))),
                peak_lr=metrics["peak_lr"], schedule=metrics["schedule"], dataset=metrics["dataset"],
            )
        out[f"{opt}-{tag}"] = entry
    loop.build_model = build_model
    if rank == 0:  # the final weights of each other run against the ring run's, from the checkpoints
        for opt, tag in runs:
            if tag != "z0":
                out[f"{opt}-{tag}"]["weight_rel_diff"] = _weight_rel_diff(
                    Path(root) / f"{opt}-z0" / "checkpoint.pt", Path(root) / f"{opt}-{tag}" / "checkpoint.pt"
                )
    return out


def _weight_rel_diff(ring: Path, sharded: Path) -> float:
    """``||w_zero - w_ring|| / ||w_ring||`` over every parameter and buffer of the two final models."""
    import torch

    a, b = (torch.load(p, weights_only=False)["model"] for p in (ring, sharded))
    diff = sum(float((b[k].double() - a[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point())
    norm = sum(float(a[k].double().pow(2).sum()) for k in a if a[k].is_floating_point())
    return (diff / norm) ** 0.5


def _compare(per_rank: list[dict[str, Any]], opt: str, tag: str) -> dict[str, Any]:
    """The ring run against another run of one world (``tag`` z1, z2 or nudged): losses (mean over ranks), accuracies.

    ``passed``: the epoch-mean train losses within 0.5 % and the test accuracies within 1 point (module
    docstring: why not the last step's loss).
    """

    def step_mean(key: str) -> list[float]:
        per = [r[key]["step_losses"] for r in per_rank]
        return [sum(col) / len(col) for col in zip(*per)]

    ring, sharded = per_rank[0][f"{opt}-z0"], per_rank[0][f"{opt}-{tag}"]
    lr, lz = step_mean(f"{opt}-z0"), step_mean(f"{opt}-{tag}")
    rel = [abs(b - a) / abs(a) for a, b in zip(lr, lz)]
    acc_diff = 100 * (sharded["test_accuracy"] - ring["test_accuracy"])
    epoch_rel = abs(sharded["epoch_mean_train_loss"] - ring["epoch_mean_train_loss"]) / ring["epoch_mean_train_loss"]
    return {
        "optimizer": opt, "run": tag, "steps": [ring["steps"], sharded["steps"]],
        "loss_ring": lr[-1], "loss_zero": lz[-1], "loss_rel_diff": rel[-1], "max_step_rel_diff": max(rel),
        "epoch_mean_loss_ring": ring["epoch_mean_train_loss"], "epoch_mean_loss_zero": sharded["epoch_mean_train_loss"],
        "epoch_mean_rel_diff": epoch_rel,
        "acc_ring": 100 * ring["test_accuracy"], "acc_zero": 100 * sharded["test_accuracy"], "acc_diff_points": acc_diff,
        "test_images": ring["test_images"], "weight_rel_diff": sharded["weight_rel_diff"],
        "passed": epoch_rel <= LOSS_REL and abs(acc_diff) <= ACC_POINTS,
        "step_losses_ring": lr, "step_losses_zero": lz,
        "wall_s": [ring["wall_s"], sharded["wall_s"]],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'config':<28} {'loss ring':>10} {'loss zero':>10} {'rel. diff':>9} {'last step':>9} {'max/step':>9} "
        f"{'weights':>8} {'acc ring':>8} {'acc zero':>8} {'pass':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        config = f"{r['optimizer']} P={r['world_size']} {r['transport']} {r['run']}"
        lines.append(
            f"{config:<28} {r['epoch_mean_loss_ring']:10.5f} {r['epoch_mean_loss_zero']:10.5f} "
            f"{r['epoch_mean_rel_diff']:9.2e} {r['loss_rel_diff']:9.2e} {r['max_step_rel_diff']:9.2e} "
            f"{r['weight_rel_diff']:8.1e} {r['acc_ring']:8.2f} {r['acc_zero']:8.2f} {'yes' if r['passed'] else 'NO':>5}"
        )
    return "\n".join(lines)


def main() -> None:
    from ringcomm.tools.spawn import run_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--transports", nargs="+", default=["torch", "shm"], choices=["torch", "shm", "zmq"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--synthetic-size", type=int, default=10_000, help="training images (test: a fifth)")
    parser.add_argument("--zero2-at", type=int, nargs="*", default=[3], help="world sizes that also run --zero 2 (adamw)")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=["sgd", "adamw"])
    parser.add_argument(
        "--nudge", type=float, default=0.0,
        help="also a control per optimizer: plain ring from initial weights times (1 + NUDGE * N(0,1)), e.g. 1e-8",
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args()

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for world_size in args.world_sizes:
        for transport in args.transports:
            zero2 = world_size in args.zero2_at
            with tempfile.TemporaryDirectory() as root:
                t0 = time.perf_counter()
                per_rank = run_world(
                    _worker, world_size,
                    (root, transport, args.steps, zero2, args.synthetic_size, args.optimizers, args.nudge),
                    timeout=1800,
                )
            tags = [(opt, "z1") for opt in args.optimizers] + ([("adamw", "z2")] if zero2 and "adamw" in args.optimizers else [])
            for opt, tag in tags + ([(opt, "nudged") for opt in args.optimizers] if args.nudge else []):
                row = {"world_size": world_size, "transport": transport, **_compare(per_rank, opt, tag)}
                rows.append(row)
                print(_table([row]).splitlines()[-1], f"({time.perf_counter() - t0:.0f} s world)", flush=True)
    table = _table(rows)
    print(table)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(), "wall_s": time.perf_counter() - started,
        "goal": {"loss_rel_diff_max": LOSS_REL, "acc_diff_points_max": ACC_POINTS},
        "settings": {"steps": args.steps, "model": "simplecnn", "dataset": "synthetic",
                     "synthetic_size": args.synthetic_size, "batch_size_per_rank": 32, "lr": LR,
                     "schedule": "cosine (launch.py's default) over the steps", "seed": 0,
                     "final_train_loss": "metrics.json's: the mean over the steps and ranks (last step's beside it)",
                     "nudge": args.nudge},
        "all_passed": all(r["passed"] for r in rows),
        "rows": rows,
        "table": table,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
