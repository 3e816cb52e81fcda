"""report.html in a real browser: headless Chromium renders each kind of page at 1280 px wide; every image must
decode (naturalWidth > 0) and nothing may stick out sideways (the page never scrolls horizontally; wide tables
scroll inside their own box). Skipped, with the reason, where no Chromium is installed
(Debian: `apt-get install -y chromium`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from klgap.render.pages import rebuild
from tests.core.test_plots import EXPECTED, MODES, make_report, make_study, make_tokens, write_run

BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")
WIDTH = 1280
BROWSER = next((path for path in map(shutil.which, BROWSERS) if path), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason=f"no headless browser: none of {', '.join(BROWSERS)} is "
                                "on PATH (Debian: apt-get install -y chromium)")

# Run once the page has loaded; writes what it found into the DOM, which --dump-dom prints.
PROBE = """<pre id="klgap-probe"></pre><script>
window.addEventListener("load", () => {
  const body = document.body.getBoundingClientRect();
  const sticking = [];
  for (const el of document.body.querySelectorAll("*")) {
    if (el.id === "klgap-probe" || el.tagName === "SCRIPT" || el.closest(".table, pre")) continue;  // those scroll inside themselves
    const r = el.getBoundingClientRect();
    const spills = el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1;  // its content wider than itself
    if (r.right > body.right + 0.5 || r.left < body.left - 0.5 || spills) sticking.push(el.tagName + ": " + Math.round(r.right));
  }
  for (const box of document.querySelectorAll(".table, pre")) {
    const r = box.getBoundingClientRect();
    if (r.right > body.right + 0.5) sticking.push(box.className || box.tagName);
  }
  document.getElementById("klgap-probe").textContent = JSON.stringify({
    inner_width: window.innerWidth, scroll_width: document.documentElement.scrollWidth,
    images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
    sticking_out: sticking});
});
</script>"""


def probe(page: Path, tmp_path: Path) -> dict:
    """Open `page` (a copy with the probe script added) in headless Chromium at WIDTH px; return what it found."""
    probed = tmp_path / f"probed_{page.parent.name}.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--window-size={WIDTH},900", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="klgap-probe">(.*?)</pre>', done.stdout, re.S)
    assert found and found.group(1), f"the probe did not run: {done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def _check(page: Path, tmp_path: Path, n_images: int) -> None:
    seen = probe(page, tmp_path)
    assert seen["inner_width"] == WIDTH
    assert len(seen["images"]) == n_images
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    assert seen["scroll_width"] <= WIDTH, seen
    assert seen["sticking_out"] == [], seen["sticking_out"]


@pytest.mark.parametrize("mode", MODES)
def test_run_page_renders_in_a_browser(tmp_path, mode):
    report = make_report(mode, make_tokens(mode))
    wide = report.comparisons["theta_random"]  # a curve run's long names: the widest tables klgap writes
    for cos in (0.5, 0.55, 0.6, 0.65):
        report.comparisons[f"cosine_matched(cos={cos:g},norm_frac=0.9)"] = wide.model_copy(deep=True)
    report.notes = ["a note long enough to wrap: " + "word " * 60]
    root = write_run(tmp_path / mode, mode, report=report)
    rebuild(root)
    _check(root / "report.html", tmp_path, len(EXPECTED[mode]))


def test_study_page_renders_in_a_browser(tmp_path):
    base = make_report("all_tokens", make_tokens("all_tokens"))
    study = make_study([base.model_copy(update={"layer": layer}, deep=True) for layer in range(12)])
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "report.json").write_text(json.dumps(study.model_dump(exclude_unset=True)))
    rebuild(tmp_path / "study")
    _check(tmp_path / "study" / "report.html", tmp_path, 1)


def test_the_probe_sees_a_broken_image_and_a_page_too_wide(tmp_path):
    page = tmp_path / "bad" / "report.html"
    page.parent.mkdir()
    page.write_text('<!DOCTYPE html><html><head><style>body{max-width:1000px;margin:auto}</style></head><body>'
                    '<img src="data:image/png;base64,bm90IGEgcG5n" alt="broken"><p>' + "x" * 400 + "</p></body></html>")
    seen = probe(page, tmp_path)
    assert seen["images"] == [{"alt": "broken", "complete": True, "width": 0}]
    assert seen["scroll_width"] > WIDTH and seen["sticking_out"]
