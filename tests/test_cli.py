"""The CLI: exit codes, messages without tracebacks, no heavy imports for light commands."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
leafe: 1
name: cli-t
env: {use: sokoban, max_steps: 4, test_tasks: 2}
models:
  policy: {name: "leafe:tiny-qwen2"}
methods:
  base: {}
eval: {samples: 2, k: [1, 2]}
"""


def leafe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leafe", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=120)


def test_bad_specs_exit_2_with_file_line_and_path(tmp_path):
    cases = {
        "type": (SPEC.replace("samples: 2", "samples: two"), ":8: eval.samples:"),
        "unknown": (SPEC.replace("max_steps: 4", "max_step: 4"), ":3: env.max_step: unknown key"),
        "use": (SPEC.replace("use: sokoban", "use: nope"), ":3: env.use: unknown preset 'nope'"),
        "version": (SPEC.replace("leafe: 1", "leafe: 3"), ":1: leafe: spec format version 3"),
        "yaml": (SPEC.replace("k: [1, 2]}", "k: [1, 2}"), ":8: YAML syntax error"),
    }
    for name, (text, expected) in cases.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(text)
        r = leafe("validate", str(f))
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert expected in r.stderr, (name, r.stderr)
        assert str(f) in r.stderr.replace("\n", "")
        assert "Traceback" not in r.stderr + r.stdout


def test_validate_ok_and_set(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text(SPEC)
    r = leafe("validate", str(f), "--set", "eval.samples=4")
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
    r = leafe("validate", str(f), "--set", "eval.samples=1")
    assert r.returncode == 2 and "larger than samples=1" in r.stderr


def test_missing_spec_file_exits_2(tmp_path):
    r = leafe("run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2
    assert "no such file" in r.stderr and "Traceback" not in r.stderr


def test_light_commands_import_no_heavy_packages(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text(SPEC)
    code = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from leafe.cli import app
        r = CliRunner()
        for args in (["--help"], ["validate", {str(f)!r}], ["plan", {str(f)!r}, "--runs-dir", {str(tmp_path)!r}], ["envs"]):
            res = r.invoke(app, args)
            assert res.exit_code == 0, (args, res.output)
        heavy = [m for m in ("torch", "transformers", "trl", "litellm", "vllm", "gym_sokoban") if m in sys.modules]
        print("HEAVY", heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout


def test_help_and_version():
    r = leafe("--help")
    assert r.returncode == 0 and "validate" in r.stdout and "plan" in r.stdout
    r = leafe("--version")
    assert r.returncode == 0 and r.stdout.startswith("leafe ")


def test_envs_lists_sokoban():
    r = leafe("envs")
    assert r.returncode == 0 and "sokoban" in r.stdout.split()


def test_missing_model_fails_before_any_work(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text(SPEC.replace('"leafe:tiny-qwen2"', str(tmp_path / "no-such-model")))
    r = leafe("run", str(f), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "rep"))
    assert r.returncode == 2, r.stderr
    assert "no-such-model" in r.stderr and "Traceback" not in r.stderr
    stage_dirs = [p for p in (tmp_path / "runs" / "cli-t").glob("*") if p.is_dir()]
    assert stage_dirs == []
