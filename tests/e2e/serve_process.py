"""`glm-ray serve` in a subprocess, as a user runs it: up when it prints its banner, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

READY = "Ctrl-C to stop."


class ServeProcess:
    def __init__(self, *args: str, timeout_s: float = 300.0, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "glm_ray.cli", "serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})
        lines = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            lines.append(line)
            if READY in line:
                break
        self.banner = "".join(lines)
        if self.proc.poll() is not None or READY not in self.banner:
            self.kill()
            raise RuntimeError("glm-ray serve did not come up:\n" + "".join(lines[-40:]))

    def interrupt(self, timeout_s: float = 120.0) -> tuple[int, str]:
        """Ctrl-C: the exit status and what it printed while shutting down."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=timeout_s)
        return code, self.proc.stdout.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
