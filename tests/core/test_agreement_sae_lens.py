"""klgap's KL and ΔCE against sae_lens's own evaluation code on a TransformerLens copy of the same model.

The tiny Hugging Face model klgap patches (through nnsight) is converted, weight for weight, into a
TransformerLens ``HookedTransformer`` (TransformerLens's own config and weight converters, no folding), and
``sae_lens.evals.get_recons_loss`` splices the same SAE in on the same tokens. klgap's `sae` and `zero`
interventions must give the same per-token KL(P_clean || P_patched) and CE change; `identity` (x' = x) must give 0,
which is what TransformerLens gives for a hook that returns its input.

Tolerance. The reference comparison runs both sides in float64 (klgap's `--dtype float64`; the SAE itself is
float32 on both sides, fed the same inputs): every per-token KL and ΔCE agrees to 1e-5 relative (measured worst: KL 8e-8, ΔCE 1.2e-6;
the residue comes from TransformerLens building rotary tables in float32, clean logits differ by
~1e-10). In float32, the two stacks' different kernels (fused vs einsum projections) leave ~2e-7 of noise in the
logits: per-token KL still agrees to 1e-4 relative above an absolute floor of 1e-6, and mean KL to 1e-4 relative
where the mean is ≥ 1e-3 (a zero-ablated attn_out in a random tiny model moves KL by only ~3e-4, where float32
noise alone is ~1e-4 relative).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from klgap.job import cells
from klgap.plan.config import RunConfig
from klgap.plan.sites import hook_name
from tests.helpers import pca_sae, random_sae, run_config, shrink_sae

N_CTX, CTX_LEN = 4, 24


def hooked_transformer(lm, dtype=torch.float64):
    """A TransformerLens HookedTransformer holding exactly the weights of klgap's tiny HF model."""
    import tempfile

    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_neox_weights

    converters = {"GPT2LMHeadModel": convert_gpt2_weights, "GPTNeoXForCausalLM": convert_neox_weights}
    arch = type(lm.hf_model).__name__
    hf_cfg = copy.deepcopy(lm.hf_model.config)
    hf_cfg.architectures = [arch]
    if arch == "GPT2LMHeadModel":
        hf_cfg.n_ctx = hf_cfg.n_positions  # transformers 5 dropped n_ctx; TransformerLens still reads it
    with tempfile.TemporaryDirectory() as tmp:
        hf_cfg.save_pretrained(tmp)
        cfg_dict = convert_hf_model_config(tmp)
    cfg = HookedTransformerConfig(**{**cfg_dict, "tokenizer_name": None, "device": "cpu", "dtype": dtype})
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        converters[arch](copy.deepcopy(lm.hf_model).to(dtype), cfg),
        fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    return model.to(dtype).eval()


CASES = [
    ("tiny-gpt2", "resid_pre", 1),
    ("tiny-gpt2", "mlp_out", 0),
    ("tiny-gpt2", "attn_out", 1),
    ("tiny-gpt2", "attn_z", 0),
    ("tiny-gpt2", "resid_post", 1),
    ("tiny-pythia", "resid_pre", 1),
    ("tiny-pythia", "mlp_out", 1),
    ("tiny-pythia", "attn_out", 0),
    ("tiny-pythia", "attn_z", 1),
]


TOL = {"float64": {"rtol": 1e-5, "atol": 1e-10}, "float32": {"rtol": 1e-4, "atol": 1e-6}}
DTYPED = [(*case, "float64") for case in CASES] + [("tiny-gpt2", "mlp_out", 0, "float32"), ("tiny-pythia", "resid_pre", 1, "float32")]


@pytest.mark.parametrize(("model", "site", "layer", "dtype"), DTYPED, ids=["-".join(map(str, c)) for c in DTYPED])
def test_kl_and_ce_agree_with_sae_lens_evals(tmp_path, load_model, model, site, layer, dtype):
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    lm = load_model(model)
    hook = hook_name(site, layer)
    sae_path = random_sae(tmp_path / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook, seed=layer + 7)
    cfg = RunConfig(
        model=model, sae=str(sae_path), tokens=N_CTX * CTX_LEN, context_len=CTX_LEN, batch_size=2,
        device="cpu", dtype=dtype, dataset="random", interventions=["sae", "zero", "identity"], mask_special="none",
    )
    run_config(cfg, tmp_path / "run", progress=False)
    tokens = pd.read_parquet(tmp_path / "run" / "tokens.parquet").sort_values(["intervention", "context", "position"])
    prepared = cells.prepare(cfg)
    contexts = prepared.contexts  # [ctx pos], the exact tokens klgap measured

    tl_model = hooked_transformer(lm, getattr(torch, dtype))
    with torch.no_grad():
        clean_hf = prepared.model.hf_model(input_ids=contexts).logits
        clean_tl = tl_model(contexts)
        assert clean_hf.dtype == clean_tl.dtype == getattr(torch, dtype)
        # the conversion is faithful (float64: TransformerLens's rotary tables are float32, ~1e-10)
        assert (clean_hf - clean_tl).abs().max() < (1e-8 if dtype == "float64" else 1e-5)
        theirs = get_recons_loss(
            prepared.sae.module, tl_model, ActivationScaler(), contexts,
            compute_kl=True, compute_ce_loss=True, hook_name=hook,
        )

    def ours(name: str, column: str) -> np.ndarray:
        rows = tokens[tokens.intervention == name]
        assert len(rows) == N_CTX * CTX_LEN
        return rows[column].to_numpy().reshape(N_CTX, CTX_LEN)

    kl_sae, kl_zero = theirs["kl_div_with_sae"].numpy(), theirs["kl_div_with_ablation"].numpy()
    assert kl_sae.mean() > 1e-3  # the SAE really changes the output, so the comparison means something
    tol = TOL[dtype]
    np.testing.assert_allclose(ours("sae", "kl"), kl_sae, **tol)
    np.testing.assert_allclose(ours("zero", "kl"), kl_zero, **tol)
    assert ours("sae", "kl").mean() == pytest.approx(kl_sae.mean(), rel=1e-4)
    if dtype == "float64" or kl_zero.mean() >= 1e-3:
        assert ours("zero", "kl").mean() == pytest.approx(kl_zero.mean(), rel=1e-4)
    assert np.abs(ours("identity", "kl")).max() < tol["atol"]

    # CE: sae_lens's per-token loss at position p predicts token p+1 ([ctx, pos-1]); klgap's last position has none
    ce_clean = theirs["ce_loss_without_sae"].numpy()
    for name, key in (("sae", "ce_loss_with_sae"), ("zero", "ce_loss_with_ablation")):
        delta = theirs[key].numpy() - ce_clean
        got = ours(name, "ce_delta")
        assert np.isnan(got[:, -1]).all()
        np.testing.assert_allclose(got[:, :-1], delta, rtol=tol["rtol"], atol=10 * tol["atol"])


class _Store:
    """What sae_lens's downstream metrics read from an ActivationsStore: the exact contexts klgap measured."""

    def __init__(self, contexts: torch.Tensor) -> None:
        self.contexts, self.next = contexts, 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        batch = self.contexts[self.next : self.next + n]
        self.next += n
        return batch


@pytest.mark.parametrize(("model", "site", "layer"), [("tiny-gpt2", "resid_pre", 1), ("tiny-pythia", "mlp_out", 1)])
def test_sae_lens_scores_and_mean_ablation_agree_with_sae_lens_and_the_study(tmp_path, load_model, model, site, layer):
    """The report's kl_div_score / ce_loss_score are what sae_lens.evals.get_downstream_reconstruction_metrics
    computes on the same tokens; mean_ablation's KL is the study's mean_ablation_hook (error_eval.py:
    ``activation.mean((0, 1))`` over each batch) run through TransformerLens."""
    from functools import partial

    from sae_lens.evals import get_downstream_reconstruction_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    from klgap.report.read import load_report

    lm = load_model(model)
    hook = hook_name(site, layer)
    sae_path = random_sae(tmp_path / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook, seed=layer + 3)
    cfg = RunConfig(
        model=model, sae=str(sae_path), tokens=N_CTX * CTX_LEN, context_len=CTX_LEN, batch_size=2, device="cpu",
        dtype="float64", dataset="random", interventions=["sae", "zero", "mean_ablation"], mask_special="none",
    )
    run_config(cfg, tmp_path / "run", progress=False)
    report = load_report(tmp_path / "run")
    prepared = cells.prepare(cfg)
    contexts = prepared.contexts
    tl_model = hooked_transformer(lm)
    sae = prepared.sae.module
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        theirs = get_downstream_reconstruction_metrics(
            sae, tl_model, _Store(contexts), ActivationScaler(), compute_kl=True, compute_ce_loss=True,
            n_batches=1, eval_batch_size_prompts=N_CTX,
        )
    assert abs(theirs["kl_div_score"]) > 0.05 and theirs["kl_div_score"] < 0.999  # not trivially 0 or 1 (a random SAE may do worse than zero)
    assert report.sae_lens_scores is not None
    assert report.sae_lens_scores.kl_div_score == pytest.approx(theirs["kl_div_score"], rel=1e-6)
    assert_ce_loss_score(report, tmp_path / "run", theirs)

    def mean_ablation_hook(activation, hook):  # the study's hook (error_eval.py), pos=None
        activation[:] = activation.mean((0, 1), keepdim=True).expand_as(activation)
        return activation

    kl_study = []
    with torch.no_grad():
        for start in range(0, N_CTX, cfg.batch_size):  # klgap's batches: the mean is over each batch's tokens
            batch = contexts[start : start + cfg.batch_size]
            clean = tl_model(batch).log_softmax(-1)
            patched = tl_model.run_with_hooks(batch, fwd_hooks=[(hook, partial(mean_ablation_hook))]).log_softmax(-1)
            kl_study.append((clean.exp() * (clean - patched)).sum(-1))
    tokens = pd.read_parquet(tmp_path / "run" / "tokens.parquet").sort_values(["intervention", "context", "position"])
    ours = tokens[tokens.intervention == "mean_ablation"]["kl"].to_numpy().reshape(N_CTX, CTX_LEN)
    study = torch.cat(kl_study).numpy()
    assert study.mean() > 1e-3
    np.testing.assert_allclose(ours, study, **TOL["float64"])


def assert_ce_loss_score(report, run_dir, theirs) -> None:
    """ce_loss_score is sae_lens's, or withheld (None) exactly when the interval of CE_zero − CE_clean (zero's mean
    ΔCE) contains 0; either way the score klgap's means give is sae_lens's (a random tiny model's CE barely moves
    under zero ablation, so its score is often withheld)."""
    scores, zero = report.sae_lens_scores, report.comparisons["zero"].ce_delta_baseline
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    mean = {name: np.nanmean(tokens[tokens.intervention == name]["ce_delta"].to_numpy(np.float64))
            for name in ("sae", "zero")}
    assert (mean["zero"] - mean["sae"]) / mean["zero"] == pytest.approx(theirs["ce_loss_score"], rel=1e-5)
    denominator = theirs["ce_loss_with_ablation"] - theirs["ce_loss_without_sae"]
    assert zero.mean == pytest.approx(denominator, rel=1e-5)
    # the absolute CE losses are sae_lens's too: the clean CE (parts' ce_clean) and clean CE + mean ΔCE
    assert report.ce_clean.mean == pytest.approx(theirs["ce_loss_without_sae"], rel=1e-6)
    assert scores.ce_loss_with_sae == pytest.approx(theirs["ce_loss_with_sae"], rel=1e-6)
    assert scores.ce_loss_with_ablation == pytest.approx(theirs["ce_loss_with_ablation"], rel=1e-6)
    if zero.ci_low <= 0 <= zero.ci_high:
        assert scores.ce_loss_score is None and scores.ce_loss_score_ci is None
        assert "contains 0" in scores.ce_loss_score_withheld
    else:
        assert scores.ce_loss_score_withheld is None
        assert scores.ce_loss_score == pytest.approx(theirs["ce_loss_score"], rel=1e-5)
        low, high = scores.ce_loss_score_ci
        assert low <= scores.ce_loss_score <= high
    low, high = scores.kl_div_score_ci
    assert low <= scores.kl_div_score <= high


def write_documents(path, n_docs: int = 48) -> str:
    """A .jsonl of short documents: the text source packs them with the tokenizer's EOS between them, so most
    contexts hold separators after position 0."""
    import json

    words = ["the", "river", "ran", "past", "a", "mill", "where", "bread", "was", "made", "each", "day"]
    lines = [json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(2 + i % 4))})
             for i in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return f"text:{path}"


MASKED = [("tiny-gpt2", "resid_pre", 1, "float32"), ("tiny-gpt2", "mlp_out", 0, "float64"),
          ("tiny-pythia", "resid_pre", 1, "float32")]


@pytest.mark.parametrize(("model", "site", "layer", "dtype"), MASKED, ids=["-".join(map(str, c)) for c in MASKED])
def test_mask_special_all_is_sae_lens_ignore_tokens(tmp_path, load_model, model, site, layer, dtype):
    """``--mask-special all`` (the default) on packed contexts with separators inside them: the SAE leaves every
    special token unpatched and no row measures one, per token what sae_lens's ``get_recons_loss(ignore_tokens=
    get_special_token_ids(tokenizer))`` gives (run_evals' default), zero ablation at every position included."""
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.util import get_special_token_ids

    from klgap.job.masks import special_token_ids

    lm = load_model(model)
    hook = hook_name(site, layer)
    sae_path = random_sae(tmp_path / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook, seed=layer + 5)
    n_ctx = 8
    cfg = RunConfig(model=model, sae=str(sae_path), tokens=n_ctx * CTX_LEN, context_len=CTX_LEN, batch_size=4,
                    device="cpu", dtype=dtype, dataset=write_documents(tmp_path / "docs.jsonl"),
                    interventions=["sae", "zero", "epsilon_random"])
    assert cfg.mask_special == "all"  # the default
    run_config(cfg, tmp_path / "run", progress=False)
    tokens = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    prepared = cells.prepare(cfg)
    contexts = prepared.contexts
    ignore = get_special_token_ids(prepared.model.tokenizer)
    assert special_token_ids(prepared.model.tokenizer) == tuple(sorted(ignore))
    special = torch.isin(contexts, torch.tensor(ignore))  # [ctx pos]
    keep = ~special.numpy()
    assert special[:, 0].all() and special[:, 1:].sum() >= n_ctx  # BOS, and separators inside the contexts

    with torch.no_grad():
        theirs = get_recons_loss(prepared.sae.module, hooked_transformer(lm, getattr(torch, dtype)),
                                 ActivationScaler(), contexts, compute_kl=True, compute_ce_loss=True,
                                 ignore_tokens=ignore, hook_name=hook)
    tol = TOL[dtype]
    ce_clean = theirs["ce_loss_without_sae"].numpy()
    for name, kl_key, ce_key in (("sae", "kl_div_with_sae", "ce_loss_with_sae"),
                                 ("zero", "kl_div_with_ablation", "ce_loss_with_ablation")):
        rows = tokens[tokens.intervention == name].sort_values(["context", "position"])
        assert not set(rows["token_id"]) & set(ignore)  # no separator is measured
        where = np.argwhere(keep)  # row-major: (context, position) of every kept token
        np.testing.assert_array_equal(rows[["context", "position"]].to_numpy(), where)
        np.testing.assert_allclose(rows["kl"].to_numpy(), theirs[kl_key].numpy()[keep], **tol)
        last = rows["position"].to_numpy() == CTX_LEN - 1
        assert np.isnan(rows["ce_delta"].to_numpy()[last]).all()
        delta = (theirs[ce_key].numpy() - ce_clean)[keep[:, :-1]]  # sae_lens: mask[:, :-1]
        np.testing.assert_allclose(rows["ce_delta"].to_numpy()[~last], delta, rtol=tol["rtol"], atol=10 * tol["atol"])
    # the masking matters here: patching the separators too (--mask-special first) gives other numbers
    assert np.abs(theirs["kl_div_with_sae"].numpy()[keep]).mean() > 1e-3
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["mask_special"] == "all"
    assert report["masked_tokens"].startswith("all: position 0 and the special token ids")
    top = [row["token_id"] for row in report["gap"]["top_tokens"]]  # the gap analysis's token table
    assert top and not set(top) & set(ignore)


@pytest.mark.parametrize(("model", "site", "layer"), [("tiny-gpt2", "resid_pre", 1), ("tiny-pythia", "mlp_out", 1)])
def test_default_scores_are_sae_lens_run_evals(tmp_path, load_model, model, site, layer):
    """With the defaults (``--mask-special all``, zero ablation at every position) the report's kl_div_score and
    ce_loss_score are what sae_lens's run_evals computes on the same contexts (its default exclude_special_tokens
    passes get_special_token_ids as ignore_tokens to get_downstream_reconstruction_metrics): the issue's tiny GPT-2
    printed 0.3881 / 0.4170 beside sae_lens's 0.3900 / 0.3897 while `zero` spared position 0."""
    from sae_lens.evals import get_downstream_reconstruction_metrics
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.util import get_special_token_ids

    from klgap.report.read import load_report

    lm = load_model(model)
    hook = hook_name(site, layer)
    sae_path = random_sae(tmp_path / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook, seed=layer + 3)
    n_ctx = 16
    cfg = RunConfig(model=model, sae=str(sae_path), tokens=n_ctx * CTX_LEN, context_len=CTX_LEN, batch_size=4,
                    device="cpu", dtype="float64", dataset=write_documents(tmp_path / "docs.jsonl"),
                    interventions=["sae", "zero"])
    run_config(cfg, tmp_path / "run", progress=False)
    report = load_report(tmp_path / "run")
    prepared = cells.prepare(cfg)
    sae = prepared.sae.module
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        theirs = get_downstream_reconstruction_metrics(
            sae, hooked_transformer(lm), _Store(prepared.contexts), ActivationScaler(), compute_kl=True,
            compute_ce_loss=True, n_batches=1, eval_batch_size_prompts=n_ctx,
            ignore_tokens=get_special_token_ids(prepared.model.tokenizer))
    assert 0.05 < abs(theirs["kl_div_score"]) and theirs["kl_div_score"] < 0.999
    assert report.sae_lens_scores.kl_div_score == pytest.approx(theirs["kl_div_score"], rel=1e-6)
    assert report.sae_lens_scores.n_contexts == n_ctx
    assert_ce_loss_score(report, tmp_path / "run", theirs)


@pytest.mark.parametrize(("model", "site", "layer"), [("tiny-gpt2", "resid_pre", 1), ("tiny-pythia", "mlp_out", 1)])
def test_explained_variance_and_its_legacy_form_agree_with_sae_lens(tmp_path, load_model, model, site, layer):
    """explained_variance and explained_variance_legacy are what sae_lens.evals.get_sparsity_and_variance_metrics
    computes on the same tokens (its eval batch = klgap's batch: the legacy form's mean is each batch's); fvu is
    sparsify's Σ‖e‖² / Σ‖y − ȳ‖² (SparseCoder.forward) over the same activations, all tokens one batch."""
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    from klgap.report.read import load_report

    lm = load_model(model)
    hook = hook_name(site, layer)
    cfg = RunConfig(model=model, sae=str(shrink_sae(tmp_path / "shrink.safetensors", lm.d_model, 0.8, hook)),
                    tokens=N_CTX * CTX_LEN, context_len=CTX_LEN, batch_size=2, device="cpu", dtype="float64",
                    dataset="random", interventions=["sae"], mask_special="none")
    contexts = cells.prepare(cfg).contexts
    tl_model = hooked_transformer(lm)
    with torch.no_grad():
        _, cache = tl_model.run_with_cache(contexts, names_filter=[hook])
    y = cache[hook].reshape(-1, lm.d_model).float()
    # an SAE from the top principal components: its error differs from token to token, so the two forms differ
    cfg.sae = str(pca_sae(tmp_path / "sae.safetensors", y, lm.d_model // 8, 4 * lm.d_model, hook))
    run_config(cfg, tmp_path / "run", progress=False)
    metrics = load_report(tmp_path / "run").sae_metrics
    prepared = cells.prepare(cfg)
    assert torch.equal(prepared.contexts, contexts)
    sae = prepared.sae.module
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        theirs, _ = get_sparsity_and_variance_metrics(
            sae, tl_model, _Store(contexts), ActivationScaler(), n_batches=N_CTX // cfg.batch_size,
            compute_l2_norms=False, compute_sparsity_metrics=False, compute_variance_metrics=True,
            compute_featurewise_density_statistics=False, eval_batch_size_prompts=cfg.batch_size, model_kwargs={},
        )
        sae_out = sae.decode(sae.encode(y)).double()
    y = y.double()
    sparsify_fvu = float((y - sae_out).pow(2).sum() / (y - y.mean(0)).pow(2).sum())  # sparsify's forward
    assert 0 < theirs["explained_variance"] < 0.99 and theirs["explained_variance_legacy"] != pytest.approx(
        theirs["explained_variance"], rel=1e-3)  # the two forms differ here, so agreeing with each one says something
    assert metrics.explained_variance == pytest.approx(theirs["explained_variance"], rel=1e-6)
    assert metrics.explained_variance_legacy == pytest.approx(theirs["explained_variance_legacy"], rel=1e-6)
    assert metrics.fvu == pytest.approx(sparsify_fvu, rel=1e-6)
    assert metrics.fvu == pytest.approx(1 - metrics.explained_variance, rel=1e-12)
