from __future__ import annotations

import pytest

from libpipe.net import SwarmCA
from libpipe.net._tls import Security


@pytest.fixture(scope="session")
def swarm_ca() -> SwarmCA:
    return SwarmCA.create()


@pytest.fixture(scope="session")
def server_security(swarm_ca: SwarmCA) -> Security:
    return Security.tls(swarm_ca.issue("server"))


@pytest.fixture(scope="session")
def client_security(swarm_ca: SwarmCA) -> Security:
    return Security.tls(swarm_ca.issue("client"))
