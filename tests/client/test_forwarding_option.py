"""``Client(forwarding=False)`` and ``libpipe generate --no-forwarding``:
the client carries every hop's output itself (no server pushes) and
generates the same tokens."""

from __future__ import annotations

import json

import libpipe
from libpipe.cli.main import main as cli_main

PROMPT = [4, 8, 15, 16]


async def test_a_client_without_forwarding_carries_every_hop(model_dir, chain, local_model):
    async with libpipe.Client(model_dir, chain, insecure=True, forwarding=False) as c:
        assert await c.generate(PROMPT, max_new_tokens=5, stop_tokens=()) == local_model.greedy(
            PROMPT, 5
        )
        async with c.inference_session(max_length=8) as session:
            await session.step(PROMPT)
            await session.step([1])
            assert len(session.route) == 3 and session._remote.forwarded == 0
    async with libpipe.Client(model_dir, chain, insecure=True) as c:
        async with c.inference_session(max_length=8) as session:
            await session.step(PROMPT)
            assert session._remote.forwarded == 2  # the default: hops 2 and 3 by push


def test_cli_no_forwarding(model_dir, chain, local_model, capsys):
    status = cli_main(
        ["generate", "--model", str(model_dir), "--peers", ",".join(chain), "--insecure",
         "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "4", "--no-stop",
         "--no-forwarding", "--json"]
    )  # fmt: skip
    assert status == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == local_model.greedy(PROMPT, 4)
