"""Tensor parallelism without a launcher: a driver (the user's process, rank 0) starts the other
ranks itself, on this machine, and ends them.

    world = LocalWorld(2, "cuda", worker)   # worker(tp) runs in each started process, as rank 1 .. N-1
    ...                                     # rank 0's collectives on world.tp
    world.bind(owner, farewell)             # from now on, owner's garbage collection or the exit closes
    world.close(farewell)                   # broadcast what ends the workers' loop, join them, leave

LLM(path, tensor_parallel_size=N) (engine/llm.py) is the user: its workers load their shards and
follow in LLM.worker_loop(); its farewell is the Stop command.

Start method: spawn (torch.multiprocessing). A forked child would inherit locks that the driver's
other threads held at the fork (the server's threads, tokenizers', OpenMP's, gloo's) and could
never take them, and CUDA / NPU runtimes do not work in a forked child of a process that
initialised them; a spawned worker is a fresh interpreter. Spawn imports the driver's main module
again in each worker: a script must keep its work under `if __name__ == "__main__":` (a worker that
dies of that is named in the driver's error, with the hint).

Joining: the driver hosts the rendezvous store (a TCPStore on 127.0.0.1, on a port the OS picks)
and hands the workers its port. Each worker binds accelerator `rank` and sets its JOINING_KEY; the
driver waits for every key while polling the workers' processes, so that a worker that dies before
joining is an error at once rather than after the group's timeout (QVL_TP_TIMEOUT_S); then every
rank joins (parallel.group.join_world, as torchrun's ranks do).

Ending, on every path (`close`: broadcast the farewell if the world is sound, give the workers
CLOSE_GRACE_S to leave the group and exit, kill what is left, destroy the process group):
- shutdown: LLM.shutdown() calls close(farewell);
- garbage collection of the owner: a weakref.finalize on it, which refers to this world, not to the
  owner, calls close(farewell);
- the interpreter's exit without either: an atexit hook calls close(farewell). It is registered
  after multiprocessing's own (imported with torch), so it runs first: multiprocessing's joins its
  children and would otherwise wait on workers that are still following;
- the driver's construction failing (LLM() raising): close() without a farewell: the workers, which
  may be anywhere in their own load, are killed;
- the driver killed: a worker waiting in a collective fails at once (the driver's sockets close)
  and exits; each worker also polls its parent every PARENT_POLL_S and exits once it changes,
  e.g. while it is still loading;
- a worker that dies or fails: the driver's next collective fails and parallel.comm.fault calls
  this world's on_fault (`_fail`): the other workers are killed, the group destroyed, and a
  TPWorldError names the worker, how it ended (exit status or signal) and the error it reported;
  every later use of the world raises the same error (`check`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing

from qwen_vl_triton.parallel.comm import FAULT_EXIT_STATUS, broadcast_object, exit_rank
from qwen_vl_triton.parallel.group import (
    JOINING_KEY,
    TIMEOUT_ENV,
    TPGroup,
    TPWorldError,
    destroy,
    device_type_of,
    end_process,
    join_world,
    launcher_world_size,
    resolve_timeout_s,
)

log = logging.getLogger("parallel")

START_METHOD = "spawn"
HOST = "127.0.0.1"
ERROR_KEY = "qvl/error/{rank}"  # a worker's last words, read by the driver's error message
JOIN_POLL_S = 0.1      # how often the driver looks at its workers' processes while they join
PARENT_POLL_S = 1.0    # how often a worker looks for its driver
CLOSE_GRACE_S = 10.0   # after the farewell, how long the workers get to leave the group and exit
KILL_WAIT_S = 5.0      # after SIGKILL, how long to wait for the kernel to reap a worker
REAP_WAIT_S = 2.0      # after a failed collective, how long to wait for the worker that broke it to be reaped


class LocalWorld:
    """A tensor-parallel world this process started on this machine: rank 0 here (`tp`), ranks
    1 .. N-1 in worker processes it owns (`workers`, in rank order)."""

    def __init__(self, world_size: int, device: str | torch.device | None, worker: Callable[[TPGroup], None]):
        """Start world_size - 1 workers, each running `worker(tp)` as its rank (a picklable callable:
        spawn sends it to them), and join the world with them. device: as EngineConfig.device (an
        index is replaced by each rank's). Raises ValueError under a launcher (WORLD_SIZE > 1) or
        for world_size < 2, RuntimeError if this process is already in a world, TPWorldError if a
        worker dies before joining."""
        if launcher_world_size() > 1:
            raise ValueError(f"WORLD_SIZE={launcher_world_size()}: this process is a rank of a launcher's world "
                             f"(torchrun); join it with tp=parallel.init_from_env() instead of starting workers")
        if world_size < 2:
            raise ValueError(f"a world this process starts has at least 2 ranks, got {world_size}")
        if dist.is_initialized():
            raise RuntimeError("this process is already in a torch.distributed world (a tensor-parallel LLM that "
                               "was not shut down?): shut it down before starting another")
        timeout = resolve_timeout_s()
        device_type = device_type_of(device)
        self._lock = threading.RLock()  # close() may come from any thread, and from _fail within it
        self._error: TPWorldError | None = None
        self._closed = False
        self._farewell: Any = None
        self._finalizer: weakref.finalize | None = None
        # Port 0: the OS picks a free one as the store binds it (none chosen first that another program could take).
        self._store = dist.TCPStore(HOST, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout),
                                    wait_for_workers=False)
        context = torch.multiprocessing.get_context(START_METHOD)
        self.workers = [context.Process(target=_worker_main, name=f"qvl-tp-rank{rank}",
                                        args=(rank, world_size, self._store.port, device_type, timeout, os.getpid(),
                                              worker))
                        for rank in range(1, world_size)]
        atexit.register(self._at_exit)
        try:
            for process in self.workers:
                process.start()
            self._wait_for_workers(timeout)
            self.tp = join_world(0, world_size, 0, device_type, timeout, store=self._store, on_fault=self._fail)
        except BaseException:
            self.close()
            raise
        log.info("tensor parallel: started %d worker(s) on this machine, pids %s", world_size - 1,
                 [p.pid for p in self.workers])

    def bind(self, owner: object, farewell: Any) -> None:
        """The workers now follow rank 0 and end on `farewell` (what their loop receives to leave it):
        close(farewell) when `owner` is garbage-collected or at the interpreter's exit, unless
        close ran first."""
        self._farewell = farewell
        self._finalizer = weakref.finalize(owner, self.close, farewell)
        self._finalizer.atexit = False  # the exit is _at_exit's, which runs before multiprocessing's hook

    def check(self) -> None:
        """Raise the world's TPWorldError if it broke (the same error every time)."""
        if self._error is not None:
            raise self._error

    def close(self, farewell: Any = None) -> None:
        """End the workers and leave the world; idempotent, from any thread.

        farewell: broadcast to the workers (unless None, or the world broke), whose loop then
        ends; they get CLOSE_GRACE_S to leave the group and exit. Workers still running then,
        or at once without a farewell, are killed (they ignore SIGTERM: see _worker_main)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self._at_exit)
            if self._finalizer is not None:
                self._finalizer.detach()
            grace = 0.0
            if farewell is not None and self._error is None:
                try:
                    broadcast_object(farewell, self.tp)
                    grace = CLOSE_GRACE_S
                except TPWorldError as e:  # a worker died meanwhile: _fail has ended the world
                    log.warning("closing the tensor-parallel world: %s", e)
            self._end(grace)

    def _at_exit(self) -> None:
        self.close(self._farewell)

    def _wait_for_workers(self, timeout: float) -> None:
        """Until every worker has bound its device and is joining; TPWorldError at once if one dies."""
        keys = [JOINING_KEY.format(rank=rank) for rank in range(1, len(self.workers) + 1)]
        deadline = time.monotonic() + timeout
        while not self._store.check(keys):
            dead = self._exited(JOIN_POLL_S)
            if dead:
                lost = "; ".join(self._describe(rank) for rank in dead)
                reported = any(self._reported(rank) for rank in dead)
                hint = "" if reported else (
                    ". If this process runs a script, its work must be under `if __name__ == \"__main__\":` "
                    "(workers are started with spawn, which imports the main module again)")
                raise TPWorldError(f"tensor parallel: {lost}, before joining the world{hint}")
            if time.monotonic() > deadline:
                raise TPWorldError(f"tensor parallel: the workers did not join within {timeout:g} s ({TIMEOUT_ENV})")

    def _fail(self, why: str) -> NoReturn:
        """TPGroup.on_fault of rank 0: the world broke (`why`, from parallel.comm.fault). The first
        fault kills the workers, destroys the group and builds the error naming the lost worker;
        every fault raises it."""
        with self._lock:
            if self._error is None:
                dead = self._exited(REAP_WAIT_S)  # the worker whose exit failed the collective may be exiting still
                lost = "; ".join(self._describe(rank) for rank in dead) if dead else "every worker was still running"
                self._error = TPWorldError(
                    f"tensor parallel: {lost}. On rank 0 (this process), {why}. The workers were ended: this LLM "
                    f"cannot run any more; shut it down and make a new one")
                self._end(0.0)
        raise self._error

    def _exited(self, wait_s: float) -> list[int]:
        """The ranks of the workers that have exited, waiting up to wait_s for one to (all started)."""
        ready = multiprocessing.connection.wait([p.sentinel for p in self.workers], wait_s)
        for process in self.workers:
            if process.sentinel in ready:
                # Its pipe closes as it exits, a moment before it can be reaped: wait for that, for its exit code.
                process.join()
        return [rank for rank, p in enumerate(self.workers, 1) if p.exitcode is not None]

    def _describe(self, rank: int) -> str:
        """How an exited worker ended, with the error it reported if any."""
        process = self.workers[rank - 1]
        code = process.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:  # a signal number Python has no name for
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        reported = self._reported(rank)
        if reported is None and code == FAULT_EXIT_STATUS:  # it failed (a fault in its loop: exit_rank) and logged why
            reported = "why is in its output (stderr)"
        return f"worker rank {rank} (pid {process.pid}) {how}" + (f": {reported}" if reported else "")

    def _reported(self, rank: int) -> str | None:
        key = ERROR_KEY.format(rank=rank)
        return self._store.get(key).decode(errors="replace") if self._store.check([key]) else None

    def _end(self, grace_s: float) -> None:
        """Wait up to grace_s for the workers to exit, kill the rest, destroy the process group."""
        deadline = time.monotonic() + grace_s
        for rank, process in enumerate(self.workers, 1):
            if process.pid is None:  # never started: start() failed on an earlier one
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                if grace_s > 0:
                    log.warning("tensor parallel: worker rank %d (pid %d) still running %g s after the farewell: "
                                "killed", rank, process.pid, grace_s)
                process.kill()
                process.join(KILL_WAIT_S)
        if dist.is_initialized():  # this process was in no world before (__init__): the group is this one
            dist.destroy_process_group()


def _worker_main(rank: int, world_size: int, port: int, device_type: str, timeout_s: float, driver_pid: int,
                 worker: Callable[[TPGroup], None]) -> None:
    """A started worker: join the world as `rank` (local rank too: one machine), run `worker(tp)`,
    leave the world and exit 0. A failure exits 1, after telling the driver why (ERROR_KEY)."""
    # The driver alone decides when its workers end (its farewell, else SIGKILL): Ctrl-C in a terminal
    # reaches the whole process group, and a service manager may send SIGTERM to every process of the
    # service; either would otherwise pull ranks out from under a server draining its requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    me = TPGroup(rank=rank, world_size=world_size)  # names this rank in exit_rank's line until it has joined
    threading.Thread(target=_exit_with_driver, args=(me, driver_pid), name="qvl-driver-watch", daemon=True).start()
    store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    try:
        tp = join_world(rank, world_size, rank, device_type, timeout_s, store=store)
        worker(tp)
    except Exception as e:  # noqa: BLE001 - whatever failed, this rank cannot follow: tell the driver, exit
        cause = " ".join(f"{type(e).__name__}: {e}".split())
        with contextlib.suppress(Exception):  # the driver may be gone already
            store.set(ERROR_KEY.format(rank=rank), cause)
        exit_rank(me, f"this worker failed: {cause}", e)
    destroy(tp)
    end_process(tp)


def _exit_with_driver(me: TPGroup, driver_pid: int) -> None:
    """Worker thread: exit once the driver is gone (this process then has another parent), whatever
    the main thread is doing (loading weights: no collective there to fail). A polled parent, not
    prctl(PR_SET_PDEATHSIG): that signal follows the thread that started the process, and a driver
    may build its LLM on a thread that ends long before the driver does."""
    while os.getppid() == driver_pid:
        time.sleep(PARENT_POLL_S)
    exit_rank(me, f"the driver (rank 0, pid {driver_pid}) is gone")
