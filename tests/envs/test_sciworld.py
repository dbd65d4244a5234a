"""Tests of the sciworld adapter over the real scienceworld package (offline; Java 17).

One module-wide environment (one JVM) serves most tests; the lifecycle tests start a few more
JVMs (about 1 s each), two of them in subprocesses that are killed or exit without cleanup."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from leafe import envs
from leafe.envs import sciworld
from leafe.envs.base import Snapshot, obs_hash
from leafe.envs.sciworld import SPLITS_1_2_3, ScienceWorldEnv

ROOT = Path(__file__).resolve().parents[2]

#: Tasks of the sample: short, of both splits, with an ambiguity prompt in the gold path
#: (grow-plant), and two whose simulation follows Java identity hash codes under a default JVM
#: (chemistry-mix-paint-secondary-color, use-thermometer: their replay differed there).
SAMPLE = [
    "find-non-living-thing-0",
    "find-non-living-thing-225",
    "lifespan-longest-lived-93",
    "chemistry-mix-paint-secondary-color-0",
    "use-thermometer-0",
    "grow-plant-0",
]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not reaped by a dead parent's init yet) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


@pytest.fixture(scope="module")
def env():
    e = envs.make("sciworld")
    yield e
    e.close()


@pytest.fixture(scope="module")
def plans(env) -> dict[str, list[str]]:
    return {t: env.expert(t) for t in SAMPLE}


# -- options, registry, import ------------------------------------------------------------------
def test_make_validates_options():
    e = envs.make("sciworld", task_names=["melt", "boil", "melt"], max_variations_per_task=2)
    assert isinstance(e, ScienceWorldEnv) and e.name == "sciworld"
    assert e.options.task_names == ["boil", "melt"]  # sorted, deduplicated
    assert e.options.simplifications == "easy" and e.options.env_step_limit == 100
    assert e.options.include_action_templates is False
    assert "-XX:hashCode=2" in e.options.jvm_options
    envs.make("sciworld", simplifications="openDoors,teleportAction")
    envs.make("sciworld", simplifications="")
    no_wires = envs.make("sciworld", simplifications="noElectricalAction", task_names=["boil"])
    with pytest.raises(ValueError, match="electrical"):
        no_wires.reset("power-component-0")  # refused before any JVM starts
    assert no_wires.jvm_pid is None
    with pytest.raises(ValidationError, match="valid names: boil"):
        envs.make("sciworld", task_names=["boiling"])
    with pytest.raises(ValidationError, match="simplification"):
        envs.make("sciworld", simplifications="easy, openDoors")
    with pytest.raises(ValidationError, match="simplification"):
        envs.make("sciworld", simplifications="fast")
    with pytest.raises(ValidationError, match="power-component"):
        envs.make("sciworld", simplifications="noElectricalAction")  # all tasks
    with pytest.raises(ValidationError):
        envs.make("sciworld", max_variations_per_task=0)
    with pytest.raises(ValidationError):
        envs.make("sciworld", bogus=1)
    for name, field in ScienceWorldEnv.Options.model_fields.items():
        assert field.description, f"option {name} has no docstring"


def test_listing_tasks_needs_no_java_and_is_stable_across_processes(env):
    code = textwrap.dedent("""
        import hashlib, json, sys, leafe.envs as e
        env = e.make('sciworld')
        ids = {s: env.tasks(s) for s in ('train', 'dev', 'test')}
        assert 'scienceworld' not in sys.modules and 'py4j' not in sys.modules, 'eager import'
        assert env.jvm_pid is None
        print(json.dumps({s: hashlib.sha256('\\n'.join(v).encode()).hexdigest()
                          for s, v in ids.items()}))
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    here = {s: hashlib.sha256("\n".join(env.tasks(s)).encode()).hexdigest()
            for s in ("train", "dev", "test")}
    assert json.loads(out) == here


# -- tasks and splits ----------------------------------------------------------------------------
def test_official_splits(env):
    train, dev, test = env.tasks("train"), env.tasks("dev"), env.tasks("test")
    assert (len(train), len(dev), len(test)) == (3592, 1796, 1819)
    assert len(set(train) | set(dev) | set(test)) == 3592 + 1796 + 1819  # disjoint
    # interleaved: every task's first variation of the split, then every task's second, ...
    names = sorted(SPLITS_1_2_3)
    assert len(names) == 30
    assert test[:30] == [f"{n}-{SPLITS_1_2_3[n][1]}" for n in names]
    assert train[:30] == [f"{n}-0" for n in names] and train[30] == "boil-1"
    assert dev[0] == "boil-14" and test[0] == "boil-21"
    assert env.tasks("train") == train  # stable
    assert env.splits() == ["train", "dev", "test"]
    with pytest.raises(ValueError, match="train, dev, test"):
        env.tasks("valid")


def test_task_selection_and_variation_cap():
    e = envs.make("sciworld", task_names=["identify-life-stages-2", "boil"],
                  max_variations_per_task=5)
    # identify-life-stages-2 has variations train 0-3, dev 4-5, test 6-9
    assert e.tasks("train") == ["boil-0", "identify-life-stages-2-0", "boil-1",
                                "identify-life-stages-2-1", "boil-2", "identify-life-stages-2-2",
                                "boil-3", "identify-life-stages-2-3", "boil-4"]
    assert e.tasks("dev") == ["boil-14", "identify-life-stages-2-4", "boil-15",
                              "identify-life-stages-2-5", "boil-16", "boil-17", "boil-18"]
    assert e.tasks("test")[:2] == ["boil-21", "identify-life-stages-2-6"]
    assert e.jvm_pid is None


def test_split_table_matches_the_simulator(env):
    assert sciworld._installed_version() == sciworld.TABLE_VERSION
    env.reset("find-non-living-thing-0")  # starts the JVM
    assert sciworld.query_splits(env._sim.server) == sciworld._table_splits()


def test_bad_task_ids(env):
    for bad in ["boil-30", "boil", "boil-x", "boil-03", "nonsense-1", ""]:
        with pytest.raises(ValueError, match="taskName"):
            env.reset(bad)
    assert env.parse_task("inclined-plane-friction-named-surfaces-1385") == (
        "inclined-plane-friction-named-surfaces", 1385)


# -- observations and steps ----------------------------------------------------------------------
def test_reset_observation(env):
    obs = env.reset("find-non-living-thing-0")
    assert obs.text.startswith("This room is called the hallway.")
    assert obs.task.startswith("Your task is to find a(n) non-living thing.")
    assert obs.admissible is None
    assert obs.info == {"task_name": "find-non-living-thing", "variation": 0,
                        "score": obs.info["score"], "moves": 0, "ambiguous": False,
                        "completed": False}
    assert 0 <= obs.info["score"] < 100  # some tasks give points for the start already
    # action templates on request
    env.options = env.options.model_copy(update={"include_action_templates": True})
    try:
        obs = env.reset("find-non-living-thing-0")
        assert "open OBJ" in obs.admissible and "focus on OBJ" in obs.admissible
        assert "teleport OBJ" in obs.admissible  # part of `easy`
        assert env.step("look around").observation.admissible == obs.admissible
    finally:
        env.options = env.options.model_copy(update={"include_action_templates": False})


def test_invalid_actions_get_the_simulators_feedback(env):
    env.reset("find-non-living-thing-0")
    before = env.step("look around").observation.text
    for action in ["jump over the moon", "", "focus"]:
        s = env.step(action)
        assert s.observation.text == "No known action matches that input."
        assert (s.valid, s.reward, s.done, s.success) == (False, 0.0, False, False)
    assert env.step("look around").observation.text == before  # nothing changed
    # case and surrounding whitespace do not matter
    assert env.step("  LOOK AROUND ").observation.text == before


def test_rewards_are_score_changes(env, plans):
    for task in ["use-thermometer-0", "find-non-living-thing-0"]:
        start = env.reset(task).info["score"]
        steps = [env.step(a) for a in plans[task]]
        scores = [s.observation.info["score"] for s in steps]
        assert [s.reward for s in steps] == [b - a for a, b in zip([start] + scores, scores)]
        assert start + sum(s.reward for s in steps) == scores[-1] == 100
        assert len(set(scores)) > 2  # partial credit along the way


def test_env_step_limit_ends_the_episode(env, plans):
    task = "use-thermometer-0"
    env.options = env.options.model_copy(update={"env_step_limit": 3})
    try:
        env.reset(task)
        for action in plans[task]:
            s = env.step(action)
            if s.observation.info["moves"] > 3:
                break
            assert not s.done
        assert s.done and not s.success
    finally:
        env.options = env.options.model_copy(update={"env_step_limit": 100})


# -- ambiguity prompts ---------------------------------------------------------------------------
def test_ambiguity_prompt_takes_a_number(env, plans):
    task = "grow-plant-0"
    plan = plans[task]
    k = plan.index("0")  # the gold path answers an ambiguity prompt
    env.reset(task)
    for action in plan[: k - 1]:
        env.step(action)
    snap = env.snapshot()
    s = env.step(plan[k - 1])
    assert s.observation.text.startswith("Ambiguous request: Please enter the number")
    assert "\n0:\t" in s.observation.text and "\n1:\t" in s.observation.text
    assert s.observation.info["ambiguous"] and s.valid and not s.done
    s = env.step("0")
    assert s.valid and not s.observation.info["ambiguous"]
    assert s.observation.text.startswith("You move the")
    resolved = s.observation.text
    # an option that does not exist cancels the request: the simulator's "Unknown action."
    env.restore(snap)
    env.step(plan[k - 1])
    s = env.step("99")
    assert not s.valid and s.observation.text.startswith("Unknown action.")
    env.restore(snap)
    env.step(plan[k - 1])
    assert env.step("0").observation.text == resolved


# -- expert --------------------------------------------------------------------------------------
def test_expert_succeeds_exactly_at_the_end(env, plans):
    golds = {t: env.gold_path(t) for t in ["find-non-living-thing-225", "use-thermometer-0"]}
    for task, gold in golds.items():
        assert plans[task] == gold[: len(plans[task])]  # the gold path, cut at its first success
    assert len(golds["use-thermometer-0"]) > len(plans["use-thermometer-0"])  # was cut
    for task in SAMPLE:
        plan = plans[task]
        assert plan, task
        env.reset(task)
        steps = [env.step(a) for a in plan]
        assert [s.success for s in steps] == [False] * (len(plan) - 1) + [True], task
        assert [s.done for s in steps] == [False] * (len(plan) - 1) + [True], task
        assert steps[-1].observation.info["score"] == 100
    assert "0" in plans["grow-plant-0"]  # an ambiguity answer, replayed as it is


def test_expert_leaves_the_episode_as_it_was(env, plans):
    task, other = "use-thermometer-0", "lifespan-longest-lived-93"
    plan = plans[task]
    env.reset(task)
    for a in plan[:4]:
        env.step(a)
    sciworld._EXPERTS.pop(("lifespan-longest-lived", 93, "easy", tuple(env.options.jvm_options)))
    assert env.expert(other) == plans[other]  # computed again, same plan
    assert env.actions == plan[:4] and env.task_id == task
    rest = [env.step(a) for a in plan[4:]]
    assert rest[-1].success


# -- snapshots -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["use-thermometer-0", "grow-plant-0",
                                  "chemistry-mix-paint-secondary-color-0"])
def test_restore_gives_the_same_observation_and_future(env, plans, task):
    plan = plans[task]
    k = len(plan) // 2
    env.reset(task)
    for a in plan[:k] + ["bogus action", "wait1"]:
        env.step(a)
    snap = env.snapshot()
    at_snap = env._last_obs.text
    future = plan[k:] + ["look around", "inventory"]
    original = [env.step(a) for a in future]
    env.reset("find-non-living-thing-0")  # something else in between
    env.step("open door to kitchen")
    obs = env.restore(snap)
    assert obs.text == at_snap and env.actions == plan[:k] + ["bogus action", "wait1"]
    again = [env.step(a) for a in future]
    assert [(s.observation.text, s.reward, s.done, s.success) for s in again] == [
        (s.observation.text, s.reward, s.done, s.success) for s in original]
    assert any(s.success for s in again)


def test_restore_checks_the_observation_hash(env, plans):
    task = "find-non-living-thing-0"
    env.reset(task)
    env.step(plans[task][0])
    snap = env.snapshot()
    forged = Snapshot(snap.task_id, snap.actions, obs_hash("something else"))
    from leafe.errors import NonDeterministicEnvError

    with pytest.raises(NonDeterministicEnvError):
        env.restore(forged)


# -- JVM lifecycle -------------------------------------------------------------------------------
def test_jvm_is_started_lazily_reused_and_stopped(env, plans):
    other = envs.make("sciworld")
    assert other.jvm_pid is None
    other.tasks("train")
    assert other.jvm_pid is None  # listing tasks starts nothing
    task = "use-thermometer-0"
    # a snapshot of the shared env restores in this fresh JVM (another history) by replay
    env.reset(task)
    for a in plans[task][:8]:
        env.step(a)
    snap = env.snapshot()
    assert other.restore(snap).text == env._last_obs.text
    pid = other.jvm_pid
    assert pid and pid != env.jvm_pid and pid_alive(pid)
    assert [other.step(a).observation.text for a in plans[task][8:]] == [
        env.step(a).observation.text for a in plans[task][8:]]
    other.reset("boil-0")
    assert other.jvm_pid == pid  # one JVM across resets
    other.close()
    assert not pid_alive(pid)
    assert other.jvm_pid is None
    other.close()  # idempotent
    # usable again after close (a new JVM); garbage collection stops that one
    other.reset("find-non-living-thing-0")
    pid2 = other.jvm_pid
    assert pid2 and pid2 != pid
    del other
    gc.collect()
    assert not pid_alive(pid2)


_CHILD = textwrap.dedent("""
    import os, sys, time, leafe.envs as e
    env = e.make('sciworld')
    env.reset('find-non-living-thing-0')
    env.step('open door to kitchen')
    if sys.argv[1] == 'exit':  # leave without close(): the exit handlers stop the JVM
        print(env.jvm_pid, flush=True)
        sys.exit(0)
    child = os.fork()  # a forked child keeps copies of the parent's file descriptors
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print(env.jvm_pid, child, flush=True)
    time.sleep(60)
""")


def test_no_jvm_outlives_its_process():
    # normal exit without close()
    out = subprocess.run([sys.executable, "-c", _CHILD, "exit"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    jvm = int(out.split()[0])
    assert not pid_alive(jvm)
    # SIGKILL mid-episode, while a forked child of the killed process still lives
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, "kill"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        jvm, child = (int(x) for x in proc.stdout.readline().split())
        assert pid_alive(jvm)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_gone(jvm, 15), "the JVM outlived its SIGKILLed parent"
        assert pid_alive(child)  # the fork child did not keep it alive
    finally:  # clean up whatever a failure left behind
        proc.kill()
        for pid in [p for p in (locals().get("jvm"), locals().get("child")) if p]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- specs ---------------------------------------------------------------------------------------
def test_specs_validate():
    from leafe.spec import load_spec

    paper = load_spec(ROOT / "specs" / "sciworld.yaml")
    assert paper.spec.env.adapter == "sciworld" and paper.spec.env.max_steps == 50
    assert paper.spec.env.test_split == "test"
    assert paper.env_options.task_names is None and paper.env_options.max_variations_per_task is None
    offline = load_spec(ROOT / "specs" / "sciworld-offline.yaml")
    assert offline.spec.models.policy.name == "leafe:smollm2-135m-instruct"
    assert set(offline.spec.methods) == {"base", "sft"}


@pytest.mark.slow  # about 30 s: the tiny model's training and evaluation, 4 JVMs
def test_offline_spec_runs_end_to_end(tmp_path, leafe_cache):
    from rich.console import Console

    from leafe.plan import build_plan
    from leafe.runner import run
    from leafe.spec import load_spec

    loaded = load_spec(ROOT / "specs" / "sciworld-offline.yaml", [
        "models.policy.name=leafe:tiny-qwen2", "models.policy.max_tokens=8",
        "models.policy.batch_size=4", "env.train_tasks=2", "env.test_tasks=2",
        "env.max_steps=3", "budget.interactions_per_task=8", "eval.samples=1", "eval.k=[1]",
        "eval.batch_size=2", "methods.sft.train.epochs=1", "methods.sft.train.batch_size=2",
    ])
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=None, quiet=True))
    plan = build_plan(loaded, tmp_path / "runs")
    report = json.loads((tmp_path / "reports" / "sciworld-offline.json").read_text())
    assert {r["method"] for r in report["rows"]} == {"base", "sft"}
    for name in ("base", "sft"):
        log = plan.dir(plan.stage(f"eval.{name}")) / "records.jsonl"
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        episodes = [r for r in recs if r["kind"] == "episode"]
        assert {e["task"] for e in episodes} == {"find-non-living-thing-225",
                                                 "lifespan-longest-lived-93"}
        steps = [r for r in recs if r["kind"] == "step"]
        assert len(steps) == sum(e["steps"] for e in episodes) > 0
        assert steps[0]["prompt"][-1]["content"].startswith("Your task is to ")
    train = json.loads((plan.dir(plan.stage("sft.train")) / "metrics.json").read_text())
    assert train["examples"] > 0 and train["interactions"] > 0
