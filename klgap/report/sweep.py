"""Length sweeps: KL against the length t of a patch along the SAE's error and along each chosen baseline direction
(Lee & Heimersheim 2024, arXiv 2410.12555, "error extrapolation"; activation plateaus, Heimersheim & Mendel 2024).

`klgap curve --along error --scale 0:2:21 --baselines epsilon_random,cov_random_mixture,real_direction` runs `sae`,
each baseline, and one ``along:dir=D,t=T`` intervention per direction and length (klgap_perturbations.sweep: along
the error x + t·(x̂ − x), so t = 1 is the SAE; along a baseline x + t·ε·u, u its unit direction), through the
ordinary engine. Any run holding ``along(dir=..,t=..)`` interventions gets a ``sweep`` section (built here):

- per direction, the mean KL at each t with a context-bootstrap interval;
- the plateau width: the length t at which the mean KL first reaches THRESHOLD_FRAC (10%) of the SAE's mean KL
  (linear between grid points, in log KL where both ends are positive), with a 95% interval from resampling whole
  contexts (every point and the SAE's KL resampled together, so the threshold moves with each resample);
- the SAE-equivalent length: the t at which the direction's KL equals the SAE's (about 1 along the error itself).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from klgap.errors import KlgapError
from klgap.report import stats
from klgap.report.robustness import first_crossing, parse_grid
from klgap.report.schema import InterventionStats, Plateau, Sweep, SweepDirection, SweepPoint

_POINT = re.compile(r"^along\(dir=(?P<dir>[^,()]+),t=(?P<t>[^)]+)\)$")
ERROR = "error"
#: the plateau ends where the mean KL reaches this fraction of the SAE's own mean KL (t = 1 along the error)
THRESHOLD_FRAC = 0.1
#: `klgap curve --along error` without --baselines sweeps along these too
DEFAULT_BASELINES = ("epsilon_random", "cov_random_mixture", "real_direction")
N_BOOT = 2000


def parse_point(name: str) -> tuple[str, float] | None:
    """(direction, t) of a sweep point's recorded name ``along(dir=D,t=T)``, else None."""
    match = _POINT.match(name)
    return (match["dir"], float(match["t"])) if match else None


def is_sweep_point(name: str) -> bool:
    """Whether a recorded intervention name is a point of a length sweep (``along(dir=..,t=..)``)."""
    return _POINT.match(name) is not None


def parse_scale_grid(text: str) -> list[float]:
    """`"0:2:21"` (start:stop:count, both ends included) or `"0,0.5,1,2"` -> sorted lengths t ≥ 0."""
    return parse_grid(text, "--scale", "length", 0.0, None, "0:2:21")


def parse_baselines(text: str | Sequence[str]) -> list[str]:
    """`"epsilon_random,cov_random_mixture"` -> the baseline names to sweep along (registered names, no
    parameters: checked when the interventions are built)."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise KlgapError(f"--baselines {text!r} names no perturbation; e.g. {','.join(DEFAULT_BASELINES)}")
    bad = [n for n in names if n == ERROR or any(c in n for c in ":=()")]
    if bad:
        raise KlgapError(f"--baselines: {bad[0]!r} is not valid; list registered perturbations without parameters "
                         f"(e.g. {','.join(DEFAULT_BASELINES)}); the error itself is always swept")
    return list(dict.fromkeys(names))


def sweep_interventions(scales: Sequence[float], baselines: Sequence[str]) -> list[str]:
    """The interventions of a sweep run: sae, each baseline, then one ``along`` point per (direction, t), the
    error's first."""
    return ["sae", *baselines, *[f"along:dir={d},t={t:g}" for d in (ERROR, *baselines) for t in scales]]


def sweep_specs(along: str = ERROR, scale: str | None = None, baselines: str | Sequence[str] | None = None) -> list[str]:
    """The interventions of ``klgap curve --along error --scale S --baselines B`` (and ``klgap.curve(along=...)``),
    defaults filled in (scale 0:2:21, DEFAULT_BASELINES)."""
    if along != ERROR:
        raise KlgapError(f"--along {along!r} is not valid; valid: {ERROR}")
    return sweep_interventions(parse_scale_grid(scale if scale is not None else "0:2:21"),
                               parse_baselines(baselines if baselines is not None else DEFAULT_BASELINES))


def plateau_width(t: np.ndarray, kl: np.ndarray, threshold: float) -> tuple[float, bool] | None:
    """(width, censored) of one curve: the first t (increasing) at which `kl` reaches `threshold`, between the
    grid points around it (:func:`klgap.report.robustness.first_crossing`); the grid's end, censored, when it stays
    below; the grid's first t, censored, when that is already at or above it. None without a finite threshold or
    point."""
    ok = np.isfinite(kl)
    t, kl = np.asarray(t, dtype=float)[ok], np.asarray(kl, dtype=float)[ok]
    if not t.size or not math.isfinite(threshold):
        return None
    order = np.argsort(t)
    t, kl = t[order], kl[order]
    if kl[0] >= threshold:
        return float(t[0]), True
    above = np.flatnonzero(kl >= threshold)
    if not above.size:
        return float(t[-1]), True
    i = int(above[0])
    crossing = first_crossing(t[i - 1 : i + 1], kl[i - 1 : i + 1], threshold)
    return (float(crossing) if crossing is not None else float(t[i])), False


def _on(frame: pd.DataFrame, contexts: pd.Index) -> pd.DataFrame:
    """A per-context frame on the reference `contexts` (a context without tokens: sum 0, n 0)."""
    return frame.reindex(contexts, fill_value=0)


def build_sweep(names: Sequence[str], kl_by_context: Callable[[str], pd.DataFrame],
                interventions: Mapping[str, InterventionStats], seed: int = 0,
                threshold_frac: float = THRESHOLD_FRAC) -> Sweep | None:
    """The ``sweep`` section from per-intervention pieces: kl_by_context(name) = :func:`stats.per_context` of its
    KL (klgap.report.aggregate.context_sums), interventions = the report's per-intervention statistics (ΔCE means,
    token counts). The SAE's KL (the threshold's reference) is ``sae``'s, else the error's point at t = 1. None
    when `names` holds no sweep point."""
    points: dict[str, list[tuple[float, str]]] = {}
    for name in names:
        parsed = parse_point(name)
        if parsed is not None:
            points.setdefault(parsed[0], []).append((parsed[1], name))
    if not points:
        return None
    reference = "sae" if "sae" in names else next((n for t, n in points.get(ERROR, []) if t == 1.0), None)
    ref_frame = kl_by_context(reference) if reference is not None else None
    contexts = ref_frame.index if ref_frame is not None else None
    sae = stats.mean_ci(ref_frame, N_BOOT, seed) if ref_frame is not None else None
    sae_kl = sae["mean"] if sae is not None else math.nan
    threshold = threshold_frac * sae_kl
    boot_threshold = threshold_frac * stats.bootstrap_means(ref_frame, N_BOOT, seed) if ref_frame is not None else None
    directions = []
    for direction, found in points.items():
        found.sort()
        frames = {name: kl_by_context(name) for _, name in found}
        swept = []
        for t, name in found:
            kl, row = stats.mean_ci(frames[name], N_BOOT, seed), interventions.get(name)
            swept.append(SweepPoint(intervention=name, t=t, kl_mean=_num(kl["mean"]), kl_ci_low=_num(kl["ci_low"]),
                                    kl_ci_high=_num(kl["ci_high"]),
                                    ce_delta_mean=row.ce_delta_mean if row is not None else None,
                                    n_tokens=row.n_tokens if row is not None else 0))
        t = np.array([p.t for p in swept])
        kl = np.array([math.nan if p.kl_mean is None else p.kl_mean for p in swept])
        plateau = None
        width = plateau_width(t, kl, threshold)
        if width is not None and boot_threshold is not None:
            boots = np.stack([stats.bootstrap_means(_on(frames[name], contexts), N_BOOT, seed) for _, name in found], 1)
            widths = np.array([w[0] if (w := plateau_width(t, boots[b], boot_threshold[b])) is not None else math.nan
                               for b in range(boots.shape[0])])
            widths = widths[np.isfinite(widths)]
            low, high = np.quantile(widths, [0.025, 0.975]) if widths.size else (math.nan, math.nan)
            plateau = Plateau(t=width[0], ci_low=_num(float(low)), ci_high=_num(float(high)), censored=width[1])
        equivalent = first_crossing(t, kl, sae_kl) if math.isfinite(sae_kl) else None
        directions.append(SweepDirection(direction=direction, points=swept, plateau=plateau,
                                         sae_equivalent_t=equivalent))
    directions.sort(key=lambda d: d.direction != ERROR)  # the error first, then the baselines as listed
    return Sweep(threshold_frac=threshold_frac, threshold_kl=_num(threshold), sae_kl=_num(sae_kl),
                 directions=directions)


def _num(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


__all__ = ["DEFAULT_BASELINES", "ERROR", "THRESHOLD_FRAC", "build_sweep", "is_sweep_point", "parse_baselines",
           "parse_point", "parse_scale_grid", "plateau_width", "sweep_interventions", "sweep_specs"]
