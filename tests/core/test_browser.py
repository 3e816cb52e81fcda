"""report.html in a real browser: headless Chromium renders each kind of page at 1280 px wide; every image must
decode (naturalWidth > 0) and nothing may stick out sideways (the page never scrolls horizontally; wide tables
scroll inside their own box). Skipped, with the reason, where no Chromium is installed
(Debian: `apt-get install -y chromium`).

A measured 13-intervention run and a two-layer curve study (tiny-gpt2) are checked as a reader sees them: the
page opens with its finding, its links lead to pages that exist, and every figure passes
tests/core/figure_checks.py (no two series alike in colour and style, no near-black pair, no marker cut at an
edge, no axes mostly empty). Screenshots of the pages go to tmp_path, and to $KLGAP_SCREENSHOTS when it is set."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from klgap.render.pages import rebuild
from tests.core.figure_checks import check_figure
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
  const title = document.querySelector("h1");
  const lead = title ? title.nextElementSibling : null;
  document.getElementById("klgap-probe").textContent = JSON.stringify({
    lead: lead ? {tag: lead.tagName, cls: lead.className, text: lead.textContent} : null,
    links: [...document.querySelectorAll("a[href]")].map(a => a.getAttribute("href")),
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


def _check(page: Path, tmp_path: Path, n_images: int) -> dict:
    seen = probe(page, tmp_path)
    assert seen["inner_width"] == WIDTH
    assert len(seen["images"]) == n_images
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    assert seen["scroll_width"] <= WIDTH, seen
    assert seen["sticking_out"] == [], seen["sticking_out"]
    assert seen["lead"] is not None and seen["lead"]["cls"] == "lead", seen["lead"]  # the finding, under the title
    return seen


def screenshot(page: Path, tmp_path: Path, height: int = 2400) -> Path:
    """The page's first `height` px at WIDTH, as a PNG (kept in $KLGAP_SCREENSHOTS too, for a person to look at)."""
    shot = tmp_path / f"{page.parent.name}.png"
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--window-size={WIDTH},{height}", f"--screenshot={shot}", page.as_uri()]
    subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert shot.is_file() and shot.stat().st_size > 20_000, f"no screenshot of {page}"
    if os.environ.get("KLGAP_SCREENSHOTS"):
        keep = Path(os.environ["KLGAP_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / shot.name)
    return shot


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


THIRTEEN = ("sae,sae_norm_corrected,sae_norm,epsilon_random,theta_random,theta_random_xnorm,identity,zero,"
            "mean_ablation,sae_error_shuffled,epsilon_anisotropic,cosine_matched:cos=0.5,cosine_matched:cos=0.8")
SMALL = ["--tokens", "512", "--context-len", "32", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[Path, Path]:
    """A 13-intervention run and a curve study over layers 0 and 1 (one cosine: one curve point per layer), on
    tiny-gpt2 with random SAEs, as the command line writes them."""
    from klgap.cli.main import main
    from tests.helpers import random_sae

    root = tmp_path_factory.mktemp("browser")
    for layer in (0, 1):
        random_sae(root / f"resid_pre_{layer}.safetensors", 64, 256, f"blocks.{layer}.hook_resid_pre", seed=layer)
    run, study = root / "run13", root / "study"
    assert main(["replicate", "--model", "tiny-gpt2", "--sae", str(root / "resid_pre_1.safetensors"),
                 "--interventions", THIRTEEN, "--out", str(run), *SMALL]) == 0
    assert main(["curve", "--model", "tiny-gpt2", "--site", "resid_pre", "--layer", "0,1", "--cos", "0.7",
                 "--sae", str(root / "resid_pre_{layer}.safetensors"), "--out", str(study), *SMALL]) == 0
    return run, study


def test_a_13_intervention_run_reads_in_a_browser(measured, tmp_path):
    import klgap
    from klgap.figures.style import styles_for

    run, _ = measured
    result = klgap.load_run(run)
    assert len(result.report.interventions) == 13
    seen = _check(run / "report.html", tmp_path, 4)  # kl_bars, kl_hist, kl_by_position, robustness
    assert seen["lead"]["tag"] == "UL" and "cosine-matched noise at norm 1·‖x‖" in seen["lead"]["text"]
    assert re.search(r"the SAE's reconstruction \(explained variance -?[\d.]+, L0 [\d.]+(, kl_div_score -?[\d.]+, ce_loss_score (withheld|-?[\d.]+))?(, clean CE [\d.]+ nats/token)?\) moves the next-token "
                     "distribution", seen["lead"]["text"])
    figures = {kind: result.plot(kind) for kind in ("kl_bars", "kl_hist", "kl_by_position", "robustness")}
    for fig in figures.values():
        check_figure(fig)
    styles = styles_for(result.report.interventions)
    assert len({(s.color, s.linestyle, s.marker, s.hatch) for s in styles.values()}) == 13
    lines = {line.get_label(): line for line in figures["kl_by_position"].axes[0].get_lines()}
    bold = {name: lines[name].get_linewidth() for name in ("sae", "epsilon_random")}
    faint = [line for name, line in lines.items() if name not in bold]
    assert len(faint) == 11 and all(line.get_alpha() < 0.5 and line.get_linewidth() < min(bold.values())
                                    for line in faint)  # the SAE and its baseline stand out, the rest faint
    screenshot(run / "report.html", tmp_path)


def test_a_curve_study_reads_in_a_browser(measured, tmp_path):
    from klgap.figures.runs import kl_bars, study_robustness
    from klgap.report.read import load_report

    _, study = measured
    report = load_report(study)
    page = study / "report.html"
    seen = _check(page, tmp_path, 2)  # kl_bars and the robustness curves
    assert seen["lead"]["text"].startswith("At blocks.0.hook_resid_pre, cosine-matched noise at norm 0.9·‖x‖")
    assert seen["links"] == [f"{run.path}/report.html" for run in report.runs]
    assert all((study / link).is_file() for link in seen["links"])  # each site/layer's own page is there
    text = page.read_text()
    assert "sae vs 1 cosine_matched curve point at each of 2 sites/layers (2 tests)" in text
    assert "<th>explained variance</th>" in text and "<th>tokens (contexts)</th>" in text
    n_tokens = {run.n_tokens for run in report.runs}
    assert len(n_tokens) == 1  # both layers read the same tokens: each site's count, never their sum
    bars = kl_bars(report, None)
    assert f"{n_tokens.pop():,} tokens each" in bars._suptitle.get_text()
    for fig in (bars, study_robustness(report, None)):
        check_figure(fig)
    screenshot(page, tmp_path)
