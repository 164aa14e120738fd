"""A small W3C WebDriver client for Debian's chromedriver, for the console's browser tests.

Selenium would do the same, but it brings trio, which httpcore then imports in every
process that uses httpx (Flower's SuperNodes among them), and Selenium Manager, which
may download browsers. The tests need a handful of endpoints: a session with headless
Chromium, navigation, scripts that read the rendered page, a CDP command (to send the
token header), the window size, a screenshot and the performance log.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from free_common.data.debian_packages import CHROMEDRIVER, CHROMIUM


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Chromium:
    """Headless Chromium through chromedriver; `run` and `cdp` are its two verbs.

    Parameters
    ----------
    arguments
        Extra Chromium command-line arguments.
    """

    def __init__(self, arguments: list[str]) -> None:
        port = _free_port()
        self._driver = subprocess.Popen(
            [str(CHROMEDRIVER), f"--port={port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError("chromedriver did not come up")
            time.sleep(0.1)
        options = {
            "binary": str(CHROMIUM),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", *arguments],
        }  # fmt: skip
        capabilities = {
            "browserName": "chrome",
            "goog:chromeOptions": options,
            "goog:loggingPrefs": {"performance": "ALL"},
        }
        reply = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self._session = f"/session/{reply['sessionId']}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        reply = self._http.request(method, path, json=body)
        value = reply.json()["value"]
        if reply.status_code != 200:
            raise AssertionError(f"webdriver {method} {path}: {value}")
        return value

    def get(self, url: str) -> None:
        """Navigate to `url` and wait for the page to load."""
        self._call("POST", f"{self._session}/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run JavaScript in the page (the test's, not the console's) and return its value."""
        return self._call("POST", f"{self._session}/execute/sync", {"script": script, "args": args})

    def cdp(self, command: str, params: dict[str, Any]) -> Any:
        """Send one Chrome DevTools Protocol command."""
        body = {"cmd": command, "params": params}
        return self._call("POST", f"{self._session}/goog/cdp/execute", body)

    def screenshot(self, path: Path, most: int = 4000) -> None:
        """Save a PNG of the whole page (up to `most` pixels high) at `path`."""
        for _ in range(2):  # the page's height changes with the window's width once
            height = int(self.run("return document.documentElement.scrollHeight"))
            outer = int(self.run("return window.outerHeight - window.innerHeight"))
            rect = {"width": 1280, "height": min(height + outer, most)}
            self._call("POST", f"{self._session}/window/rect", rect)
        path.write_bytes(base64.b64decode(self._call("GET", f"{self._session}/screenshot")))

    def document_status(self, url: str) -> int | None:
        """The HTTP status the browser got for `url`, from the performance log."""
        for entry in self._call("POST", f"{self._session}/se/log", {"type": "performance"}):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.responseReceived":
                response = message["params"]["response"]
                if response["url"] == url:
                    return int(response["status"])
        return None

    def close(self) -> None:
        """End the session and stop chromedriver."""
        if hasattr(self, "_session"):
            self._http.delete(self._session)
        self._http.close()
        self._driver.terminate()
        self._driver.wait(timeout=30)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
