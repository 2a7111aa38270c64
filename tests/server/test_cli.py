"""`libpipe-server` / `libpipe server` flags: parsed into a ServerConfig, bad
ones refused with a typed error and exit status 2, no traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from libpipe.cli import server as cli
from libpipe.cli.main import build_parser, main as libpipe_main
from libpipe.errors import ConfigError
from libpipe.server import ServerConfig, parse_blocks


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_become_a_server_config(tmp_path):
    args = parse(
        str(tmp_path), "--blocks", "3:7", "--port", "4100", "--cache-bytes", "512M",
        "--max-length", "4096", "--no-batching", "--throughput", "12.5,800",
        "--peers", "127.0.0.1:1, 127.0.0.1:2", "--cache-dir", str(tmp_path / "c"),
        "--gossip", "local", "--idle-timeout", "5", "--backward-chunk", "2",
        "--bulk-bytes", "2G", "--inline-decode-ms", "12.5", "--forward-chunk", "3",
    )  # fmt: skip
    config = cli.build_config(args)
    assert isinstance(config, ServerConfig)
    assert config.model_dir == Path(tmp_path)
    assert config.blocks == (3, 7)
    assert config.port == 4100
    assert config.cache_bytes == 512 << 20
    assert config.max_length == 4096
    assert config.batching is False
    assert config.throughput == (12.5, 800.0)
    assert config.peers == ("127.0.0.1:1", "127.0.0.1:2")
    assert config.cache_dir == tmp_path / "c"
    assert config.idle_timeout == 5.0
    assert config.backward_chunk == 2
    assert config.bulk_bytes == 2 << 30
    assert config.inline_decode_max == 0.0125
    assert config.forward_chunk == 3
    assert config.drain_grace == ServerConfig.drain_grace  # left out: the default


def test_the_cache_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBPIPE_CACHE_DIR", str(tmp_path / "env"))
    assert cli.build_config(parse(str(tmp_path), "--blocks", "0:1")).cache_dir == tmp_path / "env"


@pytest.mark.parametrize(
    ("text", "value"), [("1024", 1024), ("2K", 2048), ("1.5G", 3 << 29), ("4GiB", 4 << 30)]
)
def test_byte_sizes(text, value):
    assert cli.parse_bytes(text, "--cache-bytes") == value


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--blocks", "3"], "--blocks must be A:B"),
        (["--blocks", "5:5"], "start must be below the end"),
        (["--blocks", "0:2", "--cache-bytes", "lots"], "--cache-bytes must be a size"),
        (["--blocks", "0:2", "--cache-bytes", "inf"], "--cache-bytes must be a size"),
        (["--blocks", "0:2", "--cache-bytes", "nan"], "--cache-bytes must be a size"),
        (["--blocks", "0:2", "--memory", "1e400G"], "--memory must be a size"),
        (["--blocks", "0:2", "--throughput", "1"], "--throughput must be DECODE,FORWARD"),
        (["--blocks", "0:2", "--max-length", "0"], "max_length must be at least 1"),
        (["--blocks", "0:2", "--drain-grace", "-1"], "drain_grace must be positive"),
        (["--blocks", "0:2", "--host", "0.0.0.0"], "give --announce-address"),
        (["--blocks", "0:2", "--insecure", "--identity", "x"], "cannot be combined"),
        (["--blocks", "0:2"], "give --identity DIR"),
        (["--blocks", "0:2", "--insecure", "--threads", "0"], "--threads must be at least 1"),
        (["--blocks", "0:2", "--backward-chunk", "0"], "backward_chunk must be at least 1"),
        (["--blocks", "0:2", "--bulk-bytes", "0"], "bulk_bytes must be at least 1"),
        (["--blocks", "0:2", "--forward-chunk", "0"], "forward_chunk must be at least 1"),
        (["--blocks", "0:2", "--inline-decode-ms", "-1"], "inline_decode_max must be"),
        (["--blocks", "0:2", "--inline-decode-ms", "nan"], "inline_decode_max must be"),
    ],
)
def test_bad_flags_exit_2_with_a_message(tmp_path, capsys, argv, message):
    assert cli.main([str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and message in err and "Traceback" not in err


def test_a_missing_checkpoint_is_a_typed_error(tmp_path, capsys):
    assert cli.main([str(tmp_path / "none"), "--blocks", "0:2", "--insecure"]) == 2
    assert "CheckpointError: no config.json" in capsys.readouterr().err


def test_libpipe_server_subcommand_takes_the_same_flags(tmp_path, capsys):
    args = build_parser().parse_args(["server", str(tmp_path), "--blocks", "1:2", "--insecure"])
    assert args.func is cli.run
    assert cli.build_config(args).blocks == (1, 2)
    assert libpipe_main(["server", str(tmp_path), "--blocks", "x"]) == 2


def test_parse_blocks():
    assert parse_blocks("0:8") == (0, 8)
    with pytest.raises(ConfigError):
        parse_blocks("-1:3")


# Run in a fresh process: torch sets inter-op threads once per process.
THREADS = """
import argparse, sys
from libpipe.cli import server as cli
parser = argparse.ArgumentParser()
cli.add_arguments(parser)
args = parser.parse_args(["model", *sys.argv[1:]])
print(*cli.apply_threads(args.threads))
"""


@pytest.mark.parametrize(
    ("argv", "omp", "expected"), [(["--threads", "1"], "2", "1 1"), ([], "1", "1 1")]
)
def test_threads_set_intra_op_and_inter_op_and_default_to_torchs(argv, omp, expected):
    """``--threads`` sets both; without it both take torch's intra-op default
    (here from $OMP_NUM_THREADS, as torch reads it)."""
    env = {**os.environ, "OMP_NUM_THREADS": omp}
    out = subprocess.run(
        [sys.executable, "-c", THREADS, *argv], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == expected.split()
