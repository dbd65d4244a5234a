"""The spec's JSON Schema (`leafe schema`, schema/leafe-spec-1.json) and reference page
(docs/spec-reference.md): committed and current, valid for every shipped spec, and as strict as
`leafe validate` on malformed ones."""

import copy
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from leafe.cli import app
from leafe.spec import export

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


@pytest.fixture(scope="module")
def schema():
    return export.spec_json_schema()


@pytest.fixture(scope="module")
def jsonschema():
    return pytest.importorskip("jsonschema")  # in the `dev` extra; the staleness test needs none


@pytest.fixture(scope="module")
def validator(schema, jsonschema):
    return jsonschema.Draft202012Validator(schema)


def test_committed_schema_and_reference_are_current():
    """The CI staleness gate: a docstring, field, method or adapter changed without rebuilding."""
    stale = [str(rel) for rel, text in export.generated_files().items()
             if not (ROOT / rel).is_file() or (ROOT / rel).read_text(encoding="utf-8") != text]
    assert not stale, f"stale: {', '.join(stale)}; run `leafe schema --write` and commit them"


def test_the_schema_is_json_schema_2020_12(schema, jsonschema):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_docstrings_become_descriptions(schema):
    from leafe.envs.sokoban import SokobanEnv
    from leafe.methods.sft import SFTConfig

    defs = schema["$defs"]
    assert defs["method.sft"]["description"] == SFTConfig.__doc__.strip()
    assert defs["method.sft"]["properties"]["train"]["description"] == "Fine-tuning hyper-parameters."
    samples = defs["EvalSpec"]["properties"]["samples"]
    assert samples["description"] == "Independent rollouts per test task (n in pass@k)."
    assert "description" in defs["env-options.sokoban"]["properties"]["num_boxes"]
    assert set(defs["env-options.sokoban"]["properties"]) == set(SokobanEnv.Options.model_fields)
    # default_factory defaults are shown too
    assert defs["EvalSpec"]["properties"]["k"]["default"] == [1, 8]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_validates_and_points_at_the_schema(path, validator):
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == export.EDITOR_LINE
    assert (path.parent / "../schema/leafe-spec-1.json").resolve() == ROOT / export.SCHEMA_FILE
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(text))]
    assert not errors


QUICKSTART = yaml.safe_load((ROOT / "specs" / "quickstart.yaml").read_text(encoding="utf-8"))

MALFORMED = {
    "unknown top-level key": lambda d: d.update(colour="red"),
    "wrong type": lambda d: d["eval"].update(samples="many"),
    "unsupported version": lambda d: d.update(leafe=2),
    "name that is no file name": lambda d: d.update(name="a/b"),
    "unknown method use:": lambda d: d["methods"].update(x={"use": "no-such-preset"}),
    "unknown method: type": lambda d: d["methods"].update(x={"method": "no_such_method"}),
    "unknown method key": lambda d: d["methods"].update(no_such_method={}),
    "unknown method field": lambda d: d["methods"]["sft"].update(trian={}),
    "method field of another method": lambda d: d["methods"].update(sft2={"method": "rft", "group_size": 4}),
    "wrong type in a method's nested field": lambda d: d["methods"]["sft"]["train"].update(epochs="x"),
    "unknown key in a preset method": lambda d: d["methods"].update(g={"use": "grpo-verl-agent", "grup_size": 4}),
    "bad env option (unknown)": lambda d: d["env"].update(options={"dims": [6, 6]}),
    "bad env option (type)": lambda d: d["env"].update(options={"num_boxes": "two"}),
    "option of another adapter": lambda d: d["env"].update(options={"task_types": ["pick_and_place_simple"]}),
    "unknown env use:": lambda d: d["env"].update(use="no-such-env"),
    "unknown adapter": lambda d: d["env"].update(adapter="no_such_env"),
    "env without use, adapter or prompt": lambda d: d["env"].pop("use"),
    "field of another backend": lambda d: d["models"]["policy"].update(api_base="http://127.0.0.1:8000/v1"),
    "no methods": lambda d: d.update(methods={}),
}

WELL_FORMED = {
    "a built-in method as null": lambda d: d["methods"].update(base=None),
    "a variant named by method:": lambda d: d["methods"].update(sft_long={"method": "sft", "train": {"epochs": 3}}),
    "a preset method with overrides": lambda d: d["methods"].update(g={"use": "grpo-verl-agent", "group_size": 4}),
    "a key of one method with method: another": lambda d: d["methods"].update(sft={"method": "rft"}),
    "env options for the adapter of the preset": lambda d: d["env"].update(options={"num_boxes": 2}),
    "an API policy": lambda d: d["models"].update(policy={"backend": "litellm", "name": "openai/gpt-4o-mini",
                                                           "api_base": "http://127.0.0.1:8000/v1"}),
}


def _write(tmp_path: Path, change) -> tuple[dict, Path]:
    data = copy.deepcopy(QUICKSTART)
    change(data)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return data, path


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_specs_are_rejected_by_leafe_validate_and_by_the_schema(case, tmp_path, validator):
    data, path = _write(tmp_path, MALFORMED[case])
    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == 2, r.output
    assert not validator.is_valid(data)


@pytest.mark.parametrize("case", list(WELL_FORMED))
def test_well_formed_variants_pass_both(case, tmp_path, validator):
    data, path = _write(tmp_path, WELL_FORMED[case])
    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == 0, r.output
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors


def test_leafe_schema_prints_writes_and_checks(tmp_path, schema):
    r = CliRunner().invoke(app, ["schema"])
    assert r.exit_code == 0 and json.loads(r.stdout) == schema
    out = tmp_path / "ref" / "spec-reference.md"
    r = CliRunner().invoke(app, ["schema", "--reference", "--out", str(out)])
    assert r.exit_code == 0
    text = out.read_text(encoding="utf-8")
    assert text == export.reference_markdown()
    # one section per block, method and environment adapter
    for heading in ("### env (EnvSpec)", "### eval (EvalSpec)", "### runtime.generation (GenerationRuntime)",
                    "### methods.<name> with method: leafe", "### env.options with adapter: sokoban"):
        assert heading + "\n" in text
    r = CliRunner().invoke(app, ["schema", "--check"])
    assert r.exit_code == 0, r.output
