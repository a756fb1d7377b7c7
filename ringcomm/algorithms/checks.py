"""The algorithms' option checks, without torch: written once, run by the API and by the command lines.

``registry.py`` validates an ``all_reduce`` call's options with ``check_options`` (after
completing them with the algorithm's defaults); ``python -m ringcomm.bench`` and ``launch.py``
run the same function on what the user typed, with the world size they are about to start,
before any process is spawned (a bad ``ps:5`` at P=2 is one line, not a world's traceback)::

    check_options({"ps_shards": 5}, world_size=2)
    ValueError: ps_shards=5 is out of range for a world of P=2; pass an integer 1 <= ps_shards <= 2 ...

Each option name has one check (``OPTION_CHECKS``); an option not listed there has no range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = ["OPTION_CHECKS", "check_options", "check_ps_options"]


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _at_least_one(name: str, value: object, world_size: int) -> None:
    if not _integer(value) or value < 1:  # type: ignore[operator]
        raise ValueError(f"{name}={value!r}: expected an integer >= 1")


def _flag(name: str, value: object, world_size: int) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected True or False")


def _ps_rank(name: str, value: object, world_size: int) -> None:
    p = world_size
    if not _integer(value) or not 0 <= value < p:  # type: ignore[operator]
        raise ValueError(
            f"ps_rank={value!r} is not a rank of this world of P={p}; pass an integer 0 <= ps_rank <= {p - 1}"
        )


def _ps_shards(name: str, value: object, world_size: int) -> None:
    p = world_size
    if not _integer(value) or not 1 <= value <= p:  # type: ignore[operator]
        raise ValueError(
            f"ps_shards={value!r} is out of range for a world of P={p}; "
            f"pass an integer 1 <= ps_shards <= {p} (at most one shard per server rank)"
        )


#: option name -> check(name, value, world_size), raising ValueError that names the option and the value.
OPTION_CHECKS: dict[str, Callable[[str, object, int], None]] = {
    "segment_bytes": _at_least_one,  # ring
    "window": _at_least_one,  # ring
    "ps_rank": _ps_rank,
    "ps_shards": _ps_shards,
    "ps_overlap": _flag,
    "ps_segment_bytes": _at_least_one,
}


def check_options(options: Mapping[str, object], world_size: int) -> None:
    """Raise ValueError for the first option of ``options`` whose value is out of range at ``world_size``.

    Names are checked against the algorithm by the registry (``AlgorithmSpec.options``); a name
    without a check here passes.
    """
    for name, value in options.items():
        check = OPTION_CHECKS.get(name)
        if check is not None:
            check(name, value, world_size)


def check_ps_options(ps_rank: object, ps_shards: object, world_size: int) -> None:
    """Raise ``ValueError`` unless ``0 <= ps_rank < P`` and ``1 <= ps_shards <= P``."""
    _ps_rank("ps_rank", ps_rank, world_size)
    _ps_shards("ps_shards", ps_shards, world_size)
