r"""The alpha-beta cost model, used by the docs, the benchmark and the plots.

A message of n bytes between two ranks costs ``alpha + n * beta`` seconds:
alpha is the per-message latency (seconds), beta the inverse bandwidth
(seconds per byte). For an all-reduce of M bytes over P ranks:

=========  ==================  =========================  =========================
algorithm  messages on the     bytes sent by the busiest  time
           critical path       rank
=========  ==================  =========================  =========================
ring       2(P-1)              2(P-1)/P * M               2(P-1)a + 2(P-1)/P * M b
naive      2(P-1)              (P-1) * M  (rank 0)        2(P-1)a + 2(P-1) * M b
ps, k=1    2 (rounds)          (P-1) * M  (the server)    2a + 2(P-1) * M b
ps, k      2 (rounds)          (P+k-2)/k * M  (servers)   2a + 2 m_k * M b
=========  ==================  =========================  =========================

For the parameter server (``param_server.py``) with k shards,
m_k = max((P-1)/k, w), w = 1 when k < P (a worker that serves nothing pushes
all of M) and (P-1)/P when k = P, where it moves the ring's bytes in two rounds.

(Reduction arithmetic is left out: on the machines we measure, the wire and
memory copies dominate. The fitted alpha and beta absorb what is left.)

``busbw`` follows nccl-tests: for all-reduce, busbw = algbw * 2(P-1)/P, where
algbw = M / time, so that busbw is comparable across P and with the link speed.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ring_time",
    "ring_bytes_per_rank",
    "naive_time",
    "naive_bytes_root",
    "ps_time",
    "ps_bytes_per_rank",
    "algbw",
    "busbw",
    "fit_alpha_beta",
]


def ring_time(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Predicted seconds for a ring all-reduce of ``nbytes`` over ``p`` ranks."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes * beta


def ring_bytes_per_rank(p: int, nbytes: float) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce."""
    return 0.0 if p <= 1 else 2 * (p - 1) / p * nbytes


def naive_time(p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Predicted seconds for gather-to-root + broadcast (root's link is serial)."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) * nbytes * beta


def naive_bytes_root(p: int, nbytes: float) -> float:
    """Bytes the root sends (and receives) in the naive all-reduce."""
    return 0.0 if p <= 1 else (p - 1) * nbytes


def _check_shards(p: int, shards: int) -> None:
    if not 1 <= shards <= max(p, 1):
        raise ValueError(f"shards={shards!r} is out of range for P={p}; expected 1 <= shards <= {p}")


def ps_time(p: int, nbytes: float, alpha: float, beta: float, shards: int = 1) -> float:
    """Predicted seconds for a parameter-server all-reduce of ``nbytes`` over ``p`` ranks.

    Two rounds (push, pull) whose messages overlap; the busiest link sets the
    time. Each of the ``shards`` (k) servers receives (P-1)*M/k bytes and sends
    as much back; a rank that serves nothing (there is one when k < P) pushes
    and pulls all M bytes::

        T ~= 2 * alpha + 2 * max((P-1)/k, w) * M * beta,  w = 1 if k < P else (P-1)/P

    k = 1 gives 2 * alpha + 2(P-1) * M * beta; k = P gives the ring's bytes.

    Args:
        p: world size.
        nbytes: tensor size M, in bytes.
        alpha: seconds per message.
        beta: seconds per byte.
        shards: k, the number of server ranks (1 <= k <= p).
    """
    _check_shards(p, shards)
    if p <= 1:
        return 0.0
    worker = 1.0 if shards < p else (p - 1) / p
    return 2 * alpha + 2 * max((p - 1) / shards, worker) * nbytes * beta


def ps_bytes_per_rank(p: int, nbytes: float, shards: int = 1, server: bool = True) -> float:
    """Bytes one rank sends (and receives, the same) in a parameter-server all-reduce.

    Args:
        p: world size.
        nbytes: tensor size M, in bytes.
        shards: k, the number of server ranks (1 <= k <= p).
        server: True for a rank that serves a shard, the busiest:
            (P-1)*M/k of pulls it serves plus (k-1)*M/k of pushes to the other
            servers, (P+k-2)/k * M in all. False for a rank that serves nothing
            (only when k < P): M, one push per shard.
    """
    _check_shards(p, shards)
    if p <= 1:
        return 0.0
    if server:
        return (p + shards - 2) / shards * nbytes
    if shards == p:
        raise ValueError(f"with shards = P = {p} every rank is a server; pass server=True")
    return float(nbytes)


def algbw(nbytes: float, seconds: float) -> float:
    """Algorithm bandwidth in GB/s (1e9 bytes per second): tensor bytes over time."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def busbw(p: int, nbytes: float, seconds: float) -> float:
    """Bus bandwidth in GB/s as nccl-tests defines it for all-reduce: algbw * 2(P-1)/P."""
    return algbw(nbytes, seconds) * (2 * (p - 1) / p if p > 1 else 0.0)


def fit_alpha_beta(
    messages: Sequence[float], nbytes: Sequence[float], seconds: Sequence[float]
) -> tuple[float, float]:
    """Least-squares fit of ``seconds ~= messages * alpha + nbytes * beta``.

    Args:
        messages: messages on the critical path of each measurement (2(P-1) for ring).
        nbytes: bytes on the critical path (2(P-1)/P * M for ring).
        seconds: measured times.

    Returns:
        ``(alpha, beta)`` in seconds and seconds per byte. Weighted by 1/seconds
        so small and large messages count alike (relative error is minimised).
    """
    import numpy as np

    t = np.asarray(seconds, dtype=float)
    a = np.stack([np.asarray(messages, float), np.asarray(nbytes, float)], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    return float(alpha), float(beta)
