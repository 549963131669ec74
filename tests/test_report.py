"""report.html: rendered from a real (tiny) audit, opened in headless Chromium through the DevTools
protocol: the page shows the verdict and its images decode, and the screenshot is not blank.

Chromium is a system package (``apt-get install chromium``; ``.ci/run`` installs it): without it
this test fails, it does not skip.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from mimic.audit import AuditRequest, run_audit
from mimic.config import load_config
from mimic.report import REPORT, render_report

pytestmark = pytest.mark.usefixtures("one_thread")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1200,2400"]


class Browser:
    """Headless Chromium driven over its DevTools websocket (no driver, no extra package)."""

    def __init__(self, profile: Path) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if exe is None:
            pytest.fail("chromium not found: install it (apt-get install chromium; .ci/run does)")
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if m := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = int(m.group(1))
            elif not line and self.proc.poll() is not None:
                break
        assert port, "chromium did not start its DevTools endpoint"
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        from websockets.sync.client import connect

        self.ws = connect(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"], max_size=None)
        self.n = 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg["result"]

    def evaluate(self, js: str):
        return self.call("Runtime.evaluate", expression=js, returnByValue=True)["result"]["value"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while self.evaluate("document.readyState") != "complete":
            assert time.monotonic() < deadline, "page did not load"
            time.sleep(0.1)

    def screenshot(self) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))).convert("RGB")

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def audited(tiny_teachers, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("audit")
    cfg = load_config(profile="tiny")
    res = run_audit(cfg, AuditRequest(str(tiny_teachers["teacher"]), "synthetic"), root=out / "cache", out_dir=out / "a",
                    progress=False)
    return res, out


def _page_facts(browser: Browser, path: Path) -> dict:
    browser.open(path.resolve().as_uri())
    return browser.evaluate("""JSON.stringify({
        verdict: document.getElementById('verdict').innerText,
        verdictColor: getComputedStyle(document.getElementById('verdict')).backgroundColor,
        text: document.body.innerText,
        images: Array.from(document.images).map(i => ({id: i.id, ok: i.complete && i.naturalWidth > 0}))})""")


def test_report_shows_verdict_scores_plots_and_lineage_in_chromium(audited, tmp_path):
    res, out = audited
    report = Path(res["out"]) / REPORT
    assert report.exists()  # written by the audit's output step, next to results.json
    browser = Browser(tmp_path / "profile")
    try:
        facts = json.loads(_page_facts(browser, report))
        assert facts["verdict"] == res["verdict"]["verdict"]
        assert res["teacher"]["fingerprint"] in facts["text"] and res["audit_key"] in facts["text"]
        assert f"{res['student_ca']:.1f}" in facts["text"]
        # every audit scans the teacher: its inverted trigger is shown next to the MI and loss plots
        assert {i["id"] for i in facts["images"]} == {"mi-img", "losses-img", "trigger-img"}, facts
        assert all(i["ok"] for i in facts["images"]), facts
        shot = browser.screenshot()
        colors = shot.getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 50, "screenshot is blank"
        green = (26, 127, 55) if res["verdict"]["passed"] else (180, 35, 24)
        assert any(c == green for _, c in colors), "the verdict banner is not visible"

        # the other verdict, with an inverted trigger: red banner, and the trigger image shown
        rejected = {**res, "verdict": {"verdict": "rejected", "passed": False, "reason": "student ASR 50.0% > 10%"}}
        trigger = io.BytesIO()
        Image.new("RGB", (32, 32), (250, 250, 250)).save(trigger, "PNG")
        images = {n: (Path(res["out"]) / f).read_bytes() for n, f in (("mi", "mi.png"), ("losses", "losses.png"))}
        page = tmp_path / "rejected.html"
        page.write_text(render_report(rejected, {**images, "trigger": trigger.getvalue()}))
        facts = json.loads(_page_facts(browser, page))
        assert facts["verdict"] == "rejected" and facts["verdictColor"] == "rgb(180, 35, 24)"
        assert "student ASR 50.0% > 10%" in facts["text"] and "Inverted trigger" in facts["text"]
        assert {i["id"] for i in facts["images"]} == {"mi-img", "losses-img", "trigger-img"} and all(i["ok"] for i in facts["images"])
    finally:
        browser.close()


def test_report_without_plots_or_scores_says_so():
    html = render_report({"verdict": {"verdict": "sanitized", "reason": "ok"}, "teacher": {"fingerprint": "ab" * 32,
                          "uri": "<script>x</script>.pt"}, "mi": {}, "weights": {}}, {})
    assert "CA/ASR not measured" in html and "MI per stage: not available" in html
    assert "<script>x" not in html and "&lt;script&gt;" in html  # user-controlled text is escaped
