"""The console's page in a real headless Chromium (Debian ``chromium``, driven by Playwright's Python package; nothing
downloads a browser), against a running node, a real dcmtk storescp and Orthanc: log in, the overview, add a
destination, its Echo button with the peer up and down, a threshold change that the next SR carries, a failed send
retried from the Failed work page. Any JavaScript error on the page fails the test (a script error that removes
every button is what only a browser notices).

``CXR_SCREENSHOTS=FOLDER`` also saves the main pages as PNG there (docs/console/ holds the ones made so).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.report import read_report
from tests.conftest import free_port
from tests.peers import dcmsend, orthanc, wait_for
from tests.test_console_api import ADMIN, VIEWER, WEB_ON, console_config, healthy
from tests.test_e2e import NodeProcess, model_package, node_proc, scp_port  # noqa: F401 - fixtures
from tests.test_send import storescp
from tests.test_sites_node import copies

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package (the test extra)")
    if CHROMIUM is None:
        pytest.skip("chromium not installed (Debian package chromium; .ci/system-packages installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """One browser tab on the console that records every script error."""

    def __init__(self, browser: Any, port: int) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("console", self._console)
        self.page.set_default_timeout(30_000)
        self.page.goto(f"http://127.0.0.1:{port}/")

    def _console(self, msg: Any) -> None:
        # Chromium logs each non-2xx answer as "Failed to load resource": the 401 before the login and the 502 of
        # a failing echo are answers the page handles; anything else logged as an error is a fault of the page
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.errors.append(f"console error: {msg.text}")

    def login(self, who: tuple[str, str]) -> None:
        self.page.fill("#login-name", who[0])
        self.page.fill("#login-password", who[1])
        self.page.click("button[data-action=login]")
        self.page.wait_for_selector(f"#who:has-text('{who[0]}')")

    def view(self, name: str) -> None:
        self.page.click(f"#nav button[data-view='{name}']")
        self.page.wait_for_selector(f"#view h2:has-text('{name.split()[0]}')")

    def shot(self, name: str) -> None:
        folder = os.environ.get("CXR_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def test_an_administrator_runs_the_node_from_the_page(
    tmp_path: Path, browser: Any, model_package: Path, node_proc: list[NodeProcess]  # noqa: F811
) -> None:
    with orthanc(tmp_path / "pacs") as pacs:
        cfg, web = console_config(tmp_path, pacs.dicom_port, model_package)
        # failed sends wait long, so that the page's Retry is what sends them
        cfg.write_text(cfg.read_text().replace("retry_initial_s = 1\nretry_max_s = 2", "retry_initial_s = 600\n"
                                               "retry_max_s = 600"))
        node = NodeProcess(cfg, env=WEB_ON)
        node_proc.append(node)
        wait_for(lambda: healthy(web), timeout=60, what="the console")
        tab = Page(browser, web)
        page = tab.page
        page.wait_for_selector("#login:not([hidden])")
        tab.login(ADMIN)

        # the overview: every health check ok, the destination from node.toml, the model
        page.wait_for_selector("[data-check=database].ok")
        for check in ("disk", "model", "scp", "scheduler"):
            assert page.text_content(f"[data-check={check}]") == "ok"
        assert "tiny-test" in page.text_content("#view")
        tab.shot("overview")

        # add a destination that points at a real storescp; Echo succeeds, then fails with the peer stopped
        archive_port = free_port()
        tab.view("Destinations")
        form = "#add-destination"
        for key, value in {"name": "ARCHIVE", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                           "port": str(archive_port)}.items():
            page.fill(f"{form} input[name={key}]", value)
        page.click("button[data-action=add-destination]")
        page.wait_for_selector("#msg:has-text('added ARCHIVE')")
        page.wait_for_selector("button[data-action=echo][data-name=ARCHIVE]")
        with storescp(tmp_path, archive_port, aet="ARCHIVE"):
            page.click("button[data-action=echo][data-name=ARCHIVE]")
            result = page.wait_for_selector("[data-echo-result=ARCHIVE]:has-text('echo')")
            assert result.text_content().startswith("echo OK") and "ok" in (result.get_attribute("class") or "")
            tab.shot("destinations")
        page.click("button[data-action=echo][data-name=ARCHIVE]")
        result = page.wait_for_selector("[data-echo-result=ARCHIVE]:has-text('FAILED')")
        assert "ARCHIVE" in result.text_content() and result.get_attribute("class") == "bad"

        # change a threshold on the page; the next SR at the PACS carries it
        tab.view("Thresholds")
        page.fill("input[data-label=Tuberculosis]", "0.999")
        page.click("button[data-action=set-threshold][data-label=Tuberculosis]")
        page.wait_for_selector("[data-in-force=Tuberculosis]:has-text('0.9990')")
        assert "console override" not in page.text_content("#view")  # the page shows who and when instead
        assert "by ada" in page.text_content("#view")
        tab.shot("thresholds")
        files = copies(tmp_path / "images", 1)
        assert dcmsend(files, scp_port(cfg)).returncode == 0
        wait_for(lambda: len(pacs.instances()) >= 2, timeout=240, what="the SR and the overlay at the PACS")
        srs = [read_report(pydicom.dcmread(io.BytesIO(pacs.file(i["ID"])))) for i in pacs.instances()
               if pacs.tags(i["ID"])["Modality"] == "SR"]
        assert len(srs) == 1 and srs[0].findings[0].threshold == pytest.approx(0.999)
        assert "console override" in srs[0].findings[0].threshold_method

        # the sends to the stopped ARCHIVE failed; with it back, Retry on the Failed work page delivers them
        def failed_rows() -> int:
            tab.view("Failed work")
            return int(page.locator("button[data-action=retry-sends]").count())

        wait_for(lambda: failed_rows() == 2, timeout=120, what="two failed sends on the page")
        tab.shot("failed-work")
        with storescp(tmp_path, archive_port, aet="ARCHIVE") as received:
            for left in (1, 0):  # each press re-reads the list: one row fewer
                page.locator("button[data-action=retry-sends]").first.click()
                wait_for(lambda n=left: page.locator("button[data-action=retry-sends]").count() == n, timeout=30,
                         what=f"{left} failed send(s) left on the page")
            wait_for(lambda: len(list(received.iterdir())) == 2, timeout=120, what="the retried results")
        wait_for(lambda: failed_rows() == 0, timeout=60, what="no failed sends left")

        tab.view("Audit")
        audit = page.text_content("#view")
        assert "work_retried" in audit and "config_change" in audit and "login" in audit
        tab.shot("audit")
        tab.view("Results")
        assert str(pydicom.dcmread(files[0]).SOPInstanceUID) in page.text_content("#view")
        tab.shot("results")
        tab.view("Receiving")
        tab.shot("receiving")

        # a viewer sees the same pages with every change button disabled
        viewer = Page(browser, web)
        viewer.login(VIEWER)
        viewer.view("Destinations")
        changes = viewer.page.locator("button[data-action=add-destination], button[data-action=remove]")
        assert changes.count() == 3 and all(changes.nth(i).is_disabled() for i in range(changes.count()))
        assert viewer.page.locator("button[data-action=echo]").first.is_enabled()
        viewer.view("Thresholds")
        changes = viewer.page.locator("button[data-action=set-threshold], button[data-action=clear-threshold]")
        assert changes.count() == 2 and all(changes.nth(i).is_disabled() for i in range(changes.count()))
        assert tab.errors == [] and viewer.errors == [], tab.errors + viewer.errors
