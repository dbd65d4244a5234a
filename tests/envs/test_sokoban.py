"""Tests of the sokoban adapter over the real gym_sokoban package (offline, a few seconds)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from leafe import envs
from leafe.envs.base import Snapshot, obs_hash
from leafe.envs import sokoban
from leafe.envs.sokoban import ACTIONS, SokobanEnv, room_fingerprint, solve

#: grid character -> (room_fixed code, room_state code)
CODES = {
    "#": (0, 0), "_": (1, 1), "O": (2, 2), "X": (1, 4), "√": (2, 3), "P": (1, 5), "S": (2, 5),
}


def parse(grid: str) -> tuple[np.ndarray, np.ndarray]:
    """(room_fixed, room_state) from a grid in the observation legend."""
    rows = grid.strip().splitlines()
    fixed = np.array([[CODES[ch][0] for ch in row] for row in rows], dtype=np.int64)
    state = np.array([[CODES[ch][1] for ch in row] for row in rows], dtype=np.int64)
    return fixed, state


def with_room(grid: str, num_boxes: int = 1) -> tuple[SokobanEnv, str]:
    """An env whose task train-00000 is the given handcrafted room."""
    rows = grid.strip().splitlines()
    env = envs.make("sokoban", dim=[len(rows), len(rows[0])], num_boxes=num_boxes)
    env._rooms["train-00000"] = parse(grid)
    return env, "train-00000"


def grid_of(text: str) -> str:
    return text.split("\n", 1)[1]


def feedback_of(text: str) -> str:
    return text.split("\n", 1)[0]


@pytest.fixture(scope="module")
def env() -> SokobanEnv:
    return envs.make("sokoban", dim=[6, 6], num_boxes=1)


# -- options, registry, import ------------------------------------------------------------------
def test_make_validates_options():
    env = envs.make("sokoban", dim=[6, 6], num_boxes=1)
    assert isinstance(env, SokobanEnv) and env.name == "sokoban"
    assert env.options.dim == (6, 6)
    assert env.options.generation_steps == int(1.7 * 12)  # gym-sokoban's default for 6x6
    assert envs.make("sokoban", generation_steps=7).options.generation_steps == 7
    with pytest.raises(ValidationError):
        envs.make("sokoban", dim=[6, 6], bogus=1)
    with pytest.raises(ValidationError):
        envs.make("sokoban", dim=[3, 6])
    with pytest.raises(ValidationError):
        envs.make("sokoban", num_boxes=0)
    with pytest.raises(ValidationError):
        envs.make("sokoban", train_size=0)
    for name, field in SokobanEnv.Options.model_fields.items():
        assert field.description, f"option {name} has no docstring"


def test_module_import_does_not_import_gym_sokoban():
    code = (
        "import sys, leafe.envs.sokoban, leafe.envs as e; e.make('sokoban');"
        "assert 'gym_sokoban' not in sys.modules and 'gym' not in sys.modules, 'eager import'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_tasks_are_stable_ids_per_split(env):
    train, test = env.tasks("train"), env.tasks("test")
    assert len(train) == 1000 and len(test) == 200
    assert train[17] == "train-00017" and test[3] == "test-00003"
    assert env.tasks("train") == train
    small = envs.make("sokoban", train_size=3, test_size=2)
    assert small.tasks("train") == ["train-00000", "train-00001", "train-00002"]
    assert small.tasks("test") == ["test-00000", "test-00001"]
    with pytest.raises(ValueError, match="train, test"):
        env.tasks("valid")
    with pytest.raises(ValueError):
        small.reset("train-00003")  # beyond the split size
    with pytest.raises(ValueError):
        small.reset("nonsense")


# -- rooms ---------------------------------------------------------------------------------------
def test_rooms_are_deterministic_across_instances():
    a = envs.make("sokoban", dim=[6, 6], num_boxes=1)
    b = envs.make("sokoban", dim=[6, 6], num_boxes=1)
    ids = [f"train-{i:05d}" for i in range(10)] + ["test-00004"]
    texts_a = [a.reset(t).text for t in ids]
    texts_b = [b.reset(t).text for t in reversed(ids)][::-1]  # other order, same rooms
    assert texts_a == texts_b
    assert len(set(texts_a)) >= 8  # task ids do name different rooms
    assert a.reset(ids[0]).text == texts_a[0]  # cached room, same text


def test_train_and_test_rooms_differ(env):
    train = [grid_of(env.reset(f"train-{i:05d}").text) for i in range(20)]
    test = [grid_of(env.reset(f"test-{i:05d}").text) for i in range(20)]
    assert all(a != b for a, b in zip(train, test))


def _puzzle(room: tuple[np.ndarray, np.ndarray]) -> tuple[tuple[int, ...], bytes, bytes]:
    fixed, state = room
    return fixed.shape, fixed.astype(np.int64).tobytes(), state.astype(np.int64).tobytes()


def test_test_split_is_held_out_from_train(env):
    # 6x6 with one box: without holding out, 64 of these 200 test rooms were train rooms
    train = {_puzzle(env.room(t)) for t in env.tasks("train")}  # all 1000
    test = [_puzzle(env.room(t)) for t in env.tasks("test")]  # all 200
    assert not train & set(test)
    assert len(set(test)) == len(test)  # no two test tasks share a room
    assert env.train_fingerprints() == {
        room_fingerprint(*env.room(t)) for t in env.tasks("train")
    }


def test_held_out_rooms_with_few_train_tasks(monkeypatch):
    monkeypatch.setattr(sokoban, "_HELD_OUT", {})
    env = envs.make("sokoban", dim=[6, 6], num_boxes=1, train_size=50, test_size=200)
    train = {_puzzle(env.room(t)) for t in env.tasks("train")}
    test = [_puzzle(env.room(t)) for t in env.tasks("test")]
    assert not train & set(test) and len(set(test)) == len(test)
    # a test task retries only when its first room is taken
    taken, retried = set(train), 0
    for index, room in enumerate(test[:60]):
        first = _puzzle(env._generate("test", index))  # the room of its first attempt
        if first in taken:
            retried += 1
        else:
            assert room == first
        taken.add(room)
    assert 0 < retried < 30
    assert set(sokoban._HELD_OUT) == {((6, 6), 1, 20, 50)}  # cached per train size


def test_test_rooms_are_deterministic_across_instances_and_processes(monkeypatch):
    ids = [f"test-{i:05d}" for i in range(30)]
    monkeypatch.setattr(sokoban, "_HELD_OUT", {})
    a = envs.make("sokoban", dim=[6, 6], train_size=50)
    rooms_a = [_puzzle(a.room(t)) for t in reversed(ids)][::-1]  # highest index first
    monkeypatch.setattr(sokoban, "_HELD_OUT", {})  # a fresh build, other order
    b = envs.make("sokoban", dim=[6, 6], train_size=50)
    rooms_b = [_puzzle(b.room(t)) for t in ids]
    assert rooms_a == rooms_b
    code = (
        "import leafe.envs as e; from leafe.envs.sokoban import room_fingerprint as f;"
        "env = e.make('sokoban', dim=[6, 6], train_size=50);"
        f"print(*(f(*env.room('test-{{:05d}}'.format(i))).hex() for i in range({len(ids)})))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=root, capture_output=True, text=True
    ).stdout.split()
    assert out == [room_fingerprint(*b.room(t)).hex() for t in ids]


def test_train_tasks_never_build_the_held_out_set(monkeypatch):
    monkeypatch.setattr(sokoban, "_HELD_OUT", {})
    env = envs.make("sokoban", dim=[6, 6], train_size=50)
    env.reset("train-00003")
    env.expert("train-00004")
    assert sokoban._HELD_OUT == {}
    env.reset("test-00002")
    assert len(sokoban._HELD_OUT[((6, 6), 1, 20, 50)].rooms) == 3  # test-00000..00002


def test_held_out_generation_fails_clearly_when_every_room_is_taken(monkeypatch):
    envs.make("sokoban").reset("train-00000")  # imports gym_sokoban
    import gym_sokoban.envs.room_utils as room_utils

    fixed, state = parse(
        """
        #####
        #_O_#
        #_X_#
        #_P_#
        #####
        """.replace(" ", "")
    )

    def always_the_same(*args, **kwargs):
        return fixed.copy(), state.copy(), {}

    monkeypatch.setattr(room_utils, "generate_room", always_the_same)
    monkeypatch.setattr(sokoban, "_HELD_OUT", {})
    env = envs.make("sokoban", dim=[5, 5], train_size=3)
    assert _puzzle(env.room("train-00002")) == _puzzle((fixed, state))
    with pytest.raises(RuntimeError, match="no held-out room for test-00000.*train_size"):
        env.room("test-00000")


def test_room_shape_and_contents(env):
    for i in range(10):
        grid = grid_of(env.reset(f"train-{i:05d}").text).split("\n")
        assert len(grid) == 6 and all(len(row) == 6 for row in grid)
        cells = "".join(grid)
        assert cells.count("P") + cells.count("S") == 1
        assert cells.count("X") == 1 and cells.count("O") + cells.count("S") == 1
        assert grid[0] == "######" and grid[-1] == "######"


def test_generation_leaves_global_rng_untouched():
    env = envs.make("sokoban", train_size=50)
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.random())
    for task in ["train-00042", "test-00007"]:
        random.seed(123)
        np.random.seed(123)
        env.reset(task)
        assert (random.random(), np.random.random()) == expected


def test_generator_failures_are_retried_deterministically(monkeypatch):
    envs.make("sokoban").reset("train-00000")  # imports gym_sokoban
    import gym_sokoban.envs.room_utils as room_utils

    real = room_utils.generate_room
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) % 2 == 1:  # every first attempt fails
            raise RuntimeWarning("Generated Model with score == 0")
        return real(*args, **kwargs)

    monkeypatch.setattr(room_utils, "generate_room", flaky)
    first = envs.make("sokoban").reset("train-00005").text
    second = envs.make("sokoban").reset("train-00005").text
    assert first == second and len(calls) == 4

    def broken(*args, **kwargs):
        raise RuntimeError("Not enough free spots")

    monkeypatch.setattr(room_utils, "generate_room", broken)
    with pytest.raises(RuntimeError, match="no room generated"):
        envs.make("sokoban").reset("train-00005")


# -- observations and steps ----------------------------------------------------------------------
def test_reset_observation(env):
    obs = env.reset("train-00000")
    assert feedback_of(obs.text) == "Game started."
    assert obs.admissible == ACTIONS == ["up", "down", "left", "right"]
    assert obs.info["boxes_on_target"] == 0
    for needle in ["# wall", "_ floor", "O target", "X box", "√ box on target", "P player",
                   "S player on target", "up, down, left, right"]:
        assert needle in obs.task


def test_wall_bump_leaves_state_unchanged(env):
    for i in range(30):
        task = f"train-{i:05d}"
        fixed, state = env.room(task)
        r, c = np.argwhere(state == 5)[0]
        walls = {"up": fixed[r - 1, c], "down": fixed[r + 1, c], "left": fixed[r, c - 1],
                 "right": fixed[r, c + 1]}
        bump = [a for a, cell in walls.items() if cell == 0]
        if bump:
            break
    else:
        pytest.fail("no room with a wall next to the player")
    before = env.reset(task).text
    step = env.step(bump[0])
    assert step.valid and not step.done and not step.success
    assert feedback_of(step.observation.text) == "You bumped into a wall."
    assert grid_of(step.observation.text) == grid_of(before)
    assert step.reward == pytest.approx(-0.1)  # gym-sokoban's step penalty


def test_invalid_action_changes_nothing(env):
    before = env.reset("train-00003").text
    step = env.step("jump")
    assert (step.valid, step.reward, step.done, step.success) == (False, 0, False, False)
    assert grid_of(step.observation.text) == grid_of(before)
    assert "Unknown action" in feedback_of(step.observation.text)
    assert all(a in feedback_of(step.observation.text) for a in ACTIONS)
    # case and surrounding whitespace are ignored
    plan = env.expert("train-00003")
    env.reset("train-00003")
    step = env.step(f"  {plan[0].upper()} \n")
    assert step.valid and grid_of(step.observation.text) != grid_of(before)


def test_feedback_for_pushes_and_targets():
    env, task = with_room(
        """
        #######
        #__#__#
        #__X__#
        #__P__#
        #_OXO_#
        #_____#
        #######
        """.replace(" ", ""),
        num_boxes=2,
    )
    obs = env.reset(task)
    assert obs.info["boxes_on_target"] == 0
    expected = [
        ("up", "The box is blocked and did not move.", -0.1, 0),
        ("left", "You moved left.", -0.1, 0),
        ("down", "You moved down.", -0.1, 0),  # onto an empty target
        ("right", "You pushed a box onto a target.", 0.9, 1),
        ("right", "You pushed a box off a target.", -1.1, 0),
        ("left", "You moved left.", -0.1, 0),
        ("up", "You moved up.", -0.1, 0),
        ("left", "You moved left.", -0.1, 0),
        ("up", "You moved up.", -0.1, 0),
        ("right", "You pushed a box right.", -0.1, 0),
        ("left", "You moved left.", -0.1, 0),
        ("left", "You moved left.", -0.1, 0),
        ("left", "You bumped into a wall.", -0.1, 0),
    ]
    grids = []
    for action, feedback, reward, on_target in expected:
        step = env.step(action)
        assert step.valid
        assert feedback_of(step.observation.text) == feedback, action
        assert step.reward == pytest.approx(reward), action
        assert step.observation.info["boxes_on_target"] == on_target
        assert not step.done and not step.success
        grids.append(grid_of(step.observation.text))
    assert grids[0] == grid_of(obs.text)  # blocked: nothing moved
    assert grids[2].split("\n")[4] == "#_SXO_#"  # player standing on a target
    assert grids[3].split("\n")[4] == "#_OP√_#"  # box on a target
    assert grids[4].split("\n")[4] == "#_O_SX#"
    assert grids[9].split("\n")[2] == "#__PX_#"
    assert grids[-1] == grids[-2]  # the bump changed nothing


def test_box_blocked_by_box_and_solving_feedback():
    env, task = with_room(
        """
        #######
        #_____#
        #PXX_O#
        #____O#
        #######
        """.replace(" ", ""),
        num_boxes=2,
    )
    before = env.reset(task).text
    step = env.step("right")
    assert feedback_of(step.observation.text) == "The box is blocked and did not move."
    assert grid_of(step.observation.text) == grid_of(before)

    env, task = with_room(
        """
        #####
        #_O_#
        #_X_#
        #_P_#
        #####
        """.replace(" ", "")
    )
    env.reset(task)
    step = env.step("up")
    assert step.done and step.success
    assert step.reward == pytest.approx(-0.1 + 1 + 10)
    assert feedback_of(step.observation.text) == (
        "You pushed a box onto a target. All boxes are on targets. You solved the puzzle!"
    )
    assert "√" in grid_of(step.observation.text)


# -- expert --------------------------------------------------------------------------------------
def test_expert_solves_tasks_exactly_at_the_end(env):
    for i in range(20):
        task = f"train-{i:05d}"
        plan = env.expert(task)
        assert plan, task
        env.reset(task)
        for k, action in enumerate(plan):
            step = env.step(action)
            assert step.valid
            last = k == len(plan) - 1
            assert step.success is last and step.done is last, (task, k)
        assert "You solved the puzzle!" in step.observation.text
        assert step.observation.info["boxes_on_target"] == 1


def test_expert_two_boxes_and_test_split():
    env = envs.make("sokoban", dim=[6, 6], num_boxes=2, train_size=50)
    for task in ["train-00000", "test-00000", "test-00001"]:
        plan = env.expert(task)
        env.reset(task)
        steps = [env.step(a) for a in plan]
        assert steps[-1].success and not any(s.success for s in steps[:-1])


def test_expert_is_move_optimal_and_detects_unsolvable():
    fixed, state = parse(
        """
        #######
        #_____#
        #_X_O_#
        #_P___#
        #######
        """.replace(" ", "")
    )
    # box at (2,2), target at (2,4): step left, up, then push right twice
    assert solve(fixed, state) == ["left", "up", "right", "right"]
    assert solve(fixed, state, max_nodes=2) is None
    fixed, state = parse(
        """
        #####
        #X__#
        #_P_#
        #__O#
        #####
        """.replace(" ", "")
    )
    assert solve(fixed, state) is None  # box stuck in a corner


def test_expert_does_not_disturb_the_episode(env):
    other = envs.make("sokoban", dim=[6, 6], num_boxes=1)
    plan = other.expert("train-00007")
    env.reset("train-00007")
    other.reset("train-00007")
    env.step(plan[0])
    other.step(plan[0])
    env.expert("train-00007")
    env.expert("train-00008")
    assert env.actions == [plan[0]]
    for action in plan[1:]:
        assert env.step(action).observation.text == other.step(action).observation.text


# -- snapshots -----------------------------------------------------------------------------------
def _long_task(env: SokobanEnv, at_least: int = 5) -> tuple[str, list[str]]:
    for task in env.tasks("train"):
        plan = env.expert(task)
        if plan and len(plan) >= at_least:
            return task, plan
    raise AssertionError("no long task")


def test_native_snapshot_restore(env):
    task, plan = _long_task(env)
    k = 2
    env.reset(task)
    for action in plan[:k]:
        env.step(action)
    snap = env.snapshot()
    at_snap = env._last_obs.text
    assert snap.native is not None and snap.actions == plan[:k]
    assert snap.obs_hash == obs_hash(at_snap)

    # wander off (including finishing the puzzle), then come back twice
    for action in plan[k:] + ["up", "left", "bogus"]:
        env.step(action)
    for _ in range(2):
        obs = env.restore(snap)
        assert obs.text == at_snap
        assert env.actions == plan[:k] and env.task_id == task
        steps = [env.step(a) for a in plan[k:]]
        assert steps[-1].success and not any(s.success for s in steps[:-1])

    # a snapshot restores into another instance without replay
    fresh = envs.make("sokoban", dim=[6, 6], num_boxes=1)
    assert fresh.restore(snap).text == at_snap
    assert fresh._rooms == {}  # no room was generated, nothing was replayed
    env.restore(snap)
    for action in plan[k:]:
        assert fresh.step(action).observation.text == env.step(action).observation.text
    assert fresh.actions == env.actions == plan


def test_replay_restore_without_native(env):
    task, plan = _long_task(env)
    env.reset(task)
    for action in plan[:3] + ["jump"]:
        env.step(action)
    native = env.snapshot()
    replay = Snapshot(native.task_id, native.actions, native.obs_hash)  # native=None
    at_snap = env._last_obs.text
    env.step(plan[3])
    fresh = envs.make("sokoban", dim=[6, 6], num_boxes=1)
    assert fresh.restore(replay).text == at_snap
    assert fresh.actions == plan[:3] + ["jump"]
    assert env.restore(replay).text == at_snap
    assert env.restore(native).text == at_snap
