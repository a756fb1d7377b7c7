"""``python -m ringcomm.demo``: watch a real all-reduce move real numbers, step by step.

    python -m ringcomm.demo --algo ring --world-size 4 --numel 8
    python -m ringcomm.demo --algo rhd --world-size 6 --numel 12 --transport shm
    python -m ringcomm.demo --algo ps --world-size 3 --html ps.html      # and a page to open

It starts P real ranks (processes, as the tests and the benchmark do), gives
rank r the numbers ``10*r + i`` (rank 2's fourth number is 23, so sums can be
done by eye), runs ``ringcomm.all_reduce`` with the tracer recording every
message's numbers (``trace.enable(rank, values=True)``), and prints, step by
step: which part of the tensor each rank sent to whom, what each rank received
and what it did with it (``[before] + [incoming] = [after]``), and every rank's
numbers after the step. At the end the result is checked against
``torch.distributed.all_reduce`` of the same inputs.

A *step* is one ``post`` of a rank: the messages it issues together
(``transport.py``). In the ring, rd and rhd every rank posts once per step; in
the parameter server and naive the root posts more often than the others, and
a rank with no message in a step is left out of it.

``--html FILE`` writes the same recording as one self-contained page (no
network: inline SVG and script): the ranks on a ring (on a star for ps and
naive), each rank's numbers as cells coloured by the part of the tensor they
belong to, the step's messages as arrows, a slider and a play button.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Recording", "inputs", "record", "render_text", "render_html", "main"]

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

    @property
    def steps(self) -> int:
        return max((e["step"] for per_rank in self.events for e in per_rank), default=0)


def _demo_rank(rank: int, p: int, cfg: dict) -> dict:
    import torch
    import torch.distributed as dist

    import ringcomm
    from ringcomm import session, trace
    from ringcomm.algorithms import ALGOS

    tracer = trace.enable(rank, values=True)
    x = torch.tensor(inputs(rank, cfg["numel"]))
    ringcomm.all_reduce(x, cfg["op"], algo=cfg["algo"], transport=cfg["transport"], timeout=60)
    trace.disable()
    reference = torch.tensor(inputs(rank, cfg["numel"]))
    reduce_op = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(reference, op=reduce_op[cfg["op"]])
    if cfg["op"] == "avg":
        reference /= p
    spec = ALGOS[cfg["algo"]]
    if spec.name == "auto":
        spec = session.current().auto_pick(cfg["transport"], x.numel() * x.element_size(), 1e18)
    digest = torch.tensor([hash(tuple(x.tolist())) & 0xFFFFFFFF], dtype=torch.int64)
    everyone = [torch.zeros_like(digest) for _ in range(p)]
    dist.all_gather(everyone, digest)
    messages = [e["args"] for e in tracer.events if "kind" in e.get("args", {})]
    return {
        "events": messages,
        "final": x.tolist(),
        "reference": reference.tolist(),
        "ran": spec.name,
        "parts": spec.cut(cfg["numel"], p, spec.options({}, p)),
        "same": all(int(d) == int(digest) for d in everyone),
    }


def record(algo: str, world_size: int, numel: int, op: str = "sum", transport: str = "torch") -> Recording:
    """Run the all-reduce in a fresh local world of ``world_size`` processes and return what happened."""
    from .world import run_world

    cfg = {"algo": algo, "numel": numel, "op": op, "transport": transport}
    results = run_world(_demo_rank, world_size, (cfg,), timeout=120)
    first = results[0]
    return Recording(
        algo=algo,
        op=op,
        transport=transport,
        world_size=world_size,
        numel=numel,
        parts=[tuple(p) for p in first["parts"]],  # type: ignore[misc]
        ran=first["ran"] if first["ran"] != algo else "",
        events=[r["events"] for r in results],
        final=[r["final"] for r in results],
        reference=first["reference"],
        same_on_every_rank=all(r["same"] for r in results),
    )


# --- text ---


def _nums(values: Sequence[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def _label(event: dict[str, Any]) -> str:
    return event.get("part") or ("its whole vector" if event.get("start") is None else "part")


def _row(rec: Recording, values: Sequence[float]) -> str:
    if len(rec.parts) <= 1:
        return f"[{_nums(values)}]"
    cells = [f"{label}: {_nums(values[start : start + n])}" for label, start, n in rec.parts if n]
    return " | ".join(cells)


def _describe(event: dict[str, Any], op: str) -> str:
    label, peer = _label(event), event["peer"]
    if event["kind"] == "send":
        return f"sends {label} [{_nums(event['values'])}] to rank {peer}"
    if event["kind"] == "reduce":
        sign = _OP_SIGN[op]
        before, incoming, after = _nums(event["before"]), _nums(event["values"]), _nums(event["after"])
        if sign == "+":
            return f"receives {label} from rank {peer}: [{before}] + [{incoming}] = [{after}]"
        return f"receives {label} from rank {peer}: {sign}([{before}], [{incoming}]) = [{after}]"
    return f"receives {label} [{_nums(event['values'])}] from rank {peer}"


def _phase(event: dict[str, Any]) -> str | None:
    """The algorithm's name for what a message does (from its tag, ``tags.py``); None for a ring send
    (its receiver's side names the phase)."""
    from .tags import Tag

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
    }[tag]


def render_text(rec: Recording) -> str:
    """The recording as the demo prints it: inputs, each step's messages and numbers, the check."""
    name = rec.algo + (f" (took {rec.ran})" if rec.ran else "")
    lines = [
        f"{name} all-reduce of {rec.numel} numbers over {rec.world_size} ranks "
        f"(op {rec.op}, transport {rec.transport}); rank r starts with 10*r + i",
    ]
    if len(rec.parts) > 1:
        lines.append("parts: " + "  ".join(f"{label} = [{s}:{s + n}]" for label, s, n in rec.parts))
    lines += ["", "before"]
    current = [inputs(r, rec.numel) for r in range(rec.world_size)]
    lines += [f"  rank {r} | {_row(rec, current[r])}" for r in range(rec.world_size)]
    for step in range(1, rec.steps + 1):
        in_step = [e for per_rank in rec.events for e in per_rank if e["step"] == step]
        phases = [name for name in dict.fromkeys(_phase(e) for e in in_step) if name]
        lines += ["", f"step {step}: " + ", ".join(phases)]
        for r in range(rec.world_size):
            mine = [e for e in rec.events[r] if e["step"] == step]
            for e in sorted(mine, key=lambda e: e["kind"] != "send"):  # what it sent, then what came in
                lines.append(f"  rank {r} {_describe(e, rec.op)}")
            if mine:
                current[r] = mine[-1]["buffer"]  # what its tensor held once the step's messages were done
        lines.append(f"  after step {step}")
        lines += [f"    rank {r} | {_row(rec, current[r])}" for r in range(rec.world_size)]
    same = all(f == rec.final[0] for f in rec.final)
    lines += [
        "",
        f"result: {'every rank holds' if same else 'ranks DIFFER; rank 0 holds'} [{_nums(rec.final[0])}]",
        f"torch.distributed.all_reduce of the same inputs: [{_nums(rec.reference)}]"
        f" ({'equal' if rec.final[0] == rec.reference else 'DIFFERENT'}; bitwise the same on every rank: "
        f"{'yes' if rec.same_on_every_rank else 'NO'})",
    ]
    return "\n".join(lines)


# --- the page ---


def render_html(rec: Recording) -> str:
    """The recording as one self-contained HTML page (inline SVG and script, nothing fetched)."""
    data = json.dumps(asdict(rec) | {"steps": rec.steps, "inputs": [inputs(r, rec.numel) for r in range(rec.world_size)]})
    title = f"ringcomm: {rec.algo} over {rec.world_size} ranks"
    star = (rec.ran or rec.algo) in ("ps", "naive")
    return _PAGE.replace("__TITLE__", title).replace("__DATA__", data).replace("__STAR__", "true" if star else "false")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
 #controls { margin: 8px 0; } #controls button { width: 5em; }
 #log { font: 12px/1.5 ui-monospace, monospace; white-space: pre; background: #f6f6f6; padding: 8px; }
 text { font: 11px ui-monospace, monospace; }
</style></head>
<body>
<h1 id="title">__TITLE__</h1>
<div id="controls"><button id="play">play</button>
 <input id="slider" type="range" min="0" value="0" step="1"> <span id="stepname"></span></div>
<svg id="view" width="760" height="560" viewBox="0 0 760 560" role="img" aria-label="ranks and messages"></svg>
<div id="log"></div>
<script>
"use strict";
window.addEventListener("error", (e) => {  // say so on the page, not only in the console
  document.body.dataset.error = String(e.message);
  document.getElementById("title").textContent += " (the page failed: " + e.message + ")";
});
const rec = __DATA__;
const star = __STAR__;
const P = rec.world_size, N = rec.numel;
const svg = document.getElementById("view"), slider = document.getElementById("slider");
const palette = ["#4e79a7","#f28e2b","#e15759","#76b7b2","#59a14f","#edc948","#b07aa1","#ff9da7","#9c755f","#bab0ac"];
function partOf(i) {
  for (let k = 0; k < rec.parts.length; k++) { const [, s, n] = rec.parts[k]; if (i >= s && i < s + n) return k; }
  return 0;
}
function buffersAt(step) {  // every rank's numbers once step `step` is done (0: the inputs)
  const cur = rec.inputs.map(r => r.slice());
  for (let r = 0; r < P; r++) for (const e of rec.events[r]) if (e.step <= step) cur[r] = e.buffer;
  return cur;
}
function place(r) {
  const cx = 380, cy = 270, R = 190;
  if (star) { if (r === 0) return [cx, cy]; const a = 2 * Math.PI * (r - 1) / (P - 1) - Math.PI / 2; return [cx + R * Math.cos(a), cy + R * Math.sin(a)]; }
  const a = 2 * Math.PI * r / P - Math.PI / 2; return [cx + R * Math.cos(a), cy + R * Math.sin(a)];
}
function el(name, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  svg.appendChild(e); return e;
}
function draw(step) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const defs = el("defs", {}); const m = document.createElementNS("http://www.w3.org/2000/svg", "marker");
  for (const [k, v] of Object.entries({id: "arrow", markerWidth: 8, markerHeight: 8, refX: 7, refY: 3, orient: "auto"})) m.setAttribute(k, v);
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path"); path.setAttribute("d", "M0,0 L7,3 L0,6 z"); path.setAttribute("fill", "#555");
  m.appendChild(path); defs.appendChild(m);
  const bufs = buffersAt(step), cell = Math.min(30, Math.floor(220 / Math.max(N, 1)));
  const lines = [];
  for (let r = 0; r < P; r++) for (const e of rec.events[r]) if (e.step === step && e.kind === "send") {
    const [x0, y0] = place(r), [x1, y1] = place(e.peer);
    const dx = x1 - x0, dy = y1 - y0, d = Math.hypot(dx, dy) || 1, cut = 40;
    el("line", {x1: x0 + dx * cut / d, y1: y0 + dy * cut / d, x2: x1 - dx * cut / d, y2: y1 - dy * cut / d,
                stroke: "#555", "stroke-width": 1.5, "marker-end": "url(#arrow)", class: "msg", "data-from": r, "data-to": e.peer});
  }
  for (let r = 0; r < P; r++) {
    const [x, y] = place(r), x0 = x - cell * N / 2;
    el("text", {x: x, y: y - 22, "text-anchor": "middle"}, "rank " + r);
    for (let i = 0; i < N; i++) {
      el("rect", {x: x0 + i * cell, y: y - 14, width: cell - 1, height: 24, fill: palette[partOf(i) % palette.length],
                  "fill-opacity": 0.55, class: "cell", id: "cell-" + r + "-" + i, "data-value": bufs[r][i]});
      el("text", {x: x0 + i * cell + cell / 2, y: y + 3, "text-anchor": "middle"}, String(Math.round(bufs[r][i] * 100) / 100));
    }
  }
  document.getElementById("stepname").textContent = step === 0 ? "before (inputs)" : "after step " + step + " of " + rec.steps;
  const log = [];
  for (let r = 0; r < P; r++) for (const e of rec.events[r]) if (e.step === step)
    log.push("rank " + r + " " + e.kind + (e.kind === "send" ? " -> rank " : " <- rank ") + e.peer + (e.part ? " (" + e.part + ")" : "") + ": [" + e.values.join(" ") + "]");
  if (step === rec.steps) log.push("result: [" + rec.final[0].join(" ") + "]; torch.distributed.all_reduce: [" + rec.reference.join(" ") + "]");
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
    from .algorithms import ALGOS
    from .ops import OPS
    from .transport import transport_names

    parser = argparse.ArgumentParser(
        prog="python -m ringcomm.demo",
        description="Watch a real all-reduce move real numbers, step by step.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--algo", default="ring", choices=list(ALGOS))
    parser.add_argument("--world-size", type=int, default=4, help="ranks (processes) to start, 1-8")
    parser.add_argument("--numel", type=int, default=8, help="numbers per rank, 1-32")
    parser.add_argument("--op", default="sum", choices=OPS)
    parser.add_argument("--transport", default="torch", choices=transport_names())
    parser.add_argument("--html", metavar="FILE", help="also write the run as a self-contained page to FILE")
    args = parser.parse_args(argv)
    if not 1 <= args.world_size <= 8:
        parser.error(f"--world-size {args.world_size}: choose 1 to 8 (the page and the tables stay readable)")
    if not 1 <= args.numel <= 32:
        parser.error(f"--numel {args.numel}: choose 1 to 32")
    rec = record(args.algo, args.world_size, args.numel, args.op, args.transport)
    print(render_text(rec))
    if args.html:
        with open(args.html, "w") as f:
            f.write(render_html(rec))
        print(f"\nwrote {args.html}: open it in a browser (no network needed)")
    ok = rec.same_on_every_rank and all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(rec.final[0], rec.reference)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
