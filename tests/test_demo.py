"""ringcomm.demo: the step-by-step tables of a real run, and the page, in a real (headless) browser.

The tables are checked against a ring all-reduce of P = 3 ranks and 6 numbers
worked out by hand below (rank r starts with 10*r + i; chunk c_k is numbers
2k and 2k+1; at scatter-reduce step s rank r receives chunk r-s-1 from its
left and adds it in, at all-gather step s it receives chunk r-s, fully reduced).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from procs import run  # a child's own children stopped too

if TYPE_CHECKING:
    from ringcomm.tools.demo import Recording

ROOT = Path(__file__).resolve().parents[1]

BY_HAND = """\
ring all-reduce of 6 numbers over 3 ranks (op sum, transport torch); rank r starts with 10*r + i
parts: c0 = [0:2]  c1 = [2:4]  c2 = [4:6]

before
  rank 0 | c0: 0 1 | c1: 2 3 | c2: 4 5
  rank 1 | c0: 10 11 | c1: 12 13 | c2: 14 15
  rank 2 | c0: 20 21 | c1: 22 23 | c2: 24 25

step 1: scatter-reduce
  rank 0 sends c0 [0 1] to rank 1
  rank 0 receives c2 from rank 2: [4 5] + [24 25] = [28 30]
  rank 1 sends c1 [12 13] to rank 2
  rank 1 receives c0 from rank 0: [10 11] + [0 1] = [10 12]
  rank 2 sends c2 [24 25] to rank 0
  rank 2 receives c1 from rank 1: [22 23] + [12 13] = [34 36]
  after step 1
    rank 0 | c0: 0 1 | c1: 2 3 | c2: 28 30
    rank 1 | c0: 10 12 | c1: 12 13 | c2: 14 15
    rank 2 | c0: 20 21 | c1: 34 36 | c2: 24 25

step 2: scatter-reduce
  rank 0 sends c2 [28 30] to rank 1
  rank 0 receives c1 from rank 2: [2 3] + [34 36] = [36 39]
  rank 1 sends c0 [10 12] to rank 2
  rank 1 receives c2 from rank 0: [14 15] + [28 30] = [42 45]
  rank 2 sends c1 [34 36] to rank 0
  rank 2 receives c0 from rank 1: [20 21] + [10 12] = [30 33]
  after step 2
    rank 0 | c0: 0 1 | c1: 36 39 | c2: 28 30
    rank 1 | c0: 10 12 | c1: 12 13 | c2: 42 45
    rank 2 | c0: 30 33 | c1: 34 36 | c2: 24 25

step 3: all-gather
  rank 0 sends c1 [36 39] to rank 1
  rank 0 receives c0 [30 33] from rank 2
  rank 1 sends c2 [42 45] to rank 2
  rank 1 receives c1 [36 39] from rank 0
  rank 2 sends c0 [30 33] to rank 0
  rank 2 receives c2 [42 45] from rank 1
  after step 3
    rank 0 | c0: 30 33 | c1: 36 39 | c2: 28 30
    rank 1 | c0: 10 12 | c1: 36 39 | c2: 42 45
    rank 2 | c0: 30 33 | c1: 34 36 | c2: 42 45

step 4: all-gather
  rank 0 sends c0 [30 33] to rank 1
  rank 0 receives c2 [42 45] from rank 2
  rank 1 sends c1 [36 39] to rank 2
  rank 1 receives c0 [30 33] from rank 0
  rank 2 sends c2 [42 45] to rank 0
  rank 2 receives c1 [36 39] from rank 1
  after step 4
    rank 0 | c0: 30 33 | c1: 36 39 | c2: 42 45
    rank 1 | c0: 30 33 | c1: 36 39 | c2: 42 45
    rank 2 | c0: 30 33 | c1: 36 39 | c2: 42 45

result: every rank holds [30 33 36 39 42 45]
torch.distributed.all_reduce of the same inputs: [30 33 36 39 42 45] (equal; bitwise the same on every rank: yes)
"""


def _demo(*args: str) -> subprocess.CompletedProcess:
    """``python -m ringcomm.demo ARGS`` as a user types it: a new interpreter that spawns its ranks."""
    return run(
        [sys.executable, "-m", "ringcomm.demo", *args], cwd=ROOT, capture_output=True, text=True, timeout=180
    )


def _demo_here(*args: str) -> subprocess.CompletedProcess:
    """The demo's ``main(ARGS)`` in this process, its output captured: the same code path after the
    interpreter start, with the ranks forked from the suite's fork server (conftest) instead of
    new interpreters that import torch each. Its world has the demo's own 120 s timeout."""
    from ringcomm.tools import demo

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = demo.main(list(args))
        except SystemExit as exc:  # a refusal from the parser
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["ringcomm.demo", *args], code, out.getvalue(), err.getvalue())


def test_the_printed_tables_of_a_ring_of_three_equal_the_ones_worked_out_by_hand() -> None:
    done = _demo("--algo", "ring", "--world-size", "3", "--numel", "6")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == BY_HAND


ALL_GATHER_BY_HAND = """\
ring all-gather of 2 numbers per rank over 3 ranks (transport torch); rank r starts with 10*r + i in block b<r> \
of its output (a copy: no message; _ is a number not there yet)
parts: b0 = [0:2]  b1 = [2:4]  b2 = [4:6]

before
  rank 0 | b0: 0 1 | b1: _ _ | b2: _ _
  rank 1 | b0: _ _ | b1: 10 11 | b2: _ _
  rank 2 | b0: _ _ | b1: _ _ | b2: 20 21

step 1: all-gather
  rank 0 sends b0 [0 1] to rank 1
  rank 0 receives b2 [20 21] from rank 2
  rank 1 sends b1 [10 11] to rank 2
  rank 1 receives b0 [0 1] from rank 0
  rank 2 sends b2 [20 21] to rank 0
  rank 2 receives b1 [10 11] from rank 1
  after step 1
    rank 0 | b0: 0 1 | b1: _ _ | b2: 20 21
    rank 1 | b0: 0 1 | b1: 10 11 | b2: _ _
    rank 2 | b0: _ _ | b1: 10 11 | b2: 20 21

step 2: all-gather
  rank 0 sends b2 [20 21] to rank 1
  rank 0 receives b1 [10 11] from rank 2
  rank 1 sends b0 [0 1] to rank 2
  rank 1 receives b2 [20 21] from rank 0
  rank 2 sends b1 [10 11] to rank 0
  rank 2 receives b0 [0 1] from rank 1
  after step 2
    rank 0 | b0: 0 1 | b1: 10 11 | b2: 20 21
    rank 1 | b0: 0 1 | b1: 10 11 | b2: 20 21
    rank 2 | b0: 0 1 | b1: 10 11 | b2: 20 21

result: every rank holds [0 1 10 11 20 21]
torch.distributed.all_gather_into_tensor of the same inputs: [0 1 10 11 20 21] (equal; bitwise the same on every rank: yes)
"""


def test_the_printed_tables_of_a_ring_all_gather_of_three_equal_the_ones_worked_out_by_hand() -> None:
    """Each rank starts with its own block only (the copy into the output sends no message); at
    step s rank r sends block r-s+1 to its right and receives block r-s from its left."""
    done = _demo_here("--collective", "all_gather", "--algo", "ring", "--world-size", "3", "--numel", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ALL_GATHER_BY_HAND


@pytest.mark.parametrize("algo", ["ring_simple", "rhd", "rd", "ps", "naive", "auto"])
def test_every_algorithm_demo_ends_equal_to_torch_distributed(algo: str) -> None:
    done = _demo_here("--algo", algo, "--world-size", "3", "--numel", "5", "--op", "max")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "result: every rank holds [20 21 22 23 24]" in done.stdout
    assert "(equal; bitwise the same on every rank: yes)" in done.stdout


NAIVE_BY_HAND = """\
naive all-reduce of 2 numbers over 3 ranks (op sum, transport torch); rank r starts with 10*r + i

before
  rank 0 | [0 1]
  rank 1 | [10 11]
  rank 2 | [20 21]

step 1: gather
  rank 0 receives the whole vector from rank 1: [0 1] + [10 11] = [10 12]
  rank 1 sends the whole vector [10 11] to rank 0
  rank 2 sends the whole vector [20 21] to rank 0
  after step 1
    rank 0 | [10 12]
    rank 1 | [10 11]
    rank 2 | [20 21]

step 2: gather
  rank 0 receives the whole vector from rank 2: [10 12] + [20 21] = [30 33]
  after step 2
    rank 0 | [30 33]
    rank 1 | [10 11]
    rank 2 | [20 21]

step 3: broadcast
  rank 0 sends the whole vector [30 33] to rank 1
  rank 0 sends the whole vector [30 33] to rank 2
  rank 1 receives the whole vector [30 33] from rank 0
  rank 2 receives the whole vector [30 33] from rank 0
  after step 3
    rank 0 | [30 33]
    rank 1 | [30 33]
    rank 2 | [30 33]

result: every rank holds [30 33]
torch.distributed.all_reduce of the same inputs: [30 33] (equal; bitwise the same on every rank: yes)
"""


def test_a_message_is_received_in_the_step_that_sends_it_or_later() -> None:
    """naive's root folds rank 1 in, then rank 2, then broadcasts: rank 1 cannot hold the sum
    before the root has sent it (each rank's own count of its posts put it there, a step early)."""
    done = _demo_here("--algo", "naive", "--world-size", "3", "--numel", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == NAIVE_BY_HAND


def test_a_server_adds_each_push_to_what_it_holds_by_then() -> None:
    """Both pushes are posted together: the second one's 'before' is the first one's result,
    not the server's input (which made [0 1] + [20 21] = [30 33])."""
    done = _demo_here("--algo", "ps", "--world-size", "3", "--numel", "2", "--op", "avg")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 0 receives the whole vector from rank 2: [10 12] + [20 21] = [30 33]" in done.stdout
    assert "avg: the ranks add, and divide a sum by P = 3" in done.stdout
    after_push = done.stdout.split("after step 1\n", 1)[1].split("\n\n", 1)[0]
    # the workers still hold their own numbers: the pull has not come yet
    assert after_push.splitlines() == ["    rank 0 | [30 33]", "    rank 1 | [10 11]", "    rank 2 | [20 21]"]


def check_story(rec: Recording) -> list[str]:
    """What is wrong with the story the demo tells of ``rec`` (empty: nothing): the tests' check of
    a recording (the tool itself never needs it).

    Every receive comes in the step of its send or later and carries the numbers sent;
    every send carries what its rank held then (as the tables show it); every reduce adds
    up (``before op incoming = after``); the last tables, with what ``then`` says, are
    the results.
    """
    from ringcomm.tools import demo

    states, wrong = demo.replay(rec), []
    for rank, per_rank in enumerate(rec.events):
        for e in sorted(per_rank, key=lambda e: e["msg"]):
            if e["kind"] == "send":
                start = e.get("start")
                held = states[e["step"] - 1][rank][start : start + len(e["values"])] if start is not None else None
                if held is not None and held != e["values"] and rec.op != "avg":
                    wrong.append(f"rank {rank} step {e['step']} sends {e['values']} but holds {held}")
    for rank, e, sent in demo._pairs(rec.events):
        if sent is None:
            wrong.append(f"rank {rank} step {e['step']} receives from rank {e['peer']}, which sent nothing")
            continue
        if sent["step"] > e["step"]:
            wrong.append(f"rank {rank} receives in step {e['step']} what rank {e['peer']} sends in step {sent['step']}")
        if sent["values"] != e["values"]:
            wrong.append(f"rank {rank} step {e['step']} receives {e['values']}, rank {e['peer']} sent {sent['values']}")
        if "after" in e and demo._combine(e["before"], e["values"], rec.op) != e["after"]:
            wrong.append(f"rank {rank} step {e['step']}: {e['before']} {rec.op} {e['values']} is not {e['after']}")
    last = states[-1]
    if rec.collective == "reduce_scatter":  # the output: the rank's block of its copy of the input
        n = rec.numel // rec.world_size
        last = [row[r * n : (r + 1) * n] for r, row in enumerate(last)]
    if rec.steps and last != rec.final and rec.op != "avg":  # avg divides after its last message
        wrong.append(f"the last tables {last} are not the results {rec.final}")
    return wrong


@pytest.mark.parametrize(
    "algo, world_size, numel, op",
    [("rd", 3, 3, "max"), ("rhd", 5, 4, "avg"), ("ring", 5, 3, "sum"), ("ps", 4, 2, "min"), ("auto", 2, 1, "sum")],
)
def test_the_story_adds_up(algo: str, world_size: int, numel: int, op: str) -> None:
    """Every receive matches a send of the same or an earlier step, every send carries what the
    tables say its rank held, every reduce adds up, and the last tables are the results."""
    from ringcomm.tools.demo import record, render_text

    rec = record(algo, world_size, numel, op)
    assert check_story(rec) == [], render_text(rec)
    if algo == "rd":  # rd receives into scratch and combines there: said, and in the tables at once
        assert "into scratch and combines it with its own: max([20 21 22], [10 11 12]) = [20 21 22]" in render_text(rec)


@pytest.mark.parametrize(
    "collective, algo, numel, op",
    [("all_gather", "auto", 2, "sum"), ("reduce_scatter", "ring", 6, "max"), ("reduce_scatter", "auto", 3, "avg"),
     ("broadcast", "ring", 4, "sum"), ("broadcast", "tree", 2, "sum"), ("broadcast", "auto", 1, "sum")],
)  # fmt: skip
def test_the_other_collectives_story_adds_up_and_ends_equal_to_torchs_own(
    collective: str, algo: str, numel: int, op: str
) -> None:
    """At P = 3 (the rest of the demo is all_reduce's): every message is placed in the tables (none
    lost for want of a place, as reduce_scatter's were in its private copy), the story adds up, and
    every rank ends equal to torch.distributed's own collective of the same inputs."""
    from ringcomm.tools.demo import record, render_text

    rec = record(algo, 3, numel, op, collective=collective)
    text = render_text(rec)
    assert all(e["start"] is not None for per_rank in rec.events for e in per_rank), text
    assert sum(map(len, rec.events)) >= 4, text  # 3 ranks: at least 2 messages sent and received
    assert check_story(rec) == [], text
    assert rec.final == rec.references and len(rec.final) == 3, text
    if collective == "reduce_scatter":  # block r of the reduction on rank r
        n = numel // 3
        total = [sum(10 * r + i for r in range(3)) / 3 if op == "avg" else 20 + i for i in range(numel)]
        assert rec.final == [total[r * n : (r + 1) * n] for r in range(3)], text
        assert "(equal)" in text.splitlines()[-1], text
    else:
        expected = [10 * r + i for r in range(3) for i in range(numel)] if collective == "all_gather" else list(range(numel))
        assert rec.final == [expected] * 3, text
        assert text.endswith("(equal; bitwise the same on every rank: yes)"), text


def test_one_rank_says_there_is_nothing_to_send() -> None:
    done = _demo_here("--algo", "ring", "--world-size", "1", "--numel", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ring all-reduce of 1 number over 1 rank " in done.stdout
    assert "one rank: nothing to send; its numbers are already the result" in done.stdout


def test_help_shows_each_default_once() -> None:
    done = _demo("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for default in ["ring", "4", "8", "sum", "torch"]:
        assert f"(default: {default})" in text, default
    assert "(default: None)" not in text and "``" not in text, text


@pytest.mark.parametrize(
    "args, says",
    [
        (["--world-size", "40"], "--world-size 40: choose 1 to 8"),
        (["--world-size", "0"], "--world-size 0: choose 1 to 8"),
        (["--numel", "0"], "--numel 0: choose 1 to 32"),
        (["--algo", "nope"], "argument --algo: invalid choice: 'nope'"),
        (["--html", "/nonexistent-folder/ring.html"], "--html /nonexistent-folder/ring.html: no folder"),
        (["--collective", "broadcast", "--algo", "rhd"], "--algo rhd: broadcast has ring, tree, auto"),
        (["--collective", "all_gather", "--algo", "rd", "--world-size", "3"], "needs --world-size a power of two"),
        (["--collective", "reduce_scatter", "--world-size", "3", "--numel", "4"], "use a multiple of 3"),
    ],
)
def test_bad_arguments_are_one_line_and_start_nothing(args: list[str], says: str) -> None:
    done = _demo(*args)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no usage block, no traceback
    assert done.stdout == ""  # no rank started


# --- the page, in headless Chromium ---

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
    "--disable-component-update", "--no-first-run", "--disable-quic", "--enable-logging=stderr", "--v=0",
    "--disable-dev-shm-usage",  # its shared-memory files in /tmp: none left in /dev/shm
]  # fmt: skip


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return run(
        [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *args],  # type: ignore[list-item]
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium)")
def test_the_page_loads_without_errors_and_shows_the_middle_step(tmp_path: Path) -> None:
    page = tmp_path / "ring.html"
    done = _demo_here("--algo", "ring", "--world-size", "4", "--numel", "8", "--html", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    html = page.read_text()
    assert "http://" not in html.replace('"http://www.w3.org/2000/svg"', "") and "https://" not in html  # self-contained
    url = f"{page.as_uri()}#step=3"  # the end of scatter-reduce: rank r holds chunk r+1 fully reduced

    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "rror" in line or "Uncaught" in line], console
    assert 'data-step="3"' in dom.stdout and "data-error" not in dom.stdout
    # every number is 10*r + i summed over the 4 ranks where fully reduced: 60 + 4i
    for rank in range(4):
        chunk = (rank + 1) % 4
        for i in (2 * chunk, 2 * chunk + 1):
            assert f'id="cell-{rank}-{i}" data-value="{60 + 4 * i}"' in dom.stdout, (rank, i)
    assert dom.stdout.count('class="msg"') == 4  # step 3: each rank sends one chunk to its right

    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=800,800", url)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(str(shot))[..., :3]
    coloured = ((pixels.max(axis=2) - pixels.min(axis=2)) > 0.15).mean()  # cells are tinted, the page is grey
    assert coloured > 0.01, f"only {coloured:.2%} of the screenshot is coloured: the cells did not render"


@pytest.mark.fast
def test_the_recording_is_what_the_page_embeds(tmp_path: Path) -> None:
    """The page carries the same numbers the tables print (no browser needed)."""
    from ringcomm.tools.demo import Recording, render_html, render_text

    rec = Recording("ring", "sum", "torch", 2, 2, [("c0", 0, 1), ("c1", 1, 1)], final=[[10.0, 12.0]] * 2,
                    reference=[10.0, 12.0], same_on_every_rank=True, events=[[], []])  # fmt: skip
    html = render_html(rec)
    data = json.loads(html.split("const rec = ", 1)[1].split(";\nconst star", 1)[0])
    assert data["final"] == rec.final and data["inputs"] == [[0.0, 1.0], [10.0, 11.0]]
    assert "result: every rank holds [10 12]" in render_text(rec)
    assert os.linesep not in data["algo"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium)")
def test_the_page_draws_each_message_until_it_is_received(tmp_path: Path) -> None:
    """naive over 3: both workers send in step 1, the root takes rank 1's then rank 2's. The page
    drew only the sends of a step, so step 2 (rank 2's arrives) had no arrow; its numbers came from
    the tracer's snapshots (which a receive in flight may or may not have reached)."""
    page = tmp_path / "naive.html"
    done = _demo_here("--algo", "naive", "--world-size", "3", "--numel", "2", "--html", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    for step, solid, dashed, root in [(1, 1, 1, (10, 12)), (2, 1, 0, (30, 33)), (3, 2, 0, (30, 33))]:
        dom = _chromium(tmp_path, "--dump-dom", f"{page.as_uri()}#step={step}")
        assert dom.returncode == 0 and "data-error" not in dom.stdout, dom.stderr[-2000:]
        assert dom.stdout.count('class="msg"') == solid, step
        assert dom.stdout.count('class="msg-waiting"') == dashed, step
        for i, value in enumerate(root):
            assert f'id="cell-0-{i}" data-value="{value}"' in dom.stdout, (step, i)


# --- the other collectives' pages (they were refused: "--html: the page shows all_reduce only") ---

#: (collective, numel, step): each rank's row after that step, worked out by hand at P = 3 (ring). reduce_scatter
#: (6 numbers, blocks b_k = numbers 2k, 2k+1): at step s rank r receives block r-s-1... rotated: r+1-s, adding it
#: to its own; after the last step the row shows its output block b_r (outlined) where the step left it.
#: all_gather (2 numbers): block r is rank r's input, _ a number not there yet; at step s rank r receives block r-s.
#: broadcast (4 numbers, from rank 0): the chain 0 -> 1 -> 2, one message a step.
PAGE_ROWS = {
    ("reduce_scatter", 6, 1): [[0, 1, 24, 26, 4, 5], [10, 11, 12, 13, 18, 20], [30, 32, 22, 23, 24, 25]],
    ("reduce_scatter", 6, 2): [[30, 33, 24, 26, 4, 5], [10, 11, 36, 39, 18, 20], [30, 32, 22, 23, 42, 45]],
    ("all_gather", 2, 0): [[0, 1, "_", "_", "_", "_"], ["_", "_", 10, 11, "_", "_"], ["_", "_", "_", "_", 20, 21]],
    ("all_gather", 2, 1): [[0, 1, "_", "_", 20, 21], [0, 1, 10, 11, "_", "_"], ["_", "_", 10, 11, 20, 21]],
    ("all_gather", 2, 2): [[0, 1, 10, 11, 20, 21]] * 3,
    ("broadcast", 4, 1): [[0, 1, 2, 3], [0, 1, 2, 3], [20, 21, 22, 23]],
    ("broadcast", 4, 2): [[0, 1, 2, 3]] * 3,
}  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium)")
@pytest.mark.parametrize("collective, numel", [("reduce_scatter", 6), ("all_gather", 2), ("broadcast", 4)])
def test_the_other_collectives_pages_show_each_step(tmp_path: Path, collective: str, numel: int) -> None:
    """The page of reduce_scatter, all_gather and broadcast, as all_reduce's: no error, each rank's numbers
    after each step as worked out by hand, one arrow per message received in the step, reduce_scatter's
    output block outlined, and the log ending with the check against torch's own."""
    page = tmp_path / f"{collective}.html"
    done = _demo_here("--collective", collective, "--world-size", "3", "--numel", str(numel), "--html", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [step for c, n, step in PAGE_ROWS if c == collective]
    for step in steps:
        dom = _chromium(tmp_path, "--dump-dom", f"{page.as_uri()}#step={step}")
        assert dom.returncode == 0, dom.stderr[-2000:]
        console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
        assert not [line for line in console if "rror" in line or "Uncaught" in line], console
        assert f'data-step="{step}"' in dom.stdout and "data-error" not in dom.stdout, step
        for rank, row in enumerate(PAGE_ROWS[(collective, numel, step)]):
            for i, value in enumerate(row):
                assert f'id="cell-{rank}-{i}" data-value="{value}"' in dom.stdout, (step, rank, i, value)
        received = {"reduce_scatter": 3, "all_gather": 3, "broadcast": 1}[collective] if step else 0
        assert dom.stdout.count('class="msg"') == received, step
        outlined = dom.stdout.count('class="cell output"')
        assert outlined == (3 * numel // 3 if collective == "reduce_scatter" else 0), outlined
    assert f"torch.distributed.{ {'reduce_scatter': 'reduce_scatter_tensor', 'all_gather': 'all_gather_into_tensor', 'broadcast': 'broadcast'}[collective]} of the same inputs" in dom.stdout
    assert "(equal" in dom.stdout and "DIFFER" not in dom.stdout


@pytest.mark.fast
def test_a_reduce_scatter_page_ends_with_each_ranks_output_in_its_row() -> None:
    """The page's last rows put rank r's output (avg: divided) in block r of its row, and its log ends
    with the lines the text ends with (no browser needed)."""
    from ringcomm.tools.demo import Recording, render_html, render_text, replay

    # P = 2, 2 numbers, avg: rank 0 sends b1 [1] to rank 1, rank 1 sends b0 [10] to rank 0; each adds
    events = [
        [{"kind": "send", "peer": 1, "tag": 0, "msg": 0, "step": 1, "start": 1, "values": [1.0], "op": "avg"},
         {"kind": "reduce", "peer": 1, "tag": 0, "msg": 1, "step": 1, "start": 0, "values": [10.0], "op": "avg",
          "after": [10.0]}],
        [{"kind": "send", "peer": 0, "tag": 0, "msg": 0, "step": 1, "start": 0, "values": [10.0], "op": "avg"},
         {"kind": "reduce", "peer": 0, "tag": 0, "msg": 1, "step": 1, "start": 1, "values": [1.0], "op": "avg",
          "after": [12.0]}],
    ]  # fmt: skip
    rec = Recording("ring", "avg", "torch", 2, 2, [("b0", 0, 1), ("b1", 1, 1)], events=events,
                    final=[[5.0], [6.0]], same_on_every_rank=True, collective="reduce_scatter",
                    references=[[5.0], [6.0]])  # fmt: skip
    from ringcomm.algorithms.tags import Tag

    for per_rank in events:
        for e in per_rank:
            e["tag"] = int(Tag.RING)
    html = render_html(rec)
    data = json.loads(html.split("const rec = ", 1)[1].split(";\nconst star", 1)[0])
    assert replay(rec)[-1] == [[10.0, 1.0], [10.0, 12.0]]
    assert data["last"] == [[5.0, 1.0], [10.0, 6.0]]  # each rank's output block, divided, in its row
    assert data["size"] == 2 and data["headline"] == render_text(rec).splitlines()[0]
    text = render_text(rec)
    assert text.endswith("\n".join(data["ending"])), (text, data["ending"])
    assert "rank 1 | b1: 6" in data["ending"][2] and data["ending"][3] == "" and "(equal)" in data["ending"][-1]


# --- hier: two levels, on emulated nodes of 2 ranks ---


@pytest.mark.parametrize("world_size, numel, op", [(4, 8, "sum"), (6, 7, "max")])
def test_the_story_of_hier_adds_up_on_both_levels(world_size: int, numel: int, op: str) -> None:
    """hier's messages go over its node's and its cross group's transports, not the call's: every one of
    them is in the tables (the demo said "one rank: nothing to send"), in the order of hier's three phases,
    each labelled with its level: phase 1 (g - 1 sends a rank) and 3 (g - 1) inside the node, phase 2 (a
    ring of the n nodes: 2(n - 1)) to the ranks of the same local rank on the other nodes."""
    from ringcomm.tools.demo import _step_title, record, render_text

    rec = record("hier", world_size, numel, op)
    text = render_text(rec)
    assert check_story(rec) == [], text
    nodes = [[r, r + 1] for r in range(0, world_size, 2)]  # hier_ranks_per_node=2
    assert rec.nodes == nodes, text
    n, g = len(nodes), 2
    said = ", ".join(f"node {k} = ranks {a} {b}" for k, (a, b) in enumerate(nodes))
    assert said in text.splitlines()[0], text
    expected = [max(10 * r + i for r in range(world_size)) if op == "max" else sum(10 * r + i for r in range(world_size))
                for i in range(numel)]  # fmt: skip
    assert rec.final == [expected] * world_size and rec.reference == expected, text
    for rank, per_rank in enumerate(rec.events):
        node, local = rank // g, rank % g
        levels = [e["level"] for e in sorted(per_rank, key=lambda e: e["msg"]) if e["kind"] == "send"]
        assert levels == ["node"] * (g - 1) + ["cross"] * 2 * (n - 1) + ["node"] * (g - 1), (rank, levels)
        for e in per_rank:
            if e["level"] == "node":
                assert e["peer"] in nodes[node] and e["peer"] != rank, (rank, e)
            else:
                assert e["peer"] % g == local and e["peer"] // g != node, (rank, e)
            where = " in node " + str(node) if e["level"] == "node" else " across nodes"
            assert f"rank {e['peer']}{where}" in text, (rank, e)
    titles = [_step_title(rec, step) for step in range(1, rec.steps + 1)]
    phases = [next(k for k in (1, 2, 3) if f"hier phase {k}" in title) for title in titles]
    assert phases == [1] * (g - 1) + [2] * 2 * (n - 1) + [3] * (g - 1), titles


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium)")
def test_the_hier_page_draws_the_nodes_and_the_arrows_of_each_level(tmp_path: Path) -> None:
    """2 nodes of 2: one box per node holding its ranks; at step 1 (phase 1) four thin arrows inside the
    nodes, at step 2 (phase 2) four thick arrows between the nodes, each between ranks of the same local
    rank; the numbers after step 2 as the tables print them."""
    import re

    page = tmp_path / "hier.html"
    done = _demo_here("--algo", "hier", "--world-size", "4", "--numel", "8", "--html", str(page))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "node 0 = ranks 0 1, node 1 = ranks 2 3" in done.stdout.splitlines()[0], done.stdout
    for step, level, pairs in [(1, "node", {(0, 1), (1, 0), (2, 3), (3, 2)}), (2, "cross", {(0, 2), (2, 0), (1, 3), (3, 1)})]:
        dom = _chromium(tmp_path, "--dump-dom", f"{page.as_uri()}#step={step}")
        assert dom.returncode == 0 and "data-error" not in dom.stdout, dom.stderr[-2000:]
        assert f'data-step="{step}"' in dom.stdout
        boxes = re.findall(r'<rect [^>]*class="node" id="node-(\d)" data-ranks="([\d ]+)"', dom.stdout)
        assert boxes == [("0", "0 1"), ("1", "2 3")], boxes
        arrows = re.findall(r'<(?:line|path) [^>]*class="msg"[^>]*>', dom.stdout)
        drawn = set()
        for arrow in arrows:
            attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', arrow))
            assert attrs["data-level"] == level, arrow
            assert float(attrs["stroke-width"]) == (6 if level == "cross" else 2.5), arrow  # across: thick
            drawn.add((int(attrs["data-from"]), int(attrs["data-to"])))
        assert len(arrows) == 4 and drawn == pairs, arrows
        assert dom.stdout.count('class="msg-core"') == (4 if level == "cross" else 0)  # hollow: across only
    # after step 2 (as the tables print it): rank 0 holds [6:8] of everyone's sum, rank 3 [0:2]
    for rank, i, value in [(0, 6, 84), (0, 7, 88), (3, 0, 60), (3, 1, 64), (1, 2, 68)]:
        assert f'id="cell-{rank}-{i}" data-value="{value}"' in dom.stdout, (rank, i, value)
