"""The same-call check: do all ranks call the same all_reduce?

Before any data moves, every rank publishes a fingerprint of its call and reads
everyone's, on the call board when the ranks share a host, else in the store::

    rank r, call n:   publish [numel, dtype, op, algo, transport, device, options]
                      wait until all P fingerprints of call n are there, read them   (one round)

If any differs, every rank raises ``MismatchError`` naming the ranks and the
field, and the tensor is untouched.

**What is published.** A digest of the whole fingerprint, which is what the
ranks compare, and each field shown in short, for the error's readable diff (a
field cut short ends in ``...#`` and a digest of its own, so two values that
differ only far in still show differently). The entry fits a call-board slot
(``PUBLISHED_MAX``): a fingerprint cut at the slot's end used to be compared
as cut, and every unreadable entry read as ``"?"``, equal to every other
unreadable one. Now an entry that cannot be read matches nothing. Without the check a size mismatch is not a
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
heartbeats (``Rendezvous.gather``), which a Gloo receive cannot.

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

import hashlib
import json

from ..errors import MismatchError
from .session import Session

__all__ = ["FIELDS", "PUBLISHED_MAX", "fingerprint", "entry", "check_same_call", "refuse"]

FIELDS = ("numel", "dtype", "op", "algo", "transport", "device", "options")

#: Bytes one published entry may take: it must fit a call-board slot (board.py: 504 bytes of text).
PUBLISHED_MAX = 480
#: Characters shown of each field, tried in turn until the entry fits ``PUBLISHED_MAX``.
_SHOWN = (64, 32, 8, 0)


def fingerprint(
    numel: int, dtype: str, op: str, algo: str, transport: str, device: str, options: dict
) -> list[object]:
    """The values the check compares, in ``FIELDS`` order (options as ``name=repr`` text, sorted)."""
    opts = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
    return [numel, dtype, op, algo, transport, device, opts]


def _digest(text: str) -> str:
    """128 bits of BLAKE2b, as hex: enough that two different calls never look the same."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _shown(value: object, cap: int) -> str:
    """``value`` as text of at most about ``cap`` characters; cut short, it ends in its own digest."""
    text = str(value)
    return text if len(text) <= cap else f"{text[:cap]}...#{_digest(text)[:8]}"


def entry(mine: list[object]) -> str:
    """What this rank publishes for fingerprint ``mine``: the digest of all of it, and its fields in short.

    At most ``PUBLISHED_MAX`` bytes, whatever the fields hold.
    """
    digest = _digest(json.dumps(mine))
    for cap in _SHOWN:
        text = json.dumps({"digest": digest, "fields": [_shown(v, cap) for v in mine]})
        if len(text.encode()) <= PUBLISHED_MAX:
            return text
    raise AssertionError("a fingerprint with every field cut to its digest did not fit")  # cannot happen


def _refusal(reason: str) -> str:
    """The entry of a refused call, its reason cut to fit ``PUBLISHED_MAX`` bytes (JSON-escaped)."""
    for cap in (len(reason), 300, 120, 40, 0):
        text = json.dumps({"refused": reason if len(reason) <= cap else reason[:cap] + "..."})
        if len(text.encode()) <= PUBLISHED_MAX:
            return text
    raise AssertionError("an empty refusal did not fit")  # cannot happen


def _slot(session: Session, call: int) -> str:
    return session.key("call", call)


def _exchange(session: Session, call: int, text: str, deadline: float) -> list[str]:
    """Publish this rank's ``text`` for ``call`` and return every rank's: through the call board on one
    host (board.py), else through the store."""
    board = session.rendezvous.board(deadline)
    if board is not None:
        board.publish(call, text)
        return board.collect(call, deadline, "same-call check")
    values = session.rendezvous.gather(_slot(session, call), text, deadline, "same-call check")
    if call >= 2:
        session.rendezvous.forget(_slot(session, call - 2))
    return values


def _decode(text: str) -> dict | None:
    """A published entry: ``{"digest", "fields"}`` or ``{"refused"}``; None if it is neither.

    None matches nothing, not even another None: garbage on two ranks is no agreement.
    """
    try:
        row = json.loads(text)
    except ValueError:
        return None
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("refused"), str):
        return row
    fields = row.get("fields")
    if (
        isinstance(row.get("digest"), str)
        and isinstance(fields, list)
        and len(fields) == len(FIELDS)
        and all(isinstance(f, str) for f in fields)
    ):
        return row
    return None


def check_same_call(session: Session, call: int, mine: list[object], deadline: float) -> None:
    """Raise ``MismatchError`` on every rank unless every rank's fingerprint of ``call`` equals ``mine``
    (compared by digest of the whole fingerprint)."""
    rank = session.rank
    published = entry(mine)
    digest = json.loads(published)["digest"]
    rows = [_decode(v) for v in _exchange(session, call, published, deadline)]
    refused = [(r, row["refused"]) for r, row in enumerate(rows) if row is not None and "refused" in row]
    if refused:
        said = "; ".join(f"rank {r}: {reason}" for r, reason in refused)
        raise MismatchError(
            f"rank {rank}: ranks {[r for r, _ in refused]} refused this all_reduce ({said}); "
            "nothing was reduced, the tensor is untouched"
        )
    if all(row is not None and row["digest"] == digest for row in rows):
        return
    problems = []
    unreadable = [r for r, row in enumerate(rows) if row is None]
    if unreadable:
        problems.append(f"ranks {unreadable} published a fingerprint that cannot be read")
    for i, field in enumerate(FIELDS):
        by_value: dict[str, list[int]] = {}
        for r, row in enumerate(rows):
            if row is not None:
                by_value.setdefault(row["fields"][i], []).append(r)
        if len(by_value) > 1:
            parts = [f"ranks {ranks} {value or '(none)'}" for value, ranks in by_value.items()]
            problems.append(f"{field} differs: " + "; ".join(parts))
    if not problems:  # the shown fields agree, the digests do not: say so rather than nothing
        by_digest: dict[str, list[int]] = {}
        for r, row in enumerate(rows):
            by_digest.setdefault(row["digest"][:12], []).append(r)  # type: ignore[index]
        problems.append("fingerprint digests differ: " + "; ".join(f"ranks {v} {d}" for d, v in by_digest.items()))
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
    _exchange(session, call, _refusal(reason), deadline)
