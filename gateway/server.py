"""Run the app under uvicorn (httptools, uvloop): a header read timeout uvicorn lacks, the URL printed once the
engine is warm, and SIGINT/SIGTERM handled as a graceful stop that exits 0 (stop accepting, let in-flight
requests finish within the grace period, cancel the rest, which aborts them in the engine)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.app import create_app
from gateway.config import ServerConfig


class _HeadersTooLarge(Exception):
    """Raised inside the parser's header callback: uvicorn turns any callback error into its 400 reply."""


def guarded_protocol(config: ServerConfig) -> type:
    """uvicorn's HTTP protocol with the bounds it lacks on what comes before the body: a connection that does not
    finish its request line and headers within header_timeout_s of starting them (or of connecting) is closed,
    so a slow client cannot hold a socket; and headers past max_header_bytes in all, max_headers in number or
    max_header_line_bytes in one line get a 431 and the connection closed, before any body is read."""

    class GuardedHeaders(HttpToolsProtocol):
        _header_timer = None
        _in_headers = True  # between a message's end (or the connection's start) and its headers' end
        _header_bytes = 0
        _header_count = 0
        _head_bytes = 0  # header lines parsed, as sent ("name: value\r\n")
        _too_large: str | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._in_headers and self._header_bytes > config.max_header_bytes and not self.transport.is_closing():
                self._too_large = f"the request line and headers exceed {config.max_header_bytes} bytes"
                self.send_400_response("")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_count = self._head_bytes = 0
            if self._header_timer is None:
                self._arm()

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            self._head_bytes += len(name) + len(value) + 4
            if self._header_count > config.max_headers:
                self._too_large = f"more than {config.max_headers} headers"
            elif len(name) + len(value) + 2 > config.max_header_line_bytes:
                self._too_large = f"a header line exceeds {config.max_header_line_bytes} bytes"
            if self._too_large:
                raise _HeadersTooLarge
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            self._in_headers = False
            # the whole head as sent: "METHOD url HTTP/1.1\r\n", the header lines, the blank line
            head = len(self.parser.get_method()) + len(self.url) + 12 + self._head_bytes + 2
            if head > config.max_header_bytes:
                self._too_large = f"the request line and headers exceed {config.max_header_bytes} bytes"
                raise _HeadersTooLarge
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_headers, self._header_bytes = True, 0

        def send_400_response(self, msg: str) -> None:
            if self._too_large is None:
                return super().send_400_response(msg)
            body = orjson.dumps({"error": {"message": f"Request headers too large: {self._too_large}.",
                                           "type": "invalid_request_error", "param": None,
                                           "code": "request_header_fields_too_large"}})
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
                                 b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(config.header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedHeaders


# After the grace period in-flight requests are aborted, which ends their responses with an error; uvicorn
# cancels whatever is still open this much later (a client that stopped reading).
_CANCEL_AFTER_ABORT_S = 2.0


class _Server(uvicorn.Server):
    """Signals stop the server gracefully and the process exits 0 (uvicorn would re-raise them)."""

    def __init__(self, config: uvicorn.Config, gateway, grace_s: float) -> None:
        super().__init__(config)
        self.gateway, self.grace_s = gateway, grace_s

    async def shutdown(self, sockets=None) -> None:
        self.gateway.begin_shutdown()  # no engine restart during the drain; requests waiting for one get 503 now
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
        app, host=config.host, port=config.port, loop="auto", http=guarded_protocol(config),
        timeout_keep_alive=config.keep_alive_s,
        limit_concurrency=_connection_limit(config.max_connections) + 1,  # uvicorn refuses at >= its limit
        timeout_graceful_shutdown=config.graceful_shutdown_s + _CANCEL_AFTER_ABORT_S,
        access_log=False, log_level="warning", lifespan="on", log_config=None,
    )
    server = _Server(uv_config, app.state.gateway, config.graceful_shutdown_s)
    server.run()
    if app.state.gateway.load_error:
        raise SystemExit(f"kvgate: the engine failed to start: {app.state.gateway.load_error}")


def _connection_limit(wanted: int) -> int:
    """max_connections, with the process's open-file limit raised to fit it (as far as the hard limit allows):
    past it uvicorn answers 503 and closes, rather than failing to accept for want of descriptors."""
    import logging
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + _SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft != resource.RLIM_INFINITY and soft < need:
        logging.getLogger("kvgate").warning("max_connections %d lowered to %d: the open-file limit is %d", wanted,
                                            soft - _SPARE_FDS, soft)
        return max(1, soft - _SPARE_FDS)
    return wanted


_SPARE_FDS = 256  # descriptors kept for the engine's pipes, model files, logs


async def _announce_when_listening(server: uvicorn.Server, gateway) -> None:
    if gateway.load_error:
        server.should_exit = True
        return
    while not server.started:
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    print(f"kvgate: serving {gateway.model_names[0]} at http://{host}:{port}/v1", file=sys.stderr, flush=True)
