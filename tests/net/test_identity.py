from __future__ import annotations

import base64
import datetime
import hashlib
import os
import stat

import pytest

from libpipe.cli.main import main
from libpipe.errors import AuthenticationError, ConfigError
from libpipe.net import (
    Identity,
    NodeCredentials,
    SwarmCA,
    peer_id_from_certificate,
    peer_id_from_public_key,
    short_peer_id,
    verify_signature,
)


def test_peer_id_is_base32_of_truncated_sha256() -> None:
    identity = Identity.generate()
    raw = identity.public_key_bytes
    expected = base64.b32encode(hashlib.sha256(raw).digest()[:20]).decode().lower()
    assert identity.peer_id == expected == peer_id_from_public_key(raw)
    assert peer_id_from_public_key(identity.public_key) == expected
    assert len(expected) == 32 and "=" not in expected
    assert identity.short_id == short_peer_id(expected) == expected[:8]


def test_peer_ids_differ_between_keys() -> None:
    assert Identity.generate().peer_id != Identity.generate().peer_id


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, "a" * 32])
def test_peer_id_of_bad_key_is_config_error(bad: object) -> None:
    with pytest.raises(ConfigError):
        peer_id_from_public_key(bad)  # type: ignore[arg-type]


def test_sign_and_verify() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"record")
    assert verify_signature(identity.public_key_bytes, signature, b"record")
    assert not verify_signature(identity.public_key_bytes, signature, b"recorD")
    assert not verify_signature(Identity.generate().public_key_bytes, signature, b"record")
    assert not verify_signature(b"short", signature, b"record")


def test_key_saved_0600_and_reloaded(tmp_path) -> None:
    identity = Identity.generate()
    identity.save_key(tmp_path / "k")
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600
    assert Identity.load_key(tmp_path / "k").peer_id == identity.peer_id


def test_bad_key_files_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Identity.load_key(tmp_path / "missing")
    (tmp_path / "garbage").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="PEM"):
        Identity.load_key(tmp_path / "garbage")


def test_certificate_carries_the_peer_id(swarm_ca: SwarmCA) -> None:
    node = swarm_ca.issue("node-1")
    assert peer_id_from_certificate(node.cert_pem) == node.peer_id


def test_not_a_certificate_is_authentication_error() -> None:
    with pytest.raises(AuthenticationError):
        peer_id_from_certificate(b"junk")


def test_issue_validates_name(swarm_ca: SwarmCA) -> None:
    with pytest.raises(ConfigError):
        swarm_ca.issue("")
    with pytest.raises(ConfigError):
        swarm_ca.issue("x" * 65)


def test_credentials_round_trip_and_mismatch(tmp_path, swarm_ca: SwarmCA) -> None:
    node = swarm_ca.issue("n", not_before=datetime.datetime.now(datetime.UTC))
    node.save(tmp_path / "id")
    loaded = NodeCredentials.load(tmp_path / "id")
    assert loaded.peer_id == node.peer_id and loaded.cert_pem == node.cert_pem
    other = swarm_ca.issue("other")
    (tmp_path / "id" / "node.crt").write_bytes(other.cert_pem)
    with pytest.raises(ConfigError, match="does not belong"):
        NodeCredentials.load(tmp_path / "id")


def test_cli_ca_init_and_issue(tmp_path, capsys) -> None:
    assert main(["ca", "init", str(tmp_path / "ca")]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "ca.key").st_mode) == 0o600
    assert (
        main(["ca", "issue", str(tmp_path / "ca"), "--name", "n1", "--out", str(tmp_path / "n1")])
        == 0
    )
    node = NodeCredentials.load(tmp_path / "n1")
    assert node.peer_id in capsys.readouterr().out
    assert node.ca_cert_pem == SwarmCA.load(tmp_path / "ca").cert_pem
    assert stat.S_IMODE(os.stat(tmp_path / "n1" / "node.key").st_mode) == 0o600


def test_cli_refuses_to_overwrite_a_ca_and_reports_missing_dirs(tmp_path, capsys) -> None:
    assert main(["ca", "init", str(tmp_path / "ca")]) == 0
    assert main(["ca", "init", str(tmp_path / "ca")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (
        main(["ca", "issue", str(tmp_path / "nope"), "--name", "x", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "cannot read" in capsys.readouterr().err
