"""Faults through the CLI (issue 18): an interrupted trainer checkpoint, damaged or missing
files of finished stages, a resumed stage's loss, Ctrl-C, corrupt records and manifests, a
renamed or copied run directory, file modes under the umask, what `leafe plan` says about a
running or changed stage, read-only folders and a full disk.

Each test drives `leafe` (typer's CliRunner on `leafe.cli.app`) on a small Sokoban spec with
the tiny model, asserts the exit code and the message, and, where the fault can be cleared,
that a re-run gives what an undisturbed run gave."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from leafe.cli import app

TRAIN_SPEC = """\
leafe: 1
name: faults
seed: 5
env: {use: sokoban, max_steps: 3, train_tasks: 6, test_tasks: 2}
models:
  policy: {name: "leafe:tiny-qwen2", max_tokens: 6, batch_size: 8, temperature: 1.0}
budget: {interactions_per_task: 8}
methods:
  sft: {train: {epochs: 2, lr: 0.001, batch_size: 4, save_steps: 2}}
eval: {samples: 2, k: [1, 2], batch_size: 4}
report: {formats: [json]}
"""
"""SFT on 14 expert steps: 8 optimizer steps, a trainer checkpoint every 2; then evaluation."""

EVAL_SPEC = """\
leafe: 1
name: evalonly
seed: 2
env: {use: sokoban, max_steps: 3, test_tasks: 3}
models:
  policy: {name: "leafe:tiny-qwen2", max_tokens: 6, temperature: 1.0}
methods:
  base: {}
eval: {samples: 4, k: [1, 4], batch_size: 4}
report: {formats: [json]}
"""
"""Evaluation only: 12 episodes, 48 records."""


def leafe(*args: str | Path):
    """`leafe ARGS` in process; a crash (an exception other than SystemExit) fails the test
    with its traceback, so a fault must end in an exit code and a message."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"leafe {' '.join(map(str, args))} crashed: {r.exception!r}\n{r.output}") from r.exception
    return r


def run_spec(spec: Path, root: Path):
    return leafe("run", spec, "--runs-dir", root / "runs", "--reports-dir", root / "reports")


def stage_dir(root: Path, name: str, stage: str) -> Path:
    found = sorted((root / "runs" / name).glob(f"{stage}-*"))
    assert len(found) == 1, found
    return found[0]


def read_records(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines()]


def write_spec(tmp_path: Path, text: str, name: str) -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(text)
    return f


@pytest.fixture(scope="module")
def trained(tmp_path_factory, leafe_cache) -> Path:
    """An undisturbed run of TRAIN_SPEC (read-only: tests copy it)."""
    root = tmp_path_factory.mktemp("trained")
    r = run_spec(write_spec(root, TRAIN_SPEC, "faults"), root)
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, leafe_cache) -> Path:
    """An undisturbed run of EVAL_SPEC (read-only: tests copy it)."""
    root = tmp_path_factory.mktemp("evaluated")
    r = run_spec(write_spec(root, EVAL_SPEC, "evalonly"), root)
    assert r.exit_code == 0, r.output
    return root


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "checkpoint" / "model.safetensors"))


# -- 1. a trainer checkpoint cut short while saving --------------------------------------------

def test_interrupted_checkpoint_save_is_skipped_and_the_resumed_stage_matches(tmp_path, trained, monkeypatch):
    """Ctrl-C while the trainer writes checkpoint-4 (weights and optimizer written, no
    trainer_state.json yet), and a checkpoint-6 whose weights were cut short (a full disk):
    the re-run says so in one line, resumes from checkpoint-2 and ends where an undisturbed
    run ended (weights, loss, evaluation records)."""
    import transformers

    spec = write_spec(tmp_path, TRAIN_SPEC, "faults")
    real_save_rng = transformers.Trainer._save_rng_state

    def ctrl_c_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt
        return real_save_rng(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", ctrl_c_at_step_4)
    r = run_spec(spec, tmp_path)
    assert r.exit_code == 130, r.output
    assert "interrupted; re-run the same command to resume" in r.output  # item 7, on the real path
    monkeypatch.undo()
    trainer = stage_dir(tmp_path, "faults", "sft.train") / "trainer"
    assert (trainer / "checkpoint-4" / "model.safetensors").exists()
    assert not (trainer / "checkpoint-4" / "trainer_state.json").exists()
    assert (trainer / "checkpoint-2" / "trainer_state.json").exists()
    shutil.copytree(trainer / "checkpoint-2", trainer / "checkpoint-6")
    cut = trainer / "checkpoint-6" / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    r = run_spec(spec, tmp_path)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "skipped incomplete trainer checkpoints" in out
    assert "checkpoint-4 (no trainer_state.json)" in out and "checkpoint-6 (model.safetensors is cut short)" in out
    assert "resuming from checkpoint-2" in out
    assert not (trainer / "checkpoint-6").exists()

    got, ref = stage_dir(tmp_path, "faults", "sft.train"), stage_dir(trained, "faults", "sft.train")
    w_got, w_ref = weights(got), weights(ref)
    assert w_got.keys() == w_ref.keys()
    for k in w_ref:
        assert (w_got[k] - w_ref[k]).abs().max().item() < 1e-5, k
    m_got, m_ref = (json.loads((d / "metrics.json").read_text()) for d in (got, ref))
    assert m_got["resumed"] is True and m_got["steps"] == m_ref["steps"] == 8
    for key in ("train_loss", "first_loss", "last_loss"):  # item 5: the whole run's loss
        assert m_got[key] == pytest.approx(m_ref[key], rel=1e-5), key
    assert read_records(stage_dir(tmp_path, "faults", "eval.sft")) == read_records(stage_dir(trained, "faults", "eval.sft"))


def test_resume_checkpoint_starts_over_when_no_checkpoint_is_complete(tmp_path):
    from leafe.training.checkpoints import resume_checkpoint

    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    said: list[str] = []
    assert resume_checkpoint(tmp_path, said.append) is None
    assert len(said) == 1 and "checkpoint-3 (no trainer_state.json)" in said[0]
    assert "checkpoint-5 (no model weights)" in said[0] and "training from the start" in said[0]
    assert not list(tmp_path.glob("checkpoint-*"))
    assert resume_checkpoint(tmp_path, said.append) is None and len(said) == 1  # nothing more to say


def test_whole_run_loss_weights_each_log_by_its_steps():
    from leafe.training.checkpoints import whole_run_loss

    assert whole_run_loss([{"loss": 2.0, "step": 1}, {"loss": 1.0, "step": 3}, {"train_loss": 0.0, "step": 3}]) \
        == pytest.approx((2.0 + 2 * 1.0) / 3)
    assert whole_run_loss([{"train_runtime": 1.0}]) is None


# -- 2. a finished stage's files changed ------------------------------------------------------

def test_torn_records_of_a_finished_stage_stop_run_report_and_plan(tmp_path, evaluated):
    root = copy_run(evaluated, tmp_path / "run")
    spec = root / "evalonly.yaml"
    d = stage_dir(root, "evalonly", "eval.base")
    original = (d / "records.jsonl").read_bytes()
    report = root / "reports" / "evalonly.json"
    before = report.read_bytes()
    (d / "records.jsonl").write_bytes(original[:-25])  # the last record torn

    for cmd in (("report", spec), ("run", spec), ("plan", spec)):
        r = leafe(*cmd, "--runs-dir", root / "runs", *(("--reports-dir", root / "reports") if cmd[0] != "plan" else ()))
        out = " ".join(r.output.split())
        assert r.exit_code == 2, (cmd, r.output)
        assert str(d) in out and "records.jsonl has 47 whole records and a torn last line" in out, (cmd, out)
        assert "the stage wrote 48" in out and f"rm -r {d}" in out, (cmd, out)
    assert "damaged" in r.output  # plan's status column
    assert report.read_bytes() == before  # the report was not rewritten from 47 records

    # same size, other content: caught by the sha256
    edited = original.replace(b'"success": false', b'"success": true ', 1)
    assert len(edited) == len(original) and edited != original
    (d / "records.jsonl").write_bytes(edited)
    r = leafe("report", spec, "--runs-dir", root / "runs", "--reports-dir", root / "reports")
    assert r.exit_code == 2 and "records.jsonl has other content" in " ".join(r.output.split())

    # doing what the message says: the stage runs again, to the same records
    shutil.rmtree(d)
    r = run_spec(spec, root)
    assert r.exit_code == 0, r.output
    assert (stage_dir(root, "evalonly", "eval.base") / "records.jsonl").read_bytes() == original


def test_a_done_marker_without_file_records_is_read_as_unverified(tmp_path, evaluated):
    """DONE markers of older leafe versions (`12.3 s`) stay readable: the stage is done,
    unverified, except that a torn last line is still caught."""
    root = copy_run(evaluated, tmp_path / "run")
    spec = root / "evalonly.yaml"
    d = stage_dir(root, "evalonly", "eval.base")
    (d / "DONE").write_text("12.3 s\n")
    r = leafe("report", spec, "--runs-dir", root / "runs", "--reports-dir", root / "reports")
    assert r.exit_code == 0, r.output
    assert json.loads((root / "reports" / "evalonly.json").read_text())["rows"][0]["episodes"] == 12
    r = leafe("plan", spec, "--runs-dir", root / "runs")
    assert r.exit_code == 0 and "done" in r.output
    data = (d / "records.jsonl").read_bytes()
    (d / "records.jsonl").write_bytes(data[:-25])
    r = leafe("report", spec, "--runs-dir", root / "runs", "--reports-dir", root / "reports")
    assert r.exit_code == 2 and "records.jsonl ends in a torn line" in " ".join(r.output.split()), r.output


# -- 3 and 5. a finished stage lost a file it wrote --------------------------------------------

def test_a_finished_stage_missing_its_metrics_runs_again_to_the_same_metrics(tmp_path, trained):
    """metrics.json deleted from the finished training and evaluation stages: the plan says
    so, the report stops (it would show 0 train interactions), a re-run redoes both (the
    training resumes from its last checkpoint with nothing left to train) and writes the same
    metrics, the whole run's train_loss included (item 5: it was 0.0)."""
    root = copy_run(trained, tmp_path / "run")
    spec = root / "faults.yaml"
    train, ev = stage_dir(root, "faults", "sft.train"), stage_dir(root, "faults", "eval.sft")
    m_train, m_eval = (json.loads((d / "metrics.json").read_text()) for d in (train, ev))
    records = (ev / "records.jsonl").read_bytes()
    for d in (train, ev):
        (d / "metrics.json").unlink()

    r = leafe("plan", spec, "--runs-dir", root / "runs")
    assert r.exit_code == 0, r.output
    assert r.output.count("incomplete (metrics.json missing)") == 2
    r = leafe("report", spec, "--runs-dir", root / "runs", "--reports-dir", root / "reports")
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and f"{train}: metrics.json missing" in out and "`leafe run`" in out, out

    r = run_spec(spec, root)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "metrics.json missing from the finished stage" in out and "re-running sft.train" in out
    assert "re-running eval.sft" in out
    got = json.loads((train / "metrics.json").read_text())
    assert got.pop("resumed") is True and m_train.pop("resumed") is False
    losses = ("train_loss", "first_loss", "last_loss")
    for key in losses:
        assert got.pop(key) == pytest.approx(m_train.pop(key), rel=1e-6), key
    assert got == m_train
    got_eval = json.loads((ev / "metrics.json").read_text())
    got_eval.pop("usage"), m_eval.pop("usage")
    assert got_eval == m_eval and (ev / "records.jsonl").read_bytes() == records  # nothing re-sampled
    assert leafe("plan", spec, "--runs-dir", root / "runs").output.count("done") >= 2


def test_a_lost_or_cut_checkpoint_of_a_finished_stage(tmp_path, trained):
    """The trained weights deleted: the training stage runs again (from its last trainer
    checkpoint) to the same weights, and the report, which loads no model, still reads the
    run. The weights cut short (a full disk, a bad copy): not used, exit 2, the fix named."""
    root = copy_run(trained, tmp_path / "run")
    spec = root / "faults.yaml"
    train = stage_dir(root, "faults", "sft.train")
    w = train / "checkpoint" / "model.safetensors"
    data = w.read_bytes()

    w.write_bytes(data[: len(data) // 2])
    r = run_spec(spec, root)
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and f"checkpoint/model.safetensors has {len(data) // 2} bytes; the stage wrote {len(data)}" in out
    assert f"rm -r {train}" in out

    w.unlink()
    r = leafe("report", spec, "--runs-dir", root / "runs", "--reports-dir", root / "reports")
    assert r.exit_code == 0, r.output
    row = json.loads((root / "reports" / "faults.json").read_text())["rows"][0]
    assert row["status"] == "done" and row["train_interactions"] == 14
    r = leafe("plan", spec, "--runs-dir", root / "runs")
    assert "incomplete (checkpoint/model.safetensors missing)" in r.output
    r = run_spec(spec, root)
    assert r.exit_code == 0 and "re-running sft.train" in r.output, r.output
    assert w.read_bytes() == data


# -- 6. corrupt records and manifests ----------------------------------------------------------

def test_a_corrupt_record_line_is_named_not_a_traceback(tmp_path, evaluated):
    root = copy_run(evaluated, tmp_path / "run")
    spec = root / "evalonly.yaml"
    d = stage_dir(root, "evalonly", "eval.base")
    lines = (d / "records.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:10] + "\x00garbage" + lines[2][10:]
    (d / "records.jsonl").write_text("".join(lines))

    # a stage being resumed (no DONE): `leafe run` reads its records
    (d / "DONE").unlink()
    r = run_spec(spec, root)
    out = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert f"{d / 'records.jsonl'} line 3: not valid JSON" in out and f"Delete the stage directory {d}" in out

    # a stage finished under an older leafe (an unverified DONE): `leafe report` reads them
    (d / "DONE").write_text("")
    r = leafe("report", spec, "--runs-dir", root / "runs", "--reports-dir", root / "reports")
    assert r.exit_code == 2 and f"{d / 'records.jsonl'} line 3: not valid JSON" in " ".join(r.output.split())


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00garbage", b"not json at all", b"[1, 2, 3]", b"{}",
                                     b'{"spec": {}}', b'{"spec": {"methods": {}}, "method_order": ["x"]}'])
def test_a_manifest_that_is_not_one_is_a_clear_error(tmp_path, content):
    run = tmp_path / "runs" / "broken"
    run.mkdir(parents=True)
    (run / "manifest.json").write_bytes(content)
    r = leafe("report", run, "--reports-dir", tmp_path / "reports")
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert f"{run / 'manifest.json'}" in out and "pass the spec file" in out, out
    assert not (tmp_path / "reports").exists()


# -- 7. Ctrl-C ---------------------------------------------------------------------------------

def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, monkeypatch):
    import leafe.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(leafe.runner, "run", interrupted)
    r = run_spec(write_spec(tmp_path, EVAL_SPEC, "evalonly"), tmp_path)
    assert r.exit_code == 130
    assert "interrupted; re-run the same command to resume" in r.output


# -- 4. a renamed or copied run directory ------------------------------------------------------

def test_a_renamed_or_copied_run_directory_is_reported_from_where_it_is(tmp_path, evaluated):
    """`leafe report DIR` reads DIR, whatever its name, and names the report after it; it never
    reads runs/<name in the manifest> (a missing folder gave `(not run)` rows, exit 0, and
    replaced the good report)."""
    root = copy_run(evaluated, tmp_path / "run")
    good = root / "reports" / "evalonly.json"
    before = good.read_bytes()
    renamed = root / "runs" / "old-evalonly"
    (root / "runs" / "evalonly").rename(renamed)
    elsewhere = copy_run(renamed, tmp_path / "elsewhere" / "evalonly-copy")
    for run, name in ((renamed, "old-evalonly"), (elsewhere, "evalonly-copy")):
        r = leafe("report", run, "--reports-dir", root / "reports")
        assert r.exit_code == 0, r.output
        row = json.loads((root / "reports" / f"{name}.json").read_text())["rows"][0]
        assert row["status"] == "done" and row["episodes"] == 12, row
        assert "(not run)" not in r.output
    assert good.read_bytes() == before


def test_a_report_with_no_finished_evaluation_is_an_error_and_writes_nothing(tmp_path, evaluated):
    root = copy_run(evaluated, tmp_path / "run")
    spec = root / "evalonly.yaml"
    good = root / "reports" / "evalonly.json"
    before = good.read_bytes()
    # the spec against a runs folder that does not hold its run
    r = leafe("report", spec, "--runs-dir", tmp_path / "empty", "--reports-dir", root / "reports")
    out = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert f"{tmp_path / 'empty' / 'evalonly'}: no evaluation has finished (eval.base todo)" in out, out
    assert "no report was written" in out and f"leafe run {spec}" in out
    assert good.read_bytes() == before
    # a run directory whose evaluation never finished: its manifest only
    bare = tmp_path / "bare" / "evalonly"
    bare.mkdir(parents=True)
    shutil.copy(root / "runs" / "evalonly" / "manifest.json", bare)
    r = leafe("report", bare, "--reports-dir", root / "reports")
    assert r.exit_code == 2 and f"{bare}: no evaluation has finished" in " ".join(r.output.split()), r.output
    assert good.read_bytes() == before and sorted(p.name for p in (root / "reports").iterdir()) == ["evalonly.json"]


# -- 11. file modes follow the umask -----------------------------------------------------------

def test_files_leafe_writes_follow_the_umask(tmp_path, monkeypatch):
    """Under umask 002 (a shared group) every file of a run (trained weights included), its
    report and a freshly built model cache are group-readable and -writable (0664, folders
    0775); atomic writes gave 0600, safetensors' weights 0600 and the cache 0700, so a
    colleague's `leafe report` failed."""
    import os
    import stat

    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o002)
    try:
        r = run_spec(write_spec(tmp_path, TRAIN_SPEC, "faults"), tmp_path)
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    checked = 0
    wrong = []
    for top in (tmp_path / "runs", tmp_path / "reports", tmp_path / "cache" / "models"):
        for p in [top, *top.rglob("*")]:
            mode = stat.S_IMODE(p.lstat().st_mode)
            want = 0o775 if p.is_dir() else 0o664
            checked += 1
            if mode != want:
                wrong.append(f"{p.relative_to(tmp_path)} {mode:o}")
    names = {p.name for top in (tmp_path / "runs", tmp_path / "reports") for p in top.rglob("*")}
    assert {"manifest.json", "metrics.json", "usage.json", "records.jsonl", "DONE", "faults.json",
            "model.safetensors", "trainer_state.json"} <= names
    assert list((tmp_path / "cache" / "models").iterdir()) and checked > 10
    assert not wrong, wrong


# -- 12. what `leafe plan` says about a stage running now, or about to run anew ------------------

def test_plan_names_the_process_running_a_stage(tmp_path, monkeypatch):
    """`leafe plan` while `leafe run` evaluates: the stage is in use, by this pid (it said
    `partial`, like a stage killed half-way)."""
    import os

    from leafe import runner

    spec = write_spec(tmp_path, EVAL_SPEC, "evalonly")
    seen = []
    real = runner.run_eval

    def plan_meanwhile(ctx):
        seen.append(leafe("plan", spec, "--runs-dir", tmp_path / "runs"))
        seen.append(leafe("plan", spec, "--runs-dir", tmp_path / "runs", "--json"))
        return real(ctx)

    monkeypatch.setattr(runner, "run_eval", plan_meanwhile)
    r = run_spec(spec, tmp_path)
    assert r.exit_code == 0, r.output
    table, as_json = seen
    assert table.exit_code == 0, table.output
    out = " ".join(table.output.split())
    assert f"is in use by `leafe run` (pid {os.getpid()}), running eval.base" in out, out
    cells = " ".join(re.sub(r"[│┃|]", " ", table.output).split())  # the status cell, even wrapped
    assert f"partial (running: in use by `leafe run` (pid {os.getpid()}))" in cells, cells
    ev = next(s for s in json.loads(as_json.stdout)["stages"] if s["id"] == "eval.base")
    assert ev["status"] == "partial" and ev["running"]["pid"] == os.getpid() and ev["running"]["stage"] == "eval.base"
    monkeypatch.undo()
    r = leafe("plan", spec, "--runs-dir", tmp_path / "runs")  # the run is over: nobody holds it
    assert r.exit_code == 0 and "in use" not in r.output, r.output


def test_plan_says_what_changed_since_a_stage_last_ran(tmp_path, trained):
    root = copy_run(trained, tmp_path / "run")
    spec = root / "faults.yaml"
    r = leafe("plan", spec, "--runs-dir", root / "runs", "--set", "eval.samples=4", "--json")
    assert r.exit_code == 0, r.output
    stages = {s["id"]: s for s in json.loads(r.stdout)["stages"]}
    assert stages["sft.train"]["status"] == "done" and stages["sft.train"]["changed"] == []
    assert stages["eval.sft"]["status"] == "todo" and stages["eval.sft"]["changed"] == ["eval.samples 2 → 4"]

    r = leafe("plan", spec, "--runs-dir", root / "runs", "--set", "methods.sft.train.lr=0.002")
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "changed: methods.sft.train.lr 0.001 → 0.002" in out, out
    assert "changed: upstream sft.train changed" in out, out
    r = leafe("plan", spec, "--runs-dir", tmp_path / "fresh")  # never ran: nothing to compare with
    assert r.exit_code == 0 and "changed:" not in r.output


# -- 6. a read-only run or reports folder, a full disk -----------------------------------------

@pytest.fixture
def read_only():
    """Make paths read-only for this process, even as root (root ignores mode bits: `chattr
    +i`, undone after the test); skips when neither works."""
    import os
    import subprocess

    done: list[Path] = []

    def make(path: Path) -> None:
        if os.geteuid() != 0:
            for p in [path, *path.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
        else:
            r = subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"root ignores mode bits and `chattr +i` failed here: {r.stderr.strip()}")
        done.append(path)

    yield make
    for path in done:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-R", "-i", str(path)], check=True)
        else:
            for p in [path, *path.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)


def test_a_read_only_run_or_reports_folder_is_a_clear_error(tmp_path, evaluated, read_only):
    root = copy_run(evaluated, tmp_path / "run")
    spec = root / "evalonly.yaml"
    run = root / "runs" / "evalonly"
    read_only(run)
    r = run_spec(spec, root)  # every stage done, but the lock and manifest cannot be written
    out = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert f"cannot write in the run directory {run}" in out and str(run / ".lock") in out, out
    assert f"`leafe report {run} --reports-dir DIR`" in out
    r = leafe("report", run, "--reports-dir", root / "reports")  # reading it is fine
    assert r.exit_code == 0, r.output

    reports = root / "reports"
    before = (reports / "evalonly.json").read_bytes()
    read_only(reports)
    r = leafe("report", spec, "--runs-dir", root / "runs", "--reports-dir", reports)
    out = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert f"cannot write the report into {reports}: {reports / 'evalonly.json'}" in out and "--reports-dir DIR" in out
    assert (reports / "evalonly.json").read_bytes() == before


def test_a_full_disk_says_where_and_a_rerun_resumes(tmp_path, evaluated, monkeypatch):
    """ENOSPC while appending evaluation records (half a line written): exit 2 naming the
    disk, the file and that a re-run resumes; the re-run ends with the undisturbed records.
    Then ENOSPC while writing the report: the old report stays."""
    import errno
    import os

    spec = write_spec(tmp_path, EVAL_SPEC, "evalonly")
    real = os.fsync
    appends = []

    def full_disk(fd):
        """The 20th append to records.jsonl comes up short: half its line reached the disk."""
        if os.readlink(f"/proc/self/fd/{fd}").endswith("records.jsonl"):
            appends.append(fd)
            if len(appends) == 20:
                size = os.fstat(fd).st_size
                with open(f"/proc/self/fd/{fd}", "rb") as f:
                    last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
                os.ftruncate(fd, size - len(last) // 2 - 1)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    r = run_spec(spec, tmp_path)
    out = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    d = stage_dir(tmp_path, "evalonly", "eval.base")
    assert f"eval.base stopped: the disk holding {d / 'records.jsonl'} is full (no space left on device" in out, out
    assert "Free space there, then run the same `leafe run` again: it resumes" in out
    monkeypatch.undo()
    r = run_spec(spec, tmp_path)
    assert r.exit_code == 0 and "resuming eval.base" in r.output, r.output
    assert read_records(d) == read_records(stage_dir(evaluated, "evalonly", "eval.base"))

    report = tmp_path / "reports" / "evalonly.json"
    before = report.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    r = leafe("report", spec, "--runs-dir", tmp_path / "runs", "--reports-dir", tmp_path / "reports")
    monkeypatch.undo()
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and f"the disk holding {report} is full" in out, r.output
    assert report.read_bytes() == before and not list(report.parent.glob(".*.tmp"))


def test_torch_failing_to_finish_a_checkpoint_says_the_disk_is_full(tmp_path, monkeypatch):
    """torch's `unexpected pos` (its zip writer came up short: a full disk) while the trainer
    saves its optimizer: exit 2, the stage directory named, a re-run resumes."""
    import torch

    spec = write_spec(tmp_path, TRAIN_SPEC, "faults")
    real = torch.save

    def short_write(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 1088 vs 960")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", short_write)
    r = run_spec(spec, tmp_path)
    out = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    d = stage_dir(tmp_path, "faults", "sft.train")
    assert f"sft.train stopped: the disk holding {d} is most likely full" in out and "unexpected pos 1088 vs 960" in out
    assert "run the same `leafe run` again: it resumes" in out
    monkeypatch.undo()
    r = run_spec(spec, tmp_path)
    assert r.exit_code == 0 and "resuming sft.train" in r.output, r.output


# -- 6, 8, 9, 10, 13. hostile or malformed specs -----------------------------------------------
# A spec that cannot be used is refused by validation in seconds, with a message that names
# the file, line and field, quotes at most a cut of the value, and exits 2. The timed ones run
# in a subprocess: the faults they guard against took minutes.

def leafe_timed(*args: str | Path, timeout: float = 30):
    """`python -m leafe ARGS` in a subprocess that must end within `timeout` seconds."""
    import os
    import subprocess
    import sys

    try:
        return subprocess.run([sys.executable, "-m", "leafe", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"leafe {' '.join(str(a)[:50] for a in args)} still busy after {timeout} s")


def refused(r, *wanted: str) -> str:
    """The error output of an exit-2 refusal (a subprocess's or CliRunner's), checked to be
    short and to say `wanted`; whitespace folded."""
    import subprocess

    code, err = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else (r.exit_code, r.output)
    assert code == 2, err[:2000]
    assert "Traceback" not in err and len(err) < 3000, err[:3000]
    out = " ".join(err.split())
    for w in wanted:
        assert w in out, out
    return out


def every_command(tmp_path: Path, spec: Path) -> list[list]:
    return [["validate", spec], ["plan", spec, "--runs-dir", tmp_path / "runs"],
            ["run", spec, "--runs-dir", tmp_path / "runs", "--reports-dir", tmp_path / "reports"]]


def test_a_10mb_name_is_refused_in_seconds_with_the_value_cut(tmp_path):
    """Item 8: `validate` spun for minutes printing the name; `plan` and `run` failed with
    `File name too long`, echoing 10 MB."""
    spec = write_spec(tmp_path, EVAL_SPEC.replace("name: evalonly", "name: " + "a" * 10_000_000), "huge")
    for args in every_command(tmp_path, spec):
        refused(leafe_timed(*args), "huge.yaml:2: name: too long (10000000 characters)",
                "at most 100 characters")
    assert not (tmp_path / "runs").exists()


def test_a_10mb_value_validates_in_seconds(tmp_path):
    """Item 8: validation time is linear in the spec's size (a 10 MB hint is a valid value)."""
    spec = write_spec(tmp_path, EVAL_SPEC.replace("test_tasks: 3}", "test_tasks: 3, reflection_hint: "
                                                  + "b" * 10_000_000 + "}"), "hint")
    r = leafe_timed("validate", spec)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[:2000]


@pytest.mark.parametrize("key,value", [("name", "../../elsewhere"), ("name", ".hidden"), ("run_dir", "a/b"),
                                        ("methods", "{'../escape': {method: base}}"),
                                        ("methods", "{'sft.v2': {method: sft}}"),
                                        ("methods", "{" + "m" * 300 + ": {method: base}}")])
def test_names_that_become_file_names_are_refused(tmp_path, key, value):
    """Item 8: the spec's name, run_dir and method names name folders and files: refused
    unless letters, digits, '.', '_', '-' (no '.' in a method name: stage ids) within 100."""
    text = EVAL_SPEC.replace({"name": "name: evalonly\n", "methods": "methods:\n  base: {}\n"}.get(key, "\n"), "\n")
    text += f"{key}: {value}\n"
    r = leafe("validate", write_spec(tmp_path, text, "names"))
    refused(r, f"names.yaml:", f"{key}" if key != "methods" else "methods.",
            "starting with a letter or digit, at most 100 characters")


def test_an_alias_bomb_is_refused_in_seconds(tmp_path):
    """Item 9: nine levels of nine aliases under an unknown key expand to 387 million values;
    `validate` was busy for over a minute before any error."""
    levels = ["  l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    spec = write_spec(tmp_path, EVAL_SPEC + "nosuch:\n" + "\n".join(levels) + "\n", "bomb")
    for args in every_command(tmp_path, spec):
        refused(leafe_timed(*args), "bomb.yaml:16: nosuch.l4[0]: YAML aliases (*name) expand to more than 10000 "
                "values here")


def test_a_recursive_alias_is_refused(tmp_path):
    spec = write_spec(tmp_path, EVAL_SPEC + "nosuch: &a [1, *a]\n", "loop")
    refused(leafe("validate", spec), "loop.yaml:11: nosuch[1]:", "recursive")


def test_a_10mb_system_prompt_is_refused_at_validation(tmp_path):
    """Item 10: a 10 MB system prompt gave no sign of life for minutes (tokenized at every
    step); the policy's context (8192 tokens for the built-in) is known at validation."""
    text = EVAL_SPEC.replace("env: {use: sokoban, max_steps: 3, test_tasks: 3}",
                             "env: {use: sokoban, max_steps: 3, test_tasks: 3, prompt: {system: "
                             + "x" * 10_000_000 + ", user: '{{ observation }}'}}")
    spec = write_spec(tmp_path, text, "prompt")
    for args in every_command(tmp_path, spec):
        refused(leafe_timed(*args), "prompt.yaml:4: env.prompt.system: 10000000 characters cannot fit the "
                "policy's context of 8192 tokens (leafe:tiny-qwen2)", "shorten the prompt")
    assert not (tmp_path / "runs").exists()


def test_set_of_an_unknown_key_blames_the_set(tmp_path):
    """Item 13: `--set nosuch.key=1` was blamed on `spec.yaml:1`, a nested unknown key from
    `--set` got a `:0` suffix."""
    spec = write_spec(tmp_path, EVAL_SPEC, "evalonly")
    out = refused(leafe("validate", spec, "--set", "nosuch.key=1"), "error: --set nosuch.key=1: nosuch: unknown key")
    assert "evalonly.yaml" not in out
    out = refused(leafe("validate", spec, "--set", "eval.nosuch=1"), "error: --set eval.nosuch=1: eval.nosuch: unknown key")
    assert ":0" not in out and "evalonly.yaml" not in out
    out = refused(leafe("validate", spec, "--set", "eval={samples: two}"), "error: --set eval={samples: two}: eval.samples:")


def test_a_binary_spec_is_a_clear_error(tmp_path):
    """Item 6: a binary file given as a spec raised UnicodeDecodeError."""
    spec = tmp_path / "image.yaml"
    spec.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfegarbage")
    for args in every_command(tmp_path, spec):
        refused(leafe(*args), f"{spec}: not a spec: byte 0 is not UTF-8 text", "pass a YAML spec file")
    spec.write_bytes(b"leafe: 1\nname: \x00\x01\n")  # UTF-8, but characters YAML refuses
    refused(leafe("validate", spec), f"{spec}:2: YAML syntax error")


def test_a_long_system_prompt_for_a_model_of_unknown_context_is_named(tmp_path):
    """Item 10: where the policy's context is not known at validation, `validate` and `run`
    say what will be slow before anything starts."""
    text = EVAL_SPEC.replace("env: {use: sokoban, max_steps: 3, test_tasks: 3}",
                             "env: {use: sokoban, max_steps: 3, test_tasks: 3, prompt: {system: "
                             + "x" * 200_000 + ", user: '{{ observation }}'}}")
    text = text.replace('name: "leafe:tiny-qwen2"', "name: someone/unknown-model")
    r = leafe("validate", write_spec(tmp_path, text, "slow"))
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert ("note: env.prompt.system is 200000 characters: every policy step renders and tokenizes it, which is "
            "slow, and it may not fit (the policy's context is not known before the model loads)") in out


def test_weights_changed_in_place_are_caught_before_a_stage_starts_from_them(tmp_path, trained):
    """A same-size change to a finished stage's weights (a bad copy, bit rot) passes the size
    check; the stage that starts from the checkpoint compares its sha256 first: exit 2, the
    file named, nothing evaluated on it. Put back, the run goes on."""
    root = copy_run(trained, tmp_path / "run")
    spec = root / "faults.yaml"
    train = stage_dir(root, "faults", "sft.train")
    shutil.rmtree(stage_dir(root, "faults", "eval.sft"))
    w = train / "checkpoint" / "model.safetensors"
    data = w.read_bytes()
    flipped = bytearray(data)
    flipped[-8] ^= 0xFF  # inside the last tensor's data: the header still parses
    w.write_bytes(bytes(flipped))
    r = run_spec(spec, root)
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "checkpoint/model.safetensors has other content" in out, out
    assert "Traceback" not in r.output and not list((root / "runs" / "faults").glob("eval.sft-*/DONE"))
    w.write_bytes(data)
    r = run_spec(spec, root)
    assert r.exit_code == 0, r.output
    assert read_records(stage_dir(root, "faults", "eval.sft")) == read_records(stage_dir(trained, "faults", "eval.sft"))


def test_a_full_disk_inside_a_launched_training_job_says_so(tmp_path, leafe_cache, monkeypatch):
    """Training under `accelerate launch`: the job's process hits ENOSPC while saving the
    weights (injected through a sitecustomize only that process loads); the run stops with the
    full-disk message (exit 2), not "accelerate launch failed" and a log tail."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, os\n"
        "if os.environ.get('LEAFE_IN_ACCELERATE_LAUNCH'):\n"
        "    import safetensors.torch as st\n"
        "    def full(*a, **k):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', a[1] if len(a) > 1 else None)\n"
        "    st.save_file = full\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    spec = write_spec(tmp_path, TRAIN_SPEC.replace("save_steps: 2}}", "save_steps: 2}}\n  base: {}").replace(
        "report: {formats: [json]}", "report: {formats: [json]}\nruntime: {threads: 1, training: {launcher: accelerate, "
        "num_processes: 1}}"), "launched")
    r = run_spec(spec, tmp_path)
    out = " ".join(r.output.split())
    assert r.exit_code == 2, out
    assert "sft.train stopped: the disk holding" in out and "is full" in out and "resumes" in out, out
    assert "accelerate launch` failed" not in out and "Traceback" not in r.output
