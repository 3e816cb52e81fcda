"""`klgap saes`: what sae_lens's bundled directory holds for a model, offline, with klgap's default marked."""

from __future__ import annotations

import json
import re

import pytest

from klgap.cli.main import main


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the directory ships with sae_lens: nothing to download


def _directory():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _json(capsys, *argv):
    assert main(["saes", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_rows_are_the_directory_entries_at_the_site_with_one_default_per_layer(capsys):
    rows = _json(capsys, "--model", "pythia-70m-deduped", "--site", "mlp_out")
    expected = {(release, sae_id) for release, lookup in _directory().items() if lookup.model == "pythia-70m-deduped"
                for sae_id in lookup.saes_map if re.fullmatch(r"blocks\.\d+\.hook_mlp_out(__.*)?", sae_id)}
    assert {(r["release"], r["sae_id"]) for r in rows} == expected and len(rows) == len(expected) > 0
    assert {r["site"] for r in rows} == {"mlp_out"}
    defaults = [r for r in rows if r["default"]]
    assert [r["layer"] for r in defaults] == list(range(6))  # pythia-70m-deduped has 6 blocks, one default each
    assert {r["release"] for r in defaults} == {"pythia-70m-deduped-mlp-sm"}
    first = defaults[0]
    assert first["spec"] == "sae_lens:pythia-70m-deduped-mlp-sm/blocks.0.hook_mlp_out"
    assert first["repo_id"] == _directory()["pythia-70m-deduped-mlp-sm"].repo_id


def test_the_default_marked_is_the_sae_a_dry_run_names(capsys):
    rows = _json(capsys, "--model", "gpt2", "--site", "mlp_out")
    marked = {r["layer"]: r["spec"] for r in rows if r["default"]}
    assert len(marked) == 12 and all(r["width"] == "32k" for r in rows if r["default"])
    assert main(["replicate", "--model", "gpt2", "--site", "mlp_out", "--layer", "7", "--dry-run"]) == 0
    assert f"mlp_out L7: SAE {marked[7]}, the default" in capsys.readouterr().out


def test_the_table_marks_the_default_and_says_the_note_of_a_stand_in_model(capsys):
    assert main(["saes", "--model", "pythia-70m", "--site", "attn_out"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"{len(lines) - 5} pretrained SAEs at attn_out for pythia-70m")
    starred = [line for line in lines if line.startswith("* ") and "hook_" in line]
    assert len(starred) == 6 and all("pythia-70m-deduped-att-sm" in line for line in starred)
    assert re.search(r"^\* pythia-70m-deduped-att-sm\s+blocks\.3\.hook_attn_out\s+attn_out\s+3\s+-$", out, re.M)
    assert "note: sae_lens has no SAEs for pythia-70m, so the pythia-70m-deduped release is used" in out


def test_without_a_model_it_lists_the_models_the_directory_knows(capsys):
    table = _json(capsys)
    gpt2 = next(r for r in table if r["model"] == "gpt2-small")
    releases = [r for r, lookup in _directory().items() if lookup.model == "gpt2-small"]
    assert sorted(gpt2["releases"]) == sorted(releases)
    assert gpt2["n_saes"] == sum(len(_directory()[r].saes_map) for r in releases)


def test_ids_without_a_hook_show_their_layer_and_a_site_filter_says_what_it_left_out(capsys):
    rows = _json(capsys, "--model", "gemma-2-2b")
    canonical = [r for r in rows if r["release"] == "gemma-scope-2b-pt-mlp-canonical"]
    assert canonical and all(r["site"] is None and r["width"] for r in canonical)
    assert {r["layer"] for r in canonical} == set(range(26))
    assert not any("transcoder" in r["release"] for r in rows)  # klgap measures SAEs, not transcoders
    assert main(["saes", "--model", "gemma-2-2b", "--site", "mlp_out"]) == 0
    assert "more SAEs whose id names no site" in capsys.readouterr().out


def test_a_model_klgap_knows_no_sae_lens_names_for_is_a_clear_error(capsys):
    assert main(["saes", "--model", "tiny-gpt2"]) == 2
    assert "model 'tiny-gpt2': its adapter names no sae_lens models" in capsys.readouterr().err
    assert main(["saes", "--model", "gpt2", "--site", "mlp"]) == 2
    assert "unknown site 'mlp'" in capsys.readouterr().err
    assert main(["saes", "--model", "smollm2-135m"]) == 0
    assert "lists no SAEs for smollm2-135m" in capsys.readouterr().out
