"""Real `libpipe-server` processes: the launcher, the ready file, SIGTERM."""

from __future__ import annotations

import pytest
import torch
import trio

from libpipe.errors import ConfigError, DrainingError
from libpipe.net import ConnectionPool, Security
from libpipe.server import ServerProcess

pytestmark = pytest.mark.slow

FAST = ["--throughput", "50,500", "--gossip", "local"]


async def test_launcher_starts_a_server_that_answers_and_drains_on_sigterm(gqa, tmp_path):
    with ServerProcess.start(
        gqa,
        blocks=(2, 6),
        extra_args=[*FAST, "--cache-dir", str(tmp_path), "--drain-grace", "20", "--threads", "1"],
    ) as server:
        assert server.span == (2, 6)
        assert "torch threads: 1 intra-op, 1 inter-op" in server.log_path.read_text()
        async with ConnectionPool(Security.insecure()) as pool:
            conn = await pool.get(server.address)
            info = (await conn.call("info", timeout=30)).meta
            assert info["peer_id"] == server.peer_id
            assert info["span"] == [2, 6]
            assert info["state"] == "online"
            assert info["throughput_decode"] == 50.0
            async with conn.open_stream(
                "inference", {"start": 2, "end": 6, "batch": 1, "max_length": 16}
            ) as stream:
                await stream.receive()
                server.terminate()
                # Draining: new work is refused, the open session goes on.
                with trio.fail_after(30):
                    while (await conn.call("info")).meta["state"] != "draining":
                        await trio.sleep(0.05)
                with pytest.raises(DrainingError):
                    await conn.call("forward", {"start": 2, "end": 6}, ())
                x = torch.randn(1, 3, 64)
                await stream.send({"position": 0}, (x,))
                reply = await stream.receive()
                assert reply.meta["position"] == 3
                await stream.close_send()
                with pytest.raises(trio.EndOfChannel):
                    await stream.receive()
        assert server.wait(timeout=60) == 0
        assert "draining" in server.log_tail()


def test_launcher_shows_why_a_server_did_not_start(gqa, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"(?s)status 2.*ConfigError: blocks 0:99 are not within the model's 8 blocks",
    ):
        ServerProcess.start(gqa, blocks=(0, 99), extra_args=FAST)
