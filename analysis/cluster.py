"""``python -m analysis.cluster``: an emulated cluster, each rank behind its own rate-limited link.

    python -m analysis.cluster --nodes 4 --link 500mbit -- python -m ringcomm.bench --algos gloo,ring,ps
    python -m analysis.cluster --nodes 4 --link 500mbit -- python launch.py --algo ps --max-steps 40
    python -m analysis.cluster --nodes 2 --ranks-per-node 2 --placement interleaved -- python -m ringcomm.bench --algos hier,ring
    sudo python -m analysis.cluster --cleanup        # remove what a killed run left behind

On one host every rank shares memory bandwidth and the cores, so a parameter
server shows no bottleneck. Here each rank gets a network namespace of its own
(a "node") with one full-duplex NIC of ``--link`` bits per second, all NICs on
one switch::

        node 0            node 1            node 2            node 3
     rcc<id>n0         rcc<id>n1         rcc<id>n2         rcc<id>n3
    10.201.x.1        10.201.x.2        10.201.x.3        10.201.x.4
      eth0 ->|          eth0 ->|          eth0 ->|          eth0 ->|     tbf: RATE out of the node
             |                 |                 |                 |
    +--------+-----------------+-----------------+-----------------+----+
    |  |<- b0            |<- b1            |<- b2            |<- b3    |  tbf: RATE into the node
    |  +-----------------+------- br0 -----+-----------------+         |
    |                     switch namespace rcc<id>s                     |
    +-------------------------------------------------------------------+

Each NIC is shaped in both directions with ``tc``'s token bucket (``tbf``): on
the node's end for what it sends, on the switch's end of its veth for what it
receives. ``--delay D`` adds a one-way delay (``netem``) on each node's way out,
where the kernel has netem. The command then runs G times in every node
(``--ranks-per-node G``, default 1), as torchrun ``--nnodes N --nproc-per-node G``
would start it: ``RANK``, ``WORLD_SIZE`` (N·G), ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``
(G), ``GROUP_RANK`` (the node), ``GROUP_WORLD_SIZE`` (N), ``MASTER_ADDR`` (node 0,
where rank 0 runs), ``MASTER_PORT`` (free there) are set, so
``dist.init_process_group("gloo")`` works unchanged. A node's G ranks share its
namespace, so they reach each other over its loopback and shared memory (fast) and
everything else through its one shaped NIC, as on a real multi-rank node.
``--placement`` maps global ranks to nodes::

    contiguous  (torchrun's):  node k runs ranks k·G .. k·G+G-1     2 x 2: node 0 {0, 1}, node 1 {2, 3}
    interleaved (round-robin): rank r runs on node r mod N          2 x 2: node 0 {0, 2}, node 1 {1, 3}

so a flat ring crosses each node's link once (contiguous) or at every hop (interleaved).
``GLOO_SOCKET_IFNAME`` pins Gloo to the node's NIC and ``RINGCOMM_ZMQ_HOST``
makes the zmq transport bind the node's address. Nothing of it leaves the
namespaces: 10.201.x.y exists nowhere else, and the switch is connected to
nothing but the nodes.

It prints the topology and a measured link rate (a timed TCP transfer from node 0
to the last node) first, streams every process's output prefixed ``[node i]``
(``[node i rank r]`` with G > 1), exits with the status of the first process that
failed (stopping the others after
``--grace`` seconds), and always removes every namespace, link and bridge it
made: on success, on a failing node, on Ctrl-C; and at start, the leftovers of
runs that were killed (every name carries its run's process id, so one whose
process is gone is stale). Not root, or no ``ip``/``tc``: a clear refusal.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import CliParser

__all__ = ["PLACEMENTS", "Cluster", "Place", "check_layout", "main", "parse_label", "parse_rate", "placement_of", "remove_stale"]

_PREFIX = "rcc"  # every namespace and link this tool makes starts with rcc<run id>
_NAME = re.compile(rf"^{_PREFIX}([0-9a-f]+)(s|n\d+|[ab]\d+)$")
_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([kmg]?)(bit|bps)$", re.IGNORECASE)


class ClusterError(RuntimeError):
    """Something this tool cannot do here, said in one line."""


#: Payload bytes per byte on the wire for bulk TCP over Ethernet as tc counts it: a 1514-byte frame
#: (14 Ethernet + 20 IP + 32 TCP with timestamps + 1448 data). tbf shapes frames, so data moves at
#: most at RATE * PAYLOAD.
PAYLOAD = 1448 / 1514


def beta_for(bits_per_s: float) -> float:
    """Seconds per byte of data over a link of ``bits_per_s`` (framing included)."""
    return 8.0 / (bits_per_s * PAYLOAD)


def parse_rate(text: str) -> float:
    """``"500mbit"`` -> 5e8 bits per second (tc's units: bit or bps = bytes per second; k, m, g = 1000s)."""
    m = _RATE.match(text.strip())
    if not m:
        raise ValueError(f"--link {text!r}: expected a rate such as 100mbit, 1gbit or 50mbps")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    bits = value * (8 if m.group(3).lower() == "bps" else 1)
    if bits < 1e5:
        raise ValueError(f"--link {text!r}: under 100 kbit/s; a run would take forever")
    return bits


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise ClusterError(f"`{' '.join(args)}` failed: {(done.stderr or done.stdout).strip()}")
    return done


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _kill_inside(netns: str) -> None:
    pids = _run("ip", "netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_stale(run_id: str | None = None) -> list[str]:
    """Remove namespaces and links of runs whose process is gone (or of ``run_id``); return their names."""
    removed = []
    namespaces = [
        line.split()[0] for line in _run("ip", "netns", "list", check=False).stdout.splitlines() if line
    ]
    links = re.findall(
        rf"^\d+: ({_PREFIX}[0-9a-f]+[ab]\d+)[@:]", _run("ip", "-o", "link", "show", check=False).stdout, re.M
    )
    for name in namespaces + links:
        m = _NAME.match(name)
        if not m:
            continue
        owner = m.group(1)
        if owner != run_id and (run_id is not None or _alive(int(owner, 16))):
            continue
        if name in namespaces:
            _kill_inside(name)
            _run("ip", "netns", "del", name, check=False)
        else:
            _run("ip", "link", "del", name, check=False)
        removed.append(name)
    return removed


#: How global ranks map to nodes: ``contiguous`` as torchrun places them (node k runs ranks
#: k·G .. k·G+G-1), ``interleaved`` round-robin (rank r on node r mod N), the worst case for a flat ring.
PLACEMENTS = ("contiguous", "interleaved")


@dataclass(frozen=True)
class Place:
    """Where one rank runs: its global ``rank``, its ``node`` (torchrun's GROUP_RANK) and its ``local``
    rank there (LOCAL_RANK)."""

    rank: int
    node: int
    local: int


def check_layout(nodes: int, ranks_per_node: int, placement: str) -> None:
    """ValueError, in one line, for a layout this tool does not run."""
    if not 1 <= nodes <= 64:
        raise ValueError(f"--nodes {nodes}: choose 1 to 64")
    if not 1 <= ranks_per_node <= 16:
        raise ValueError(f"--ranks-per-node {ranks_per_node}: choose 1 to 16")
    if placement not in PLACEMENTS:
        raise ValueError(f"--placement {placement!r}: choose {' or '.join(PLACEMENTS)}")


def placement_of(nodes: int, ranks_per_node: int, placement: str = "contiguous") -> list[Place]:
    """Each global rank's node and local rank, by global rank. 2 nodes × 2 ranks::

        contiguous:   node 0: ranks 0, 1    node 1: ranks 2, 3     (rank r on node r // G)
        interleaved:  node 0: ranks 0, 2    node 1: ranks 1, 3     (rank r on node r mod N)

    Local ranks count up within the node in global rank order, as torchrun's do.
    """
    check_layout(nodes, ranks_per_node, placement)
    world = nodes * ranks_per_node
    if placement == "contiguous":
        return [Place(r, r // ranks_per_node, r % ranks_per_node) for r in range(world)]
    return [Place(r, r % nodes, r // nodes) for r in range(world)]


@dataclass
class Cluster:
    """N node namespaces on one switch namespace, each NIC shaped to ``rate`` each way.

    Args:
        nodes: how many.
        rate: tc rate text, e.g. ``"500mbit"``.
        delay: one-way delay per node (``"2ms"``), or None.
        ranks_per_node: G processes run in each node, sharing its one link (torchrun's
            ``--nproc-per-node``).
        placement: how global ranks map to nodes (``placement_of``).
    """

    nodes: int
    rate: str
    delay: str | None = None
    run_id: str = field(default_factory=lambda: f"{os.getpid():x}")
    subnet: int = field(default_factory=lambda: os.getpid() % 250 + 1)
    ranks_per_node: int = 1
    placement: str = "contiguous"

    def __post_init__(self) -> None:
        check_layout(self.nodes, self.ranks_per_node, self.placement)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def ranks(self) -> list[Place]:
        """Every rank's place, by global rank (``placement_of``)."""
        return placement_of(self.nodes, self.ranks_per_node, self.placement)

    @property
    def switch(self) -> str:
        return f"{_PREFIX}{self.run_id}s"

    def node(self, i: int) -> str:
        return f"{_PREFIX}{self.run_id}n{i}"

    def address(self, i: int) -> str:
        return f"10.201.{self.subnet}.{i + 1}"

    def _shape(self, netns: str, dev: str, delay: str | None) -> None:
        bits = parse_rate(self.rate)
        # burst: at least one timer tick of bytes at this rate (or tbf cannot reach it), and 64 KiB
        burst = max(64 * 1024, int(bits / 8 / 100))
        tbf = ["tbf", "rate", self.rate, "burst", str(burst), "latency", "100ms"]
        qdisc = ["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", dev]
        if delay:  # netem delays every packet, then tbf (its child) paces them
            _run(*qdisc, "root", "handle", "1:", "netem", "delay", delay)
            _run(*qdisc, "parent", "1:", "handle", "2:", *tbf)
        else:
            _run(*qdisc, "root", *tbf)

    def create(self) -> None:
        """Make the switch, the nodes, their veths and shaping. On failure, remove what was made."""
        try:
            _run("ip", "netns", "add", self.switch)
            _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i in range(self.nodes):
                ns, a, b = self.node(i), f"{_PREFIX}{self.run_id}a{i}", f"{_PREFIX}{self.run_id}b{i}"
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
                _run("ip", "link", "set", a, "netns", ns)
                _run("ip", "link", "set", b, "netns", self.switch)
                _run("ip", "-n", ns, "link", "set", a, "name", "eth0")
                _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _run("ip", "-n", ns, "link", "set", "eth0", "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", self.switch, "link", "set", b, "master", "br0")
                _run("ip", "-n", self.switch, "link", "set", b, "up")
                self._shape(ns, "eth0", self.delay)  # what the node sends
                self._shape(self.switch, b, None)  # what the node receives
        except BaseException:
            self.remove()
            raise

    def remove(self) -> list[str]:
        """Kill what runs inside and delete every namespace and link of this run."""
        return remove_stale(self.run_id)

    def exec(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside node ``i``."""
        return ["ip", "netns", "exec", self.node(i), *argv]

    def free_port(self) -> int:
        """A port free on node 0's address (where the rendezvous store listens)."""
        code = (
            f"import socket; s = socket.socket(); s.bind(({self.address(0)!r}, 0)); print(s.getsockname()[1])"
        )
        return int(_run(*self.exec(0, [sys.executable, "-c", code])).stdout)

    def measure_link(self, seconds: float = 1.0) -> float:
        """Bits per second of a timed TCP transfer from node 0 to the last node (its receiver's clock)."""
        last = self.nodes - 1
        nbytes = max(1 << 20, int(parse_rate(self.rate) / 8 * seconds))
        receiver = (
            "import socket, sys, time\n"
            f"s = socket.socket(); s.bind(({self.address(last)!r}, 0)); s.listen(1)\n"
            "print(s.getsockname()[1], flush=True)\n"
            "c, _ = s.accept(); got = 0; first = None\n"
            f"while got < {nbytes}:\n"
            "    b = c.recv(1 << 20)\n"
            "    if not b: break\n"
            "    first = first or time.monotonic(); got += len(b)\n"
            "print(got * 8 / (time.monotonic() - first), flush=True)\n"
        )
        rx = subprocess.Popen(
            self.exec(last, [sys.executable, "-c", receiver]), stdout=subprocess.PIPE, text=True
        )
        try:
            port = int(rx.stdout.readline())  # type: ignore[union-attr]
            sender = (
                "import socket\n"
                f"c = socket.create_connection(({self.address(last)!r}, {port}))\n"
                f"c.sendall(bytes({nbytes})); c.close()\n"
            )
            _run(*self.exec(0, [sys.executable, "-c", sender]))
            out, _ = rx.communicate(timeout=60)
            return float(out.strip().splitlines()[-1])
        finally:
            if rx.poll() is None:
                rx.kill()
                rx.wait()

    def describe(self) -> str:
        delay = f", {self.delay} one-way delay" if self.delay else ""
        lines = [
            f"cluster {self.run_id}: {self.nodes} nodes on one switch, each NIC {self.rate} each way{delay}"
        ]
        if self.ranks_per_node > 1:
            lines[0] += f"; {self.ranks_per_node} ranks per node sharing its link, placed {self.placement}"
        on: dict[int, list[int]] = {}
        for place in self.ranks():
            on.setdefault(place.node, []).append(place.rank)
        for i in range(self.nodes):
            ranks = f", ranks {', '.join(map(str, on[i]))}" if self.ranks_per_node > 1 else ""
            lines.append(f"  node {i}: netns {self.node(i)}, eth0 {self.address(i)}/24{ranks}")
        lines.append(f"  switch: netns {self.switch}, bridge br0")
        return "\n".join(lines)


def _layout(cluster: Cluster) -> tuple[int, str]:
    """(ranks per node, placement) of ``cluster``; a stand-in without them (tests) runs one rank per node."""
    return getattr(cluster, "ranks_per_node", 1), getattr(cluster, "placement", "contiguous")


_LABEL_RE = re.compile(r"^(\d+) nodes(?: x (\d+) ranks \((\w+)\))?, (\S+) links")


def parse_label(label: str) -> tuple[int, int, str, str] | None:
    """(nodes, ranks per node, placement, link) from the ``RINGCOMM_CLUSTER`` text each rank gets
    (``"2 nodes x 2 ranks (interleaved), 500mbit links"``; one rank per node: ``"4 nodes, 500mbit
    links"``, contiguous), which ``ringcomm.bench`` and launch.py record as ``machine["cluster"]``.
    None for any other text."""
    m = _LABEL_RE.match(label)
    if m is None:
        return None
    nodes, per_node, placement, link = m.groups()
    return int(nodes), int(per_node or 1), placement or "contiguous", link


def _environment(cluster: Cluster, place: Place, port: int) -> dict[str, str]:
    """What torchrun would set for ``place`` (``--nnodes N --nproc-per-node G``), plus this tool's own."""
    g, placement = _layout(cluster)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MASTER_", "TORCHELASTIC_", "RINGCOMM_ZMQ_HOST"))
    }
    shape = f"{cluster.nodes} nodes" + (f" x {g} ranks ({placement})" if g > 1 else "")
    env.update(
        RANK=str(place.rank),
        WORLD_SIZE=str(cluster.nodes * g),
        LOCAL_RANK=str(place.local),
        LOCAL_WORLD_SIZE=str(g),
        GROUP_RANK=str(place.node),
        GROUP_WORLD_SIZE=str(cluster.nodes),
        MASTER_ADDR=cluster.address(0),  # rank 0 runs on node 0 under either placement
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="eth0",
        RINGCOMM_ZMQ_HOST=cluster.address(place.node),
        RINGCOMM_CLUSTER=f"{shape}, {cluster.rate} links" + (f", {cluster.delay} delay" if cluster.delay else ""),
    )
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does when it starts more than one process per host
    return env


#: One line at a time on the terminal: the nodes' pumps and the tool's own messages take turns.
_OUTPUT = threading.Lock()


def _pump(stream: object, prefix: str, out: object) -> None:
    for line in stream:  # type: ignore[attr-defined]
        with _OUTPUT:  # a node's last line may lack its newline: the next line must not run into it
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")  # type: ignore[attr-defined]
            out.flush()  # type: ignore[attr-defined]


def _say(text: str) -> None:
    """One line of the tool's own on stderr, between the nodes' lines, never inside one."""
    with _OUTPUT:
        sys.stdout.flush()
        print(f"analysis.cluster: {text}", file=sys.stderr, flush=True)


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run(cluster: Cluster, argv: Sequence[str], grace: float = 10.0) -> int:
    """Run ``argv`` once per rank, ``ranks_per_node`` times in every node; return the first failing
    rank's status, else 0.

    Prints, at the end, how many of the machine's cores were busy on average meanwhile:
    a run that is bound by its links, not its cores, leaves some idle.
    """
    port = cluster.free_port()
    busy0, total0 = cpu_times()
    g, placement = _layout(cluster)
    places = placement_of(cluster.nodes, g, placement)
    # who each process is, in its lines and in the tool's own: "node i", or "node i rank r" with G > 1
    names = [f"node {p.node}" + (f" rank {p.rank}" if g > 1 else "") for p in places]
    procs = []
    pumps: list[list[threading.Thread]] = []  # each process's two (stdout, stderr)
    for place, name in zip(places, names):
        proc = subprocess.Popen(
            cluster.exec(place.node, list(argv)), env=_environment(cluster, place, port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        procs.append(proc)
        pumps.append([])
        for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, f"[{name}] ", out), daemon=True)
            t.start()
            pumps[-1].append(t)
    first: tuple[int, int] | None = None  # (process index = global rank, status)
    stop_at = None
    while [p.poll() for p in procs].count(None):  # poll every process (any() would stop at the first)
        for i, p in enumerate(procs):
            if first is None and p.returncode not in (None, 0):
                first = (i, p.returncode)
                stop_at = time.monotonic() + grace
                for t in pumps[i]:  # its last lines first, then ours (under load the pumps lag behind)
                    t.join(timeout=2)
                _say(f"{names[i]} exited with status {p.returncode}; stopping the others in {grace:g} s")
        if stop_at is not None and time.monotonic() > stop_at:
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for t in (t for pair in pumps for t in pair):
        t.join(timeout=2)
    busy1, total1 = cpu_times()
    cores = os.cpu_count() or 1
    if total1 > total0:
        print(f"analysis.cluster: cores busy on average during the run: "
              f"{(busy1 - busy0) / (total1 - total0) * cores:.2f} of {cores}", flush=True)  # fmt: skip
    if first is None:
        bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
        first = bad[0] if bad else None
        if first is not None:  # every node had exited before the first look: say which failed all the same
            _say("; ".join(f"{names[i]} exited with status {status}" for i, status in bad))
    return 0 if first is None else (first[1] if first[1] > 0 else 128 - first[1])


def _refusal() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and tc need CAP_NET_ADMIN); run it with sudo"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs iproute2's {' and '.join(missing)} (Debian: apt-get install iproute2)"
    return None


def _netem_missing() -> str | None:
    """Why --delay cannot work here (this kernel has no netem), or None."""
    probe = Cluster(1, "1gbit", run_id=f"{os.getpid():x}f", subnet=0)
    try:
        _run("ip", "netns", "add", probe.node(0))
        done = _run(
            "ip",
            "netns",
            "exec",
            probe.node(0),
            "tc",
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "netem",
            "delay",
            "1ms",
            check=False,
        )
        return None if done.returncode == 0 else done.stderr.strip() or "tc refused netem"
    finally:
        _run("ip", "netns", "del", probe.node(0), check=False)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    parser = CliParser(
        prog="python -m analysis.cluster",
        description="Run a command once per node of an emulated cluster: network namespaces on one switch, "
        "each NIC rate-limited in both directions.",
        epilog="Everything after -- is the command, run in every node with torchrun's variables set.",
    )
    parser.add_argument("--nodes", type=int, default=4, help="nodes (network namespaces, one link each), 1-64")
    parser.add_argument(
        "--ranks-per-node", type=int, default=1, metavar="G",
        help="processes per node, sharing its link and memory (torchrun's --nproc-per-node), 1-16",
    )  # fmt: skip
    parser.add_argument(
        "--placement", default="contiguous", choices=PLACEMENTS,
        help="global rank -> node: contiguous (node k runs ranks kG..kG+G-1, as torchrun) or "
        "interleaved (rank r on node r mod N)",
    )  # fmt: skip
    parser.add_argument(
        "--link", default="500mbit", help="each node's NIC rate, each way (tc units: 100mbit, 1gbit)"
    )
    parser.add_argument(
        "--delay", default=None, help="one-way delay on each node's way out, e.g. 2ms (needs netem)"
    )
    parser.add_argument("--grace", type=float, default=10.0, help="seconds the others get after a node fails")
    parser.add_argument(
        "--no-measure", action="store_true", help="skip the timed transfer that checks the link"
    )
    parser.add_argument("--cleanup", action="store_true", help="only remove what killed runs left, then exit")
    args = parser.parse_args(argv)
    reason = _refusal()
    if reason:
        print(f"analysis.cluster: {reason}", file=sys.stderr)
        return 2
    stale = remove_stale()
    if stale:
        print(
            f"analysis.cluster: removed {len(stale)} namespaces and links left by killed runs: {', '.join(stale)}"
        )
    if args.cleanup:
        if not stale:
            print("analysis.cluster: --cleanup: nothing to remove (no namespace or link left by a killed run)")
        return 0
    if not command:
        parser.error("no command: put it after --, e.g. -- python -m ringcomm.bench --algos gloo,ring")
    try:
        check_layout(args.nodes, args.ranks_per_node, args.placement)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        bits = parse_rate(args.link)
    except ValueError as exc:
        parser.error(str(exc))
    if args.delay:
        why = _netem_missing()
        if why:
            print(f"analysis.cluster: --delay needs tc's netem qdisc, which this kernel refuses ({why}); "
                  "leave --delay out", file=sys.stderr)  # fmt: skip
            return 2
    cluster = Cluster(args.nodes, args.link, args.delay, ranks_per_node=args.ranks_per_node, placement=args.placement)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        cluster.create()
        print(cluster.describe(), flush=True)
        if not args.no_measure and args.nodes > 1:
            measured = cluster.measure_link()
            print(f"  link test: node 0 -> node {args.nodes - 1}: {measured / 1e6:.0f} Mbit/s "
                  f"({measured / bits:.0%} of {args.link})", flush=True)  # fmt: skip
        return run(cluster, command, args.grace)
    except KeyboardInterrupt:
        print("analysis.cluster: interrupted; removing the cluster", file=sys.stderr, flush=True)
        return 130
    except ClusterError as exc:
        print(f"analysis.cluster: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        cluster.remove()


if __name__ == "__main__":
    sys.exit(main())
