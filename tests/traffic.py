"""Counting a transport's messages in the tests: zero its counters before the call to count."""

from __future__ import annotations

from ringcomm.transports.base import TransportStats


def count_from_zero(stats: TransportStats) -> None:
    """Zero ``stats`` in place (the transport keeps the same object), so that it counts what follows alone."""
    vars(stats).update(vars(TransportStats()))
