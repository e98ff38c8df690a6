"""Every failure, mapped in one place to OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`.

Used by the HTTP app (as Litestar exception handlers) and by the batch runner (as error lines), so both report
the same status and message for the same bad request."""

from __future__ import annotations

import logging
import re

import msgspec

from engine.errors import ContextTooLongError, EngineDeadError, InvalidRequestError

logger = logging.getLogger("kvgate.gateway")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}
_PATH = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = error_type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def overloaded(retry_after_s: int) -> APIError:
    return APIError(429, "The server is overloaded: too many requests in flight. Retry later.", code="overloaded",
                    headers={"Retry-After": str(retry_after_s)})


def from_exception(exc: BaseException) -> APIError:
    """The API error for any exception a request raised; unexpected ones are logged and become a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextTooLongError):
        return bad_request(str(exc), exc.param, "context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return bad_request(str(exc), exc.param)
    if isinstance(exc, msgspec.ValidationError):
        message = str(exc)
        match = _PATH.search(message)
        path = match.group(1).replace("[...]", "") if match else ""  # `[...]`: a value of a dict (logit_bias)
        if missing := _MISSING.search(message):
            path = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return bad_request(f"Invalid request body: {message}", path or None)
    if isinstance(exc, (msgspec.DecodeError, UnicodeDecodeError)):
        return bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json")
    if isinstance(exc, ValueError):  # a bad value, but not one the engine tied to a field: none is named
        return bad_request(str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine is not running: {exc}", code="engine_unavailable")
    logger.exception("unexpected error", exc_info=exc)
    return APIError(500, "Internal server error.", code="internal_error")
