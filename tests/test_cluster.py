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

import json
import math
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


# --------------------------------------------------------------------------- several ranks per node


@pytest.mark.fast
def test_placement_maps_global_ranks_to_nodes_as_torchrun_or_round_robin() -> None:
    def where(nodes: int, g: int, placement: str) -> list[tuple[int, int]]:
        places = cluster.placement_of(nodes, g, placement)
        assert [p.rank for p in places] == list(range(nodes * g))
        return [(p.node, p.local) for p in places]

    # (node, local rank) by global rank
    assert where(2, 2, "contiguous") == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert where(2, 2, "interleaved") == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert where(3, 2, "interleaved") == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert where(2, 3, "contiguous") == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert where(3, 1, "interleaved") == where(3, 1, "contiguous") == [(0, 0), (1, 0), (2, 0)]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--ranks-per-node", "0"], "--ranks-per-node 0: choose 1 to 16"),
        (["--ranks-per-node", "17"], "--ranks-per-node 17: choose 1 to 16"),
        (["--placement", "random"], "invalid choice: 'random'"),
        (["--nodes", "0"], "--nodes 0: choose 1 to 64"),
    ],
)
def test_a_layout_the_tool_cannot_run_is_refused_in_one_line(
    args: list[str], said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    made: list[object] = []
    monkeypatch.setattr(cluster, "_refusal", lambda: None)  # as if root with iproute2
    monkeypatch.setattr(cluster, "remove_stale", lambda run_id=None: [])
    monkeypatch.setattr(cluster.Cluster, "create", lambda self: made.append(self))
    with pytest.raises(SystemExit) as exited:
        cluster.main(["--nodes", "2", *args, "--", "true"])
    assert exited.value.code == 2
    assert said in capsys.readouterr().err
    assert made == [], "a cluster was made for a layout that was refused"


@pytest.mark.fast
def test_a_cluster_object_refuses_a_layout_too() -> None:
    with pytest.raises(ValueError, match="--ranks-per-node 0: choose 1 to 16"):
        cluster.Cluster(2, "1gbit", ranks_per_node=0)
    with pytest.raises(ValueError, match="--placement 'random': choose contiguous or interleaved"):
        cluster.Cluster(2, "1gbit", placement="random")


_WHO = (
    "import os; print('WHO', os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['GROUP_RANK'], "
    "os.environ['LOCAL_RANK'], os.environ['LOCAL_WORLD_SIZE'], os.environ['MASTER_ADDR'], "
    "os.environ['RINGCOMM_ZMQ_HOST'], os.stat('/proc/self/ns/net').st_ino)"
)


@pytest.mark.fast
@needs_namespaces
@pytest.mark.parametrize("placement", ["contiguous", "interleaved"])
def test_ranks_of_a_node_share_its_namespace_and_get_torchruns_variables(placement: str) -> None:
    done = _tool("--nodes", "2", "--ranks-per-node", "2", "--placement", placement, "--link", "1gbit",
                 "--no-measure", "--", sys.executable, "-c", _WHO, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert _ours(_run_id(done.stdout)) == [], "the cluster outlived its run"
    rows = sorted((line.split("WHO ")[1].split() for line in done.stdout.splitlines() if "WHO " in line),
                  key=lambda row: int(row[0]))  # fmt: skip
    assert [int(row[0]) for row in rows] == [0, 1, 2, 3], done.stdout
    want = cluster.placement_of(2, 2, placement)
    netns_of_node: dict[int, set[str]] = {}
    address_of_node: dict[int, set[str]] = {}
    for row, place in zip(rows, want):
        rank, world, node, local, local_world, master, own, netns = row
        assert (int(world), int(node), int(local), local_world) == (4, place.node, place.local, "2"), row
        netns_of_node.setdefault(place.node, set()).add(netns)
        address_of_node.setdefault(place.node, set()).add(own)
        assert f"[node {place.node} rank {place.rank}] WHO" in done.stdout
    # one namespace and one address per node, shared by its two ranks; node 0's is the master's
    assert all(len(v) == 1 for v in (*netns_of_node.values(), *address_of_node.values())), (netns_of_node, address_of_node)
    assert netns_of_node[0] != netns_of_node[1] and address_of_node[0] != address_of_node[1]
    assert {row[5] for row in rows} == address_of_node[0]


@pytest.mark.fast
@needs_namespaces
def test_a_failing_rank_on_a_shared_node_is_named_and_the_others_stopped() -> None:
    # interleaved: rank 2 runs on node 0, beside rank 0; it fails, the other three would sleep a minute
    code = "import os, sys, time; sys.exit(5) if os.environ['RANK'] == '2' else time.sleep(60)"
    t0 = time.monotonic()
    done = _tool("--nodes", "2", "--ranks-per-node", "2", "--placement", "interleaved", "--link", "100mbit",
                 "--no-measure", "--grace", "1", "--", sys.executable, "-c", code, timeout=120)  # fmt: skip
    assert done.returncode == 5, done.stdout + done.stderr
    assert time.monotonic() - t0 < 40, "the sleeping ranks were not stopped after the grace period"
    assert "node 0 rank 2 exited with status 5" in done.stderr
    assert _ours(_run_id(done.stdout)) == []


# Two ranks on node 0 each send 2.5 MB to their partner on node 1 at once (gloo point-to-point), then
# rank 0 and 1 report how long; afterwards all four run algo="hier" on integers (found from GROUP_RANK).
_SHARE = """
import os, sys, time
import torch, torch.distributed as dist
import ringcomm
from ringcomm.runtime import session as sessions
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
x = torch.zeros(int(sys.argv[1]) // 4)
dist.barrier()
t0 = time.monotonic()
if rank < 2:
    dist.send(x, rank + 2)
else:
    dist.recv(x, rank - 2)
dist.barrier()
if rank < 2:
    print("SENT", rank, x.numel() * 4, time.monotonic() - t0, flush=True)
y = torch.arange(1001, dtype=torch.int64) * (rank + 1)
ringcomm.all_reduce(y, algo="hier", timeout=60)
cross = [(s.rank, s.world_size) for k, s in sessions._GROUPS.items() if isinstance(k, tuple) and k[2] == "hier-cross"]
exact = torch.equal(y, torch.arange(1001, dtype=torch.int64) * sum(range(1, world + 1)))
print("HIER", rank, exact, cross, flush=True)
ringcomm.shutdown()
dist.destroy_process_group()
"""


@needs_namespaces
def test_a_nodes_ranks_share_its_one_link_and_hier_finds_the_nodes(tmp_path: Path) -> None:
    script = tmp_path / "share.py"
    script.write_text(_SHARE)
    nbytes, rate = 2_500_000, 40e6
    done = _tool("--nodes", "2", "--ranks-per-node", "2", "--link", "40mbit", "--no-measure", "--",
                 sys.executable, str(script), str(nbytes), timeout=TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert _ours(_run_id(done.stdout)) == []
    sent = [line.split("SENT ")[1].split() for line in done.stdout.splitlines() if "SENT " in line]
    assert len(sent) == 2, done.stdout
    slowest = max(float(row[2]) for row in sent)
    # both transfers crossed node 0's one 40 Mbit/s link at once: together near its rate. Had each
    # rank a link of its own, they would move about twice that (each 2.5 MB in ~0.5 s)
    together = 2 * nbytes * 8 / slowest
    assert 0.5 * rate < together < 1.3 * rate, f"two ranks of a node moved {together / 1e6:.1f} Mbit/s together"
    hier = sorted(line.split("HIER ")[1] for line in done.stdout.splitlines() if "HIER " in line)
    # contiguous: ranks 0, 1 on node 0 and 2, 3 on node 1; each cross group is one rank per node
    assert hier == [f"{r} True [({r // 2}, 2)]" for r in range(4)], done.stdout


@pytest.mark.timeout(TIMEOUT_S + 30)
@needs_namespaces
def test_launch_trains_with_hier_across_two_nodes_of_two_ranks(tmp_path: Path) -> None:
    """Issue 25: ``launch.py --algo hier --transport torch`` under the cluster, as torchrun would run it.
    Interleaved, so that a hier that grouped by rank number (0, 1 | 2, 3) instead of by GROUP_RANK
    would put ranks of different nodes in one shared-memory group and fail."""
    out = tmp_path / "run"
    done = _tool("--nodes", "2", "--ranks-per-node", "2", "--placement", "interleaved", "--link", "1gbit",
                 "--no-measure", "--", sys.executable, str(ROOT / "launch.py"), "--algo", "hier",
                 "--transport", "torch", "--dataset", "synthetic", "--max-steps", "3", "--eval-batches", "1",
                 "--log-every", "1", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert _ours(_run_id(done.stdout)) == [], "the cluster outlived its run"
    assert "algo hier over torch | world 4" in done.stdout, done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["algo"], metrics["transport"], metrics["world_size"], metrics["steps"]) == ("hier", "torch", 4, 3)
    assert metrics["machine"]["cluster"].startswith("2 nodes x 2 ranks (interleaved)")
    assert math.isfinite(metrics["final_train_loss"]), metrics["final_train_loss"]
    # every step averaged the gradients through the hook (hier ran; a failed call would have raised)
    assert [r["step"] for r in metrics["step_records"]] == [1, 2, 3]
    assert all(r["bytes"] > 0 and r["comm_time_s"] > 0 for r in metrics["step_records"]), metrics["step_records"]


@pytest.mark.fast
@pytest.mark.parametrize(("g", "placement"), [(1, "contiguous"), (2, "contiguous"), (3, "interleaved")])
def test_the_label_each_rank_gets_reads_back_as_its_layout(g: int, placement: str) -> None:
    """bench and launch.py record RINGCOMM_CLUSTER as machine["cluster"]; the report reads the layout from it."""
    c = cluster.Cluster(nodes=4, rate="500mbit", ranks_per_node=g, placement=placement)
    label = cluster._environment(c, cluster.placement_of(4, g, placement)[0], 29500)["RINGCOMM_CLUSTER"]
    assert cluster.parse_label(label) == (4, g, placement, "500mbit"), label
    assert cluster.parse_label("one host") is None


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
