"""The chaos run (``bench/chaos.py``) in short: both servers as child processes on loopback, four clients picking
normal and hostile actions for 40 s. The committed ten-minute run is ``bench/results/chaos-tiny.md``."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("wyoming")


def test_a_short_chaos_run_loses_nothing_and_leaks_nothing(tiny_bundle):
    from qwen3_tts_edge.bench import chaos

    r = chaos.run(tiny_bundle, seconds=40, clients=4, sample_s=2, seed=1, warm_up_s=10)
    report = chaos.markdown({"bundle": "tiny", "machine": "test", "command": "test"}, r)
    assert r["passed"], report
    runs = {name: sum(v for k, v in c.items() if k != "accepted") for name, c in r["actions"].items()}
    assert set(runs) == set(chaos.ACTIONS) and min(runs.values()) >= 1, report  # every kind of action was tried
    accepted = {name: c.get("accepted", 0) for name, c in r["actions"].items()}
    assert accepted["http normal"] >= 1 and accepted["wyoming synthesize"] >= 1, report
    assert r["totals"].get("cancelled", 0) >= 1 and r["totals"].get("refused", 0) >= 1, report
