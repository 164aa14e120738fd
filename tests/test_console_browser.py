"""Debian's headless Chromium drives the console of a real `free-server start`.

The server is the real command (`free-server start --console-port 0`) on a home that
holds a finished round (`console_harness`). The browser is Chromium from Debian driven
by Debian's chromedriver, both found at fixed paths so Selenium Manager never looks
for (or downloads) one; `make install` puts them there. Chromium trusts the server's
certificate by its public key hash alone (``--ignore-certificate-errors-spki-list``).

Each page is loaded with the token, its figures are read from the rendered page, and a
full-page screenshot is saved in pytest's temporary folder, or in the folder named by
``FREE_CONSOLE_SCREENSHOTS`` (how ``docs/console-*.png`` were made).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from console_harness import REFUSAL, FinishedRound, console_token, finished_round_home
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from exchange_harness import BIN, CLI_ENV
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

from free_common.data.debian_packages import CHROMEDRIVER, CHROMIUM

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason="Debian's chromium and chromium-driver are not installed: run make install",
    ),
]

_CONSOLE = re.compile(r"console on (https://\S+/) ")
# Selenium Manager stays offline even if asked: the driver and browser paths are given.
os.environ["SE_OFFLINE"] = "true"


@dataclass
class Served:
    finished: FinishedRound
    url: str
    token: str
    process: subprocess.Popen[str]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    finished = finished_round_home(tmp_path_factory.mktemp("browser"))
    token = console_token(finished.home)
    command = [str(BIN / "free-server"), "start", "--home", str(finished.home.root)]
    command += ["--port", "0", "--no-flower", "--console-port", "0"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV
    )
    assert process.stdout is not None
    url = None
    for _ in range(6):
        line = process.stdout.readline()
        found = _CONSOLE.search(line)
        if found:
            url = found.group(1)
            break
    if url is None:
        process.kill()
        raise AssertionError(f"no console line from free-server start: {process.communicate()}")
    try:
        yield Served(finished, url, token, process)
    finally:
        process.terminate()
        process.communicate(timeout=30)


def _spki_hash(cert_pem: bytes) -> str:
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _browser(served: Served, authorization: str | None) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    spki = _spki_hash(served.finished.home.tls_cert.read_bytes())
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--ignore-certificate-errors-spki-list={spki}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    if authorization is not None:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": authorization}}
        )
    return driver


@pytest.fixture(scope="module")
def browser(served: Served) -> Iterator[WebDriver]:
    driver = _browser(served, f"Bearer {served.token}")
    yield driver
    driver.quit()


def _shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    named = os.environ.get("FREE_CONSOLE_SCREENSHOTS")
    folder = Path(named) if named else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _open(driver: WebDriver, served: Served, path: str, shots: Path, name: str) -> str:
    """Load a page, save a full-page screenshot `name`.png, return the page's text."""
    driver.get(served.url.rstrip("/") + path)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(600, min(int(height) + 40, 4000)))
    assert driver.save_screenshot(str(shots / f"console-{name}.png"))
    return str(driver.find_element("tag name", "body").text)


def _table(driver: WebDriver, table_id: str) -> list[list[str]]:
    rows = driver.find_elements("css selector", f"#{table_id} tr")
    return [[cell.text for cell in row.find_elements("css selector", "td")] for row in rows[1:]]


def test_each_page_loads_with_the_stores_figures(
    served: Served, browser: WebDriver, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shots = _shots(tmp_path_factory)
    finished = served.finished
    with finished.home.open_store() as store:
        sizes = {s.id: s.size for s in (store.submission(i) for i in range(1, 5))}

    text = _open(browser, served, "/", shots, "overview")
    cards = {
        card: browser.find_element("id", f"card-{card}").text
        for card in ("owners", "submissions", "rounds", "releases")
    }
    assert cards["owners"].startswith("2\nactive owner keys")
    assert cards["submissions"].startswith("3\naccepted") and "1 refused" in cards["submissions"]
    assert cards["rounds"].startswith("2\nfinished") and "1 running" in cards["rounds"]
    assert cards["releases"].startswith("2\nreleases")
    assert "2 / 4" in text  # the running round's live step

    _open(browser, served, "/owners", shots, "owners")
    owners = {row[0]: row for row in _table(browser, "owners")}
    assert set(owners) == {"alice", "bob"}
    assert owners["alice"][3:5] == ["2", "0"] and owners["bob"][3:5] == ["1", "1"]

    _open(browser, served, "/submissions", shots, "submissions")
    rows = _table(browser, "submissions")
    assert [int(r[0]) for r in rows] == [4, 3, 2, 1]
    assert {int(r[0]): int(r[2].replace(",", "")) for r in rows} == sizes
    assert rows[0][6] == "refused" and rows[0][7] == REFUSAL
    assert all(r[6] == "accepted" for r in rows[1:])

    _open(browser, served, "/rounds", shots, "rounds")
    rounds = {int(r[0]): r for r in _table(browser, "rounds")}
    assert rounds[1][1] == "finished" and rounds[1][8] == "1"
    assert rounds[2][1] == "finished" and rounds[2][8] == "2"
    assert rounds[3][1] == "running" and rounds[3][7] == "2 / 4 (meta)"

    text = _open(browser, served, f"/rounds/{finished.round_id}", shots, "round")
    assert "Round 2: finished" in text and "4 / 4" in text
    models = _table(browser, "models")
    assert sorted((m[0], m[1]) for m in models) == [("1", "alice"), ("2", "alice"), ("3", "bob")]
    grids = browser.find_elements("css selector", "img.grid")
    assert len(grids) == 3
    assert all(browser.execute_script("return arguments[0].naturalWidth", g) > 0 for g in grids)

    text = _open(browser, served, f"/rounds/{finished.running_id}", shots, "round-running")
    assert "Round 3: running" in text and "2 / 4" in text and "62.5%" in text
    assert browser.find_elements("css selector", "svg.curve polyline")

    _open(browser, served, "/releases", shots, "releases")
    newest, first = _table(browser, "releases")
    assert newest[:3] == ["2", "1", "2"] and first[:3] == ["1", "", "1"]
    assert newest[6] == first[6] == "1, 2, 3"
    assert "recovery_seconds_per_teacher" in newest[7]
    assert re.search(r"\([+-]\d", newest[7]) and not re.search(r"\([+-]\d", first[7])
    links = browser.find_elements("link text", "signed manifest")
    assert [a.get_attribute("href").rsplit("/", 2)[1] for a in links] == ["2", "1"]


def _document_status(driver: WebDriver, url: str) -> int | None:
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.responseReceived":
            response = message["params"]["response"]
            if response["url"] == url:
                return int(response["status"])
    return None


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token"])
def test_the_browser_is_refused_without_the_token(
    served: Served, authorization: str | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    driver = _browser(served, authorization)
    try:
        driver.get(served.url)
        assert _document_status(driver, served.url) == 401
        assert "Overview" not in driver.page_source
        name = "no-token" if authorization is None else "bad-token"
        driver.save_screenshot(str(_shots(tmp_path_factory) / f"console-{name}.png"))
    finally:
        driver.quit()
