"""The trainer's names, known without torch: what launch.py offers and the files a run writes.

``launch.py`` parses its command line before importing torch (``--help`` and a mistake
answer at once); the trainer's modules take these names from here, so there is one list
of each: ``models.MODELS`` is checked against ``MODEL_NAMES`` when it is built.
"""

from __future__ import annotations

__all__ = ["CHECKPOINT_NAME", "DATASET_NAMES", "METRICS_NAME", "MODEL_NAMES", "SCHEDULE_NAMES"]

#: ``--model``: ``models.MODELS``'s keys, in its order.
MODEL_NAMES: tuple[str, ...] = ("simplecnn", "resnet18", "resnet50")
#: ``--dataset`` (``data.DATASETS``).
DATASET_NAMES: tuple[str, ...] = ("auto", "cifar10", "fashion-mnist", "synthetic")
#: ``--schedule``: the learning-rate schedules after warmup (``loop.SCHEDULES``).
SCHEDULE_NAMES: tuple[str, ...] = ("cosine", "multistep", "constant")
#: The checkpoint's file name in a run's folder (``checkpoint.CHECKPOINT_NAME``).
CHECKPOINT_NAME = "checkpoint.pt"
#: The metrics' file name in a run's folder (``loop.METRICS_NAME``).
METRICS_NAME = "metrics.json"
