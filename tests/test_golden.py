"""The golden runs (tests/golden_runs.py) reproduce their stored final EMA weights bit for bit."""

import json

import golden_runs


def test_golden_runs_reproduce_their_stored_hashes(tmp_path):
    stored = json.loads(golden_runs.HASHES.read_text())
    assert set(stored) == set(golden_runs.JOBS), "tests/golden_hashes.json and golden_runs.JOBS name other runs"
    now = golden_runs.run_all(tmp_path)
    differ = {
        name: sorted(k for k in set(stored[name]) | set(now[name]) if stored[name].get(k) != now[name].get(k))
        for name in stored
    }
    differ = {name: keys for name, keys in differ.items() if keys}
    assert not differ, "runs whose final EMA weights changed: " + "; ".join(
        f"{name}: {len(keys)} tensors, e.g. {keys[:3]}" for name, keys in differ.items()
    )
