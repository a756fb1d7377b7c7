"""``python -m analysis.benchtable BENCH.json ...``: a ``ringcomm.bench --json`` file as a Markdown table.

    python -m ringcomm.bench --world-size 4 --algos gloo,ring,ring@shm --json bench.json
    python -m analysis.benchtable bench.json          # sizes down, algorithms across

One table per file: a row per size, a column per algorithm, each cell the
median time in ms with, in parentheses, Gloo's time in the same world over
this one (above 1: faster than Gloo). With ``--memcpy`` a last column gives,
for the fastest non-Gloo algorithm of the row, its busbw as a fraction of one
core's copy bandwidth measured in the same run (``memcpy_gbs``).

``--auto`` renders, instead, how ``algo="auto"`` did in each file (run it with
``auto`` beside its candidates and gloo): a row per world size, transport and
size, with auto's pick, its predicted and measured time, the best single
algorithm of the same world, auto's time over the best's (the issue's "within
10 %"), and auto against Gloo::

    python -m ringcomm.bench --world-size 4 --transport shm --algos gloo,auto,ring,rhd,rd,ps,naive --json a.json
    python -m analysis.benchtable a.json --auto

``--plot PNG`` also draws the files' rows as the report's bus-bandwidth figure
(``analysis.plots.plot_busbw``: a panel per world size, a line per algorithm,
dashed the alpha-beta fit of each)::

    python -m analysis.benchtable bench.json --plot busbw.png
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import CliParser
from .markdown import human_bytes  # not plots: matplotlib would slow down --help

__all__ = ["render", "render_auto", "main"]


def render(doc: dict, memcpy: bool = False) -> str:
    """The Markdown table of one bench document (``{"machine", "world_size", "rows"}``)."""
    rows = doc["rows"]
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    sizes = sorted({r["size_bytes"] for r in rows})
    by = {(r["size_bytes"], r["algo"]): r for r in rows}
    head = ["size", *algos] + (["best busbw / memcpy"] if memcpy else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        gloo = by.get((size, "gloo"))
        cells = [human_bytes(size)]
        for algo in algos:
            r = by.get((size, algo))
            if r is None:
                cells.append("")
                continue
            ms = r["time_us"] / 1e3
            ratio = f" ({gloo['time_us'] / r['time_us']:.2f}×)" if gloo is not None and algo != "gloo" else ""
            cells.append(f"{ms:.3g}{ratio}")
        if memcpy:
            ours = [by[size, a] for a in algos if a != "gloo" and (size, a) in by]
            best = min(ours, key=lambda r: r["time_us"]) if ours else None
            if best is not None and best.get("memcpy_gbs"):
                cells.append(
                    f"{best['busbw_gbs'] / best['memcpy_gbs']:.0%} ({best['algo']}, memcpy {best['memcpy_gbs']:.1f} GB/s)"
                )
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plain(label: str) -> str:
    """``ring@shm`` -> ``ring``: the algorithm of a row label (bench.AlgoSpec's grammar)."""
    return label.partition("@")[0]


def render_auto(docs: Sequence[dict]) -> str:
    """One Markdown table of auto's picks against the best single algorithm, over every file."""
    head = ["P", "transport", "size", "auto picks", "predicted (ms)", "auto (ms)", "best alone (ms)",
            "auto / best", "pick alone / best", "auto vs gloo"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for doc in docs:
        # one world and one transport at a time: ring@shm's time says nothing of what auto over torch
        # could have done (gloo, the baseline of every row, runs over torch and is looked up in the world)
        groups: dict[tuple[object, str], list[dict]] = {}
        for r in doc["rows"]:
            groups.setdefault((r.get("world_size", doc.get("world_size")), r["transport"]), []).append(r)
        for (world, _), rows in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            lines += _auto_lines(doc, rows, [r for r in doc["rows"] if r.get("world_size", world) == world])
    return "\n".join(lines)


def _auto_lines(doc: dict, rows: list[dict], world: list[dict]) -> list[str]:
    """``render_auto``'s lines for ``rows``, of one world and one transport (``world``: all that world's rows)."""
    lines: list[str] = []
    by = {(r["size_bytes"], _plain(r["algo"])): r for r in rows}
    gloos = {r["size_bytes"]: r for r in world if _plain(r["algo"]) == "gloo"}
    for size in sorted({r["size_bytes"] for r in rows}):
        auto, gloo = by.get((size, "auto")), gloos.get(size)
        others = [r for (sz, a), r in by.items() if sz == size and a not in ("auto", "gloo")]
        if auto is None or not others:
            continue
        best = min(others, key=lambda r: r["time_us"])
        predicted = auto.get("predicted_us")
        alone = by.get((size, str(auto.get("choice"))))  # the picked algorithm, timed on its own
        lines.append(
            "| "
            + " | ".join(
                [
                    str(doc.get("world_size", auto.get("world_size", "?"))),
                    auto["transport"],
                    human_bytes(size),
                    str(auto.get("choice", "?")),
                    f"{predicted / 1e3:.3g}" if predicted else "–",
                    f"{auto['time_us'] / 1e3:.3g}",
                    f"{_plain(best['algo'])} {best['time_us'] / 1e3:.3g}",
                    f"{auto['time_us'] / best['time_us']:.2f}",
                    f"{alone['time_us'] / best['time_us']:.2f}" if alone else "–",
                    f"{gloo['time_us'] / auto['time_us']:.2f}×" if gloo else "–",
                ]
            )
            + " |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = CliParser(
        prog="python -m analysis.benchtable", description=__doc__.split("\n\n")[0],
    )  # fmt: skip
    parser.add_argument("files", nargs="+", help="ringcomm.bench --json files")
    parser.add_argument("--memcpy", action="store_true", help="add the busbw / memcpy column")
    parser.add_argument(
        "--auto", action="store_true", help="one table of auto's picks against the best single algorithm"
    )
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw busbw against size for all the files' rows (default: no figure)",
    )
    args = parser.parse_args(argv)
    docs = []
    for path in args.files:  # every file read before anything is printed: a bad one is said alone
        if not Path(path).exists():
            print(f"analysis.benchtable: {path}: no such file", file=sys.stderr)
            return 2
        try:
            doc = json.loads(Path(path).read_text())
            if not isinstance(doc["rows"], list):
                raise TypeError("'rows' is not a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"analysis.benchtable: {path}: not a ringcomm.bench --json file ({exc})", file=sys.stderr)
            return 2
        docs.append((path, doc))
    if args.auto:
        table = render_auto([doc for _, doc in docs])
        if table.count("\n") < 2:
            print("analysis.benchtable: --auto: no file has an auto row beside another algorithm", file=sys.stderr)
            return 2
        print(table)
    else:
        for path, doc in docs:
            what = doc.get("collective", "all_reduce")  # files from before --collective: all_reduce
            per_rank = ", size per rank" if what != "all_reduce" else ""
            print(f"**{what}, {doc.get('world_size', '?')} ranks{per_rank}** ({len(doc['rows'])} rows, {path})\n")
            print(render(doc, args.memcpy))
            print()
    if args.plot:
        from .fit import fit_rows
        from .plots import plot_busbw

        rows = [row for _, doc in docs for row in doc["rows"]]
        notes: list[str] = []
        if plot_busbw(rows, fit_rows(rows), args.plot, notes) is None:
            why = notes[-1].split(": skipped, ", 1)[-1] if notes else "nothing to draw"
            print(f"analysis.benchtable: --plot {args.plot}: {why}; nothing written", file=sys.stderr)
            return 1
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
