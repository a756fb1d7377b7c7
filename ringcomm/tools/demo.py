"""``python -m ringcomm.demo``: watch a real all-reduce move real numbers, step by step.

    python -m ringcomm.demo --algo ring --world-size 4 --numel 8
    python -m ringcomm.demo --algo rhd --world-size 6 --numel 12 --transport shm
    python -m ringcomm.demo --algo ps --world-size 3 --html ps.html      # and a page to open
    python -m ringcomm.demo --collective all_gather --world-size 3 --numel 2   # or reduce_scatter, broadcast

``--algo hier`` runs on emulated nodes of 2 ranks (1 where P is odd; ``hier_options``): the tables say
which ranks form which node and, for each message, whether it stays in its node or crosses to
another; the page draws each node as a box, the messages across nodes as thick hollow arrows.

``--collective`` watches the others, in the tables and on the page: all_gather (rank r's row
is its output, which starts with its input in block r: a copy, no message), reduce_scatter (the
row is its copy of the input, reduced into; its block is the output) and broadcast from rank 0,
each checked against torch.distributed's own.

It starts P real ranks (processes, as the tests and the benchmark do), gives
rank r the numbers ``10*r + i`` (rank 2's fourth number is 23, so sums can be
done by eye), runs ``ringcomm.all_reduce`` with the tracer recording every
message's numbers (``trace.enable(rank, values=True)``), and prints, step by
step: which part of the tensor each rank sent to whom, what each rank received
and what it did with it (``[before] + [incoming] = [after]``), and every rank's
numbers after the step. At the end the result is checked against
``torch.distributed.all_reduce`` of the same inputs.

A *step* is one ``post`` of each rank that has one then: the messages it
issues together (``transport.py``). A post comes one step after its rank's
previous post, and no earlier than the step of every send its receives match
(``causal_steps``), so a number is never shown arriving before the step that
sends it. In the ring every rank posts once per step; the root of the parameter
server and of naive posts more often than the others, and rd and rhd with P not
a power of two fold the extra ranks in first; a rank with no message in a step
is left out of it. The tables are worked out from the messages (``replay``):
what a rank sent, received and reduced, in the order it did so.

``--html FILE`` writes the same recording as one self-contained page (no
network: inline SVG and script): the ranks on a ring (on a star for ps and
naive), each rank's numbers as cells coloured by the part of the tensor they
belong to (all_gather's numbers not there yet blank, reduce_scatter's output
block outlined), the step's messages as arrows, a slider and a play button.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Recording", "inputs", "record", "hier_options", "causal_steps", "replay", "render_text", "render_html", "main"]

_OP_SIGN = {"sum": "+", "avg": "+", "max": "max", "min": "min"}


def inputs(rank: int, numel: int) -> list[float]:
    """Rank ``rank``'s numbers: ``10 * rank + i``."""
    return [float(10 * rank + i) for i in range(numel)]


@dataclass
class Recording:
    """One recorded run: the call, every rank's messages in posting order, and the results."""

    algo: str
    op: str
    transport: str
    world_size: int
    numel: int
    parts: list[tuple[str, int, int]]  # (label, start, numel) of the algorithm's cut of the tensor
    ran: str = ""  # what algo ran (auto's pick), if not algo itself
    events: list[list[dict[str, Any]]] = field(default_factory=list)  # per rank, in posting order
    final: list[list[float]] = field(default_factory=list)  # per rank
    reference: list[float] = field(default_factory=list)  # torch.distributed.all_reduce of the inputs
    same_on_every_rank: bool = False
    collective: str = "all_reduce"
    references: list[list[float]] = field(default_factory=list)  # per rank (reduce_scatter's differ)
    nodes: list[list[int]] = field(default_factory=list)  # hier: the ranks of each node, as hier grouped them
    options: dict[str, Any] = field(default_factory=dict)  # the algorithm's options the demo passed (hier's)

    @property
    def steps(self) -> int:
        return max((e["step"] for per_rank in self.events for e in per_rank), default=0)

    @property
    def size(self) -> int:
        """The numbers a rank's row shows: all_gather's output (P blocks), else the input
        (reduce_scatter's: the copy it reduces into, its block copied out at the end)."""
        return self.world_size * self.numel if self.collective == "all_gather" else self.numel


#: torch.distributed's own call for each collective: the demo's reference.
_TORCH_CALL = {
    "all_reduce": "all_reduce",
    "all_gather": "all_gather_into_tensor",
    "reduce_scatter": "reduce_scatter_tensor",
    "broadcast": "broadcast",
}


def _demo_rank(rank: int, p: int, cfg: dict) -> dict:
    from .cli import ignore_ctrl_c

    ignore_ctrl_c()  # the parent stops the world on Ctrl-C (cli.ctrl_c_stops_the_world)
    import torch
    import torch.distributed as dist

    import ringcomm
    from ringcomm.algorithms.registry import ALGOS
    from ringcomm.runtime import session, trace

    if cfg.get("collective", "all_reduce") != "all_reduce":
        return _demo_collective_rank(rank, p, cfg)
    options = cfg.get("options", {})
    tracer = trace.enable(rank, values=True)
    x = torch.tensor(inputs(rank, cfg["numel"]))
    ringcomm.all_reduce(x, cfg["op"], algo=cfg["algo"], transport=cfg["transport"], timeout=60, **options)
    trace.disable()
    reference = torch.tensor(inputs(rank, cfg["numel"]))
    reduce_op = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(reference, op=reduce_op[cfg["op"]])
    if cfg["op"] == "avg":
        reference /= p
    spec = ALGOS[cfg["algo"]]
    if spec.name == "auto":
        spec = ALGOS[session.current().auto_pick(cfg["transport"], x.numel() * x.element_size(), 1e18)]
    digest = torch.tensor([hash(tuple(x.tolist())) & 0xFFFFFFFF], dtype=torch.int64)
    everyone = [torch.zeros_like(digest) for _ in range(p)]
    dist.all_gather(everyone, digest)
    messages = [e["args"] for e in tracer.events if "kind" in e.get("args", {})]
    parts, nodes = spec.cut(cfg["numel"], p, spec.options(options, p)), []
    if spec.name == "hier":  # the nodes as the call grouped them (agreed at the call, cached: no message)
        from ringcomm.algorithms.chunks import chunk_bounds
        from ringcomm.algorithms.hier import session_layout

        layout = session_layout(session.current(), options.get("hier_ranks_per_node", 0), float("inf"))
        nodes = [list(members) for members in layout.nodes]
        # the node's chunks, as phase 1 cuts the tensor (hier keeps it whole otherwise)
        parts = [(f"c{i}", start, n) for i, (start, n) in enumerate(chunk_bounds(cfg["numel"], len(nodes[0])))]
    return {
        "events": messages,
        "final": x.tolist(),
        "reference": reference.tolist(),
        "ran": spec.name,
        "parts": parts,
        "nodes": nodes,
        "same": all(int(d) == int(digest) for d in everyone),
    }


def _demo_collective_rank(rank: int, p: int, cfg: dict) -> dict:
    """all_gather, reduce_scatter or broadcast (src 0) of ``inputs``, traced, and torch's own of the same."""
    import torch
    import torch.distributed as dist

    import ringcomm
    from ringcomm.algorithms.collectives import COLLECTIVE_ALGOS
    from ringcomm.runtime import trace

    collective, numel = cfg["collective"], cfg["numel"]
    kw = {"algo": cfg["algo"], "transport": cfg["transport"], "timeout": 60}
    x = torch.tensor(inputs(rank, numel))
    reference = torch.tensor(inputs(rank, numel))
    tracer = trace.enable(rank, values=True)
    if collective == "all_gather":
        out = torch.zeros(p * numel)
        ringcomm.all_gather(out, x, **kw)
        trace.disable()
        theirs = torch.zeros(p * numel)
        dist.all_gather_into_tensor(theirs, reference)
    elif collective == "reduce_scatter":
        out = torch.zeros(numel // p)
        ringcomm.reduce_scatter(out, x, cfg["op"], **kw)
        trace.disable()
        theirs = torch.zeros(numel // p)
        reduce_op = {"sum": "SUM", "avg": "SUM", "max": "MAX", "min": "MIN"}[cfg["op"]]
        dist.reduce_scatter_tensor(theirs, reference, op=getattr(dist.ReduceOp, reduce_op))
        if cfg["op"] == "avg":
            theirs /= p
    else:
        out = x
        ringcomm.broadcast(out, 0, **kw)
        trace.disable()
        theirs = reference
        dist.broadcast(theirs, 0)
    span = next(e for e in tracer.events if e["cat"] == collective)
    ran = span["args"]["algo"].split("->")[-1]  # auto's pick, as the api names it
    spec = COLLECTIVE_ALGOS[collective][ran]
    size = p * numel if collective == "all_gather" else numel
    digest = torch.tensor([hash(tuple(out.tolist())) & 0xFFFFFFFF], dtype=torch.int64)
    everyone = [torch.zeros_like(digest) for _ in range(p)]
    dist.all_gather(everyone, digest)
    return {
        "events": [e["args"] for e in tracer.events if "kind" in e.get("args", {})],
        "final": out.tolist(),
        "reference": theirs.tolist(),
        "ran": ran,
        "parts": spec.cut(size, p, spec.options({}, p)),
        # reduce_scatter: each rank its own block, so "the same" is each rank equal to torch's
        "same": all(int(d) == int(digest) for d in everyone) or collective == "reduce_scatter",
    }


def record(
    algo: str,
    world_size: int,
    numel: int,
    op: str = "sum",
    transport: str = "torch",
    collective: str = "all_reduce",
    ranks_per_node: int = 0,
) -> Recording:
    """Run the collective in a fresh local world of ``world_size`` processes and return what happened.

    ``numel`` is each rank's input (reduce_scatter: a multiple of ``world_size``); broadcast's root is rank 0.
    ``algo="hier"`` runs on emulated nodes of ``ranks_per_node`` ranks each (0: ``hier_ranks_for``'s
    choice), a ring across them (``hier_options``).
    """
    from .spawn import run_world

    cfg = {"algo": algo, "numel": numel, "op": op, "transport": transport, "collective": collective}
    if algo == "hier":
        cfg["options"] = hier_options(world_size, ranks_per_node)
    results = run_world(_demo_rank, world_size, (cfg,), timeout=120)
    first = results[0]
    events = [r["events"] for r in results]
    causal_steps(events)
    return Recording(
        algo=algo,
        op=op,
        transport=transport,
        world_size=world_size,
        numel=numel,
        parts=[tuple(p) for p in first["parts"]],  # type: ignore[misc]
        ran=first["ran"] if first["ran"] != algo else "",
        events=events,
        final=[r["final"] for r in results],
        reference=first["reference"],
        same_on_every_rank=all(r["same"] for r in results),
        collective=collective,
        references=[r["reference"] for r in results],
        nodes=first.get("nodes", []),
        options=cfg.get("options", {}),
    )


def hier_options(world_size: int, ranks_per_node: int = 0) -> dict[str, Any]:
    """hier's options in the demo: all its ranks run on this one host, which hier would take for one
    node (nothing across), so they are cut into emulated nodes of ``ranks_per_node`` consecutive ranks
    (0: 2 where P is even, else 1: nodes of one rank, all of it across); across the nodes a ring
    (``hier_inner="ring"``, the docstring's table), whose messages land in the tensor where the
    tables show them (``auto`` may pick rd, which adds in scratch memory)."""
    g = ranks_per_node or (2 if world_size % 2 == 0 else 1)
    return {"hier_ranks_per_node": g, "hier_inner": "ring"}


def _pairs(events: list[list[dict[str, Any]]]) -> list[tuple[int, dict[str, Any], dict[str, Any] | None]]:
    """Every receive (or reduce) with the send it matches: ``(rank, receive, send or None)``.

    Sends and receives pair up in order per (sender, receiver, tag), as the transports deliver them.
    """
    sends: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for rank, per_rank in enumerate(events):
        for e in sorted(per_rank, key=lambda e: e["msg"]):
            if e["kind"] == "send":
                sends.setdefault((rank, e["peer"], e["tag"]), []).append(e)
    pairs = []
    for rank, per_rank in enumerate(events):
        taken: dict[tuple[int, int, int], int] = {}
        for e in sorted(per_rank, key=lambda e: e["msg"]):
            if e["kind"] != "send":
                key = (e["peer"], rank, e["tag"])
                i = taken.get(key, 0)
                taken[key] = i + 1
                queue = sends.get(key, [])
                pairs.append((rank, e, queue[i] if i < len(queue) else None))
    return pairs


def causal_steps(events: list[list[dict[str, Any]]]) -> None:
    """Renumber every message's ``step`` (in place) so that the steps read as a story across ranks.

    The tracer numbers a rank's posts 1, 2, ... on its own: a rank that waits (the root of
    naive, a rank folded out by rhd) would show a message received before its sender's step
    sent it. Here a post's step is the earliest that follows the rank's previous post and is
    not before the step of any send its receives match (sends and receives pair up in order
    per sender, receiver and tag). The raw post index stays in ``post``. If no such numbering
    exists (it always does for the algorithms here), the posts' own numbers are kept.
    """
    for per_rank in events:
        for e in per_rank:
            e.setdefault("post", e["step"])
    matched = {id(recv): send for _, recv, send in _pairs(events) if send is not None}  # id(receive) -> its send
    posts = [sorted({e["post"] for e in per_rank}) for per_rank in events]
    step = {(r, k): 1 for r, ks in enumerate(posts) for k in ks}
    for _ in range(sum(map(len, posts)) + 1):
        changed = False
        for rank, per_rank in enumerate(events):
            previous = 0
            for k in posts[rank]:
                low = previous + 1
                for e in per_rank:
                    if e["post"] == k and id(e) in matched:  # not before the step that sent it
                        low = max(low, step[(e["peer"], matched[id(e)]["post"])])
                if low > step[(rank, k)]:
                    step[(rank, k)] = low
                    changed = True
                previous = step[(rank, k)]
        if not changed:
            for rank, per_rank in enumerate(events):
                for e in per_rank:
                    e["step"] = step[(rank, e["post"])]
            for per_rank in events:  # a send's arrow stays on the page until it lands
                for e in per_rank:
                    if id(e) in matched:
                        matched[id(e)]["arrives"] = e["step"]
            return
    for per_rank in events:  # no consistent numbering: keep each rank's own
        for e in per_rank:
            e["step"] = e["post"]


def _combine(mine: Sequence[float], theirs: Sequence[float], op: str) -> list[float]:
    """``op`` of two ranks' numbers, element by element (``avg`` adds: it divides once, at the end)."""
    pick = {"max": max, "min": min}.get(op, lambda a, b: a + b)
    return [pick(a, b) for a, b in zip(mine, theirs)]


def _start_row(rec: Recording, rank: int) -> list[float]:
    """Rank ``rank``'s numbers before the first message: its inputs; all_gather's output holds them
    in block ``rank`` (a copy, no message) and nothing yet elsewhere (NaN, printed ``_``)."""
    mine = inputs(rank, rec.numel)
    if rec.collective != "all_gather":
        return mine
    row = [math.nan] * rec.size
    row[rank * rec.numel : (rank + 1) * rec.numel] = mine
    return row


def replay(rec: Recording) -> list[list[list[float]]]:
    """Every rank's numbers after each step (index 0: the inputs), worked out from the messages alone.

    A send shows what its rank held there when it was posted, a receive writes its
    numbers, a reduce writes its result; the ``before`` of each reduce is set here from
    what its rank held just then (the tracer takes it when the reduce is posted, which is
    too early when two reduces into the same numbers are posted together, as at a
    parameter server). What no message shows (the division of ``avg``, a copy out of a
    scratch buffer) appears at the next message that carries those numbers, and the
    results at the end. Deterministic, unlike the tracer's snapshots of the whole tensor,
    which a receive still in flight may or may not have written yet.
    """
    state = [_start_row(rec, r) for r in range(rec.world_size)]
    out = [[row[:] for row in state]]
    for step in range(1, rec.steps + 1):
        for rank, per_rank in enumerate(rec.events):
            mine = [e for e in per_rank if e["step"] == step]
            row = state[rank]
            for e in mine:  # what it sent was in its tensor when the step began
                if e["kind"] == "send" and e.get("start") is not None:
                    row[e["start"] : e["start"] + len(e["values"])] = e["values"]
            for e in mine:  # then what came in, in the order it was waited for
                start, n = e.get("start"), len(e["values"])
                if e["kind"] == "recv" and start is not None:
                    row[start : start + n] = e["values"]
                elif e["kind"] == "reduce" and start is not None:
                    e["before"] = row[start : start + n]
                    row[start : start + n] = e["after"]
                elif e["kind"] == "recv" and n == rec.numel and rec.collective == "all_reduce":
                    # rd: into scratch, then combined with its own
                    e["scratch"] = True
                    e["before"], e["after"] = row[:], _combine(row, e["values"], rec.op)
                    row[:] = e["after"]
        out.append([row[:] for row in state])
    return out


# --- text ---


def _nums(values: Sequence[float]) -> str:
    return " ".join("_" if math.isnan(v) else f"{v:g}" for v in values)  # _: not there yet (all_gather)


def _label(rec: Recording, event: dict[str, Any]) -> str:
    """What part of the tensor a message carries: a part's name (``c1``, ``s0``), several, or the whole."""
    start, n = event.get("start"), len(event["values"])
    names = [] if start is None else [label for label, s, m in rec.parts if m and start <= s and s + m <= start + n]
    whole = n == rec.size and (start == 0 or start is None)
    if len(names) == 1 and len(rec.parts) > 1:
        return names[0]
    if whole:
        return "the whole vector"
    if start is None:  # received into scratch memory, not into the tensor
        return f"{n} number{'s' if n != 1 else ''}"
    if names and sum(m for label, s, m in rec.parts if label in names) == n:
        return "+".join(names)
    return f"[{start}:{start + n}]"


def _part_index(rec: Recording, event: dict[str, Any]) -> int | None:
    """The index of the one part a message carries (its colour on the page), else None."""
    if len(rec.parts) == 1:
        return 0
    label = _label(rec, event)
    named = next((k for k, (name, _, _) in enumerate(rec.parts) if name == label), None)
    start, n = event.get("start"), len(event["values"])
    if named is None and event.get("level") and start is not None:  # hier across nodes: a piece of a node's chunk
        named = next((k for k, (_, s, m) in enumerate(rec.parts) if s <= start and start + n <= s + m), None)
    return named


def _row(rec: Recording, values: Sequence[float]) -> str:
    if len(rec.parts) <= 1:
        return f"[{_nums(values)}]"
    cells = [f"{label}: {_nums(values[start : start + n])}" for label, start, n in rec.parts if n]
    return " | ".join(cells)


def _node_of(rec: Recording, rank: int) -> int:
    """The index of the (hier) node that holds ``rank``."""
    return next(k for k, members in enumerate(rec.nodes) if rank in members)


def _where(rec: Recording, event: dict[str, Any]) -> str:
    """hier: which level a message travels on, ``" in node 0"`` or ``" across nodes"``; else ""."""
    level = event.get("level")
    if level == "node" and rec.nodes:
        return f" in node {_node_of(rec, event['peer'])}"
    if level == "cross":
        return " across nodes"
    return ""


def _describe(rec: Recording, event: dict[str, Any]) -> str:
    label, op = _label(rec, event), rec.op
    peer = f"{event['peer']}{_where(rec, event)}"  # hier: the peer and the level the message took
    if event["kind"] == "send":
        return f"sends {label} [{_nums(event['values'])}] to rank {peer}"
    if "after" in event:  # a reduce, or a receive into scratch that the rank then combined with its own
        sign = _OP_SIGN[op]
        how = " into scratch and combines it with its own" if event.get("scratch") else ""
        before, incoming, after = _nums(event["before"]), _nums(event["values"]), _nums(event["after"])
        if sign == "+":
            return f"receives {label} from rank {peer}{how}: [{before}] + [{incoming}] = [{after}]"
        return f"receives {label} from rank {peer}{how}: {sign}([{before}], [{incoming}]) = [{after}]"
    return f"receives {label} [{_nums(event['values'])}] from rank {peer}"


def _phase(event: dict[str, Any]) -> str | None:
    """The algorithm's name for what a message does (from its tag, ``tags.py``); None for a ring send
    (its receiver's side names the phase)."""
    from ..algorithms.tags import Tag

    tag, kind = Tag(event["tag"]), event["kind"]
    if tag in (Tag.RING, Tag.NAIVE):
        if kind == "send":
            return None if tag is Tag.RING else ("gather" if event["peer"] == 0 else "broadcast")
        return {Tag.RING: ("scatter-reduce", "all-gather"), Tag.NAIVE: ("gather", "broadcast")}[tag][kind == "recv"]
    return {
        Tag.SCATTER_REDUCE: "scatter-reduce",
        Tag.ALL_GATHER: "all-gather",
        Tag.PS_PUSH: "push",
        Tag.PS_PULL: "pull",
        Tag.RHD_HALVING: "recursive halving",
        Tag.RHD_DOUBLING: "recursive doubling",
        Tag.RD: "recursive doubling",
        Tag.FOLD: "fold",
        Tag.CHAIN: "chain",
        Tag.TREE: "binomial tree",
    }[tag]


def _level_phase(rec: Recording, event: dict[str, Any]) -> str | None:
    """``_phase``, and for hier's messages which of its three phases, on which level."""
    phase, level = _phase(event), event.get("level")
    if phase is None or not level:
        return phase
    if level == "node":
        first = phase == "scatter-reduce"  # phase 1 reduce-scatters in the node, phase 3 all-gathers
        return f"{'reduce-scatter' if first else phase} inside each node (hier phase {1 if first else 3}, shm)"
    return f"{phase} across the nodes (hier phase 2: each shard's all-reduce, {rec.transport})"


def _step_title(rec: Recording, step: int) -> str:
    """``step 3: scatter-reduce``: the step and what its messages do."""
    in_step = [e for per_rank in rec.events for e in per_rank if e["step"] == step]
    return f"step {step}: " + ", ".join(name for name in dict.fromkeys(_level_phase(rec, e) for e in in_step) if name)


def _then(rec: Recording, states: list[list[list[float]]]) -> str:
    """What the ranks did after their last message, if it changed their numbers (avg's division)."""
    if not rec.steps or not rec.final or states[-1] == rec.final:
        return ""
    why = f" (avg: the sum divided by P = {rec.world_size})" if rec.op == "avg" else ""
    if rec.collective == "reduce_scatter":
        return f"then, with no message: rank r's output is its block b<r>{why}"
    return f"then, with no message{why}"


def _title(rec: Recording) -> str:
    """The first line: which collective of how many numbers over how many ranks, and how."""
    name = rec.algo + (f" (took {rec.ran})" if rec.ran else "")
    numbers = f"{rec.numel} number{'s' if rec.numel != 1 else ''}"
    ranks = f"{rec.world_size} rank{'s' if rec.world_size != 1 else ''}"
    if rec.collective == "all_reduce":
        return f"{name} all-reduce of {numbers} over {ranks} (op {rec.op}, transport {rec.transport}); " + (
            "rank r starts with 10*r + i"
        ) + _nodes_said(rec)
    if rec.collective == "all_gather":
        return (
            f"{name} all-gather of {numbers} per rank over {ranks} (transport {rec.transport}); rank r starts with "
            "10*r + i in block b<r> of its output (a copy: no message; _ is a number not there yet)"
        )
    if rec.collective == "reduce_scatter":
        return (
            f"{name} reduce-scatter of {numbers} per rank over {ranks} (op {rec.op}, transport {rec.transport}); "
            "rank r starts with 10*r + i (reduced into a copy) and ends with block b<r> of the result"
        )
    return f"{name} broadcast of {numbers} from rank 0 over {ranks} (transport {rec.transport}); " + (
        "rank r starts with 10*r + i"
    )


def _nodes_said(rec: Recording) -> str:
    """hier: which ranks form which node, and how the demo made them (one host is one node to hier)."""
    if not rec.nodes:
        return ""
    nodes = ", ".join(f"node {k} = ranks {' '.join(map(str, members))}" for k, members in enumerate(rec.nodes))
    g = rec.options.get("hier_ranks_per_node", 0)
    how = f"emulated on this host, hier_ranks_per_node={g}" if g else "as hier found them"
    inner = rec.options.get("hier_inner")
    return f"; {nodes} ({how}{f', hier_inner={inner}' if inner else ''})"


def _result(rec: Recording) -> list[str]:
    """The last lines: what the ranks hold, and torch.distributed's own collective of the same inputs."""
    call = f"torch.distributed.{_TORCH_CALL[rec.collective]} of the same inputs"
    if rec.collective == "reduce_scatter":
        equal = rec.final == rec.references
        return [
            "result: " + ", ".join(f"rank {r} holds [{_nums(f)}]" for r, f in enumerate(rec.final)),
            f"{call}: " + ", ".join(f"rank {r} [{_nums(f)}]" for r, f in enumerate(rec.references))
            + f" ({'equal' if equal else 'DIFFERENT'})",
        ]
    same = all(f == rec.final[0] for f in rec.final)
    return [
        f"result: {'every rank holds' if same else 'ranks DIFFER; rank 0 holds'} [{_nums(rec.final[0])}]",
        f"{call}: [{_nums(rec.reference)}]"
        f" ({'equal' if rec.final[0] == rec.reference else 'DIFFERENT'}; bitwise the same on every rank: "
        f"{'yes' if rec.same_on_every_rank else 'NO'})",
    ]


def render_text(rec: Recording) -> str:
    """The recording as the demo prints it: inputs, each step's messages and numbers, the check."""
    lines = [_title(rec)]
    if rec.op == "avg" and rec.world_size > 1 and rec.collective in ("all_reduce", "reduce_scatter"):
        lines.append(
            f"avg: the ranks add, and divide a sum by P = {rec.world_size} once it is complete "
            "(no message: it shows in the next one that carries it)"
        )
    if len(rec.parts) > 1:
        lines.append(
            "parts: "
            + "  ".join(f"{label} = [{s}:{s + n}]" + ("" if n else " (empty)") for label, s, n in rec.parts)
        )
    states = replay(rec)
    lines += ["", "before"]
    lines += [f"  rank {r} | {_row(rec, states[0][r])}" for r in range(rec.world_size)]
    if not rec.steps:
        lines += ["", "one rank: nothing to send; its numbers are already the result"]
    for step in range(1, rec.steps + 1):
        lines += ["", _step_title(rec, step)]
        for r in range(rec.world_size):
            mine = [e for e in rec.events[r] if e["step"] == step]
            for e in sorted(mine, key=lambda e: e["kind"] != "send"):  # what it sent, then what came in
                lines.append(f"  rank {r} {_describe(rec, e)}")
        lines.append(f"  after step {step}")
        lines += [f"    rank {r} | {_row(rec, states[step][r])}" for r in range(rec.world_size)]
    lines += ["", *_ending(rec, states)]
    return "\n".join(lines)


# --- the page ---


def _last_rows(rec: Recording, buffers: list[list[list[float]]]) -> list[list[float]]:
    """Every rank's row once the call has returned: its result, which for reduce_scatter is the
    output block b<r> in its place in the row (avg divided), the rest as the last step left it."""
    if rec.collective != "reduce_scatter":
        return rec.final
    n = rec.numel // rec.world_size
    rows = [row[:] for row in buffers[-1]]
    for r, row in enumerate(rows):
        row[r * n : (r + 1) * n] = rec.final[r]
    return rows


def _ending(rec: Recording, buffers: list[list[list[float]]]) -> list[str]:
    """The lines the text ends with (what happened after the last message, the check against
    torch's own): the text's and the page's log at its last step."""
    lines = []
    if _then(rec, buffers):
        lines.append(_then(rec, buffers))
        if rec.collective == "reduce_scatter":  # its output: one block
            lines += [f"    rank {r} | b{r}: {_nums(rec.final[r])}" for r in range(rec.world_size)]
        else:
            lines += [f"    rank {r} | {_row(rec, rec.final[r])}" for r in range(rec.world_size)]
        lines.append("")
    return lines + _result(rec)


def render_html(rec: Recording) -> str:
    """The recording as one self-contained HTML page (inline SVG and script, nothing fetched)."""
    buffers = replay(rec)  # also sets each reduce's "before"
    events = [
        [e | {"label": _label(rec, e), "text": _describe(rec, e), "partindex": _part_index(rec, e)} for e in per_rank]
        for per_rank in rec.events
    ]
    data = json.dumps(
        asdict(rec)
        | {"events": events, "steps": rec.steps, "inputs": buffers[0], "buffers": buffers, "then": _then(rec, buffers),
           "titles": [_step_title(rec, step) for step in range(1, rec.steps + 1)], "size": rec.size,
           "headline": _title(rec), "last": _last_rows(rec, buffers), "ending": _ending(rec, buffers)}
    )  # all_gather's numbers not there yet are NaN: a JavaScript literal, as the page reads it
    what = "" if rec.collective == "all_reduce" else f"{rec.collective} "
    title = f"ringcomm: {what}{rec.algo} over {rec.world_size} rank{'s' if rec.world_size != 1 else ''}"
    star = (rec.ran or rec.algo) in ("ps", "naive")
    return _PAGE.replace("__TITLE__", title).replace("__DATA__", data).replace("__STAR__", "true" if star else "false")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
 #controls { margin: 8px 0; } #controls button { width: 5em; }
 #log { font: 12px/1.5 ui-monospace, monospace; white-space: pre-wrap; background: #f6f6f6; padding: 8px; }
 text { font: 11px ui-monospace, monospace; }
 #legend, #levels { color: #555; font-size: 13px; }
</style></head>
<body>
<h1 id="title">__TITLE__</h1>
<p id="headline"></p>
<div id="controls"><button id="play">play</button>
 <input id="slider" type="range" min="0" value="0" step="1"> <span id="stepname"></span></div>
<div id="legend">A cell's colour is the part of the tensor it belongs to (pale, _: not there yet; outlined: the
 rank's output block). Solid arrow: a message received in this step (the log below says what was added); dashed:
 sent, still waiting to be received.</div>
<div id="levels" hidden>Boxes: the nodes (hier; shared memory inside). Thin arrows: messages inside a node (shm,
 phases 1 and 3); thick hollow arrows: messages across nodes (the network, phase 2).</div>
<svg id="view" width="1000" height="620" viewBox="0 0 1000 620" role="img" aria-label="ranks and messages"></svg>
<div id="log"></div>
<script>
"use strict";
window.addEventListener("error", (e) => {  // say so on the page, not only in the console
  document.body.dataset.error = String(e.message);
  document.getElementById("title").textContent += " (the page failed: " + e.message + ")";
});
const rec = __DATA__;
const star = __STAR__;
const P = rec.world_size, N = rec.size;  // a row: all_gather's output (P blocks), else the input
const svg = document.getElementById("view"), slider = document.getElementById("slider");
// hier: the nodes as bands one above the other, a node's ranks side by side in it, so that messages
// inside a node run across its band and messages across nodes (same local rank) run down a column
const nodes = rec.nodes || [], G = nodes.length ? nodes[0].length : 1, bandH = 150;
const height = nodes.length ? 48 + nodes.length * bandH : 620;
svg.setAttribute("height", height); svg.setAttribute("viewBox", "0 0 1000 " + height);
document.getElementById("levels").hidden = !nodes.length;
function slot(r) {  // hier: [node, local rank] of rank r
  for (let k = 0; k < nodes.length; k++) { const l = nodes[k].indexOf(r); if (l >= 0) return [k, l]; }
  return [0, r];
}
const palette = ["#4e79a7","#f28e2b","#e15759","#76b7b2","#59a14f","#edc948","#b07aa1","#ff9da7","#9c755f","#bab0ac"];
function partOf(i) {
  for (let k = 0; k < rec.parts.length; k++) { const [, s, n] = rec.parts[k]; if (i >= s && i < s + n) return k; }
  return 0;
}
function buffersAt(step) {  // every rank's numbers once step `step` is done (0: the inputs), as printed
  return step === rec.steps && step > 0 ? rec.last : rec.buffers[step];
}
function owns(r, i) {  // reduce_scatter: whether number i of rank r's row is in its output block b<r>
  const n = N / P;
  return rec.collective === "reduce_scatter" && i >= r * n && i < (r + 1) * n;
}
document.getElementById("headline").textContent = rec.headline;
let turn = 0;  // the star's rotation: chosen below so that no arm lies level with the middle
function place(r) {  // rank r's centre: on a ring, or (ps, naive) rank 0 in the middle of a star, or in its node
  const cx = 500, cy = 310, R = 235;
  if (nodes.length) { const [k, l] = slot(r); return [cx + (l - (G - 1) / 2) * (960 / G), 28 + k * bandH + 80]; }
  if (P === 1) return [cx, cy];
  if (star) { if (r === 0) return [cx, cy]; const a = 2 * Math.PI * (r - 1) / (P - 1) - Math.PI / 2 + turn; return [cx + R * Math.cos(a), cy + R * Math.sin(a)]; }
  const a = 2 * Math.PI * r / P - Math.PI / 2; return [cx + R * Math.cos(a), cy + R * Math.sin(a)];
}
function room() {  // the width a rank's row may take: it must clear the rows beside it at about the same height
  let w = nodes.length ? 960 / G - 140 : 960;  // and leave an arrow between two rows side by side room to be seen (90 px)
  // (hier: and room beside each row for an arrow across nodes that curves past the node between)
  for (let a = 0; a < P; a++) for (let b = a + 1; b < P; b++) {
    const [xa, ya] = place(a), [xb, yb] = place(b);
    if (Math.abs(ya - yb) < 60) w = Math.min(w, Math.abs(xa - xb) - 90);
  }
  return w;
}
if (star && P > 2) { const plain = room(); turn = Math.PI / (P - 1); if (room() <= plain) turn = 0; }
const cell = Math.max(4, Math.min(34, Math.floor(room() / Math.max(N, 1))));
const halfW = cell * N / 2 + 6, halfH = 32;  // a rank's box (its label above the cells), for the arrows
function el(name, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  svg.appendChild(e); return e;
}
function draw(step) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const defs = el("defs", {});
  palette.concat(["#555"]).forEach((colour, k) => {
    const m = document.createElementNS("http://www.w3.org/2000/svg", "marker");
    for (const [key, v] of Object.entries({id: "arrow-" + k, markerWidth: 8, markerHeight: 8, refX: 7, refY: 3, orient: "auto"})) m.setAttribute(key, v);
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", "M0,0 L7,3 L0,6 z"); path.setAttribute("fill", colour);
    m.appendChild(path); defs.appendChild(m);
  });
  palette.concat(["#555"]).forEach((colour, k) => {  // the thick arrows' heads (a marker scales with its line)
    const m = document.createElementNS("http://www.w3.org/2000/svg", "marker");
    for (const [key, v] of Object.entries({id: "arrowx-" + k, markerWidth: 4, markerHeight: 4, refX: 3, refY: 1.5, orient: "auto"})) m.setAttribute(key, v);
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", "M0,0 L3.5,1.5 L0,3 z"); path.setAttribute("fill", colour);
    m.appendChild(path); defs.appendChild(m);
  });
  nodes.forEach((members, k) => {  // hier: a box per node, behind its ranks
    el("rect", {x: 8, y: 28 + k * bandH + 4, width: 984, height: bandH - 8, rx: 10, fill: "#f3f6fb", stroke: "#9aa7b8",
                "stroke-width": 1.5, class: "node", id: "node-" + k, "data-ranks": members.join(" ")});
    // the label clear of the arrows down the columns: between the middle two, or left of the middle one
    el("text", {x: G % 2 ? 18 : 500, y: 28 + k * bandH + 22, "text-anchor": G % 2 ? "start" : "middle", class: "nodelabel"}, "node " + k + " (shared memory): ranks " + members.join(", "));
  });
  const bufs = buffersAt(step);
  // a message: from the step that sends it to the step that receives it (dashed while on its way)
  for (let r = 0; r < P; r++) for (const e of rec.events[r]) if (e.kind === "send" && e.step <= step && step <= (e.arrives || e.step)) {
    const landing = step === (e.arrives || e.step);
    const k = e.partindex === null ? palette.length : e.partindex % palette.length;  // grey: several parts
    const colour = k === palette.length ? "#555" : palette[k];
    const across = e.level === "cross";  // hier: thick and hollow across nodes, thin inside a node
    const style = {stroke: colour, "stroke-width": across ? 6 : 2.5, "marker-end": "url(#" + (across ? "arrowx-" : "arrow-") + k + ")",
                   "stroke-dasharray": landing ? "none" : "6 5", class: landing ? "msg" : "msg-waiting", "data-from": r, "data-to": e.peer,
                   "data-level": e.level || "", fill: "none"};
    const shown = e.label === "the whole vector" ? "all" : e.label;
    const [xa, ya] = place(r), [xb, yb] = place(e.peer);
    const [ka, la] = slot(r), [kb, lb] = slot(e.peer);
    const span = nodes.length ? Math.abs(ka - kb) + Math.abs(la - lb) : 1;
    let mid;
    if (span > 1) {  // hier: past a rank between (a ring's wrap-around): curve round it, A->B one side, B->A the other
      const side = (ka < kb || la < lb) ? 1 : -1;
      let d;
      if (ka === kb) {  // in a node's band: over (or under) the rows between
        const y0 = ya - side * halfH, lift = side * 36;
        d = `M${xa},${y0} C${xa},${y0 - lift} ${xb},${y0 - lift} ${xb},${y0}`; mid = [(xa + xb) / 2, y0 - lift * 0.75];
      } else {  // down a column, across nodes: beside the rows between
        const x0 = xa + side * halfW, bulge = side * 50;
        d = `M${x0},${ya} C${x0 + bulge},${ya} ${x0 + bulge},${yb} ${x0},${yb}`; mid = [x0 + bulge * 0.75, (ya + yb) / 2];
      }
      el("path", Object.assign({d: d}, style));
      if (across) el("path", {d: d, stroke: "#fff", "stroke-width": 2, fill: "none", class: "msg-core"});
    } else {
      const dist = Math.hypot(xb - xa, yb - ya) || 1, ux = (xb - xa) / dist, uy = (yb - ya) / dist;
      const cut = Math.min(Math.abs(ux) > 1e-6 ? halfW / Math.abs(ux) : 1e9, Math.abs(uy) > 1e-6 ? halfH / Math.abs(uy) : 1e9);
      const gap = across ? 9 : 6, nx = -uy * gap, ny = ux * gap;  // A->B and B->A side by side
      const x1 = xa + ux * cut + nx, y1 = ya + uy * cut + ny, x2 = xb - ux * cut + nx, y2 = yb - uy * cut + ny;
      el("line", Object.assign({x1: x1, y1: y1, x2: x2, y2: y2}, style));
      if (across) el("line", {x1: x1, y1: y1, x2: x2 - ux * 10, y2: y2 - uy * 10, stroke: "#fff", "stroke-width": 2, class: "msg-core"});
      mid = [(x1 + x2) / 2 + nx * 2.5, (y1 + y2) / 2 + ny * 2.5 + 4];
    }
    el("text", {x: mid[0], y: mid[1], "text-anchor": "middle", fill: colour, class: "msglabel"}, shown);
  }
  const font = Math.max(7, Math.min(11, cell / 2.7));
  if (cell < 14) el("text", {x: 10, y: height - 10}, "too many numbers to print in the cells: hover over a cell, or read the log below");
  for (let r = 0; r < P; r++) {
    const [x, y] = place(r), x0 = x - cell * N / 2;
    el("text", {x: x, y: y - 22, "text-anchor": "middle"}, "rank " + r);
    for (let i = 0; i < N; i++) {
      const missing = Number.isNaN(bufs[r][i]);  // all_gather: not there yet, printed _
      const rect = el("rect", {x: x0 + i * cell, y: y - 14, width: cell - 1, height: 24, fill: palette[partOf(i) % palette.length],
                  "fill-opacity": missing ? 0.12 : 0.55, class: "cell", id: "cell-" + r + "-" + i, "data-value": missing ? "_" : bufs[r][i]});
      if (owns(r, i)) { rect.setAttribute("stroke", "#222"); rect.setAttribute("stroke-width", 2); rect.classList.add("output"); }
      const shown = missing ? "_" : String(Math.round(bufs[r][i] * 100) / 100);
      const tip = document.createElementNS("http://www.w3.org/2000/svg", "title");
      tip.textContent = "rank " + r + ", number " + i + ": " + shown; rect.appendChild(tip);
      if (cell >= 14) el("text", {x: x0 + i * cell + cell / 2, y: y + 3, "text-anchor": "middle", style: "font-size:" + font + "px"}, shown);
    }
  }
  document.getElementById("stepname").textContent = step === 0 ? "before (inputs)" : "after " + rec.titles[step - 1] + " (of " + rec.steps + ")";
  const log = [];
  for (let r = 0; r < P; r++) for (const e of rec.events[r]) if (e.step === step)
    log.push("rank " + r + " " + e.text);
  if (rec.steps === 0) log.push("one rank: nothing to send; its numbers are already the result");
  if (step === rec.steps) log.push(...rec.ending);  // as the text ends: after the last message, and the check
  document.getElementById("log").textContent = log.join("\\n");
  document.body.dataset.step = String(step);
}
slider.max = String(rec.steps);
slider.addEventListener("input", () => draw(Number(slider.value)));
let timer = null;
document.getElementById("play").addEventListener("click", () => {
  if (timer) { clearInterval(timer); timer = null; return; }
  timer = setInterval(() => { const s = (Number(slider.value) + 1) % (rec.steps + 1); slider.value = String(s); draw(s); }, 900);
});
const wanted = Number((location.hash.match(/step=(\\d+)/) || [])[1] || 0);
slider.value = String(Math.min(wanted, rec.steps));
draw(Number(slider.value));
</script></body></html>
"""


def main(argv: Sequence[str] | None = None) -> int:
    # The torch-free names and parser: --help and a mistake answer before torch is imported (by record).
    from ..names import COLLECTIVE_ALGO_NAMES, OP_NAMES, TRANSPORT_NAMES
    from .cli import DEFAULT_WORLD_SIZE
    from .cli import parser as make_parser

    parser = make_parser("python -m ringcomm.demo", "Watch a real all-reduce move real numbers, step by step.")
    parser.add_argument(
        "--collective", default="all_reduce", choices=tuple(COLLECTIVE_ALGO_NAMES), help="the collective to watch"
    )
    every_algo = tuple(dict.fromkeys(name for names in COLLECTIVE_ALGO_NAMES.values() for name in names))
    per_collective = "; ".join(f"{c}: {', '.join(names)}" for c, names in COLLECTIVE_ALGO_NAMES.items())
    parser.add_argument(
        "--algo", default="ring", choices=every_algo, metavar="ALGO", help=f"the algorithm to watch ({per_collective})"
    )
    parser.add_argument("--world-size", type=int, default=DEFAULT_WORLD_SIZE, help="ranks (processes) to start, 1-8")
    parser.add_argument("--numel", type=int, default=8, help="numbers per rank, 1-32")
    parser.add_argument("--op", default="sum", choices=OP_NAMES, help="the reduction")
    parser.add_argument("--transport", default="torch", choices=TRANSPORT_NAMES, help="what carries the messages")
    parser.add_argument(
        "--html", metavar="FILE", help="also write the run as a self-contained page to FILE (default: no page)"
    )
    args = parser.parse_args(argv)
    if _collective_mistake(args):
        parser.error(_collective_mistake(args))
    if not 1 <= args.world_size <= 8:
        parser.error(f"--world-size {args.world_size}: choose 1 to 8 (the page and the tables stay readable)")
    if not 1 <= args.numel <= 32:
        parser.error(f"--numel {args.numel}: choose 1 to 32")
    if args.html and Path(args.html).is_dir():
        parser.error(f"--html {args.html}: is a folder; name the page's file, e.g. {Path(args.html) / 'demo.html'}")
    if args.html and not Path(args.html).resolve().parent.is_dir():
        parser.error(f"--html {args.html}: no folder {Path(args.html).parent} to write it in")
    from .cli import ctrl_c_stops_the_world
    from .spawn import forked_ranks, start_method

    try:
        start_method()
    except ValueError as exc:  # not an option: one line, status 1, as launch.py says it
        raise SystemExit(f"{parser.prog}: {exc}") from None
    preload = ("torch", "torch.distributed", "ringcomm", "ringcomm.api", "ringcomm.tools.demo")
    with forked_ranks(preload), ctrl_c_stops_the_world(parser.prog):  # the ranks fork from one torch import
        rec = record(args.algo, args.world_size, args.numel, args.op, args.transport, args.collective)
    try:
        print(render_text(rec), flush=True)
    except BrokenPipeError:  # | head: the reader has all it wanted
        sys.stdout = None  # type: ignore[assignment]  # nothing more to flush at exit
        return 0
    if args.html:
        try:
            with open(args.html, "w") as f:
                f.write(render_html(rec))
        except OSError as exc:
            print(f"{parser.prog}: --html {args.html}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"\nwrote {args.html}: open it in a browser (no network needed)")
    ok = rec.same_on_every_rank and all(
        len(mine) == len(theirs) and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(mine, theirs))
        for mine, theirs in zip(rec.final, rec.references)
    )
    return 0 if ok else 1


def _collective_mistake(args: Any) -> str:
    """What is wrong with ``--collective`` and the options it constrains, in one line ("" if nothing)."""
    from ..names import COLLECTIVE_ALGO_NAMES

    collective, p = args.collective, args.world_size
    if args.algo not in COLLECTIVE_ALGO_NAMES[collective]:
        names = ", ".join(COLLECTIVE_ALGO_NAMES[collective])
        return f"--algo {args.algo}: {collective} has {names}"
    if collective != "all_reduce" and args.algo in ("rhd", "rd") and p >= 1 and p & (p - 1):
        return f"--algo {args.algo}: {collective} needs --world-size a power of two (1, 2, 4, 8), not {p}"
    if collective == "reduce_scatter" and p >= 1 and args.numel % p:
        return f"--numel {args.numel}: reduce_scatter splits each rank's numbers in P = {p} equal blocks; use a multiple of {p}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
