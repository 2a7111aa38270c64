"""A hop that stops answering without closing anything (its process
stopped: a hung GPU, a frozen machine) is a failed hop once the step
timeout passes, whether it is the hop that pushes or the hop pushed to;
generation goes on elsewhere with exactly the tokens of a fault-free run,
and each stopped hop costs one step timeout: its ban running out does not
make it routable again, only an answer to a probe would."""

from __future__ import annotations

import logging
import os
import signal

import libpipe
from libpipe.client import RetryPolicy

from .conftest import LocalModel

PROMPT = [4, 8, 15, 16, 23]
NEW_TOKENS = 20
# Token counts at which a hop of the route in use is stopped: first the
# hop pushed to, then (on the new route) the hop that pushes.
STOP_AT = {6: 1, 12: 0}
# Far longer than a decode step of the test model on a loaded machine (a
# step that still took longer would only cost one more failover).
STEP_TIMEOUT = 2.5


async def test_stopped_hops_time_out_and_are_replaced(
    model_dir, spawn, local_model: LocalModel, caplog
):
    caplog.set_level(logging.INFO, logger="libpipe.client")
    servers = spawn([((0, 4), ()), ((0, 4), ()), ((4, 8), ()), ((4, 8), ())])
    expected = local_model.greedy(PROMPT, NEW_TOKENS)
    by_peer = {s.peer_id: s for s in servers}
    policy = RetryPolicy(step_timeout=STEP_TIMEOUT, backoff_base=0.01)
    stopped = []
    try:
        async with libpipe.Client(
            model_dir, [s.address for s in servers], insecure=True, retry=policy
        ) as client:
            tokens = []
            async for token in client.stream(PROMPT, max_new_tokens=NEW_TOKENS, stop_tokens=()):
                tokens.append(token)
                if len(tokens) in STOP_AT:
                    peer = client.last_route[STOP_AT[len(tokens)]].peer_id
                    os.kill(by_peer[peer].process.pid, signal.SIGSTOP)
                    stopped.append(peer)
            reasons = [client.view.ban_reason(peer) for peer in stopped]
            route = [hop.peer_id for hop in client.last_route]
    finally:
        for server in servers:
            server.kill()
    assert tokens == expected
    assert len(stopped) == 2 and all(reasons), reasons
    assert not set(route) & set(stopped)
    # Routed to once each: banned by a failed step once, never again (a
    # refresh's ping may ban it again, which costs no step).
    step_bans = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("banned") and "ping failed" not in r.getMessage()
    ]
    for peer in stopped:
        assert sum(m.startswith(f"banned {peer[:12]} ") for m in step_bans) == 1, step_bans
