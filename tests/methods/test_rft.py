"""RFT: rejection-sampling fine-tuning on the policy's own successes, through `leafe run`."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from leafe.methods.rft import RFTConfig, examples_from, rollouts_per_task
from leafe.plan import build_plan
from leafe.runner import run
from leafe.spec import load_spec
from leafe.store import RecordLog


def step(task, sample, i, completion, action="up"):
    return {"kind": "step", "task": task, "sample": sample, "step": i, "prompt": [{"role": "user", "content": f"{task}:{i}"}],
            "completion": completion, "action": action, "parsed": action is not None}


def test_examples_keep_successful_parsed_steps_once():
    steps = [step("a", 0, 0, "<action>up</action>"), step("a", 0, 1, "<action>left</action>"),
             step("a", 1, 0, "<action>up</action>"), step("a", 1, 1, "<action>left</action>"),  # same as sample 0
             step("a", 2, 0, "nonsense", action=None), step("a", 2, 1, "<action>up</action>"),
             step("b", 0, 0, "<action>down</action>")]
    episodes = [{"task": "a", "sample": s, "success": True} for s in range(3)] + \
               [{"task": "b", "sample": 0, "success": False}]
    ex = examples_from(steps, episodes, dedupe=True)
    assert [(e["task"], e["step"], e["completion"][0]["content"]) for e in ex] == [
        ("a", 0, "<action>up</action>"), ("a", 1, "<action>left</action>"),
        ("a", 1, "<action>up</action>")]  # sample 2: its unparsable step left out; b failed
    assert len(examples_from(steps, episodes, dedupe=False)) == 5
    assert ex[0]["prompt"] == [{"role": "user", "content": "a:0"}]


def test_rollouts_per_task_never_exceed_the_budget():
    cfg = RFTConfig(method="rft", samples_per_task=8)
    assert rollouts_per_task(cfg, budget=100, max_steps=10) == 8
    assert rollouts_per_task(cfg, budget=25, max_steps=10) == 2
    assert rollouts_per_task(cfg, budget=9, max_steps=10) == 0


SPEC = """\
leafe: 1
name: rft
seed: 2
env: {use: sokoban, max_steps: 4, train_tasks: 4, test_tasks: 2}
models:
  policy: {name: "leafe:tiny-qwen2", max_tokens: 6, batch_size: 16, temperature: 1.0}
budget: {interactions_per_task: 10}
methods:
  sft: {train: {epochs: 40, lr: 5.0e-3, batch_size: 8}}
  rft: {init: sft, samples_per_task: 4, temperature: 0.5, train: {epochs: 1, lr: 1.0e-4, batch_size: 4}}
eval: {samples: 2, k: [1, 2], batch_size: 8}
report: {formats: [json]}
"""


def test_rft_through_leafe_run(tmp_path: Path, leafe_cache):
    f = tmp_path / "rft.yaml"
    f.write_text(SPEC)
    loaded = load_spec(f)
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    plan = build_plan(loaded, tmp_path / "runs")
    d = plan.dir(plan.stage("rft.train"))
    m = json.loads((d / "metrics.json").read_text())
    # 10 // 4 = 2 rollouts per task, each at most 4 steps: within the budget
    assert m["rollouts_per_task"] == 2 and m["rollouts"] == 8
    assert 0 < m["max_task_interactions"] <= 10
    rollouts = RecordLog(d / "rollouts.jsonl").read()
    per_task: dict[str, int] = {}
    for r in rollouts:
        if r["kind"] == "episode":
            per_task[r["task"]] = per_task.get(r["task"], 0) + r["interactions"]
    assert sum(per_task.values()) == m["interactions"] and max(per_task.values()) <= 10
    # trained on its own successes (the memorising sft start solves train tasks), from sft's checkpoint
    assert m["successes"] > 0 and m["examples"] > 0 and m["steps"] >= 1
    start = json.loads((d / "model.json").read_text())["initial"]
    assert Path(start["path"]).resolve() == (plan.dir(plan.stage("sft.train")) / "checkpoint").resolve()
    ck = json.loads((d / "checkpoint" / "leafe_model.json").read_text())
    assert ck["method"] == "rft"
    # evaluation loaded rft's checkpoint; the report counts its interactions
    ev = json.loads((plan.dir(plan.stage("eval.rft")) / "model.json").read_text())
    assert Path(ev["policy"]["path"]).resolve() == (d / "checkpoint").resolve()
    row = next(r for r in json.loads((tmp_path / "reports" / "rft.json").read_text())["rows"] if r["method"] == "rft")
    assert row["train_interactions"] == m["interactions"]
