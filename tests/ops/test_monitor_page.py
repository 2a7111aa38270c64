"""The monitor page end to end in headless Chromium: it loads, shows the
servers of a running swarm, and updates in place when one is killed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trio

from libpipe.monitor import Monitor
from libpipe.net import ConnectionPool, Security

from . import _cdp

pytestmark = pytest.mark.skipif(
    not _cdp.available(), reason=f"{_cdp.CHROMIUM} is absent (apt-get install chromium)"
)

# What the test reads off the page: rows, bars, events, status, poll count.
PAGE_STATE = """document.getElementById('status') && JSON.stringify({
  rows: [...document.querySelectorAll('#servers tbody tr')].map(r => r.dataset.peer),
  unreachable: [...document.querySelectorAll('#servers tbody tr.unreachable')].map(
      r => r.dataset.peer),
  bars: [...document.querySelectorAll('#coverage g.server')].map(g => g.dataset.peer),
  blocks: [...document.querySelectorAll('#coverage g.block')].map(g => +g.dataset.servers),
  events: [...document.querySelectorAll('#events li[data-kind]')].map(
      li => [li.dataset.kind, li.textContent]),
  status: document.getElementById('status').dataset.state,
  polls: +document.body.dataset.polls,
  marker: window.__testMarker || null,
})"""
# Set `LIBPIPE_MONITOR_SCREENSHOT=docs/monitor.png` to refresh the picture in docs/.
SCREENSHOT_ENV = "LIBPIPE_MONITOR_SCREENSHOT"


async def read_page(page: _cdp.Page) -> dict | None:
    """The page's state, or None while it is still loading."""
    raw = await page.evaluate(PAGE_STATE)
    return json.loads(raw) if raw else None


async def wait_page(page: _cdp.Page, predicate, limit: float = 20.0) -> dict:
    with trio.fail_after(limit):
        while True:
            state = await read_page(page)
            if state is not None and predicate(state):
                return state
            await trio.sleep(0.1)


@pytest.mark.slow
async def test_page_shows_the_swarm_and_updates_when_a_server_dies(live_swarm, tmp_path):
    spans = [(0, 5), (5, 12), (0, 7), (7, 12), (3, 9)]
    throughputs = [12.0, 30.0, 44.0, 18.0, 25.0]
    nodes = [
        await live_swarm.add(span, throughput=t) for span, t in zip(spans, throughputs, strict=True)
    ]
    await live_swarm.converge()
    ids = {n.node.peer_id for n in nodes}
    async with ConnectionPool(Security.insecure()) as pool, trio.open_nursery() as nursery:
        monitor = Monitor(pool, [nodes[0].address], interval=0.3, timeout=1.0)
        host, port = await nursery.start(monitor.serve, 0)
        async with _cdp.open_page(f"http://{host}:{port}/", tmp_path / "profile") as page:
            state = await wait_page(page, lambda s: set(s["rows"]) == ids)
            assert set(state["bars"]) == ids
            assert state["status"] == "live"
            assert state["blocks"] == [2, 2, 2, 3, 3, 3, 3, 3, 3, 2, 2, 2]
            assert sum(kind == "join" for kind, _ in state["events"]) == 5
            # Marks this page instance: a reload would lose it.
            await page.evaluate("window.__testMarker = 'same page'")

            victim = nodes[1]  # holds 5:12 with the two others there: blocks stay covered
            victim.kill()
            short = victim.node.peer_id[:8]
            state = await wait_page(
                page,
                lambda s: (
                    victim.node.peer_id not in s["rows"]
                    and any(kind == "dead" and short in text for kind, text in s["events"])
                ),
            )
            assert state["marker"] == "same page"
            assert set(state["bars"]) == ids - {victim.node.peer_id}
            assert state["blocks"] == [2, 2, 2, 3, 3, 2, 2, 2, 2, 1, 1, 1]

            shot = await page.screenshot(tmp_path / "monitor.png")
            assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 10_000
            if os.environ.get(SCREENSHOT_ENV):
                shutil.copyfile(tmp_path / "monitor.png", Path(os.environ[SCREENSHOT_ENV]))
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_page_says_so_when_the_swarm_is_unreachable(nursery, tmp_path):
    async with ConnectionPool(Security.insecure()) as pool, trio.open_nursery() as inner:
        monitor = Monitor(pool, ["127.0.0.1:1"], interval=0.3, timeout=1.0)
        host, port = await inner.start(monitor.serve, 0)
        async with _cdp.open_page(f"http://{host}:{port}/", tmp_path / "profile") as page:
            state = await wait_page(page, lambda s: s["status"] == "error")
            assert state["rows"] == []
            text = await page.evaluate("document.getElementById('status').textContent")
            assert "cannot reach the swarm" in text
        inner.cancel_scope.cancel()
