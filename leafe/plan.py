"""Compile a spec into a stage graph: per method its training stages, then one evaluation
per method, then the report. Each stage is keyed by a hash of its resolved inputs (spec slice,
upstream hashes, code version), so a changed input re-runs exactly what depends on it."""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import leafe
from leafe.errors import RunDataError, SpecError
from leafe.methods.api import PLAN_ONLY_FIELDS
from leafe.spec.loader import LoadedSpec
from leafe.spec.schema import METHOD_ONLY, MODEL_EXECUTION_ONLY

if TYPE_CHECKING:
    from leafe.integrity import StageCheck

EVAL_VERSION = 1


@dataclass
class PlannedStage:
    id: str
    """`<method>.<stage>` for training, `eval.<method>`, or `report`."""
    kind: str
    """train, eval or report."""
    method: str | None
    deps: list[str]
    inputs: dict[str, Any]
    version: int = 1
    run: Callable | None = None
    produces_checkpoint: bool = False
    generates: str = "none"
    """`none`, `policy` (samples from its start policy) or `trained` (see StageDef.generates)."""
    hash: str = ""
    after: list[str] = field(default_factory=list)
    """Stages that must finish first without being upstream (no checkpoint, no inherited
    spend): the matched method's last stage under `budget.match`, whose spend is this stage's
    allowance. Part of the key like `deps`."""
    same_as: str | None = None
    """The stage this one is (`reuse:`): another method's stage with the same key, id aside.
    It shares that stage's key and directory, runs as that stage, and is never run itself."""
    key: dict[str, Any] = field(default_factory=dict, repr=False)
    """What `hash` digests: id, kind, inputs, version, code (leafe's version), the upstream
    stages' hashes (`deps`, `after`)."""

    def key_record(self) -> dict[str, Any]:
        """The parts of the key `stage.json` records besides id, kind, inputs and version: the
        code version and the upstream hashes, so `leafe plan` can name what changed."""
        return {"code": self.key.get("code"), "upstream": self.key.get("deps", {}),
                "after": self.key.get("after", {})}

    @property
    def dirname(self) -> str:
        return f"{self.same_as or self.id}-{self.hash[:12]}"


@dataclass
class Plan:
    name: str
    root: Path
    """runs/<name>/"""
    stages: list[PlannedStage]
    checkpoint_of: dict[str, str | None] = field(default_factory=dict)
    """Per method: the stage whose checkpoint evaluation loads (None: the initial policy)."""
    records_only: bool = False
    """For readers of records that load no model (the report): a finished stage's
    `checkpoint/` is left out of its status (`StageCheck.records_only`)."""
    _holder: Any = field(default=False, init=False, repr=False, compare=False)
    """`in_use`'s answer, asked once (False: not asked yet)."""

    def stage(self, sid: str) -> PlannedStage:
        return next(s for s in self.stages if s.id == sid)

    def dir(self, stage: PlannedStage) -> Path:
        return self.root / stage.dirname

    def status(self, stage: PlannedStage) -> str:
        """done, partial (has artifacts, will resume), todo, incomplete (finished, but a file
        it wrote is gone: runs again) or damaged (finished, but a file it wrote changed: not
        used); `always` for the report. See `leafe.integrity`."""
        if stage.kind == "report":
            return "always"
        return self.check(stage).status

    def check(self, stage: PlannedStage) -> "StageCheck":
        """The stage's directory against its DONE marker (`leafe.integrity.check_stage`)."""
        from leafe.integrity import check_stage

        check = check_stage(self.dir(stage))
        return check.records_only() if self.records_only else check

    def in_use(self) -> dict | None:
        """Who holds the run directory's lock (`leafe.runlock.lock_holder`: {pid, host, started,
        stage, dir}), or None when no `leafe run` does; asked once per Plan."""
        if self._holder is False:
            from leafe.runlock import lock_holder

            self._holder = lock_holder(self.root)
        return self._holder

    def running(self, stage: PlannedStage) -> dict | None:
        """The lock holder when it is running `stage` now, else None."""
        holder = self.in_use()
        return holder if holder and stage.kind != "report" and holder.get("dir") == stage.dirname else None

    def changes(self, stage: PlannedStage) -> list[str]:
        """Why a stage that is `todo` will run anew although it ran before under other inputs:
        what differs between its key and the `stage.json` of the most recently started directory
        of the same stage (`eval.samples 4 → 2`, `upstream sft.train changed`); [] when it never
        ran, or is not todo."""
        if stage.kind == "report" or self.status(stage) != "todo":
            return []
        recorded = _last_recorded(self.root, stage.same_as or stage.id, self.dir(stage))
        return [] if recorded is None else _key_changes(recorded, stage)

    def note(self, stage: PlannedStage) -> str:
        """What `leafe plan` adds to a stage's status: what is wrong with a finished stage
        (incomplete, damaged), who is running it (`running: in use by pid 123`), or why it runs
        anew (`changed: eval.samples 4 → 2`); '' when there is nothing to say."""
        from leafe.runlock import describe_holder

        status = self.status(stage)
        if status in ("incomplete", "damaged"):
            return self.check(stage).reason()
        if (holder := self.running(stage)) is not None:
            return "running: in use by `leafe run`" + describe_holder(holder)
        if changed := self.changes(stage):
            more = f", and {len(changed) - 4} more" if len(changed) > 4 else ""
            return "changed: " + ", ".join(changed[:4]) + more
        return ""

    def unusable(self) -> list[tuple[PlannedStage, "StageCheck"]]:
        """Finished stages that must not be used as they are: damaged or incomplete."""
        out = []
        for s in self.stages:
            if s.kind != "report":
                c = self.check(s)
                if c.status in ("damaged", "incomplete"):
                    out.append((s, c))
        return out

    def raise_if_damaged(self, incomplete_too: bool = False) -> None:
        """A `RunDataError` naming every damaged finished stage (and, with `incomplete_too`,
        every incomplete one), its files and what to do; nothing when there are none."""
        from leafe.integrity import damaged_error, incomplete_error

        problems = [str(damaged_error(s.id, self.dir(s), c)) if c.status == "damaged"
                    else str(incomplete_error(s.id, self.dir(s), c))
                    for s, c in self.unusable() if c.status == "damaged" or incomplete_too]
        if problems:
            raise RunDataError(problems)


def _last_recorded(root: Path, sid: str, own: Path) -> dict | None:
    """The `stage.json` of the most recently started directory of stage `sid` under `root`
    other than `own` (None when there is none, or none readable)."""
    best, newest = None, -1
    try:
        found = list(root.glob(f"{glob.escape(sid)}-*"))
    except OSError:
        return None
    for d in found:
        if d == own or len(d.name) != len(sid) + 13:  # <id>-<12 hex>: not `eval.a-b-...` of method a-b
            continue
        try:
            mtime = (d / "stage.json").stat().st_mtime_ns
            rec = json.loads((d / "stage.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("id") == sid and isinstance(rec.get("inputs"), dict) and mtime > newest:
            best, newest = rec, mtime
    return best


_MISSING = object()


def _key_changes(recorded: dict, stage: PlannedStage) -> list[str]:
    """What differs between a recorded `stage.json` and `stage`'s key, in spec terms."""
    def show(v: Any) -> str:
        return "unset" if v is _MISSING else v if isinstance(v, str) else json.dumps(v)

    def diff(a: Any, b: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                yield from diff(a.get(k, _MISSING), b.get(k, _MISSING), path + (str(k),))
        elif a != b:
            yield path, a, b

    names = {"method": f"methods.{stage.method}", "policy": "models.policy", "stage": stage.id}
    now = json.loads(json.dumps(stage.inputs, default=str))  # as recorded: JSON values
    out = []
    for path, a, b in diff(recorded["inputs"], now, ()):
        head = f"models.{path[0][5:]}" if path[0].startswith("role:") else names.get(path[0], path[0])
        out.append(f"{'.'.join((head, *path[1:]))} {show(a)} → {show(b)}")
    if recorded.get("version") != stage.version:
        out.append(f"{stage.id}'s code version {recorded.get('version')} → {stage.version}")
    code = stage.key.get("code")
    if recorded.get("code") not in (None, code):
        out.append(f"leafe {recorded['code']} → {code}")
    if "upstream" in recorded:
        before = {**(recorded.get("upstream") or {}), **(recorded.get("after") or {})}
        after = {**stage.key.get("deps", {}), **stage.key.get("after", {})}
        out += [f"upstream {d} changed" if d in before and d in after else
                f"upstream {d} {'added' if d in after else 'removed'}"
                for d in sorted(set(before) | set(after)) if before.get(d) != after.get(d)]
    elif not out:  # recorded by a leafe that kept no upstream hashes
        out.append("an upstream stage or leafe's version")
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _config_slice(cfg, fields: tuple[str, ...] | None) -> dict:
    """The part of a method config a stage depends on (all of it when `fields` is None)."""
    if fields is None:
        return cfg.model_dump(mode="json", exclude=set(PLAN_ONLY_FIELDS))
    unknown = set(fields) - set(type(cfg).model_fields)
    if unknown:  # a method's own mistake: a misspelt field would silently leave the key
        raise ValueError(f"{type(cfg).__name__} has no field(s) {sorted(unknown)} named in a stage's config_fields")
    return cfg.model_dump(mode="json", include={"method", "init", *fields})


def build_plan(loaded: LoadedSpec, runs_dir: Path | str = "runs") -> Plan:
    from leafe import methods as registry

    spec = loaded.spec
    common = {
        "seed": spec.seed,
        "env": spec.env.model_dump(mode="json", exclude=METHOD_ONLY),
        "env_options": loaded.env_options.model_dump(mode="json"),
        "policy": spec.models.policy.model_dump(mode="json", exclude=MODEL_EXECUTION_ONLY),
    }
    per_method: dict[str, list[PlannedStage]] = {}
    for name, cfg in loaded.methods.items():
        method = registry.get(loaded.method_types[name])
        own = loaded.for_method(name).spec  # the method's own reflector / teacher, if it names one
        stages = []
        for sd in method.stages(name, cfg, loaded):
            stages.append(PlannedStage(
                id=f"{name}.{sd.name}", kind="train", method=name, deps=[],
                inputs={**common, "budget": spec.budget.model_dump(mode="json"),
                        **{f"role:{r}": own.role(r).model_dump(mode="json", exclude=MODEL_EXECUTION_ONLY)
                           for r in sd.roles},
                        "method": _config_slice(cfg, sd.config_fields), "stage": sd.inputs},
                version=sd.version, run=sd.run, produces_checkpoint=sd.produces_checkpoint,
                generates=sd.generates,
            ))
        for a, b in zip(stages, stages[1:]):
            b.deps.append(a.id)
        per_method[name] = stages

    # Final checkpoint per method, following `init:` chains (cycles are spec errors).
    checkpoint_of: dict[str, str | None] = {}

    def final(name: str, chain: tuple[str, ...] = ()) -> str | None:
        if name in checkpoint_of:
            return checkpoint_of[name]
        if name in chain:
            raise SpecError([f"{loaded.where('methods', name, 'init')}: methods.{name}.init: "
                             f"init cycle: {' -> '.join(chain + (name,))}"])
        own = [s for s in per_method[name] if s.produces_checkpoint]
        if own:
            result = own[-1].id
        else:
            init = loaded.methods[name].init
            result = final(init, chain + (name,)) if init else None
        checkpoint_of[name] = result
        return result

    for name in per_method:
        final(name)
        init = loaded.methods[name].init
        if init and per_method[name]:
            start = final(init)
            if start and start in {s.id for s in per_method[name]}:
                raise SpecError([f"{loaded.where('methods', name, 'init')}: methods.{name}.init: "
                                 f"init cycle: {name} starts from {init}, which ends with "
                                 f"{name}'s own checkpoint"])
            if start:
                per_method[name][0].deps.insert(0, start)

    # `budget.match`: every matched method trains after the matched one (its allowance is what
    # that method spent, so the matched stages are inputs of its key)
    match = spec.budget.match
    if match is not None:
        from leafe.budget import matched_methods

        if not per_method[match]:
            raise SpecError([f"{loaded.where('budget', 'match')}: budget.match: {match} has no training "
                             "stages, so it spends nothing to match; name a training method"])
        for name in matched_methods(loaded.methods, match):
            if per_method[name]:
                per_method[name][0].after.append(per_method[match][-1].id)

    stages: list[PlannedStage] = []
    for name in per_method:
        stages += per_method[name]
    for name in per_method:
        ck = checkpoint_of[name]
        stages.append(PlannedStage(
            id=f"eval.{name}", kind="eval", method=name, deps=[ck] if ck else [],
            inputs={**common, "eval": spec.eval.model_dump(mode="json")}, version=EVAL_VERSION,
            generates="policy",
        ))
    stages.append(PlannedStage(
        id="report", kind="report", method=None, deps=[s.id for s in stages if s.kind == "eval"],
        inputs={"report": spec.report.model_dump(mode="json")},
    ))
    # `reuse: M`: a stage may be M's stage of the same name; M's is keyed first
    candidates: dict[str, str] = {}
    for name, cfg in loaded.methods.items():
        other = getattr(cfg, "reuse", None)
        if other is not None and other in per_method:
            theirs = {s.id.split(".", 1)[1]: s.id for s in per_method[other]}
            for st in per_method[name]:
                short = st.id.split(".", 1)[1]
                if short in theirs:
                    candidates[st.id] = theirs[short]
    stages = _toposort(stages, candidates)
    hashes: dict[str, str] = {}
    content: dict[str, str] = {}
    by_id = {s.id: s for s in stages}
    for s in stages:
        key = {"id": s.id, "kind": s.kind, "inputs": s.inputs, "version": s.version,
               "code": leafe.__version__, "deps": {d: hashes[d] for d in s.deps}}
        if s.after:
            key["after"] = {d: hashes[d] for d in s.after}
        s.key = key
        # the key without names: equal for two methods' stages that compute the same thing
        content[s.id] = _digest({k: v for k, v in key.items() if k != "id"} | {
            "deps": [hashes[d] for d in s.deps], "after": [hashes[d] for d in s.after]})
        twin = candidates.get(s.id)
        if twin is not None and content[s.id] == content[twin]:
            target = by_id[twin]
            s.same_as = target.same_as or target.id
            s.hash = target.hash
        else:
            s.hash = _digest(key)
        hashes[s.id] = s.hash
    return Plan(spec.name, Path(runs_dir) / spec.run_name(), stages, checkpoint_of)


def shared_stages(plan: "Plan") -> dict[str, str]:
    """Per stage that another method's stage stands in for (`reuse:`), that stage's id."""
    return {s.id: s.same_as for s in plan.stages if s.same_as}


def start_checkpoint(plan_stages: list[PlannedStage], stage: PlannedStage) -> str | None:
    """The stage whose checkpoint `stage`'s policy comes from, or None for the spec's own policy:
    an upstream stage that writes one, else what the upstream stages started from (the planner
    makes an `init:` checkpoint a dependency of a method's first stage only, so a method's later
    stages, e.g. LEAFE's distillation, start where its exploration did)."""
    by_id = {s.id: s for s in plan_stages}

    def start(s: PlannedStage) -> str | None:
        for d in s.deps:
            if by_id[d].produces_checkpoint:
                return d
        for d in s.deps:
            found = start(by_id[d])
            if found:
                return found
        return None

    return start(stage)


def _toposort(stages: list[PlannedStage], first: dict[str, str] | None = None) -> list[PlannedStage]:
    """Dependency order (`deps`, `after`); `first`: per stage id, a stage to order before it
    without depending on it (the stage `reuse:` may share)."""
    by_id = {s.id: s for s in stages}
    first = first or {}
    out: list[PlannedStage] = []
    state: dict[str, int] = {}

    def visit(s: PlannedStage) -> None:
        if state.get(s.id) == 2:
            return
        if state.get(s.id) == 1:
            raise SpecError([f"stage cycle through {s.id}; check the methods' `init:` fields"])
        state[s.id] = 1
        for d in s.deps + s.after + ([first[s.id]] if s.id in first else []):
            visit(by_id[d])
        state[s.id] = 2
        out.append(s)

    for s in stages:
        visit(s)
    return out
