"""Headless Chromium driven over the DevTools protocol on a pipe (no extra packages).

``--remote-debugging-pipe`` makes Chromium read NUL-terminated JSON commands
on its fd 3 and write replies and events on its fd 4. We open one page
target, attach to it in flattened mode (one session id per page) and send
it ``Runtime.evaluate`` and ``Page.captureScreenshot``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,900",
    "--remote-debugging-pipe",
)


def available() -> bool:
    return shutil.which(CHROMIUM) is not None


class Page:
    def __init__(self, to_browser: trio.lowlevel.FdStream, from_browser: trio.lowlevel.FdStream):
        self._out = to_browser
        self._in = from_browser
        self._buffer = bytearray()
        self._next_id = 0
        self.session: str | None = None

    async def send(self, method: str, params: dict[str, Any] | None = None, *, page: bool = True):
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if page and self.session is not None:
            message["sessionId"] = self.session
        await self._out.send_all(json.dumps(message).encode() + b"\0")
        while True:
            reply = await self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = await self._in.receive_some(65536)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk
        raw, _, rest = bytes(self._buffer).partition(b"\0")
        self._buffer = bytearray(rest)
        return json.loads(raw)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> bytes:
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(result["data"])
        path.write_bytes(data)
        return data


def _high_fd(fd: int) -> int:
    """A copy of ``fd`` numbered 10 or above, so dup2 onto 3 and 4 in the child
    cannot overwrite the other end before it is copied."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


@asynccontextmanager
async def open_page(url: str, profile: Path):
    """A headless Chromium showing ``url``; closed (and reaped) on exit."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    child_in, child_out = _high_fd(to_child_r), _high_fd(from_child_w)

    def wire_pipes() -> None:
        os.dup2(child_in, 3)
        os.dup2(child_out, 4)

    process = await trio.lowlevel.open_process(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        pass_fds=(3, 4),
        preexec_fn=wire_pipes,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(child_in)
    os.close(child_out)
    to_browser = trio.lowlevel.FdStream(to_child_w)
    from_browser = trio.lowlevel.FdStream(from_child_r)
    page = Page(to_browser, from_browser)
    try:
        with trio.fail_after(30):
            target = await page.send("Target.createTarget", {"url": url}, page=False)
            attached = await page.send(
                "Target.attachToTarget",
                {"targetId": target["targetId"], "flatten": True},
                page=False,
            )
        page.session = attached["sessionId"]
        yield page
    finally:
        with trio.move_on_after(5):
            try:
                await page.send("Browser.close", page=False)
            except (RuntimeError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await to_browser.aclose()
        await from_browser.aclose()
