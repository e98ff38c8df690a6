"""Run the app under uvicorn (httptools, uvloop): a header read timeout uvicorn lacks, the URL printed once the
engine is warm, and SIGINT/SIGTERM handled as a graceful stop that exits 0 (stop accepting, let in-flight
requests finish within the grace period, cancel the rest, which aborts them in the engine)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.app import create_app
from gateway.config import ServerConfig


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's HTTP protocol, but a connection that does not finish its request line and headers within
    timeout_s of starting them (or of connecting) is closed: a slow client cannot hold a socket forever."""

    class TimedHeaders(HttpToolsProtocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return TimedHeaders


# After the grace period in-flight requests are aborted, which ends their responses with an error; uvicorn
# cancels whatever is still open this much later (a client that stopped reading).
_CANCEL_AFTER_ABORT_S = 2.0


class _Server(uvicorn.Server):
    """Signals stop the server gracefully and the process exits 0 (uvicorn would re-raise them)."""

    def __init__(self, config: uvicorn.Config, gateway, grace_s: float) -> None:
        super().__init__(config)
        self.gateway, self.grace_s = gateway, grace_s

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.grace_s, lambda: asyncio.ensure_future(self.gateway.abort_in_flight()))
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True


def serve(config: ServerConfig, engine_factory=None) -> None:
    server: _Server | None = None

    def announce(gateway) -> None:
        asyncio.ensure_future(_announce_when_listening(server, gateway))

    app = create_app(config, engine_factory, on_ready=announce)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, loop="auto", http=header_timeout_protocol(config.header_timeout_s),
        timeout_keep_alive=config.keep_alive_s,
        timeout_graceful_shutdown=config.graceful_shutdown_s + _CANCEL_AFTER_ABORT_S,
        access_log=False, log_level="warning", lifespan="on", log_config=None,
    )
    server = _Server(uv_config, app.state.gateway, config.graceful_shutdown_s)
    server.run()
    if app.state.gateway.load_error:
        raise SystemExit(f"kvgate: the engine failed to start: {app.state.gateway.load_error}")


async def _announce_when_listening(server: uvicorn.Server, gateway) -> None:
    if gateway.load_error:
        server.should_exit = True
        return
    while not server.started:
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    print(f"kvgate: serving {gateway.model_names[0]} at http://{host}:{port}/v1", file=sys.stderr, flush=True)
