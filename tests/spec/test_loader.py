"""Spec loading: presets, overrides, and errors that name file, line and field path."""

import textwrap
from pathlib import Path

import pytest

from leafe.errors import SpecError, UserError
from leafe.spec import load_spec

GOOD = """\
leafe: 1
name: t
seed: 3
env: {use: sokoban, max_steps: 7, test_tasks: 2}
models:
  policy: {backend: transformers, name: "leafe:tiny-qwen2", max_tokens: 8}
methods:
  base: {}
  sft: {train: {epochs: 1, lr: 0.001}}
eval: {samples: 4, k: [1, 4]}
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems(tmp_path: Path, text: str, sets=None) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text), sets)
    return e.value.problems


def test_good_spec_merges_preset_and_overrides(tmp_path):
    loaded = load_spec(write(tmp_path, GOOD))
    spec = loaded.spec
    assert spec.env.max_steps == 7  # inline override wins
    assert spec.env.adapter == "sokoban"  # from the preset
    assert "{{ observation }}" in spec.env.prompt.user  # preset template kept
    assert spec.env.options == {"dim": [6, 6], "num_boxes": 1}
    assert loaded.env_options.num_boxes == 1
    assert loaded.method_types == {"base": "base", "sft": "sft"}
    assert loaded.methods["sft"].train.lr == 0.001
    # origins: inline values point at the spec, preset values at the preset file
    assert loaded.where("env", "max_steps").endswith("spec.yaml:4")
    assert "envs/sokoban.yaml" in loaded.where("env", "prompt", "user")


def test_set_overrides_and_their_origin(tmp_path):
    loaded = load_spec(write(tmp_path, GOOD), ["eval.samples=8", "env.options.num_boxes=2"])
    assert loaded.spec.eval.samples == 8
    assert loaded.env_options.num_boxes == 2
    errs = problems(tmp_path, GOOD, ["eval.samples=two"])
    assert errs == [p for p in errs if p.startswith("--set eval.samples=two")]
    assert "eval.samples" in errs[0]


def test_wrong_type_names_file_line_and_path(tmp_path):
    errs = problems(tmp_path, GOOD.replace("samples: 4", "samples: many"))
    assert len(errs) == 1
    assert errs[0].startswith(f"{tmp_path / 'spec.yaml'}:10: eval.samples:".replace(str(tmp_path), str(tmp_path))) or \
        ":10: eval.samples:" in errs[0]
    assert "integer" in errs[0] and "'many'" in errs[0]


def test_unknown_keys_top_and_nested(tmp_path):
    errs = problems(tmp_path, GOOD + "colour: blue\n")
    assert any(":11: colour: unknown key" in e for e in errs)
    errs = problems(tmp_path, GOOD.replace("max_steps: 7", "max_stepz: 7"))
    assert any(":4: env.max_stepz: unknown key" in e for e in errs)


def test_method_fields_are_validated_by_the_method(tmp_path):
    errs = problems(tmp_path, GOOD.replace("lr: 0.001", "lr: fast"))
    assert any(":9: methods.sft.train.lr:" in e for e in errs)
    errs = problems(tmp_path, GOOD.replace("sft: {train", "sftt: {train"))
    assert any("methods.sftt: unknown method 'sftt'" in e for e in errs)


def test_bad_use_name(tmp_path):
    errs = problems(tmp_path, GOOD.replace("use: sokoban", "use: sokoban9"))
    assert len(errs) == 1
    assert ":4: env.use: unknown preset 'sokoban9'" in errs[0]
    assert "sokoban" in errs[0].split("presets in envs/:")[1]


def test_wrong_version(tmp_path):
    errs = problems(tmp_path, GOOD.replace("leafe: 1", "leafe: 2"))
    assert len(errs) == 1
    assert ":1: leafe: spec format version 2 is not supported" in errs[0]
    assert "reads version(s): 1" in errs[0]
    errs = problems(tmp_path, GOOD.replace("leafe: 1\n", ""))
    assert "leafe: missing the spec format version" in errs[0]


def test_broken_yaml(tmp_path):
    errs = problems(tmp_path, GOOD.replace("eval: {samples: 4, k: [1, 4]}", "eval: {samples: 4, k: [1, 4}"))
    assert len(errs) == 1
    assert ":10: YAML syntax error" in errs[0]


def test_k_larger_than_samples_is_a_spec_error(tmp_path):
    errs = problems(tmp_path, GOOD.replace("k: [1, 4]", "k: [1, 8]"))
    assert any("eval:" in e and "k=[8] larger than samples=4" in e for e in errs)


def test_env_options_validated_by_adapter(tmp_path):
    errs = problems(tmp_path, GOOD.replace("max_steps: 7", "max_steps: 7, options: {boxes: 2}"))
    assert any(":4: env.options.boxes: unknown key" in e for e in errs)


def test_template_errors_are_reported(tmp_path):
    bad = GOOD.replace("max_steps: 7", "max_steps: 7, prompt: {user: '{{ observation '}")
    errs = problems(tmp_path, bad)
    assert any("env.prompt.user: template error" in e for e in errs)


def test_init_must_name_a_method(tmp_path):
    errs = problems(tmp_path, GOOD.replace("base: {}", "base: {init: grpo}"))
    assert any("methods.base.init: init names 'grpo'" in e for e in errs)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_every_committed_spec_validates():
    specs = sorted(Path(__file__).resolve().parents[2].joinpath("specs").glob("*.yaml"))
    assert specs, "specs/ must hold at least the quickstart"
    for s in specs:
        load_spec(s)


def test_hostile_yaml_is_a_spec_error_not_a_traceback(tmp_path):
    """Deep nesting, merge keys, non-string keys, unknown tags: each a SpecError at its line."""
    for deep in ("[" * 1_000_000 + "]" * 1_000_000, "{a: " * 80 + "1" + "}" * 80):
        errs = problems(tmp_path, GOOD + f"deep: {deep}\n")
        # libyaml stops at 1000 levels itself, maybe before leafe counts 64
        assert len(errs) == 1 and "spec.yaml:11: " in errs[0] and "nest" in errs[0], errs
    errs = problems(tmp_path, GOOD.replace("eval: {samples: 4, k: [1, 4]}", "base: &b {samples: 4}\neval: {<<: *b}"))
    assert any("YAML merge keys (<<) are not supported" in e for e in errs)
    errs = problems(tmp_path, GOOD + "? [a, b]\n: 1\n")
    assert ":11: (top level): a mapping key must be a string, not a list" in errs[0]
    errs = problems(tmp_path, GOOD + "x: !python/object:os.system echo\n")
    assert ":11: x: cannot read this value" in errs[0]


def test_set_values_are_bounded_and_located_at_the_set(tmp_path):
    bomb = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1]" + "".join(f", &{c} [{', '.join(['*' + p] * 9)}]"
                                                   for p, c in zip("abcdefgh", "bcdefghi")) + "]"
    errs = problems(tmp_path, GOOD, [f"nosuch={bomb}"])
    assert errs[0].startswith("--set nosuch=[&a [1, 1") and "YAML aliases (*name) expand" in errs[0]
    errs = problems(tmp_path, GOOD, ["eval={samples: 4, k: [1, 8]}"])
    assert errs[0].startswith("--set eval={samples: 4, k: [1, 8]}: eval:") and "larger than samples" in errs[0]
