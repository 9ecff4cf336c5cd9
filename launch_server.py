"""Run the HTTP server: `python -m baleen.launch_server [flags]` (SGLang's entry-point name; the flags of `baleen serve`).

`serve()` starts the engine (which returns once a warm-up generation went through the whole actor graph), runs
the Starlette app (api/server.py) under uvicorn on the caller's uvloop, logs "baleen is ready" once uvicorn
listens, and closes the engine when uvicorn returns. An engine that cannot start (a rank failed to build, the
warm-up failed) is logged with its cause and gives exit code 1.

Shutdown (SIGTERM/SIGINT): stop accepting, give in-flight requests `graceful_shutdown_s` to finish, abort the
rest (each ends with finish_reason "abort"), close the engine and its processes, exit 0.

Engine death (a rank process died, an engine actor failed; the engine has logged the cause at ERROR and ended
every request in flight with an error): `Engine.wait_dead()` wakes `_exit_when_engine_dies`, which lets the
streams send their error events, stops uvicorn (no new connections), closes the engine and exits 1 within a
few seconds, for a supervisor to restart the server. `--stay-up-after-engine-death` keeps it up instead,
answering 503 (/health too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.types import ASGIApp

from baleen.api.chat_template import ChatTemplate
from baleen.api.server import create_app
from baleen.api.state import ServerConfig, ServerState
from baleen.model.logit_processors import LogitProcessorRegistry

if TYPE_CHECKING:
    from baleen.actors.engine import Engine, EngineConfig

log = logging.getLogger("baleen.server")
# After the engine died: how long streams get to send the error events they already hold, and then how long
# uvicorn waits for connections to close; with the engine's close, the process exits well within 5 s.
ENGINE_DEATH_DRAIN_S = 1.0


class UvicornServer(uvicorn.Server):
    """uvicorn with our shutdown: drain for the grace period, then abort what is left; exit code stays 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.engine_died = False  # set by _exit_when_engine_dies: shut down at once, exit code 1

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after serving (the process would die of SIGTERM, exit code -15);
        # handling it on the loop instead lets the caller close the engine and exit 0.
        if threading.current_thread() is not threading.main_thread():  # embedded in a thread: the owner stops it
            yield
            return
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        self.state.draining = True
        grace = self.state.config.graceful_shutdown_s
        if self.engine_died:  # every request already has its error: nothing is left to finish
            grace = 0.0
            self.config.timeout_graceful_shutdown = int(ENGINE_DEATH_DRAIN_S)
        log.info("shutting down: %d request(s) in flight get %.1f s to finish", self.state.engine.num_requests, grace)
        loop = asyncio.get_running_loop()
        aborts: list[asyncio.Future[None]] = []
        timer = loop.call_later(grace, lambda: aborts.append(asyncio.ensure_future(self.state.engine.abort_all())))
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
            for task in aborts:
                await task

    def bound_url(self) -> str:
        """http://host:port of the listening socket (the real port when 0 was asked for)."""
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"


def uvicorn_config(app: ASGIApp, config: ServerConfig) -> uvicorn.Config:
    """uvicorn settings: our loop (uvloop), no access log below debug, a backstop after the grace period."""
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level.lower(),
                          access_log=config.log_level.lower() in ("debug", "trace"), lifespan="off",
                          timeout_graceful_shutdown=int(config.graceful_shutdown_s + 5), server_header=False)


async def _announce(server: UvicornServer, state: ServerState) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    if not state.can_serve:  # the engine died while uvicorn was starting
        return
    url = server.bound_url()
    log.info("baleen is ready: serving %r at %s/v1 (health: %s/health)", state.model_name, url, url)


async def _exit_when_engine_dies(server: UvicornServer, engine: Engine) -> None:
    """Once the engine died, stop serving (exit code 1), unless --stay-up-after-engine-death keeps it up."""
    cause = await engine.wait_dead()
    state = server.state
    if state.config.stay_up_after_engine_death:
        log.error("the engine died (%s); the server stays up and answers 503 (--stay-up-after-engine-death)", cause)
        return
    log.error("the engine died (%s); the server exits with code 1 for a supervisor to restart it", cause)
    server.engine_died = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ENGINE_DEATH_DRAIN_S
    while state.engine.num_requests and loop.time() < deadline:  # routes turn the error outputs they hold into answers
        await asyncio.sleep(0.01)
    server.should_exit = True


async def serve(server_config: ServerConfig, engine_config: EngineConfig) -> int:
    """Start the engine, serve HTTP until SIGTERM/SIGINT (exit code 0) or the engine's death (1), close the engine.

    ValueError (a bad template, processor spec or engine setting) propagates for the caller to report.
    """
    from baleen.actors.engine import Engine

    if engine_config.model_path is None:
        from baleen.model.make_model import default_model_path

        engine_config = replace(engine_config, model_path=str(await asyncio.to_thread(default_model_path)))
    tokenizer_dir = Path(engine_config.tokenizer_path or engine_config.model_path or ".")
    template = ChatTemplate.load(server_config.chat_template, tokenizer_dir if tokenizer_dir.is_dir() else None)
    processors = (LogitProcessorRegistry(engine_config.custom_logit_processors)
                  if engine_config.enable_custom_logit_processor else None)
    try:
        engine = await Engine.start(engine_config)
    except ValueError:
        raise  # a setting the engine refuses: the caller reports it (exit code 2)
    except Exception as e:  # EngineDead (a worker failed to start) and the like
        log.error("the engine could not start: %s: %s", type(e).__name__, e)
        return 1
    try:
        state = ServerState(engine, server_config, template, processors)
        server = UvicornServer(uvicorn_config(create_app(state), server_config), state)
        announce = asyncio.ensure_future(_announce(server, state))
        watch = asyncio.ensure_future(_exit_when_engine_dies(server, engine))
        try:
            await server.serve()
        finally:
            announce.cancel()
            watch.cancel()
        return 0 if server.started and not server.engine_died else 1
    finally:
        await engine.close()
        log.info("engine closed")


if __name__ == "__main__":
    from baleen.api.cli import serve_main

    raise SystemExit(serve_main(prog="python -m baleen.launch_server"))
