"""Procedural ALFWorld games: PDDL problems for ALFWorld's own ALFRED domain and grammar.

A problem is written the way ALFRED's `initial_state.pddl` files are: object, receptacle and
location ids in ALFRED's mangled form (`Cabinet|+01.20|+00.50|-02.10` becomes
`Cabinet_bar__plus_01_dot_20_bar__plus_00_dot_50_bar__minus_02_dot_10`, which ALFWorld's
demangler shows as `cabinet 1`; a sink basin is `Sink|...|SinkBasin`, shown as `sinkbasin 1`),
one location per receptacle plus the agent's start (a location without receptacle, so the
first observation is "You are in the middle of a room. Looking quickly around you, you see
..."), the facts the domain's actions read (`receptacleType`, `receptacleAtLocation`,
`openable`, `objectType`, `inReceptacle`, `objectAtLocation`, `pickupable`, `canContain`,
`cleanable`/`heatable`/`coolable`/`sliceable`/`toggleable`, `isReceptacleObject`,
`atLocation`), and the goal formula of the task type from ALFWorld's goal library
(`alfworld.gen.goal_library`), whose templates also give the goal text put into the grammar
("put some apple in fridge").

What may go where comes from ALFWorld's ALFRED constants (`VAL_RECEPTACLE_OBJECTS` for
`canContain`, `VAL_ACTION_OBJECTS` for object properties, `OPENABLE_CLASS_LIST`,
`GOALS_VALID` for the room kinds a task type happens in); the room kinds below list which
receptacles and objects each kind has. A problem is never solved at the start: no instance of
the goal object starts in a receptacle of the goal's type. Desk lamps (the light of
`look_at_obj_in_light`) stand on a desk, side table or dresser: ALFRED's floor lamps are in no
receptacle, which makes their tasks unsolvable (ALFWorld marks those games unsolvable), so
they are not generated.

Everything is drawn from a `random.Random` seeded by the caller; `generate` retries with the
next attempt seed until the bundled fast-downward planner finds a plan and the plan, played
through the text engine, wins exactly at its last command.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

#: ALFWorld's six text task types, in ALFWorld's order (`TASK_TYPES` 1..6 of alfred_tw_env).
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)

#: Bump when a change alters the generated games (it is part of the cache key).
GENERATOR_VERSION = "1"

#: Attempts (different seeds) before a task is declared impossible to generate.
MAX_ATTEMPTS = 30

#: State-changing task types: (the receptacle type that does it, the property the object needs
#: in `VAL_ACTION_OBJECTS`).
STATE_CHANGE = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable"),
}

LAMP = "DeskLamp"
#: Receptacle types a desk lamp stands on.
LAMP_HOLDERS = ("Desk", "SideTable", "Dresser")


@dataclass(frozen=True)
class RoomKind:
    """Receptacles and objects of one kind of ALFRED room."""

    base: tuple[str, ...]
    """Receptacle types every room of this kind has (one of each)."""
    most: dict[str, int]
    """Receptacle type -> most instances; the types a room of this kind may have."""
    objects: tuple[str, ...]
    """Object types found in rooms of this kind."""


ROOMS: dict[str, RoomKind] = {
    "Kitchen": RoomKind(
        base=("CounterTop", "Cabinet", "Drawer", "Fridge", "Microwave", "SinkBasin", "StoveBurner"),
        most={"CounterTop": 3, "Cabinet": 12, "Drawer": 8, "Fridge": 1, "Microwave": 1,
              "SinkBasin": 1, "StoveBurner": 4, "Shelf": 3, "DiningTable": 1, "GarbageCan": 1,
              "CoffeeMachine": 1, "Toaster": 1},
        objects=("Apple", "Bread", "Bowl", "ButterKnife", "Cup", "DishSponge", "Egg", "Fork",
                 "Kettle", "Knife", "Ladle", "Lettuce", "Mug", "Pan", "PepperShaker", "Plate",
                 "Pot", "Potato", "SaltShaker", "SoapBottle", "Spatula", "Spoon", "Tomato",
                 "WineBottle"),
    ),
    "LivingRoom": RoomKind(
        base=("Sofa", "CoffeeTable", "SideTable"),
        most={"Sofa": 1, "CoffeeTable": 1, "SideTable": 3, "ArmChair": 2, "Shelf": 6,
              "Drawer": 6, "Cabinet": 6, "Dresser": 1, "TVStand": 1, "GarbageCan": 1,
              "Safe": 1, "DiningTable": 1, "Ottoman": 1},
        objects=("Book", "Bowl", "Box", "Candle", "CellPhone", "CreditCard", "KeyChain",
                 "Laptop", "Newspaper", "Pillow", "Plate", "RemoteControl", "Statue",
                 "TissueBox", "Vase", "Watch", "WateringCan"),
    ),
    "Bedroom": RoomKind(
        base=("Bed", "Desk", "Drawer"),
        most={"Bed": 1, "Desk": 2, "Drawer": 8, "Dresser": 1, "Shelf": 6, "SideTable": 2,
              "GarbageCan": 1, "Safe": 1, "ArmChair": 1, "LaundryHamper": 1},
        objects=("AlarmClock", "BaseballBat", "BasketBall", "Book", "Bowl", "CD", "CellPhone",
                 "Cloth", "CreditCard", "KeyChain", "Laptop", "Mug", "Pen", "Pencil", "Pillow",
                 "TennisRacket", "Vase", "Watch"),
    ),
    "Bathroom": RoomKind(
        base=("Toilet", "SinkBasin", "CounterTop"),
        most={"Toilet": 1, "SinkBasin": 2, "CounterTop": 1, "Cabinet": 6, "Drawer": 6,
              "TowelHolder": 1, "HandTowelHolder": 1, "ToiletPaperHanger": 1, "GarbageCan": 1,
              "Shelf": 3, "BathtubBasin": 1, "Cart": 1},
        objects=("Candle", "Cloth", "DishSponge", "HandTowel", "Plunger", "SoapBar",
                 "SoapBottle", "SprayBottle", "TissueBox", "ToiletPaper", "Towel"),
    ),
}


@dataclass(frozen=True)
class Settings:
    """Generator settings (the difficulty knobs)."""

    receptacles: int = 12
    """Receptacles per room (at least the ones the room kind and the task need)."""
    target_objects: int = 2
    """Most instances of the goal's object type (drawn from 1, or 2 for pick-two, to this)."""
    distractors: int = 8
    """Objects of other types scattered in the receptacles."""

    def key(self) -> dict[str, Any]:
        return {"generator": GENERATOR_VERSION, **asdict(self)}


@dataclass
class Problem:
    """One generated problem."""

    task_type: str
    room: str
    obj: str
    recep: str
    toggle: str
    goal: str
    """The goal text, e.g. "put some apple in fridge"."""
    pddl: str
    """The PDDL problem."""
    receptacles: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)

    def traj_data(self, **extra: Any) -> dict[str, Any]:
        """A `traj_data.json` as ALFWorld's tools read it (task type and goal parameters)."""
        return {
            "task_type": self.task_type,
            "pddl_params": {"object_target": self.obj, "parent_target": self.recep,
                            "toggle_target": self.toggle, "mrecep_target": "",
                            "object_sliced": False},
            "leafe": {"room": self.room, "goal": self.goal, **extra},
        }


def derive_seed(*parts: Any) -> int:
    key = json.dumps(["leafe-alfworld", *parts], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def mangle(name: str) -> str:
    """ALFRED's id mangling (`PlannedGameState.fix_pddl_str_chars` without the '#')."""
    for char, word in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"),
                       (",", "_comma_")):
        name = name.replace(char, word)
    return name


def _alfred() -> tuple[Any, Any]:
    import alfworld.gen.constants as constants
    import alfworld.gen.goal_library as goal_library

    return constants, goal_library


class _Ids:
    """Unique ALFRED-style ids: `Type|x|y|z` for things, `loc|x|z|rotation|horizon` places."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def _unique(self, make: Callable[[], str]) -> str:
        while True:
            name = mangle(make())
            if name not in self.used:
                self.used.add(name)
                return name

    def thing(self, kind: str) -> str:
        r = self.rng

        def make() -> str:
            x, y, z = r.uniform(-5, 5), r.uniform(0, 2), r.uniform(-5, 5)
            coords = f"{x:+06.2f}|{y:+06.2f}|{z:+06.2f}"
            if kind.endswith("Basin"):  # ALFRED: Sink|...|SinkBasin, shown as "sinkbasin"
                return f"{kind[: -len('Basin')]}|{coords}|{kind}"
            return f"{kind}|{coords}"

        return self._unique(make)

    def location(self) -> str:
        r = self.rng
        return self._unique(lambda: f"loc|{r.randint(-25, 25)}|{r.randint(-25, 25)}|"
                                    f"{r.randint(0, 3)}|{r.choice((0, 15, 30, 45, 60))}")


def sample_problem(settings: Settings, task_type: str, rng: random.Random) -> Problem | str:
    """Draw one problem of `task_type`, or say why this draw has none."""
    constants, goal_library = _alfred()
    holds: dict[str, set[str]] = constants.VAL_RECEPTACLE_OBJECTS
    props: dict[str, set[str]] = constants.VAL_ACTION_OBJECTS
    rooms = sorted(r for r in ROOMS if r in constants.GOALS_VALID[task_type])
    room = rng.choice(rooms)
    kind = ROOMS[room]
    room_types = sorted(kind.most)
    appliance, needs = STATE_CHANGE.get(task_type, (None, None))
    look = task_type == "look_at_obj_in_light"

    # The goal: an object type and the receptacle type it must end in (none for look tasks).
    options: list[tuple[str, str]] = []
    for obj in kind.objects:
        if needs and obj not in props[needs]:
            continue
        holders = [r for r in room_types if obj in holds.get(r, ())]
        targets = [""] if look else [r for r in holders if r != appliance]
        options += [(obj, t) for t in targets if any(h != t for h in holders)]
    if not options:
        return f"no goal for {task_type} in a {room}"
    obj, recep = rng.choice(options)
    toggle = LAMP if look else ""

    # Receptacles: the room's base, what the task needs, then random extras.
    counts = Counter(kind.base)
    lamp_holder = rng.choice([h for h in LAMP_HOLDERS if h in kind.most]) if look else ""
    for needed in (recep, appliance, lamp_holder):
        if needed and not counts[needed]:
            counts[needed] = 1
    starts = [r for r in room_types if obj in holds.get(r, ()) and r != recep]
    if not any(counts[r] for r in starts):
        counts[rng.choice(starts)] += 1
    while sum(counts.values()) < settings.receptacles:
        more = [t for t in room_types if counts[t] < kind.most[t]]
        if not more:
            break
        counts[rng.choices(more, weights=[kind.most[t] - counts[t] for t in more])[0]] += 1

    ids = _Ids(rng)
    receptacles: list[tuple[str, str, str]] = []  # (type, id, location)
    for rtype in sorted(counts):
        for _ in range(counts[rtype]):
            receptacles.append((rtype, ids.thing(rtype), ids.location()))
    start = ids.location()

    def place(otype: str, exclude: str = "") -> tuple[str, str, str]:
        spots = [r for r in receptacles if otype in holds.get(r[0], ()) and r[0] != exclude]
        rtype_, rid, loc = rng.choice(spots)
        return otype, rid, loc

    objects: list[tuple[str, str, str]] = []  # (type, receptacle id, location)
    low = 2 if task_type == "pick_two_obj_and_place" else 1
    for _ in range(rng.randint(low, max(low, settings.target_objects))):
        objects.append(place(obj, exclude=recep))
    others = [o for o in kind.objects if o != obj and any(o in holds.get(r[0], ())
                                                           for r in receptacles)]
    for _ in range(settings.distractors if others else 0):
        objects.append(place(rng.choice(others)))
    holders = [r for r in receptacles if r[0] in LAMP_HOLDERS]
    if look or (holders and rng.random() < 0.5):
        pool = [r for r in holders if r[0] == lamp_holder] if look else holders
        _, rid, loc = rng.choice(pool)
        objects.append((LAMP, rid, loc))

    # PDDL: objects, facts and the goal.
    otypes = sorted({o[0] for o in objects})
    rtypes = sorted(counts)
    decl = ["agent1 - agent"]
    decl += [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
    init = [f"(atLocation agent1 {start})"]
    for rtype, rid, loc in receptacles:
        decl += [f"{rid} - receptacle", f"{loc} - location"]
        init += [f"(receptacleType {rid} {rtype}Type)", f"(receptacleAtLocation {rid} {loc})"]
        if rtype in constants.OPENABLE_CLASS_LIST:
            init.append(f"(openable {rid})")
    decl.append(f"{start} - location")
    for otype, rid, loc in objects:
        oid = ids.thing(otype)
        decl.append(f"{oid} - object")
        init += [f"(objectType {oid} {otype}Type)", f"(inReceptacle {oid} {rid})",
                 f"(objectAtLocation {oid} {loc})"]
        if otype != LAMP:
            init.append(f"(pickupable {oid})")
        if otype in constants.MOVABLE_RECEPTACLES:
            init.append(f"(isReceptacleObject {oid})")
        for prop, predicate in (("Cleanable", "cleanable"), ("Heatable", "heatable"),
                                ("Coolable", "coolable"), ("Sliceable", "sliceable"),
                                ("Toggleable", "toggleable")):
            if otype in props[prop]:
                init.append(f"({predicate} {oid})")
    for rtype in rtypes:
        init += [f"(canContain {rtype}Type {o}Type)" for o in otypes if o in holds.get(rtype, ())]

    entry = goal_library.gdict[task_type]
    goal_pddl = entry["pddl"].format(obj=obj, recep=recep, toggle=toggle, mrecep="")
    goal = rng.choice(entry["templates"]).format(
        obj=obj.lower(), recep=recep.lower(), toggle=toggle.lower(), mrecep="")
    pddl = (
        f"(define (problem leafe_{task_type})\n(:domain alfred)\n(:objects\n"
        + "\n".join(f"    {d}" for d in decl)
        + "\n)\n(:init\n"
        + "\n".join(f"    {f}" for f in init)
        # the library's goal formulas write '#' for PDDL's '-' and close the define
        + "\n)\n" + goal_pddl.replace("#", "-").strip() + "\n"
    )
    return Problem(task_type, room, obj, recep, toggle, goal, pddl,
                   receptacles=[r[1] for r in receptacles], objects=[o[0] for o in objects])


def logic_files() -> tuple[Path, Path]:
    """ALFWorld's bundled `alfred.pddl` and `alfred.twl2`, located without importing the
    package (whose import creates $ALFWORLD_DATA)."""
    import importlib.util

    spec = importlib.util.find_spec("alfworld")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("alfworld", name="alfworld")
    data = Path(spec.origin).parent / "data"
    return data / "alfred.pddl", data / "alfred.twl2"


def game_data(problem: Problem, domain: str, grammar: str) -> dict[str, Any]:
    """A `game.tw-pddl` (before the solvability check)."""
    return {"pddl_domain": domain, "grammar": grammar.replace("UNKNOWN GOAL", problem.goal),
            "pddl_problem": problem.pddl, "solvable": None, "walkthrough": None}


#: A solvability check: game data -> (verified plan, '') or (None, why not).
Check = Callable[[dict[str, Any]], tuple["list[str] | None", str]]


def generate(
    settings: Settings, task_type: str, seed_parts: tuple[Any, ...], check: Check,
    domain: str, grammar: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(game.tw-pddl data with its verified walkthrough, traj_data) of the first attempt that
    the planner solves; seeds derive from (settings, *seed_parts, attempt)."""
    reasons: list[str] = []
    for attempt in range(MAX_ATTEMPTS):
        seed = derive_seed(settings.key(), task_type, *seed_parts, attempt)
        problem = sample_problem(settings, task_type, random.Random(seed))
        if isinstance(problem, str):
            reasons.append(problem)
            continue
        data = game_data(problem, domain, grammar)
        plan, why = check(data)
        if plan is None:
            reasons.append(why)
            continue
        data["solvable"], data["walkthrough"] = True, plan
        return data, problem.traj_data(seed=seed, attempt=attempt, settings=settings.key())
    raise RuntimeError(
        f"alfworld: no solvable {task_type} game for {seed_parts} in {MAX_ATTEMPTS} attempts "
        f"(last reason: {reasons[-1] if reasons else '?'})"
    )
