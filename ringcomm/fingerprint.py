"""The same-call check: do all ranks call the same all_reduce?

Before any data moves, every rank publishes a fingerprint of its call and reads
everyone's, on the call board when the ranks share a host, else in the store::

    rank r, call n:   publish [numel, dtype, op, algo, transport, device, options]
                      wait until all P fingerprints of call n are there, read them   (one round)

If any differs, every rank raises ``MismatchError`` naming the ranks and the
field, and the tensor is untouched. Without the check a size mismatch is not a
clean error: Gloo aborts the whole process (SIGABRT) when a message arrives
larger than the buffer posted for it, and a dtype mismatch silently
reinterprets bytes.

**Why not the transport.** Ranks that pass different transports would each
wait for the other's fingerprint on its own transport and hang; the check needs
a channel common to all of them. On one host that is the call board in shared
memory (``board.py``: a few microseconds); across hosts, the store. A rank
whose call is refused (a ``ValueError`` on that rank only) publishes its
refusal in its slot instead, so the others raise at once rather than wait for a
fingerprint that never comes; it then reads the others' entries like any
checked call, so that it stays in step with them (see ``refuse``). And a wait
in the store can be cut into slices that look at the missing ranks'
heartbeats (``session.gather``), which a Gloo receive cannot.

Options are compared after the algorithm's defaults are filled in
(``algorithms.AlgorithmSpec.options``): ``ps_rank=0`` and no ``ps_rank`` are the
same call.

Keys are deleted two calls later by the rank that wrote them: a rank starts
call n only after reading every key of call n-1 (a refused call's too), which
every rank wrote only after finishing call n-2, so by then nobody reads call
n-2's keys. The board's two slots per rank rest on the same order.

Cost: on one host, a write, P-1 doorbell rings and a look at the board; across
hosts, three store round trips per call (write, wait, read) plus one to delete;
see the README's measurements. ``check=False`` or ``RINGCOMM_CHECK=0`` turns it
off for a call or a process (then every rank must turn it off alike).
"""

from __future__ import annotations

import json

from .errors import MismatchError
from .session import Session

__all__ = ["FIELDS", "fingerprint", "check_same_call", "refuse"]

FIELDS = ("numel", "dtype", "op", "algo", "transport", "device", "options")


def fingerprint(
    numel: int, dtype: str, op: str, algo: str, transport: str, device: str, options: dict
) -> list[object]:
    """The values the check compares, in ``FIELDS`` order (options as ``name=repr`` text, sorted)."""
    opts = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
    return [numel, dtype, op, algo, transport, device, opts]


def _slot(session: Session, call: int) -> str:
    return session.key("call", call)


def _exchange(session: Session, call: int, text: str, deadline: float) -> list[str]:
    """Publish this rank's ``text`` for ``call`` and return every rank's: through the call board on one
    host (board.py), else through the store."""
    board = session.board(deadline)
    if board is not None:
        board.publish(call, text)
        return board.collect(call, deadline, "same-call check")
    values = session.gather(_slot(session, call), text, deadline, "same-call check")
    if call >= 2:
        session.forget(_slot(session, call - 2))
    return values


def _decode(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return "?"  # unreadable: it differs from every real fingerprint, and says so


def check_same_call(session: Session, call: int, mine: list[object], deadline: float) -> None:
    """Raise ``MismatchError`` on every rank unless every rank's fingerprint of ``call`` equals ``mine``."""
    rank = session.rank
    rows = [_decode(v) for v in _exchange(session, call, json.dumps(mine), deadline)]
    refused = [(r, row["refused"]) for r, row in enumerate(rows) if isinstance(row, dict)]
    if refused:
        said = "; ".join(f"rank {r}: {reason}" for r, reason in refused)
        raise MismatchError(
            f"rank {rank}: ranks {[r for r, _ in refused]} refused this all_reduce ({said}); "
            "nothing was reduced, the tensor is untouched"
        )
    if all(row == rows[0] for row in rows):
        return
    problems = []
    for i, field in enumerate(FIELDS):
        by_value: dict[str, list[int]] = {}
        for r, row in enumerate(rows):
            value = row[i] if isinstance(row, list) and len(row) == len(FIELDS) else "?"
            by_value.setdefault(str(value), []).append(r)
        if len(by_value) > 1:
            parts = [f"ranks {ranks} {value or '(none)'}" for value, ranks in by_value.items()]
            problems.append(f"{field} differs: " + "; ".join(parts))
    raise MismatchError(
        f"rank {rank}: ranks called all_reduce differently ({', '.join(problems)}); "
        "nothing was reduced, the tensor is untouched"
    )


def refuse(session: Session, call: int, reason: str, deadline: float) -> None:
    """Publish that this rank refused ``call`` (bad arguments), so the others raise instead of waiting.

    Then read everyone's entry for ``call``, as a checked call does, though nothing is compared:
    a rank that published and moved on could refuse its next calls at once and overwrite (board)
    or delete (store) this entry before a slower peer had read it; that peer then waited for it
    until its timeout. Runs on the comm thread: the caller has its ``ValueError`` already.
    """
    _exchange(session, call, json.dumps({"refused": reason[:300]}), deadline)
