"""Smoke test of benchmarks/scaleout.py on Sokoban: local pool and Ray actors play the same
trajectories, and the per-call overheads are measured (a few seconds: Ray starts once)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the `ray` extra is not installed")
ROOT = Path(__file__).resolve().parents[1]


def test_scaleout_quick_on_sokoban(tmp_path_factory, monkeypatch):
    # a short path: Ray's socket paths must fit in 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("leafe_bench_scaleout", ROOT / "benchmarks" / "scaleout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        res = module.throughput("sokoban", [1, 2], steps=48)
    finally:
        sys.modules.pop(spec.name, None)
    rows = res["rows"]
    assert [(r["engine"], r["workers"]) for r in rows] == [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]
    assert res["same_trajectory"] and len({r["trajectory"] for r in rows}) == 1
    assert all(r["steps"] == 48 and r["steps_per_s"] > 0 for r in rows)
    for engine in ("local", "ray"):
        o = res["call_overhead"][engine]
        assert 0 < o["median_ms"] <= o["p90_ms"]
