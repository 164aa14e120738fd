"""Debian's headless Chromium drives the console of a real `free-server start`.

The server is the real command (`free-server start --console-port 0`) on a home that
holds finished rounds (`console_harness`). The browser is Chromium from Debian driven
by Debian's chromedriver, both at fixed paths (`make install` puts them there; nothing
downloads a browser), through the small WebDriver client in `webdriver.py`. Chromium
trusts the server's certificate by its public key hash alone
(``--ignore-certificate-errors-spki-list``).

Each page is loaded with the token, its figures are read from the rendered page, and a
full-page screenshot is saved in pytest's temporary folder, or in the folder named by
``FREE_CONSOLE_SCREENSHOTS`` (how ``docs/console-*.png`` were made).
"""

from __future__ import annotations

import base64
import hashlib
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
from webdriver import Chromium

from free_common.data.debian_packages import CHROMEDRIVER, CHROMIUM

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason="Debian's chromium and chromium-driver are not installed: run make install",
    ),
]

_CONSOLE = re.compile(r"console on (https://\S+/) ")
_TABLE = """return [...document.querySelectorAll('#' + arguments[0] + ' tr')].slice(1)
  .map(row => [...row.querySelectorAll('td')].map(cell => cell.innerText.trim()))"""


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


def _browser(served: Served, authorization: str | None) -> Chromium:
    spki = _spki_hash(served.finished.home.tls_cert.read_bytes())
    browser = Chromium([f"--ignore-certificate-errors-spki-list={spki}"])
    if authorization is not None:
        browser.cdp("Network.enable", {})
        browser.cdp("Network.setExtraHTTPHeaders", {"headers": {"Authorization": authorization}})
    return browser


@pytest.fixture(scope="module")
def browser(served: Served) -> Iterator[Chromium]:
    with _browser(served, f"Bearer {served.token}") as opened:
        yield opened


def _shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    named = os.environ.get("FREE_CONSOLE_SCREENSHOTS")
    folder = Path(named) if named else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _open(browser: Chromium, served: Served, path: str, shots: Path, name: str) -> str:
    """Load a page, save a full-page screenshot `name`.png, return the page's text."""
    browser.get(served.url.rstrip("/") + path)
    browser.screenshot(shots / f"console-{name}.png")
    return str(browser.run("return document.body.innerText"))


def _table(browser: Chromium, table_id: str) -> list[list[str]]:
    return list(browser.run(_TABLE, table_id))


def _text(browser: Chromium, element_id: str) -> str:
    return str(browser.run("return document.getElementById(arguments[0]).innerText", element_id))


def test_each_page_loads_with_the_stores_figures(
    served: Served, browser: Chromium, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shots = _shots(tmp_path_factory)
    finished = served.finished
    with finished.home.open_store() as store:
        sizes = {s.id: s.size for s in (store.submission(i) for i in range(1, 5))}

    text = _open(browser, served, "/", shots, "overview")
    cards = {
        card: _text(browser, f"card-{card}")
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
    # Columns 7 and 8: declared DP epsilon (none of these models declares one), reason.
    assert rows[0][6] == "refused" and rows[0][8] == REFUSAL
    assert all(r[7] == "" for r in rows)
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
    widths = browser.run(
        "return [...document.querySelectorAll('img.grid')].map(i => i.naturalWidth)"
    )
    assert len(widths) == 3 and all(w > 0 for w in widths)  # every grid loaded as an image

    text = _open(browser, served, f"/rounds/{finished.running_id}", shots, "round-running")
    assert "Round 3: running" in text and "2 / 4" in text and "62.5%" in text
    assert browser.run("return document.querySelectorAll('svg.curve polyline').length") == 1

    _open(browser, served, "/releases", shots, "releases")
    newest, first = _table(browser, "releases")
    assert newest[:3] == ["2", "1", "2"] and first[:3] == ["1", "", "1"]
    assert newest[6] == first[6] == "1, 2, 3"
    assert "recovery_seconds_per_teacher" in newest[7]
    assert re.search(r"\([+-]\d", newest[7]) and not re.search(r"\([+-]\d", first[7])
    links = browser.run(
        "return [...document.querySelectorAll('a')].filter(a => a.innerText == 'signed manifest')"
        ".map(a => a.href)"
    )
    assert [link.rsplit("/", 2)[1] for link in links] == ["2", "1"]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token"])
def test_the_browser_is_refused_without_the_token(
    served: Served, authorization: str | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with _browser(served, authorization) as browser:
        browser.get(served.url)
        assert browser.document_status(served.url) == 401
        assert "Overview" not in str(browser.run("return document.documentElement.outerHTML"))
        name = "no-token" if authorization is None else "bad-token"
        browser.screenshot(_shots(tmp_path_factory) / f"console-{name}.png")
