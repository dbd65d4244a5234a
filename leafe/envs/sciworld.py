"""ScienceWorld over the real `scienceworld` package (its simulator jar, through py4j).

Tasks are the package's 30 task types and their variations; a task id is
`<taskName>-<variation>` (e.g. `boil-3`). The splits `train`, `dev` and `test` are the
package's own variation splits (`getVariationsTrain/Dev/Test`): for scienceworld 1.2.3 they are
contiguous index ranges, tabulated below (`SPLITS_1_2_3`, checked against the simulator by the
tests), so listing tasks never starts Java; another installed version is asked once per process.

The simulator runs in one JVM per environment instance, started on the first reset (about 1 s)
and reused across resets. The adapter launches it itself, with the package's jar and py4j like
the package's own `ScienceWorldEnv`, so that it controls the process: the JVM is stopped by
`close()`, by garbage collection and at interpreter exit (`weakref.finalize`), and it dies with
its parent process when that is killed (py4j's `--die-on-broken-pipe`: the JVM exits when its
stdin reaches end of file, i.e. when no process holds the pipe any more; a child forked from the
parent closes its copy of the pipe, see `_disown_simulators_after_fork`). Steps call the simulator
directly: the package's `step` also computes every valid action-object combination (about 0.1 s a
step), which this adapter does not need. The step semantics follow the package's `step`: the score
is `round(100 * getScore())` (in `info["score"]`; some tasks start above 0), the reward is the
score's change since the previous observation (so the rewards of an episode add up to its final
score minus its start score, in points), and the episode ends when the simulator reports
completion, the score turns negative (a failed task), or the number of moves exceeds
`env_step_limit`. Success means completed with score 100.

Ambiguous commands: when several objects match, ScienceWorld answers "Ambiguous request: Please
enter the number for the action you intended (or blank to cancel):" followed by numbered options.
That text is the observation (`info["ambiguous"]` is True) and the next action is the option's
number (e.g. `0`); any other reply cancels the request with ScienceWorld's "Unknown action." The
package's gold paths contain these numbers, so the expert replays them as they are.

Determinism: the simulator seeds its random generator with the variation on every load, but the
order in which it visits objects (hash sets keyed by Java identity hash codes) decides gold paths
and parts of the simulation itself (which bee moves, rounding of temperatures), and identity hash
codes depend on everything the JVM did before. With a default JVM, replaying the same actions
gave different observations for 15 of the 30 tasks. The default `jvm_options` make identity hash
codes constant (`-XX:hashCode=2`): an episode then depends only on (task, variation,
simplifications, actions), in any JVM, and restore by reset + replay (the `Env` default, with its
observation-hash check) reproduces it. ScienceWorld has no native save/load.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import subprocess
import time
import weakref
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from leafe.envs.base import Env, EnvOptions, Observation, Snapshot, Step, obs_hash
from leafe.errors import UserError

logger = logging.getLogger(__name__)

#: scienceworld 1.2.3's variation splits: task name -> (end of train, end of dev, number of
#: variations). Train is [0, a), dev [a, b), test [b, n), each in increasing order.
SPLITS_1_2_3: dict[str, tuple[int, int, int]] = {
    "boil": (14, 21, 30),
    "change-the-state-of-matter-of": (14, 21, 30),
    "chemistry-mix": (16, 24, 32),
    "chemistry-mix-paint-secondary-color": (18, 27, 36),
    "chemistry-mix-paint-tertiary-color": (18, 27, 36),
    "find-animal": (150, 225, 300),
    "find-living-thing": (150, 225, 300),
    "find-non-living-thing": (150, 225, 300),
    "find-plant": (150, 225, 300),
    "freeze": (14, 21, 30),
    "grow-fruit": (62, 93, 126),
    "grow-plant": (62, 93, 126),
    "identify-life-stages-1": (6, 9, 14),
    "identify-life-stages-2": (4, 6, 10),
    "inclined-plane-determine-angle": (84, 126, 168),
    "inclined-plane-friction-named-surfaces": (692, 1038, 1386),
    "inclined-plane-friction-unnamed-surfaces": (80, 120, 162),
    "lifespan-longest-lived": (62, 93, 125),
    "lifespan-longest-lived-then-shortest-lived": (62, 93, 125),
    "lifespan-shortest-lived": (62, 93, 125),
    "measure-melting-point-known-substance": (218, 327, 436),
    "measure-melting-point-unknown-substance": (150, 225, 300),
    "melt": (14, 21, 30),
    "mendelian-genetics-known-plant": (60, 90, 120),
    "mendelian-genetics-unknown-plant": (240, 360, 480),
    "power-component": (10, 15, 20),
    "power-component-renewable-vs-nonrenewable-energy": (10, 15, 20),
    "test-conductivity": (450, 675, 900),
    "test-conductivity-of-unknown-substances": (300, 450, 600),
    "use-thermometer": (270, 405, 540),
}
TABLE_VERSION = "1.2.3"
TASK_NAMES = tuple(sorted(SPLITS_1_2_3))
SPLITS = ("train", "dev", "test")

#: The simplifications ScienceWorld knows; "easy" means all of them (except noElectricalAction
#: for the electrical tasks, which need it).
SIMPLIFICATIONS = (
    "easy",
    "teleportAction",
    "selfWateringFlowerPots",
    "openContainers",
    "openDoors",
    "noElectricalAction",
)

#: Feedback of commands the parser rejected (unknown, or not a number after an ambiguity prompt).
INVALID_FEEDBACK = ("No known action matches that input.", "Unknown action.")
AMBIGUOUS_FEEDBACK = "Ambiguous request:"

#: The serial collector keeps a JVM at about 300 MB (the default collector's heap grows to
#: about 1.1 GB in a long episode) at the same speed; constant identity hash codes make the
#: simulator deterministic (see the module docstring). Limiting the JIT to C1 would save 0.4 s
#: of CPU per start but makes steps 2-3 times slower.
DEFAULT_JVM_OPTIONS = (
    "-XX:+UseSerialGC",
    "-XX:+UnlockExperimentalVMOptions",
    "-XX:hashCode=2",
)

#: Gold paths cut at their first success, per (task, variation, simplifications, JVM options).
_EXPERTS: dict[tuple[Any, ...], tuple[str, ...] | None] = {}
#: Variation splits asked from the simulator, for a package version other than TABLE_VERSION.
_QUERIED_SPLITS: dict[str, dict[str, dict[str, list[int]]]] = {}


def _is_electrical(task_name: str) -> bool:
    """Tasks that need `connect`/`disconnect` (the package's own test)."""
    return "power-component" in task_name or "conductivity" in task_name


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("scienceworld")
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the JVM ---------------------------------------------------------------------------------------
#: Simulators started by this process and not stopped yet (see `_disown_simulators_after_fork`).
_LIVE: weakref.WeakSet[Simulator] = weakref.WeakSet()


def _disown_simulators_after_fork() -> None:
    """In a child made by os.fork: close the copies of our JVMs' stdin pipes, so that the JVMs
    still see end of file (and exit) when their owner dies, even while this child lives on.
    Their owner stays the parent: the child never stops them or talks to them."""
    for sim in list(_LIVE):
        if sim.owner != os.getpid():
            with contextlib.suppress(Exception):
                sim.proc.stdin.close()


os.register_at_fork(after_in_child=_disown_simulators_after_fork)


class Simulator:
    """One ScienceWorld JVM (a py4j gateway serving the package's `PythonInterface`)."""

    def __init__(self, jvm_options: list[str] | tuple[str, ...] = DEFAULT_JVM_OPTIONS):
        try:
            from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
            from scienceworld.constants import BASEPATH, JAR_PATH
        except ModuleNotFoundError as e:
            raise UserError(
                f"sciworld: the Python package {e.name!r} is missing; install ScienceWorld with "
                "`pip install scienceworld==1.2.3` (it brings py4j and the simulator jar)"
            ) from None
        t0 = time.perf_counter()
        self.owner = os.getpid()
        self.stopped = False
        self.gateway: Any = None
        try:
            # die_on_exit: the JVM exits when its stdin reaches end of file (owner gone).
            # java_path=None: $JAVA_HOME/bin/java if set, else `java` on the PATH.
            port, self.proc = launch_gateway(
                classpath=JAR_PATH,
                javaopts=list(jvm_options),
                die_on_exit=True,
                cwd=BASEPATH,
                return_proc=True,
                java_path=None,
            )
        except FileNotFoundError:
            raise UserError(
                "sciworld: no `java` found (ScienceWorld's simulator needs Java 8 or newer; tested with OpenJDK 17); "
                "install one (Debian/Ubuntu: `apt-get install openjdk-17-jre-headless`) or set "
                "JAVA_HOME"
            ) from None
        except ValueError:  # the JVM exited before printing its port
            raise UserError(
                f"sciworld: the ScienceWorld JVM did not start with jvm_options={list(jvm_options)}; "
                f"run `java {' '.join(jvm_options)} -version` to see why, and change the "
                "environment option `jvm_options`"
            ) from None
        try:
            self.gateway = JavaGateway(
                gateway_parameters=GatewayParameters(auto_field=True, port=port),
                java_process=self.proc,
            )
            self.server: Any = self.gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - t0
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self.stopped and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the JVM and reap it (idempotent; does nothing in a forked child)."""
        if self.stopped or os.getpid() != self.owner:
            return
        self.stopped = True
        _LIVE.discard(self)
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                self.gateway.close()
        with contextlib.suppress(Exception):
            self.proc.stdin.close()  # end of file: the gateway server exits
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def query_splits(server: Any) -> dict[str, dict[str, list[int]]]:
    """Every task's variation splits, asked from a simulator (`Simulator.server`); this loads
    tasks, so any episode on that simulator is lost."""
    out = {}
    for name in server.getTaskNames():
        server.load(name, 0, "", False)
        out[str(name)] = {
            "train": [int(v) for v in server.getVariationsTrain()],
            "dev": [int(v) for v in server.getVariationsDev()],
            "test": [int(v) for v in server.getVariationsTest()],
        }
    return out


def _query_splits(jvm_options: list[str]) -> dict[str, dict[str, list[int]]]:
    sim = Simulator(jvm_options)  # a temporary one: no episode is disturbed
    try:
        return query_splits(sim.server)
    finally:
        sim.stop()


def _table_splits() -> dict[str, dict[str, list[int]]]:
    return {
        name: {"train": list(range(a)), "dev": list(range(a, b)), "test": list(range(b, n))}
        for name, (a, b, n) in SPLITS_1_2_3.items()
    }


# -- the environment -------------------------------------------------------------------------------
class ScienceWorldEnv(Env):
    """ScienceWorld's 30 tasks; actions are ScienceWorld commands (`open door to kitchen`)."""

    name = "sciworld"

    class Options(EnvOptions):
        """Options of the sciworld environment.

        Task ids are `<taskName>-<variation>`. A split lists, for each selected task (by name),
        its variations of that split in the package's order (the first
        `max_variations_per_task`), interleaved: first every task's first variation, then every
        task's second one, and so on, so that the first N ids of a split (`train_tasks`,
        `test_tasks`) cover the tasks evenly.
        """

        model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

        task_names: list[str] | None = None
        """ScienceWorld task names to include (e.g. [boil, find-animal]); null: all 30."""
        simplifications: str = "easy"
        """ScienceWorld's simplification string: comma-separated, no spaces, from
        teleportAction, selfWateringFlowerPots, openContainers, openDoors, noElectricalAction,
        or `easy` (all of them; ScienceWorld keeps electrical actions for the electrical tasks);
        empty: none."""
        max_variations_per_task: int | None = Field(default=None, ge=1)
        """Keep only the first N variations of each task in every split (the package's order);
        null: all (official splits: 3592 train, 1796 dev, 1819 test)."""
        env_step_limit: int = Field(default=100, ge=1)
        """ScienceWorld's own move limit (the package's `envStepLimit`, default 100): the
        episode ends once the simulator counts more moves (commands the parser rejects do not
        count). The agent loop's `max_steps` applies as well."""
        include_action_templates: bool = False
        """Observation.admissible: the action templates (`get_possible_actions`, e.g.
        `open OBJ`, `move OBJ to OBJ`) when true; None when false (the default), because the
        list of valid concrete actions has hundreds to thousands of entries per step."""
        jvm_options: list[str] = Field(default_factory=lambda: list(DEFAULT_JVM_OPTIONS))
        """Options of the simulator's `java` command. The default (serial collector, constant
        identity hash codes) keeps a JVM at about 300 MB and makes the simulator deterministic
        under replay; without `-XX:hashCode=2` an episode of about half the tasks depends on
        what the JVM ran before (then restore by replay fails)."""

        @field_validator("task_names")
        @classmethod
        def _known_tasks(cls, v: list[str] | None) -> list[str] | None:
            if v is None:
                return v
            if not v:
                raise ValueError("give at least one task name, or null for all 30")
            unknown = [n for n in v if n not in SPLITS_1_2_3]
            if unknown:
                raise ValueError(
                    f"unknown ScienceWorld task(s) {unknown}; valid names: {', '.join(TASK_NAMES)}"
                )
            return sorted(set(v))

        @field_validator("simplifications")
        @classmethod
        def _known_simplifications(cls, v: str) -> str:
            parts = [p for p in v.split(",") if p]
            unknown = [p for p in parts if p not in SIMPLIFICATIONS]
            if unknown or (parts and len(parts) != len(v.split(","))):
                raise ValueError(
                    f"invalid simplification string {v!r}: give comma-separated names without "
                    f"spaces from {', '.join(SIMPLIFICATIONS)} (or an empty string)"
                )
            return v

        @model_validator(mode="after")
        def _electrical_tasks_need_electrical_actions(self) -> ScienceWorldEnv.Options:
            if "noElectricalAction" in self.simplifications.split(","):
                names = self.task_names or list(TASK_NAMES)
                electrical = [n for n in names if _is_electrical(n)]
                if electrical:
                    raise ValueError(
                        f"simplification noElectricalAction removes the actions that the "
                        f"electrical task(s) {electrical} need; drop it or select other "
                        "task_names"
                    )
            return self

    options: Options

    def __init__(self, options: Options | None = None):
        super().__init__(options)
        self._sim: Simulator | None = None
        self._finalizer: weakref.finalize | None = None
        self._last_score = 0
        self._task_text = ""
        self._templates: list[str] | None = None
        self._current: tuple[str, int] | None = None

    # -- JVM lifecycle ------------------------------------------------------------------------------
    def _simulator(self) -> Simulator:
        sim = self._sim
        if sim is not None and sim.owner == os.getpid() and sim.alive():
            return sim
        if sim is not None:  # dead, or inherited through fork (then stop() does nothing)
            sim.stop()
            if self._finalizer is not None:
                self._finalizer.detach()
        self._sim = sim = Simulator(self.options.jvm_options)
        self._finalizer = weakref.finalize(self, sim.stop)
        return sim

    @property
    def jvm_pid(self) -> int | None:
        """Process id of this instance's JVM, None when none is running."""
        return self._sim.pid if self._sim is not None and self._sim.alive() else None

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # Simulator.stop, once
        self._sim = None
        self._finalizer = None

    # -- tasks --------------------------------------------------------------------------------------
    def splits(self) -> list[str]:
        return list(SPLITS)

    def _splits_table(self) -> dict[str, dict[str, list[int]]]:
        version = _installed_version()
        if version is None or version == TABLE_VERSION:
            return _TABLE
        if version not in _QUERIED_SPLITS:
            _QUERIED_SPLITS[version] = _query_splits(self.options.jvm_options)
        return _QUERIED_SPLITS[version]

    def tasks(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        table = self._splits_table()
        names = self.options.task_names or sorted(table)
        limit = self.options.max_variations_per_task
        per_task = [(n, table[n][split][:limit]) for n in names if n in table]
        ids = []
        for rank in range(max((len(v) for _, v in per_task), default=0)):
            ids += [f"{n}-{v[rank]}" for n, v in per_task if rank < len(v)]
        return ids

    def parse_task(self, task_id: str) -> tuple[str, int]:
        """(task name, variation) of a task id; any variation of the 30 tasks is accepted."""
        name, _, var = str(task_id).rpartition("-")
        table = self._splits_table()
        if name in table and var.isdigit() and str(int(var)) == var:
            variations = table[name]
            total = len(variations["train"]) + len(variations["dev"]) + len(variations["test"])
            if int(var) < total:
                return name, int(var)
        raise ValueError(
            f"unknown task id {task_id!r}; expected '<taskName>-<variation>' (e.g. 'boil-3') "
            f"with a ScienceWorld task name ({', '.join(sorted(table))}) and a variation below "
            "its number of variations"
        )

    # -- episode ------------------------------------------------------------------------------------
    def _start(self, name: str, variation: int) -> str:
        """Start the task afresh; the first observation, as the package's reset gives it (the
        output of `look around`).

        The simulator's `reset()` is its `load()` with the last arguments and its gold-path flag,
        which stays on after any load that generated a gold path (then every reset generates
        one again, seconds each); a plain `load()` without gold path is the same fresh start."""
        s = self._simulator().server
        s.load(name, variation, self.options.simplifications, False)
        self._last_score = 0
        text = str(s.step("look around"))
        self._last_score = int(round(100 * s.getScore()))
        self._current = (name, variation)
        return text

    def _observation(self, text: str, **info: Any) -> Observation:
        name, variation = self._current or ("", -1)
        return Observation(
            text=text,
            task=self._task_text,
            admissible=list(self._templates) if self._templates is not None else None,
            info={"task_name": name, "variation": variation, **info},
        )

    def _reset(self, task_id: str) -> Observation:
        name, variation = self.parse_task(task_id)
        if _is_electrical(name) and "noElectricalAction" in self.options.simplifications.split(","):
            raise ValueError(
                f"task {task_id!r} needs electrical actions, which the simplification "
                "noElectricalAction removes"
            )
        text = self._start(name, variation)
        s = self._sim.server  # type: ignore[union-attr]
        self._task_text = str(s.getTaskDescription())
        self._templates = (
            [str(a) for a in s.getPossibleActions()] if self.options.include_action_templates else None
        )
        return self._observation(
            text, score=self._last_score, moves=int(s.getNumMoves()), ambiguous=False,
            completed=bool(s.getCompleted()),
        )

    def _step(self, action: str) -> Step:
        sim = self._sim
        if sim is None or self._current is None or sim.owner != os.getpid() or not sim.alive():
            raise RuntimeError(
                "sciworld: no running simulator for this episode (closed, died, or inherited "
                "through fork); call reset() first"
            )
        s = sim.server
        text = str(s.step(str(action).strip()))
        score = int(round(100 * s.getScore()))
        completed = bool(s.getCompleted())
        moves = int(s.getNumMoves())
        reward = float(score - self._last_score)
        self._last_score = score
        success = completed and score >= 100
        done = completed or score < 0 or moves > self.options.env_step_limit
        obs = self._observation(
            text, score=score, moves=moves, ambiguous=text.startswith(AMBIGUOUS_FEEDBACK),
            completed=completed,
        )
        return Step(obs, reward=reward, done=done, success=success,
                    valid=not text.startswith(INVALID_FEEDBACK))

    # -- expert -------------------------------------------------------------------------------------
    def _gold(self, name: str, variation: int) -> list[str]:
        s = self._simulator().server
        s.load(name, variation, self.options.simplifications, True)
        return [str(a) for a in s.getGoldActionSequence()]

    def gold_path(self, task_id: str) -> list[str]:
        """The package's gold action sequence (`get_gold_action_sequence`), uncut: it often goes
        on for a few actions after the task is complete. Leaves the current episode as it was."""
        name, variation = self.parse_task(task_id)
        with self._keeping_episode():
            return self._gold(name, variation)

    def expert(self, task_id: str) -> list[str] | None:
        """The gold path cut right after its first success, played from a reset (numeric
        answers to ambiguity prompts included); None when it does not succeed. It is checked
        without `env_step_limit`: a few tasks' paths (the mendelian-genetics ones, 120-135
        actions; inclined-plane-friction-unnamed-surfaces, up to about 190) need more moves than
        the default limit of 100. Cached per process; leaves the current episode as it was."""
        name, variation = self.parse_task(task_id)
        key = (name, variation, self.options.simplifications, tuple(self.options.jvm_options))
        if key not in _EXPERTS:
            plan: tuple[str, ...] | None = None
            with self._keeping_episode():
                gold = self._gold(name, variation)
                if gold and not gold[0].startswith("ERROR"):
                    self._start(name, variation)
                    for i, action in enumerate(gold):
                        result = self._step(action)
                        if result.success:
                            plan = tuple(gold[: i + 1])
                            break
                        info = result.observation.info
                        if info["completed"] or info["score"] < 0:  # failed
                            break
            if plan is None:
                logger.warning("sciworld: the gold path of %s does not solve it", task_id)
            _EXPERTS[key] = plan
        plan = _EXPERTS[key]
        return list(plan) if plan is not None else None

    @contextlib.contextmanager
    def _keeping_episode(self) -> Any:
        """Run something on the simulator, then bring the current episode back by replay."""
        task_id, actions, last = self._task_id, list(self._actions), self._last_obs
        try:
            yield
        finally:
            if task_id is not None and last is not None:
                self.restore(Snapshot(task_id, actions, obs_hash(last.text)))


_TABLE = _table_splits()
