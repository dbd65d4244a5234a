"""The reproduction in miniature (`specs/repro-sokoban*.yaml`, run by hand on a CPU): the rows the
issue asks for, the reflector each LEAFE row uses, and the ablation spec reusing Table 1's stages.
Validation and planning only: fast."""

from __future__ import annotations

from pathlib import Path

from leafe.plan import build_plan
from leafe.spec import load_spec

SPECS = Path(__file__).resolve().parents[2] / "specs"


def test_table1_in_miniature_holds_every_row_with_its_reflector(tmp_path):
    loaded = load_spec(SPECS / "repro-sokoban.yaml")
    assert loaded.spec.run_seeds() == [0, 1, 2] and loaded.spec.budget.match == "leafe_grpo"
    m, types = loaded.methods, loaded.method_types
    assert {k: types[k] for k in m} == {
        "base": "base", "sft": "sft", "rft": "rft", "grpo": "grpo", "ee_iwm": "early_experience",
        "leafe_policy": "leafe", "leafe": "leafe", "leafe_grpo": "leafe"}
    assert all(c.init == "sft" for k, c in m.items() if k not in ("base", "sft", "leafe_grpo"))
    assert m["leafe_grpo"].init == "grpo"
    plan = build_plan(loaded.per_seed()[0], tmp_path)
    reflector = {k: plan.stage(f"{k}.explore").inputs["role:reflector"].get("backend")
                 for k in ("leafe_policy", "leafe", "leafe_grpo")}
    assert reflector == {"leafe_policy": "transformers", "leafe": "oracle", "leafe_grpo": "oracle"}


def test_the_ablations_reuse_table1_in_miniature_and_run_only_what_differs(tmp_path):
    t1 = build_plan(load_spec(SPECS / "repro-sokoban.yaml").per_seed()[0], tmp_path)
    keys = {s.id: s.hash for s in t1.stages}
    loaded = load_spec(SPECS / "repro-sokoban-ablations.yaml")
    plan = build_plan(loaded, tmp_path)
    assert plan.root == t1.root
    shared = [s.id for s in plan.stages if s.id in keys and s.kind != "report"]
    assert len(shared) == 13 and all(plan.stage(i).hash == keys[i] for i in shared)
    new = sorted(s.id for s in plan.stages if s.kind != "report" and s.id not in keys and not s.same_as)
    assert new == sorted([f"{m}.{x}" for m in ("independent", "refine", "refine_policy") for x in ("explore", "distill")]
                         + ["no_cf.distill", "no_rehearsal.distill"]
                         + [f"eval.{m}" for m in ("independent", "refine", "refine_policy", "no_cf", "no_rehearsal")])
    assert sorted(s.id for s in plan.stages if s.same_as) == ["no_cf.explore", "no_rehearsal.explore"]
    m = loaded.methods
    # Table 3: one execution budget for the three ways of exploring
    assert len({m[k].max_attempts for k in ("independent", "refine", "refine_policy", "leafe", "leafe_policy")}) == 1
    assert (m["independent"].explore_mode, m["refine"].rollback, m["refine_policy"].rollback) == (
        "independent", False, False)
    assert plan.stage("refine_policy.explore").inputs["role:reflector"]["backend"] == "transformers"
    assert plan.stage("refine.explore").inputs["role:reflector"] == {"backend": "oracle"}
    # Table 4
    assert (m["no_cf"].counterfactual, m["no_rehearsal"].rehearsal_fraction) == (False, 0)
