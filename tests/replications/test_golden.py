"""Small configurations in every mode (and a study) reproduce, bit for bit, the numbers committed in
tests/data/golden/runs.json from the code before the run-model refactor (see tests/golden.py).

One exception: Spearman correlations (a run's ``gap.spearman``, a study's ``gap_correlation_between_runs``) agree
to rel 1e-12. They were committed from ``scipy.stats.spearmanr``, which sums float64 ranks; the streamed statistics
(klgap/report/aggregate.py) use ``klgap.report.stats.spearman``, which sums the ranks exactly as integers, because scipy's rank
arrays (~85 bytes per token) do not fit the memory a report may use. The two differ by ~1e-15 relative."""

from __future__ import annotations

import json

import pytest

from tests import golden

SPEARMAN_PARENTS = ("spearman", "gap_correlation_between_runs")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return golden.generate(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="module")
def expected():
    return json.loads((golden.GOLDEN / "runs.json").read_text())


def assert_same(got, expected, path: tuple = ()) -> None:
    """Equal, except a Spearman correlation's rho and p_value within rel 1e-12."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), (path, got, expected)
        for key, value in expected.items():
            assert_same(got[key], value, (*path, key))
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), (path, got, expected)
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, (*path, i))
    elif path[-1] in ("rho", "p_value") and any(p in SPEARMAN_PARENTS for p in path) and expected is not None:
        assert got == pytest.approx(expected, rel=1e-12, abs=0), path
    else:
        assert got == expected, (path, got, expected)


@pytest.mark.parametrize("case", [*golden.CASES, "study"])
def test_reproduces_the_committed_numbers(results, expected, case):
    got = json.loads(json.dumps(results[case], sort_keys=True))  # the same JSON round trip as the file
    assert_same(got, expected[case])


def test_only_spearman_is_compared_loosely():
    assert_same({"gap": {"spearman": {"cos": {"rho": 0.5 * (1 + 1e-14)}}}}, {"gap": {"spearman": {"cos": {"rho": 0.5}}}})
    with pytest.raises(AssertionError):
        assert_same({"comparisons": {"x": {"rho": 0.5 * (1 + 1e-14)}}}, {"comparisons": {"x": {"rho": 0.5}}})
    with pytest.raises(AssertionError):
        assert_same({"spearman": {"cos": {"rho": 0.5 * (1 + 1e-11)}}}, {"spearman": {"cos": {"rho": 0.5}}})
