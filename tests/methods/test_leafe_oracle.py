"""LEAFE with the oracle reflector (`models.reflector: oracle`): the explorer asks the
environment's solver instead of a model, its replies go through the reply format, parse path and
records of a model's; the explore stage's key holds the role; validation refuses an environment
without a solver (exit 2); the manifest, the report and the tree view label the method; and an
end-to-end `leafe run` on Sokoban with the tiny model, where the oracle makes the branches."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from leafe import envs
from leafe.cli import app
from leafe.envs.oracle import EnvOracle
from leafe.methods.leafe import LeafeConfig
from leafe.methods.leafe.explore import Explorer
from leafe.models.base import ChatModel, Completion, Sampling
from leafe.spec.schema import EnvSpec

_FIXED = {"#": 0, "_": 1, "O": 2, "X": 1, "P": 1}
_STATE = {"#": 0, "_": 1, "O": 2, "X": 4, "P": 5}
#: The box right above its target, the player above the box: the solution is down, down.
COLUMN = ["######",
          "#_P__#",
          "#_X__#",
          "#____#",
          "#_O__#",
          "######"]
NOTE = "Lesson from an earlier attempt:"


def column_env():
    env = envs.make("sokoban")
    env._rooms["train-00000"] = (np.array([[_FIXED[c] for c in r] for r in COLUMN]),
                                 np.array([[_STATE[c] for c in r] for r in COLUMN]))
    return env


class Policy(ChatModel):
    """`left` until an experience is in the prompt, then `down`."""

    def _generate(self, conversations, sampling, seeds):
        return [Completion(f"<action>{'down' if NOTE in conv[-1]['content'] else 'left'}</action>", i, 0, 5, 2)
                for i, conv in enumerate(conversations)]


class Down(ChatModel):
    def _generate(self, conversations, sampling, seeds):
        return [Completion("<action>down</action>", i, 0, 5, 2) for i in range(len(conversations))]


def explore(policy, fmt="tags", **kw):
    cfg = LeafeConfig(method="leafe", **{"reflect_every": None, "reflection": {"format": fmt}, **kw})
    oracle = EnvOracle(column_env(), "sokoban")
    spec = EnvSpec(adapter="sokoban", max_steps=3, prompt={"user": "{{ observation }}"})
    [tree] = Explorer(policy=policy, reflector=oracle, env_spec=spec, env_adapter="sokoban", cfg=cfg, budget=50,
                      policy_sampling=Sampling(), reflect_sampling=None, seed=0, make_env=column_env).explore(
        ["train-00000"])
    return tree, oracle


@pytest.mark.parametrize("fmt", ["tags", "json"])
def test_the_oracle_names_the_wasted_step_and_its_branch_fixes_the_task(fmt):
    tree, oracle = explore(Policy(), fmt)
    root, branch = tree["nodes"]
    assert root["actions"] == ["left", "left", "left"] and root["outcome"] == "failure"
    [refl] = root["reflections"]
    experience = "At step 1, moving left took you no closer to solving the puzzle; move down instead."
    # the reply is written in the method's declared format and parsed like a model's
    raw = (f"<step>1</step><experience>{experience}</experience>" if fmt == "tags"
           else json.dumps({"step": 1, "experience": experience}))
    assert refl == {"at_step": 3, "trigger": "failure", "sample": 0, "attempt": 0, "raw": raw, "ok": True,
                    "branch": True, "step": 1, "experience": experience, "error": None}
    assert (branch["tau"], branch["experience"], branch["in_prompt"]) == (1, experience, True)
    assert branch["actions"] == ["down", "down"] and branch["outcome"] == "success"
    assert tree["success"] and not tree["root_success"] and tree["reflector"] == "oracle"
    u = oracle.usage.as_dict()
    assert (u["calls"], u["samples"], u["prompt_tokens"], u["completion_tokens"]) == (1, 1, 0, 0)


def test_an_on_track_running_attempt_is_declined():
    tree, _ = explore(Down(), reflect_every=1)
    [root] = tree["nodes"]
    assert root["outcome"] == "success" and root["actions"] == ["down", "down"]
    [refl] = root["reflections"]  # at step 1 (periodic); step 2 solved the puzzle
    assert (refl["trigger"], refl["ok"], refl["branch"], refl["raw"]) == ("periodic", True, False,
                                                                         "<step>none</step>")


def test_a_failure_with_every_step_on_track_still_names_a_step():
    # one step allowed, two needed: the attempt fails on track
    spec = EnvSpec(adapter="sokoban", max_steps=1, prompt={"user": "{{ observation }}"})
    cfg = LeafeConfig(method="leafe", reflect_every=None, max_depth=1)
    [tree] = Explorer(policy=Down(), reflector=EnvOracle(column_env(), "sokoban"), env_spec=spec,
                      env_adapter="sokoban", cfg=cfg, budget=50, policy_sampling=Sampling(), reflect_sampling=None,
                      seed=0, make_env=column_env).explore(["train-00000"])
    root, branch = tree["nodes"]
    [refl] = root["reflections"]
    assert refl["ok"] and refl["step"] == 1 and refl["experience"].startswith("Every move up to step 1 was on a "
                                                                             "shortest path")
    assert branch["same_action"]  # the solver's move was the one taken: recorded, never distilled


def test_several_branches_per_reflection_point_are_refused_with_the_oracle():
    with pytest.raises(ValueError, match="branches_per_node must be 1"):
        explore(Down(), branches_per_node=2)


# -- spec, plan, refusal -------------------------------------------------------------------------
SPEC = """\
leafe: 1
name: leafe-oracle
seed: 3
env: {{use: sokoban, max_steps: 3, train_tasks: 4, test_tasks: 2, action: {{on_parse_failure: passthrough}}}}
models:
  policy: {{name: "leafe:tiny-qwen2", max_tokens: 6, batch_size: 16, temperature: 1.0}}
  reflector: {reflector}
budget: {{interactions_per_task: 9}}
methods:
  base: {{}}
  leafe:
    reflect_every: null
    max_depth: 2
    max_attempts: 3
    batch_tasks: 4
    only_successful: false
    rehearsal_fraction: 0.0
    train: {{epochs: 1, lr: 0.001, batch_size: 4, grad_accum: 1}}
eval: {{samples: 2, k: [1, 2], batch_size: 4}}
report: {{formats: [md, json, tex, html], compare: [[leafe, base]]}}
"""


def write(tmp_path: Path, reflector="oracle", name="leafe-oracle.yaml") -> Path:
    f = tmp_path / name
    f.write_text(SPEC.format(reflector=reflector))
    return f


def test_switching_to_the_oracle_rekeys_exploration_and_what_follows_only(tmp_path):
    from leafe.plan import build_plan
    from leafe.spec import load_spec

    oracle = build_plan(load_spec(write(tmp_path)), tmp_path / "runs")
    policy = build_plan(load_spec(write(tmp_path, "policy", "p.yaml")), tmp_path / "runs")
    assert oracle.stage("leafe.explore").inputs["role:reflector"] == {"backend": "oracle"}
    changed = {s.id for s in oracle.stages if s.hash != policy.stage(s.id).hash}
    assert changed == {"leafe.explore", "leafe.distill", "eval.leafe", "report"}


def test_an_environment_without_a_solver_is_refused_at_validation_with_exit_2(tmp_path):
    f = tmp_path / "sci.yaml"
    f.write_text(SPEC.format(reflector="oracle").replace("use: sokoban", "use: sciworld"))
    r = CliRunner().invoke(app, ["validate", str(f)])
    assert r.exit_code == 2
    out = " ".join(r.output.split())
    assert f"{f}:7: models.reflector: methods.leafe calls the reflector: the oracle reflector uses the " \
           "environment's own solver, but `sciworld` has no solver that can plan from a mid-episode state; " \
           "set models.reflector to `policy` or a model mapping" in out
    r = CliRunner().invoke(app, ["validate", str(f), "--set", "models.reflector=policy"])
    assert r.exit_code == 0, r.output
    # official ALFWorld games: the planner's replanning cost was measured on generated ones only
    r = CliRunner().invoke(app, ["validate", str(write(tmp_path)), "--set", "env.use=alfworld",
                                 "--set", "env.options.source=official"])
    assert r.exit_code == 2 and "only on generated games (source: generated)" in " ".join(r.output.split())


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow  # about 15-30 s: exploration, distillation and two evaluations with the tiny model
def test_leafe_run_with_the_oracle_reflector_branches_and_is_labelled_everywhere(tmp_path, leafe_cache,
                                                                                  monkeypatch):
    from leafe.plan import build_plan
    from leafe.spec import load_spec

    spec = write(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["run", spec.name, "--runs-dir", "runs", "--reports-dir", "reports"])
    assert r.exit_code == 0, r.output
    plan = build_plan(load_spec(spec), tmp_path / "runs")
    d = plan.dir(plan.stage("leafe.explore"))
    trees = [json.loads(x) for x in (d / "trees.jsonl").read_text().splitlines()]
    assert len(trees) == 4 and all(t["reflector"] == "oracle" for t in trees)
    branches = [n for t in trees for n in t["nodes"] if n["parent"] is not None]
    assert branches, "the oracle made no branch"
    reflections = [x for t in trees for n in t["nodes"] for x in n["reflections"]]
    # every failure reflection named a step (the oracle never needs a retry) and says what to do
    assert reflections and all(x["ok"] and x["branch"] and x["attempt"] == 0 for x in reflections)
    assert all(x["experience"].startswith(f"At step {x['step']},") or x["experience"].startswith("Every move")
               for x in reflections)
    assert all(n["experience"] in {x["experience"] for x in reflections} for n in branches)
    # usage like a model's: calls counted, no tokens
    usage = json.loads((d / "usage.json").read_text())["reflector"]
    assert usage["calls"] >= 1 and usage["samples"] == len(reflections)
    assert usage["prompt_tokens"] == usage["completion_tokens"] == 0
    assert json.loads((d / "model.json").read_text())["reflector"] == {
        "backend": "oracle", "env": "sokoban", "solver": "breadth-first search over (player, boxes), fewest moves"}
    manifest = json.loads((plan.root / "manifest.json").read_text())
    assert manifest["roles"]["reflector"] == {"backend": "oracle", "env": "sokoban"}
    assert manifest["models"]["leafe.explore"]["reflector"]["backend"] == "oracle"

    # the report labels the method in every format; base is not labelled
    rep = tmp_path / "reports"
    js = json.loads((rep / "leafe-oracle.json").read_text())
    rows = {x["method"]: x for x in js["rows"]}
    assert rows["leafe"]["oracle_reflector"] == ["leafe"] and "oracle_reflector" not in rows["base"]
    assert js["stage1"]["rows"][0]["oracle_reflector"] == ["leafe"]
    md = (rep / "leafe-oracle.md").read_text()
    assert "| leafe [oracle reflector] " in md and "| base " in md and "privileged information" in md
    assert "| leafe [oracle reflector] − base " in md  # the paired comparison too
    tex = (rep / "leafe-oracle.tex").read_text()
    assert "leafe [oracle reflector] &" in tex and "privileged information" in tex
    assert max(map(ord, tex)) < 256  # τ in the note is written as math: pdflatex takes it
    html = (rep / "leafe-oracle.html").read_text()
    assert "leafe [oracle reflector]</td>" in html and "privileged information" in html
    assert "leafe [oracle reflector]" in (rep / "leafe-oracle.passk.svg").read_text()
    assert "leafe [oracle reflector]" in r.output  # the terminal table
    # the tree view
    task = next(t["task"] for t in trees if len(t["nodes"]) > 1)
    r = CliRunner().invoke(app, ["show", "tree", "runs/leafe-oracle", task])
    assert r.exit_code == 0 and "oracle reflector" in " ".join(r.output.split()) and "experience:" in r.output
    r = CliRunner().invoke(app, ["show", "tree", "runs/leafe-oracle", "--list"])
    assert r.exit_code == 0 and "oracle reflector" in " ".join(r.output.split())


def test_the_report_labels_a_method_that_starts_from_an_oracle_explored_one(tmp_path):
    """Without running anything: labels come from the plan's keys and the spec."""
    from leafe.report.data import method_label, oracle_methods
    from leafe.plan import build_plan
    from leafe.spec import load_spec

    f = write(tmp_path)
    loaded = load_spec(f, ["methods.after={method: sft, init: leafe}"])
    plan = build_plan(loaded, tmp_path / "runs")
    assert oracle_methods(plan, "leafe") == ["leafe"] and oracle_methods(plan, "after") == ["leafe"]
    assert oracle_methods(plan, "base") == []
    assert method_label({"method": "after", "init": "leafe", "oracle_reflector": ["leafe"]}) == \
        "after ← leafe [oracle reflector via leafe]"
    policy = build_plan(load_spec(f, ["models.reflector=policy"]), tmp_path / "runs")
    assert oracle_methods(policy, "leafe") == []


def test_a_method_may_name_its_own_reflector_and_only_its_stages_change(tmp_path):
    """`methods.<name>.models.reflector`: one spec compares LEAFE reflecting with the policy and
    with the oracle. The override keys that method's exploration like a spec-level role; the
    other LEAFE method keeps the spec's reflector and its key."""
    from leafe.manifest import roles
    from leafe.planinfo import plan_json
    from leafe.plan import build_plan
    from leafe.report.data import oracle_methods
    from leafe.spec import load_spec

    f = write(tmp_path, "policy")
    own = ["methods.leafe_oracle={use: leafe, reflect_every: null, max_attempts: 3, batch_tasks: 4, "
           "models: {reflector: oracle}}"]
    loaded = load_spec(f, own)
    plan = build_plan(loaded, tmp_path / "runs")
    alone = build_plan(load_spec(write(tmp_path, "oracle", "o.yaml")), tmp_path / "runs")
    assert plan.stage("leafe_oracle.explore").inputs["role:reflector"] == {"backend": "oracle"}
    assert plan.stage("leafe.explore").inputs["role:reflector"]["backend"] == "transformers"
    # the same exploration as a spec whose reflector is the oracle (the same config fields)
    policy_only = build_plan(load_spec(f), tmp_path / "runs")
    assert plan.stage("leafe.explore").hash == policy_only.stage("leafe.explore").hash
    assert oracle_methods(plan, "leafe_oracle") == ["leafe_oracle"] and oracle_methods(plan, "leafe") == []
    assert alone.stage("leafe.explore").inputs["role:reflector"] == {"backend": "oracle"}
    # the manifest names the method's own role; the plan says where it runs
    assert roles(loaded)["by_method"] == {"leafe_oracle": {"reflector": {"backend": "oracle", "env": "sokoban"}}}
    st = {s["id"]: s for s in plan_json(loaded, [(0, plan)])["stages"]}
    assert st["leafe_oracle.explore"]["roles"]["reflector"]["backend"] == "oracle"
    assert st["leafe_oracle.explore"]["bounds"]["tokens"]["reflector"] == 0  # no model
    assert st["leafe.explore"]["roles"]["reflector"] == {"same_as": "policy"}
    # a method's own oracle is checked like a spec-level one (several branches repeat it)
    r = CliRunner().invoke(app, ["validate", str(f), "--set", own[0], "--set",
                                 "methods.leafe_oracle.branches_per_node=2"])
    assert r.exit_code == 2 and "branches_per_node" in r.output
    # and refused where the environment has no solver, pointing at the method's field
    sci = tmp_path / "sci.yaml"
    sci.write_text(f.read_text().replace("use: sokoban", "use: sciworld"))
    r = CliRunner().invoke(app, ["validate", str(sci), "--set", own[0]])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "methods.leafe_oracle.models.reflector: methods.leafe_oracle calls the reflector" in out
    # an unknown role is refused
    r = CliRunner().invoke(app, ["validate", str(f), "--set", "methods.leafe.models={policy: policy}"])
    assert r.exit_code == 2 and "methods.leafe.models.policy" in " ".join(r.output.split())
