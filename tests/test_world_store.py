"""The store a local world meets at (``spawn.loopback_store``) listens on the loopback address only.

Given a host and port 0, torch's ``TCPStore`` listens on every interface; ``run_world`` (and the
suite's pooled worlds) hand it a socket bound to 127.0.0.1 instead: no one off this machine can
reach a world's store. The listening sockets are read from ``/proc/net/tcp`` and ``tcp6``.
"""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist

from ringcomm.tools.spawn import loopback_store, run_world

LISTEN = "0A"  # the state column of /proc/net/tcp*


def _listening_on(port: int) -> list[str]:
    """The local addresses of the sockets listening on ``port``, as IP strings."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != LISTEN or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(family, raw))
    return found


@pytest.mark.fast
def test_the_store_listens_on_loopback_only_and_serves() -> None:
    store = loopback_store(2)
    assert _listening_on(store.port) == ["127.0.0.1"]
    client = dist.TCPStore("127.0.0.1", store.port, 2, is_master=False)
    client.set("key", "value")
    assert store.get("key") == b"value"


@pytest.mark.timeout(120)
def test_run_world_meets_at_a_loopback_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from ringcomm.tools import spawn

    seen: list[list[str]] = []

    def watched(world_size: int) -> dist.TCPStore:
        store = loopback_store(world_size)
        seen.append(_listening_on(store.port))
        return store

    monkeypatch.setattr(spawn, "loopback_store", watched)
    assert run_world(_rank_sum, 2, timeout=100) == [1, 1]
    assert seen == [["127.0.0.1"]]


def _rank_sum(rank: int, world_size: int) -> int:
    import torch

    x = torch.tensor([rank])
    dist.all_reduce(x)
    return int(x)
