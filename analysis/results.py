"""A results folder: what its files hold and how to read them. The report's one view of the schema.

``analysis.sweep --out DIR`` leaves, anywhere below DIR:

``bench/*.json``
    ``ringcomm.bench --json``: ``{"machine", "world_size", "rows"}``. ``machine`` is
    ``ringcomm.tools.bench.machine_info()``; a row is a ``ringcomm.tools.bench.BenchRow`` (``size_bytes``,
    ``count``, ``dtype``, ``algo``: the label, as ``ringcomm.tools.bench.AlgoSpec`` parses it,
    ``transport``, ``world_size``, ``time_us``: the median sample, ``algbw_gbs``, ``busbw_gbs``,
    ``wrong``, ``samples_us``).
``<kind>/<run>/metrics.json``
    one per ``launch.py`` run, as ``trainer/loop.py`` writes it. Read here: ``algo``,
    ``transport`` (None for ddp), ``backend``, ``world_size``, ``dataset``, ``steps``,
    ``batch_size_per_worker``, ``global_batch_size``, ``peak_lr``, ``train_time_s``,
    ``throughput_img_s``, ``comm_time_s`` (None for ddp), ``final_train_loss``,
    ``final_test_accuracy``, ``history`` (per epoch: ``epoch``, ``complete``, ``train_loss``,
    ``train_accuracy``, ``test_accuracy``, ``epoch_time_s``), ``classes``,
    ``per_class_accuracy`` (``{class: accuracy}``), ``confusion_matrix``, ``step_records``
    (per step: ``step_time_s``; with a ringcomm hook also ``comm_time_s``, ``bytes`` sent by
    the rank, ``buckets``) and ``config`` (the run's ``TrainConfig``).
``sweep.json``
    ``analysis.sweep``'s manifest: ``preset``, ``started``, ``seconds``, ``machine``, ``env``,
    ``cwd`` and ``runs`` (``name``, ``kind``, ``output``, ``meta``, ``command``, ``status``,
    ``seconds``, ``error``, ``log``).
``trace.json``
    a Chrome trace from ``launch.py --trace``.

A training run is held as its metrics.json dict plus ``_name``, ``_kind`` (``train``,
``batch``, ``largebatch``, ...: from sweep.json, else the top folder) and ``_meta`` (the
sweep's ``meta`` for it). The accessors below answer what the file does not say directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ringcomm.names import AlgoSpec

__all__ = [
    "KNOWN_TRAIN_SIZES",
    "Results",
    "load_results",
    "series",
    "per_worker_batch",
    "train_size",
    "per_class",
    "run_config",
]

#: Training-set sizes (images) of the datasets trainer/data.py downloads, used to turn throughput
#: into time per epoch when a run is capped by --max-steps. (synthetic's is in the run's config.)
KNOWN_TRAIN_SIZES = {"cifar10": 50_000, "fashion-mnist": 60_000}


@dataclass
class Results:
    """Everything found in a results folder.

    Attributes:
        root: the folder.
        bench_rows: bench rows, each with ``_source`` (the file, relative to root).
        machine: machine description (from sweep.json, else a bench file).
        runs: metrics.json contents, each with ``_name``, ``_kind`` and ``_meta``.
        manifest: sweep.json, or None.
        trace: trace.json path, or None.
    """

    root: Path
    bench_rows: list[dict] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    manifest: dict | None = None
    trace: Path | None = None


def load_results(root: str | Path) -> Results:
    """Read bench JSON, metrics.json, sweep.json and trace.json found below ``root``.

    A JSON file that is neither a bench document nor a metrics.json, or that does not
    parse, is skipped: a run that died mid-write leaves a gap, not a crash.
    """
    root = Path(root)
    res = Results(root=root)
    sweep = root / "sweep.json"
    if sweep.exists():
        res.manifest = json.loads(sweep.read_text())
        res.machine = dict(res.manifest.get("machine") or {})
    by_output = {str(r.get("output")): r for r in (res.manifest or {}).get("runs", [])}
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root).as_posix()
        if path.name in ("sweep.json", "analysis.json", "trace.json"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            res.bench_rows += [{**row, "_source": rel} for row in data["rows"]]
            if not res.machine and isinstance(data.get("machine"), dict):
                res.machine = dict(data["machine"])
        elif path.name == "metrics.json" and isinstance(data, dict):
            if not res.machine and isinstance(data.get("machine"), dict):  # training runs alone
                res.machine = dict(data["machine"])
            run = by_output.get(rel, {})
            kind = run.get("kind") or rel.split("/")[0]  # a folder of its own (trace_run, ...) is not train
            res.runs.append(
                {
                    **data,
                    "_name": run.get("name") or path.parent.name,
                    "_kind": kind,
                    "_meta": run.get("meta", {}),
                }
            )
    trace = root / "trace.json"
    res.trace = trace if trace.exists() else None
    return res


def run_config(m: Mapping) -> Mapping:
    """The run's ``config`` (its ``TrainConfig`` as a dict), empty when absent."""
    cfg = m.get("config")
    return cfg if isinstance(cfg, Mapping) else {}


def series(m: Mapping) -> str:
    """A training run's label, as the bench labels the same algorithm: ``ddp``, ``ring``, ``ring@zmq``."""
    algo = str(m.get("algo", "?"))
    if algo == "ddp":  # torch's own all-reduce: no ringcomm transport
        return algo
    return AlgoSpec.parse(algo, str(m.get("transport") or "torch")).label


def per_worker_batch(m: Mapping) -> int | None:
    """Images per worker per step: the sweep's meta, else metrics.json, else global / P."""
    meta = m.get("_meta") or {}
    for v in (meta.get("batch_size"), m.get("batch_size_per_worker")):
        if v:
            return int(v)
    g, p = m.get("global_batch_size"), m.get("world_size")
    return int(g) // int(p) if g and p else None


def train_size(m: Mapping) -> int | None:
    """Images in the run's training set: synthetic's from the run's config, else a known dataset's."""
    dataset = str(m.get("dataset"))
    if dataset == "synthetic" and run_config(m).get("synthetic_size"):
        return int(run_config(m)["synthetic_size"])
    return KNOWN_TRAIN_SIZES.get(dataset)


def per_class(m: Mapping) -> tuple[list[str], list[float]] | None:
    """``(classes, accuracies)`` in class order from ``per_class_accuracy``, or None when absent."""
    pca = m.get("per_class_accuracy")
    if not pca:
        return None
    classes = [c for c in (m.get("classes") or pca) if c in pca]
    return [str(c) for c in classes], [float(pca[c]) for c in classes]
