"""`runtime.threads`: torch's CPU threads in leafe's processes, outside every stage key."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from rich.console import Console

from leafe import threads
from leafe.plan import build_plan
from leafe.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
leafe: 1
name: thr
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


def leafe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leafe", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=env)


def test_the_rule_for_null():
    # unset: auto, at most the usable cores (what is free is measured when applied)
    for cores in (1, 2, 8, 64):
        got = threads.resolve(None, environ={}, cores=cores)
        assert (got.threads, got.source, got.usable_cores) == (cores, "auto", cores)
    assert "auto, at most 8" in threads.resolve(None, environ={}, cores=8).describe()
    # the free cores, rounded: a neighbour using more than half a core takes one; at least 1
    table = {(2, 0.0): 2, (2, 0.4): 2, (2, 0.6): 1, (2, 1.0): 1, (2, 3.5): 1, (8, 0.0): 8, (8, 2.2): 6,
             (8, 2.7): 5, (1, 0.9): 1}
    assert {key: threads.free_threads(*key) for key in table} == table
    # the environment's OMP_NUM_THREADS (a scheduler's choice) when set and valid
    assert threads.resolve(None, environ={"OMP_NUM_THREADS": "3"}, cores=8).threads == 3
    assert threads.resolve(None, environ={"OMP_NUM_THREADS": "3"}, cores=8).source == "OMP_NUM_THREADS"
    for bad in ("0", "-2", "many", ""):
        assert threads.resolve(None, environ={"OMP_NUM_THREADS": bad}, cores=8).source == "auto"
    # the spec's number wins over both
    got = threads.resolve(5, environ={"OMP_NUM_THREADS": "3"}, cores=2)
    assert (got.threads, got.source) == (5, "runtime.threads")
    assert threads.now(got) == 5
    # a launched training job's processes share them
    assert [threads.per_process(8, n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


PROC_STAT = """cpu  900 0 90 5000 0 0 0 0 0 0
cpu0 100 5 10 2000 7 1 2 3 0 0
cpu1 800 0 80 3000 0 0 0 0 0 0
intr 1 2 3
"""


def test_busy_time_is_read_from_the_cpus_of_this_process_only():
    tick = os.sysconf("SC_CLK_TCK")
    # user + nice + system + irq + softirq + steal (not idle, not iowait), per CPU asked for
    assert threads._proc_stat_busy_s({0}, PROC_STAT) == (100 + 5 + 10 + 1 + 2 + 3) / tick
    assert threads._proc_stat_busy_s({0, 1}, PROC_STAT) == (121 + 880) / tick
    assert threads._proc_stat_busy_s({7}, PROC_STAT) is None


def _spin(cpu: int) -> subprocess.Popen:
    code = f"import os\ntry:\n    os.sched_setaffinity(0, {{{cpu}}})\nexcept OSError:\n    pass\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def test_auto_takes_the_cores_other_processes_leave_free():
    """Real processes spinning on every CPU of this process: the meter sees them (and not this
    process's own work), and `auto` applied next to them takes one thread."""
    import time

    import torch

    cpus = sorted(threads.affinity())
    spinners = [_spin(c) for c in cpus]
    before = torch.get_num_threads()
    try:
        time.sleep(0.5)  # let them start
        meter = threads.CpuMeter()
        t0 = time.process_time()
        while time.process_time() - t0 < 0.5:  # this process's own busy time is left out
            pass
        others = meter.others()
        assert others is not None and others >= 0.6 * len(cpus) - 0.3, others
        with threads.using(threads.resolve(None, environ={})) as record:
            assert record["source"] == "auto" and record["threads"] == 1 == torch.get_num_threads()
            assert record["others_busy_cores"] >= 0.5
    finally:
        for p in spinners:
            p.kill()
            p.wait()
        torch.set_num_threads(before)


def test_adapt_follows_the_neighbours_at_most_every_few_seconds(monkeypatch):
    """`adapt` re-reads the meter only after ADAPT_EVERY_S and moves torch's threads to what is
    free; under a fixed setting, or once `using` has ended, it does nothing."""
    import torch

    readings = iter([0.0, 2.0, 0.2, 1.4])

    class Meter:
        def others(self):
            return next(readings)

    clock = [1000.0]
    monkeypatch.setattr(threads, "CpuMeter", Meter)
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    before = torch.get_num_threads()
    try:
        with threads.using(threads.Threads(2, "auto", 2, None)) as record:
            assert record["threads"] == 2 == torch.get_num_threads()  # first look: 0.0 busy
            clock[0] += threads.ADAPT_EVERY_S - 0.1
            assert threads.adapt() is None and torch.get_num_threads() == 2  # too soon
            clock[0] += 0.2
            assert threads.adapt() == 1 == torch.get_num_threads()  # a neighbour: 2.0 busy
            clock[0] += threads.ADAPT_EVERY_S
            assert threads.adapt() == 2 == torch.get_num_threads()  # gone: 0.2 busy
            clock[0] += threads.ADAPT_EVERY_S
            assert threads.adapt() == 1 == torch.get_num_threads()  # 1.4 busy
        clock[0] += threads.ADAPT_EVERY_S
        assert threads.adapt() is None and torch.get_num_threads() == before
        with threads.using(threads.Threads(2, "runtime.threads", 2, 2)):
            clock[0] += threads.ADAPT_EVERY_S
            assert threads.adapt() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


CPUINFO = "\n\n".join(f"processor\t: {p}\nphysical id\t: 0\ncore id\t\t: {p % 2}\nmodel name\t: x" for p in range(4))


def test_usable_cores_counts_physical_cores_within_the_affinity(monkeypatch):
    # 4 logical CPUs, 2 cores with 2 hyper-threads each
    assert threads._physical_cores({0, 1, 2, 3}, CPUINFO) == 2
    assert threads._physical_cores({0, 2}, CPUINFO) == 1  # two siblings of core 0
    monkeypatch.setattr(threads, "affinity", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "_physical_cores", lambda cpus: 2)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.usable_cores() == 2
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1)  # a container limited to one CPU
    assert threads.usable_cores() == 1
    monkeypatch.undo()
    real = threads.usable_cores()
    assert 1 <= real <= len(os.sched_getaffinity(0))


def test_threads_are_no_part_of_any_stage_key(tmp_path):
    f = tmp_path / "thr.yaml"
    f.write_text(SPEC.replace("  base: {}", "  base: {}\n  sft: {train: {epochs: 1, lr: 0.001, batch_size: 4}}"))
    keys = []
    for value in (None, 1, 7):
        sets = [] if value is None else [f"runtime.threads={value}"]
        plan = build_plan(load_spec(f, sets), tmp_path / "runs")
        assert plan.stage("sft.train").hash and plan.stage("eval.base").hash
        keys.append({s.id: s.hash for s in plan.stages})
    assert keys[0] == keys[1] == keys[2]
    # (a field that is part of the keys does change them: the comparison can tell)
    other = build_plan(load_spec(f, ["eval.samples=3"]), tmp_path / "runs")
    assert other.stage("eval.base").hash != keys[0]["eval.base"]


def test_bad_thread_counts_exit_2_with_the_field(tmp_path):
    f = tmp_path / "thr.yaml"
    f.write_text(SPEC)
    for value, says in (("0", "greater than or equal to 1"), ("-3", "greater than or equal to 1"),
                        ("many", "valid integer"), ("1.5", "valid integer"), ("true", "valid integer")):
        r = leafe("validate", str(f), "--set", f"runtime.threads={value}")
        assert r.returncode == 2, (value, r.stdout, r.stderr)
        assert "runtime.threads:" in r.stderr and says in r.stderr, (value, r.stderr)
        assert "Traceback" not in r.stderr
    f.write_text(SPEC + "runtime: {threads: 0}\n")
    r = leafe("plan", str(f), "--runs-dir", str(tmp_path))
    assert r.returncode == 2 and f"{f}:12: runtime.threads:" in r.stderr.replace("\n", "")


def test_validate_and_plan_say_the_threads_and_import_no_torch(tmp_path):
    f = tmp_path / "thr.yaml"
    f.write_text(SPEC)
    code = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from leafe.cli import app
        r = CliRunner()
        for args in (["validate", {str(f)!r}, "--set", "runtime.threads=3"],
                     ["plan", {str(f)!r}, "--runs-dir", {str(tmp_path)!r}, "--set", "runtime.threads=3"]):
            res = r.invoke(app, args)
            assert res.exit_code == 0, (args, res.output)
            print(res.output)
        print("HEAVY", [m for m in ("torch", "transformers") if m in sys.modules])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    assert "torch threads: 3 (runtime.threads)" in r.stdout


def test_run_uses_the_threads_while_stages_run_and_restores_them(tmp_path, leafe_cache, monkeypatch):
    """In process (`leafe.runner.run`): torch runs the stages on runtime.threads, the manifest
    records it, and the caller's own setting is back afterwards."""
    import torch

    from leafe import runner

    f = tmp_path / "thr.yaml"
    f.write_text(SPEC + "runtime: {threads: 1}\n")
    seen: list[int] = []
    real_eval = runner.run_eval

    def spy(ctx):
        seen.append(torch.get_num_threads())
        return real_eval(ctx)

    monkeypatch.setattr(runner, "run_eval", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's own setting, unlike the spec's
    try:
        loaded = load_spec(f)
        runner.run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
        assert seen == [1]
        assert torch.get_num_threads() == 2
        manifest = json.loads((tmp_path / "runs" / "thr" / "manifest.json").read_text())
        assert manifest["threads"]["torch_intra_op"] == 1
        assert manifest["threads"]["source"] == "runtime.threads" and manifest["threads"]["setting"] == 1
        # a re-run with nothing to do starts no torch work and keeps the record
        runner.run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
        assert seen == [1]
        again = json.loads((tmp_path / "runs" / "thr" / "manifest.json").read_text())
        assert again["threads"] == manifest["threads"]
    finally:
        torch.set_num_threads(before)


def test_leafe_run_sets_the_threads_of_its_process(tmp_path, leafe_cache):
    """`leafe run` in a fresh process started with OMP_NUM_THREADS=3: torch's intra- and
    inter-op threads follow runtime.threads (1), not the environment."""
    f = tmp_path / "thr.yaml"
    f.write_text(SPEC)
    env = {**os.environ, "OMP_NUM_THREADS": "3", "LEAFE_CACHE": str(leafe_cache)}
    r = leafe("run", str(f), "--set", "runtime.threads=1", "--runs-dir", str(tmp_path / "runs"),
              "--reports-dir", str(tmp_path / "reports"), env=env)
    assert r.returncode == 0, r.stderr
    assert "torch threads: 1 (runtime.threads)" in r.stdout
    record = json.loads((tmp_path / "runs" / "thr" / "manifest.json").read_text())["threads"]
    assert record["torch_intra_op"] == 1 and record["torch_inter_op"] == 1


def test_launched_training_processes_get_their_share(tmp_path, leafe_cache, monkeypatch):
    """A training job under `accelerate launch` runs on runtime.threads // num_processes
    threads per process (here 2, while this process's environment says 1; one process, to
    keep the test light: the share itself is `per_process`, tested above)."""
    from leafe.runner import run

    processes = 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    f = tmp_path / "thr.yaml"
    f.write_text(SPEC.replace("  base: {}", "  sft: {train: {epochs: 1, lr: 0.001, batch_size: 2}}")
                 + f"runtime: {{threads: {2 * processes}, training: {{launcher: accelerate, num_processes: {processes}}}}}\n")
    loaded = load_spec(f)
    out = io.StringIO()
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=out, width=200))
    plan = build_plan(loaded, tmp_path / "runs")
    stage = plan.dir(plan.stage("sft.train"))
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["processes"] == processes and metrics["torch_threads"] == 2
    job = json.loads((stage / "launch" / "job.json").read_text())
    assert job["threads"] == 2 and "(2 torch threads per process)" in out.getvalue()


def test_a_run_looks_again_before_each_generation_batch_and_optimizer_step(tmp_path, leafe_cache, monkeypatch):
    """Under the default (auto), the agent loop's generation batches and every optimizer step
    of a training stage call `adapt`; the manifest records auto and what it took."""
    import inspect

    from leafe.runner import run

    callers: list[str] = []
    real = threads.adapt

    def spy():
        callers.append(inspect.stack()[1].function)
        return real()

    monkeypatch.setattr(threads, "adapt", spy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    f = tmp_path / "thr.yaml"
    f.write_text(SPEC.replace("  base: {}", "  sft: {train: {epochs: 1, lr: 0.001, batch_size: 2}}"))
    loaded = load_spec(f)
    out = io.StringIO()
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=out, width=200))
    plan = build_plan(loaded, tmp_path / "runs")
    steps = json.loads((plan.dir(plan.stage("sft.train")) / "metrics.json").read_text())["steps"]
    assert steps >= 1 and callers.count("on_step_begin") == steps
    assert callers.count("_generate") >= 1  # evaluation's generation batches
    record = json.loads((tmp_path / "runs" / "thr" / "manifest.json").read_text())["threads"]
    assert record["source"] == "auto" and 1 <= record["threads"] <= record["usable_cores"]
    assert "torch threads: auto, at most" in out.getvalue() and "now" in out.getvalue()
