"""The mismatch check: do all ranks call the same all_reduce?

Before any data moves, every rank sends a five-number fingerprint of its call
(numel, dtype, op, algo, options; 40 bytes) to every other rank, all at once,
so every rank sees every rank's fingerprint after one round::

    rank r: send row r to each peer, receive row q from each peer q   (one round)

One round rather than a ring all-gather's P-1 steps, because on a loaded
machine a round costs a scheduler wake-up (about a millisecond on the 2-core
machine we measure on), not bandwidth.

If any row differs, every rank raises ``MismatchError`` naming the ranks and
the field, and the tensor is untouched. Without the check a size mismatch is
not a clean error: Gloo aborts the whole process (SIGABRT) when a message
arrives larger than the buffer posted for it, and a dtype mismatch silently
reinterprets bytes.

Cost: one latency-bound round of 2(P-1) tiny messages, about alpha; see the
README for figures.
It is on by default; ``check=False`` or RINGCOMM_CHECK=0 turns it off.
"""

from __future__ import annotations

import os
import zlib

import torch

from .buffers import ScratchPool
from .errors import MismatchError
from .ops import OPS, SUPPORTED_DTYPES
from .transport import Transport

__all__ = ["check_enabled", "check_same_call", "FIELDS"]

FIELDS = ("numel", "dtype", "op", "algo", "options")
_TAG = 7  # distinct from the algorithms' tags
_SLOT = 31  # scratch slot for the fingerprint table


def check_enabled(check: bool | None) -> bool:
    """``check`` if given, else RINGCOMM_CHECK (default on; "0", "off", "false" turn it off)."""
    if check is not None:
        return bool(check)
    return os.environ.get("RINGCOMM_CHECK", "1").strip().lower() not in ("0", "off", "false", "no")


def _code(text: str) -> int:
    return zlib.crc32(text.encode())  # stable across processes, unlike hash()


def _describe(field: str, value: int, algo_names: dict[int, str]) -> str:
    if field == "dtype":
        return str(SUPPORTED_DTYPES[value]).replace("torch.", "")
    if field == "op":
        return OPS[value]
    if field == "algo":
        return algo_names.get(value, str(value))
    if field == "options":
        return f"options#{value:08x}"
    return str(value)


def check_same_call(
    flat: torch.Tensor,
    op: str,
    algo: str,
    options: dict,
    transport: Transport,
    deadline: float,
    scratch: ScratchPool,
) -> None:
    """Raise ``MismatchError`` on every rank unless all ranks passed the same call."""
    rank, p = transport.rank, transport.world_size
    if p == 1:
        return
    table = scratch.get(
        p * len(FIELDS), like=torch.empty(0, dtype=torch.int64, device=flat.device), slot=_SLOT
    )
    table = table.view(p, len(FIELDS))
    mine = [
        flat.numel(),
        SUPPORTED_DTYPES.index(flat.dtype),
        OPS.index(op),
        _code(algo),
        _code(repr(sorted(options.items()))),
    ]
    table[rank] = torch.tensor(mine, dtype=torch.int64)
    peers = [q for q in range(p) if q != rank]
    pending = [transport.irecv(table[q], q, _TAG) for q in peers]
    pending += [transport.isend(table[rank], q, _TAG) for q in peers]
    for request in pending:
        transport.wait(request, deadline)
    rows = table.cpu().tolist()
    if all(row == rows[0] for row in rows):
        return
    algo_names = {_code(algo): algo}
    problems = []
    for i, field in enumerate(FIELDS):
        values = {}
        for r, row in enumerate(rows):
            values.setdefault(row[i], []).append(r)
        if len(values) > 1:
            parts = [f"ranks {ranks} {_describe(field, v, algo_names)}" for v, ranks in values.items()]
            problems.append(f"{field} differs: " + "; ".join(parts))
    raise MismatchError(
        f"rank {rank}: ranks called all_reduce differently ({', '.join(problems)}); "
        "nothing was reduced, the tensor is untouched"
    )
