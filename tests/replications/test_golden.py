"""Small configurations in every mode (and a study) reproduce, bit for bit, the numbers committed in
tests/data/golden/runs.json from the code before the run-model refactor (see tests/golden.py)."""

from __future__ import annotations

import json

import pytest

from tests import golden


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return golden.generate(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="module")
def expected():
    return json.loads((golden.GOLDEN / "runs.json").read_text())


@pytest.mark.parametrize("case", [*golden.CASES, "study"])
def test_reproduces_the_committed_numbers(results, expected, case):
    got = json.loads(json.dumps(results[case], sort_keys=True))  # the same JSON round trip as the file
    assert got == expected[case]
