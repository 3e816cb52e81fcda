"""SAE loaders: plain safetensors, sae_lens folders, sae_lens releases (offline errors) and default SAEs."""

from __future__ import annotations

import pytest
import torch

from klgap.job.loading import load_sae
from klgap.errors import HubUnavailableError, KlgapError
from klgap_saes import save_safetensors_sae
from tests.helpers import FakeModel, run_config

CPU = torch.device("cpu")


def _weights(d_in=16, d_sae=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g),
            torch.randn(d_sae, generator=g), torch.randn(d_in, generator=g))


def test_safetensors_relu_matches_hand_computation(tmp_path):
    W_enc, W_dec, b_enc, b_dec = _weights()
    path = save_safetensors_sae(tmp_path / "s.safetensors", W_enc, W_dec, b_enc, b_dec, hook_name="blocks.2.hook_mlp_out")
    sae = load_sae(str(path), CPU)
    assert (sae.d_in, sae.d_sae, sae.hook_name, sae.architecture) == (16, 48, "blocks.2.hook_mlp_out", "standard")
    x = torch.randn(100, 16)
    feats = torch.relu((x - b_dec) @ W_enc + b_enc)  # sae_lens applies b_dec to the input
    torch.testing.assert_close(sae.encode(x), feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), feats @ W_dec + b_dec, rtol=1e-5, atol=1e-4)


def test_safetensors_jumprelu(tmp_path):
    W_enc, W_dec, b_enc, b_dec = _weights()
    threshold = torch.full((48,), 0.5)
    path = save_safetensors_sae(tmp_path / "j.safetensors", W_enc, W_dec, b_enc, b_dec, threshold=threshold)
    sae = load_sae(str(path), CPU)
    assert sae.architecture == "jumprelu" and sae.hook_name is None
    x = torch.randn(100, 16)
    pre = (x - b_dec) @ W_enc + b_enc
    feats = pre * (pre > threshold)
    torch.testing.assert_close(sae.encode(x), feats, rtol=1e-5, atol=1e-5)


def test_safetensors_errors(tmp_path):
    from safetensors.torch import save_file

    W_enc, W_dec, b_enc, b_dec = _weights()
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(KlgapError, match="lacks b_enc"):
        load_sae(str(tmp_path / "missing.safetensors"), CPU)
    save_file({"W_enc": W_enc, "W_dec": W_dec[:, :3].contiguous(), "b_enc": b_enc, "b_dec": b_dec}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(KlgapError, match=r"W_dec has shape \(48, 3\), expected \(48, 16\)"):
        load_sae(str(tmp_path / "shape.safetensors"), CPU)
    good = save_safetensors_sae(tmp_path / "good.safetensors", W_enc, W_dec, b_enc, b_dec)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(KlgapError, match="truncated.safetensors.*corrupt or truncated"):
        load_sae(str(truncated), CPU)
    with pytest.raises(KlgapError, match="'nope/sae' is neither an existing path"):
        load_sae("nope/sae", CPU)


def test_sae_lens_folder_round_trip(tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=16, d_sae=32)
    cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save_model(tmp_path / "folder")
    loaded = load_sae(str(tmp_path / "folder"), CPU)
    assert (loaded.hook_name, loaded.d_in, loaded.d_sae) == ("blocks.1.hook_resid_pre", 16, 32)
    x = torch.randn(10, 16)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    (tmp_path / "folder" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(KlgapError, match="could not be read"):
        load_sae(str(tmp_path / "folder"), CPU)


def test_sae_lens_release_errors_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KlgapError, match=r"unknown sae_lens release 'gpt2-small-res-jbb' \(did you mean 'gpt2-small-res-jb'\?\)"):
        load_sae("sae_lens:gpt2-small-res-jbb/blocks.0.hook_resid_pre", CPU)
    with pytest.raises(KlgapError, match=r"unknown SAE id in release gpt2-small-res-jb 'blocks.99.hook_resid_pre'"):
        load_sae("sae_lens:gpt2-small-res-jb/blocks.99.hook_resid_pre", CPU)
    with pytest.raises(HubUnavailableError, match=r"pythia-70m-deduped-mlp-sm/blocks.0.hook_mlp_out needs the Hugging Face hub"):
        load_sae("sae_lens:pythia-70m-deduped-mlp-sm/blocks.0.hook_mlp_out", CPU)


@pytest.mark.parametrize(
    "models,site,layer,expected",
    [
        (("pythia-70m-deduped",), "mlp_out", 0, "pythia-70m-deduped-mlp-sm/blocks.0.hook_mlp_out"),
        (("pythia-70m-deduped",), "attn_out", 1, "pythia-70m-deduped-att-sm/blocks.1.hook_attn_out"),
        (("gpt2-small",), "resid_pre", 6, "gpt2-small-res-jb/blocks.6.hook_resid_pre"),
        (("gpt2-small",), "attn_z", 3, "gpt2-small-hook-z-kk/blocks.3.hook_z"),
        (("gpt2-small",), "mlp_out", 2, "gpt2-small-mlp-out-v5-32k/blocks.2.hook_mlp_out"),
    ],
)
def test_default_sae(models, site, layer, expected):
    from klgap_saes.pretrained import SaeLensPretrainedLoader

    spec, note = SaeLensPretrainedLoader().default_sae(FakeModel(sae_lens_models=models), site, layer)
    assert spec == expected and expected.split("/")[0] in note


def test_no_default_for_unknown_model():
    from klgap_saes.pretrained import SaeLensPretrainedLoader

    assert SaeLensPretrainedLoader().default_sae(FakeModel(sae_lens_models=("smollm2-135m",)), "mlp_out", 0) is None


def test_res_jb_records_center_writing_weights():
    from klgap_saes.pretrained import release_overrides

    assert release_overrides()["gpt2-small-res-jb"]["center_writing_weights"] is True


def test_sae_lens_release_check_is_typed_and_offline(monkeypatch):
    from klgap.protocols import SAECheck
    from klgap_saes.pretrained import SaeLensPretrainedLoader

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checked = SaeLensPretrainedLoader().check("gpt2-small-res-jb/blocks.6.hook_resid_pre")
    assert checked == SAECheck(hook_name="blocks.6.hook_resid_pre", repo_id="jbloom/GPT2-Small-SAEs-Reformatted",
                               release="gpt2-small-res-jb", sae_id="blocks.6.hook_resid_pre", model="gpt2-small",
                               detail="sae_lens release gpt2-small-res-jb")


def test_sae_lens_id_that_is_no_hook_name_leaves_the_site_to_the_flags(monkeypatch):
    """Gemma Scope's ids (layer_3/width_16k/canonical) are not hook names: the check says no hook name, so
    --site/--layer place it (the README's torchrun example), where they once failed as an unreadable hook."""
    from klgap.plan.config import RunConfig
    from klgap.plan.resolve import resolve
    from klgap_saes.pretrained import SaeLensPretrainedLoader

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "gemma-scope-2b-pt-res-canonical/layer_3/width_16k/canonical"
    checked = SaeLensPretrainedLoader().check(spec)
    assert checked.hook_name is None and checked.sae_id == "layer_3/width_16k/canonical"
    assert checked.repo_id == "google/gemma-scope-2b-pt-res"
    plan = resolve(RunConfig(model="google/gemma-2-2b", site="resid_post", layer=3, sae=f"sae_lens:{spec}", device="cpu"))
    assert (plan.site, plan.layer) == ("resid_post", 3)


def _sae_lens_folder(path, d: int, hook: str, centred: bool):
    """A sae_lens folder whose SAE reconstructs 0.5·x (features relu(±x)); `centred`: trained with
    TransformerLens's center_writing_weights, as sae_lens's training runner records it."""
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=d, d_sae=2 * d, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = hook
    if centred:
        cfg.metadata.model_from_pretrained_kwargs = {"center_writing_weights": True}
    sae = StandardSAE(cfg)
    eye = torch.eye(d)
    sae.load_state_dict({"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d),
                         "W_dec": 0.5 * torch.cat([eye, -eye], 0), "b_dec": torch.zeros(d)})
    sae.save_model(str(path))
    return path


@pytest.mark.filterwarnings("ignore::UserWarning:sae_lens.*")
def test_a_sae_lens_folder_trained_centred_is_measured_centred(tmp_path, load_model):
    """center_resid comes from the folder's config; the engine centres resid sites only, and then measures the
    SAE on x - mean(x): ‖x_c‖ < ‖x‖ for every token of the same contexts."""
    import pandas as pd

    from klgap.plan.config import RunConfig

    d = load_model("tiny-gpt2").d_model
    plain = _sae_lens_folder(tmp_path / "plain", d, "blocks.1.hook_resid_pre", centred=False)
    centred = _sae_lens_folder(tmp_path / "centred", d, "blocks.1.hook_resid_pre", centred=True)
    mlp = _sae_lens_folder(tmp_path / "mlp", d, "blocks.1.hook_mlp_out", centred=True)
    assert (load_sae(str(plain), CPU).center_resid, load_sae(str(centred), CPU).center_resid) == (False, True)

    def run(sae, name):
        cfg = RunConfig(model="tiny-gpt2", sae=str(sae), tokens=2 * 16, context_len=16, batch_size=2, device="cpu",
                        dataset="random", interventions=["sae", "sae_norm_corrected"])
        report = run_config(cfg, tmp_path / name, progress=False)
        return report, pd.read_parquet(tmp_path / name / "tokens.parquet").query("intervention == 'sae'")

    (r_plain, t_plain), (r_centred, t_centred) = run(plain, "p"), run(centred, "c")
    assert (r_plain.centered_activations, r_centred.centered_activations) == (False, True)
    assert len(t_plain) == len(t_centred) == 2 * 15
    assert (t_centred.x_norm.to_numpy() < t_plain.x_norm.to_numpy()).all()
    assert r_centred.interventions["sae_norm_corrected"].kl_mean < 1e-6  # x_c + mean = x exactly
    assert run(mlp, "m")[0].centered_activations is False  # not a resid site
