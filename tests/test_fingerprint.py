"""The same-call check's fingerprints (fingerprint.py), on a board in memory: no processes.

- A fingerprint longer than a call-board slot used to be cut there, and every
  entry that could not be read decoded to "?", equal to every other: two ranks
  whose calls differed only past the cut, or whose entries were both garbage,
  passed the check. Now the ranks compare digests of the whole fingerprint, an
  unreadable entry matches nothing, and the error still shows the fields.
"""

from __future__ import annotations

import threading

import pytest

from ringcomm.errors import MismatchError
from ringcomm.runtime import check as fp
from ringcomm.runtime.board import _TEXT_MAX

pytestmark = pytest.mark.fast  # every test here is quick


class _Board:
    """One call's board for every rank, cut as the call board cuts a slot (``board.CallBoard``)."""

    def __init__(self, world_size: int, garble: bool = False) -> None:
        self.texts: list[str | None] = [None] * world_size
        self.garble = garble
        self.cond = threading.Condition()

    def publish(self, rank: int, text: str) -> None:
        data = b"\xff\xfe" * 300 if self.garble else text.encode()
        with self.cond:
            self.texts[rank] = data[:_TEXT_MAX].decode(errors="replace")
            self.cond.notify_all()

    def collect(self) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: None not in self.texts, timeout=10)
            return list(self.texts)  # type: ignore[arg-type]


class _RankBoard:
    def __init__(self, board: _Board, rank: int) -> None:
        self.board, self.rank = board, rank

    def publish(self, call: int, text: str) -> None:
        self.board.publish(self.rank, text)

    def collect(self, call: int, deadline: float, what: str) -> list[str]:
        return self.board.collect()


class _Session:
    """What check_same_call needs of a session: a rank and its view of the board (through its rendezvous)."""

    def __init__(self, board: _Board, rank: int) -> None:
        self.rank, self.world_size = rank, len(board.texts)
        self._board = _RankBoard(board, rank)
        self.rendezvous = self  # Session.rendezvous.board(deadline): here, this object's own

    def board(self, deadline: float) -> _RankBoard:
        return self._board


def _check_on_every_rank(fingerprints: list[list[object]], garble: bool = False) -> list[str | None]:
    """Run the check of one call on every rank (a thread each); each rank's error text, or None."""
    board = _Board(len(fingerprints), garble)
    said: list[str | None] = [None] * len(fingerprints)

    def rank_main(rank: int) -> None:
        try:
            fp.check_same_call(_Session(board, rank), 0, fingerprints[rank], deadline=0.0)  # type: ignore[arg-type]
        except MismatchError as exc:
            said[rank] = str(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(fingerprints))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    return said


def _call(options: dict, numel: int = 100) -> list[object]:
    return fp.fingerprint(numel, "float32", "sum", "ring", "torch", "cpu", options)


def test_calls_that_differ_only_past_a_board_slot_are_told_apart() -> None:
    long = "a" * 600  # the text of such a fingerprint runs past the slot's end
    said = _check_on_every_rank([_call({"note": long + "0"}), _call({"note": long + "1"})])
    for rank, error in enumerate(said):
        assert error is not None, f"rank {rank}: the check passed calls that differ"
        assert error.startswith(f"rank {rank}: ranks called all_reduce differently (options differs: ranks [0] ")
        assert "; ranks [1] " in error


def test_entries_that_cannot_be_read_never_match_each_other() -> None:
    said = _check_on_every_rank([_call({}), _call({})], garble=True)
    for rank, error in enumerate(said):
        assert error is not None, f"rank {rank}: two unreadable entries passed as the same call"
        assert "ranks [0, 1] published a fingerprint that cannot be read" in error


@pytest.mark.parametrize("p", [2, 3])
def test_the_same_long_call_on_every_rank_passes(p: int) -> None:
    assert _check_on_every_rank([_call({"note": "é" * 400})] * p) == [None] * p


def test_a_difference_in_a_short_field_is_shown_in_full() -> None:
    said = _check_on_every_rank([_call({}, 100), _call({}, 108), _call({}, 100)])
    assert all("(numel differs: ranks [0, 2] 100; ranks [1] 108)" in error for error in said)  # type: ignore[operator]


@pytest.mark.parametrize("value", ["x" * 5000, "é\\\"" * 2000, "\x00\u2028" * 900])
def test_every_entry_fits_a_board_slot(value: str) -> None:
    assert len(fp.entry(_call({"note": value})).encode()) <= _TEXT_MAX
    assert len(fp._refusal(f"ValueError: {value}").encode()) <= _TEXT_MAX


def test_a_long_refusal_reaches_the_peers_readable() -> None:
    """A refusal reason is cut to fit the slot, not cut by the slot into JSON nobody can read."""
    board = _Board(2)
    reason = "ValueError: " + "é" * 400
    errors: list[str] = []

    def refusing() -> None:
        fp.refuse(_Session(board, 1), 0, reason, deadline=0.0)  # type: ignore[arg-type]

    def checking() -> None:
        try:
            fp.check_same_call(_Session(board, 0), 0, _call({}), deadline=0.0)  # type: ignore[arg-type]
        except MismatchError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=refusing), threading.Thread(target=checking)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(errors) == 1 and "ranks [1] refused this all_reduce (rank 1: ValueError: éé" in errors[0], errors
