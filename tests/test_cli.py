"""The `libpipe` command: every public module of libpipe.cli is a subcommand."""

import pytest

from libpipe.cli import main as cli
from libpipe.errors import ConfigError


def test_each_public_module_is_a_subcommand_of_its_own_name(capsys):
    names = cli.subcommand_modules()
    assert {"ca", "demo", "generate", "monitor", "server", "simulate", "swarm"} <= set(names)
    assert not [n for n in names if n.startswith("_") or n == "main"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for name in names:
        assert name in listed


def test_a_typed_error_is_printed_without_a_traceback(monkeypatch, capsys):
    parser = cli.build_parser()

    def fail(args):
        raise ConfigError("no such model directory: /nowhere")

    args = parser.parse_args(["swarm", "--peers", "127.0.0.1:1", "--insecure"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(args, fail))
    assert cli.main(["swarm"]) == 2
    err = capsys.readouterr().err
    assert "ConfigError: no such model directory: /nowhere" in err
    assert "Traceback" not in err


class _Fixed:
    """A parser that returns given arguments with a given ``func``."""

    def __init__(self, args, func):
        self._args, self._func = args, func

    def parse_args(self, argv):
        self._args.func = self._func
        return self._args
