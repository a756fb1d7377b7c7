"""The errors ringcomm raises. Each names who (rank, peer), what and how long.

Bad arguments are ``ValueError`` (raised before anything is sent, tensor
untouched); everything that goes wrong between ranks is a ``CommError``.
"""

from __future__ import annotations

__all__ = ["CommError", "CommTimeoutError", "PeerError", "MismatchError", "FrameError", "who_said_what"]


class CommError(RuntimeError):
    """Base class for communication failures (not for bad arguments: those are ValueError)."""


class CommTimeoutError(CommError, TimeoutError):
    """A send or receive did not complete within the timeout.

    Attributes:
        rank: this process's rank.
        peer: the rank it was waiting on.
        op: ``"send"`` or ``"recv"`` (with the algorithm phase when known).
        timeout: the timeout that expired, in seconds.
    """

    def __init__(self, rank: int, peer: int, op: str, timeout: float, detail: str = "") -> None:
        self.rank, self.peer, self.op, self.timeout = rank, peer, op, timeout
        msg = (
            f"rank {rank}: {op} with peer rank {peer} did not complete within {timeout:.3g} s "
            f"(peer dead, frozen or not calling the same all_reduce?)"
        )
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class PeerError(CommError):
    """A peer closed its connection, stopped heartbeating, gave up, or the transport failed talking to it."""

    def __init__(self, rank: int, peer: int, op: str, detail: str) -> None:
        self.rank, self.peer, self.op = rank, peer, op
        super().__init__(f"rank {rank}: {op} with peer rank {peer} failed: {detail}")


class MismatchError(CommError, ValueError):
    """Ranks called the same collective differently (numel, dtype, op, algo, transport, options),
    or a rank refused the call; raised on every rank, before any data moved."""


class FrameError(CommError):
    """A message broke the wire format (``wire.py``); it was dropped and no tensor was written.

    Attributes:
        rank: this process's rank.
        peer: the sending rank, or the raw routing id (bytes) when it named no known rank.
        field: the header field, or ``"identity"``, ``"header"``, ``"frames"``, ``"body"``.
        detail: what was wrong.
    """

    def __init__(self, rank: int, peer: int | bytes, field: str, detail: str) -> None:
        self.rank, self.peer, self.field, self.detail = rank, peer, field, detail
        who = f"peer rank {peer}" if isinstance(peer, int) else f"unknown peer {peer[:32]!r}"
        super().__init__(
            f"rank {rank}: rejected a message from {who}: field {field!r}: {detail} "
            "(message dropped, destination tensor untouched)"
        )


def who_said_what(values: list[str], link: str = "") -> str:
    """``"ranks [0, 2] a; ranks [1] b"``: which ranks gave which value, for an error naming a disagreement.

    ``values`` is indexed by rank; ``link`` goes between the ranks and their value (e.g. ``"on "``).
    """
    by_value: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        by_value.setdefault(value, []).append(rank)
    return "; ".join(f"ranks {ranks} {link}{value}" for value, ranks in by_value.items())
