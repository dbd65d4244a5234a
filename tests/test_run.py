"""End to end on the tiny model: train → checkpoint → evaluate → report; cached re-runs;
SIGKILL mid-evaluation resumes without losing or duplicating records, to the same results."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from leafe.metrics import episode_metrics
from leafe.plan import build_plan
from leafe.runner import run
from leafe.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
leafe: 1
name: e2e
seed: 7
env: {use: sokoban, max_steps: 3, train_tasks: 6, test_tasks: 3}
models:
  policy: {name: "leafe:tiny-qwen2", max_tokens: 6, batch_size: 8, temperature: 1.0}
budget: {interactions_per_task: 8}
methods:
  base: {}
  sft: {train: {epochs: 1, lr: 0.001, batch_size: 4}}
eval: {samples: 4, k: [1, 2, 4], batch_size: 4}
report: {formats: [md, json]}
"""


def records(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "records.jsonl").read_text().splitlines()]


def check_records(recs: list[dict], tasks: int, samples: int) -> None:
    eps = [r for r in recs if r["kind"] == "episode"]
    assert Counter((e["task"], e["sample"]) for e in eps) == Counter(
        {(t, s): 1 for t in {e["task"] for e in eps} for s in range(samples)})
    assert len(eps) == tasks * samples
    steps = [(r["task"], r["sample"], r["step"]) for r in recs if r["kind"] == "step"]
    assert len(steps) == len(set(steps)), "duplicate step records"
    per_ep = Counter((t, s) for t, s, _ in steps)
    for e in eps:
        assert per_ep[(e["task"], e["sample"])] == e["steps"]


def test_end_to_end_then_cached(tmp_path, leafe_cache):
    f = tmp_path / "e2e.yaml"
    f.write_text(SPEC)
    loaded = load_spec(f)
    out = io.StringIO()
    data = run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=out, width=150))
    plan = build_plan(loaded, tmp_path / "runs")
    assert all(plan.status(s) == "done" for s in plan.stages if s.kind != "report")

    # the sft stage wrote a checkpoint and evaluation loaded exactly that directory
    ck = plan.dir(plan.stage("sft.train")) / "checkpoint"
    assert (ck / "config.json").exists() and list(ck.glob("*.safetensors"))
    model_info = json.loads((plan.dir(plan.stage("eval.sft")) / "model.json").read_text())
    assert Path(model_info["policy"]["path"]).resolve() == ck.resolve()
    train = json.loads((plan.dir(plan.stage("sft.train")) / "metrics.json").read_text())
    assert train["interactions"] > 0 and train["steps"] >= 1 and train["examples"] > 0
    assert train["last_loss"] < train["first_loss"]

    # records: each (task, sample) once; the report equals a recomputation from them
    report_json = json.loads((tmp_path / "reports" / "e2e.json").read_text())
    for name in ("base", "sft"):
        recs = records(plan.dir(plan.stage(f"eval.{name}")))
        check_records(recs, tasks=3, samples=4)
        m = episode_metrics([r for r in recs if r["kind"] == "episode"], [1, 2, 4])
        row = next(r for r in report_json["rows"] if r["method"] == name)
        assert row["pass@k"] == m["pass@k"] and row["success_rate"] == m["success_rate"]
        assert row["prompt_tokens"] == m["prompt_tokens"] > 0
    md = (tmp_path / "reports" / "e2e.md").read_text()
    assert "| base" in md and "| sft" in md and "pass@4" in md
    assert "pass@4" in out.getvalue()

    manifest = json.loads((tmp_path / "runs" / "e2e" / "manifest.json").read_text())
    assert manifest["spec"]["name"] == "e2e" and manifest["seeds"]["master"] == 7
    assert manifest["packages"]["torch"] and manifest["host"]["cpus"]
    assert {s["id"] for s in manifest["stages"]} == {"sft.train", "eval.base", "eval.sft", "report"}
    assert manifest["models"]["eval.base"]["policy"]["weights_sha256"]
    # model usage per stage and role: one sample per recorded step, tokens as in the records
    for name in ("base", "sft"):
        recs = records(plan.dir(plan.stage(f"eval.{name}")))
        steps = [r for r in recs if r["kind"] == "step"]
        usage = manifest["usage"][f"eval.{name}"]["policy"]
        assert usage["samples"] == len(steps) and usage["errors"] == 0
        assert usage["completion_tokens"] == sum(r["completion_tokens"] for r in steps)

    # a second run executes nothing and reports the same numbers
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("records.jsonl")}
    out2 = io.StringIO()
    data2 = run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=out2, width=150))
    assert out2.getvalue().count("(cached:") == 3 and "▶" not in out2.getvalue()
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    strip = lambda d: [{k: v for k, v in r.items()} for r in d["rows"]]  # noqa: E731
    assert strip(data2) == strip(data)


KILL_SPEC = """\
leafe: 1
name: kill
seed: 3
env: {use: sokoban, max_steps: 4, test_tasks: 6}
models:
  policy: {name: "leafe:tiny-qwen2", max_tokens: 6, temperature: 1.0}
methods:
  base: {}
eval: {samples: 8, k: [1, 8], batch_size: 4}
report: {formats: [json]}
"""


def leafe_run(spec: Path, runs: Path, reports: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "leafe", "run", str(spec), "--runs-dir", str(runs),
                             "--reports-dir", str(reports)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def test_sigkill_mid_eval_resumes_to_identical_records(tmp_path, leafe_cache):
    f = tmp_path / "kill.yaml"
    f.write_text(KILL_SPEC)
    # reference: uninterrupted
    p = leafe_run(f, tmp_path / "ref", tmp_path / "rep_ref")
    assert p.wait(timeout=300) == 0, p.stderr.read()

    # interrupted: SIGKILL once some (but not all) episodes are recorded
    p = leafe_run(f, tmp_path / "runs", tmp_path / "rep")
    log = None
    deadline = time.time() + 240
    while time.time() < deadline:
        found = list((tmp_path / "runs").glob("kill/eval.base-*/records.jsonl"))
        if found and sum('"kind": "episode"' in line for line in found[0].read_text().splitlines()) >= 6:
            log = found[0]
            break
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert log is not None, "the run finished or never started before it could be killed"
    partial = log.read_text().splitlines()
    n_eps = sum('"kind": "episode"' in line for line in partial)
    assert 6 <= n_eps < 48, n_eps
    assert not (log.parent / "DONE").exists()

    p = leafe_run(f, tmp_path / "runs", tmp_path / "rep")
    assert p.wait(timeout=300) == 0, p.stderr.read()

    ref_log = next((tmp_path / "ref").glob("kill/eval.base-*/records.jsonl"))
    got, ref = records(log.parent), records(ref_log.parent)
    check_records(got, tasks=6, samples=8)
    key = lambda r: (r["task"], r["sample"], r["kind"], r.get("step", -1))  # noqa: E731
    assert sorted(got, key=key) == sorted(ref, key=key)
    m_got = json.loads((log.parent / "metrics.json").read_text())
    m_ref = json.loads((ref_log.parent / "metrics.json").read_text())
    # usage is what was spent: the killed run re-drew the samples of its unfinished chunk
    u_got, u_ref = m_got.pop("usage")["policy"], m_ref.pop("usage")["policy"]
    assert m_got == m_ref
    assert u_got["samples"] >= u_ref["samples"] == sum(r["kind"] == "step" for r in ref)


def test_several_seeds_run_apart_and_report_mean_and_std(tmp_path, leafe_cache):
    f = tmp_path / "seeds.yaml"
    f.write_text(SPEC.replace("name: e2e", "name: seeds").replace("  sft: {train: {epochs: 1, lr: 0.001, batch_size: 4}}\n", "")
                 + "seeds: [0, 1]\n")
    loaded = load_spec(f)
    data = run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    root = tmp_path / "runs" / "seeds"
    evals = sorted(root.glob("eval.base-*"))
    assert len(evals) == 2 and all((d / "DONE").exists() for d in evals)  # one evaluation per seed
    assert sorted(p.name for p in root.glob("manifest*.json")) == ["manifest.seed-0.json", "manifest.seed-1.json"]
    row = data["rows"][0]
    assert row["seeds_done"] == [0, 1] and data["seeds"] == [0, 1]
    per_seed = []
    for d in evals:
        recs = records(d)
        check_records(recs, tasks=3, samples=4)
        eps = [r for r in recs if r["kind"] == "episode"]
        per_seed.append(sum(e["success"] for e in eps) / len(eps))
    assert sorted(s["success_rate"] for s in row["per_seed"]) == pytest.approx(sorted(per_seed))
    assert row["success_rate"] == pytest.approx(sum(per_seed) / 2)
    assert row["pass@k_stats"]["1"]["std"] is not None
    # the records of the two seeds differ (seeds are not shared)
    assert records(evals[0]) != records(evals[1])


def test_a_training_bar_that_stops_before_its_ceiling_ends_full():
    """GRPO's max_steps is a ceiling (it stops when the budget is spent): the bar ends at the steps
    trained, not at 41/64."""
    from types import SimpleNamespace

    from leafe.progress import training_callback

    out = io.StringIO()
    cb = training_callback(Console(file=out, width=120, force_terminal=False), "grpo.train")
    state = SimpleNamespace(max_steps=64, global_step=0)
    cb.on_train_begin(None, state, None)
    state.global_step = 41
    cb.on_step_end(None, state, None)
    task = cb.progress.tasks[0]
    assert (task.completed, task.total) == (41, 64)
    progress = cb.progress
    cb.on_train_end(None, state, None)
    assert (progress.tasks[0].completed, progress.tasks[0].total) == (41, 41) and cb.progress is None
