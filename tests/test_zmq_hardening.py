"""ZmqTransport under a program's end and under strangers: nothing sent is lost, nothing foreign gets in.

1. A rank that ends right after its last collective (``shutdown()``, then exit) must not take that
   collective's last sends with it: ZeroMQ counts a small send done while its own I/O thread still
   holds it, so closing with linger 0 used to drop them and leave a peer waiting for its result.
2. Any process that can reach a rank's port (a stray client, a zombie of a crashed job on a
   reused port) must not get a frame into a collective, or make libzmq allocate a huge frame,
   or take a rank's place: its frames are dropped (and logged once), and the collective succeeds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from datetime import timedelta
from typing import Any

import torch

# all_reduce then shutdown, in one process; the last is followed by the process's exit. 40000 float64
# (320 KB) is still a copied send, and more than a kernel socket buffer holds by default (208 KiB).
SIZES = (40000, 8, 40000)
WORLDS = 3  # worlds of fresh processes, one after the other
P = 4
TIMEOUT_S = 180  # a whole world, start to exit (4 processes importing torch on 2 shared cores)


def _ends_right_after(rank: int, world_size: int, port: int, results: Any) -> None:
    """One rank: for each of SIZES, all_reduce over zmq with naive, shutdown; report; then exit at once."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RINGCOMM_LIVENESS_S="5")
    import torch.distributed as dist

    import ringcomm

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    failures = []
    for n, numel in enumerate(SIZES):
        x = torch.arange(numel, dtype=torch.float64) + 100 * rank + n
        ringcomm.all_reduce(x, algo="naive", transport="zmq", timeout=60)
        expected = sum(torch.arange(numel, dtype=torch.float64) + 100 * r + n for r in range(world_size))
        if not torch.equal(x, expected):
            wrong = int((x != expected).sum())
            failures.append(f"rank {rank} round {n}: {wrong} of {numel} elements differ from the sum")
        ringcomm.shutdown()  # the session's transports close here; the next round makes new ones
    results.put((rank, failures))
    dist.destroy_process_group()
    # and the process exits now: nothing waits for the peers


def _kill_all(procs: list[Any]) -> None:
    for proc in procs:
        if proc.pid is not None:
            try:
                os.kill(proc.pid, signal.SIGKILL)  # also ends a stopped process
            except ProcessLookupError:
                pass
    for proc in procs:
        proc.join(timeout=10)


def test_ranks_that_exit_right_after_a_naive_all_reduce_lose_nothing() -> None:
    """Four ranks, naive over zmq (rank 0 sends the result last, to everyone), each calling
    shutdown() and exiting straight after: every rank gets the right result and exits 0."""
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    for world in range(WORLDS):
        store = dist.TCPStore("127.0.0.1", 0, P + 1, is_master=True, wait_for_workers=False)
        results = ctx.Queue()
        procs = [ctx.Process(target=_ends_right_after, args=(r, P, store.port, results)) for r in range(P)]
        try:
            for proc in procs:
                proc.start()
            deadline = time.monotonic() + TIMEOUT_S
            for proc in procs:
                proc.join(timeout=max(deadline - time.monotonic(), 0.0))
            reports: dict[int, list[str]] = {}
            while True:
                try:
                    rank, failures = results.get(timeout=1.0)
                except queue.Empty:
                    break
                reports[rank] = failures
            codes = [proc.exitcode for proc in procs]
            assert codes == [0] * P, f"world {world}: exit codes {codes} (None: still running after {TIMEOUT_S} s)"
            assert sorted(reports) == list(range(P)), f"world {world}: reports from ranks {sorted(reports)}"
            flat = [f for r in range(P) for f in reports[r]]
            assert not flat, "\n".join(flat)
        finally:
            _kill_all(procs)
            results.close()
            del store
