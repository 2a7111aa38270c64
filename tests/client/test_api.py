"""The client's generation API without servers: defaults, stop conditions,
and a typed error for every bad argument before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

import libpipe
from libpipe.client._generate import StopCondition
from libpipe.client._tokenizer import TextCodec
from libpipe.errors import ConfigError
from libpipe.model._random_checkpoint import write_byte_tokenizer

NOWHERE = ["127.0.0.1:9"]


@pytest.fixture
def codec(tmp_path: Path) -> TextCodec:
    write_byte_tokenizer(tmp_path / "tokenizer.json")
    codec = TextCodec.from_checkpoint(tmp_path, 256)
    assert codec is not None
    return codec


def stops_at(condition: StopCondition, tokens: list[int]) -> int | None:
    """The index of the token the generation ends with, None if it runs on."""
    for i, token in enumerate(tokens):
        if condition.update(token):
            return i
    return None


def condition(**kw) -> StopCondition:
    kw.setdefault("stop_tokens", ())
    kw.setdefault("stop", ())
    return StopCondition(vocab_size=256, decode=kw.pop("decode", None), **kw)


def test_stop_tokens_default_to_the_checkpoint_eos(model_dir):
    client = libpipe.Client(model_dir, NOWHERE, insecure=True)
    assert client.stop_tokens == client.config.eos_token_ids == {2}


def test_nothing_to_stop_at_runs_on():
    assert stops_at(condition(), [1, 2, 3, 2]) is None


def test_a_stop_token_ends_at_its_first_appearance():
    assert stops_at(condition(stop_tokens={7, 9}), [1, 9, 7]) == 1


@pytest.mark.parametrize(
    ("stop", "tokens", "at"),
    [
        ([[3, 4]], [1, 3, 5, 3, 4, 4], 4),
        ([[3, 3, 4]], [3, 3, 3, 4], 3),  # the match starts inside an earlier near-miss
        ([[5], [8, 9]], [8, 5], 1),
        ([[1, 2, 3]], [1, 2, 4, 3], None),
    ],
)
def test_token_sequences(stop, tokens, at):
    assert stops_at(condition(stop=stop), tokens) == at


@pytest.mark.parametrize(
    ("stop", "text", "at"),
    [
        ("lo w", "hello world", 6),  # the token that completes the string
        (["zz", "o"], "hello", 4),
        ("ö", "wörld", 2),  # two byte tokens: stops at the second
        ("orl", "hello world", 9),
        ("xyz", "hello world", None),
    ],
)
def test_strings_in_the_generated_text(codec, stop, text, at):
    assert stops_at(condition(stop=stop, decode=codec.decode), codec.encode(text)) == at


def test_strings_and_token_sequences_together(codec):
    cond = condition(stop=["world", [ord("l"), ord("o")]], decode=codec.decode)
    assert stops_at(cond, codec.encode("hello world")) == 4


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        condition(stop=["end"])


@pytest.mark.parametrize(
    "kw",
    [
        {"stop": [1, 2]},  # single tokens belong in stop_tokens
        {"stop": [""]},
        {"stop": [[]]},
        {"stop": [[256]]},
        {"stop": [[-1]]},
        {"stop": [[1.5]]},
        {"stop": [[True]]},
        {"stop": b"end"},
        {"stop": 5},
        {"stop": [b"end"]},
        {"stop_tokens": [256]},
        {"stop_tokens": [True]},
        {"stop_tokens": "ab"},
        {"stop_tokens": 3},
    ],
)
def test_bad_stop_arguments_are_config_errors(kw):
    with pytest.raises(ConfigError):
        condition(**kw)


async def test_bad_stop_arguments_are_refused_before_any_server(model_dir):
    async with libpipe.Client(model_dir, NOWHERE, insecure=True) as client:
        with pytest.raises(ConfigError):
            await client.generate([1], max_new_tokens=1, stop=[[999]])
        with pytest.raises(ConfigError):
            await client.generate([1], max_new_tokens=1, stop_tokens=[-3])


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--stop-ids", "1,x"], "--stop-ids must be integers"),
        (["--stop-ids", ","], "--stop-ids needs at least one"),
        (["--stop-ids", "999"], "not a token id in [0, 256)"),
    ],
)
def test_cli_bad_stop_flags(model_dir, capsys, flags, says):
    from libpipe.cli.main import main

    status = main(
        ["generate", "--model", str(model_dir), "--peers", NOWHERE[0], "--insecure",
         "--prompt-ids", "1,2", "--max-new-tokens", "2", *flags]
    )  # fmt: skip
    assert status == 2
    assert says in capsys.readouterr().err


def test_cli_stop_text_needs_a_tokenizer(tmp_path, capsys):
    from libpipe.cli.main import main
    from libpipe.model import write_random_checkpoint

    bare = write_random_checkpoint(tmp_path, "llama", seed=1, tokenizer=False)
    status = main(
        ["generate", "--model", str(bare), "--peers", NOWHERE[0], "--insecure",
         "--prompt-ids", "1,2", "--max-new-tokens", "2", "--stop", "end"]
    )  # fmt: skip
    assert status == 2
    assert "--stop needs" in capsys.readouterr().err
