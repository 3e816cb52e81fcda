"""examples/notebook.ipynb runs end to end (nbclient), as a user would run it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook.ipynb"


def _execute(env: dict[str, str]):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return notebook


def _outputs(notebook) -> str:
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)


def _cell(notebook, starts: str):
    return next(c for c in notebook.cells if c.cell_type == "code" and c.source.startswith(starts))


def test_notebook_runs_on_the_tiny_model():
    notebook = _execute({"KLGAP_NOTEBOOK_QUICK": "1", "HF_HUB_OFFLINE": "1"})
    text = _outputs(notebook)
    # a cell ending in a Result shows the page's opening: its finding, the key table, the figures inline
    shown = _cell(notebook, "result = klgap.measure")
    html = next(o["data"]["text/html"] for o in shown.outputs if "text/html" in o.get("data", {}))
    assert html.startswith('<div class="klgap-result">') and "<style>.klgap-result{" in html  # scoped: the notebook's look kept
    assert "klgap report: tiny-gpt2 · blocks.1.hook_mlp_out · all_tokens" in html  # named by name=
    assert re.search(r"the SAE&#x27;s reconstruction \(explained variance -?[\d.]+, L0 [\d.]+(, kl_div_score -?[\d.]+, ce_loss_score (withheld|-?[\d.]+))?(, clean CE [\d.]+ nats/token)?\) moves the "
                     "next-token distribution", html)
    assert "<th>ratio [95% CI]</th>" in html and "mlp_out L1" in html
    assert html.count("data:image/png;base64,") == 3 and "more figures: kl_hist, kl_by_position" in html
    plain = next(o["data"]["text/plain"] for o in shown.outputs if "text/plain" in o.get("data", {}))
    assert plain.startswith("klgap.Result: tiny-gpt2 · blocks.1.hook_mlp_out · all_tokens · 2,016 tokens")
    assert "site/layer" in plain and len(plain.splitlines()) == 5  # the finding and the key table, not the report
    # progress in an executed notebook: one line per measurement, no "IProgress not found", no line per update
    stderr = "".join(o["text"] for o in shown.outputs if o.get("name") == "stderr").splitlines()
    progress = [line for line in stderr if not line.startswith("quality note on the SAE")]
    assert len(progress) == 1 and progress[0].startswith("all_tokens mlp_out L1: 4 batches ... done in"), stderr
    # the example's random SAE gets its quality notes on stderr too, each as its page's opening block gives it
    assert len(stderr) - len(progress) == html.count("Quality note: ") > 0
    # (sae_lens's own import may warn "IProgress not found": it imports tqdm.autonotebook; no klgap cell does)
    klgap_cells = [c for c in notebook.cells if c.cell_type == "code" and "klgap." in c.source]
    assert not any("IProgress" in str(o.get("text", "")) for c in klgap_cells for o in c.outputs)
    assert "ratio=" in text and "ci_low=" in text  # result.ratio
    assert "kl_mean" in text and "epsilon_random" in text  # the summary table
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # kl_bars and the robustness curve are shown
    assert "skipped" in text


@pytest.mark.slow
def test_notebook_runs_with_the_smollm2_quickstart_sae():
    sae = Path("~/.cache/klgap/saes/smollm2-135m/blocks.15.hook_mlp_out").expanduser()
    if not sae.exists():
        pytest.skip("run the smollm2-135m-quickstart replication first (it trains this SAE)")
    assert "ratio=" in _outputs(_execute({"HF_HUB_OFFLINE": "1"})).split("quickstart")[-1]
