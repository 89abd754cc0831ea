"""Headless Debian `chromium` driven through the DevTools protocol (aiohttp's websocket client):
open a page, wait for text to render, click, take a screenshot. No downloaded browser."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",  # the port chosen is written to DevToolsActivePort
]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One page target over a DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def text(self) -> str:
        return await self.evaluate("document.body ? document.body.innerText : ''") or ""

    async def wait_for(self, ready: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = await self.text()
            if ready(text) or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.5)

    async def wait_js(self, expression: str, timeout: float) -> Any:
        """Poll a JavaScript expression until it is truthy (or the time is up); its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            await asyncio.sleep(0.5)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


def _debug_port(profile: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    marker = profile / "DevToolsActivePort"
    while not marker.is_file() or not marker.read_text().strip():
        assert proc.poll() is None, "chromium exited at start"
        assert time.monotonic() < deadline, "chromium did not open its DevTools port"
        time.sleep(0.2)
    return int(marker.read_text().splitlines()[0])


async def _page_ws_url(port: int) -> str:
    async with aiohttp.ClientSession() as http:
        for _ in range(50):
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                pages = [t for t in await response.json() if t["type"] == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            await asyncio.sleep(0.2)
    raise AssertionError("chromium has no page target")


async def _drive(port: int, script: Callable[[Page], Any]) -> Any:
    url = await _page_ws_url(port)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, max_msg_size=64 * 1024**2) as ws,
    ):
        return await script(Page(ws))


def with_page(script: Callable[[Page], Any], *, size: tuple[int, int] = (1600, 1000)) -> Any:
    """Start headless chromium, run `async script(page)`, stop chromium; returns its result."""
    binary = chromium_binary()
    assert binary, "chromium is not installed (apt-get install -y chromium)"
    # Its helper processes may still write to the profile as they exit: cleanup errors are moot.
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        flags = [*FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"]
        proc = subprocess.Popen(
            [binary, *flags, "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its renderer and helper processes go with its group
        )
        try:
            port = _debug_port(Path(profile), proc)
            return asyncio.run(_drive(port, script))
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
