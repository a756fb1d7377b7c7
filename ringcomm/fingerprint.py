"""The mismatch check: do all ranks call the same all_reduce?

Before any data moves, the ranks pass a five-number fingerprint of their call
(numel, dtype, op, algo, options) once around the ring, so every rank sees
every rank's fingerprint (an all-gather of P rows: P-1 steps of 40 bytes)::

    step i: send row (rank - i) to the right, receive row (rank - i - 1) from the left

If any row differs, every rank raises ``MismatchError`` naming the ranks and
the field, and the tensor is untouched. Without the check a size mismatch is
not a clean error: Gloo aborts the whole process (SIGABRT) when a message
arrives larger than the buffer posted for it, and a dtype mismatch silently
reinterprets bytes.

Cost: P-1 latency-bound steps, about (P-1)·alpha; see the README for figures.
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
    left, right = (rank - 1) % p, (rank + 1) % p
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
    for step in range(p - 1):
        # At step i, send row (rank - i) and receive row (rank - i - 1).
        incoming = transport.irecv(table[(rank - step - 1) % p], left, _TAG)
        outgoing = transport.isend(table[(rank - step) % p], right, _TAG)
        transport.wait(incoming, deadline)
        transport.wait(outgoing, deadline)
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
