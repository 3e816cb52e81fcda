"""Small configurations in every mode (and a study) reproduce the numbers committed in tests/data/golden/ from the
code before the run-model refactor, on any CPU: the fresh measurement is the committed parts within float32
rounding, and the committed parts give the committed statistics within float64 rounding (tests/golden.py says
why in two steps; tests/close.py which tolerance and why). `scripts/test_other_kernels.sh` runs these under other
CPU kernel families."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from tests import golden
from tests.close import FLOAT64_STATISTIC, assert_close_tree


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "fresh"
    golden.measure(out)
    return out


@pytest.fixture(scope="module")
def rebuilt(fresh, tmp_path_factory):
    return golden.report_committed_parts(fresh, tmp_path_factory.mktemp("golden") / "committed")


@pytest.fixture(scope="module")
def expected():
    return json.loads((golden.GOLDEN / "runs.json").read_text())


@pytest.mark.parametrize("folder", golden.RUN_FOLDERS)
def test_the_measurement_is_the_committed_parts(fresh, folder):
    margins = golden.compare_parts(fresh, folders=(folder,))
    assert set(margins) >= {"kl", "ce_delta", "token_id", "sum_x"}  # every column and side field compared


@pytest.mark.parametrize("case", [*golden.CASES, "study"])
def test_the_committed_parts_give_the_committed_numbers(rebuilt, expected, case):
    """Statistics within rel 1e-12; the token tables (the committed parts joined) have, bit for bit, the digests
    recorded before the refactor (a digest is a string: compared exactly)."""
    assert_close_tree(rebuilt[case], expected[case], (case,), FLOAT64_STATISTIC)


def test_a_changed_statistic_fails_with_its_path_both_values_and_the_tolerance():
    ratio = {"comparisons": {"epsilon_random": {"kl_ratio": {"ratio": 0.7905940874148113, "n_contexts": 6}}}}
    nudged = json.loads(json.dumps(ratio))
    nudged["comparisons"]["epsilon_random"]["kl_ratio"]["ratio"] *= 1 + 1e-13  # another summation order
    assert_close_tree(nudged, ratio)
    nudged["comparisons"]["epsilon_random"]["kl_ratio"]["ratio"] = 0.7905940874148113 * (1 + 1e-7)
    with pytest.raises(AssertionError, match=r"comparisons/epsilon_random/kl_ratio/ratio: 0\.79059\d+ != "
                                             r"0\.7905940874148113 \(\|diff\| 7\.9\d*e-08 > .* allowed by rel 1e-12\)"):
        assert_close_tree(nudged, ratio)
    counted = json.loads(json.dumps(ratio))
    counted["comparisons"]["epsilon_random"]["kl_ratio"]["n_contexts"] = 6.0  # a count is an int, exactly
    with pytest.raises(AssertionError, match=r"kl_ratio/n_contexts: 6\.0 != 6 \(compared exactly\)"):
        assert_close_tree(counted, ratio)
    assert_close_tree({"rho": math.nan, "p": None}, {"rho": math.nan, "p": None})
    with pytest.raises(AssertionError, match=r"p: 0\.0 != None"):
        assert_close_tree({"p": 0.0}, {"p": None})
    with pytest.raises(AssertionError, match=r"keys differ: missing \['b'\], unexpected \['c'\]"):
        assert_close_tree({"a": 1, "c": 2}, {"a": 1, "b": 2})


def _nudge(tmp_path, column: str, row: int, change):
    """A copy of the committed parts with one value of all_tokens' first part changed."""
    committed = tmp_path / "parts"
    shutil.copytree(golden.PARTS, committed)
    part = committed / "all_tokens" / "batch_00000.parquet"
    frame = pd.read_parquet(part)
    frame.loc[row, column] = change(frame.loc[row, column])
    frame.to_parquet(part)
    return committed


@pytest.mark.parametrize("column,change,message", [
    # a KL 1e-5 off (relative): far below any change of the measurement, far above float32 rounding
    ("kl", lambda v: v * (1 + 1e-5), r"all_tokens/batch_00000\.parquet/kl/5: .* allowed by rel 1\.91e-06 \+ abs 2\.98e-08"),
    ("ce_delta", lambda v: v + 1e-5, r"all_tokens/batch_00000\.parquet/ce_delta/5: "),
    ("x_norm", lambda v: v * (1 + 1e-5), r"all_tokens/batch_00000\.parquet/x_norm/5: "),
    ("token_id", lambda v: v + 1, r"all_tokens/batch_00000\.parquet/token_id/5: \d+ != \d+ \(compared exactly\)"),
])
def test_a_changed_per_token_value_fails(fresh, tmp_path, column, change, message):
    committed = _nudge(tmp_path, column, 5, change)
    with pytest.raises(AssertionError, match=message):
        golden.compare_parts(fresh, committed, folders=("all_tokens",))
