"""The built-in perturbations (plugins/klgap_perturbations): geometry per token, randomness, edge cases."""

from __future__ import annotations

import math
from importlib.metadata import entry_points

import pytest
import torch

from klgap.errors import KlgapError, PluginError
from klgap.plugins.manager import PluginHost, registry
from klgap.protocols import FittablePerturbation, Perturbation
from klgap_perturbations import geometry
from klgap_perturbations.perturbations import FACTORIES
from tests.helpers import run_config

N, D = 2000, 64
REL = 1e-4
ALL = ("sae", "sae_norm_corrected", "sae_norm", "error_add", "epsilon_random", "theta_random", "theta_random_xnorm",
       "cosine_matched", "identity", "zero", "mean_ablation", "epsilon_anisotropic", "sae_error_shuffled")


def perturbation_registry():
    """The perturbation registry as filled from entry points (only our own if another plugin cannot load yet)."""
    try:
        return registry("perturbation")
    except PluginError:
        host = PluginHost(load_entry_points=False)
        (ep,) = [e for e in entry_points(group="klgap") if e.name == "perturbations"]
        host.add_plugin(ep.load(), ep.name)
        return host.registry("perturbation")


def build(name: str, **params):
    """The perturbation; one that fits statistics (epsilon_anisotropic) is fitted on anisotropic Gaussians."""
    p = perturbation_registry().get(name)(**params)
    if isinstance(p, FittablePerturbation):
        p.fit(torch.randn(4096, D, generator=gen(77)) * torch.linspace(0.1, 3.0, D))
    return p


def gen(seed: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@pytest.fixture(scope="module")
def acts(device) -> tuple[torch.Tensor, torch.Tensor]:
    """x with norms over three orders of magnitude; x̂ = a shrunk, noisy x (cos ≈ 0.5 … 0.99), on --device."""
    g = gen(123)
    x = torch.randn(N, D, generator=g) * torch.logspace(-1, 2, N).unsqueeze(1)
    noise = torch.randn(N, D, generator=g) * torch.rand(N, 1, generator=g) * 1.5
    x_hat = 0.8 * x + noise * x.norm(dim=-1, keepdim=True) / math.sqrt(D)
    return x.to(device), x_hat.to(device)


def norms(t: torch.Tensor) -> torch.Tensor:
    return t.double().norm(dim=-1)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=0.0)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> None:
    err = ((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max().item()
    assert err < rel, f"max relative error {err:.2e} ≥ {rel:.0e}"


def assert_close_abs(actual: torch.Tensor, expected, tol: float = REL) -> None:
    err = (actual - expected).abs().max().item()
    assert err < tol, f"max abs error {err:.2e} ≥ {tol:.0e}"


# --------------------------------------------------------------------------- registration


def test_all_names_registered_through_the_entry_point():
    assert set(ALL) <= set(perturbation_registry().names())


@pytest.mark.parametrize("name", ALL)
def test_protocol_shape_dtype_device(name, acts):
    x, x_hat = acts
    p = build(name)
    out = p(x, x_hat, gen(0, x.device))
    assert isinstance(p.name, str) and isinstance(p.stochastic, bool) and isinstance(p.geometry, dict)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_half_precision_inputs_give_float32(name, acts):
    x, x_hat = (t[:50].to(torch.bfloat16) for t in acts)
    assert build(name)(x, x_hat, gen(0, x.device)).dtype == torch.float32


def test_stochastic_flags():
    stochastic = {n for n in ALL if build(n).stochastic}
    assert stochastic == {"epsilon_random", "theta_random", "theta_random_xnorm", "cosine_matched",
                          "epsilon_anisotropic", "sae_error_shuffled"}


# --------------------------------------------------------------------------- geometry, per token


def test_sae_is_x_hat(acts):
    x, x_hat = acts
    assert torch.equal(build("sae")(x, x_hat, gen(0, x.device)), x_hat)


def test_sae_norm_corrected(acts):
    x, x_hat = acts
    out = build("sae_norm_corrected")(x, x_hat, gen(0, x.device))
    assert_rel(norms(out), norms(x))
    assert_close_abs(cos(out, x_hat), 1.0)


def test_sae_norm(acts):
    x, x_hat = acts
    out = build("sae_norm")(x, x_hat, gen(0, x.device))
    assert_rel(norms(out), norms(x_hat))
    assert_close_abs(cos(out, x), 1.0)


def test_epsilon_random_distance(acts):
    x, x_hat = acts
    out = build("epsilon_random")(x, x_hat, gen(0, x.device))
    assert_rel(norms(out - x), norms(x - x_hat))
    assert (cos(out - x, x_hat - x) < 0.9).all()  # a random direction, not the SAE's error


def test_theta_random(acts):
    x, x_hat = acts
    out = build("theta_random")(x, x_hat, gen(0, x.device))
    assert_rel(cos(x, out), cos(x, x_hat))
    assert_rel(norms(out), norms(x_hat))
    assert cos(out, x_hat).median() < 0.99  # not x̂ itself


def test_theta_random_xnorm(acts):
    x, x_hat = acts
    out = build("theta_random_xnorm")(x, x_hat, gen(0, x.device))
    assert_rel(cos(x, out), cos(x, x_hat))
    assert_rel(norms(out), norms(x))


def test_theta_random_norm_parameter(acts):
    x, x_hat = acts
    p = build("theta_random", norm="x")
    assert p.name == "theta_random(norm=x)"
    assert torch.equal(p(x, x_hat, gen(5, x.device)), build("theta_random_xnorm")(x, x_hat, gen(5, x.device)))
    assert build("theta_random", norm="x_hat").name == "theta_random"


@pytest.mark.parametrize("c,frac", [(0.8, 0.9), (0.0, 1.0), (-0.5, 2.0), (1.0, 0.5), (-1.0, 1.0)])
def test_cosine_matched(acts, c, frac):
    x, x_hat = acts
    p = build("cosine_matched", cos=str(c), norm_frac=str(frac))
    out = p(x, x_hat, gen(0, x.device))
    assert_close_abs(cos(x, out), c)
    assert_rel(norms(out), frac * norms(x))
    assert p.name == f"cosine_matched(cos={c:g},norm_frac={frac:g})"


def test_cosine_matched_defaults(acts):
    x, x_hat = acts
    p = build("cosine_matched")
    assert p.name == "cosine_matched(cos=0.9,norm_frac=1)"
    out = p(x, x_hat, gen(0, x.device))
    assert_close_abs(cos(x, out), 0.9)
    assert_rel(norms(out), norms(x))


def test_identity_and_zero(acts):
    x, x_hat = acts
    assert torch.equal(build("identity")(x, x_hat, gen(0, x.device)), x)
    assert torch.equal(build("zero")(x, x_hat, gen(0, x.device)), torch.zeros_like(x))


def test_mean_ablation_is_the_mean_of_the_calls_tokens(acts):
    x, x_hat = acts
    out = build("mean_ablation")(x, x_hat, gen(0, x.device))
    assert out.shape == x.shape and out.dtype == torch.float32
    mean = x.double().mean(0)  # [d]
    assert float((out - mean.float()).abs().max()) < 1e-5 * float(mean.abs().max())
    assert torch.equal(out[0], out[-1])  # one row for every token
    # the study's mean_ablation_hook: activation.mean((0, 1)) over a [batch seq d] activation
    batch = x[:40].reshape(4, 10, D)
    study = batch.mean((0, 1), keepdim=True).expand_as(batch).reshape(40, D)
    torch.testing.assert_close(build("mean_ablation")(x[:40], x_hat[:40], gen(0, x.device)), study.float())


# --------------------------------------------------------------------------- randomness


def test_epsilon_random_direction_is_uniform():
    n, d = 20_000, 16
    x = torch.randn(1, d, generator=gen(1)).expand(n, d).contiguous() * 3
    x_hat = x + torch.randn(1, d, generator=gen(2))  # ε the same for every row
    u = build("epsilon_random")(x, x_hat, gen(7)).double() - x.double()
    u = u / u.norm(dim=-1, keepdim=True)
    assert (u.mean(0).abs() < 4 / math.sqrt(n)).all()
    second = (u**2).mean(0)
    assert ((second - 1 / d).abs() < 0.1 / d).all()


def test_theta_random_orthogonal_part_is_uniform():
    n, d = 20_000, 16
    x = torch.randn(1, d, generator=gen(3)).expand(n, d).contiguous()
    x_hat = (0.6 * x + torch.randn(1, d, generator=gen(4))).expand(n, d).contiguous()
    out = build("theta_random")(x, x_hat, gen(8)).double()
    e = (x[0] / x[0].norm()).double()
    perp = out - (out @ e).unsqueeze(1) * e
    v = perp / perp.norm(dim=-1, keepdim=True)
    assert (v @ e).abs().max() < 1e-5  # orthogonal to x
    assert (v.mean(0).abs() < 4 / math.sqrt(n)).all()
    # uniform on the (d-1)-sphere ⟂ x: E[v vᵀ] = (I − e eᵀ)/(d − 1)
    cov = v.T @ v / n
    expected = (torch.eye(d, dtype=torch.float64) - torch.outer(e, e)) / (d - 1)
    assert (cov - expected).abs().max() < 0.1 / d


@pytest.mark.parametrize("name", ["epsilon_random", "theta_random", "theta_random_xnorm", "cosine_matched"])
def test_determinism(name, acts):
    x, x_hat = acts
    p = build(name)
    a, b, c = p(x, x_hat, gen(11, x.device)), p(x, x_hat, gen(11, x.device)), p(x, x_hat, gen(12, x.device))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", ALL)
def test_degenerate_tokens_are_finite(name):
    x = torch.randn(4, 8, generator=gen(9))
    x[0] = 0  # ‖x‖ = 0
    x_hat = x * 0.5
    x_hat[1] = x[1]  # ε = 0
    x_hat[2] = 0  # ‖x̂‖ = 0
    x_hat[3] = -x[3]  # cos = -1
    p = build(name)
    if isinstance(p, FittablePerturbation):
        p.fit(torch.randn(100, 8, generator=gen(1)))
    out = p(x, x_hat, gen())
    assert torch.isfinite(out).all()


def test_epsilon_zero_gives_x_exactly(acts):
    x = acts[0]
    assert torch.equal(build("epsilon_random")(x, x.clone(), gen(0, x.device)), x)


def test_zero_x_gets_a_random_direction_of_norm_r():
    x = torch.zeros(3, 8)
    x_hat = torch.randn(3, 8, generator=gen(1))
    out = build("theta_random")(x, x_hat, gen())
    assert_rel(norms(out), norms(x_hat))
    assert torch.equal(build("theta_random_xnorm")(x, x_hat, gen()), torch.zeros(3, 8))
    assert torch.equal(build("sae_norm")(x, x_hat, gen()), torch.zeros(3, 8))


def test_zero_x_hat():
    x = torch.randn(3, 8, generator=gen(1))
    x_hat = torch.zeros(3, 8)
    assert torch.equal(build("sae_norm_corrected")(x, x_hat, gen()), torch.zeros(3, 8))
    out = build("theta_random_xnorm")(x, x_hat, gen())  # cos(x, 0) is taken as 0
    assert_close_abs(cos(x, out), 0.0)
    assert_rel(norms(out), norms(x))
    assert_rel(norms(build("epsilon_random")(x, x_hat, gen()) - x), norms(x))


def test_geometry_functions_match_the_plugins(acts):
    x, x_hat = acts
    assert torch.equal(geometry.sae_norm(x, x_hat), build("sae_norm")(x, x_hat, gen(0, x.device)))
    assert torch.equal(geometry.epsilon_random(x, x_hat, gen(3, x.device)), build("epsilon_random")(x, x_hat, gen(3, x.device)))
    assert torch.equal(
        geometry.cosine_matched(x, x_hat, gen(3, x.device), cos=0.8, norm_frac=0.9),
        build("cosine_matched", cos="0.8", norm_frac="0.9")(x, x_hat, gen(3, x.device)),
    )


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "name,params,expected",
    [
        ("cosine_matched", {"cos": "1.5"}, ["1.5", "[-1, 1]"]),
        ("cosine_matched", {"cos": "-1.01"}, ["-1.01", "[-1, 1]"]),
        ("cosine_matched", {"cos": "abc"}, ["abc", "cos"]),
        ("cosine_matched", {"cos": "nan"}, ["nan", "cos"]),
        ("cosine_matched", {"norm_frac": "-1"}, ["-1", "norm_frac", "[0, inf]"]),
        ("cosine_matched", {"cosine": "0.5"}, ["cosine", "cos, norm_frac"]),
        ("theta_random", {"norm": "y"}, ["'y'", "x_hat, x"]),
        ("epsilon_random", {"scale": "2"}, ["scale", "no parameters"]),
        ("sae", {"x": "1"}, ["'x'", "no parameters"]),
    ],
)
def test_bad_parameters(name, params, expected):
    with pytest.raises(KlgapError) as info:
        build(name, **params)
    message = str(info.value)
    assert "\n" not in message and name in message
    for part in expected:
        assert part in message


def test_factories_table_has_every_name():
    assert tuple(FACTORIES) == ALL


# --------------------------------------------------------------------------- baselines for anisotropic spaces


def _anisotropic_acts(n=20000, d=16, seed=0):
    g = gen(seed)
    scales = torch.linspace(0.05, 3.0, d)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return (torch.randn(n, d, generator=g) * scales) @ basis.T, basis, scales


def test_only_epsilon_anisotropic_declares_fit():
    """Every built-in is a Perturbation; the one that fits statistics declares FittablePerturbation."""
    built = {name: perturbation_registry().get(name)() for name in ALL}
    assert all(isinstance(p, Perturbation) for p in built.values())
    assert [name for name, p in built.items() if isinstance(p, FittablePerturbation)] == ["epsilon_anisotropic"]


def test_epsilon_anisotropic_keeps_eps_and_follows_the_covariance():
    acts, basis, scales = _anisotropic_acts()
    p = perturbation_registry().get("epsilon_anisotropic")()
    with pytest.raises(RuntimeError, match="not fitted"):
        p(acts[:4], acts[:4], gen())
    p.fit(acts)
    x = acts[:5000]
    x_hat = x + 0.2 * torch.randn(x.shape, generator=gen(1))
    out = p(x, x_hat, gen(2))
    assert_rel(norms(out - x), norms(x - x_hat))
    u = (out - x).double()
    u = u / u.norm(dim=-1, keepdim=True)
    share = (u @ basis.double()).pow(2).mean(0)  # mean squared component along each principal axis
    # the widest axis (variance 9 of ~54 in all) gets ~1/6 of the direction (isotropic: 1/16), the narrowest ~0
    assert share[-1] > 0.12 and share[0] < 1e-3
    iso = build("epsilon_random")(x, x_hat, gen(2)) - x
    iso = iso.double() / iso.double().norm(dim=-1, keepdim=True)
    assert (iso @ basis.double()).pow(2).mean(0)[0] > 0.03  # the isotropic baseline does not care


def test_sae_error_shuffled_uses_another_tokens_error():
    x = torch.randn(50, 8, generator=gen(3))
    x_hat = x + torch.randn(50, 8, generator=gen(4))
    out = build("sae_error_shuffled")(x, x_hat, gen(5))
    assert_rel(norms(out - x), norms(x - x_hat))
    dirs = (out - x) / (out - x).norm(dim=-1, keepdim=True)
    errs = (x - x_hat) / (x - x_hat).norm(dim=-1, keepdim=True)
    match = (dirs @ errs.T).abs() > 1 - 1e-5  # [i, j]: token i uses token j's error direction
    assert match.sum(1).eq(1).all()  # exactly one partner each
    assert not match.diagonal().any()  # never its own error
    assert match.sum(0).eq(1).all()  # a permutation: every error used once


def test_shuffle_partner_is_a_derangement():
    for n in (2, 3, 10, 101):
        for seed in range(20):
            perm = geometry.shuffle_partner(n, gen(seed), torch.device("cpu"))
            assert sorted(perm.tolist()) == list(range(n)) and not (perm == torch.arange(n)).any()


def test_new_baselines_in_a_run(tmp_path, load_model):
    from klgap.plan.config import RunConfig
    from klgap.plan.sites import hook_name
    from tests.helpers import random_sae

    lm = load_model("tiny-llama")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 256, hook_name("resid_pre", 1))
    cfg = RunConfig(model="tiny-llama", sae=str(sae), tokens=256, context_len=32, batch_size=4, device="cpu",
                    dataset="random", interventions=["sae", "epsilon_random", "epsilon_anisotropic", "sae_error_shuffled"])
    report = run_config(cfg, tmp_path / "run", progress=False)
    kl = report.interventions
    assert all(kl[n].kl_mean > 0 and kl[n].n_tokens == 8 * 31 for n in kl)
    assert {"epsilon_anisotropic", "sae_error_shuffled"} <= set(report.comparisons)
    assert report.execution["fitted"]["epsilon_anisotropic"]["n_activations"] == 8 * 31
