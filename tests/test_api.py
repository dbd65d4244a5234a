"""The Python API (`leafe.load_spec`, `plan`, `run`, `open_run`, `report`) on the tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import leafe
from leafe import errors

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
leafe: 1
name: api
seed: 3
env: {use: sokoban, max_steps: 2, train_tasks: 2, test_tasks: 1}
models:
  policy: {name: "leafe:tiny-qwen2", max_tokens: 4, batch_size: 4, temperature: 1.0}
budget: {interactions_per_task: 4}
methods:
  base: {}
eval: {samples: 2, k: [1, 2], batch_size: 2}
report: {formats: [json]}
"""


@pytest.fixture(scope="module")
def done(tmp_path_factory, leafe_cache):
    """One finished run of SPEC through `leafe.run`: (spec file, Run, runs dir, reports dir)."""
    tmp = tmp_path_factory.mktemp("api")
    f = tmp / "api.yaml"
    f.write_text(SPEC)
    runs, reports = tmp / "runs", tmp / "reports"
    before = leafe.plan(leafe.load_spec(f), runs)
    assert [(s.id, s.status) for s in before] == [("eval.base", "todo"), ("report", "always")]
    handle = leafe.run(f, runs, reports, quiet=True)
    return f, handle, runs, reports


def test_import_is_light_and_the_names_stay_functions():
    code = ("import leafe, sys; heavy = [m for m in ('torch', 'transformers', 'litellm', 'pandas') if m in sys.modules];"
            "import leafe.plan, leafe.report; from leafe.plan import build_plan; from leafe.report import collect;"
            "print(heavy, callable(leafe.plan) and leafe.plan.__module__, leafe.report.__module__, sorted(leafe.__all__))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[] leafe.api leafe.api ")
    for name in ("load_spec", "plan", "run", "open_run", "report", "Run", "SpecError", "__version__"):
        assert name in leafe.__all__ and hasattr(leafe, name)


def test_load_spec_with_overrides(tmp_path):
    f = tmp_path / "api.yaml"
    f.write_text(SPEC)
    loaded = leafe.load_spec(f, {"eval.samples": 4, "eval.k": [1, 4], "models.policy.temperature": 0.5})
    assert loaded.spec.eval.samples == 4 and loaded.spec.eval.k == [1, 4]
    assert loaded.spec.models.policy.temperature == 0.5
    assert leafe.load_spec(str(f), ["eval.samples=3"]).spec.eval.samples == 3  # --set strings too
    assert list(loaded.methods) == ["base"]


def test_plan_of_the_smoke_run(tmp_path):
    f = tmp_path / "api.yaml"
    f.write_text(SPEC)
    stages = leafe.plan(f, tmp_path / "runs", smoke=True)
    assert stages[0].id == "eval.base" and stages[0].status == "todo"
    assert stages[0].dir.parent == tmp_path / "runs" / "api-smoke"
    assert not (tmp_path / "runs").exists()  # planning writes nothing


def test_a_bad_spec_raises_one_exception_with_file_line_and_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(SPEC.replace("eval: {samples: 2,", "eval: {samples: -1,").replace("budget: {", "budget: {colour: 1, "))
    line_eval = SPEC.splitlines().index("eval: {samples: 2, k: [1, 2], batch_size: 2}") + 1
    line_budget = SPEC.splitlines().index("budget: {interactions_per_task: 4}") + 1
    with pytest.raises(leafe.SpecError) as info:
        leafe.load_spec(f)
    e = info.value
    assert isinstance(e, errors.SpecError) and isinstance(e, errors.UserError)
    got = {(d.field, d.line) for d in e.details}
    assert ("eval.samples", line_eval) in got and ("budget.colour", line_budget) in got
    assert all(d.file is not None and d.file.endswith("bad.yaml") for d in e.details)
    assert (e.file, e.line, e.field) == (e.details[0].file, e.details[0].line, e.details[0].field)
    assert f"bad.yaml:{line_eval}: eval.samples: " in str(e)  # as `leafe validate` prints it
    # a method's field (checked once the spec's own fields are)
    f.write_text(SPEC.replace("  base: {}", "  base: {colour: 1}"))
    with pytest.raises(leafe.SpecError) as info:
        leafe.load_spec(f)
    assert (info.value.field, info.value.line) == ("methods.base.colour", SPEC.splitlines().index("  base: {}") + 1)
    # an override is blamed on itself
    f.write_text(SPEC)
    with pytest.raises(leafe.SpecError) as info:
        leafe.load_spec(f, {"eval.samples": "many"})
    d = info.value.details[0]
    assert (d.file, d.line, d.field) == ('--set eval.samples="many"', None, "eval.samples")
    with pytest.raises(leafe.SpecError) as info:  # a value holding `: ` does not confuse the parts
        leafe.load_spec(f, {"env.max_steps": {"a: b": 1}})
    d = info.value.details[0]
    assert (d.file, d.line, d.field) == ('--set env.max_steps={"a: b": 1}', None, "env.max_steps")
    # YAML syntax: a line, no field; a missing file: the file
    f.write_text("leafe: 1\nname: [x\n")
    with pytest.raises(leafe.SpecError) as info:
        leafe.load_spec(f)
    assert info.value.line is not None and info.value.field is None and "YAML syntax" in str(info.value)
    with pytest.raises(leafe.SpecError) as info:
        leafe.load_spec(tmp_path / "none.yaml")
    assert info.value.file.endswith("none.yaml") and "no such file" in str(info.value)


def test_run_plan_and_table_equal_the_report(done):
    f, handle, runs, reports = done
    assert isinstance(handle, leafe.Run) and handle.path == runs / "api"
    stages = leafe.plan(f, runs)
    assert [(s.id, s.status) for s in stages] == [("eval.base", "done"), ("report", "always")]
    ev = stages[0]
    assert ev.kind == "eval" and ev.method == "base" and ev.seed == 3 and ev.dir == runs / "api" / f"eval.base-{ev.key[:12]}"
    assert ev.dir.is_dir() and handle.plan() == stages
    data = json.loads((reports / "api.json").read_text())
    table = handle.table()
    assert list(table.index) == ["base"]
    row = data["rows"][0]
    for k, st in row["pass@k_stats"].items():
        assert table.loc["base", f"pass@{k}"] == pytest.approx(st["mean"])
        assert [table.loc["base", f"pass@{k} ci_low"], table.loc["base", f"pass@{k} ci_high"]] == pytest.approx(st["ci"])
    for k, v in row["pass^k"].items():
        assert table.loc["base", f"pass^{k}"] == pytest.approx(v)
    for key in ("success_rate", "episodes", "tasks", "samples_per_task", "train_interactions"):
        assert table.loc["base", key] == row[key]
    for key, v in row["budget"].items():
        if not isinstance(v, (list, dict)):
            assert table.loc["base", f"budget.{key}"] == v
    assert set(row["pass@k"]) == {"1", "2"}
    # a second run reuses the finished stage
    record = ev.dir / "records.jsonl"
    mtime = record.stat().st_mtime_ns
    again = leafe.run(leafe.load_spec(f), runs, reports, quiet=True)
    assert again.path == handle.path and record.stat().st_mtime_ns == mtime


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}


def test_open_run_reads_only_even_while_a_run_holds_it(done):
    from leafe.runlock import lock_holder, run_lock

    _, handle, runs, reports = done
    root = runs / "api"
    with run_lock(root):  # a `leafe run` working on it: opening neither waits nor fails
        assert lock_holder(root) is not None
        before = _snapshot(root)
        opened = leafe.open_run(root)
        table = opened.table()
        episodes = opened.episodes("base")
        manifest = opened.manifest
        stages = opened.plan()
        assert _snapshot(root) == before  # nothing written, nothing created
    assert table.filter(like="pass").equals(handle.table().filter(like="pass"))
    assert manifest["spec"]["name"] == "api"
    assert [s.status for s in stages] == ["done", "always"]
    assert len(episodes) == 2 and set(episodes["seed"]) == {3} and set(episodes["task"]) == {"test-00000"}
    assert episodes["success"].mean() == pytest.approx(table.loc["base", "success_rate"])
    with pytest.raises(errors.UserError, match="not a method"):
        opened.episodes("sft")
    with pytest.raises(errors.UserError, match="not a run directory"):
        leafe.open_run(runs / "missing")


def test_open_run_works_on_an_immutable_run_directory(done):
    """Every file and folder of the run immutable (`chattr +i`, as root): nothing can be
    written, created or locked there, and the run still opens and reads."""
    import shutil

    _, handle, runs, _ = done
    root = runs / "api"
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    if subprocess.run(["chattr", "-R", "+i", str(root)], capture_output=True).returncode != 0:
        subprocess.run(["chattr", "-R", "-i", str(root)], capture_output=True)
        pytest.skip("this filesystem has no immutable flag")
    try:
        with pytest.raises(OSError):
            (root / "probe").write_text("x")
        opened = leafe.open_run(root)
        assert opened.table().filter(like="pass").equals(handle.table().filter(like="pass"))
        assert len(opened.episodes("base")) == 2 and opened.manifest["spec"]["name"] == "api"
    finally:
        subprocess.run(["chattr", "-R", "-i", str(root)], check=True)


def test_report_writes_the_formats_asked_and_returns_their_paths(done, tmp_path):
    f, handle, runs, _ = done
    out = tmp_path / "out"
    written = leafe.report(handle.path, formats=["md", "json"], reports_dir=out)
    assert {p.suffix for p in written} >= {".md", ".json"} and all(p.is_file() for p in written)
    assert all(p.parent == out for p in written)
    data = json.loads((out / "api.json").read_text())
    assert data["rows"][0]["pass@k"] == json.loads((done[3] / "api.json").read_text())["rows"][0]["pass@k"]
    assert leafe.report(f, formats=["tex"], reports_dir=out, runs_dir=runs) == [out / "api.tex"]
    assert leafe.report([handle], reports_dir=out) == [out / "api.json"]  # the spec's formats
    with pytest.raises(errors.UserError, match="formats"):
        leafe.report(handle, formats=["pdf"], reports_dir=out)


def test_the_readme_example_runs(tmp_path, leafe_cache, monkeypatch):
    """README's "From Python" block, on SPEC in place of the quickstart spec."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- from-python:[^\n]*-->\n```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "quickstart.yaml").write_text(SPEC.replace("name: api", "name: quickstart"))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert list(scope["table"].index) == ["base"] and len(scope["episodes"]) == 2
    assert {p.name for p in scope["written"]} >= {"quickstart.md", "quickstart.json"}
    assert (tmp_path / "runs" / "quickstart" / "manifest.json").is_file()
