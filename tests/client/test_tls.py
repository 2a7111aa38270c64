"""A private swarm: the client reaches a TLS server with an identity its CA
signed, and nothing without one."""

from __future__ import annotations

from pathlib import Path

import pytest

import libpipe
from libpipe.errors import NoRouteError
from libpipe.net import SwarmCA
from libpipe.server import ServerProcess

PROMPT = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swarm-ca")
    ca, stranger = SwarmCA.create(), SwarmCA.create("another swarm")
    out = {}
    for name, authority in (("server", ca), ("client", ca), ("stranger", stranger)):
        authority.issue(name).save(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def tls_server(model_dir, cache_dir, identities) -> ServerProcess:
    server = ServerProcess.start(
        model_dir,
        blocks=(0, 8),
        insecure=False,
        extra_args=["--identity", str(identities["server"]), "--throughput", "200,4000",
                    "--cache-dir", str(cache_dir), "--log-level", "WARNING"],
    )  # fmt: skip
    yield server
    server.close()


async def test_generates_through_a_tls_server(model_dir, tls_server, identities, local_model):
    async with libpipe.Client(
        model_dir, [tls_server.address], identity=identities["client"]
    ) as client:
        assert set(client.view.servers) == {tls_server.peer_id}
        tokens = await client.generate(PROMPT, max_new_tokens=4, stop_tokens=())
    assert tokens == local_model.greedy(PROMPT, 4)


@pytest.mark.parametrize("who", ["stranger", "insecure"])
async def test_without_the_swarm_s_certificate_nothing_is_reachable(
    model_dir, tls_server, identities, who
):
    options = {"insecure": True} if who == "insecure" else {"identity": identities[who]}
    async with libpipe.Client(model_dir, [tls_server.address], **options) as client:
        assert client.view.servers == {}
        with pytest.raises(NoRouteError, match="unreachable"):
            await client.generate(PROMPT, max_new_tokens=1)
