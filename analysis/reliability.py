"""The reliability table: what the surviving ranks did when a peer died or froze, and how fast.

    RINGCOMM_RELIABILITY_OUT=results/faults.jsonl pytest tests/test_faults.py
    python -m analysis.reliability results/faults.jsonl      # markdown on stdout

Reads the JSON lines ``tests/test_faults.py`` appends (one per case: the fault,
algorithm, transport, settings, and each survivor's outcome, message and
seconds from the fault to its exception) and renders one row per case. When a
case was run more than once, its last line wins.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from . import CliParser

__all__ = ["caught_by", "load", "render"]

FAULT_NAMES = {
    "exit": "exits (`os._exit`)",
    "kill": "killed (SIGKILL)",
    "stop": "frozen (SIGSTOP)",
    "slow": "slow, alive (stalls 2 liveness periods)",
}


def caught_by(message: str) -> str:
    """What ended a survivor's wait, read off its error message."""
    if "stopped heartbeating" in message and "did not complete" not in message:
        return "liveness"
    if "gave up on this call after a failure" in message:
        return "peer's failure notice"
    if "did not complete within" in message:
        return "timeout"
    if "onnection closed" in message or "onnection reset" in message or "roken pipe" in message:
        return "closed connection"
    return "other"


def load(path: str | Path) -> list[dict[str, Any]]:
    """The cases in ``path``, one per (fault, algo, transport), last line wins, in file order.

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not one of tests/test_faults.py's records (names the line).
    """
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows[(row["fault"], row["algo"], row["transport"])] = row
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"line {number} is not a record of tests/test_faults.py ({exc!r})") from None
    return list(rows.values())


def _survivor(report: dict[str, Any]) -> str:
    if report["outcome"] == "returned":
        return f"rank {report['rank']}: returned, {'correct' if report.get('ok') else 'WRONG'} sum"
    message = report["message"]
    head = message.split(": ", 1)[1] if ": " in message else message
    head = head.replace(" (peer dead, frozen or not calling the same all_reduce?)", "")
    head = re.sub(r"\[[^\]]*\.cc:\d+\] ", "", head)  # Gloo's source location
    head = head.split(". ")[0]  # the first sentence
    if len(head) > 150:
        head = head[:147] + "..."
    return f"rank {report['rank']}: `{report['outcome']}` {report['after_fault_s']:.1f} s, {head}"


def render(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one row per case, with the settings the cases ran under."""
    if not rows:
        return "(no cases recorded)\n"
    first = rows[0]
    out = [
        f"World of {first['world_size']} ranks (rank {first['victim']} is the victim), "
        f"timeout {first['timeout_s']:g} s, heartbeat every {first['heartbeat_s']:g} s, "
        f"liveness limit {first['liveness_s']:g} s. Times are seconds from the fault to each "
        "survivor's exception (wall clock, one host).",
        "",
        "| fault | algo | transport | what the survivors did | slowest (s) | caught by |",
        "|---|---|---|---|---:|---|",
    ]
    for row in rows:
        survivors = row["survivors"]
        times = [s["after_fault_s"] for s in survivors if s["outcome"] != "returned"]
        slowest = f"{max(times):.1f}" if times else "n/a"
        if row["fault"] == "slow":
            slowest = "n/a"
        how = sorted({caught_by(s.get("message", "")) for s in survivors if s["outcome"] != "returned"})
        out.append(
            f"| {FAULT_NAMES.get(row['fault'], row['fault'])} | {row['algo']} | {row['transport']} | "
            + "<br>".join(_survivor(s) for s in survivors)
            + f" | {slowest} | {', '.join(how) or 'no error (waited)'} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the table of a records file; one line on stderr and status 1 if it cannot be read."""
    parser = CliParser(
        prog="python -m analysis.reliability",
        description="The reliability table (Markdown, on stdout) from the records tests/test_faults.py appends.",
        epilog="Record them with: RINGCOMM_RELIABILITY_OUT=results/faults.jsonl pytest tests/test_faults.py",
    )
    parser.add_argument("records", metavar="FAULTS.jsonl", help="the file RINGCOMM_RELIABILITY_OUT named")
    args = parser.parse_args(argv)
    try:
        rows = load(args.records)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"{parser.prog}: {args.records}: {why}", file=sys.stderr)
        return 1
    print(render(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
