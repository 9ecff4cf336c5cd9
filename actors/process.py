"""Child processes that run actors: spawn, hand over channel ends, see deaths at once, stop cleanly.

The parent watches `Process.sentinel` (a pipe that the kernel closes when the child exits) with
`loop.add_reader`, so a death is noticed immediately, without polling; the child's exit code and, when
its main raised, the traceback (sent over a pipe) reach the `on_exit` callback and `wait()`.

The child never outlives the parent: it asks Linux for SIGTERM when the parent dies (PR_SET_PDEATHSIG,
checking afterwards that the parent did not die first) and also watches the parent's sentinel pipe. Its
event loop turns SIGTERM into cancelling the main coroutine, so `finally` blocks run and channels close.
The child ignores SIGINT: on Ctrl-C in a terminal the parent gets KeyboardInterrupt and stops its
children (`async with ChildProcess(...)`, or `await child.stop()` in a finally); daemonic children left
running at interpreter exit are terminated and reaped by multiprocessing's exit handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from baleen.actors.actor import run
from baleen.actors.channel import Channel, ChannelSpec

ChildMain = Callable[..., Coroutine[Any, Any, None]]  # async def main(channels: list[Channel], *args)

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildExit:
    """How a child process ended."""

    name: str
    pid: int
    exitcode: int | None  # 0 also after a requested stop (SIGTERM); -N: killed by signal N
    error: str | None  # the traceback of the exception that ended the child's main, if one did

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None


class ChildProcess:
    """One spawned process running `main(channels, *args)` on its own (uv)loop."""

    def __init__(
        self,
        main: ChildMain,
        channels: Sequence[ChannelSpec] = (),
        args: Sequence[Any] = (),
        *,
        name: str = "actor",
        on_exit: Callable[[ChildExit], None] | None = None,
        daemon: bool = True,
    ) -> None:
        self.name = name
        self._main = main
        self._specs = list(channels)
        self._args = tuple(args)
        self._on_exit = on_exit
        self._daemon = daemon  # False if the child must start processes of its own
        self._proc: Any = None  # multiprocessing's SpawnProcess
        self._errors: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[ChildExit]] = []
        self.exit: ChildExit | None = None

    def start(self) -> None:
        """Spawn the child (call inside the parent's event loop, which then watches for its exit)."""
        if self._proc is not None:
            raise RuntimeError(f"child process {self.name} was already started")
        loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")
        errors, child_errors = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_child_entry,
            args=(self._main, self._specs, self._args, os.getpid(), child_errors, _log_setup()),
            name=self.name,
            daemon=self._daemon,
        )
        try:
            self._proc.start()
        finally:
            child_errors.close()
            for spec in self._specs:
                spec.close()  # the child holds its own copies now; ours would hide its death (no EOF)
        self._errors = errors
        self._loop = loop
        loop.add_reader(self._proc.sentinel, self._on_sentinel)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_alive(self) -> bool:
        return self._proc is not None and self.exit is None and self._proc.is_alive()

    def terminate(self) -> None:
        """Ask the child to stop (SIGTERM: its main is cancelled, its finally blocks run)."""
        if self.is_alive():
            self._proc.terminate()

    def kill(self) -> None:
        """Kill the child (SIGKILL)."""
        if self.is_alive():
            self._proc.kill()

    async def wait(self) -> ChildExit:
        """Wait for the child to exit (or return how it already did)."""
        if self.exit is not None:
            return self.exit
        if self._loop is None:
            raise RuntimeError(f"child process {self.name} was not started")
        fut: asyncio.Future[ChildExit] = self._loop.create_future()
        self._waiters.append(fut)
        return await fut

    async def stop(self, timeout: float = 5.0) -> ChildExit:
        """Terminate, wait up to `timeout` seconds, then kill; returns how the child ended (reaped)."""
        if self._proc is None:
            raise RuntimeError(f"child process {self.name} was not started")
        self.terminate()
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            self.kill()
            return await self.wait()

    def join(self, timeout: float | None = None) -> int | None:
        """Blocking wait for owners outside an event loop; returns the exit code (None if still running)."""
        if self._proc is None:
            raise RuntimeError(f"child process {self.name} was not started")
        self._proc.join(timeout)
        return self._proc.exitcode

    async def __aenter__(self) -> ChildProcess:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _on_sentinel(self) -> None:
        assert self._loop is not None and self._proc is not None
        self._loop.remove_reader(self._proc.sentinel)
        # The sentinel closes while the child is exiting; reaping it here takes at most a moment.
        self._proc.join(5.0)
        error = None
        if self._errors is not None:
            with contextlib.suppress(EOFError, OSError):
                if self._errors.poll():
                    error = self._errors.recv()
            self._errors.close()
        self.exit = ChildExit(self.name, self._proc.pid, self._proc.exitcode, error)
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(self.exit)
        if self._on_exit is not None:
            self._on_exit(self.exit)


def _die_with_parent(parent_pid: int) -> None:
    """Get SIGTERM when the parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the request above took effect


def _log_setup() -> tuple[int, str] | None:
    """The parent's root logging (level, format) for a spawned child, which starts with none; None: unconfigured."""
    root = logging.getLogger()
    fmt = next((getattr(h.formatter, "_fmt", None) for h in root.handlers if h.formatter is not None), None)
    return (root.level, fmt or logging.BASIC_FORMAT) if root.handlers else None


def _child_entry(
    main: ChildMain, specs: list[ChannelSpec], args: tuple[Any, ...], parent_pid: int, errors: Connection,
    log_setup: tuple[int, str] | None = None,
) -> None:
    # NOTE: a spawned child has no logging set up: without this only WARNING and above would reach stderr, bare.
    if log_setup is not None:
        logging.basicConfig(level=log_setup[0], format=log_setup[1])
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        run(_child_main(main, specs, args))
    except BaseException:
        errors.send(traceback.format_exc())
        errors.close()
        sys.exit(1)


async def _child_main(main: ChildMain, specs: list[ChannelSpec], args: tuple[Any, ...]) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop_requested: list[str] = []

    def request_stop(reason: str) -> None:
        stop_requested.append(reason)
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, request_stop, "SIGTERM")
    parent = mp.parent_process()
    sentinel = parent.sentinel if parent is not None else None
    if sentinel is not None:
        loop.add_reader(sentinel, request_stop, "parent exited")
    channels: list[Channel] = []
    try:
        channels = [spec.open() for spec in specs]
        await main(channels, *args)
    except asyncio.CancelledError:
        if not stop_requested:
            raise
    finally:
        for channel in channels:
            channel.close()
        if sentinel is not None:
            loop.remove_reader(sentinel)
        loop.remove_signal_handler(signal.SIGTERM)
