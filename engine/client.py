"""How the front end talks to the engine core: in its own process over a pipe, or in this one for tests.

Both clients take messages at any time (thread-safe) and hand back one StepOutputs per engine step.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading

import msgspec

from engine.config import EngineConfig
from engine.core import FROM_CORE_DECODER, EngineCore, run_engine_core
from engine.errors import EngineDeadError
from engine.protocol import EngineFailure, EngineInfo, Shutdown, StepOutputs, ToCore

STARTUP_POLL_S = 0.5


class InProcessClient:
    """Runs the core in the calling process; get_outputs() performs one step."""

    def __init__(self, config: EngineConfig, core_class: type = EngineCore) -> None:
        self.core = core_class(config)
        self.info: EngineInfo = self.core.info
        self._inbox: queue.SimpleQueue[ToCore] = queue.SimpleQueue()
        self._stopped = False

    def send(self, message: ToCore) -> None:
        self._inbox.put(message)

    def get_outputs(self) -> StepOutputs | None:
        """One step's outputs; blocks while there is no work; None once shut down."""
        while not self._stopped:
            try:
                message = self._inbox.get(block=not self.core.has_work())
            except queue.Empty:
                return self.core.step()
            if not self.core.handle(message):
                self._stopped = True
        return None

    def shutdown(self) -> None:
        self.send(Shutdown())


class ProcessClient:
    """Starts the core in its own process and exchanges msgpack messages with it over a pipe."""

    def __init__(self, config: EngineConfig, core_class: type = EngineCore, startup_timeout_s: float = 600.0) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy this process's threads and CUDA state
        self._conn, child_conn = ctx.Pipe(duplex=True)
        log_level = logging.getLogger().getEffectiveLevel()
        self._process = ctx.Process(target=run_engine_core, args=(config, child_conn, log_level, core_class),
                                    daemon=True, name="kvgate-engine-core")
        self._process.start()
        child_conn.close()
        self._encoder = msgspec.msgpack.Encoder()
        self._send_lock = threading.Lock()
        self._dead: EngineDeadError | None = None
        self._closed = False
        self._exitcode: int | None = None
        self.info = self._wait_ready(startup_timeout_s)

    def _wait_ready(self, timeout_s: float) -> EngineInfo:
        waited = 0.0
        while not self._conn.poll(STARTUP_POLL_S):
            waited += STARTUP_POLL_S
            if not self._process.is_alive() or waited > timeout_s:
                self._process.kill()
                raise EngineDeadError(f"engine core exited during startup (exit code {self._process.exitcode})")
        message = self._receive()
        if not isinstance(message, EngineInfo):
            raise EngineDeadError(f"unexpected first message from the engine core: {message!r}")
        return message

    def _receive(self):
        try:
            message = FROM_CORE_DECODER.decode(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise EngineDeadError(f"engine core process died (exit code {self._exit_code(wait_s=1.0)})") from exc
        if isinstance(message, EngineFailure):
            error_type = ValueError if message.error_type in _USER_ERRORS else EngineDeadError
            raise error_type(message.message)
        return message

    def send(self, message: ToCore) -> None:
        try:
            with self._send_lock:
                self._conn.send_bytes(self._encoder.encode(message))
        except OSError as exc:
            raise EngineDeadError("engine core process is gone") from exc

    def get_outputs(self) -> StepOutputs | None:
        if self._dead:
            raise self._dead
        try:
            return self._receive()
        except EngineDeadError as exc:
            self._dead = exc
            raise

    def shutdown(self) -> None:
        """Stop the core and free what it held, a dead core too; twice is harmless."""
        if self._closed:
            return
        self._closed = True
        if self._process.is_alive():
            try:
                self.send(Shutdown())
            except EngineDeadError:
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
        self._process.join(timeout=10)  # reaped: no zombie left
        self._conn.close()
        if self._process.exitcode is not None:
            self._exitcode = self._process.exitcode
            self._process.close()  # and its descriptors closed now, not when this object is collected

    def _exit_code(self, wait_s: float = 0.0) -> int | None:
        try:
            self._process.join(timeout=wait_s)  # a process that just closed the pipe may not be reaped yet
            return self._process.exitcode
        except (ValueError, OSError):  # closed by shutdown()
            return self._exitcode


# Start-up failures that are the user's mistake (bad path, unsupported model) surface as ValueError.
_USER_ERRORS = {"ValueError", "ModelNotFoundError", "UnsupportedArchitectureError", "FileNotFoundError"}


def start_client(config: EngineConfig, core_class: type = EngineCore) -> InProcessClient | ProcessClient:
    """core_class stands in for EngineCore where a benchmark needs a fake one (a top-level class: it is pickled)."""
    return InProcessClient(config, core_class) if config.in_process else ProcessClient(config, core_class)
