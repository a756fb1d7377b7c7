"""The fit ``algo="auto"`` uses in one world, the same on every rank, and the picks made with it.

::

    rank 0: tune file (auto.load_local) --publish--> store: <world>/tune = {"source", "fits"}
    rank r: first algo="auto" call      <--read once--  store          (WorldTuning.fits)
            pick(transport, device, size) = auto.choose(fits, ...)    (remembered: WorldTuning.pick)

Each rank could read its own tune file, but files differ between hosts (or one
is missing), and ranks that pick different algorithms for the same call wait
for each other forever. So rank 0's fit is the world's: it publishes it when
its session is made, and every rank reads it where first needed, within the
call's deadline.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any

from ..auto import Fits, choose, load_local, parse_fits
from ..errors import CommTimeoutError

__all__ = ["WorldTuning", "publish"]

#: Picks a rank remembers: a training run has a few bucket sizes; the bound is for anything else.
MAX_PICKS = 4096


def publish(store: Any, key: str) -> None:
    """Rank 0: put this host's fit (its tune file, or the model's defaults) under ``key``.

    Raises:
        OSError, ValueError: the tune file cannot be read or parsed (``auto.load_local``).
    """
    fits = load_local()
    store.set(key, json.dumps({"source": fits.source, "fits": _plain(fits)}))


def _plain(fits: Fits) -> dict:
    """``fits`` as the JSON a tune file holds (the ``"fits"`` member)."""
    return {
        t: {str(p): {a: {"alpha_s": ab[0], "beta_s_per_byte": ab[1]} for a, ab in algos.items()} for p, algos in worlds.items()}
        for t, worlds in fits.by_world.items()
    }


class WorldTuning:
    """Rank 0's fit as this rank reads it from ``key`` of ``store``, and the picks made with it."""

    def __init__(self, store: Any, key: str, rank: int, world_size: int) -> None:
        self.store, self.key = store, key
        self.rank, self.world_size = rank, world_size
        self._fits: Fits | None = None
        self._lock = threading.Lock()  # the comm thread and explain_auto's caller may both read it
        self._picks: dict[tuple[str, str, int, tuple[int, int] | None], str] = {}

    def fits(self, deadline: float | None = None) -> Fits:
        """The world's fit: rank 0's, read from the store once.

        Raises:
            CommTimeoutError: rank 0 has not published it by ``deadline`` (default: 30 s from now).
        """
        with self._lock:
            if self._fits is None:
                wait_s = (deadline - time.monotonic()) if deadline is not None else 30.0
                try:
                    self.store.wait([self.key], timedelta(seconds=max(wait_s, 1e-3)))
                except RuntimeError:
                    raise CommTimeoutError(
                        self.rank, 0, "reading rank 0's tune file", max(wait_s, 0.0),
                        "rank 0 has made no ringcomm call in this process group yet",
                    ) from None
                doc = json.loads(self.store.get(self.key).decode())
                self._fits = parse_fits(json.dumps({"fits": doc["fits"]}), doc["source"])
            return self._fits

    def pick(
        self, transport: str, nbytes: int, deadline: float, device: str = "cpu", nodes: tuple[int, int] | None = None
    ) -> str:
        """The algorithm ``algo="auto"`` runs for ``nbytes`` on ``transport`` with tensors on ``device``
        (a device type: torch over CUDA is NCCL, whose pick never uses Gloo's fits), remembered per
        (transport, device, size). ``nodes``: the world's (n nodes, g ranks per node), to weigh ``hier``
        (``auto.choose``). Returns the algorithm's name (the api looks it up in the registry)."""
        key = (transport, device, nbytes, nodes)
        name = self._picks.get(key)
        if name is None:
            name = choose(self.fits(deadline), transport, self.world_size, nbytes, device, nodes).algo
            if len(self._picks) < MAX_PICKS:
                self._picks[key] = name
        return name
