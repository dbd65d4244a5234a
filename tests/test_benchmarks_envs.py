"""Smoke test of benchmarks/envs.py's core on Sokoban in quick mode (about 2 s)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "envs.py"
    spec = importlib.util.spec_from_file_location("leafe_bench_envs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_sokoban_quick_result_structure(bench):
    res = bench.run_env("sokoban", depths=(5, 20), workers=2, quick=True, steps=8)

    restore = res["restore"]
    assert [(r["depth"], r["mode"]) for r in restore] == [
        (5, "native"), (5, "replay"), (20, "native"), (20, "replay")]
    for r in restore:
        assert r["reachable"] and r["reps"] >= 1
        assert 0 < r["median_ms"] <= r["p90_ms"]
        assert r["native"] == (r["mode"] == "native")
    for replay in restore[1::2]:
        assert replay["replay_over_native"] > 0
    # replaying 20 moves costs more than copying a few arrays back
    deep_native, deep_replay = restore[2], restore[3]
    assert deep_replay["median_ms"] > deep_native["median_ms"]

    rows = res["throughput"]
    assert [r["workers"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["steps"] >= 8 and r["wall_s"] > 0 and r["steps_per_s"] > 0
        assert r["same_trajectory"]  # the same seeded actions in every configuration
    assert rows[1]["speedup_vs_1_worker"] == 1.0
