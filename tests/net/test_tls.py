from __future__ import annotations

import datetime
import logging
import socket
import ssl

import pytest
import trio

from libpipe.errors import AuthenticationError, ConfigError, ConnectionBrokenError
from libpipe.net import SwarmCA
from libpipe.net._tls import Security, accept, accept_socket, dial, open_listener


async def _serve_once(security: Security, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept one connection, report the admission outcome, echo one message."""
    listener = await open_listener("127.0.0.1", 0, security)
    outcome: list[object] = []
    task_status.started((listener.getsockname()[1], outcome))
    with listener:
        sock, address = await accept_socket(listener)
        try:
            channel = await accept(sock, security, address)
        except (AuthenticationError, ConnectionBrokenError) as exc:
            outcome.append(exc)
            return
        outcome.append(channel.peer_id)
        async with channel.stream:
            buffer = bytearray(1024)
            try:
                n = await channel.stream.receive_into(buffer)
                await channel.stream.send_all(buffer[:n])
            except (AuthenticationError, ConnectionBrokenError) as exc:
                outcome[0] = exc


async def test_mutual_tls_gives_both_sides_verified_peer_ids(
    server_security: Security, client_security: Security
) -> None:
    async with trio.open_nursery() as nursery:
        port, outcome = await nursery.start(_serve_once, server_security)
        channel = await dial(
            "127.0.0.1", port, client_security, expected_peer_id=server_security.peer_id
        )
        assert channel.peer_id == server_security.peer_id
        async with channel.stream:
            await channel.stream.send_buffers([b"head", memoryview(b"-payload"), b""])
            assert await channel.stream.receive_some(100) == b"head-payload"
    assert outcome == [client_security.peer_id]


async def test_pinning_refuses_an_impostor(
    server_security: Security, client_security: Security
) -> None:
    async with trio.open_nursery() as nursery:
        port, _ = await nursery.start(_serve_once, server_security)
        with pytest.raises(AuthenticationError, match="expected"):
            await dial("127.0.0.1", port, client_security, expected_peer_id=client_security.peer_id)


async def _refused_both_sides(server: Security, client: Security) -> tuple[Exception, Exception]:
    async with trio.open_nursery() as nursery:
        port, outcome = await nursery.start(_serve_once, server)
        with pytest.raises(AuthenticationError) as client_error:
            channel = await dial("127.0.0.1", port, client)
            # TLS 1.3: the server judges the client certificate after the
            # client's handshake returned, so the refusal shows on first read.
            async with channel.stream:
                await channel.stream.send_all(b"x")
                await channel.stream.receive_some(10)
    assert len(outcome) == 1 and isinstance(outcome[0], AuthenticationError)
    return client_error.value, outcome[0]


async def test_certificate_from_another_ca_is_refused(server_security: Security) -> None:
    stranger = Security.tls(SwarmCA.create().issue("stranger"))
    client_error, server_error = await _refused_both_sides(server_security, stranger)
    # The client does not trust the server's CA either and says so first.
    assert "not acceptable" in str(client_error)
    assert "refused our certificate" in str(server_error)


async def test_expired_certificate_is_refused(swarm_ca: SwarmCA, server_security: Security) -> None:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    expired = Security.tls(
        swarm_ca.issue("old", not_before=long_ago, validity=datetime.timedelta(days=1))
    )
    _, server_error = await _refused_both_sides(server_security, expired)
    assert "expired" in str(server_error)


async def test_client_without_certificate_is_refused(
    swarm_ca: SwarmCA, server_security: Security
) -> None:
    async with trio.open_nursery() as nursery:
        port, outcome = await nursery.start(_serve_once, server_security)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=swarm_ca.cert_pem.decode())
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, context)
        await stream.do_handshake()
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some(10)
        await tcp.aclose()
    assert isinstance(outcome[0], AuthenticationError)
    assert "certificate" in str(outcome[0]).lower()


async def test_plaintext_to_tls_server_is_refused(server_security: Security) -> None:
    async with trio.open_nursery() as nursery:
        port, outcome = await nursery.start(_serve_once, server_security)
        plain = await dial("127.0.0.1", port, Security.insecure())
        async with plain.stream:
            await plain.stream.send_all(b"LPIPE hello in plaintext")
            # The server drops us: a reset or EOF, never an echo.
            try:
                assert await plain.stream.receive_some(100) != b"LPIPE hello in plaintext"
            except ConnectionBrokenError:
                pass
    assert isinstance(outcome[0], AuthenticationError)
    assert "does not speak TLS" in str(outcome[0])


async def test_handshake_that_never_completes_times_out(swarm_ca: SwarmCA) -> None:
    server = Security.tls(swarm_ca.issue("impatient"), handshake_timeout=0.2)
    async with trio.open_nursery() as nursery:
        port, outcome = await nursery.start(_serve_once, server)
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await silent.receive_some(10) == b""
        await silent.aclose()
    assert isinstance(outcome[0], AuthenticationError) and "did not finish" in str(outcome[0])


async def test_insecure_refuses_public_bind_unless_told_twice(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="libpipe.net"):
        with pytest.raises(ConfigError, match="allow_public_insecure"):
            await open_listener("0.0.0.0", 0, Security.insecure())
    assert "INSECURE" in caplog.text
    listener = await open_listener("0.0.0.0", 0, Security.insecure(allow_public=True))
    listener.close()


async def test_dial_to_closed_port_is_broken() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(ConnectionBrokenError, match="cannot connect"):
        await dial("127.0.0.1", port, Security.insecure())


def test_security_validation(swarm_ca: SwarmCA) -> None:
    with pytest.raises(ConfigError):
        Security.insecure(handshake_timeout=0)
    with pytest.raises(ConfigError):
        Security(swarm_ca.identity, swarm_ca.issue("n"))
    with pytest.raises(ConfigError):
        _ = Security.insecure().client_context


def test_security_from_files(tmp_path, swarm_ca: SwarmCA) -> None:
    swarm_ca.issue("n").save(tmp_path / "id")
    (tmp_path / "ca.crt").write_bytes(swarm_ca.cert_pem)
    security = Security.from_files(tmp_path / "id", tmp_path / "ca.crt")
    assert security.is_tls and security.client_context.minimum_version == ssl.TLSVersion.TLSv1_3
    with pytest.raises(ConfigError):
        Security.from_files(tmp_path / "id", tmp_path / "missing.crt")


def test_security_from_command_line_options(tmp_path, swarm_ca: SwarmCA) -> None:
    swarm_ca.issue("n").save(tmp_path / "id")
    assert Security.from_options(identity=tmp_path / "id").is_tls
    insecure = Security.from_options(insecure=True, allow_public_insecure=True)
    assert not insecure.is_tls and insecure.allow_public_insecure
    for bad in (
        {},
        {"insecure": True, "identity": tmp_path / "id"},
        {"insecure": True, "ca": tmp_path / "ca.crt"},
        {"identity": tmp_path / "id", "allow_public_insecure": True},
    ):
        with pytest.raises(ConfigError):
            Security.from_options(**bad)
