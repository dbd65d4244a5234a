"""Environment worker processes: pooled environments behave exactly like in-process ones,
step in parallel, and a crashed or hung worker is killed (with its children), replaced, and
its evaluation chunk re-run to the same records as an uninterrupted run."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the test doubles' module; worker processes inherit sys.path

from leafe import envs  # noqa: E402
from leafe.envs.workers import PooledEnv, WorkerPool  # noqa: E402
from leafe.errors import EnvWorkerError  # noqa: E402
from leafe.loop import LoopStats, run_episodes  # noqa: E402
from leafe.metrics import episode_metrics  # noqa: E402
from leafe.models.base import ChatModel, Completion, Sampling  # noqa: E402
from leafe.plan import build_plan  # noqa: E402
from leafe.runner import run  # noqa: E402
from leafe.spec import load_spec  # noqa: E402
from leafe.spec.schema import EnvSpec  # noqa: E402
from leafe.stage import StageContext, run_eval  # noqa: E402

envs.registry.register("slow-sokoban", "_worker_envs:SlowSokoban")
envs.registry.register("faulty-sokoban", "_worker_envs:FaultySokoban")

OPTS = {"train_size": 20}  # a small train split: each worker builds its fingerprints fast


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def worker_processes() -> list[int]:
    """Live environment worker processes started by this test process."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"leafe.envs.workers" in cmd:
            out.append(int(d.name))
    return out


class Scripted(ChatModel):
    def __init__(self, reply):
        self.reply = reply

    def _generate(self, conversations, sampling, seeds):
        return [Completion(text=self.reply, index=i, sample=0, prompt_tokens=1, completion_tokens=1)
                for i in range(len(conversations))]


def long_tasks(ref, n: int) -> list[str]:
    """The first n test tasks whose expert takes at least 3 moves."""
    return [t for t in ref.tasks("test")[:30] if len(ref.expert(t)) >= 3][:n]


@pytest.fixture
def pool2():
    with WorkerPool("sokoban", OPTS, n=2, timeout=30) as pool:
        yield pool
    assert all(wait_dead(p) for p in pool.pids())


def test_pooled_env_matches_in_process_env(pool2):
    ref = envs.make("sokoban", **OPTS)
    tasks = long_tasks(ref, 3)
    proxy = pool2.make()
    assert isinstance(proxy, PooledEnv)
    assert proxy.tasks("test") == ref.tasks("test") and proxy.splits() == ref.splits()
    for n, task in enumerate(tasks):
        plan = ref.expert(task)
        assert proxy.expert(task) == plan
        if n % 2:
            obs = proxy.reset(task)
        else:
            proxy.submit_reset(task)
            obs = proxy.collect_reset()
        assert obs == ref.reset(task)
        for i, action in enumerate(plan):
            if i % 2:
                got = proxy.step(action)
            else:
                proxy.submit_step(action)
                got = proxy.collect_step()
            want = ref.step(action)
            assert got == want
            assert got.success == (i == len(plan) - 1)
        assert proxy.actions == plan and proxy.task_id == task
    # invalid actions get the environment's feedback, through the pool too
    proxy.reset(tasks[0])
    bad = proxy.step("jump")
    assert bad.valid is False and "Unknown action" in bad.observation.text
    proxy.close()


def test_snapshot_restore_through_pool(pool2):
    ref = envs.make("sokoban", **OPTS)
    task = long_tasks(ref, 2)[1]
    plan = ref.expert(task)
    a, b = pool2.make(), pool2.make()
    assert a.worker_pid != b.worker_pid
    a.reset(task)
    for action in plan[:2]:
        a.step(action)
    snap = a.snapshot()
    assert snap.native is not None and snap.actions == plan[:2]
    replay = type(snap)(snap.task_id, list(snap.actions), snap.obs_hash)  # no native state
    future = [a.step(x) for x in plan[2:]]
    for s in (snap, replay):
        obs = b.restore(s)  # on the other worker
        assert obs == future_obs(ref, task, plan[:2])
        assert b.actions == plan[:2]
        assert [b.step(x) for x in plan[2:]] == future
        assert future[-1].success


def future_obs(ref, task, prefix):
    ref.reset(task)
    obs = None
    for x in prefix:
        obs = ref.step(x).observation
    return obs


def test_env_exceptions_are_raised_and_the_worker_survives(pool2):
    env = pool2.make()
    with pytest.raises(ValueError, match="unknown task id") as e:
        env.reset("nope-1")
    assert any("environment worker" in n for n in getattr(e.value, "__notes__", []))
    assert env.reset("test-00000").text.startswith("Game started")
    assert pool2.restarts == 0


def test_sigkilled_worker_raises_and_the_pool_recovers(pool2):
    es = [pool2.make() for _ in range(4)]
    for e in es:
        e.reset("test-00002")
    victim = es[0].worker_pid
    assert [e.worker_pid for e in es].count(victim) == 2  # round-robin: two envs per worker
    os.kill(victim, signal.SIGKILL)
    lost = [e for e in es if e.worker_pid == victim]
    kept = [e for e in es if e.worker_pid != victim]
    with pytest.raises(EnvWorkerError, match="killed by SIGKILL"):
        lost[0].step("up")
    with pytest.raises(EnvWorkerError, match="restarted"):  # its state is gone too
        lost[1].step("up")
    assert all(e.step("up").observation.text for e in kept)  # the other worker is untouched
    assert pool2.restarts == 1 and victim not in pool2.pids() and not alive(victim)
    fresh = pool2.make()
    assert fresh.reset("test-00002") == kept[0].reset("test-00002")
    for e in es + [fresh]:
        e.close()


def test_a_hang_is_killed_with_its_child_processes():
    opts = {**OPTS, "fault": "hang", "fault_step": 1, "fault_task": "test-00000", "child": True}
    with WorkerPool("faulty-sokoban", opts, n=2, timeout=1.5) as pool:
        env, other = pool.make(), pool.make()
        obs = env.reset("test-00000")
        other.reset("test-00001")
        child, worker = obs.info["child_pid"], env.worker_pid
        assert alive(child) and other.worker_pid != worker
        env.step("up")
        other.step("up")
        env.submit_step("up")  # hangs
        other.submit_step("up")
        t0 = time.monotonic()
        with pytest.raises(EnvWorkerError, match="did not answer within 1.5 s"):
            env.collect_step()
        assert 1.4 < time.monotonic() - t0 < 10
        assert wait_dead(child) and wait_dead(worker)  # the whole group went
        # the other worker answered long ago, while nobody was reading: not a hang
        assert other.collect_step().observation.text
        again = pool.make()
        assert again.worker_pid not in (worker, other.worker_pid)
        assert again.reset("test-00000").text == obs.text
    assert worker_processes() == []


def test_workers_step_in_parallel():
    delay, turns, n = 0.2, 3, 4
    spec = EnvSpec(adapter="slow-sokoban", max_steps=turns, prompt={"user": "{{ observation }}"})
    model = Scripted("<action>up</action>")
    pairs = [(f"test-{i:05d}", 0) for i in range(n)]
    opts = {**OPTS, "delay": delay}

    stats = LoopStats()
    t0 = time.perf_counter()
    seq = run_episodes(lambda: envs.make("slow-sokoban", **opts), pairs, model, Sampling(), spec,
                       seed=0, stats=stats)
    t_seq = time.perf_counter() - t0

    with WorkerPool("slow-sokoban", opts, n=n, timeout=30) as pool:
        warm = [pool.make() for _ in range(n)]  # start-up and room generation, not timed
        for e in warm:
            e.submit_reset("test-00000")
        for e in warm:
            e.collect_reset()
            e.close()
        t0 = time.perf_counter()
        par = run_episodes(pool.make, pairs, model, Sampling(), spec, seed=0)
        t_par = time.perf_counter() - t0
    assert par == seq
    assert stats.env_steps >= 2 * n and t_seq > stats.env_steps * delay
    assert t_par < 0.6 * t_seq, (t_par, t_seq)


def test_a_killed_parent_takes_its_workers_along(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        from leafe import envs
        from leafe.envs.workers import WorkerPool
        envs.registry.register("faulty-sokoban", "_worker_envs:FaultySokoban")
        pool = WorkerPool("faulty-sokoban", {{"train_size": 20, "child": True}}, n=1)
        env = pool.make()
        obs = env.reset("test-00000")
        print(env.worker_pid, obs.info["child_pid"], flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker, child = map(int, p.stdout.readline().split())
        assert alive(worker) and alive(child)
    finally:
        p.kill()
        p.wait()
    assert wait_dead(worker) and wait_dead(child)


# -- evaluation ---------------------------------------------------------------------------------
SPEC = """\
leafe: 1
name: pooled
seed: 5
env:
  use: sokoban
  adapter: faulty-sokoban
  options: {train_size: 20}
  max_steps: 3
  test_tasks: 3
  prompt: {system: null, user: "{{ observation }}"}  # short prompts: fast on CPU
  action: {on_parse_failure: passthrough}
models:
  policy: {name: "leafe:tiny-qwen2", max_tokens: 4, temperature: 1.0}
methods:
  base: {}
eval: {samples: 2, k: [1, 2], batch_size: 4}
report: {formats: [json]}
"""
# chunk 0: test-00000 x2, test-00001 x2; chunk 1: test-00002 x2. test-00000 faults at its last
# step (2); with the scripted policy both test-00001 episodes are solved at step 0, so they are
# recorded before the fault (and must not be written again by the re-run).
FAULT_ONCE = ["env.options.fault_step=2", "env.options.fault_task=test-00000"]


def write_spec(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    f = tmp / "pooled.yaml"
    f.write_text(SPEC)
    return f


def read_stage(stage: Path) -> tuple[list[dict], dict]:
    recs = [json.loads(x) for x in (stage / "records.jsonl").read_text().splitlines()]
    return recs, json.loads((stage / "metrics.json").read_text())


def run_spec(tmp: Path, overrides: list[str]) -> tuple[list[dict], dict, str]:
    """The whole spec through leafe.runner.run with the tiny model."""
    out = io.StringIO()
    run(load_spec(write_spec(tmp), overrides), tmp / "runs", tmp / "reports",
        Console(file=out, width=200))
    return (*read_stage(next((tmp / "runs").glob("pooled/eval.base-*"))),
            " ".join(out.getvalue().split()))


class SeededPolicy(ChatModel):
    """A fast stand-in for a sampled policy: each reply is a function of the call's seed, the
    conversation and its position in the batch (invalid moves included)."""

    def _generate(self, conversations, sampling, seeds):
        out = []
        for i, conv in enumerate(conversations):
            h = hashlib.sha256(f"{sampling.seed}|{i}|{conv}".encode()).digest()[0]
            text = ["up", "down", "left", "right", "jump"][h % 5]
            out.append(Completion(text=text, index=i, sample=0, prompt_tokens=1, completion_tokens=1))
        return out


def run_eval_scripted(tmp: Path, overrides: list[str], monkeypatch) -> tuple[list[dict], dict, str]:
    """The evaluation stage alone, with `SeededPolicy` as the policy."""
    loaded = load_spec(write_spec(tmp), overrides)
    plan = build_plan(loaded, tmp / "runs")
    stage = plan.stage("eval.base")
    out = io.StringIO()
    ctx = StageContext(loaded, plan, stage, plan.dir(stage), Console(file=out, width=200))
    monkeypatch.setattr(StageContext, "load_models", lambda self, roles, checkpoint: {"policy": SeededPolicy()})
    run_eval(ctx)
    return (*read_stage(plan.dir(stage)), " ".join(out.getvalue().split()))


def key(r: dict) -> tuple:
    return (r["task"], r["sample"], r["kind"], r.get("step", -1))


def check_once(recs: list[dict]) -> None:
    eps = [r for r in recs if r["kind"] == "episode"]
    assert Counter((e["task"], e["sample"]) for e in eps) == Counter(
        {(f"test-{t:05d}", s): 1 for t in range(3) for s in range(2)})
    steps = Counter((r["task"], r["sample"], r["step"]) for r in recs if r["kind"] == "step")
    assert all(c == 1 for c in steps.values()), "duplicate step records"
    for e in eps:
        assert sum(1 for t, s, _ in steps if (t, s) == (e["task"], e["sample"])) == e["steps"]


def same_metrics(a: dict, b: dict) -> bool:
    """Equal results; the fault counts and the model usage (re-drawn samples) may differ."""
    drop = ("env_errors", "chunk_retries", "usage")
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


@pytest.fixture(scope="module")
def scripted_reference(tmp_path_factory):
    """The evaluation with in-process environments, without faults."""
    with pytest.MonkeyPatch.context() as mp:
        recs, metrics, _ = run_eval_scripted(tmp_path_factory.mktemp("ref"), [], mp)
    check_once(recs)
    steps = {(r["task"], r["sample"]): r["steps"] for r in recs if r["kind"] == "episode"}
    assert steps[("test-00000", 0)] == steps[("test-00000", 1)] == 3  # reach the fault step
    assert steps[("test-00001", 0)] == steps[("test-00001", 1)] == 1  # done before it
    return recs, metrics


@pytest.fixture
def worker_pids(monkeypatch):
    """Pids of every worker that hosted an environment."""
    pids: list[int] = []
    make = WorkerPool.make

    def tracking(self):
        env = make(self)
        pids.append(env.worker_pid)
        return env

    monkeypatch.setattr(WorkerPool, "make", tracking)
    return pids


def no_workers_left(pids: list[int]) -> bool:
    return all(wait_dead(p) for p in pids) and worker_processes() == []


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_eval_reruns_the_chunk_of_a_crashed_or_hung_worker(tmp_path, scripted_reference, worker_pids,
                                                           monkeypatch, fault):
    marker = tmp_path / "faulted"
    recs, metrics, out = run_eval_scripted(tmp_path, [
        "runtime.env_workers.count=2", "runtime.env_workers.step_timeout_s=4", f"env.options.fault={fault}", *FAULT_ONCE,
        f"env.options.marker={marker}"], monkeypatch)
    assert marker.exists()  # the fault happened
    check_once(recs)
    ref_recs, ref_metrics = scripted_reference
    assert sorted(recs, key=key) == sorted(ref_recs, key=key)
    assert metrics["env_errors"] == 1 and metrics["chunk_retries"] == 1 and metrics["errored"] == 0
    assert same_metrics(metrics, ref_metrics)
    assert "re-running chunk 0 (retry 1/2)" in out
    assert ("killed by SIGKILL" if fault == "kill" else "did not answer within 4 s") in out
    assert len(set(worker_pids)) >= 3  # the two workers and the replacement
    assert no_workers_left(worker_pids)


def test_eval_records_errored_episodes_when_retries_run_out(tmp_path, scripted_reference, worker_pids,
                                                            monkeypatch):
    recs, metrics, out = run_eval_scripted(tmp_path, [
        "runtime.env_workers.count=2", "runtime.env_workers.episode_retries=1", "env.options.fault=kill",
        "env.options.fault_step=0", "env.options.fault_task=test-00002"], monkeypatch)
    check_once(recs)
    errored = [r for r in recs if r["kind"] == "episode" and "error" in r]
    assert sorted((r["task"], r["sample"]) for r in errored) == [("test-00002", 0), ("test-00002", 1)]
    assert all(r["success"] is False and r["steps"] == 0 and "SIGKILL" in r["error"] for r in errored)
    ref_recs, _ = scripted_reference
    healthy = [r for r in ref_recs if r["task"] != "test-00002"]
    assert sorted([r for r in recs if r["task"] != "test-00002"], key=key) == sorted(healthy, key=key)
    assert metrics["errored"] == 2 and metrics["episodes"] == 6
    assert metrics["per_task"]["test-00002"] == {"n": 2, "c": 0}
    assert metrics["env_errors"] == 2 and metrics["chunk_retries"] == 1
    assert "chunk 1 failed 2 time(s); 2 episode(s) recorded as errored" in out
    assert no_workers_left(worker_pids)


def test_runner_with_workers_survives_a_killed_worker(tmp_path, leafe_cache, worker_pids):
    """End to end with the tiny model and `--set runtime.env_workers.count=2`: a worker SIGKILLed mid-episode
    costs a chunk re-run, and the records equal those of a run in the main process."""
    ref_recs, ref_metrics, _ = run_spec(tmp_path / "ref", [])
    assert not worker_pids
    marker = tmp_path / "faulted"
    recs, metrics, out = run_spec(tmp_path / "pooled", [
        "runtime.env_workers.count=2", "env.options.fault=kill", *FAULT_ONCE, f"env.options.marker={marker}"])
    assert marker.exists() and "re-running chunk 0 (retry 1/2)" in out
    check_once(recs)
    assert any(r["kind"] == "step" and r["action"] for r in recs)  # the envs were stepped
    assert sorted(recs, key=key) == sorted(ref_recs, key=key)
    assert metrics["chunk_retries"] == 1 and same_metrics(metrics, ref_metrics)
    assert len(set(worker_pids)) >= 3 and no_workers_left(worker_pids)


def test_errored_episodes_count_as_failures():
    eps = [{"task": "a", "sample": s, "success": s == 0, "steps": 1, "prompt_tokens": 1,
            "completion_tokens": 1} for s in range(2)]
    eps.append({"task": "a", "sample": 2, "success": True, "steps": 0, "prompt_tokens": 0,
                "completion_tokens": 0, "error": "worker died"})  # never a success
    m = episode_metrics(eps, [1])
    assert m["errored"] == 1 and m["per_task"]["a"] == {"n": 3, "c": 1}
    assert m["success_rate"] == pytest.approx(1 / 3)


def test_worker_settings_do_not_change_stage_hashes(tmp_path):
    f = tmp_path / "pooled.yaml"
    f.write_text(SPEC)
    plain = build_plan(load_spec(f), tmp_path)
    pooled = build_plan(load_spec(f, ["runtime.env_workers.count=4", "runtime.env_workers.step_timeout_s=9", "runtime.env_workers.episode_retries=0"]),
                        tmp_path)
    assert [s.hash for s in plain.stages] == [s.hash for s in pooled.stages]
    assert load_spec(f, ["runtime.env_workers.count=4"]).spec.runtime.env_workers.count == 4


def test_max_restarts_stops_a_failure_that_recurs():
    """With `max_restarts: 1` the first crash is replaced as usual; the second stops with a clear
    error instead of burning through every chunk's retries, and no worker is left behind."""
    from leafe.errors import EnvWorkersExhausted

    opts = {**OPTS, "fault": "kill", "fault_step": 0}  # every episode kills its worker at once
    with WorkerPool("faulty-sokoban", opts, n=1, timeout=30, max_restarts=1) as pool:
        env = pool.make()
        env.reset("test-00000")
        with pytest.raises(EnvWorkerError, match="killed by SIGKILL"):
            env.step("up")
        assert pool.restarts == 1
        env = pool.make()
        env.reset("test-00000")
        with pytest.raises(EnvWorkersExhausted, match=r"failed 2 times .*max_restarts = 1; the last "
                                                      r"failure: worker 0 \(pid \d+\) was killed by SIGKILL"):
            env.step("up")
        pids = pool.pids()
    assert all(wait_dead(p) for p in pids) and worker_processes() == []


def test_envs_per_worker_caps_the_environments_a_worker_hosts():
    from leafe.errors import EnvWorkersFull

    with WorkerPool("sokoban", OPTS, n=2, timeout=30, envs_per_worker=2) as pool:
        es = [pool.make() for _ in range(4)]
        assert sorted(Counter(e.worker_pid for e in es).values()) == [2, 2]
        with pytest.raises(EnvWorkersFull, match=r"count \* envs_per_worker = 2 \* 2"):
            pool.make()
        es[0].close()  # a freed place is used again
        fresh = pool.make()
        assert fresh.worker_pid == es[0].worker_pid
        assert fresh.reset("test-00001").text.startswith("Game started")


def test_moved_worker_fields_name_their_new_place(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text(SPEC.replace("max_steps:", "workers: 4\n  max_steps:", 1))
    r = subprocess.run([sys.executable, "-m", "leafe", "validate", str(f)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "env.workers moved to runtime.env_workers.count" in r.stderr
    assert "Traceback" not in r.stderr
