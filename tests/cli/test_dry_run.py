"""`--dry-run` as a user meets it: the default SAE named, every hub need listed, an SAE of another model warned
about, site/layer from the SAE shown, a bad SAE path refused (exit 2)."""

from __future__ import annotations

import json

from safetensors.torch import save_file

from klgap.cli.main import main
from tests.helpers import random_sae


def _directory():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def test_the_issue_command_names_the_default_sae_its_hub_repo_and_warns_of_the_deduped_weights(capsys):
    argv = ["replicate", "--model", "pythia-70m", "--site", "mlp_out", "--layer", "0", "--dry-run"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    release = _directory()["pythia-70m-deduped-mlp-sm"]
    assert release.model == "pythia-70m-deduped"  # what the warning compares with the requested model
    assert ("mlp_out L0: SAE sae_lens:pythia-70m-deduped-mlp-sm/blocks.0.hook_mlp_out, the default (no --sae "
            "given): checked by sae_lens") in captured.out
    assert f"SAE weights: the Hugging Face hub or its cache (repo {release.repo_id})" in captured.out
    assert "model pythia-70m: the Hugging Face hub or its cache (repo EleutherAI/pythia-70m)" in captured.out
    assert "None" not in captured.out and "default for the site" not in captured.out
    assert captured.out.rstrip().endswith("ok: 1 run(s) check out, 1 warning(s) on stderr")
    assert ("klgap: warning: mlp_out L0: the SAE sae_lens:pythia-70m-deduped-mlp-sm/blocks.0.hook_mlp_out was "
            "trained on pythia-70m-deduped, not on pythia-70m") in captured.err


def test_the_matching_model_has_no_warning_and_a_study_names_each_default(capsys):
    argv = ["replicate", "--model", "pythia-70m-deduped", "--site", "mlp_out,attn_out", "--layer", "0,2",
            "--dataset", "hf:monology/pile-uncopyrighted", "--dry-run"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    for release, site in (("pythia-70m-deduped-mlp-sm", "mlp_out"), ("pythia-70m-deduped-att-sm", "attn_out")):
        for layer in (0, 2):
            assert f"{site} L{layer}: SAE sae_lens:{release}/blocks.{layer}.hook_{site}, the default" in captured.out
        assert f"(repo {_directory()[release].repo_id})" in captured.out
    assert "dataset hf:monology/pile-uncopyrighted: the Hugging Face hub" in captured.out
    assert captured.out.rstrip().endswith("ok: 4 run(s) check out")


def test_site_and_layer_taken_from_the_sae_are_printed(capsys):
    assert main(["replicate", "--model", "gpt2", "--sae", "sae_lens:gpt2-small-res-jb/blocks.3.hook_resid_pre",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  resid_pre L3 (site and layer from the SAE): SAE sae_lens:gpt2-small-res-jb/blocks.3.hook_resid_pre" in out
    assert "None" not in out


def test_a_model_whose_adapter_names_no_sae_lens_models_says_so(capsys):
    assert main(["replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--dataset", "random",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mlp_out L0: SAE: the default for the site, named once tiny-gpt2 loads (its adapter names no sae_lens" in out


def test_no_known_default_fails_the_dry_run_as_the_run_would(capsys):
    assert main(["replicate", "--model", "gpt2", "--site", "mlp_out", "--layer", "40", "--dry-run"]) == 2
    assert "no --sae given and no pretrained SAE is known for gpt2 blocks.40.hook_mlp_out" in capsys.readouterr().err


def test_an_sae_file_from_another_model_is_a_warning_and_its_own_model_is_not(tmp_path, capsys):
    sae = random_sae(tmp_path / "plain.safetensors", 64, 128, "blocks.1.hook_resid_pre")
    from safetensors.torch import load_file

    tensors = load_file(str(sae))
    for model_name, warned in (("tiny-llama", True), ("tiny-gpt2", False)):
        path = tmp_path / f"{model_name}.safetensors"
        save_file(tensors, str(path), metadata={"hook_name": "blocks.1.hook_resid_pre", "model_name": model_name})
        assert main(["replicate", "--model", "tiny-gpt2", "--sae", str(path), "--dataset", "random", "--dry-run"]) == 0
        captured = capsys.readouterr()
        assert "resid_pre L1 (site and layer from the SAE)" in captured.out
        assert (f"the SAE {path} was trained on tiny-llama, not on tiny-gpt2" in captured.err) is warned
        assert ("1 warning(s) on stderr" in captured.out) is warned


def test_a_bad_bare_sae_path_is_an_error_in_a_dry_run(tmp_path, capsys):
    base = ["replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--dataset", "random", "--dry-run"]
    assert main([*base, "--sae", str(tmp_path / "missing")]) == 2
    assert "is neither an existing path nor LOADER:ARG" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*base, "--sae", str(empty)]) == 2
    assert f"no SAE loader recognises {str(empty)!r}" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cfg.json").write_text(json.dumps({"d_in": 64}))  # the loader's check reads it; d_sae is missing
    (broken / "sae_weights.safetensors").write_bytes(b"never read by check")
    assert main([*base, "--sae", str(broken)]) == 2
    assert "cfg.json lacks d_sae" in capsys.readouterr().err


def test_a_config_that_trains_its_sae_still_accepts_the_missing_folder(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'model = "tiny-gpt2"\nsite = "mlp_out"\nlayer = 0\ndataset = "random"\n'
                      f'sae = "{tmp_path / "to-train"}"\n[train_sae]\ntokens = 4000\nsteps = 3\n')
    assert main(["replicate", "--config", str(config), "--dry-run"]) == 0
    assert "not there yet (trained or copied before the run?)" in capsys.readouterr().out
