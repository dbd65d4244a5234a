"""The paper's specs: Table 1 (alfworld, webshop, sciworld, sokoban), Table 2 (codecontests), and
the Table 3 / 4 ablation specs that share their Table 1 run's stages. Validation and planning
only (no model, no environment episode): fast."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from leafe.plan import build_plan
from leafe.spec import load_spec

SPECS = Path(__file__).resolve().parents[2] / "specs"
TABLE1 = ["alfworld", "webshop", "sciworld", "sokoban"]
PAPER = TABLE1 + ["codecontests"]
TYPES = {"base": "base", "grpo": "grpo", "ee_iwm": "early_experience", "ee_sr": "early_experience",
         "leafe": "leafe", "sft": "sft", "rft": "rft"}
#: verl-agent's episode limits (the paper's harness); ScienceWorld and code: the spec's stated choice
MAX_STEPS = {"alfworld": 50, "webshop": 15, "sokoban": 15, "sciworld": 50, "codecontests": 4}


@pytest.mark.parametrize("name", PAPER)
def test_paper_spec_holds_every_compared_method_from_its_starting_checkpoint(name):
    loaded = load_spec(SPECS / f"{name}.yaml")
    spec, m = loaded.spec, loaded.methods
    assert dict(loaded.method_types) == TYPES
    assert {k: c.init for k, c in m.items()} == {"base": None, "grpo": None, "ee_iwm": None, "ee_sr": None,
                                                 "leafe": "grpo", "sft": None, "rft": "sft"}
    assert (m["ee_iwm"].variant, m["ee_sr"].variant) == ("iwm", "sr")
    # the compared rows are not extra; sft and rft are, and the plan says so
    assert [k for k, c in m.items() if c.extra] == ["sft", "rft"]
    # verl-agent's GRPO preset (groups of 8, the success reward of 10)
    assert (m["grpo"].group_size, m["grpo"].success_reward) == (8, 10.0)
    # the policy reflects and teaches itself, as the paper; no shared hint
    assert spec.models.reflector == "policy" and spec.models.teacher == "policy"
    assert spec.env.share_hint is False
    assert spec.models.policy.name == ("Qwen/Qwen2.5-72B-Instruct" if name == "codecontests"
                                       else "Qwen/Qwen2.5-7B-Instruct")
    assert spec.env.max_steps == MAX_STEPS[name]
    if name != "codecontests":
        assert spec.env.history == 2  # verl-agent's env.history_length
    ev = spec.eval
    assert (ev.samples, ev.temperature, ev.k) == (128, 0.4, [1, 2, 4, 8, 16, 32, 64, 128])
    assert spec.budget.interactions_per_task == 256 and spec.budget.match is None
    # the plan lists every method of the paper's table
    plan = build_plan(loaded, "runs")
    assert {s.method for s in plan.stages if s.kind == "eval"} == set(TYPES)


@pytest.mark.parametrize("name", PAPER + [f"table{t}-{e}" for t in (3, 4) for e in TABLE1])
def test_paper_spec_opens_with_its_command_and_documents_the_swaps(name):
    text = (SPECS / f"{name}.yaml").read_text()
    editor, first = text.splitlines()[:2]  # the editor's schema line, then the command
    assert editor == "# yaml-language-server: $schema=../schema/leafe-spec-1.json"
    assert first.startswith(f"# specs/{name}.yaml — run: ") and f"leafe run specs/{name}.yaml" in first
    # each LEAFE spec names its reflector and shows the one-line API swap (and EE SR's teacher's)
    assert re.search(r"^  reflector: policy$", text, re.M)
    assert "#   reflector: {backend: litellm, name: openai/gpt-4o-mini, api_key_env: OPENAI_API_KEY}" in text
    if not name.startswith("table"):
        assert "#   teacher: {backend: litellm, name: openai/gpt-4o-mini, api_key_env: OPENAI_API_KEY}" in text
        assert "meta-llama/Llama-3.1-8B-Instruct" in text


@pytest.mark.parametrize("name", PAPER)
def test_the_commented_one_line_switches_load(name, tmp_path):
    """Uncommenting the documented line (Llama policy, API reflector or teacher) gives a valid
    spec whose other stages keep their keys where the role is not used."""
    path = SPECS / f"{name}.yaml"
    text = path.read_text()
    base = {s.id: s.hash for s in build_plan(load_spec(path), "runs").stages}
    for role in ("policy", "reflector", "teacher"):
        lines = [ln for ln in text.splitlines() if ln.startswith(f"  #   {role}: {{")]
        assert lines, role
        line = lines[-1].replace("#   ", "", 1)
        swapped = re.sub(rf"^  {role}: .*$", line, text, count=1, flags=re.M)
        if role == "policy":  # the 72B policy line continues on the next line
            swapped = re.sub(r"^\s+tensor_parallel_size: 4}\n", "", swapped, flags=re.M)
        f = tmp_path / f"{name}-{role}.yaml"
        f.write_text(swapped)
        loaded = load_spec(f)
        hashes = {s.id: s.hash for s in build_plan(loaded, "runs").stages}
        if role == "reflector":  # only LEAFE's exploration (and what follows it) calls the reflector
            assert loaded.spec.models.reflector.backend == "litellm"
            assert hashes["grpo.train"] == base["grpo.train"] and hashes["ee_sr.reflect"] == base["ee_sr.reflect"]
            assert hashes["leafe.explore"] != base["leafe.explore"]
        elif role == "teacher":
            assert hashes["leafe.explore"] == base["leafe.explore"] and hashes["ee_sr.reflect"] != base["ee_sr.reflect"]
        else:
            assert "Llama" in loaded.spec.models.policy.name or "7B" in loaded.spec.models.policy.name


@pytest.mark.parametrize("env", TABLE1)
def test_table3_and_table4_share_the_table1_stages(env, tmp_path):
    """A user who ran Table 1 re-runs only what differs: the Table 3 / 4 specs plan into the same
    run directory and their grpo and leafe stages have Table 1's keys; Table 4's ablations share
    leafe's exploration (one directory)."""
    t1 = build_plan(load_spec(SPECS / f"{env}.yaml"), tmp_path)
    keys = {s.id: s.hash for s in t1.stages}
    for t in (3, 4):
        loaded = load_spec(SPECS / f"table{t}-{env}.yaml")
        assert loaded.spec.name == f"table{t}-{env}" and loaded.spec.run_dir == env
        plan = build_plan(loaded, tmp_path)
        assert plan.root == t1.root
        for sid in ("grpo.train", "leafe.explore", "leafe.distill", "eval.grpo", "eval.leafe"):
            assert plan.stage(sid).hash == keys[sid], (t, sid)
        m = loaded.methods
        assert all(c.init == "grpo" for k, c in m.items() if k != "grpo")
        assert all(loaded.method_types[k] == "leafe" for k in m if k != "grpo")
        new = [s.id for s in plan.stages if s.kind != "report" and keys.get(s.id) != s.hash and not s.same_as]
        if t == 3:
            assert (m["independent"].explore_mode, m["refine"].rollback, m["refine"].max_depth) == ("independent", False, 15)
            assert m["refine"].max_attempts == m["leafe"].max_attempts == m["independent"].max_attempts
            assert sorted(new) == ["eval.independent", "eval.refine", "independent.distill", "independent.explore",
                                   "refine.distill", "refine.explore"]
        else:
            assert (m["no_cf"].counterfactual, m["no_rehearsal"].rehearsal_fraction) == (False, 0)
            for k in ("no_cf", "no_rehearsal"):
                explore = plan.stage(f"{k}.explore")
                assert explore.same_as == "leafe.explore" and plan.dir(explore) == t1.dir(t1.stage("leafe.explore"))
            assert sorted(new) == ["eval.no_cf", "eval.no_rehearsal", "no_cf.distill", "no_rehearsal.distill"]


def test_every_paper_spec_validates_from_the_cli():
    import subprocess
    import sys

    names = PAPER + [f"table{t}-{e}" for t in (3, 4) for e in TABLE1]
    r = subprocess.run([sys.executable, "-m", "leafe", "validate", *[str(SPECS / f"{n}.yaml") for n in names]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok ") == len(names)
