"""Worlds that stay up: one pooled world of P rank processes per (P, backend, env), shared by the tests.

``run_world`` starts P interpreters for every call, and each spends ~1.5 s importing torch and
joining the process group; the grid tests call it once per P in every module, so the same worlds
were spawned again and again. ``run_pooled(fn, P, args, timeout=)`` has the same contract
(``fn(rank, P, *args)`` on every rank, the values by rank, ``WorldError`` naming the rank that
failed first or the timeout), but the ranks are started once and kept for the next call:

      parent (pytest)                          rank r (one per P, started on first use)
      run_pooled(fn, P, args) ──tasks[r]──▶   fn(rank, P, *args); ringcomm.shutdown()
             ◀────────────── results ───────  (rank, "ok" | "error", value, time)

- Every call starts from no ringcomm session, as in a fresh world: a rank shuts ringcomm down
  after each function (the process group stays). A function that leaves ringcomm's session
  failed (a test of failures) gets its values back, and the world is closed after it.
- A pool that failed (a rank raised or died) or ran past the timeout is *recycled*: every rank is
  SIGKILLed and joined at once, and the next call starts a fresh world. A failure never leaks
  into the next test, and a stuck rank never outlives its test.
- At most ``MAX_RANKS`` pooled ranks live at once (the least recently used pool is closed first),
  and ``close_all()`` (conftest, at the end of the session; and at exit) ends every one of them,
  whatever happens.

Only for functions that tolerate a process that ran other tests before: anything that kills,
stops or re-initialises its own process or process group, or counts the process's threads,
sockets or segments, keeps ``run_world``.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from procs import end_processes

from ringcomm.tools.spawn import Caller, WorldError, _first_cause, context, finish, in_band, loopback_store

__all__ = ["run_pooled", "close_all", "MAX_RANKS"]

#: the most pooled rank processes alive at once (each holds torch: ~250 MB)
MAX_RANKS = 16

_Key = tuple[int, str, tuple[tuple[str, str], ...]]


def _rank(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    env: dict[str, str],
    tasks: Any,
    results: Any,
    caller: Caller | None,
) -> None:
    """One pooled rank: join the group once, then run each task sent until ``None`` comes."""
    if caller is not None:  # forked from the suite's fork server: the caller's environment, as spawn gives
        caller.adopt()
    os.environ.update(env)
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    )
    import torch
    import torch.distributed as dist

    import ringcomm
    from ringcomm.runtime import session as sessions

    torch.set_num_threads(1)  # P processes share the machine's cores
    ok = False
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=60))
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
        )
        reusable = True
        while reusable and (task := tasks.get()) is not None:
            fn, args = task
            value = fn(rank, world_size, *args)
            # the next task starts from no session, as in a new world; a world whose session failed
            # (a test of failures) may hold receives still posted: it is not used again
            session = sessions._CURRENT
            reusable = session is None or session.failed is None
            try:
                ringcomm.shutdown(timeout=10.0 if reusable else 1.0)
            except ringcomm.CommError:
                reusable = False
            results.put((rank, "ok", in_band((value, reusable)), time.time()))  # read after we may have left
        ok = reusable
    except BaseException as exc:  # report everything; the parent recycles the pool
        results.put((rank, "error", (f"{type(exc).__name__}: {exc}", traceback.format_exc()), time.time()))
        raise SystemExit(1) from None
    finally:
        finish(ok)


class _Pool:
    """The P ranks of one pooled world, their task queues and the results queue they share."""

    def __init__(self, world_size: int, backend: str, env: dict[str, str]) -> None:
        self.world_size = world_size
        self.reusable = True  # False once a task left a rank's session failed: closed after that task
        # the store outlives every task: ringcomm keeps its session ids and boards in it
        self.store = loopback_store(world_size + 1)
        ctx, caller = context()  # the suite's fork server (conftest), or spawn
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(
                target=_rank,
                args=(rank, world_size, self.store.port, backend, env, self.tasks[rank], self.results, caller),
                daemon=False,
                name=f"pooled-rank-{rank}-of-{world_size}",
            )
            for rank in range(world_size)
        ]
        for proc in self.procs:
            proc.start()

    def run(self, fn: Callable[..., Any], args: tuple, timeout: float) -> list[Any]:
        """``fn(rank, P, *args)`` on every rank; the values by rank. Raises WorldError as run_world."""
        for q in self.tasks:
            q.put((fn, args))
        values: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(values) < self.world_size:
            try:
                rank, status, value, at = self.results.get(timeout=0.2)
            except queue.Empty:
                for rank, proc in enumerate(self.procs):
                    if rank not in values and proc.exitcode is not None:
                        time.sleep(0.2)  # its report may still be in the pipe
                        if self.results.empty():
                            raise _first_cause(self.procs, self.results, values, {}) from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(values))
                    raise WorldError(
                        f"pooled world of {self.world_size} timed out after {timeout:.0f} s; "
                        f"ranks {missing} did not finish"
                    ) from None
                continue
            if status != "ok":
                raise _first_cause(self.procs, self.results, values, {rank: (at, *value)})
            values[rank], reusable = pickle.loads(value)  # in_band, from our own rank
            self.reusable = self.reusable and reusable
        return [values[r] for r in range(self.world_size)]

    def close(self, grace: float) -> None:
        """Ask every rank to leave, wait ``grace`` seconds at most, then SIGKILL and join what is left."""
        if grace > 0:
            for q in self.tasks:
                try:
                    q.put(None)
                except (ValueError, OSError):  # a queue already closed
                    pass
            end = time.monotonic() + grace
            for proc in self.procs:
                proc.join(timeout=max(0.0, end - time.monotonic()))
        end_processes(self.procs, join_s=5.0)
        for q in [*self.tasks, self.results]:
            q.close()
            q.cancel_join_thread()  # never block on a pipe whose reader is dead
        del self.store


_POOLS: dict[_Key, _Pool] = {}  # in order of last use: the first is the least recently used


def run_pooled(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on the pooled world of ``world_size`` ranks (started on first use).

    The contract of ``ringcomm.tools.spawn.run_world``: ``fn`` is a module-level function; the
    values come back by rank; ``WorldError`` if a rank raised or died, or after ``timeout``
    seconds. After a failure or a timeout the pool's ranks are all killed, and the next call with
    the same key starts a new world.
    """
    key: _Key = (world_size, backend, tuple(sorted((env or {}).items())))
    pool = _POOLS.pop(key, None)
    if pool is None:
        while _POOLS and sum(p.world_size for p in _POOLS.values()) + world_size > MAX_RANKS:
            _POOLS.pop(next(iter(_POOLS))).close(grace=5.0)
        pool = _Pool(world_size, backend, dict(env or {}))
    try:
        values = pool.run(fn, args, timeout)
    except BaseException:  # a failed rank, a timeout, or the test itself interrupted: recycle
        pool.close(grace=0.0)
        raise
    if pool.reusable:
        _POOLS[key] = pool
    else:  # its ranks are leaving on their own (a session failed): the next call starts a new world
        pool.close(grace=5.0)
    return values


def close_all() -> None:
    """End every pooled rank (a short grace to leave cleanly, then SIGKILL); safe to call twice."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        try:
            pool.close(grace=5.0)
        except BaseException:
            end_processes(pool.procs, join_s=5.0)
            raise


atexit.register(close_all)
