"""The gateway's long-lived state (on `app.state.gateway`): the engine, loaded in the background so /health can
say 503 while it starts; the request service; metrics; and admission control (429 beyond the limit)."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from engine.llm import AsyncLLM
from engine.protocol import SchedulerStats
from gateway.config import ServerConfig
from gateway.errors import APIError, overloaded
from gateway.metrics import Metrics
from gateway.serving import Service, default_model_name

logger = logging.getLogger("kvgate.gateway")


class Gateway:
    def __init__(self, config: ServerConfig, engine_factory=None) -> None:
        self.config = config
        self.engine_factory = engine_factory or (lambda: AsyncLLM(config=config.engine))
        self.engine: AsyncLLM | None = None
        self.service: Service | None = None
        self.load_error: str | None = None
        self.model_names = [config.served_model_name or default_model_name(config.engine.model)]
        self.metrics = Metrics(self.model_names[0], self.stats, alive=lambda: self.ready)
        self.in_flight = 0
        self.created = 0

    async def start(self, on_ready=None) -> None:
        """Load the engine off the event loop; HTTP is answered meanwhile (503 until ready). on_ready(self)
        runs after, failed or not (load_error says)."""
        try:
            engine = await asyncio.to_thread(self.engine_factory)
            self.service = Service(engine, self.model_names, on_finished=self.metrics.on_request_finished,
                                   on_aborted=self.metrics.on_request_aborted,
                                   limits=self.config.limits, tool_call_parser=self.config.tool_call_parser)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("the engine failed to start: %s", self.load_error)
        else:
            self.created = int(time.time())
            engine.on_dead = self._on_engine_dead
            engine.watch()
            self.engine = engine
        if on_ready is not None:
            on_ready(self)

    def _on_engine_dead(self, exc: Exception) -> None:
        self.metrics.engine_deaths.inc()
        logger.error("the engine core died: %s", exc)

    @property
    def error(self) -> str | None:
        """Why the engine does not serve: it failed to start, or it died."""
        dead = self.engine.dead_error if self.engine is not None else None
        return f"{type(dead).__name__}: {dead}" if dead is not None else self.load_error

    async def abort_in_flight(self) -> None:
        """The grace period is over: abort what still runs; its clients get an error, not a cut stream."""
        if self.engine is not None:
            await self.engine.abort_all()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.is_running

    def stats(self) -> SchedulerStats:
        return self.engine.last_stats if self.engine is not None else SchedulerStats()

    def require_service(self) -> Service:
        if self.engine is None:
            message = f"the engine failed to start: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, message, code="engine_unavailable")
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        return self.service

    def admit(self) -> Ticket:
        if self.in_flight >= self.config.max_concurrent_requests:
            raise overloaded(self.config.retry_after_s)
        self.in_flight += 1
        return Ticket(self)


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
