"""benchmarks/soak.py --quick (about 30 s): `leafe run` SIGKILLed during its evaluation and re-run
until it completes loses no episode, duplicates none, and ends with the records, metrics and
report of an undisturbed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak_quick_kills_and_resumes_without_loss(tmp_path, leafe_cache):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--quick", "--out", str(out),
                        "--workdir", str(tmp_path / "work")],
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    checks, soak = res["checks"], res["soak"]
    assert soak["kills"] >= 1 and soak["resumes"] == soak["attempts"] - 1 >= soak["kills"]
    assert checks["episodes_lost"] == 0 and checks["episodes_duplicated"] == 0
    assert checks["episodes_differing"] == 0 and checks["steps_differing"] == 0
    assert checks["metrics_equal"] and checks["report_equal"] and checks["all_stages_done"] and checks["ok"]
    ev = res["comparison"]["eval.base"]["episodes"]
    assert ev["reference"] == ev["got"] == res["episodes"] == 48
    assert soak["attempt_log"][-1]["rc"] == 0 and all(a["rc"] == -9 for a in soak["attempt_log"][:-1])
    assert res["reference"]["rss"]["segments"]  # RSS was sampled while episodes were recorded
