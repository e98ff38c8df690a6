"""A real `kvgate serve` process on a free port, for the gateway tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_READY = re.compile(r"kvgate: serving (\S+) at (http://\S+)/v1")


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, model: str, log: list[str]) -> None:
        self.proc, self.url, self.model, self.log = proc, url, model, log

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@contextlib.contextmanager
def running_server(model_dir: Path | str | None, *args: str, env: dict | None = None,
                   startup_timeout: float = 120.0):
    """Start `kvgate serve --port 0 ...`, wait for the line announcing its URL, yield a Server; on exit stop it
    with SIGTERM and check it exited 0."""
    cmd = [sys.executable, "-m", "kvgate", "serve", "--port", "0"]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    proc = subprocess.Popen(cmd + list(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    log: list[str] = []
    found = threading.Event()
    match: list = []

    def read() -> None:
        for line in proc.stderr:
            log.append(line)
            if not found.is_set() and (m := _READY.search(line)):
                match.append(m)
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + startup_timeout
    while not found.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("kvgate serve did not start:\n" + "".join(log))
    server = Server(proc, match[0].group(2), match[0].group(1), log)
    try:
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"kvgate serve exited {code}:\n" + "".join(log)
