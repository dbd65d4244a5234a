"""TextWorld over the real `textworld` package (1.7): games generated locally, played through
Jericho, with native snapshots.

Games. Each task id (`train-00003`, `test-00012`) names one game, generated offline with
TextWorld's own generator (`textworld.generator.make_game` for `custom`, the registered
challenge makers for `tw-cooking`, `tw-coin_collector`, `tw-treasure_hunter`) and compiled to
Z-machine (`.z8`, Inform 7 ships in the wheel) on first use, 0.5-4 s per game. The seed of a game
is a SHA-256 of (generation settings, base seed, split, index, attempt), so a task id always
names the same game, in any process. Compiled games are cached under
``$LEAFE_CACHE/textworld/<key>/<task id>/`` (``$LEAFE_CACHE`` defaults to ``~/.cache/leafe``;
`key` hashes the generation settings, the base seed, the TextWorld version and this module's
recipe version, and ``settings.json`` next to the games says which). A game is generated into a
private temporary directory and renamed into place, so parallel processes never see half a game
and never clash (the first rename wins; the others discard their copy).

Held-out test split. Train and test seeds differ, but a small game space (a one-room coin
collector, say) can give the same game twice. So the game space is split by the game itself: a
game belongs to the test split when a hash of its fingerprint (its canonical serialized
structure: world, entities and texts, quests, objective) is odd, to the train split when even,
and each task takes the first attempt whose game falls on its side. No test game can equal a
train game, whatever `train_size` is, and no task depends on another. The cost is one extra
(uncompiled) generation per game on average. `tw-cooking` with `food_split` (the default)
also uses TextWorld's own food splits: test recipes use its test foods and train foods
prepared in other ways (its splits alone still share 5 of 120 food preparations, hence the
fingerprint rule for every family). Two tasks of the same split may still share a game when
the game space is tiny.

Play. Observations carry the game's own feedback (the title banner and status line removed;
on reset the objective paragraph is removed too, since it is the task, and the room description
stays), the objective as the task, and the sorted admissible commands. Reward is the change in
score; `success` is a win, `done` is a win or a loss. Commands outside the admissible list are
still sent to the game (its parser answers informatively, e.g. "You can't see any such
thing.") and marked `valid=False`. Game-system commands that would desynchronise TextWorld's
state tracking or the interpreter (quit, restart, undo, save, restore, transcripts, TextWorld's
`tw-*` debug hooks) are not sent; they get an explanatory feedback, `valid=False`, and change
nothing.

Snapshots (option `snapshot`): `state` (default) saves the interpreter's memory through
Jericho (`get_state`) and TextWorld's state-tracking bookkeeping and restores them in place:
0.5-2 ms either way, 50-90 KB per snapshot, at any depth; the saved state pickles, so it
also travels to environment workers. `copy` keeps TextWorld's `env.copy()` (a second
interpreter, loaded from a fresh copy of Jericho's library, plus a deep copy of the game
state): 55-400 ms per snapshot and again per restore, up to a few MB each, not picklable.
`replay` is the base class's reset + replay with an observation check: 10-20 ms plus 3-10 ms
per action (about 30-60 ms at depth 5, 170-440 ms at depth 50).

textworld (and jericho) are imported lazily, on the first game generated or played.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from leafe import paths
from leafe.envs.base import Env, EnvOptions, IndexedSplits, Observation, Snapshot, Step, obs_hash
from leafe.store import make_temp_dir

#: Bump when generation changes in a way that changes the games of the same settings.
RECIPE = "1"

#: Options that apply to one challenge only, with their defaults (None: required).
CHALLENGE_OPTIONS: dict[str, dict[str, Any]] = {
    "custom": {"world_size": 5, "nb_objects": 10, "quest_length": 5, "quest_breadth": 1},
    "tw-coin_collector": {"level": None},
    "tw-treasure_hunter": {"level": None},
    "tw-cooking": {
        "recipe": 1, "take": 0, "go": 1, "open": False, "cook": False, "cut": False,
        "drop": False, "recipe_seed": 0, "food_split": True,
    },
}
_LEVEL_RANGE = {"tw-coin_collector": (1, 300), "tw-treasure_hunter": (1, 30)}

#: Attempts (differently seeded generations) a task gets before its generation fails.
MAX_ATTEMPTS = 64

#: Game-system verbs never sent to the game (first word of the command).
BLOCKED_VERBS = frozenset({
    "quit", "q", "restart", "undo", "save", "restore", "script", "unscript", "transcript",
    "noscript", "notranscript",
})
_BLOCKED_PREFIX = "tw-"  # TextWorld's debug hooks (tw-trace-actions, tw-extra-infos, ...)

#: The interpreter's seed: TextWorld games are deterministic, but Jericho would otherwise seed
#: the Z-machine's random number generator from the clock.
INTERPRETER_SEED = 20240601


def _sha(*parts: Any) -> str:
    key = json.dumps([str(p) if not isinstance(p, (dict, list)) else p for p in parts],
                     sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _canonical(x: Any) -> Any:
    """`x` with mappings sorted by key and lists sorted by content: TextWorld serializes some
    sets in hash order, which differs between processes."""
    if isinstance(x, dict):
        return {str(k): _canonical(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        items = [_canonical(v) for v in x]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return x


def game_fingerprint(game: Any) -> str:
    """A digest naming a game: its serialized structure (world, entities with their names and
    texts, quests, grammar options, objective), without metadata (seeds, uuid) or the knowledge
    base; stable across processes."""
    data = game.serialize()
    data.pop("metadata", None)
    data.pop("KB", None)
    text = json.dumps(_canonical(data), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_split(fingerprint: str) -> str:
    """The split a game belongs to ("train" or "test"), from its fingerprint."""
    digest = hashlib.sha256(("leafe-textworld-split|" + fingerprint).encode("utf-8")).digest()
    return "test" if digest[0] & 1 else "train"


_textworld_module: Any = None


def _textworld_version() -> str:
    """The installed TextWorld's version, from its package metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("textworld")
    except PackageNotFoundError:
        return "missing"


def _textworld() -> Any:
    """Import textworld (and its challenges) once, quietly."""
    global _textworld_module
    if _textworld_module is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import textworld
            import textworld.challenges  # noqa: F401  (registers the challenges)
            import textworld.generator  # noqa: F401
        _textworld_module = textworld
    return _textworld_module


# -- feedback cleaning -------------------------------------------------------------------------
_STATUS_LINE = re.compile(r"[ \t]*-= [^\n]*? =-[ \t]*-?\d+/\d+[ \t]*\Z")
_PROMPT_LINE = re.compile(r"(?:\A|\n)>[ \t]*\Z")
_END_QUESTION = re.compile(
    r"\n*Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command\?[ \t]*"
)
_BANNER_LINE = re.compile(r"^[ \t_|\\/$<>]*$")


def clean_feedback(text: str) -> str:
    """The game's text without the status line, the input prompt and the end-of-game menu."""
    text = text.replace("\r", "").rstrip()
    text = _STATUS_LINE.sub("", text).rstrip()
    text = _PROMPT_LINE.sub("", text)
    text = _END_QUESTION.sub("", text)
    text = re.sub(r"(?m)^[ \t]+|[ \t]+$", "", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def clean_intro(text: str, objective: str | None) -> str:
    """The reset text without TextWorld's title banner and without the objective paragraph
    (the task carries it), keeping the room description."""
    text = clean_feedback(text)
    lines = text.split("\n")
    i = 0
    while i < len(lines) and _BANNER_LINE.match(lines[i]):
        i += 1
    text = "\n".join(lines[i:]).strip()
    if objective:
        obj = objective.strip()
        if text.startswith(obj):
            text = text[len(obj):].strip()
    return text


def _norm(command: str) -> str:
    return " ".join(str(command).split()).lower()


#: Where Inform's parser starts another command within one line ("look. quit", "look then
#: quit", "look, undo").
_COMMAND_BREAK = re.compile(r"[.,;]|\bthen\b", re.IGNORECASE)


def _blocked_verb(command: str) -> str | None:
    """The first game-system verb among the commands of one input line, else None."""
    for part in _COMMAND_BREAK.split(command):
        words = part.split()
        if words:
            verb = words[0].lower()
            if verb in BLOCKED_VERBS or verb.startswith(_BLOCKED_PREFIX):
                return verb
    return None


# -- options -----------------------------------------------------------------------------------
class TextWorldOptions(EnvOptions):
    """Options of the textworld environment.

    `challenge` picks the game family; each family has its own options (an option of another
    family is an error): `custom` takes `world_size`, `nb_objects`, `quest_length`,
    `quest_breadth`; `tw-coin_collector` and `tw-treasure_hunter` take `level`; `tw-cooking`
    takes `recipe`, `take`, `go`, `open`, `cook`, `cut`, `drop`, `recipe_seed`, `food_split`.
    Games are generated lazily (2-4 s each, cached on disk); `prepare()` generates many in
    parallel.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    challenge: Literal["custom", "tw-cooking", "tw-coin_collector", "tw-treasure_hunter"] = (
        "custom"
    )
    """Game family: `custom` (TextWorld's generic generator, as `tw-make custom`) or one of its
    challenges, as `tw-make <challenge>`."""
    world_size: int | None = Field(None, ge=1, le=100)
    """custom: number of rooms (default 5)."""
    nb_objects: int | None = Field(None, ge=0)
    """custom: minimum number of objects in the world (default 10)."""
    quest_length: int | None = Field(None, ge=1)
    """custom: number of actions the quest needs (default 5)."""
    quest_breadth: int | None = Field(None, ge=1)
    """custom: number of sub-quests (default 1)."""
    level: int | None = Field(None, ge=1)
    """tw-coin_collector (1-300) and tw-treasure_hunter (1-30): difficulty level; required."""
    recipe: int | None = Field(None, ge=1, le=5)
    """tw-cooking: number of ingredients in the recipe (default 1)."""
    take: int | None = Field(None, ge=0, le=5)
    """tw-cooking: number of ingredients to find (at most `recipe`; default 0)."""
    go: Literal[1, 6, 9, 12] | None = None
    """tw-cooking: number of rooms (1, 6, 9 or 12; default 1)."""
    open: bool | None = None
    """tw-cooking: containers and doors must be opened (default false)."""
    cook: bool | None = None
    """tw-cooking: some ingredients must be cooked (default false)."""
    cut: bool | None = None
    """tw-cooking: some ingredients must be cut (default false)."""
    drop: bool | None = None
    """tw-cooking: the inventory has limited capacity (default false)."""
    recipe_seed: int | None = Field(None, ge=0)
    """tw-cooking: seed of the recipe (0: fixed recipe; above 0 needs `take` >= 1)."""
    food_split: bool | None = None
    """tw-cooking: use TextWorld's food splits (default true): train recipes use its train
    foods and preparations, test recipes its test foods and train foods prepared in other
    ways. When false, both splits draw from all foods (the test split stays held out by game
    fingerprint either way)."""
    seed: int = Field(0, ge=0)
    """Base seed of game generation: another value gives another set of games."""
    train_size: int = Field(1000, ge=1)
    """Number of task ids in the train split."""
    test_size: int = Field(100, ge=1)
    """Number of task ids in the test split."""
    snapshot: Literal["state", "copy", "replay"] = "state"
    """How `snapshot`/`restore` work: `state` (interpreter memory through Jericho plus
    TextWorld's state tracking, restored in place; picklable), `copy` (TextWorld's
    `env.copy()`; slower, not picklable), `replay` (reset + replay of the action prefix)."""

    @model_validator(mode="after")
    def _challenge_options(self) -> TextWorldOptions:
        own = CHALLENGE_OPTIONS[self.challenge]
        for other, names in CHALLENGE_OPTIONS.items():
            for name in names:
                if name in own or getattr(self, name) is None:
                    continue
                owners = [c for c, n in CHALLENGE_OPTIONS.items() if name in n]
                raise ValueError(
                    f"option {name!r} applies to challenge {' and '.join(owners)}, not "
                    f"{self.challenge!r}; options of {self.challenge!r}: {', '.join(own)}"
                )
        for name, default in own.items():
            if getattr(self, name) is None:
                if default is None:
                    lo, hi = _LEVEL_RANGE[self.challenge]
                    raise ValueError(f"challenge {self.challenge!r} needs `{name}` ({lo}-{hi})")
                setattr(self, name, default)
        if self.challenge in _LEVEL_RANGE:
            lo, hi = _LEVEL_RANGE[self.challenge]
            if not lo <= self.level <= hi:
                raise ValueError(
                    f"{self.challenge} level must be within {lo}-{hi}, not {self.level}")
        if self.challenge == "tw-coin_collector" and self.level is not None:
            quest_length = (self.level - 1) % 100 + 1
            if ((self.level - 1) // 100 + 1) * quest_length > 100:
                raise ValueError(
                    f"tw-coin_collector level {self.level} needs more than 100 rooms, which "
                    "TextWorld 1.7 cannot compile (z8); use a lower level"
                )
        if self.challenge == "tw-cooking":
            if self.take > self.recipe:
                raise ValueError(
                    f"tw-cooking: take ({self.take}) must be <= recipe ({self.recipe})")
            if self.recipe_seed > 0 and self.take < 1:
                raise ValueError("tw-cooking: recipe_seed > 0 needs take >= 1")
        return self

    def generation_settings(self) -> dict[str, Any]:
        """The settings that define the games (the cache key hashes these)."""
        settings: dict[str, Any] = {"challenge": self.challenge}
        for name in CHALLENGE_OPTIONS[self.challenge]:
            settings[name] = getattr(self, name)
        return settings


# -- generation --------------------------------------------------------------------------------
def game_seed(settings: dict[str, Any], base_seed: int, split: str, index: int,
              attempt: int) -> int:
    """The generator's seed of one attempt at one task (below 2**31)."""
    digest = _sha("leafe-textworld", settings, base_seed, split, index, attempt)
    return int(digest[:8], 16) & 0x7FFFFFFF


def make_game(settings: dict[str, Any], seed: int, split: str) -> Any:
    """TextWorld's `Game` for one seed (not compiled)."""
    tw = _textworld()
    options = tw.GameOptions()
    options.seeds = seed
    challenge = settings["challenge"]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if challenge == "custom":
            options.nb_rooms = settings["world_size"]
            options.nb_objects = settings["nb_objects"]
            chaining = options.chaining
            length = settings["quest_length"]
            chaining.min_length = chaining.max_length = chaining.max_depth = length
            chaining.min_breadth = chaining.max_breadth = settings["quest_breadth"]
            return tw.generator.make_game(options)
        make = tw.challenges.CHALLENGES[challenge][1]
        if challenge == "tw-cooking":
            cooking = {k: settings[k] for k in
                       ("recipe", "take", "go", "open", "cook", "cut", "drop", "recipe_seed")}
            cooking["split"] = split if settings["food_split"] else None
            return make(settings=cooking, options=options)
        return make(settings={"level": settings["level"]}, options=options)


def compile_game(game: Any, folder: Path) -> Path:
    """Compile `game` into `folder/game.z8` (+ `game.json`); returns the .z8 path."""
    tw = _textworld()
    options = tw.GameOptions()
    options.path = str(folder / "game.z8")
    options.file_ext = ".z8"
    options.force_recompile = True
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        path = Path(tw.generator.compile_game(game, options))
    (folder / "game.ni").unlink(missing_ok=True)  # the Inform 7 source; not needed to play
    return path


class GenerationError(RuntimeError):
    """No game could be generated for a task."""


def generate_task(settings: dict[str, Any], base_seed: int, split: str, index: int,
                  folder: Path) -> dict[str, Any]:
    """Generate and compile the game of one task into `folder`; returns its metadata (also
    written to `folder/meta.json`)."""
    t0 = time.perf_counter()
    errors: list[str] = []
    wrong_side = 0
    for attempt in range(MAX_ATTEMPTS):
        seed = game_seed(settings, base_seed, split, index, attempt)
        try:
            game = make_game(settings, seed, split)
        except Exception as e:  # QuestGenerationError and the like: next attempt
            errors.append(f"{type(e).__name__}: {e}")
            continue
        fingerprint = game_fingerprint(game)
        if fingerprint_split(fingerprint) != split:
            wrong_side += 1
            continue
        compile_game(game, folder)
        meta = {
            "task": f"{split}-{index:05d}",
            "split": split,
            "index": index,
            "attempt": attempt,
            "seed": seed,
            "fingerprint": fingerprint,
            "settings": settings,
            "base_seed": base_seed,
            "objective": game.objective,
            "walkthrough": game.metadata.get("walkthrough"),
            "max_score": game.max_score,
            "textworld": _textworld().__version__,
            "recipe": RECIPE,
            "generation_s": round(time.perf_counter() - t0, 3),
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        return meta
    raise GenerationError(
        f"textworld: no game for {split}-{index:05d} with {settings} in {MAX_ATTEMPTS} attempts "
        f"({len(errors)} generation errors, {wrong_side} games of the other split); last error: "
        f"{errors[-1] if errors else 'none'}. Relax the settings (e.g. a shorter quest, more "
        "rooms or objects, a higher level)."
    )


def _generate_in_cache(options: dict[str, Any], task_id: str) -> str:
    """Process-pool entry: make sure task `task_id` is generated; returns its folder."""
    env = TextWorldEnv(TextWorldEnv.Options(**options))
    return str(env.game_dir(task_id))


#: Age after which a generation temp dir counts as abandoned (its process was killed).
_ABANDONED_S = 3600


def _remove_abandoned_temp_dirs(root: Path) -> None:
    now = time.time()
    for path in root.glob(".tmp-*"):
        try:
            if now - path.stat().st_mtime > _ABANDONED_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


# -- the environment ---------------------------------------------------------------------------
class TextWorldEnv(IndexedSplits, Env):
    """Text adventure games generated by TextWorld; actions are free-text commands."""

    name = "textworld"
    Options = TextWorldOptions
    options: TextWorldOptions

    def __init__(self, options: TextWorldOptions | None = None):
        super().__init__(options)
        self._meta: dict[str, dict[str, Any]] = {}
        self._experts: dict[str, list[str] | None] = {}
        self._cache_key: str | None = None
        self._tw: Any = None  # the running TextWorld environment
        self._loaded: str | None = None  # task id of the game loaded in self._tw
        self._score = 0
        self._over = False
        self._won = False
        self._admissible: list[str] = []


    # -- the game cache ---------------------------------------------------------------------
    def cache_key(self) -> str:
        """Hash of what defines the games: generation settings, base seed, TextWorld version
        (read from the installed package's metadata, without importing it), recipe."""
        if self._cache_key is None:
            o = self.options
            self._cache_key = _sha("leafe-textworld-cache", o.generation_settings(), o.seed,
                                   _textworld_version(), RECIPE)[:16]
        return self._cache_key

    def cache_dir(self) -> Path:
        """The folder holding this configuration's games."""
        return paths.cache_root() / "textworld" / self.cache_key()

    def game_dir(self, task_id: str) -> Path:
        """The folder of a task's compiled game (`game.z8`, `game.json`, `meta.json`),
        generating it first when it is not cached."""
        split, index = self._parse_task(task_id)
        root = self.cache_dir()
        final = root / f"{split}-{index:05d}"
        if (final / "meta.json").is_file():
            return final
        root.mkdir(parents=True, exist_ok=True)
        self._write_settings(root)
        _remove_abandoned_temp_dirs(root)
        tmp = make_temp_dir(root, f".tmp-{split}-{index:05d}-")  # umask modes, not 0700
        try:
            o = self.options
            generate_task(o.generation_settings(), o.seed, split, index, tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "meta.json").is_file():  # not another process's game: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _write_settings(self, root: Path) -> None:
        path = root / "settings.json"
        if path.is_file():
            return
        data = {"settings": self.options.generation_settings(), "seed": self.options.seed,
                "textworld": _textworld_version(), "recipe": RECIPE}
        tmp = root / f".settings-{uuid.uuid4().hex}.json"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    def meta(self, task_id: str) -> dict[str, Any]:
        """The metadata of a task's game (seed, attempt, fingerprint, objective, walkthrough,
        max score, generation time); generates the game when needed."""
        if task_id not in self._meta:
            path = self.game_dir(task_id) / "meta.json"
            self._meta[task_id] = json.loads(path.read_text())
        return self._meta[task_id]

    def prepare(self, task_ids: list[str] | None = None, split: str | None = None,
                workers: int = 1) -> list[Path]:
        """Generate the games of `task_ids` (or of a whole split) ahead of time, in `workers`
        processes; cached games are skipped. Returns their folders."""
        if task_ids is None:
            task_ids = self.tasks(split or "train")
        todo = [t for t in task_ids if not (self._cached_dir(t) / "meta.json").is_file()]
        if todo and workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")
            options = self.options.model_dump()
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
                list(pool.map(_generate_in_cache, [options] * len(todo), todo))
        return [self.game_dir(t) for t in task_ids]

    def _cached_dir(self, task_id: str) -> Path:
        split, index = self._parse_task(task_id)
        return self.cache_dir() / f"{split}-{index:05d}"

    # -- episode ----------------------------------------------------------------------------
    def _request_infos(self) -> Any:
        tw = _textworld()
        return tw.EnvInfos(
            feedback=True, description=True, inventory=True, score=True, max_score=True,
            won=True, lost=True, moves=True, objective=True, admissible_commands=True,
            policy_commands=True, extras=["walkthrough"],
        )

    def _load(self, task_id: str) -> None:
        """Start the TextWorld environment of a task's game (kept while the task stays)."""
        if self._loaded == task_id and self._tw is not None:
            return
        folder = self.game_dir(task_id)
        tw = _textworld()
        self._close_game()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env = tw.start(str(folder / "game.z8"), request_infos=self._request_infos())
        env.seed(INTERPRETER_SEED)
        self._tw = env
        self._loaded = task_id

    def _close_game(self) -> None:
        if self._tw is not None:
            try:
                self._tw.close()
            except Exception:
                pass
        self._tw = None
        self._loaded = None

    def close(self) -> None:
        self._close_game()

    def task_description(self, state: Any) -> str:
        return (state.get("objective") or "").strip()

    def _observation(self, text: str, state: Any) -> Observation:
        admissible = [] if self._over else sorted(set(state.get("admissible_commands") or []))
        info = {
            "score": state.get("score"),
            "max_score": state.get("max_score"),
            "moves": state.get("moves"),
            "won": bool(state.get("won")),
            "lost": bool(state.get("lost")),
            "description": state.get("description"),
            "inventory": state.get("inventory"),
        }
        return Observation(text=text, task=self.task_description(state), admissible=admissible,
                           info=info)

    def _reset(self, task_id: str) -> Observation:
        self._load(task_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = self._tw.reset()
        self._score = int(state.get("score") or 0)
        self._over = False
        self._won = False
        obs = self._observation(clean_intro(state.get("feedback") or "", state.get("objective")),
                                state)
        self._admissible = list(obs.admissible or [])
        return obs

    def _step(self, action: str) -> Step:
        command = " ".join(str(action).split())
        last = self._last_obs
        assert last is not None
        if self._over:
            obs = Observation(
                text="The game is over; no more commands are accepted.", task=last.task,
                admissible=[], info=dict(last.info),
            )
            return Step(obs, reward=0.0, done=True, success=self._won, valid=False)
        verb = _blocked_verb(command)
        if verb is not None:
            text = (f"The command {verb!r} is a game-system command and is disabled here; "
                    "use game commands such as the admissible ones.")
            obs = Observation(text=text, task=last.task, admissible=list(last.admissible or []),
                              info=dict(last.info))
            return Step(obs, reward=0.0, done=False, success=False, valid=False)

        valid = _norm(command) in {_norm(a) for a in self._admissible}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state, _, _ = self._tw.step(command)
        won, lost = bool(state.get("won")), bool(state.get("lost"))
        score = int(state.get("score") or 0)
        reward = float(score - self._score)
        self._score = score
        self._over = won or lost
        self._won = won
        obs = self._observation(clean_feedback(state.get("feedback") or ""), state)
        self._admissible = list(obs.admissible or [])
        return Step(obs, reward=reward, done=won or lost, success=won, valid=valid)

    # -- expert -----------------------------------------------------------------------------
    def expert(self, task_id: str) -> list[str] | None:
        """A winning command list, checked by playing it in a separate game (the current
        episode is untouched): the game's walkthrough (recorded by TextWorld's generator)
        without the commands the game does not admit at that point (tw-cooking walkthroughs
        re-open doors that are already open); else the walkthrough as is; else the winning
        policy TextWorld's state tracking computes at the start; None when none wins."""
        if task_id not in self._experts:
            walkthrough = list(self.meta(task_id).get("walkthrough") or [])
            other = TextWorldEnv(self.options.model_copy(update={"snapshot": "replay"}))
            try:
                self._experts[task_id] = other._winning_plan(task_id, walkthrough)
            finally:
                other.close()
        plan = self._experts[task_id]
        return list(plan) if plan is not None else None

    def _winning_plan(self, task_id: str, walkthrough: list[str]) -> list[str] | None:
        obs = self.reset(task_id)
        policy = list(self._tw.state.get("policy_commands") or [])
        candidates: list[tuple[list[str], bool]] = [(walkthrough, True), (walkthrough, False),
                                                    (policy, False)]
        for commands, skip_inadmissible in candidates:
            if not commands:
                continue
            obs = self.reset(task_id)
            played: list[str] = []
            won = False
            for command in commands:
                admissible = {_norm(a) for a in obs.admissible or []}
                if skip_inadmissible and _norm(command) not in admissible:
                    continue
                result = self.step(command)
                played.append(command)
                obs = result.observation
                if result.done:
                    won = result.success
                    break
            if won:
                return played
        return None

    # -- snapshots --------------------------------------------------------------------------
    def _bookkeeping(self, snap: Snapshot) -> dict[str, Any]:
        return {
            "task_id": self._task_id, "actions": list(self._actions), "obs_hash": snap.obs_hash,
            "last_obs": copy.deepcopy(self._last_obs), "score": self._score, "over": self._over,
            "won": self._won, "admissible": list(self._admissible),
        }

    def _layers(self) -> dict[str, Any] | None:
        """The wrapper layers of the running environment by class name, when it is the
        chain TextWorld 1.7 builds for its Inform 7 games (else None)."""
        from textworld.envs.wrappers.tw_inform7 import (
            GameData, Inform7Data, StateTracking, TWInform7)
        from textworld.envs.zmachine.jericho import JerichoEnv

        expected = [TWInform7, StateTracking, Inform7Data, GameData, JerichoEnv]
        layers: list[Any] = []
        env = self._tw
        while env is not None and len(layers) < len(expected):
            layers.append(env)
            env = env.__dict__.get("_wrapped_env")
        if env is not None or [type(x) for x in layers] != expected:
            return None
        names = ["tw", "tracking", "inform7", "data", "jericho"]
        return dict(zip(names, layers))

    def snapshot(self) -> Snapshot:
        snap = super().snapshot()
        mode = self.options.snapshot
        if mode == "replay" or self._tw is None:
            return snap
        native = self._bookkeeping(snap)
        layers = self._layers() if mode == "state" else None
        if layers is not None:
            tr, i7, je = layers["tracking"], layers["inform7"], layers["jericho"]
            gs = _textworld().core.GameState
            native["mode"] = "state"
            native["interpreter"] = je._jericho.get_state()
            native["state"] = gs(je.state)
            native["prev_state"] = gs(i7._prev_state) if i7._prev_state is not None else None
            native["tracked_infos"] = list(i7._tracked_infos)
            native["tracking"] = {
                "_last_action": tr._last_action,
                "_moves": tr._moves,
                "_previous_winning_policy": _list_or_none(tr._previous_winning_policy),
                "_current_winning_policy": _list_or_none(tr._current_winning_policy),
                "_game_progression": (tr._game_progression.copy()
                                      if tr._game_progression is not None else None),
            }
        else:
            native["mode"] = "copy"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                native["env"] = self._tw.copy()
        snap.native = native
        return snap

    def restore(self, snap: Snapshot) -> Observation:
        native = snap.native
        if not native:
            return super().restore(snap)
        if obs_hash(native["last_obs"].text) != native["obs_hash"]:
            raise RuntimeError(f"{self.name}: corrupt native snapshot of task {snap.task_id!r}")
        if native["mode"] == "copy":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                env = native["env"].copy()
            self._close_game()
            self._tw = env
            self._loaded = native["task_id"]
        else:
            self._restore_state(native)
        self._task_id = native["task_id"]
        self._actions = list(native["actions"])
        self._last_obs = copy.deepcopy(native["last_obs"])
        self._score = native["score"]
        self._over = native["over"]
        self._won = native["won"]
        self._admissible = list(native["admissible"])
        return copy.deepcopy(self._last_obs)

    def _restore_state(self, native: dict[str, Any]) -> None:
        task_id = native["task_id"]
        if self._loaded != task_id or self._tw is None or self._layers() is None:
            self._load(task_id)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._tw.reset()  # a running interpreter whose memory is then replaced
        layers = self._layers()
        if layers is None:
            raise RuntimeError("textworld: the running environment is not the one a state "
                               "snapshot was taken from; use snapshot: copy or replay")
        tr, i7, je = layers["tracking"], layers["inform7"], layers["jericho"]
        gs = _textworld().core.GameState
        je._jericho.set_state(native["interpreter"])
        je._reset = True
        t = native["tracking"]
        tr._last_action = t["_last_action"]
        tr._moves = t["_moves"]
        tr._previous_winning_policy = _list_or_none(t["_previous_winning_policy"])
        tr._current_winning_policy = _list_or_none(t["_current_winning_policy"])
        progression = t["_game_progression"]
        tr._game_progression = progression.copy() if progression is not None else None
        if tr._game_progression is not None:
            tr._game_progression.game = tr._game  # one Game per loaded environment
        state = gs(native["state"])
        state["_game_progression"] = tr._game_progression
        for layer in (layers["tracking"], layers["inform7"], layers["data"], je):
            if "state" in layer.__dict__:
                layer.__dict__["state"] = state
        i7._tracked_infos = list(native["tracked_infos"])
        prev = native["prev_state"]
        i7._prev_state = gs(prev) if prev is not None else None


def _list_or_none(x: Any) -> list | None:
    return list(x) if x is not None else None
