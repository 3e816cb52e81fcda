"""--mask-special beyond the single-site agreement with sae_lens (tests/core/test_agreement_sae_lens.py): the flag's
values and legacy spelling, a joint run's masked patching against TransformerLens hooks written the way
sae_lens's get_recons_loss writes them, and the single-token modes' rows."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from klgap.errors import KlgapError
from klgap.job import loading
from klgap.job.cells import prepare
from klgap.plan.config import RunConfig
from klgap.plan.sites import hook_name
from tests.core.test_agreement_sae_lens import CTX_LEN, TOL, hooked_transformer, write_documents
from tests.helpers import random_sae, run_config

SEPARATOR = 256  # the tiny models' byte tokenizer: BOS = EOS = 256


def test_values_and_the_legacy_key():
    assert RunConfig(model="m").mask_special == "all"
    with pytest.raises(KlgapError, match="unknown mask-special 'sometimes'.*valid: all, first, none"):
        RunConfig(model="m", mask_special="sometimes").validate()
    with pytest.warns(DeprecationWarning, match="mask_special = 'none'"):
        assert RunConfig.from_dict({"model": "m", "include_first_position": True}).mask_special == "none"
    with pytest.warns(DeprecationWarning):
        assert RunConfig.from_dict({"model": "m", "include-first-position": False}).mask_special == "first"
    with pytest.raises(KlgapError, match="old name of 'mask_special'"):
        RunConfig.from_dict({"model": "m", "include_first_position": True, "mask_special": "all"})
    assert RunConfig(model="m", mask_special="none").skip_first_position is False


def test_a_bad_value_on_the_command_line_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "klgap", "replicate", "--model", "tiny-gpt2", "--mask-special", "bos",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("klgap: error: unknown mask-special 'bos'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mask", ["all", "first"])
def test_joint_run_leaves_separators_unpatched_at_every_site(tmp_path, load_model, mask):
    """Four sites patched together: each site's SAE replaces only the kept tokens (torch.where(mask, x̂, x), as
    sae_lens's replacement hook), zero ablation every position of both; per-token KL against TransformerLens."""
    lm = load_model("tiny-gpt2")
    cells = [(site, layer) for site in ("mlp_out", "resid_pre") for layer in (0, 1)]  # --site x --layer
    folder = tmp_path / "saes"
    folder.mkdir()
    for k, (site, layer) in enumerate(cells):
        random_sae(folder / f"{site}-L{layer}.safetensors", lm.d_model, 4 * lm.d_model, hook_name(site, layer),
                   seed=k + 1)
    cfg = RunConfig(model="tiny-gpt2", site="mlp_out,resid_pre", layer="0,1", joint=True,
                    sae=str(folder / "{site}-L{layer}.safetensors"), tokens=8 * CTX_LEN, context_len=CTX_LEN,
                    batch_size=4, device="cpu", dtype="float64", dataset=write_documents(tmp_path / "docs.jsonl"),
                    interventions=["sae", "zero"], mask_special=mask)
    run_config(cfg, tmp_path / "run", progress=False)
    tokens = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    contexts = prepare(RunConfig(**{**cfg.to_dict(), "joint": False, "site": "mlp_out", "layer": 0,
                                            "sae": str(folder / "mlp_out-L0.safetensors")})).contexts
    keep = (contexts != SEPARATOR)  # [ctx pos]
    assert (~keep[:, 1:]).sum() >= 8
    if mask == "first":
        keep[:, 1:] = True
    saes = {hook_name(s, v): loading.load_sae(str(folder / f"{s}-L{v}.safetensors"), torch.device("cpu")).module
            for s, v in cells}
    tl = hooked_transformer(lm)

    def swap(acts, hook):
        x_hat = saes[hook.name].decode(saes[hook.name].encode(acts.float())).to(acts.dtype)
        return torch.where(keep[..., None], x_hat, acts)

    with torch.no_grad():
        clean = tl(contexts).log_softmax(-1)
        patched = {"sae": tl.run_with_hooks(contexts, fwd_hooks=[(h, swap) for h in saes]),
                   "zero": tl.run_with_hooks(contexts, fwd_hooks=[(h, lambda a, hook: torch.zeros_like(a)) for h in saes])}
    whole = tokens[tokens.intervention.isin(["sae", "zero"])]
    for name, logits in patched.items():
        kl = (clean.exp() * (clean - logits.log_softmax(-1))).sum(-1)
        rows = whole[whole.intervention == name].sort_values(["context", "position"])
        np.testing.assert_array_equal(rows[["context", "position"]].to_numpy(), np.argwhere(keep.numpy()))
        np.testing.assert_allclose(rows["kl"].to_numpy(), kl.numpy()[keep.numpy()], **TOL["float64"])


@pytest.mark.parametrize("mode", ["single_token", "many_samples"])
def test_single_token_modes_drop_masked_rows(tmp_path, load_model, mode):
    lm = load_model("tiny-gpt2")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook_name("mlp_out", 0), seed=2)
    base = dict(model="tiny-gpt2", sae=str(sae), tokens=16 * CTX_LEN, context_len=CTX_LEN, batch_size=8, device="cpu",
                dataset=write_documents(tmp_path / "docs.jsonl"), mode=mode, position=6, k=6, n_samples=4,
                interventions=["sae", "epsilon_random"])
    contexts = prepare(RunConfig(**base)).contexts
    t = 2 + int((contexts[:, 2:CTX_LEN - 7] == SEPARATOR).sum(0).argmax())  # a position t where separators stand
    base["position"] = t
    run_config(RunConfig(**base), tmp_path / "all", progress=False)
    run_config(RunConfig(**base, mask_special="first"), tmp_path / "first", progress=False)
    masked, plain = (pd.read_parquet(tmp_path / name / "tokens.parquet") for name in ("all", "first"))
    special_t = set(np.flatnonzero(contexts[:, t].numpy() == SEPARATOR))
    assert special_t and (plain["token_id"] == SEPARATOR).any()
    assert not (masked["token_id"] == SEPARATOR).any()
    assert not set(masked["context"]) & special_t  # a context whose patched token is a separator gives no row
    # every other row is the unmasked run's row, number for number
    key = ["intervention", "draw", "context", "position"]
    joined = masked.merge(plain, on=key, suffixes=("", "_plain"))
    assert len(joined) == len(masked)
    np.testing.assert_array_equal(joined["kl"], joined["kl_plain"])
