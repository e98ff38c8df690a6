"""Errors as types, so each front door (HTTP, batch, CLI) maps them to its own shape in one place."""


class InvalidRequestError(ValueError):
    """A request the engine will not run; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextTooLongError(InvalidRequestError):
    """The prompt, or prompt plus max_tokens, does not fit the model's context."""


class EngineDeadError(RuntimeError):
    """The engine core process stopped; nothing more will be served."""
