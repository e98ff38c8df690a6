"""The gateway's long-lived state (on `app.state.gateway`): the engine, loaded in the background so /health can
say 503 while it starts; the request service; metrics; and admission control (429 beyond the limit)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import weakref

from engine.llm import AsyncLLM
from engine.protocol import SchedulerStats
from gateway.config import ServerConfig
from gateway.errors import APIError, overloaded
from gateway.metrics import Metrics
from gateway.restart import RestartPolicy
from gateway.serving import Service, default_model_name

logger = logging.getLogger("kvgate.gateway")


class Gateway:
    def __init__(self, config: ServerConfig, engine_factory=None) -> None:
        self.config = config
        self.engine_factory = engine_factory or (lambda: AsyncLLM(config=config.engine))
        self.engine: AsyncLLM | None = None  # the dead one while it is restarted
        self.service: Service | None = None
        self.load_error: str | None = None
        self.model_names = [config.served_model_name or default_model_name(config.engine.model)]
        self.metrics = Metrics(self.model_names[0], self.stats, alive=lambda: self.ready)
        self.in_flight = 0
        self.created = 0
        self.restarts = RestartPolicy(config.max_engine_restarts, config.engine_restart_window_s,
                                      config.engine_restart_backoff_s, config.engine_restart_max_backoff_s)
        self._restart: Restart | None = None  # while a dead engine is being replaced
        self.restart_error: str | None = None  # why the last attempt failed, or why none is made any more
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, on_ready=None) -> None:
        """Load the engine off the event loop; HTTP is answered meanwhile (503 until ready). on_ready(self)
        runs after, failed or not (load_error says)."""
        self._loop = asyncio.get_running_loop()
        try:
            engine = await asyncio.to_thread(self.engine_factory)
            self._install(engine)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("the engine failed to start: %s", self.load_error)
        else:
            self.created = int(time.time())
        if on_ready is not None:
            on_ready(self)

    def _install(self, engine: AsyncLLM) -> None:
        self.service = Service(engine, self.model_names, on_finished=self.metrics.on_request_finished,
                               on_aborted=self.metrics.on_request_aborted,
                               limits=self.config.limits, tool_call_parser=self.config.tool_call_parser)
        engine.on_dead = self._on_engine_dead
        engine.watch()
        self.engine = engine

    def _on_engine_dead(self, exc: Exception) -> None:
        """AsyncLLM tells this on the event loop, after failing the requests in flight; hop there if not."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is not self._loop:
            self._loop.call_soon_threadsafe(self._on_engine_dead, exc)
            return
        self.metrics.engine_deaths.inc()
        logger.error("the engine core died: %s", exc)
        if self.closing or self._restart is not None:
            return
        delay = self.restarts.next_delay() if self.config.engine_restart else None
        if delay is None:
            if self.config.engine_restart:
                self.restart_error = f"not restarted: {self.restarts.describe_limit()}"
                logger.error("the engine is %s", self.restart_error)
            threading.Thread(target=self.engine.shutdown, daemon=True).start()  # reap the dead core
            return
        self._restart = restart = Restart(time.monotonic() + delay)
        logger.warning("restarting the engine in %.1f s", delay)
        restart.task = asyncio.ensure_future(self._replace(restart, self.engine))

    async def _replace(self, restart: Restart, dead: AsyncLLM) -> None:
        """Free the dead engine, then start new ones with backoff until one comes up or the limit is reached."""
        try:
            await asyncio.to_thread(dead.shutdown)  # reaps the core's process, closes its pipe
            while restart.next_attempt is not None:
                await asyncio.sleep(max(0.0, restart.next_attempt - time.monotonic()))
                restart.next_attempt = None
                self.restarts.attempted()
                try:
                    engine = await _built_in_thread(self.engine_factory, lambda: self.closing)
                    try:
                        self._install(engine)
                    except Exception:
                        await asyncio.to_thread(engine.shutdown)
                        raise
                except Exception as exc:
                    self.restart_error = f"the last restart failed: {type(exc).__name__}: {exc}"
                    logger.error("restarting the engine failed: %s", exc)
                    delay = self.restarts.next_delay()
                    if delay is not None:
                        restart.next_attempt = time.monotonic() + delay
                        logger.warning("restarting the engine in %.1f s", delay)
                    continue
                self.restart_error = None
                self.metrics.engine_restarts.inc()
                logger.warning("the engine was restarted")
                return
            failed = f"; {self.restart_error}" if self.restart_error else ""
            self.restart_error = f"not restarted: {self.restarts.describe_limit()}{failed}"
            logger.error("the engine is %s", self.restart_error)
        finally:
            self._restart = None
            restart.done.set()

    @property
    def restarting(self) -> bool:
        return self._restart is not None

    def retry_after(self) -> int:
        """Seconds a client should wait: until the next restart attempt, or retry_after_s."""
        at = self._restart.next_attempt if self._restart is not None else None
        if at is None:
            return self.config.retry_after_s
        return max(1, math.ceil(at - time.monotonic()))

    @property
    def error(self) -> str | None:
        """Why the engine does not serve: it failed to start, or it died (and why it is not restarted)."""
        dead = self.engine.dead_error if self.engine is not None else None
        if dead is None:
            return self.load_error
        why = f"{type(dead).__name__}: {dead}"
        return f"{why}; {self.restart_error}" if self.restart_error else why

    def begin_shutdown(self) -> None:
        """No more restarts; requests waiting for one are answered (503) at once."""
        self.closing = True
        if self._restart is not None:
            self._restart.task.cancel()
            self._restart.done.set()

    async def abort_in_flight(self) -> None:
        """The grace period is over: abort what still runs; its clients get an error, not a cut stream."""
        self.begin_shutdown()
        if self.engine is not None:
            await self.engine.abort_all()

    def stop(self) -> None:
        self.begin_shutdown()
        if self.engine is not None:
            self.engine.shutdown()

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.is_running

    def stats(self) -> SchedulerStats:
        return self.engine.last_stats if self.engine is not None else SchedulerStats()

    def require_service(self) -> Service:
        if not self.ready:
            raise self.unavailable()
        return self.service

    async def wait_for_service(self) -> Service:
        """The service; while the engine is restarted, after waiting for it up to engine_wait_s."""
        if not self.ready and self._restart is not None and self.config.engine_wait_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._restart.done.wait(), self.config.engine_wait_s)
        return self.require_service()

    def unavailable(self) -> APIError:
        """The 503 for a request the engine cannot take now."""
        if self.engine is None and self.load_error:
            return APIError(503, f"the engine failed to start: {self.load_error}", code="engine_unavailable")
        if self.engine is None:
            message = "the model is loading"
        elif self.closing:
            message = "The server is shutting down."
        elif self._restart is not None:
            message = f"The engine is restarting after it died ({self.error}). Retry later."
        else:
            message = f"The engine is not running: {self.error}"
        return APIError(503, message, code="engine_unavailable", headers={"Retry-After": str(self.retry_after())})

    def admit(self) -> Ticket:
        if self.in_flight >= self.config.max_concurrent_requests:
            raise overloaded(self.config.retry_after_s)
        self.in_flight += 1
        return Ticket(self)


class Restart:
    """One restart under way: its task, when its next attempt begins (None while one runs), and an event set
    when it ends, an engine up or not."""

    def __init__(self, next_attempt: float) -> None:
        self.task: asyncio.Task | None = None
        self.next_attempt: float | None = next_attempt  # time.monotonic()
        self.done = asyncio.Event()


async def _built_in_thread(factory, abandoned):
    """factory() on a daemon thread (a start that outlives the server must not hold its exit); an engine built
    after the server gave up on it (abandoned(), or this await cancelled) is shut down at once."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(ok: bool, value) -> None:
        if future.cancelled():
            if ok:
                threading.Thread(target=value.shutdown, daemon=True).start()
        elif ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            ok, value = True, factory()
        except Exception as exc:
            ok, value = False, exc
        if ok and abandoned():
            value.shutdown()
            return
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:  # the loop is closed: nobody will take it
            if ok:
                value.shutdown()

    threading.Thread(target=run, name="kvgate-engine-restart", daemon=True).start()
    try:
        return await future
    except asyncio.CancelledError:  # cancelled after the engine came, before this task took it
        if future.done() and not future.cancelled() and future.exception() is None:
            threading.Thread(target=future.result().shutdown, daemon=True).start()
        raise


class Ticket:
    """One admitted request; releasing twice is harmless. A stream that is never iterated (the client left
    before the first byte) still gives its slot back when it is garbage-collected."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway: Gateway | None = gateway

    def release(self) -> None:
        if self._gateway is not None:
            self._gateway.in_flight -= 1
            self._gateway = None

    def release_with(self, owner) -> None:
        weakref.finalize(owner, self.release)
