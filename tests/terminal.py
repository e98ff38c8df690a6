"""A command run in a real pseudo-terminal (stdlib pty): what a user at a keyboard sees, Ctrl-C included.

The terminal turns "\n" into "\r\n" on output and echoes "^C" when Ctrl-C is typed; expect() takes text as the
program wrote it and matches it as the terminal shows it."""

from __future__ import annotations

import os
import pty
import select
import signal
import termios
import time


class Terminal:
    def __init__(self, args: list[str], timeout_s: float = 60.0) -> None:
        env = dict(os.environ, TERM="dumb", INPUTRC="/dev/null")  # readline: no escape sequences, no user bindings
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C reaches it as SIGINT
            try:
                attrs = termios.tcgetattr(0)
                attrs[3] |= termios.NOFLSH  # Ctrl-C would otherwise drop output written but not read yet
                termios.tcsetattr(0, termios.TCSANOW, attrs)
                os.execve(args[0], args, env)
            finally:
                os._exit(127)
        self.output = b""
        self.seen = 0  # where the next expect() starts looking
        self.deadline = time.monotonic() + timeout_s  # for the whole session: a bug fails instead of hanging
        self.exit_code: int | None = None

    def _read(self, wait_s: float) -> bool:
        """Append what the program wrote within wait_s; False at end of output."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, wait_s))
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every process holding the terminal has closed it
            data = b""
        self.output += data
        return bool(data)

    def _fail(self, why: str) -> None:
        raise AssertionError(f"{why}; the terminal shows:\n{self.output.decode(errors='replace')[-3000:]!r}")

    def expect(self, text: str) -> str:
        """Wait until `text` shows after what earlier expects matched; return what showed before it."""
        wanted = text.replace("\n", "\r\n").encode()
        while (at := self.output.find(wanted, self.seen)) < 0:
            if time.monotonic() > self.deadline:
                self._fail(f"timed out waiting for {text!r}")
            if not self._read(self.deadline - time.monotonic()):
                self._fail(f"the program ended before showing {text!r}")
        before = self.output[self.seen:at].decode(errors="replace").replace("\r\n", "\n")
        self.seen = at + len(wanted)
        return before

    def expect_some(self, n_bytes: int) -> None:
        """Wait until at least n_bytes more have shown."""
        while len(self.output) < self.seen + n_bytes:
            if time.monotonic() > self.deadline or not self._read(self.deadline - time.monotonic()):
                self._fail(f"waiting for {n_bytes} bytes of output")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self) -> int:
        """The exit code, once the program has ended (its output drained meanwhile)."""
        while self.exit_code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > self.deadline:
                self._fail("the program did not exit")
            elif not self._read(0.05):
                time.sleep(0.05)  # output closed, the process not reaped yet
        return self.exit_code

    def close(self) -> None:
        if self.exit_code is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.exit_code = -signal.SIGKILL
        os.close(self.fd)
