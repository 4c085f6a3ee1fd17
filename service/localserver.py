"""`anoscope serve` in a subprocess on a free port of 127.0.0.1: the one harness the tests, the soak script
(scripts/soak.py) and the speed bench (training/speed.py) start the real service with.

Standard library only (the readiness probe uses urllib), so importing it pulls in neither torch nor an
HTTP client library.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the OS picks it; another process could still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def service_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any ANOSCOPE_* variable (the caller decides every setting),
    unbuffered output, then `env` on top."""
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANOSCOPE_")}
    environ["PYTHONUNBUFFERED"] = "1"
    environ.update(env or {})
    return environ


class LocalServer:
    """`python -m anoscope serve --port <free port> *args` in a subprocess; use as a context manager.

    `env` is applied on top of `service_environment()`. The working directory is `cwd`, else a scratch
    directory (the service reads a stray ./.env from wherever it starts). The server's output goes to
    `log` (appended) when given, else it is collected in memory (`output`).
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self._scratch = None if cwd is not None else tempfile.TemporaryDirectory(prefix="anoscope-serve-")
        workdir = cwd if cwd is not None else Path(self._scratch.name)  # type: ignore[union-attr]
        self.log = log
        self.lines: list[str] = []
        cmd = [sys.executable, "-m", "anoscope", "serve", "--port", str(self.port), *args]
        if log is not None:
            with log.open("a") as fh:
                self.proc = subprocess.Popen(
                    cmd, cwd=workdir, env=service_environment(env), stdout=fh, stderr=subprocess.STDOUT
                )
            self._reader: threading.Thread | None = None
        else:
            self.proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=service_environment(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        """Everything the server printed so far (with `log`: that file's content)."""
        if self.log is not None:
            return self.log.read_text(errors="replace") if self.log.exists() else ""
        return "".join(self.lines)

    def _where(self) -> str:
        return f"see {self.log}" if self.log is not None else f"its output:\n{self.output}"

    def wait_ready(self, timeout: float = 120) -> None:
        """Return once GET /readyz answers 200; RuntimeError when the server exits, reports that its model
        failed to load, or is not ready within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)  # the last lines usually say why
                msg = f"`anoscope serve` exited with code {self.proc.returncode}; {self._where()}"
                raise RuntimeError(msg)
            status, body = _get(f"{self.url}/readyz")
            if status == 200:
                return
            if status is not None and "failed to load" in body:
                try:
                    detail = json.loads(body).get("detail", body)
                except ValueError:
                    detail = body
                msg = f"the service could not load its model: {detail}; {self._where()}"
                raise RuntimeError(msg)
            if time.monotonic() > deadline:
                msg = f"`anoscope serve` was not ready within {timeout:g} s; {self._where()}"
                raise RuntimeError(msg)
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (the service drains what is in flight), SIGKILL after `timeout` s; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
        return self.proc.returncode

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never via an HTTP(S)_PROXY


def _get(url: str) -> tuple[int | None, str]:
    """(status, body) of a GET, or (None, "") when nothing answers yet."""
    try:
        with _OPENER.open(url, timeout=2) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError):
        return None, ""
