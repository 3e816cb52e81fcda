"""examples/notebook.ipynb runs end to end (nbclient), as a user would run it."""

from __future__ import annotations

import os
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


def test_notebook_runs_on_the_tiny_model():
    notebook = _execute({"KLGAP_NOTEBOOK_QUICK": "1", "HF_HUB_OFFLINE": "1"})
    text = _outputs(notebook)
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
