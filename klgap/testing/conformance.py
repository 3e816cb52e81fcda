"""Conformance suites: what every model adapter, SAE loader and perturbation plugin must satisfy.

Each suite is a pytest test class to subclass; set the class attributes it documents. Each ``test_*`` method
checks one promise and fails with a message that says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from klgap.plugins.capabilities import (baseline_label, check_sae_spec, context_fittable, error_fittable,
                                        fit_summary, fittable, frozen_error, sae_fittable)
from klgap.errors import KlgapError
from klgap.protocols import (BaselineRole, ContextFittablePerturbation, DefaultSAEFinder, ErrorFittablePerturbation,
                             FittablePerturbation, SAECheck, SAEChecker, SaeFittablePerturbation)
from klgap.plan.sites import SITES, parse_hook_name
from klgap.testing.models import model_for_tests, rel_diff


class ModelAdapterConformance:
    """A model adapter: set ``model`` (a ``--model`` value: a registered name, a hub repo id or a local folder), or
    override ``make_model(self, tmp_path_factory)`` to write a folder and return its path; optionally ``sites``,
    ``device``, ``context_len``."""

    model: ClassVar[str] = ""
    sites: ClassVar[tuple[str, ...] | None] = None  # default: every site the model reports a width for
    device: ClassVar[str] = "cpu"
    context_len: ClassVar[int] = 12

    def make_model(self, tmp_path_factory: pytest.TempPathFactory) -> str:
        """The ``--model`` value under test (default: the ``model`` attribute)."""
        if not self.model:
            raise NotImplementedError(f"{type(self).__name__}: set `model` or override make_model()")
        return self.model

    @pytest.fixture
    def model_spec(self, tmp_path_factory) -> str:
        return self.make_model(tmp_path_factory)

    @pytest.fixture
    def lm(self, model_spec):
        return model_for_tests(model_spec, self.device)

    def _sites(self, lm) -> list[str]:
        return [s for s in (self.sites or SITES) if s in lm.site_widths]

    def _ids(self, lm) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, min(lm.vocab_size, 50_000), (2, self.context_len), generator=gen).to(lm.device)

    def test_registered_with_a_description(self, model_spec):
        """A registered name has a description; any other value (a repo id, a folder) is claimed by a plugin's
        ``resolve_model_adapter``."""
        from klgap.plugins.manager import model_adapter, registry

        entry = registry("model").entries.get(model_spec)
        if entry is not None:
            assert entry.description, f"model adapter {model_spec!r} has no description"
        else:
            ref = model_adapter(model_spec)  # raises "unknown model" when no plugin claims it
            assert ref.plugin, f"{model_spec!r} resolved to an adapter with no plugin name"

    def test_loaded_model_fields(self, lm):
        assert lm.n_layers >= 1 and lm.d_model >= 1 and lm.vocab_size >= 2 and lm.max_context >= self.context_len
        assert set(self._sites(lm)), f"{lm.name} reports no site widths (site_widths={lm.site_widths})"
        assert lm.device.type == torch.device(self.device).type and lm.dtype == torch.float32

    def test_logits_shape(self, lm):
        ids = self._ids(lm)
        with torch.no_grad():
            logits = lm.hf_model(input_ids=ids, use_cache=False).logits
        assert tuple(logits.shape[:2]) == tuple(ids.shape) and logits.shape[-1] >= lm.vocab_size
        assert torch.isfinite(logits).all()

    def test_sites_resolve_with_the_right_shape(self, lm):
        from klgap.forward import activations

        ids = self._ids(lm)
        for site in self._sites(lm):
            for layer in sorted({0, lm.n_layers - 1}):
                acts = activations.collect(lm, lm.site_map(site, layer), ids)
                expected = (*ids.shape, lm.site_widths[site])
                assert tuple(acts.shape) == expected, f"{site} L{layer}: shape {tuple(acts.shape)}, expected {expected}"
                assert torch.isfinite(acts).all(), f"{site} L{layer}: non-finite activations"

    def test_site_equals_a_plain_forward_hook(self, lm):
        """The activation klgap reads is the tensor a PyTorch hook on the same module sees."""
        from klgap.forward import activations

        ids = self._ids(lm)
        for site in self._sites(lm):
            layer = lm.n_layers // 2
            spec = lm.site_map(site, layer)
            module = lm.hf_model.get_submodule(spec.module)
            seen: list[torch.Tensor] = []
            if spec.io == "input":
                handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
                    (args[0] if args else next(iter(kwargs.values()))).detach().clone()), with_kwargs=True)
            else:
                handle = module.register_forward_hook(lambda m, args, out: seen.append(
                    (out if spec.index is None else out[spec.index]).detach().clone()))
            try:
                with torch.no_grad():
                    lm.hf_model(input_ids=ids, use_cache=False)
            finally:
                handle.remove()
            ours = activations.collect(lm, spec, ids)
            assert seen, f"{site} L{layer}: the hook on {spec.module} never fired"
            torch.testing.assert_close(ours, seen[0].reshape(ours.shape), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{site} L{layer} differs from a hook on {spec.module}: {m}")

    def test_patching_x_itself_leaves_logits_unchanged(self, lm):
        from klgap.forward import activations

        ids = self._ids(lm)
        for site in self._sites(lm):
            spec = lm.site_map(site, lm.n_layers - 1)
            acts, clean = activations.run_clean(lm, spec, ids)
            patched = activations.run_patched(lm, spec, ids, acts, positions=slice(0, None))
            assert rel_diff(patched, clean) < 1e-5, f"{site}: patching x' = x changed the logits"

    def test_patching_takes_effect(self, lm):
        from klgap.forward import activations

        ids = self._ids(lm)
        site = "resid_pre" if "resid_pre" in lm.site_widths else self._sites(lm)[0]
        spec = lm.site_map(site, lm.n_layers - 1)
        acts, clean = activations.run_clean(lm, spec, ids)
        patched = activations.run_patched(lm, spec, ids, torch.zeros_like(acts), positions=slice(0, None))
        assert rel_diff(patched, clean) > 1e-4, f"zeroing {site} did not change the logits: the patch is not applied"


class SAELoaderConformance:
    """An SAE loader: set ``loader`` (registered name) and implement ``make_spec(tmp_path) -> str``, writing an
    SAE in your format; set ``model`` / ``expected_hook`` to check it against a model's site widths."""

    loader: ClassVar[str]
    model: ClassVar[str | None] = "tiny-gpt2"
    expected_hook: ClassVar[str | None] = None  # the hook name the written SAE should report
    bare_path: ClassVar[bool] = True  # can_load recognises the written path without a LOADER: prefix
    device: ClassVar[str] = "cpu"

    def make_spec(self, tmp_path: Path) -> str:
        raise NotImplementedError("write an SAE in your format under tmp_path and return its spec")

    @pytest.fixture
    def sae(self, tmp_path):
        from klgap.job.loading import load_sae

        self.spec = self.make_spec(tmp_path)
        return load_sae(f"{self.loader}:{self.spec}", torch.device(self.device))

    def test_registered(self):
        from klgap.plugins.manager import registry

        assert self.loader in registry("sae_loader").names(), f"no SAE loader is registered as {self.loader!r}"

    def test_bare_path_routes_to_this_loader(self, tmp_path):
        from klgap.plugins.manager import registry

        spec = self.make_spec(tmp_path)
        loader = registry("sae_loader").get(self.loader)
        if self.bare_path:
            assert loader.can_load(spec), f"{self.loader}.can_load({spec!r}) is False for the file it wrote"

    def test_encode_decode_shapes(self, sae):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(7, sae.d_in, generator=gen).to(self.device)
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
        assert tuple(feats.shape) == (7, sae.d_sae), f"encode gave {tuple(feats.shape)}, expected (7, {sae.d_sae})"
        assert tuple(x_hat.shape) == (7, sae.d_in) and x_hat.dtype == torch.float32
        assert torch.isfinite(x_hat).all() and x_hat.device.type == torch.device(self.device).type

    def test_hook_name_parsed(self, sae):
        if self.expected_hook is not None:
            assert sae.hook_name == self.expected_hook, f"hook name {sae.hook_name!r}, expected {self.expected_hook!r}"
        if sae.hook_name is not None:
            parse_hook_name(sae.hook_name)  # raises on a name klgap cannot map to a site

    def test_d_in_matches_the_site(self, sae):
        if self.model is None or sae.hook_name is None:
            pytest.skip("no model or no hook name to check against")
        lm = model_for_tests(self.model, self.device)
        site, layer = parse_hook_name(sae.hook_name)
        assert layer < lm.n_layers, f"hook {sae.hook_name} is beyond {self.model}'s {lm.n_layers} layers"
        assert sae.d_in == lm.site_widths[site], f"d_in {sae.d_in} != {self.model} {site} width {lm.site_widths[site]}"

    def test_missing_file_is_a_clear_error(self, tmp_path):
        from klgap.job.loading import load_sae

        with pytest.raises(KlgapError):
            load_sae(f"{self.loader}:{tmp_path / 'does-not-exist'}", torch.device(self.device))

    def test_center_resid_is_declared(self, sae):
        assert isinstance(sae.center_resid, bool), f"LoadedSAE.center_resid is {sae.center_resid!r}, not a bool"

    # -- optional capabilities: checked when the loader declares them (klgap.protocols)

    def _registered(self):
        from klgap.plugins.manager import registry

        return registry("sae_loader").get(self.loader)

    def test_check_names_the_loaded_hook(self, sae):
        """SAEChecker: ``check(spec)`` (--dry-run) says the hook name the loaded SAE has, without loading it."""
        loader = self._registered()
        if not isinstance(loader, SAEChecker):
            pytest.skip(f"{self.loader} does not declare SAEChecker (check)")
        checked = check_sae_spec(loader, self.spec)
        assert isinstance(checked, SAECheck)
        assert checked.hook_name == sae.hook_name, (
            f"check() says hook {checked.hook_name!r}, the loaded SAE has {sae.hook_name!r}"
        )

    def test_check_refuses_a_missing_file(self, tmp_path):
        loader = self._registered()
        if not isinstance(loader, SAEChecker):
            pytest.skip(f"{self.loader} does not declare SAEChecker (check)")
        with pytest.raises(KlgapError):
            loader.check(str(tmp_path / "does-not-exist"))

    def test_default_sae_answers_spec_and_note_or_none(self):
        """DefaultSAEFinder: for every site of the model, None or (spec, note) strings; never a download."""
        loader = self._registered()
        if not isinstance(loader, DefaultSAEFinder) or self.model is None:
            pytest.skip(f"{self.loader} does not declare DefaultSAEFinder (default_sae), or no model is set")
        lm = model_for_tests(self.model, self.device)
        for site in lm.site_widths:
            found = loader.default_sae(lm, site, 0)
            assert found is None or (isinstance(found, tuple) and len(found) == 2
                                     and all(isinstance(s, str) and s for s in found)), (
                f"default_sae(model, {site!r}, 0) returned {found!r}; expected None or (spec, note)"
            )


def _geometry_target(value: Any, x: torch.Tensor, x_hat: torch.Tensor, kind: str) -> torch.Tensor | None:
    norm = lambda t: t.norm(dim=-1)  # noqa: E731
    if kind == "norm":
        return {"x": norm(x), "x_hat": norm(x_hat)}.get(value) if isinstance(value, str) else None
    if kind == "cos":
        return torch.nn.functional.cosine_similarity(x, x_hat, dim=-1) if value == "sae" else torch.full_like(x[:, 0], float(value))
    if kind == "distance":
        return norm(x - x_hat) if value == "eps" else torch.full_like(x[:, 0], float(value))
    return None


class PerturbationConformance:
    """A perturbation: set ``spec`` (as given to --interventions, e.g. ``"my_noise:scale=0.5"``)."""

    spec: ClassVar[str]
    device: ClassVar[str] = "cpu"
    d: ClassVar[int] = 48
    n: ClassVar[int] = 64

    def build(self):
        from klgap.plan.resolve import build_intervention

        return self.fitted(build_intervention(self.spec).perturbation)

    def fitted(self, p):
        """`p` fitted by each fit it declares (fit, fit_error, fit_sae, fit_contexts) on this suite's activations."""
        for fittable_p in fittable([p]):
            fittable_p.fit(self.anisotropic_acts())
        for error_p in error_fittable([p]):
            error_p.fit_error(*self.fit_pair())
        for sae_p in sae_fittable([p]):
            sae_p.fit_sae(*self.fit_pair(), *self.fit_sae_size())
        for context_p in context_fittable([p]):
            context_p.fit_contexts(self.fit_contexts_acts())
        return p

    def fit_contexts_acts(self) -> torch.Tensor:
        """``[8 64 d]``: the anisotropic activations as 8 contexts of 64 positions (what ``fit_contexts`` is given)."""
        return self.anisotropic_acts().reshape(8, 64, self.d)

    def fit_sae_size(self) -> tuple[torch.Tensor, int]:
        """(l0 ``[512]``, d_sae): what ``fit_sae`` is given beside the fit pair (an SAE 4× as wide as d, L0 ≈ d/6)."""
        gen = torch.Generator().manual_seed(7)
        return torch.randint(self.d // 8, self.d // 4, (512,), generator=gen).float().to(self.device), 4 * self.d

    def fit_pair(self, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, x̂) ``[512 d]`` each: anisotropic x and an x̂ whose error is part linear in x, part noise (what
        ``fit_error`` is given)."""
        x = self.anisotropic_acts(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        noise = 0.3 * torch.randn(x.shape, generator=gen).to(self.device)
        return x, 0.8 * x + noise

    def anisotropic_acts(self, seed: int = 5) -> torch.Tensor:
        """[512 d] Gaussian activations whose per-dimension scale runs from 0.2 to 2 (what ``fit`` is given)."""
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(512, self.d, generator=gen) * torch.linspace(0.2, 2.0, self.d)).to(self.device)

    def data(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.n, self.d, generator=gen) * 3.0
        x_hat = 0.8 * x + 0.5 * torch.randn(self.n, self.d, generator=gen)
        return x.to(self.device), x_hat.to(self.device)

    def gen(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def test_declares_its_interface(self):
        p = self.build()
        assert isinstance(getattr(p, "name", None), str) and p.name, "a perturbation needs a name"
        assert isinstance(getattr(p, "stochastic", None), bool), "stochastic must be True or False"
        assert isinstance(getattr(p, "geometry", None), dict), "geometry must be a dict (may be empty)"

    def test_fit_is_reproducible(self):
        """FittablePerturbation: fitting twice on the same activations gives the same x' under one seed (a
        resumed run refits on the same tokens)."""
        from klgap.plan.resolve import build_intervention

        first = build_intervention(self.spec).perturbation
        if not isinstance(first, (FittablePerturbation, ErrorFittablePerturbation, SaeFittablePerturbation,
                                  ContextFittablePerturbation)):
            pytest.skip(f"{self.spec} declares none of FittablePerturbation (fit), ErrorFittablePerturbation "
                        "(fit_error), SaeFittablePerturbation (fit_sae), ContextFittablePerturbation (fit_contexts)")
        second = self.fitted(build_intervention(self.spec).perturbation)
        self.fitted(first)
        x, x_hat = self.data()
        out = first(x, x_hat, self.gen(6))
        assert torch.equal(out, second(x, x_hat, self.gen(6))), "two fits on the same activations gave different x'"
        assert torch.isfinite(out).all()
        assert fit_summary(first) == fit_summary(second), "two fits on the same activations summarised differently"

    def test_baseline_label_is_a_sentence_name_or_none(self):
        """BaselineRole: ``baseline_label`` is None (not a baseline) or a non-empty str a sentence names it by."""
        p = self.build()
        if not isinstance(p, BaselineRole):
            pytest.skip(f"{self.spec} does not declare BaselineRole (baseline_label)")
        label = baseline_label(p)  # a PluginError names a label of the wrong kind
        assert label is None or (isinstance(label, str) and label.strip())

    def test_frozen_error_is_a_bool_and_no_baseline(self):  # FrozenErrorPerturbation, never with a baseline label
        p = self.build()  # frozen_error: a PluginError names a value that is not a bool
        assert not (frozen_error(p) and baseline_label(p) is not None), "frozen_error and a baseline label"

    def test_shape_dtype_device(self):
        x, x_hat = self.data()
        out = self.build()(x, x_hat, self.gen(0))
        assert tuple(out.shape) == tuple(x.shape), f"x' has shape {tuple(out.shape)}, expected {tuple(x.shape)}"
        assert out.dtype == torch.float32, f"x' is {out.dtype}, expected float32"
        assert out.device.type == torch.device(self.device).type
        assert torch.isfinite(out).all()

    def test_deterministic_under_a_seed(self):
        p = self.build()
        x, x_hat = self.data()
        a, b = p(x, x_hat, self.gen(1)), p(x, x_hat, self.gen(1))
        assert torch.equal(a, b), "the same generator seed gave different x'"
        c = p(x, x_hat, self.gen(2))
        if p.stochastic:
            assert not torch.equal(a, c), "declared stochastic, but two seeds gave the same x'"
        else:
            assert torch.equal(a, c), "declared not stochastic, but the seed changed x'"

    def test_declared_geometry(self):
        p = self.build()
        x, x_hat = self.data()
        out = p(x, x_hat, self.gen(3))
        geometry = dict(p.geometry)
        if "norm" in geometry:
            value = geometry["norm"]
            target = (float(value) * x.norm(dim=-1) if geometry.get("norm_of") == "x"
                      else _geometry_target(value, x, x_hat, "norm"))
            if target is None and isinstance(value, (int, float)):
                target = torch.full_like(x[:, 0], float(value))
            torch.testing.assert_close(out.norm(dim=-1), target, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"declared norm {value!r} does not hold: {m}")
        if "cos" in geometry:
            target = _geometry_target(geometry["cos"], x, x_hat, "cos")
            torch.testing.assert_close(torch.nn.functional.cosine_similarity(x, out, dim=-1), target, rtol=1e-4,
                                       atol=1e-4, msg=lambda m: f"declared cos {geometry['cos']!r} does not hold: {m}")
        if "distance" in geometry:
            target = _geometry_target(geometry["distance"], x, x_hat, "distance")
            torch.testing.assert_close((out - x).norm(dim=-1), target, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"declared distance {geometry['distance']!r} does not hold: {m}")

    def test_degenerate_tokens_stay_finite(self):
        """x̂ = x (perfect reconstruction) and x = 0 must not give NaN or inf."""
        p = self.build()
        x, _ = self.data()
        x[0] = 0.0
        for x_hat in (x.clone(), torch.zeros_like(x)):
            out = p(x, x_hat, self.gen(4))
            assert torch.isfinite(out).all(), "a degenerate token gave a non-finite x'"
        if "distance" in p.geometry and p.geometry["distance"] == "eps":
            same = p(x, x.clone(), self.gen(4))
            torch.testing.assert_close(same, x, msg=lambda m: f"ε = 0 must give x' = x: {m}")
