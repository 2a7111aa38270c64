"""A step cancelled by its caller (a timeout around ``session.step``) leaves
replies in flight; the next step must not take them for its own, nor blame
a healthy server for them."""

from __future__ import annotations

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
