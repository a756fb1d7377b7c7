"""``python -m analysis.cluster``: nodes in network namespaces behind shaped links.

What must hold: a command run through the tool sees a torchrun world whose all-reduce
gives bit for bit what the same ranks give on this host; the links really are shaped
(a timed transfer comes out near the rate asked for); the first failing node's status
comes back, and a node that hangs after it is stopped; and nothing the tool made
(namespace, veth, bridge) outlives it, whether it ends well, badly, or was killed
(the next run removes what a killed one left).

Skipped, with the reason, when not root or without ``ip``/``tc``, or when this sandbox
refuses network namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from procs import run  # a child's own children stopped too

from analysis import cluster

ROOT = Path(__file__).resolve().parents[1]
PROBE = str(ROOT / "tests" / "cluster_probe.py")
TIMEOUT_S = 180


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces, veth pairs and tc need CAP_NET_ADMIN"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip and tc)"
    name = f"rcctest{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this sandbox refuses network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@pytest.fixture(scope="session")
def _namespaces() -> None:
    """Skip, with the reason, where network namespaces cannot be made. Asked once, and only when a
    test that needs them runs: never at import, so ``--collect-only`` or ``-m fast`` runs no ``ip``."""
    why_not = _why_not()
    if why_not is not None:
        pytest.skip(why_not)


def needs_namespaces(test: Callable[..., None]) -> Callable[..., None]:
    """The test needs network namespaces (marker ``netns``; skipped where none can be made)."""
    return pytest.mark.netns(pytest.mark.usefixtures("_namespaces")(test))


def _ours(run_id: str) -> list[str]:
    """Names of namespaces and links of run ``run_id`` that still exist."""
    text = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    text += subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return sorted(set(re.findall(rf"\brcc{run_id}(?:s|n\d+|[ab]\d+)\b", text)))


def _tool(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return run(
        [sys.executable, "-m", "analysis.cluster", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run_id(stdout: str) -> str:
    m = re.search(r"^cluster ([0-9a-f]+):", stdout, re.M)
    assert m, f"no topology line in the output:\n{stdout}"
    return m.group(1)


def _load(folder: Path, world: int) -> list[dict]:
    import torch

    return [torch.load(folder / f"rank{r}.pt") for r in range(world)]


def _one_host(folder: Path, world: int) -> None:
    """The probe's ranks as processes of this host, on loopback (the same world, no cluster)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, PROBE, str(folder)], cwd=ROOT, env=env))
    try:
        for p in procs:
            assert p.wait(timeout=TIMEOUT_S) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------- through the tool


@needs_namespaces
def test_a_three_node_all_reduce_matches_the_same_world_on_one_host(tmp_path: Path) -> None:
    on_cluster, on_host = tmp_path / "cluster", tmp_path / "host"
    on_cluster.mkdir()
    on_host.mkdir()
    done = _tool(
        "--nodes", "3", "--link", "1gbit", "--no-measure", "--", sys.executable, PROBE, str(on_cluster)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = _run_id(done.stdout)
    assert "node 2: netns" in done.stdout and "1gbit" in done.stdout
    assert _ours(run_id) == [], "the cluster outlived its run"
    _one_host(on_host, 3)
    cluster_ranks, host_ranks = _load(on_cluster, 3), _load(on_host, 3)
    for r in range(3):
        assert cluster_ranks[r]["world"] == 3
        for algo, got in cluster_ranks[r]["results"].items():
            same = host_ranks[r]["results"][algo]
            assert got.equal(same), f"rank {r} {algo}: the cluster's result differs from this host's"
            exact = cluster_ranks[r]["expected"]
            assert (got.double() - exact).abs().max().item() < 1e-5, f"rank {r} {algo}: not the sum"
        # every rank holds the same result
        assert cluster_ranks[r]["results"]["ring"].equal(cluster_ranks[0]["results"]["ring"])


@pytest.mark.fast
@needs_namespaces
def test_the_first_failing_nodes_status_comes_back_and_a_hanging_node_is_stopped() -> None:
    # node 1 fails with 7 at once; nodes 0 and 2 would sleep for a minute
    code = "import os, sys, time; sys.exit(7) if os.environ['RANK'] == '1' else time.sleep(60)"
    t0 = time.monotonic()
    done = _tool("--nodes", "3", "--link", "100mbit", "--no-measure", "--grace", "1", "--",
                 sys.executable, "-c", code)  # fmt: skip
    assert done.returncode == 7, done.stdout + done.stderr
    assert time.monotonic() - t0 < 40, "the sleeping nodes were not stopped after the grace period"
    assert "node 1 exited with status 7" in done.stderr
    assert _ours(_run_id(done.stdout)) == []


@pytest.mark.fast
@needs_namespaces
def test_each_node_gets_torchruns_variables_and_its_own_address() -> None:
    code = ("import os; print('ENV', os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'], "
            "os.environ['RINGCOMM_ZMQ_HOST'], os.environ['GLOO_SOCKET_IFNAME'])")  # fmt: skip
    done = _tool("--nodes", "2", "--link", "1gbit", "--no-measure", "--", sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr
    lines = sorted(line.split("ENV ")[1] for line in done.stdout.splitlines() if "ENV " in line)
    assert len(lines) == 2
    (r0, w0, m0, own0, if0), (r1, w1, m1, own1, if1) = (line.split() for line in lines)
    assert (r0, r1, w0, w1) == ("0", "1", "2", "2")
    assert m0 == m1 == own0 != own1, "MASTER_ADDR is node 0's address; each node binds its own"
    assert if0 == if1 == "eth0"
    assert "cores busy on average" in done.stdout


# --------------------------------------------------------------------------- the links


@needs_namespaces
def test_a_timed_transfer_comes_out_at_the_shaped_rate() -> None:
    c = cluster.Cluster(2, "40mbit", run_id=f"{os.getpid():x}")
    try:
        c.create()
        measured = c.measure_link(seconds=1.5)
    finally:
        c.remove()
    assert _ours(c.run_id) == []
    # tbf lets a burst through at full speed first, so allow a little above the rate; an unshaped
    # veth moves several Gbit/s, 50x more
    assert 0.75 * 40e6 < measured < 1.2 * 40e6, f"measured {measured / 1e6:.1f} Mbit/s on a 40mbit link"


@pytest.mark.fast
@needs_namespaces
def test_a_killed_runs_leftovers_are_removed_by_the_next_run() -> None:
    # a process that has exited: its pid names a run that can no longer clean up after itself
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cluster.Cluster(2, "100mbit", run_id=f"{dead.pid:x}")
    stale.create()
    try:
        assert len(_ours(stale.run_id)) == 3  # switch + 2 nodes (the veth ends live inside them)
        done = _tool("--cleanup")
        assert done.returncode == 0, done.stderr
        assert f"rcc{stale.run_id}s" in done.stdout
        assert _ours(stale.run_id) == []
    finally:
        stale.remove()


# --------------------------------------------------------------------------- refusals


def test_not_root_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    assert cluster.main(["--nodes", "2", "--", "true"]) == 2
    assert "needs root" in capsys.readouterr().err


@pytest.mark.fast
def test_a_link_rate_that_is_not_one_is_refused() -> None:
    assert cluster.parse_rate("500mbit") == 5e8
    assert cluster.parse_rate("1gbit") == 1e9
    assert cluster.parse_rate("10mbps") == 8e7  # tc: bps is bytes per second
    for bad in ("fast", "500", "500mb", "-1mbit", "10bit"):
        with pytest.raises(ValueError, match="--link"):
            cluster.parse_rate(bad)


@pytest.mark.fast
@needs_namespaces
def test_delay_is_refused_clearly_where_the_kernel_has_no_netem() -> None:
    why = cluster._netem_missing()
    if why is None:
        pytest.skip("this kernel has netem: --delay works here")
    done = _tool("--nodes", "2", "--delay", "2ms", "--", "true")
    assert done.returncode == 2
    assert "--delay needs tc's netem" in done.stderr


def test_collecting_this_module_runs_no_ip_command(tmp_path: Path) -> None:
    """It used to try ``ip netns add`` at import: under --collect-only too, on every run of the suite."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "ip"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", __file__],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_a_three_node_all_reduce" in done.stdout, done.stdout
    assert not calls.exists(), f"collecting ran: ip {calls.read_text()}"
