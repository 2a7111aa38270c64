"""ServerProcess: a real ``libpipe-server`` process, for tests, benchmarks and the demo.

Synchronous on purpose (a test fixture or a script starts it; nothing
async is needed): ``start`` spawns ``python -m libpipe.cli.server`` and
waits until the daemon writes its ready file (address, peer id), or exits,
or the timeout passes; then the tail of its log says why. Output goes to a
log file, never a pipe, so a chatty server cannot block on a full pipe.
The context manager always kills what it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError, DeadlineExceededError

# Loading a real span and measuring its throughput takes a while on a
# loaded 2-core machine; tests pass --throughput, but the demo may not.
DEFAULT_START_TIMEOUT = 180.0
LOG_TAIL_BYTES = 4000


class ServerProcess:
    def __init__(
        self,
        process: subprocess.Popen[bytes],
        log_path: Path,
        workdir: tempfile.TemporaryDirectory[str] | None,
    ) -> None:
        self.process = process
        self.log_path = log_path
        self._workdir = workdir
        self.address = ""
        self.peer_id = ""
        self.span: tuple[int, int] = (0, 0)

    @classmethod
    def start(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        blocks: tuple[int, int] | None,
        extra_args: Sequence[str] = (),
        insecure: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        log_dir: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = DEFAULT_START_TIMEOUT,
    ) -> ServerProcess:
        """Spawn a server for ``blocks`` of ``model_dir`` and wait until it serves
        (``blocks=None``: it chooses its span from the swarm; ``span`` says which).

        Raises ``ConfigError`` (with the log's tail) if it exits first and
        ``DeadlineExceededError`` if it is not ready within ``timeout`` s."""
        workdir = tempfile.TemporaryDirectory(prefix="libpipe-server-")
        where = Path(log_dir) if log_dir is not None else Path(workdir.name)
        where.mkdir(parents=True, exist_ok=True)
        name = f"{blocks[0]}-{blocks[1]}" if blocks is not None else "auto"
        log_path = where / f"server-{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        ready = Path(workdir.name) / "ready.json"
        argv = [
            sys.executable,
            "-m",
            "libpipe.cli.server",
            str(model_dir),
            *(["--blocks", f"{blocks[0]}:{blocks[1]}"] if blocks is not None else []),
            "--host",
            host,
            "--port",
            str(port),
            "--ready-file",
            str(ready),
            "--no-progress",
            *(["--insecure"] if insecure else []),
            *extra_args,
        ]
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env
            )
        server = cls(process, log_path, workdir)
        try:
            server._wait_ready(ready, timeout)
        except BaseException:
            server.kill()
            raise
        return server

    def _wait_ready(self, ready: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            rc = self.process.poll()
            if rc is not None:
                raise ConfigError(
                    f"libpipe-server exited with status {rc} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}",
                    returncode=rc,
                    log=str(self.log_path),
                )
            if time.monotonic() > deadline:
                raise DeadlineExceededError(
                    f"libpipe-server was not ready within {timeout:g} s; "
                    f"log {self.log_path}:\n{self.log_tail()}",
                    log=str(self.log_path),
                )
            time.sleep(0.05)
        facts = json.loads(ready.read_text(encoding="utf-8"))
        self.address = facts["address"]
        self.peer_id = facts["peer_id"]
        self.span = (facts["span"][0], facts["span"][1])

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log_tail(self, nbytes: int = LOG_TAIL_BYTES) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-nbytes:].decode("utf-8", errors="replace")

    def terminate(self) -> None:
        """SIGTERM: the server drains, then exits 0."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: gone at once, as a crashed or unplugged server is."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; ``DeadlineExceededError`` if still running after ``timeout`` s."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DeadlineExceededError(
                f"libpipe-server (pid {self.pid}) still running after {timeout} s"
            ) from None

    def close(self) -> None:
        self.kill()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
