"""The user's path end to end: real ``libpipe-server`` processes with
``--adapters``, ``libpipe.Client.remote_blocks``; one server SIGKILLed
just as its backward is due."""

from __future__ import annotations

import pytest
import trio

from libpipe import Client
from libpipe.model import load_client_head, load_span
from libpipe.server import ServerProcess

from .test_remote_blocks import inputs, training_step
from .test_training_failover import recording

pytestmark = pytest.mark.slow


async def test_sigkill_mid_backward_with_an_adapter(checkpoint, adapters):
    ids, soft, deep = inputs(seed=6)
    whole = load_span(checkpoint, 0, 8, progress=False, adapters=[adapters["all"]])
    head = load_client_head(checkpoint, progress=False)
    expected = training_step(lambda x, p: whole(x, adapter="all", prompts=p), head, ids, soft, deep)

    def start(throughput: str) -> ServerProcess:
        args = ["--throughput", throughput, "--adapters", str(adapters["all"])]
        return ServerProcess.start(checkpoint, blocks=(0, 8), extra_args=args, timeout=120)

    fast, slow = await trio.to_thread.run_sync(lambda: (start("1000,1000000"), start("100,1000")))
    try:
        async with Client(checkpoint, [fast.address, slow.address], insecure=True) as client:
            blocks = client.remote_blocks(adapter="all")
            by_id = {s.peer_id: s for s in (fast, slow)}
            # The server the backward goes to is SIGKILLed as it is sent.
            calls = recording(
                blocks.chain, kill_before=("backward", lambda peer: by_id[peer].kill())
            )
            got = await trio.to_thread.run_sync(training_step, blocks, head, ids, soft, deep)
    finally:
        fast.close()
        slow.close()
    # Backward may go to either replica (servers keep nothing between passes).
    (_, victim, _, _), (_, other, _, _) = calls[1:]
    assert [m for m, _, _, _ in calls] == ["forward", "backward", "backward"]
    assert victim != other
    assert by_id[victim].returncode == -9
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max() <= 1e-6
