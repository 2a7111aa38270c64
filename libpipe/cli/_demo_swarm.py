"""A private swarm on 127.0.0.1 for `libpipe demo`: CA, identities, servers.

Everything a real deployment has, in a temp dir: a fresh swarm CA, one
identity per server and one for the client, and real ``libpipe-server``
processes speaking mutual TLS, joined into one swarm by gossip through the
first of them. No server is told its blocks: each is told how many to
hold and picks the window the swarm needs most from the view it gets on
joining. So they start one after the other, each seeing all the ones
before it: started side by side, they would all see the same swarm and
pile onto the same window (measured: with two joining at once, both took
blocks 0:4 beside one 0:4 and one 4:8), leaving the other half without a
replica until a rebalance moved one.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError, DeadlineExceededError
from ..net import SwarmCA
from ..server import ServerProcess

# Draining with no open session takes a moment; this only ever catches a
# server that hangs on its way out.
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Stopped:
    peer_id: str
    returncode: int | None  # None: still running after STOP_TIMEOUT, then killed


class LocalSwarm:
    """``with LocalSwarm.start(model_dir, servers, num_blocks) as swarm:`` then
    ``swarm.servers``, ``swarm.client_identity``, ``swarm.kill(peer_id)``."""

    def __init__(self, workdir: tempfile.TemporaryDirectory[str], client_identity: Path) -> None:
        self._workdir = workdir
        self.root = Path(workdir.name)
        self.client_identity = client_identity
        self.servers: list[ServerProcess] = []

    @classmethod
    def start(
        cls, model_dir: Path, servers: int, num_blocks: int, *, gossip: str = "local"
    ) -> LocalSwarm:
        """Start ``servers`` servers holding ``num_blocks`` blocks each."""
        workdir = tempfile.TemporaryDirectory(prefix="libpipe-demo-")
        root = Path(workdir.name)
        ca = SwarmCA.create("libpipe demo swarm CA")
        ca.save(root / "ca")
        ca.issue("demo client").save(root / "client")
        swarm = cls(workdir, root / "client")
        try:
            for i in range(servers):
                ca.issue(f"demo server {i}").save(root / f"server{i}")
                seed = swarm.servers[0].address if swarm.servers else ""
                swarm.servers.append(swarm._launch(model_dir, i, num_blocks, gossip, seed))
        except BaseException:
            swarm.close()
            raise
        return swarm

    def _launch(
        self, model_dir: Path, index: int, num_blocks: int, gossip: str, peers: str
    ) -> ServerProcess:
        return ServerProcess.start(
            model_dir,
            blocks=None,
            insecure=False,
            log_dir=self.root / "logs",
            extra_args=[
                "--identity",
                str(self.root / f"server{index}"),
                "--gossip",
                gossip,
                "--num-blocks",
                str(num_blocks),
                "--cache-bytes",
                "64M",
                *(["--peers", peers] if peers else []),
            ],
        )

    def server(self, peer_id: str) -> ServerProcess:
        for s in self.servers:
            if s.peer_id == peer_id:
                return s
        raise ConfigError(f"no demo server has peer id {peer_id}")

    def kill(self, peer_id: str) -> ServerProcess:
        """SIGKILL: the server vanishes as a crashed machine does, no goodbye."""
        victim = self.server(peer_id)
        victim.kill()
        return victim

    def stop(self) -> list[Stopped]:
        """SIGTERM every live server (each drains and exits) and wait."""
        live = [s for s in self.servers if s.returncode is None]
        for s in live:
            s.terminate()
        stopped = []
        for s in live:
            try:
                code: int | None = s.wait(STOP_TIMEOUT)
            except DeadlineExceededError:
                s.kill()
                code = None
            stopped.append(Stopped(s.peer_id, code))
        return stopped

    def close(self) -> None:
        for s in self.servers:
            s.close()
        self._workdir.cleanup()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
