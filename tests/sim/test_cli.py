"""`libpipe simulate`: table, JSON, plot, and typed errors as exit status 2."""

from __future__ import annotations

import json

import pytest

from libpipe.cli.main import main


@pytest.fixture
def tiny_file(tmp_path, tiny):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny))
    return str(path)


def test_json_output(tiny_file, capsys):
    load = ["--lambda", "0.3", "--l-max", "5", "--duration", "40"]
    status = main(
        ["simulate", tiny_file, "--algorithms", "petals,cg-bp", "--json", "--seed", "2", *load]
    )
    assert status == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["results"]) == {"petals", "cg-bp"}
    assert data["workload"] == {"arrival_rate": 0.3, "l_in": 4, "l_max": 5, "duration_s": 40.0}
    assert data["seed"] == 2
    for values in data["results"].values():
        assert {"mean_token_s", "p95_token_s", "ttft_s", "wait_s", "throughput_tokens_s"} <= set(
            values
        )


def test_table_and_plot(tiny_file, tmp_path, capsys):
    png = tmp_path / "out.png"
    assert main(["simulate", tiny_file, "--algorithms", "petals,libpipe", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "libpipe" in out and "mean tok s" in out and "plot written" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_leaves_matplotlibs_backend_alone(tiny_file, tmp_path, monkeypatch):
    import matplotlib

    def no_switch(*args, **kwargs):
        raise AssertionError("plot_comparison switched matplotlib's global backend")

    monkeypatch.setattr(matplotlib, "use", no_switch)
    png = tmp_path / "out.png"
    assert main(["simulate", tiny_file, "--algorithms", "petals", "--plot", str(png)]) == 0
    assert png.stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "nowhere"], "unknown scenario 'nowhere'"),
        (["simulate", "clustered", "--algorithms", ","], "names no algorithm"),
        (["simulate", "clustered", "--algorithms", "best"], "unknown placement algorithm"),
        (["simulate", "clustered", "--lambda", "-1"], "arrival rate must be > 0"),
        (["simulate", "clustered", "--l-max", "0"], "l_max must be >= 1"),
    ],
)
def test_bad_input_is_a_typed_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unwritable_plot_path(tiny_file, tmp_path, capsys):
    target = tmp_path / "missing-dir" / "out.png"
    argv = ["simulate", tiny_file, "--algorithms", "petals", "--plot", str(target)]
    assert main(argv) == 2
    assert "cannot write the plot" in capsys.readouterr().err
