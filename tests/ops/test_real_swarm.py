"""The operator tools against real `libpipe-server` processes that chose their
own spans: `libpipe swarm` (block count from a server's `info`) and the
monitor page a server serves with `--monitor`, watched in headless Chromium
while one server is killed with SIGKILL (the in-process page test follows a
death all the way to gossip's verdict; here the page's first sign will do)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import trio

from libpipe.cli.main import main
from libpipe.model import write_random_checkpoint
from libpipe.server import ServerProcess

from . import _cdp
from .test_monitor_page import SCREENSHOT_ENV, wait_page

NUM_BLOCKS = 12
# A long rebalance period: this test is about the tools, so the spans stay put.
AUTO = [
    "--throughput", "100,1000", "--num-blocks", "4", "--gossip", "local",
    "--rebalance-period", "600",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("real") / "m",
        "llama",
        seed=9,
        overrides={"num_hidden_layers": NUM_BLOCKS},
    )


def monitor_url(server: ServerProcess) -> str:
    """The page address the server printed (it bound --monitor 0: any free port)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"monitor (http://127\.0\.0\.1:\d+/)", server.log_tail(100_000))
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no monitor line in the log:\n{server.log_tail()}")


@pytest.mark.slow
@pytest.mark.skipif(not _cdp.available(), reason=f"{_cdp.CHROMIUM} is absent")
async def test_servers_choose_spans_and_the_monitor_shows_a_death(model_dir, tmp_path, capsys):
    def start(*extra: str) -> ServerProcess:
        return ServerProcess.start(model_dir, blocks=None, extra_args=[*AUTO, *extra])

    first = await trio.to_thread.run_sync(start, "--monitor", "0")
    with first:
        second = await trio.to_thread.run_sync(start, "--peers", first.address)
        with second:
            # The second chose the leftmost window nobody held when it asked.
            assert [first.span, second.span] == [(0, 4), (4, 8)]
            expected = [1] * 8 + [0] * 4

            # Asked through the second server: the first's state reaches it by gossip.
            argv = ["swarm", "--peers", second.address, "--insecure", "--json"]
            with trio.fail_after(30):
                while True:
                    assert await trio.to_thread.run_sync(main, argv) == 0
                    (model,) = json.loads(capsys.readouterr().out)["models"]
                    if model["servers"] == expected:
                        break
                    await trio.sleep(0.2)
            assert model["num_blocks"] == NUM_BLOCKS  # from a server's `info`
            assert model["uncovered"] == [[8, 12]]

            url = monitor_url(first)
            async with _cdp.open_page(url, tmp_path / "profile") as page:
                ids = {first.peer_id, second.peer_id}
                # Servers gossip their span while they load it (joining):
                # the page may show the second as a row before it is online.
                state = await wait_page(
                    page, lambda s: set(s["rows"]) == ids and s["blocks"] == expected, limit=30
                )
                await page.evaluate("window.__testMarker = 'same page'")
                second.kill()
                # The monitor's own ping fails first; gossip declares it dead later.
                state = await wait_page(
                    page,
                    lambda s: (
                        (second.peer_id in s["unreachable"] or second.peer_id not in s["rows"])
                        and any(kind in ("unreachable", "dead") for kind, _ in s["events"])
                    ),
                    limit=40,
                )
                assert state["marker"] == "same page"
                assert first.peer_id in state["rows"]
                shot = await page.screenshot(tmp_path / "monitor.png")
                assert shot.startswith(b"\x89PNG")
                if os.environ.get(SCREENSHOT_ENV):
                    shutil.copyfile(tmp_path / "monitor.png", Path(os.environ[SCREENSHOT_ENV]))
