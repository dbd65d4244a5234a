"""The stage graph and its keys: a changed input re-runs exactly what depends on it."""

import pytest

from leafe.errors import SpecError
from leafe.plan import build_plan
from leafe.spec import load_spec

SPEC = """\
leafe: 1
name: plan-t
env: {use: sokoban, max_steps: 4, test_tasks: 2}
models:
  policy: {name: "leafe:tiny-qwen2"}
methods:
  base: {}
  sft: {train: {epochs: 1}}
eval: {samples: 2, k: [1, 2]}
"""


def plan_of(tmp_path, text=SPEC, sets=None):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    return build_plan(load_spec(f, sets), tmp_path / "runs")


def hashes(plan):
    return {s.id: s.hash for s in plan.stages}


def test_graph_shape(tmp_path):
    p = plan_of(tmp_path)
    assert [s.id for s in p.stages] == ["sft.train", "eval.base", "eval.sft", "report"]
    assert p.stage("eval.sft").deps == ["sft.train"]
    assert p.stage("eval.base").deps == []
    assert p.stage("report").deps == ["eval.base", "eval.sft"]
    assert p.checkpoint_of == {"base": None, "sft": "sft.train"}
    assert all(p.status(s) == "todo" for s in p.stages if s.kind != "report")


def test_keys_change_only_downstream_of_a_change(tmp_path):
    h0 = hashes(plan_of(tmp_path))
    assert h0 == hashes(plan_of(tmp_path))  # stable
    h1 = hashes(plan_of(tmp_path, sets=["eval.samples=4"]))
    assert h1["sft.train"] == h0["sft.train"]
    assert h1["eval.base"] != h0["eval.base"] and h1["eval.sft"] != h0["eval.sft"]
    h2 = hashes(plan_of(tmp_path, sets=["methods.sft.train.lr=0.1"]))
    assert h2["sft.train"] != h0["sft.train"] and h2["eval.sft"] != h0["eval.sft"]
    assert h2["eval.base"] == h0["eval.base"]
    h3 = hashes(plan_of(tmp_path, sets=["seed=5"]))
    assert all(h3[k] != h0[k] for k in ("sft.train", "eval.base", "eval.sft"))


def test_init_chains_and_cycles(tmp_path):
    p = plan_of(tmp_path, SPEC.replace("base: {}", "base: {init: sft}"))
    assert p.stage("eval.base").deps == ["sft.train"]
    assert p.checkpoint_of["base"] == "sft.train"
    text = SPEC.replace("base: {}", "base: {init: sft}").replace("sft: {train: {epochs: 1}}",
                                                                 "sft: {init: base, train: {epochs: 1}}")
    with pytest.raises(SpecError, match="init cycle"):
        plan_of(tmp_path, text)


def test_named_instances_of_one_method(tmp_path):
    text = SPEC.replace("base: {}", "sft_long: {method: sft, train: {epochs: 3}}")
    p = plan_of(tmp_path, text)
    assert {s.id for s in p.stages} >= {"sft_long.train", "eval.sft_long", "sft.train"}
    assert p.stage("sft_long.train").hash != p.stage("sft.train").hash


def test_policy_spec_for_a_checkpoint_drops_the_adapter(tmp_path):
    """A trained checkpoint already holds the merged adapter: loading it must not apply the
    adapter a second time."""
    import io

    from rich.console import Console

    from leafe.stage import StageContext

    f = tmp_path / "a.yaml"
    f.write_text('leafe: 1\nname: a\nenv: {use: sokoban}\nmodels:\n  policy: {name: "leafe:tiny-qwen2", '
                 'adapter: /some/lora, revision: main}\nmethods:\n  sft: {}\neval: {samples: 1, k: [1]}\n')
    loaded = load_spec(f)
    plan = build_plan(loaded, tmp_path / "runs")
    ctx = StageContext(loaded, plan, plan.stage("eval.sft"), tmp_path, Console(file=io.StringIO()))
    assert ctx.policy_spec(None).adapter == "/some/lora"
    ck = ctx.policy_spec(tmp_path / "checkpoint")
    assert (ck.name, ck.adapter, ck.revision) == (str(tmp_path / "checkpoint"), None, None)
