"""ALFWorld text game sessions: TextWorld's PDDL engine behind the ALFWorld wrappers.

The session is built the way ALFWorld builds its text environment (`alfworld-generate` and
`AlfredTWEnv`): `textworld.envs.PddlEnv` wrapped by `AlfredDemangler` (object ids such as
`Apple_bar__plus_00_dot_20...` become `apple 1`; no shuffling) and `AlfredInfos`, with won and
admissible commands requested. Experts are ALFWorld's two: the engine's planner
(`policy_commands`, fast-downward's plan from the current state; expert type `planner`) and
the handcoded expert (`AlfredExpert` of type `handcoded`, which reads the game's
traj_data.json and searches the receptacles like an agent would).

Each `PddlEnv` loads a private copy of fast-downward's shared library (33 MB) and never unloads
it; the agent loop builds an environment per episode, so copies are pooled per process and
returned by `close()`. Every PDDL problem (re)load rewrites the library's whole state, so a
returned library can serve any later session.

textworld, fast_downward and alfworld are imported on first use only.
"""

from __future__ import annotations

import contextlib
import random
import sys
from typing import Any, Iterator

#: ALFWorld's text game banner, dropped from the first observation (as agents built on
#: ALFWorld do, e.g. ReAct and verl-agent).
BANNER = "-= Welcome to TextWorld, ALFRED! =-"

_free_libraries: list[Any] = []
_pooled_env_class: Any = None


def _acquire_library() -> Any:
    if _free_libraries:
        return _free_libraries.pop()
    import fast_downward

    return fast_downward.load_lib()


def _release_library(lib: Any) -> None:
    _free_libraries.append(lib)


def _env_class() -> Any:
    """`PddlEnv` that takes its fast-downward library from the pool instead of loading one."""
    global _pooled_env_class
    if _pooled_env_class is None:
        import textworld
        from textworld.envs import PddlEnv

        class PooledPddlEnv(PddlEnv):
            def __init__(self, infos: Any, lib: Any):
                textworld.Environment.__init__(self, infos)
                self.downward_lib = lib

        _pooled_env_class = PooledPddlEnv
    return _pooled_env_class


@contextlib.contextmanager
def _argv_kept() -> Iterator[None]:
    """fast_downward's PDDL translator overwrites `sys.argv` on every problem load."""
    argv = sys.argv
    try:
        yield
    finally:
        sys.argv = argv


class TextGame:
    """A game session. `planner=True` also asks the planner for a plan at every reset/step
    (`policy_commands`), which costs a search each time: use it for experts only."""

    def __init__(self, planner: bool = False):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

        self._lib = _acquire_library()
        infos = textworld.EnvInfos(
            won=True, admissible_commands=True, policy_commands=planner, extras=["gamefile"]
        )
        self._pddl = _env_class()(infos, self._lib)
        self._env = AlfredInfos(AlfredDemangler(self._pddl, shuffle=False))
        self._loaded: Any = None
        self.state: Any = None

    def load(self, game: str | dict) -> None:
        """Load a game file (path) or game data (dict); a no-op if the same path is loaded."""
        if isinstance(game, str) and game == self._loaded:
            return
        with _argv_kept():
            self._env.load(game)
        self._loaded = game if isinstance(game, str) else None
        self.state = None

    def reset(self) -> Any:
        with _argv_kept():
            self.state = self._env.reset()
        return self.state

    def step(self, command: str) -> Any:
        self.state, _, _ = self._env.step(command)
        return self.state

    @property
    def admissible(self) -> list[str]:
        """Admissible commands of the current state (sorted, deduplicated)."""
        return list(self.state["admissible_commands"])

    @property
    def won(self) -> bool:
        return bool(self.state["won"])

    @property
    def feedback(self) -> str:
        return str(self.state.feedback)

    def plan(self) -> list[str]:
        """The planner's plan from the current state ([] if none); needs `planner=True`."""
        return list(self.state["policy_commands"] or [])

    def set_planner(self, on: bool) -> None:
        """Turn replanning on or off for the following steps."""
        self._pddl.request_infos.policy_commands = on

    def close(self) -> None:
        if getattr(self, "_lib", None) is not None:
            _release_library(self._lib)
            self._lib = None
            self._pddl = self._env = None

    def __del__(self) -> None:  # a session dropped without close() still returns its library
        self.close()


def split_intro(text: str) -> tuple[str, str]:
    """(observation without the banner, the 'Your task is to: ...' sentence) of a first
    observation; the task is '' when the text has none."""
    body = text.replace(BANNER, "", 1).strip()
    marker = "Your task is to:"
    at = body.rfind(marker)
    task = body[at:].strip() if at >= 0 else ""
    return body, task


def play(game: TextGame, commands: list[str]) -> tuple[bool, str]:
    """Play `commands` from the current state; (True, '') when each one is admissible, and the
    game is won after the last one and not before; else (False, why)."""
    if not commands:
        return False, "no commands"
    if game.won:
        return False, "the game is won before any command"
    for i, command in enumerate(commands):
        if command not in game.admissible:
            return False, f"command {i} {command!r} is not admissible"
        game.step(command)
        last = i == len(commands) - 1
        if game.won != last:
            return False, f"won after command {i} of {len(commands)}" if game.won else "not won"
    return True, ""


def handcoded_walkthrough(path: str, seed: int, max_steps: int = 150) -> list[str] | None:
    """The commands ALFWorld's handcoded expert plays on the game file `path` (which needs its
    traj_data.json alongside) until the game is won; None if it is not won within `max_steps`
    or the expert gives up. Its random fallback moves draw from the global `random`, seeded
    with `seed` meanwhile (the global state is restored)."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import (
        AlfredDemangler, AlfredExpert, AlfredInfos)

    lib = _acquire_library()
    rng_state = random.getstate()
    try:
        infos = textworld.EnvInfos(won=True, admissible_commands=True,
                                   extras=["gamefile", "expert_plan"])
        env = AlfredExpert(AlfredInfos(AlfredDemangler(_env_class()(infos, lib), shuffle=False)),
                           expert_type="handcoded")
        random.seed(seed)
        with _argv_kept():
            env.load(path)
            state = env.reset()
        commands: list[str] = []
        for _ in range(max_steps):
            command = state["extra.expert_plan"][0]
            commands.append(command)
            state, _, _ = env.step(command)
            if state["won"]:
                return commands
        return None
    except Exception:  # the handcoded expert is not guaranteed to succeed; it raises when stuck
        return None
    finally:
        random.setstate(rng_state)
        _release_library(lib)
