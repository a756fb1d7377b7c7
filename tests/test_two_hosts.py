"""Two "hosts" on one machine: two network namespaces joined by a veth pair, torchrun on each.

    netns rc<id>a                          netns rc<id>b
    +------------------------+  veth pair  +------------------------+
    | 10.200.<n>.1/24        |-------------| 10.200.<n>.2/24        |
    | torchrun --node-rank 0 |             | torchrun --node-rank 1 |
    |   2 workers (ranks 0,1)|             |   2 workers (ranks 2,3)|
    +------------------------+             +------------------------+

Each namespace has its own loopback and the one veth end, nothing else, so every
byte between the nodes (rendezvous, Gloo, ZeroMQ) crosses the veth pair and
never leaves the namespaces we made: 10.200.<n>.x exists nowhere else. Gloo is
pinned to the veth (GLOO_SOCKET_IFNAME), torchrun to the node's address
(--local-addr), ZeroMQ binds it (RINGCOMM_ZMQ_HOST). The test checks that the
veth carried at least the gradient traffic, then compares metrics.json with a
one-host run of the same configuration (``launch.py --world-size 4``): same
world, same data, same ring, so the final loss must match to float noise.

Skipped, with the reason, when not root, without ``ip`` or ``torchrun``, or
when this sandbox refuses namespaces. The namespaces (and with them the veth
pair and every process inside) are removed in a ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import run  # a child's own children stopped too

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TRAIN = [
    "launch.py",
    "--algo",
    "ring",
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "512",
    "--batch-size",
    "16",
    "--max-steps",
    "6",
    "--schedule",
    "constant",
    "--eval-batches",
    "1",
    "--eval-batch-size",
    "32",
    "--log-every",
    "3",
    "--seed",
    "0",
]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt-get install iproute2)"
    if not TORCHRUN.exists():
        return f"no torchrun beside {sys.executable}"
    return None


class Namespaces:
    """Two namespaces ``a``, ``b`` with veth ends ``va``, ``vb`` at 10.200.<n>.1 and .2."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.a, self.b = f"rc{tag}a", f"rc{tag}b"
        self.va, self.vb = f"rc{tag}va", f"rc{tag}vb"
        n = int(tag, 16) % 250 + 1
        self.addr_a, self.addr_b = f"10.200.{n}.1", f"10.200.{n}.2"

    def create(self) -> None:
        _ip("netns", "add", self.a)
        _ip("netns", "add", self.b)
        _ip("link", "add", self.va, "type", "veth", "peer", "name", self.vb)
        _ip("link", "set", self.va, "netns", self.a)
        _ip("link", "set", self.vb, "netns", self.b)
        for ns, dev, addr in ((self.a, self.va, self.addr_a), (self.b, self.vb, self.addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def delete(self) -> None:
        """Kill whatever still runs inside, then delete both (the veth pair goes with them)."""
        for ns in (self.a, self.b):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def bytes_through_veth(self) -> int:
        """Bytes sent plus received on node a's veth end."""
        stats = Path("/sys/class/net")  # per namespace: read through `ip netns exec`
        out = subprocess.run(
            ["ip", "netns", "exec", self.a, "cat", str(stats / self.va / "statistics" / "tx_bytes"),
             str(stats / self.va / "statistics" / "rx_bytes")],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        return sum(int(x) for x in out)

    def free_port(self) -> int:
        """A port the kernel picks free inside namespace a, on its veth address."""
        code = f"import socket; s = socket.socket(); s.bind(({self.addr_a!r}, 0)); print(s.getsockname()[1])"
        out = subprocess.run(
            ["ip", "netns", "exec", self.a, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    ns = Namespaces()
    try:
        ns.create()
    except subprocess.CalledProcessError as exc:
        ns.delete()
        pytest.skip(f"this sandbox refuses network namespaces: {exc.stderr.strip()}")
    try:
        yield ns
    finally:
        ns.delete()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert ns.a not in left and ns.b not in left, "namespaces left behind"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGCOMM_", "MASTER_", "TORCHELASTIC"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _two_node_run(ns: Namespaces, transport: str, out: Path) -> list[subprocess.CompletedProcess]:
    port = ns.free_port()
    procs = []
    for node, (netns, dev, addr) in enumerate(((ns.a, ns.va, ns.addr_a), (ns.b, ns.vb, ns.addr_b))):
        cmd = [
            "ip", "netns", "exec", netns, str(TORCHRUN),
            "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{ns.addr_a}:{port}", "--rdzv-id", "two-hosts",
            # node a hosts the rendezvous store: say so, torchrun cannot tell from the hostname
            "--rdzv-conf", f"is_host={int(node == 0)}",
            "--local-addr", addr, "--max-restarts", "0",
            *TRAIN, "--transport", transport, "--out", str(out),
        ]  # fmt: skip
        env = _env(GLOO_SOCKET_IFNAME=dev, RINGCOMM_ZMQ_HOST=addr, RINGCOMM_TIMEOUT="60")
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    done = []
    for proc in procs:  # the fixture kills everything in the namespaces if this times out
        stdout, stderr = proc.communicate(timeout=240)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def _metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_host(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same configuration on one host: 4 spawned ranks, ring over torch."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("one_host")
    proc = run(
        [sys.executable, *TRAIN, "--world-size", "4", "--out", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    return _metrics(out)


@pytest.mark.parametrize("transport", ["torch", "zmq"])
def test_two_nodes_match_one_host(
    namespaces: Namespaces, one_host: dict[str, Any], transport: str, tmp_path: Path
) -> None:
    before = namespaces.bytes_through_veth()
    nodes = _two_node_run(namespaces, transport, tmp_path)
    for node, proc in enumerate(nodes):
        assert proc.returncode == 0, f"node {node} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    m = _metrics(tmp_path)
    assert (m["world_size"], m["transport"], m["steps"]) == (4, transport, 6)
    # every step sends each rank's share of the ring, 2(P-1)/P of the gradient, half of it
    # from node a's ranks to node b's at least once: the veth must have carried that
    assert namespaces.bytes_through_veth() - before > m["parameters"] * 4 * 6
    ref = one_host
    assert m["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=1e-4)
    assert m["final_test_accuracy"] == pytest.approx(ref["final_test_accuracy"], abs=1e-9)
    for a, b in zip(m["step_records"], ref["step_records"], strict=True):
        assert a["bytes"] == b["bytes"]
