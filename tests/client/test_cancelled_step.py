"""A step cancelled by its caller (a timeout around ``session.step``) leaves
replies in flight; the next step must not take them for its own, nor blame
a healthy server for them."""

from __future__ import annotations

import torch
import trio

import libpipe

from .conftest import LocalModel

PROMPT = [5, 6, 7, 8]


async def test_a_cancelled_step_does_not_desync_or_ban(model_dir, chain, local_model: LocalModel):
    async with libpipe.Client(model_dir, chain, insecure=True) as c:
        async with c.inference_session(max_length=64) as session:
            await session.step(PROMPT)
            cancelled = 0
            for attempt in range(20):
                # Cancelled somewhere inside the chain: after a send, before its reply.
                with trio.move_on_after(0.0002 * attempt) as scope:
                    await session.step([9])
                cancelled += scope.cancelled_caught
                if not scope.cancelled_caught:
                    session.rollback(len(PROMPT))
            assert cancelled > 0
            logits = await session.step([9])
            failovers = session.failovers
    expected = local_model.logits([*PROMPT, 9])[-1]
    assert failovers == 0
    assert (logits[0, 0] - expected).abs().max() < 1e-4


async def test_an_error_answering_a_given_up_step_does_not_ban(
    model_dir, chain, local_model: LocalModel
):
    """A step given up (its id taken, never awaited) that the server
    refuses: the error names that step, so the client replaces the session
    on the same server without banning it, and computes what it should."""
    async with libpipe.Client(model_dir, chain, insecure=True) as c:
        async with c.inference_session(max_length=64) as session:
            await session.step(PROMPT)
            remote = session._remote
            first = remote._hops[0]
            given_up = next(remote._steps)
            bad = torch.zeros(1, 1, c.config.hidden_size, dtype=c._open()[1].wire_dtype)
            await first.stream.send({"position": 999, "step": given_up}, (bad,))
            logits = await session.step([9])
            failovers = session.failovers
            assert c.view.ban_reason(first.planned.peer_id) is None
            assert session.route[0].peer_id == first.planned.peer_id
    expected = local_model.logits([*PROMPT, 9])[-1]
    assert failovers == 1
    assert (logits[0, 0] - expected).abs().max() < 1e-4
