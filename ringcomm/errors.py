"""The errors ringcomm raises. Each names who (rank, peer), what and how long."""

from __future__ import annotations

__all__ = ["CommError", "CommTimeoutError", "PeerError", "MismatchError"]


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
    """A peer closed its connection or the transport failed while talking to it."""

    def __init__(self, rank: int, peer: int, op: str, detail: str) -> None:
        self.rank, self.peer, self.op = rank, peer, op
        super().__init__(f"rank {rank}: {op} with peer rank {peer} failed: {detail}")


class MismatchError(CommError, ValueError):
    """Ranks called the same collective with different arguments (numel, dtype, op, algo)."""
