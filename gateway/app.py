"""create_app(config) -> Litestar: routes, auth, OpenAI-shaped errors for everything (Litestar's own 404, 405,
413 included), metrics, CORS; the lifespan owns the engine."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging

from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler

from gateway.config import ServerConfig
from gateway.errors import APIError, from_exception
from gateway.routes import ROUTES, ClientDisconnected, json_response
from gateway.state import Gateway

logger = logging.getLogger("kvgate.gateway")


def create_app(config: ServerConfig, engine_factory=None, on_ready=None) -> Litestar:
    """engine_factory() -> AsyncLLM replaces the default engine (tests, benchmarks); on_ready(gateway) runs
    once the engine is up."""
    gateway = Gateway(config, engine_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar):
        loading = asyncio.ensure_future(gateway.start(on_ready))
        try:
            yield
        finally:
            loading.cancel()
            gateway.stop()

    return Litestar(
        route_handlers=ROUTES,
        lifespan=[lifespan],
        state=State({"gateway": gateway}),
        guards=[_api_key_guard(config.api_key)] if config.api_key else [],
        exception_handlers={Exception: _error_response},
        before_send=[gateway.metrics.count_response],
        cors_config=CORSConfig(allow_origins=config.cors_origins) if config.cors_origins else None,
        request_max_body_size=config.max_body_bytes,
        openapi_config=None,
        logging_config=None,
    )


def _api_key_guard(api_key: str):
    # Digests of equal length, compared in constant time: neither the key nor its length leaks through timing.
    expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    def guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        if handler.opt.get("public"):
            return
        given = hashlib.sha256(connection.headers.get("authorization", "").encode()).digest()
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    return guard


def _error_response(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientDisconnected):
        return Response(b"", status_code=499)  # nobody reads it; logged as the client closing the request
    if isinstance(exc, HTTPException) and not isinstance(exc, APIError):
        headers = dict(exc.headers or {})
        if exc.status_code == 413:  # the body is left unread: close, rather than read and drop all of it
            headers["Connection"] = "close"
        error = APIError(exc.status_code, _http_message(request, exc), headers=headers)
    else:
        error = from_exception(exc)
    return json_response(error.body(), error.status, error.headers)


def _http_message(request: Request, exc: HTTPException) -> str:
    if exc.status_code == 404:
        return f"{request.method} {request.url.path} does not exist."
    if exc.status_code == 405:
        return f"{request.method} is not allowed on {request.url.path}."
    if exc.status_code == 413:
        return f"The request body is too large (the limit is {request.app.state.gateway.config.max_body_bytes} bytes)."
    return exc.detail
