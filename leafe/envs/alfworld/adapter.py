"""ALFWorld, the text version (TextWorld's PDDL engine with ALFWorld's ALFRED domain).

Two sources of games, both played through the same engine and ALFWorld wrappers
(`engine.TextGame`), so the text is ALFWorld's: "You are in the middle of a room. Looking
quickly around you, you see a cabinet 1, ...", "Your task is to: put some apple in fridge.",
"Nothing happens." for any command that is not admissible.

* `source: official` reads ALFWorld's games, as `leafe data get alfworld` installs them (into
  $LEAFE_DATA/alfworld) or `alfworld-download` writes them:
  `<data root>/json_2.1.1/{train,valid_seen,valid_unseen}/<task folder>/<trial>/game.tw-pddl`
  (the data root: `official_root`).
  As ALFWorld's `AlfredTWEnv` does, games whose path has `movable` or `Sliced`, and games not
  marked solvable, are skipped; the task type is the task folder's name up to the first '-'
  (e.g. `pick_clean_then_place_in_recep-Apple-None-Fridge-1`). That leaves 140 valid_seen and
  134 valid_unseen games for the six task types. A task id is the game file's path relative to
  `json_2.1.1` (`valid_unseen/<task folder>/<trial>/game.tw-pddl`); ids are sorted.
* `source: generated` (default) makes games offline with `generator.py` from ALFWorld's
  bundled domain and grammar, one per task id `<split>/<task type>-<k>` (k counts per task
  type), seeded by SHA-256 of (generator settings, task type, split, k, attempt), checked
  solvable by the planner and written once to
  `$LEAFE_CACHE/alfworld/generated-<settings hash>/<split>/<task type>-<k>/` (game.tw-pddl
  with its verified plan as walkthrough, and a traj_data.json) through a temporary directory
  and a rename, so concurrent processes never see a partial game. The i-th task of a split has
  task type `task_types[i % len(task_types)]`.

Splits are ALFWorld's: `train`, `valid_seen`, `valid_unseen`, and `test`, an alias of
`valid_unseen` (the out-of-distribution split papers report). For generated games seen and
unseen differ only by their seeds.

Observations: `text` is the game's feedback (the first one without the TextWorld banner,
with the task sentence, as ALFWorld agents show it), `task` is the sentence "Your task is to:
...", `admissible` the admissible commands without `help` (as verl-agent lists them; `help`
still works). Commands are matched after lower-casing and collapsing whitespace. Reward 1 and
success when the game is won. The expert is one of ALFWorld's (option `expert`): the
planner (default; fast-downward's plan from the initial state, stored and verified at
generation for generated games, planned, verified and memoised for official ones) or the
handcoded expert, which searches receptacles like an agent. Restore is the default reset + replay
(the engine has no state copy); the text is deterministic, so the observation hash holds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, field_validator

from leafe import paths
from leafe.envs.alfworld.generator import TASK_TYPES
from leafe.envs.base import Env, EnvOptions, Observation, Step
from leafe.errors import UserError
from leafe.store import make_temp_dir

if TYPE_CHECKING:
    from leafe.envs.oracle import Diagnosis

TaskType = Literal[TASK_TYPES]  # the generator's tuple, so the two never drift

#: ALFWorld's data splits (json_2.1.1 folders).
DATA_SPLITS = ("train", "valid_seen", "valid_unseen")
#: Split aliases: `test` is the out-of-distribution evaluation split.
ALIASES = {"test": "valid_unseen"}

GAME_FILE = "game.tw-pddl"
#: Commands the handcoded expert gets before the planner takes over (ALFWorld's episode length).
HANDCODED_MAX_STEPS = 50

#: (data root, split, task types) -> sorted official task ids, per process.
_OFFICIAL: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}


#: Where `alfworld-download` writes, and what the `alfworld` package sets $ALFWORLD_DATA to
#: on import when it is unset.
ALFWORLD_DEFAULT_DATA = "~/.cache/alfworld"


def official_root(options: "AlfworldEnv.Options") -> tuple[Path, str]:
    """(data root holding json_2.1.1/, where it comes from): the option `data_dir`; else
    $ALFWORLD_DATA unless it is ALFWorld's own default (importing `alfworld` sets it to
    ~/.cache/alfworld); else the default, `leafe.data.locate("alfworld")`: $LEAFE_DATA/alfworld
    when `leafe data get alfworld` installed it there, else ~/.cache/alfworld when
    `alfworld-download` filled it, else $LEAFE_DATA/alfworld."""
    from leafe import data

    if options.data_dir:
        return Path(os.path.expandvars(options.data_dir)).expanduser(), "env option data_dir"
    env = os.environ.get("ALFWORLD_DATA")
    default = Path(ALFWORLD_DEFAULT_DATA).expanduser()
    if env and Path(os.path.expandvars(env)).expanduser() != default:
        return Path(os.path.expandvars(env)).expanduser(), "$ALFWORLD_DATA"
    return data.locate("alfworld"), "default"


def _require_packages() -> None:
    try:
        import alfworld.agents.environment.alfred_tw_env  # noqa: F401
        import fast_downward  # noqa: F401
        import textworld  # noqa: F401
    except ModuleNotFoundError as e:
        raise UserError(
            f"environment 'alfworld' needs the package {e.name!r}, which is not installed; "
            "install leafe's extra for it (`pip install -e '.[alfworld]'`)"
        ) from None


def normalize(command: str) -> str:
    """A command as the engine spells commands: lower case, single spaces."""
    return " ".join(str(command).split()).lower()


class AlfworldEnv(Env):
    """ALFWorld text games, official (`alfworld-download`) or generated offline."""

    name = "alfworld"

    class Options(EnvOptions):
        """Options of the alfworld environment."""

        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        source: Literal["generated", "official"] = "generated"
        """`generated`: games made offline by leafe's generator (cached in $LEAFE_CACHE);
        `official`: ALFWorld's games from `alfworld-download` (see `data_dir`)."""
        data_dir: str | None = None
        """Official data root, the folder holding `json_2.1.1/`; null: $ALFWORLD_DATA if set
        (other than ALFWorld's own default), else $LEAFE_DATA/alfworld when `leafe data get
        alfworld` installed it, else ~/.cache/alfworld when `alfworld-download` filled it."""
        task_types: list[TaskType] = Field(default_factory=lambda: list(TASK_TYPES))
        """Task types to keep (ALFWorld's six by default)."""
        train_size: int = Field(default=600, ge=1)
        """Generated games: number of task ids in the train split."""
        test_size: int = Field(default=140, ge=1)
        """Generated games: number of task ids in each of valid_seen and valid_unseen (test)."""
        receptacles: int = Field(default=12, ge=4, le=40)
        """Generated games: receptacles per room (raised to what the room and task need)."""
        target_objects: int = Field(default=2, ge=2, le=6)
        """Generated games: most instances of the goal's object type in the room (drawn from
        1, or 2 for pick-two tasks, up to this)."""
        distractors: int = Field(default=8, ge=0, le=60)
        """Generated games: objects of other types scattered in the receptacles."""
        expert: Literal["planner", "handcoded"] = "planner"
        """`planner`: fast-downward's plan from the start (knows where everything is; ALFWorld's
        `planner` expert). `handcoded`: ALFWorld's handcoded expert, which opens and searches
        receptacles like an agent (the expert of ALFWorld's DAgger training; about 1 s per
        task); where it does not win within 50 commands (ALFWorld's episode length), the
        planner's plan is used instead."""

        @field_validator("task_types")
        @classmethod
        def _some_unique(cls, v: list[str]) -> list[str]:
            if not v:
                raise ValueError(f"give at least one task type of: {', '.join(TASK_TYPES)}")
            if len(set(v)) != len(v):
                raise ValueError("task types must not repeat")
            return [t for t in TASK_TYPES if t in v]  # canonical order

    options: Options

    def __init__(self, options: Options | None = None):
        super().__init__(options)
        self._game: Any = None  # the episode's engine session
        self._planner: Any = None  # a second session for experts and generation checks
        self._paths: dict[str, Path] = {}
        self._experts: dict[str, list[str] | None] = {}
        self._task_type = ""
        self._task = ""
        self._admissible: list[str] = []
        self._generated_dir: Path | None = None

    # -- splits and task ids ----------------------------------------------------------------
    def splits(self) -> list[str]:
        return [*DATA_SPLITS, *ALIASES]

    def _split(self, split: str) -> str:
        split = ALIASES.get(split, split)
        if split not in DATA_SPLITS:
            raise ValueError(
                f"unknown split {split!r}; valid splits: {', '.join(self.splits())} "
                "(test is an alias of valid_unseen)"
            )
        return split

    def tasks(self, split: str) -> list[str]:
        split = self._split(split)
        if self.options.source == "official":
            return list(self._official_tasks(split))
        size = self.options.train_size if split == "train" else self.options.test_size
        types = self.options.task_types
        return [f"{split}/{types[i % len(types)]}-{i // len(types):05d}" for i in range(size)]

    def task_type(self, task_id: str) -> str:
        """The ALFWorld task type of a task id."""
        parts = str(task_id).split("/")
        folder = parts[1] if len(parts) > 1 else ""
        return folder.split("-", 1)[0]

    # -- official data ----------------------------------------------------------------------
    def data_root(self) -> Path:
        """The official data root (holding json_2.1.1/): see `official_root`."""
        return official_root(self.options)[0]

    @classmethod
    def data_needs(cls, options: EnvOptions) -> list[str]:
        o: AlfworldEnv.Options = options  # type: ignore[assignment]
        return ["alfworld"] if o.source == "official" and official_root(o)[1] == "default" else []

    @classmethod
    def missing_data(cls, options: EnvOptions) -> str | None:
        o: AlfworldEnv.Options = options  # type: ignore[assignment]
        if o.source != "official":
            return None
        root, where = official_root(o)
        if where == "default":
            return super().missing_data(options)
        if not all((root / "json_2.1.1" / split).is_dir() for split in DATA_SPLITS):
            return (f"alfworld: no ALFWorld games in {root}/json_2.1.1/{{{','.join(DATA_SPLITS)}}} (the data "
                    f"root from {where}): point it at the folder holding json_2.1.1/, or run `leafe data get "
                    f"alfworld` and unset {where} (or use `source: generated` for offline games)")
        return None

    def _official_tasks(self, split: str) -> list[str]:
        base = self.data_root() / "json_2.1.1"
        key = (str(base), split, tuple(self.options.task_types))
        if key in _OFFICIAL:
            return _OFFICIAL[key]
        folder = base / split
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            if GAME_FILE not in filenames:
                continue
            rel = Path(dirpath, GAME_FILE).relative_to(base).as_posix()
            if "movable" in rel or "Sliced" in rel:
                continue  # not supported by ALFWorld's text engine either
            if self.task_type(rel) not in self.options.task_types:
                continue
            try:
                solvable = json.loads((base / rel).read_text(encoding="utf-8")).get("solvable")
            except (OSError, ValueError):
                solvable = False
            if solvable:
                found.append(rel)
        if not found:
            raise UserError(
                f"alfworld: no ALFWorld games of split {split!r} in {folder} (data root "
                f"{self.data_root()}, from {official_root(self.options)[1]}). Get them with "
                "`leafe data get alfworld` (into $LEAFE_DATA/alfworld, where leafe reads them by "
                "default; without internet: `leafe data get alfworld --from` a copy), or set "
                "ALFWORLD_DATA or `env.options.data_dir` to the folder `alfworld-download` filled "
                "(holding json_2.1.1/{train,valid_seen,valid_unseen}/...); or use "
                "`source: generated` for offline games"
            )
        _OFFICIAL[key] = sorted(found)
        return _OFFICIAL[key]

    # -- generated games --------------------------------------------------------------------
    def _settings(self) -> Any:
        from leafe.envs.alfworld.generator import Settings

        o = self.options
        return Settings(receptacles=o.receptacles, target_objects=o.target_objects,
                        distractors=o.distractors)

    def generated_dir(self) -> Path:
        """Cache folder of this configuration's generated games: keyed by the generator
        settings and version and by ALFWorld's domain and grammar files."""
        if self._generated_dir is None:
            from leafe.envs.alfworld.generator import logic_files

            domain, grammar = (p.read_bytes() for p in logic_files())
            key = json.dumps({"settings": self._settings().key(),
                              "domain": _sha256(domain), "grammar": _sha256(grammar)},
                             sort_keys=True)
            digest = _sha256(key.encode("utf-8"))[:16]
            self._generated_dir = paths.cache_root() / "alfworld" / f"generated-{digest}"
        return self._generated_dir

    def _parse_generated(self, task_id: str) -> tuple[str, str, int]:
        split, _, rest = str(task_id).partition("/")
        task_type, _, k = rest.rpartition("-")
        if split not in DATA_SPLITS or task_type not in TASK_TYPES or not k.isdigit():
            raise ValueError(
                f"unknown task id {task_id!r}; generated games are named "
                f"'<split>/<task type>-<k>' with split in {', '.join(DATA_SPLITS)}, e.g. "
                "'train/pick_heat_then_place_in_recep-00003'"
            )
        return split, task_type, int(k)

    def _generated_path(self, task_id: str) -> Path:
        split, task_type, k = self._parse_generated(task_id)
        folder = self.generated_dir() / split / f"{task_type}-{k:05d}"
        path = folder / GAME_FILE
        if not path.is_file():
            self._generate_into(folder, task_type, split, k)
        return path

    def _generate_into(self, folder: Path, task_type: str, split: str, k: int) -> None:
        from leafe.envs.alfworld.generator import generate, logic_files

        domain_file, grammar_file = logic_files()
        data, traj = generate(
            self._settings(), task_type, (split, k), self._check,
            domain_file.read_text(encoding="utf-8"), grammar_file.read_text(encoding="utf-8"),
        )
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(folder.parent, f".{folder.name}.")  # umask modes, not 0700
        try:
            (tmp / GAME_FILE).write_text(json.dumps(data), encoding="utf-8")
            (tmp / "traj_data.json").write_text(json.dumps(traj, indent=2), encoding="utf-8")
            try:
                os.rename(tmp, folder)
            except OSError:
                if not (folder / GAME_FILE).is_file():
                    raise
                # another process wrote the same (deterministic) game first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- engine sessions --------------------------------------------------------------------
    def _planner_game(self) -> Any:
        if self._planner is None:
            _require_packages()
            from leafe.envs.alfworld.engine import TextGame

            self._planner = TextGame(planner=True)
        return self._planner

    def _check(self, game: str | dict) -> tuple[list[str] | None, str]:
        """The planner's plan for a game (file or data), verified by playing it."""
        from leafe.envs.alfworld.engine import play

        g = self._planner_game()
        g.set_planner(True)
        g.load(game)
        g.reset()
        plan = g.plan()
        if not plan:
            return None, "the planner found no plan"
        g.set_planner(False)  # one search from the start is enough
        ok, why = play(g, plan)
        return (plan, "") if ok else (None, f"planner plan fails: {why}")

    def _verify(self, game: str, commands: list[str]) -> bool:
        """Whether `commands` win the game from its start, exactly at the last one."""
        from leafe.envs.alfworld.engine import play

        g = self._planner_game()
        g.set_planner(False)
        g.load(game)
        g.reset()
        return play(g, commands)[0]

    def game_path(self, task_id: str) -> Path:
        """The game file of a task (generated ones are generated on first use)."""
        if task_id not in self._paths:
            if self.options.source == "official":
                path = self.data_root() / "json_2.1.1" / str(task_id)
                if str(task_id).split("/")[0] not in DATA_SPLITS or not path.is_file():
                    raise ValueError(
                        f"unknown task id {task_id!r}: no game file {path}; official task ids "
                        "are game paths relative to json_2.1.1 (see tasks(split))"
                    )
            else:
                _require_packages()
                path = self._generated_path(task_id)
            self._paths[task_id] = path
        return self._paths[task_id]

    # -- episode ----------------------------------------------------------------------------
    def _observation(self, text: str, task: str) -> Observation:
        g = self._game
        return Observation(
            text=text,
            task=task,
            admissible=[c for c in g.admissible if c != "help"],
            info={"task_type": self._task_type, "won": g.won},
        )

    def _reset(self, task_id: str) -> Observation:
        path = self.game_path(task_id)
        _require_packages()
        from leafe.envs.alfworld.engine import TextGame, split_intro

        if self._game is None:
            self._game = TextGame()
        self._game.load(str(path))
        self._game.reset()
        self._task_type = self.task_type(task_id)
        text, self._task = split_intro(self._game.feedback)
        self._admissible = self._game.admissible
        return self._observation(text, self._task)

    def _step(self, action: str) -> Step:
        command = normalize(action)
        valid = command in self._admissible
        self._game.step(command)  # an inadmissible command answers "Nothing happens."
        self._admissible = self._game.admissible
        won = self._game.won
        obs = self._observation(self._game.feedback.strip(), self._task)
        return Step(obs, reward=1.0 if won else 0.0, done=won, success=won, valid=valid)

    # -- expert -----------------------------------------------------------------------------
    def expert(self, task_id: str) -> list[str] | None:
        """A command list solving the task from its start (see the option `expert`),
        verified by playing it; None if no expert solves it. Uses a separate engine session:
        the current episode is untouched. Memoised per instance."""
        if task_id not in self._experts:
            path = self.game_path(task_id)
            plan = None
            if self.options.expert == "handcoded" and (path.parent / "traj_data.json").is_file():
                from leafe.envs.alfworld.engine import handcoded_walkthrough
                from leafe.envs.alfworld.generator import derive_seed

                walk = handcoded_walkthrough(str(path), derive_seed("handcoded", str(task_id)),
                                             max_steps=HANDCODED_MAX_STEPS)
                if walk and self._verify(str(path), walk):
                    plan = walk
            if plan is None and self.options.source == "generated":
                plan = json.loads(path.read_text(encoding="utf-8")).get("walkthrough")
            if not plan:  # official games: plan now
                plan, _ = self._check(str(path))
            self._experts[task_id] = list(plan) if plan else None
        plan = self._experts[task_id]
        return list(plan) if plan else None

    # -- oracle reflector (leafe.envs.oracle) -----------------------------------------------
    oracle_solver = "fast-downward (ALFWorld's planner), replanning from every state"

    @classmethod
    def oracle_support(cls, options: EnvOptions) -> str | None:
        # replanning from every prefix state was measured on generated games (about 30 ms a
        # state, 0.35 s a reset on 2 CPU cores); official games could not be measured here
        if getattr(options, "source", "generated") != "generated":
            return ("replans from mid-episode states only on generated games (source: generated), where "
                    "its cost was measured")
        return None

    def diagnose(self, task_id: str, actions: list[str | None], *, failed: bool) -> Diagnosis:
        """See `Env.diagnose`: the planner replans after every step of a replay in the expert's
        engine session; a step's cost is the length of the plan from the state after it (0 when
        won, None when the planner finds none). The planner knows where every object is, which
        the agent does not: looking in the wrong place counts as a step that did not help."""
        from leafe.envs.oracle import Diagnosis, choose_step

        g = self._planner_game()
        g.set_planner(True)
        g.load(str(self.game_path(task_id)))
        g.reset()

        def cost() -> int | None:
            return 0 if g.won else (len(g.plan()) or None)

        costs, plans, events = [cost()], [g.plan()], []
        for a in actions:
            if a is None:
                events.append({"kind": "unparsed"})
            else:
                command = normalize(a)
                events.append({"kind": "command" if command in g.admissible else "inadmissible",
                               "action": command})
                g.step(command)  # an inadmissible command answers "Nothing happens."
            costs.append(cost())
            plans.append(g.plan())
        if costs[0] is None:
            return Diagnosis(None, None, costs, error=f"the planner finds no plan for {task_id} from its start")
        tau, reason = choose_step(costs, failed)
        if tau is None:
            return Diagnosis(None, None, costs)
        nxt = plans[tau - 1][0]  # the planner's next command from the state before τ
        event, at = events[tau - 1], f"At step {tau}"
        if reason == "ran_out":
            text = (f"Every command up to step {tau} was on the shortest plan, but the attempt ran out of "
                    f"steps with {costs[tau]} command(s) still needed; at step {tau}, do \"{nxt}\" and keep going "
                    "without detours.")
        elif reason == "unsolvable":
            text = f"{at}, \"{event['action']}\" made the task impossible to finish; do \"{nxt}\" instead."
        elif event["kind"] == "unparsed":
            text = f"{at}, the reply held no command, so nothing happened; reply with one command: \"{nxt}\"."
        elif event["kind"] == "inadmissible":
            text = (f"{at}, \"{event['action']}\" is not an admissible command there (nothing happened); "
                    f"do \"{nxt}\" instead.")
        else:
            text = f"{at}, \"{event['action']}\" did not bring you closer to the goal; do \"{nxt}\" instead."
        return Diagnosis(tau, text, costs, reason)

    def close(self) -> None:
        for game in (self._game, self._planner):
            if game is not None:
                game.close()
        self._game = self._planner = None


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
