"""Tests of the ALFWorld adapter over the real alfworld/textworld/fast-downward packages.

Offline: games come from leafe's generator (ALFWorld's bundled domain, grammar and planner);
the official source is tested on a small fake `json_2.1.1` folder made of generated games.
About 10 games are generated (about 1 s each), once per session, into the `leafe_cache`.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from leafe import envs
from leafe.envs.alfworld import TASK_TYPES, AlfworldEnv
from leafe.envs.alfworld.adapter import GAME_FILE
from leafe.envs.base import Snapshot
from leafe.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

#: The offline preset's room settings (envs/alfworld-generated.yaml), so the end-to-end test
#: reuses the games the other tests generate.
SMALL = {"receptacles": 8, "target_objects": 2, "distractors": 4}
INTRO = "You are in the middle of a room. Looking quickly around you, you see "


@pytest.fixture(scope="module")
def env(leafe_cache) -> AlfworldEnv:
    e = envs.make("alfworld", **SMALL)
    yield e
    e.close()


@pytest.fixture(scope="module")
def one_of_each(env) -> list[str]:
    """The first train task of each task type (generated on first use)."""
    ids = env.tasks("train")[: len(TASK_TYPES)]
    for task in ids:
        env.game_path(task)
    return ids


def play(env: AlfworldEnv, task: str, actions: list[str]) -> list:
    env.reset(task)
    return [env.step(a) for a in actions]


def trajectory(steps) -> list:
    return [(s.observation.text, s.observation.admissible, s.reward, s.done, s.success, s.valid)
            for s in steps]


# -- options, registry, laziness -----------------------------------------------------------------
def test_make_validates_options():
    env = envs.make("alfworld")
    assert isinstance(env, AlfworldEnv) and env.name == "alfworld"
    assert env.options.source == "generated" and env.options.task_types == list(TASK_TYPES)
    picked = envs.make("alfworld", task_types=["pick_two_obj_and_place", "look_at_obj_in_light"])
    assert picked.options.task_types == ["look_at_obj_in_light", "pick_two_obj_and_place"]
    for bad in ({"bogus": 1}, {"source": "web"}, {"task_types": []},
                {"task_types": ["pick_and_place_with_movable_recep"]},
                {"task_types": ["look_at_obj_in_light"] * 2}, {"receptacles": 2},
                {"target_objects": 1}, {"distractors": -1}, {"train_size": 0}):
        with pytest.raises(ValidationError):
            envs.make("alfworld", **bad)
    for name, field in AlfworldEnv.Options.model_fields.items():
        assert field.description, f"option {name} has no docstring"


def test_listing_and_validating_import_no_game_packages():
    code = (
        "import sys, leafe.envs as e; from leafe.spec import load_spec;"
        "env = e.make('alfworld'); env.tasks('train'); env.tasks('test');"
        "[load_spec(f) for f in ('specs/alfworld.yaml', 'specs/alfworld-offline.yaml')];"
        "bad = {'textworld', 'alfworld', 'fast_downward'} & set(sys.modules);"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- task ids --------------------------------------------------------------------------------------
def test_generated_task_ids_and_splits():
    env = envs.make("alfworld", train_size=8, test_size=3)
    train = env.tasks("train")
    assert train == [f"train/{t}-00000" for t in TASK_TYPES] + [
        "train/pick_and_place_simple-00001", "train/look_at_obj_in_light-00001"]
    assert env.tasks("test") == env.tasks("valid_unseen") == [
        "valid_unseen/pick_and_place_simple-00000", "valid_unseen/look_at_obj_in_light-00000",
        "valid_unseen/pick_clean_then_place_in_recep-00000"]
    assert env.tasks("valid_seen")[0] == "valid_seen/pick_and_place_simple-00000"
    assert env.splits() == ["train", "valid_seen", "valid_unseen", "test"]
    assert [env.task_type(t) for t in train[:6]] == list(TASK_TYPES)
    one = envs.make("alfworld", task_types=["pick_heat_then_place_in_recep"], train_size=2)
    assert one.tasks("train") == ["train/pick_heat_then_place_in_recep-00000",
                                  "train/pick_heat_then_place_in_recep-00001"]
    with pytest.raises(ValueError, match="valid_unseen"):
        env.tasks("dev")
    for bad in ("nonsense", "dev/pick_and_place_simple-00000", "train/fly-00000",
                "train/pick_and_place_simple-x"):
        with pytest.raises(ValueError, match="unknown task id"):
            env.reset(bad)


def test_task_ids_are_stable_across_processes():
    code = ("import json, leafe.envs as e; env = e.make('alfworld');"
            "print(json.dumps([env.tasks('train'), env.tasks('test')]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    env = envs.make("alfworld")
    assert json.loads(out) == [env.tasks("train"), env.tasks("test")]
    assert len(env.tasks("train")) == 600 and len(env.tasks("test")) == 140


# -- generated games ---------------------------------------------------------------------------
def test_first_observation_is_alfworld_text(env, one_of_each):
    goals = {
        "pick_and_place_simple": ("put a ", "put some "),
        "look_at_obj_in_light": ("look at ", "examine the "),
        "pick_clean_then_place_in_recep": ("put a clean ", "clean some "),
        "pick_heat_then_place_in_recep": ("put a hot ", "heat some "),
        "pick_cool_then_place_in_recep": ("put a cool ", "cool some "),
        "pick_two_obj_and_place": ("put two ", "find two "),
    }
    texts = set()
    for task in one_of_each:
        obs = env.reset(task)
        texts.add(obs.text)
        assert obs.text.startswith(INTRO), obs.text
        assert "Welcome to TextWorld" not in obs.text
        assert obs.task.startswith("Your task is to: ") and obs.task.endswith(".")
        assert obs.text.endswith("\n\n" + obs.task)
        goal = obs.task[len("Your task is to: "):-1]
        assert goal.startswith(goals[env.task_type(task)]), (task, goal)
        assert obs.info["task_type"] == env.task_type(task)
        # before moving, one can only go somewhere, look or check the inventory
        assert "help" not in obs.admissible and {"look", "inventory"} <= set(obs.admissible)
        going = [a for a in obs.admissible if a.startswith("go to ")]
        assert len(going) == len(obs.admissible) - 2 >= SMALL["receptacles"]
        listed = obs.text[len(INTRO):obs.text.index(".\n")]
        for a in going:  # every receptacle of the room is listed in the first observation
            assert f"a {a[len('go to '):]}" in listed
        traj = json.loads((env.game_path(task).parent / "traj_data.json").read_text())
        assert traj["task_type"] == env.task_type(task) and traj["leafe"]["goal"] == goal
        assert traj["pddl_params"]["object_target"].lower() in goal
    assert len(texts) == len(one_of_each)


def test_expert_succeeds_exactly_at_the_end(env, one_of_each):
    for task in one_of_each:
        plan = env.expert(task)
        assert plan and all(isinstance(a, str) for a in plan), task
        obs = env.reset(task)
        for k, action in enumerate(plan):
            assert action in obs.admissible, (task, k, action)
            step = env.step(action)
            last = k == len(plan) - 1
            assert step.valid and step.success is last and step.done is last, (task, k)
            assert step.reward == (1.0 if last else 0.0)
            obs = step.observation
        data = json.loads(env.game_path(task).read_text())
        assert data["solvable"] is True and data["walkthrough"] == plan
        assert set(data) >= {"pddl_domain", "grammar", "pddl_problem"}
    by_type = {env.task_type(t): env.expert(t) for t in one_of_each}
    assert any(a.startswith("heat ") for a in by_type["pick_heat_then_place_in_recep"])
    assert any(a.startswith("cool ") for a in by_type["pick_cool_then_place_in_recep"])
    assert any(a.startswith("clean ") for a in by_type["pick_clean_then_place_in_recep"])
    assert any(a.startswith("use desklamp") for a in by_type["look_at_obj_in_light"])
    assert sum(a.startswith("move ") for a in by_type["pick_two_obj_and_place"]) == 2


def test_expert_leaves_the_episode_alone(env, one_of_each):
    task, other = one_of_each[3], one_of_each[4]
    plan = env.expert(task)
    env.reset(task)
    env.step(plan[0])
    before = env.actions
    env.expert(other)
    env._experts.clear()
    env.expert(other)
    assert env.actions == before
    steps = [env.step(a) for a in plan[1:]]
    assert steps[-1].success


def test_handcoded_expert_searches_and_falls_back_to_the_planner(env, one_of_each, monkeypatch):
    hc = envs.make("alfworld", expert="handcoded", **SMALL)
    task = one_of_each[0]
    plan = hc.expert(task)
    assert plan[0] == "look" and plan != env.expert(task)  # ALFWorld's handcoded expert
    steps = play(hc, task, plan)
    assert steps[-1].success and not any(s.success for s in steps[:-1])
    again = envs.make("alfworld", expert="handcoded", **SMALL)
    assert again.expert(one_of_each[0]) == hc.expert(one_of_each[0])  # seeded: deterministic
    import leafe.envs.alfworld.engine as engine

    monkeypatch.setattr(engine, "handcoded_walkthrough", lambda *args, **kwargs: None)
    stuck = envs.make("alfworld", expert="handcoded", **SMALL)
    assert stuck.expert(one_of_each[0]) == env.expert(one_of_each[0])
    for e in (hc, again, stuck):
        e.close()


def test_generation_is_deterministic_across_processes(env, one_of_each, tmp_path):
    task = one_of_each[0]
    digest = hashlib.sha256(env.game_path(task).read_bytes()).hexdigest()
    code = (
        "import hashlib, leafe.envs as e;"
        f"env = e.make('alfworld', **{SMALL!r});"
        f"print(hashlib.sha256(env.game_path({task!r}).read_bytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True,
                         text=True, env={**_environ(), "LEAFE_CACHE": str(tmp_path)}).stdout
    assert out.split() == [digest]
    rel = env.game_path(task).relative_to(env.generated_dir().parent)
    assert (tmp_path / "alfworld" / rel).is_file()  # generated anew in the other cache


def test_sampled_problems_keep_alfred_rules():
    """Many draws, no planner: every object sits in a receptacle that can hold it, the goal is
    not met at the start, the task's appliances are there, the room has enough receptacles."""
    import re

    import alfworld.gen.constants as constants

    from leafe.envs.alfworld import generator as gen

    settings = gen.Settings(**SMALL)
    for i in range(120):
        task_type = TASK_TYPES[i % len(TASK_TYPES)]
        p = gen.sample_problem(settings, task_type, random.Random(i))
        assert not isinstance(p, str), p
        init = p.pddl.split("(:init", 1)[1].split("(:goal", 1)[0]
        facts = re.findall(r"\((\w+) (\S+) (\S+)\)", init)
        rtype = {a: b[: -len("Type")] for name, a, b in facts if name == "receptacleType"}
        otype = {a: b[: -len("Type")] for name, a, b in facts if name == "objectType"}
        inside = [(otype[o], rtype[r]) for name, o, r in facts if name == "inReceptacle"]
        assert len(rtype) >= SMALL["receptacles"] and len(inside) == len(otype)
        for o, r in inside:
            assert o == gen.LAMP or o in constants.VAL_RECEPTACLE_OBJECTS[r], (o, r)
        assert (p.obj, p.recep) not in inside  # the goal is not met at the start
        appliance = gen.STATE_CHANGE.get(task_type, ("",))[0]
        needed = {p.recep, appliance} - {""}
        assert needed <= set(rtype.values()) and p.obj in otype.values()
        if task_type == "look_at_obj_in_light":
            assert any(o == gen.LAMP and r in gen.LAMP_HOLDERS for o, r in inside)
        if task_type == "pick_two_obj_and_place":
            assert list(otype.values()).count(p.obj) >= 2
        assert p.room in constants.GOALS_VALID[task_type]
        assert p.obj.lower() in p.goal and p.pddl.count("(:goal") == 1


def test_generation_retries_unsolvable_draws_deterministically():
    from leafe.envs.alfworld import generator as gen

    drawn = []

    def every_other(data):  # the first draw of each generation is "unsolvable"
        drawn.append(data["pddl_problem"])
        return (None, "no plan") if len(drawn) % 2 else (["look"], "")

    settings = gen.Settings(**SMALL)
    domain, grammar = (p.read_text() for p in gen.logic_files())
    a, traj = gen.generate(settings, "pick_and_place_simple", ("train", 0), every_other,
                           domain, grammar)
    assert traj["leafe"]["attempt"] == 1 and a["pddl_problem"] == drawn[1] != drawn[0]
    assert a["walkthrough"] == ["look"] and a["solvable"] is True
    b, _ = gen.generate(settings, "pick_and_place_simple", ("train", 0), every_other,
                        domain, grammar)
    assert b == a
    with pytest.raises(RuntimeError, match="no solvable pick_and_place_simple game"):
        gen.generate(settings, "pick_and_place_simple", ("train", 0),
                     lambda data: (None, "no plan"), domain, grammar)


def test_settings_and_splits_give_other_games(env, one_of_each):
    bigger = envs.make("alfworld", receptacles=10, target_objects=2, distractors=4)
    assert bigger.generated_dir() != env.generated_dir()
    task = one_of_each[0]
    assert bigger.reset(task).text != env.reset(task).text
    assert env.reset("valid_unseen/pick_and_place_simple-00000").text != env.reset(task).text
    bigger.close()


def test_a_game_written_meanwhile_is_kept(env, one_of_each):
    task = one_of_each[1]
    path = env.game_path(task)
    before = path.read_bytes()
    split, task_type, k = env._parse_generated(task)
    env._generate_into(path.parent, task_type, split, k)  # as if another process won the race
    assert path.read_bytes() == before
    leftovers = [p.name for p in path.parent.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


# -- steps -----------------------------------------------------------------------------------------
def test_invalid_commands_get_the_game_feedback(env, one_of_each):
    task = one_of_each[0]
    plan = env.expert(task)
    first = env.reset(task)
    for bad in ["jump", "take unicorn 1 from moon 1", "", plan[1]]:  # plan[1] is not yet possible
        step = env.step(bad)
        assert (step.valid, step.done, step.success, step.reward) == (False, False, False, 0.0)
        assert step.observation.text == "Nothing happens."
        assert step.observation.admissible == first.admissible  # nothing changed
        assert step.observation.task == first.task
    # case and spacing are forgiven
    step = env.step("  " + plan[0].upper().replace(" ", "   ") + "\n")
    assert step.valid and step.observation.text.startswith("You arrive at ")
    # 'help' works although it is not listed
    assert "Available commands" in env.step("help").observation.text


def test_planner_libraries_are_pooled(env, one_of_each, monkeypatch):
    import fast_downward

    loads = []
    real = fast_downward.load_lib
    monkeypatch.setattr(fast_downward, "load_lib", lambda: loads.append(1) or real())
    for _ in range(3):  # the agent loop makes and closes an environment per episode
        e = envs.make("alfworld", **SMALL)
        e.reset(one_of_each[0])
        e.close()
    assert len(loads) <= 1  # each PddlEnv would otherwise load its own 33 MB library copy


def test_engine_leaves_sys_argv_alone(env, one_of_each):
    argv = sys.argv
    saved = list(argv)
    env.reset(one_of_each[2])  # fast-downward's translator rewrites sys.argv on each load
    env.reset(one_of_each[3])
    assert sys.argv is argv and sys.argv == saved


def test_restore_gives_the_same_observation_and_future(env, one_of_each):
    rng = random.Random(0)
    for task in one_of_each[2:4]:
        plan = env.expert(task)
        obs = env.reset(task)
        prefix = []
        for _ in range(4):  # wander a bit, including an invalid command
            action = rng.choice(obs.admissible + ["dance"])
            prefix.append(action)
            obs = env.step(action).observation
        snap = env.snapshot()
        at_snap = obs.text
        future = ["inventory"] + plan
        original = trajectory(env.step(a) for a in future)
        for target in (env, envs.make("alfworld", **SMALL)):
            restored = target.restore(snap)
            assert restored.text == at_snap and target.actions == prefix
            assert trajectory(target.step(a) for a in future) == original
        # a snapshot with the replay data only (no native state) restores the same way
        bare = Snapshot(snap.task_id, snap.actions, snap.obs_hash)
        assert env.restore(bare).text == at_snap


def test_observations_are_stable_across_processes(env, one_of_each):
    task = one_of_each[5]
    plan = env.expert(task)
    mine = [env.reset(task).text] + [s.observation.text for s in play(env, task, plan)]
    code = (
        "import json, leafe.envs as e;"
        f"env = e.make('alfworld', **{SMALL!r}); task = {task!r};"
        "texts = [env.reset(task).text] + [env.step(a).observation.text for a in env.expert(task)];"
        "print(json.dumps(texts))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True,
                         text=True, env={**_environ(), "PYTHONHASHSEED": "123"}).stdout
    assert json.loads(out) == mine


# -- official data -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official(env, one_of_each, tmp_path_factory) -> Path:
    """A fake $ALFWORLD_DATA in alfworld-download's layout, made of generated games, plus
    folders ALFWorld skips (movable, Sliced, unsolvable)."""
    root = tmp_path_factory.mktemp("alfworld-data")
    base = root / "json_2.1.1"
    for split in ("train", "valid_seen", "valid_unseen"):
        for i, task in enumerate(one_of_each):
            traj = json.loads((env.game_path(task).parent / "traj_data.json").read_text())
            p = traj["pddl_params"]
            folder = (f"{traj['task_type']}-{p['object_target']}-None-"
                      f"{p['parent_target'] or p['toggle_target']}-{10 + i}")
            trial = base / split / folder / "trial_T20190907_000000_000000"
            trial.mkdir(parents=True)
            shutil.copy(env.game_path(task), trial / GAME_FILE)
            shutil.copy(env.game_path(task).parent / "traj_data.json", trial / "traj_data.json")
        src = env.game_path(one_of_each[0])
        for skipped in ("pick_and_place_with_movable_recep-Apple-Bowl-Fridge-1/trial_T1",
                        "pick_heat_then_place_in_recep-AppleSliced-None-Fridge-1/trial_T1",
                        "pick_and_place_simple-Mug-None-Desk-1/trial_T1"):
            (base / split / skipped).mkdir(parents=True)
            shutil.copy(src, base / split / skipped / GAME_FILE)
        unsolvable = json.loads(src.read_text())
        unsolvable["solvable"] = False
        (base / split / "pick_and_place_simple-Mug-None-Desk-1/trial_T1" / GAME_FILE).write_text(
            json.dumps(unsolvable))
    return root


def test_official_games_are_listed_like_alfworld(official, env, one_of_each, monkeypatch):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    o = envs.make("alfworld", source="official", data_dir=str(official))
    test = o.tasks("test")
    assert test == o.tasks("valid_unseen") == sorted(test) and len(test) == len(TASK_TYPES)
    assert all(t.startswith("valid_unseen/") and t.endswith("/trial_T20190907_000000_000000/"
                                                            + GAME_FILE) for t in test)
    assert sorted(o.task_type(t) for t in test) == sorted(TASK_TYPES)
    assert [t.replace("train/", "valid_unseen/", 1) for t in o.tasks("train")] == test
    assert len(o.tasks("valid_seen")) == len(TASK_TYPES)
    light = envs.make("alfworld", source="official", data_dir=str(official),
                      task_types=["look_at_obj_in_light"])
    assert [light.task_type(t) for t in light.tasks("test")] == ["look_at_obj_in_light"]
    # $ALFWORLD_DATA is the default data root
    monkeypatch.setenv("ALFWORLD_DATA", str(official))
    assert envs.make("alfworld", source="official").tasks("test") == test
    with pytest.raises(ValueError, match="unknown task id"):
        o.reset("valid_unseen/pick_and_place_simple-X-None-Y-1/trial_T1/nothing")


def test_official_games_play_like_the_generated_ones(official, env, one_of_each):
    o = envs.make("alfworld", source="official", data_dir=str(official))
    by_type = {o.task_type(t): t for t in o.tasks("test")}
    for task in one_of_each[:2]:
        official_task = by_type[env.task_type(task)]
        assert o.reset(official_task).text == env.reset(task).text
        plan = o.expert(official_task)  # the planner, run now (no stored plan is used)
        assert plan == env.expert(task)
        steps = play(o, official_task, plan)
        assert steps[-1].success and not any(s.success for s in steps[:-1])
    o.close()


def test_missing_official_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "nowhere"))
    o = envs.make("alfworld", source="official")
    with pytest.raises(UserError, match="alfworld-download") as e:
        o.tasks("test")
    assert "ALFWORLD_DATA" in str(e.value) and "nowhere" in str(e.value)
    assert "source: generated" in str(e.value)


# -- the offline spec end to end --------------------------------------------------------------
@pytest.mark.slow  # about 40 s, mostly the tiny model's training and evaluation machinery
def test_offline_spec_runs_end_to_end(tmp_path, leafe_cache, one_of_each):
    from rich.console import Console

    from leafe.plan import build_plan
    from leafe.runner import run
    from leafe.spec import load_spec

    loaded = load_spec(ROOT / "specs" / "alfworld-offline.yaml", [
        "models.policy.name=leafe:tiny-qwen2", "models.policy.max_tokens=8",
        "models.policy.batch_size=4", "env.train_tasks=2", "env.test_tasks=2",
        "env.max_steps=3", "budget.interactions_per_task=8", "eval.samples=2", "eval.k=[1, 2]",
        "eval.batch_size=4", "methods.sft.train.epochs=1", "methods.sft.train.batch_size=4",
    ])
    assert loaded.env_options.model_dump(include=set(SMALL)) == SMALL
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=None, quiet=True))
    plan = build_plan(loaded, tmp_path / "runs")
    report = json.loads((tmp_path / "reports" / "alfworld-offline.json").read_text())
    assert {r["method"] for r in report["rows"]} == {"base", "sft"}
    for name in ("base", "sft"):
        log = plan.dir(plan.stage(f"eval.{name}")) / "records.jsonl"
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        episodes = [r for r in recs if r["kind"] == "episode"]
        assert len(episodes) == 2 * 2
        assert {e["task"] for e in episodes} == {"valid_unseen/pick_and_place_simple-00000",
                                                 "valid_unseen/look_at_obj_in_light-00000"}
        steps = [r for r in recs if r["kind"] == "step"]
        assert len(steps) == sum(e["steps"] for e in episodes) > 0
        first = steps[0]["prompt"][-1]["content"]
        assert first.startswith("Your task is to: ") and INTRO in first
        assert "Actions: go to " in first
    train = json.loads((plan.dir(plan.stage("sft.train")) / "metrics.json").read_text())
    assert train["examples"] > 0 and train["interactions"] > 0


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)
