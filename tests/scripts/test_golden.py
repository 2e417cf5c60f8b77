"""The single-process golden runs (tests/golden_runs.py) reproduce their stored final EMA weights bit for bit."""

from golden_runs import SINGLE_PROCESS
from helpers import assert_golden


def test_golden_runs_reproduce_their_stored_hashes(tmp_path):
    assert_golden(SINGLE_PROCESS, tmp_path)
