"""Tests of the textworld adapter over the real `textworld` package (offline).

The session generates a handful of small games once (about 10-20 s on 2 cores, in parallel),
into the session's `leafe_cache` (set LEAFE_CACHE to reuse them across sessions).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from leafe import envs
from leafe.envs import textworld as tw_adapter
from leafe.envs.base import Snapshot, obs_hash
from leafe.envs.textworld import (
    TextWorldEnv,
    clean_feedback,
    clean_intro,
    fingerprint_split,
    game_fingerprint,
    game_seed,
)

ROOT = Path(__file__).resolve().parents[2]

#: Small custom games: the workhorse of these tests.
SMALL = dict(challenge="custom", world_size=2, nb_objects=3, quest_length=2,
             train_size=20, test_size=10)
SMALL_TASKS = ["train-00000", "train-00001", "train-00002", "test-00000", "test-00001"]
#: One game of each challenge (multi-point scores and a losable game in tw-cooking).
CHALLENGES = {
    "tw-cooking": dict(challenge="tw-cooking", recipe=2, take=1, go=6, open=True, cut=True),
    "tw-coin_collector": dict(challenge="tw-coin_collector", level=3),
    "tw-treasure_hunter": dict(challenge="tw-treasure_hunter", level=2),
}


def _generate(options: list[tuple[dict, list[str]]], workers: int = 2) -> None:
    """Generate games of several configurations in one pool of processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(TextWorldEnv.Options(**o).model_dump(), t) for o, ts in options for t in ts]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        list(pool.map(tw_adapter._generate_in_cache, *zip(*jobs)))


@pytest.fixture(scope="session")
def games(leafe_cache: Path) -> Path:
    """Generates the session's games (cached under the session's LEAFE_CACHE)."""
    pytest.importorskip("textworld")
    pytest.importorskip("jericho")
    _generate([(SMALL, SMALL_TASKS)] + [(o, ["train-00000"]) for o in CHALLENGES.values()])
    return leafe_cache


@pytest.fixture
def env(games) -> TextWorldEnv:
    e = envs.make("textworld", **SMALL)
    yield e
    e.close()


def challenge_env(name: str, **extra) -> TextWorldEnv:
    return envs.make("textworld", **CHALLENGES[name], **extra)


# -- options, registry, import ------------------------------------------------------------------
def test_registered_and_options_defaults():
    assert "textworld" in envs.names()
    env = envs.make("textworld")
    assert isinstance(env, TextWorldEnv) and env.name == "textworld"
    o = env.options
    assert (o.challenge, o.world_size, o.nb_objects, o.quest_length, o.quest_breadth) == (
        "custom", 5, 10, 5, 1)
    assert (o.train_size, o.test_size, o.snapshot, o.seed) == (1000, 100, "state", 0)
    assert o.recipe is None and o.level is None  # other challenges' options stay unset
    c = envs.make("textworld", challenge="tw-cooking").options
    assert (c.recipe, c.take, c.go, c.open, c.food_split, c.world_size) == (
        1, 0, 1, False, True, None)
    assert envs.make("textworld", challenge="tw-coin_collector", level=7).options.level == 7
    for name, field in TextWorldEnv.Options.model_fields.items():
        assert field.description, f"option {name} has no docstring"


@pytest.mark.parametrize("options, message", [
    (dict(challenge="tw-cooking", world_size=3), "'world_size' applies to challenge custom"),
    (dict(challenge="custom", level=3), "'level' applies to challenge tw-coin_collector"),
    (dict(challenge="tw-coin_collector"), "needs `level`"),
    (dict(challenge="tw-coin_collector", level=301), "within 1-300"),
    (dict(challenge="tw-coin_collector", level=250), "more than 100 rooms"),
    (dict(challenge="tw-treasure_hunter", level=31), "within 1-30"),
    (dict(challenge="tw-cooking", recipe=1, take=2), "take"),
    (dict(challenge="tw-cooking", recipe_seed=3), "recipe_seed"),
    (dict(challenge="tw-cooking", go=5), "go"),
    (dict(challenge="tw-simple"), "challenge"),
    (dict(bogus=1), "bogus"),
    (dict(world_size=0), "world_size"),
    (dict(train_size=0), "train_size"),
    (dict(snapshot="pickle"), "snapshot"),
])
def test_invalid_options_are_rejected(options, message):
    with pytest.raises(ValidationError, match=message):
        envs.make("textworld", **options)


def test_module_import_does_not_import_textworld(tmp_path):
    code = (
        "import sys, leafe.envs as e; env = e.make('textworld', challenge='tw-cooking');"
        "env.tasks('train'); env.cache_dir();"
        "bad = [m for m in ('textworld', 'jericho', 'spacy') if m in sys.modules];"
        "assert not bad, f'eager import: {bad}'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "LEAFE_CACHE": str(tmp_path)})


def test_tasks_are_stable_ids_per_split():
    env = envs.make("textworld", train_size=3, test_size=2)
    assert env.tasks("train") == ["train-00000", "train-00001", "train-00002"]
    assert env.tasks("test") == ["test-00000", "test-00001"]
    assert env.splits() == ["train", "test"]
    assert len(envs.make("textworld").tasks("train")) == 1000
    with pytest.raises(ValueError, match="train, test"):
        env.tasks("valid")
    for bad in ["train-00003", "test-2", "nonsense", "valid-00000"]:
        with pytest.raises(ValueError, match="unknown task id"):
            env.game_dir(bad)


def test_seeds_come_from_sha256_of_settings_split_index_attempt():
    s = envs.make("textworld", **SMALL).options.generation_settings()
    assert s == {"challenge": "custom", "world_size": 2, "nb_objects": 3, "quest_length": 2,
                 "quest_breadth": 1}
    seeds = {game_seed(s, 0, split, i, a) for split in ("train", "test") for i in range(50)
             for a in range(3)}
    assert len(seeds) == 300 and all(0 <= x < 2**31 for x in seeds)
    assert game_seed(s, 0, "train", 1, 0) == game_seed(dict(s), 0, "train", 1, 0)
    assert game_seed(s, 1, "train", 1, 0) != game_seed(s, 0, "train", 1, 0)


def test_cache_key_covers_what_defines_the_games():
    key = envs.make("textworld", **SMALL).cache_key()
    same = [dict(SMALL, train_size=5, test_size=1), dict(SMALL, snapshot="copy")]
    for o in same:
        assert envs.make("textworld", **o).cache_key() == key
    other = [dict(SMALL, quest_length=3), dict(SMALL, seed=1), dict(challenge="custom"),
             dict(challenge="tw-treasure_hunter", level=2)]
    keys = {envs.make("textworld", **o).cache_key() for o in other}
    assert key not in keys and len(keys) == len(other)


# -- generation and the cache -------------------------------------------------------------------
def test_games_are_cached_atomically_with_metadata(env, games):
    root = games / "textworld" / env.cache_key()
    assert env.cache_dir() == root
    settings = json.loads((root / "settings.json").read_text())
    assert settings["settings"] == env.options.generation_settings()
    for task in SMALL_TASKS:
        folder = env.game_dir(task)
        assert folder == root / task
        assert {p.name for p in folder.iterdir()} == {"game.z8", "game.json", "meta.json"}
        meta = env.meta(task)
        split, index = task.split("-")
        assert (meta["task"], meta["split"], meta["index"]) == (task, split, int(index))
        assert meta["seed"] == game_seed(meta["settings"], 0, split, int(index), meta["attempt"])
        assert meta["walkthrough"] and meta["objective"] and meta["max_score"] >= 1
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_game_is_deterministic_across_processes(env):
    """The game of a seed has the same fingerprint in a process with another hash seed."""
    meta = env.meta("train-00001")
    code = (
        "import json, sys; from leafe.envs.textworld import make_game, game_fingerprint;"
        "m = json.loads(sys.argv[1]);"
        "print(game_fingerprint(make_game(m['settings'], m['seed'], m['split'])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(meta)], check=True, cwd=ROOT,
        capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert out == meta["fingerprint"]
    game = tw_adapter.make_game(meta["settings"], meta["seed"], meta["split"])
    assert game_fingerprint(game) == meta["fingerprint"]
    assert game.metadata["walkthrough"] == meta["walkthrough"]


def test_test_split_is_held_out_by_fingerprint(env):
    metas = [env.meta(t) for t in SMALL_TASKS]
    for m in metas:
        assert fingerprint_split(m["fingerprint"]) == m["split"]
    train = {m["fingerprint"] for m in metas if m["split"] == "train"}
    test = {m["fingerprint"] for m in metas if m["split"] == "test"}
    assert train and test and not train & test
    # a task takes the first attempt whose game lies on its side
    for m in metas:
        for attempt in range(m["attempt"]):
            seed = game_seed(m["settings"], 0, m["split"], m["index"], attempt)
            try:
                game = tw_adapter.make_game(m["settings"], seed, m["split"])
            except Exception:
                continue
            assert fingerprint_split(game_fingerprint(game)) != m["split"]


def test_cooking_uses_textworlds_food_splits(games):
    from textworld.challenges.tw_cooking.cooking import FOOD_PREPARATIONS_SPLITS, FOODS_SPLITS

    env = challenge_env("tw-cooking")
    meta = env.meta("train-00000")
    assert fingerprint_split(meta["fingerprint"]) == "train"  # held out like every family
    train_preparations = {(food, prep) for food, preps in FOOD_PREPARATIONS_SPLITS["train"].items()
                          for prep in preps}
    game = tw_adapter.make_game(meta["settings"], meta["seed"], "train")
    recipe = [(food, (cooking, cutting)) for food, cooking, cutting in game.metadata["ingredients"]]
    assert recipe and all(food in FOODS_SPLITS["train"] for food, _ in recipe)
    assert all(pair in train_preparations for pair in recipe)
    test_game = tw_adapter.make_game(meta["settings"], meta["seed"], "test")
    test_recipe = [(f, (c, u)) for f, c, u in test_game.metadata["ingredients"]]
    assert all(f in FOODS_SPLITS["test"] or f in FOODS_SPLITS["train"] for f, _ in test_recipe)
    assert not envs.make("textworld", challenge="tw-cooking", food_split=False).cache_key() == \
        envs.make("textworld", challenge="tw-cooking").cache_key()


def test_a_lost_race_keeps_the_winners_game(games, monkeypatch, tmp_path):
    """Another process renamed its game into place first: ours is discarded, theirs kept."""
    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path))
    env = envs.make("textworld", **SMALL)
    final = env.cache_dir() / "train-00000"
    real = tw_adapter.generate_task

    def generate_and_lose(*args, **kwargs):
        meta = real(*args, **kwargs)
        final.mkdir(parents=True)
        (final / "meta.json").write_text(json.dumps(dict(meta, winner=True)))
        return meta

    monkeypatch.setattr(tw_adapter, "generate_task", generate_and_lose)
    assert env.game_dir("train-00000") == final
    assert env.meta("train-00000")["winner"] is True
    assert sorted(p.name for p in env.cache_dir().iterdir()) == ["settings.json", "train-00000"]


def test_parallel_processes_generate_one_game(tmp_path):
    pytest.importorskip("textworld")
    code = (
        "from leafe import envs; env = envs.make('textworld', challenge='tw-treasure_hunter', "
        "level=1); print(env.meta('test-00003')['fingerprint'])"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "LEAFE_CACHE": str(tmp_path)})
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and len(outs[0]) == 64
    (root,) = (tmp_path / "textworld").iterdir()
    assert sorted(p.name for p in root.iterdir()) == ["settings.json", "test-00003"]


def test_generation_failure_is_clear(monkeypatch, tmp_path):
    pytest.importorskip("textworld")
    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path))

    def impossible(*args, **kwargs):
        raise RuntimeError("no quest")

    monkeypatch.setattr(tw_adapter, "make_game", impossible)
    env = envs.make("textworld", **SMALL)
    env.cache_dir().mkdir(parents=True)
    abandoned = env.cache_dir() / ".tmp-train-00001-x"
    running = env.cache_dir() / ".tmp-train-00002-y"
    abandoned.mkdir()
    running.mkdir()
    os.utime(abandoned, (0, 0))  # a killed process's temp dir
    with pytest.raises(tw_adapter.GenerationError, match="no game for train-00004.*no quest"):
        env.game_dir("train-00004")
    assert sorted(p.name for p in env.cache_dir().iterdir()) == [running.name, "settings.json"]


# -- observations and steps ----------------------------------------------------------------------
def test_feedback_cleaning():
    raw = ("\nYou close the locker.\n\n\nYour score has just gone up by one point.\n\n\n"
           "                      *** The End ***\n\nYou scored 1 out of a possible 1, in 7 turns."
           "\n\n\nWould you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?"
           "\n>                                                     -= Studio =-0/6")
    assert clean_feedback(raw) == (
        "You close the locker.\n\nYour score has just gone up by one point.\n\n*** The End ***"
        "\n\nYou scored 1 out of a possible 1, in 7 turns."
    )
    assert clean_feedback("\nThat's not a verb I recognise.\n\n>     -= Attic =-3/12") == (
        "That's not a verb I recognise.")
    intro = ("\n\n   ________  __\n  |        \\|  \\\n   \\$$$$$$$$| $$\n\nWelcome! Go east.\n\n"
             "-= Attic =-\nYou are in an attic.\n\n>      -= Attic =-0/1")
    assert clean_intro(intro, "Welcome! Go east.") == "-= Attic =-\nYou are in an attic."


def test_reset_observation(env):
    obs = env.reset("train-00000")
    meta = env.meta("train-00000")
    assert obs.task == meta["objective"]
    assert obs.text.startswith("-= ") and "=-" in obs.text  # the room description
    assert meta["objective"] not in obs.text
    assert "$$" not in obs.text and not obs.text.rstrip().endswith(">")
    assert "0/1" not in obs.text.splitlines()[-1]  # no status line
    assert obs.admissible == sorted(obs.admissible) and "look" in obs.admissible
    assert obs.info["score"] == 0 and obs.info["max_score"] == meta["max_score"]
    assert obs.info["won"] is False and obs.info["lost"] is False
    assert obs.info["description"] and obs.info["inventory"]
    assert env.reset("train-00000").text == obs.text  # reproducible


@pytest.mark.parametrize("name", ["custom", *CHALLENGES])
def test_expert_wins_with_admissible_commands(name, games):
    env = envs.make("textworld", **SMALL) if name == "custom" else challenge_env(name)
    task = "train-00000"
    plan = env.expert(task)
    assert plan
    obs = env.reset(task)
    total = 0.0
    for k, action in enumerate(plan):
        assert action in obs.admissible, (k, action)
        step = env.step(action)
        assert step.valid
        total += step.reward
        last = k == len(plan) - 1
        assert step.done is last and step.success is last, (k, action)
        obs = step.observation
    assert total == env.meta(task)["max_score"] == obs.info["score"]
    assert obs.info["won"] and "*** The End ***" in obs.text and obs.admissible == []
    env.close()


def test_cooking_expert_drops_commands_the_game_does_not_admit(games):
    env = challenge_env("tw-cooking")
    walkthrough = env.meta("train-00000")["walkthrough"]
    plan = env.expert("train-00000")
    assert plan[0] == "inventory" and "examine cookbook" in plan  # information gathering kept
    it = iter(walkthrough)
    assert all(command in it for command in plan)  # a subsequence of the walkthrough
    assert env.expert("train-00000") == plan


def test_expert_leaves_the_episode_untouched(env):
    plan = env.expert("train-00001")
    env.reset("train-00001")
    env.step(plan[0])
    env.expert("train-00002")
    env._experts.clear()
    env.expert("train-00001")
    assert env.actions == [plan[0]] and env.task_id == "train-00001"
    for action in plan[1:]:
        step = env.step(action)
    assert step.success


def test_invalid_commands_get_the_games_feedback(env):
    before = env.reset("train-00000")
    look = env.step("look").observation.text
    for command, feedback in [("xyzzy", "That's not a verb I recognise."),
                              ("take the purple unicorn", "You can't see any such thing.")]:
        step = env.step(command)
        assert (step.valid, step.reward, step.done, step.success) == (False, 0.0, False, False)
        assert step.observation.text == feedback
        assert step.observation.admissible == before.admissible
    assert env.step("look").observation.text == look  # nothing changed


def test_commands_are_matched_without_case_or_spacing(env):
    obs = env.reset("train-00000")
    plan = env.expert("train-00000")
    step = env.step(f"  {plan[0].upper().replace(' ', '   ')} \n")
    assert step.valid
    env.reset("train-00000")
    assert env.step(plan[0]).observation.text == step.observation.text
    assert obs.admissible  # sanity


@pytest.mark.parametrize("command", ["quit", "restart", "undo", "save", "restore", "script",
                                     "tw-extra-infos inventory", "look. quit", "Q",
                                     "look then restart", "look, undo"])
def test_game_system_commands_are_not_sent(env, command):
    plan = env.expert("train-00001")
    obs = env.reset("train-00001")
    step = env.step(command)
    assert not step.valid and not step.done and step.reward == 0
    assert "game-system command" in step.observation.text
    assert step.observation.admissible == obs.admissible
    assert step.observation.info["moves"] == obs.info["moves"]
    steps = [env.step(a) for a in plan]  # the game is unaffected
    assert steps[-1].success and all(s.valid for s in steps)


def test_losing_ends_the_episode_and_later_steps_are_refused(games):
    env = challenge_env("tw-cooking")
    obs = env.reset("train-00000")
    plan = env.expert("train-00000")
    # take the first ingredient the walkthrough takes, then eat it: TextWorld's cooking
    # games are lost when an ingredient is eaten before the meal is prepared
    for action in plan:
        step = env.step(action)
        if step.reward > 0 and action.startswith("take "):
            break
    item = action[len("take "):].split(" from ")[0]
    assert f"eat {item}" in step.observation.admissible
    lost = env.step(f"eat {item}")
    assert lost.done and not lost.success and lost.valid
    assert "*** You lost! ***" in lost.observation.text
    assert lost.observation.info["lost"] and lost.observation.admissible == []
    after = env.step("look")
    assert after.done and not after.success and not after.valid and after.reward == 0
    assert "game is over" in after.observation.text
    assert obs.task == after.observation.task


def test_reward_is_the_score_change(games):
    env = challenge_env("tw-cooking")
    plan = env.expert("train-00000")
    env.reset("train-00000")
    scores = [0]
    for action in plan:
        step = env.step(action)
        assert step.reward == step.observation.info["score"] - scores[-1]
        scores.append(step.observation.info["score"])
    assert env.meta("train-00000")["max_score"] >= 3
    assert sum(1 for a, b in zip(scores, scores[1:]) if b > a) >= 3  # several scoring steps


# -- snapshots -----------------------------------------------------------------------------------
def _walk(env: TextWorldEnv, seed: int, n: int) -> list[tuple]:
    """n random admissible commands (and a few invalid ones); everything the agent sees."""
    rng = random.Random(seed)
    seen = []
    for _ in range(n):
        obs = env._last_obs
        choices = list(obs.admissible or []) + ["xyzzy", "take unicorn", "quit"]
        action = rng.choice(choices)
        step = env.step(action)
        o = step.observation
        seen.append((action, o.text, o.admissible, o.info, step.reward, step.done,
                     step.success, step.valid))
        if step.done:
            break
    return seen


@pytest.mark.parametrize("mode", ["state", "copy", "replay"])
def test_snapshot_restore_modes(mode, games):
    env = challenge_env("tw-cooking", snapshot=mode)
    env.reset("train-00000")
    _walk(env, seed=1, n=8)
    snap = env.snapshot()
    at_snap = env._last_obs.text
    prefix = env.actions
    assert snap.actions == prefix and snap.obs_hash == obs_hash(at_snap)
    if mode == "replay":
        assert snap.native is None
    else:
        assert snap.native["mode"] == mode and snap.native["task_id"] == "train-00000"
    first = _walk(env, seed=2, n=15)
    for _ in range(2):  # a snapshot restores any number of times
        assert env.restore(snap).text == at_snap
        assert env.actions == prefix and env.task_id == "train-00000"
        assert _walk(env, seed=2, n=15) == first
    fresh = challenge_env("tw-cooking", snapshot=mode)  # another instance, no game loaded
    assert fresh.restore(snap).text == at_snap
    assert _walk(fresh, seed=2, n=15) == first
    # the same continuation as a fresh reset + replay of the prefix
    replay = challenge_env("tw-cooking", snapshot="replay")
    replay.reset("train-00000")
    for action in prefix:
        replay.step(action)
    assert replay._last_obs.text == at_snap
    assert _walk(replay, seed=2, n=15) == first
    for e in (env, fresh, replay):
        e.close()


def test_state_snapshot_is_picklable_and_restores_across_tasks(env):
    plan = env.expert("train-00001")
    env.reset("train-00001")
    env.step(plan[0])
    snap = env.snapshot()
    at_snap = env._last_obs.text
    rest = [env.step(a).observation.text for a in plan[1:]]
    copied = pickle.loads(pickle.dumps(snap))
    env.reset("train-00002")  # another game loaded
    env.step("look")
    assert env.restore(copied).text == at_snap
    assert env.task_id == "train-00001" and env.actions == [plan[0]]
    steps = [env.step(a) for a in plan[1:]]
    assert [s.observation.text for s in steps] == rest and steps[-1].success


def test_snapshot_of_a_finished_game(env):
    plan = env.expert("train-00000")
    env.reset("train-00000")
    for action in plan:
        last = env.step(action)
    snap = env.snapshot()
    env.reset("train-00000")
    obs = env.restore(snap)
    assert obs.text == last.observation.text and obs.info["won"]
    after = env.step("look")
    assert after.done and after.success and not after.valid


def test_copy_snapshot_keeps_its_own_interpreter(games):
    env = challenge_env("tw-cooking", snapshot="copy")
    env.reset("train-00000")
    snap = env.snapshot()
    assert snap.native["env"] is not env._tw
    with pytest.raises(Exception):
        pickle.dumps(snap.native)  # an interpreter: restored by replay across processes
    env.close()


def test_replay_restore_without_native(env):
    plan = env.expert("train-00001")
    env.reset("train-00001")
    for action in ["look", "xyzzy", "quit", plan[0]]:
        env.step(action)
    native = env.snapshot()
    replay = Snapshot(native.task_id, native.actions, native.obs_hash)
    at_snap = env._last_obs.text
    env.step(plan[1])
    fresh = envs.make("textworld", **SMALL)
    assert fresh.restore(replay).text == at_snap
    assert fresh.actions == ["look", "xyzzy", "quit", plan[0]]
    assert env.restore(replay).text == at_snap
    assert env.restore(native).text == at_snap


# -- presets and specs ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["textworld", "textworld-cooking", "textworld-coin_collector",
                                    "textworld-treasure_hunter"])
def test_presets_validate(preset, tmp_path):
    from leafe.spec.loader import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "leafe: 1\nname: t\n"
        f"env: {{use: {preset}}}\n"
        "models: {policy: {name: leafe:tiny-qwen2}}\nmethods: {base: {}}\n"
    )
    loaded = load_spec(spec)
    assert loaded.spec.env.adapter == "textworld" and loaded.spec.env.max_steps == 50
    assert isinstance(loaded.env_options, TextWorldEnv.Options)
    expected = preset.removeprefix("textworld-") if "-" in preset else "custom"
    assert loaded.env_options.challenge in (expected, f"tw-{expected}")


def test_prompt_renders_with_history(env):
    from leafe.loop import render_conversation
    from leafe.spec.loader import load_spec

    loaded = load_spec(ROOT / "specs" / "textworld.yaml")
    obs = env.reset("train-00000")
    conv = render_conversation(loaded.spec.env, obs, [], 0)
    user = conv[-1]["content"]
    assert obs.task in user and obs.text in user and ", ".join(obs.admissible) in user
    step = env.step("look")
    history = [{"action": "look", "observation": step.observation.text}]
    user = render_conversation(loaded.spec.env, step.observation, history, 1)[-1]["content"]
    assert "> look" in user and user.count(step.observation.text) == 1
