"""Stop conditions through real servers, from the async and the blocking
client alike: generation ends with the token that completes a stop."""

from __future__ import annotations

import json

import libpipe

PROMPT = [9, 8, 7, 6]


def cut_at(tokens: list[int], stop: list[int]) -> list[int]:
    """``tokens`` up to the first completion of ``stop``."""
    end = next(i for i in range(len(tokens)) if tokens[: i + 1][-len(stop) :] == stop)
    return tokens[: end + 1]


async def test_a_stop_sequence_ends_the_generation(model_dir, chain, local_model):
    expected = local_model.greedy(PROMPT, 12)
    async with libpipe.Client(model_dir, chain, insecure=True) as c:
        got = await c.generate(PROMPT, max_new_tokens=12, stop_tokens=(), stop=[expected[3:5]])
        # A sequence that never comes leaves the generation to max_new_tokens.
        full = await c.generate(PROMPT, max_new_tokens=12, stop_tokens=(), stop=[[0, 0, 0]])
    assert got == cut_at(expected, expected[3:5])
    assert full == expected


def test_the_blocking_client_takes_the_same_arguments(model_dir, chain, local_model):
    expected = local_model.greedy(PROMPT, 8)
    with libpipe.SyncClient(model_dir, chain, insecure=True) as c:
        assert c.has_tokenizer and c.config.num_hidden_layers == 8
        assert c.stop_tokens == {2}
        got = c.generate(PROMPT, max_new_tokens=8, stop_tokens={expected[4]})
        assert got == expected[: expected.index(expected[4]) + 1]
        assert [h.end for h in c.last_route][-1] == 8
        streamed = list(c.stream(PROMPT, max_new_tokens=8, stop_tokens=(), stop=[expected[1:3]]))
        assert streamed == cut_at(expected, expected[1:3])
        with c.inference_session(max_length=16) as session:
            assert (session.max_length, session.batch, session.position) == (16, 1, 0)
            session.step(PROMPT)
            assert session.position == len(PROMPT)


def test_cli_stop_ids(model_dir, chain, local_model, capsys):
    from libpipe.cli.main import main

    expected = local_model.greedy(PROMPT, 10)
    stop = expected[5:7]
    status = main(
        ["generate", "--model", str(model_dir), "--peers", ",".join(chain), "--insecure",
         "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "10", "--no-stop",
         "--stop-ids", "0,0,0", "--stop-ids", ",".join(map(str, stop)), "--json"]
    )  # fmt: skip
    assert status == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == cut_at(expected, stop)
