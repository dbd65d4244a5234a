"""leafe from Python: the same spec, plan, run and report as the command line.

    import leafe

    spec = leafe.load_spec("specs/quickstart.yaml", {"eval.samples": 4})
    for stage in leafe.plan(spec):
        print(stage.id, stage.status)
    run = leafe.run(spec)                       # what `leafe run` does: cached stages reused
    run.table()                                 # pandas: one row per method, every pass@k
    leafe.open_run("runs/quickstart").episodes("base")

Every function takes a spec as a path or as what `load_spec` returned. A spec that does not
validate raises `leafe.SpecError` (file, line and field path of each problem); other mistakes
(a missing dataset, a run directory that is not one) raise `leafe.UserError` with the message
the command line prints. Importing leafe imports no torch: only `run` loads models.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

from leafe import errors

if TYPE_CHECKING:  # pandas and rich only when used
    import pandas as pd
    from rich.console import Console

    from leafe.spec.loader import LoadedSpec

__all__ = ["SpecError", "SpecProblem", "Stage", "Run", "load_spec", "plan", "run", "open_run", "report"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class SpecProblem:
    """One problem of a spec: where it is and what is wrong."""

    file: str | None
    """The spec or preset file (as the message shows it), `--set key=value` for an override,
    None when unknown."""
    line: int | None
    """1-based line in `file`; None for an override or when unknown."""
    field: str | None
    """The field's dotted path (`eval.samples`, `methods.sft.epochs`, `(top level)`); None when
    the problem is not about one field (a YAML syntax error, a missing file)."""
    message: str
    """What is expected."""
    text: str
    """The whole message, as `leafe validate` prints it."""

    def __str__(self) -> str:
        return self.text


# `file:line: field.path: message` (leafe.spec.loader._problem); the line is absent for a
# `--set` override, and the field for a YAML syntax error
_WITH_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?:(?P<field>[^\s:][^:]*?): )?(?P<msg>.*)$", re.S)
_SET = re.compile(r"^(?P<file>--set .*?): (?:(?P<field>[^\s:][^:]*?): )?(?P<msg>.*)$", re.S)
_NO_LINE = re.compile(r"^(?P<file>[^:]+): (?P<field>[^\s:][^:]*?): (?P<msg>.*)$", re.S)


def _parse_problem(text: str, sets: Sequence[str] = ()) -> SpecProblem:
    from leafe.errors import cut

    for assignment in sets:  # an override's message starts with it, whatever it holds
        origin = f"--set {cut(assignment)}"
        if text.startswith(origin + ": "):
            m = re.match(r"^(?:(?P<field>[^\s:][^:]*?): )?(?P<msg>.*)$", text[len(origin) + 2:], re.S)
            assert m is not None
            return SpecProblem(origin, None, m["field"], m["msg"], text)
    for pattern in (_SET, _WITH_LINE, _NO_LINE):
        m = pattern.match(text)
        if m:
            d = m.groupdict()
            field = d.get("field")
            msg = d["msg"]
            # `file:line: YAML syntax error: ...`: not a field
            if field is not None and (" " in field and not field.startswith("(")):
                field, msg = None, f"{field}: {msg}"
            file = None if d["file"] == "<spec>" else d["file"]
            return SpecProblem(file, int(d["line"]) if d.get("line") else None, field, msg, text)
    return SpecProblem(None, None, None, text, text)


class SpecError(errors.SpecError):
    """A spec that cannot be read or validated (also `leafe.errors.SpecError` and
    `leafe.errors.UserError`). `problems`: every message, as `leafe validate` prints them;
    `details`: each as a `SpecProblem` (file, line, field, message); `file`, `line`, `field`:
    those of the first problem. `str()` is every message, one a line."""

    def __init__(self, problems: list[str], overrides: Sequence[str] = ()):
        super().__init__(problems)
        self.details: list[SpecProblem] = [_parse_problem(p, overrides) for p in problems]
        first = self.details[0] if self.details else SpecProblem(None, None, None, "", "")
        self.file: str | None = first.file
        self.line: int | None = first.line
        self.field: str | None = first.field


def _set_string(key: str, value: Any) -> str:
    """One `--set` string: the value as JSON, which YAML reads (a path as its text)."""
    import json

    return f"{key}={json.dumps(value, default=str)}"


def _overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [_set_string(k, v) for k, v in overrides.items()]
    return [str(s) for s in overrides]  # already `key=value` strings


def load_spec(path: PathLike, overrides: Mapping[str, Any] | Iterable[str] | None = None) -> "LoadedSpec":
    """Read, merge (presets, overrides) and validate a spec file, as `leafe validate` does.

    `overrides`: `{"eval.samples": 4, "eval.k": [1, 4]}` (each as `--set eval.samples=4`), or
    `--set` strings. Returns the validated spec (`LoadedSpec`: `.spec` the pydantic model,
    `.methods` each method's config). Raises `leafe.SpecError` for every way a spec can be
    wrong, a file that cannot be read included."""
    from leafe.spec.loader import _display
    from leafe.spec.loader import load_spec as _load

    shown = _display(Path(path))
    sets = _overrides(overrides)
    try:
        return _load(path, sets)
    except errors.SpecError as e:
        raise SpecError(list(e.problems), sets) from None
    except errors.UserError as e:  # no such file, not UTF-8, a directory: the file, no line
        text = str(e)
        msg = text[len(shown) + 2:] if text.startswith(f"{shown}: ") else text
        err = SpecError([text])
        err.details = [SpecProblem(shown, None, None, msg, text)]
        err.file, err.line, err.field = shown, None, None
        raise err from None


def _loaded(spec: "LoadedSpec | PathLike") -> "LoadedSpec":
    from leafe.spec.loader import LoadedSpec

    return spec if isinstance(spec, LoadedSpec) else load_spec(spec)


@dataclass(frozen=True)
class Stage:
    """One stage of the plan, as `leafe plan` shows it."""

    id: str
    """`<method>.<stage>` (training), `eval.<method>`, or `report`."""
    kind: str
    """train, eval or report."""
    method: str | None
    deps: tuple[str, ...]
    """The stages it starts from (and, `budget.match`, those that must finish first)."""
    key: str
    """The hash of its inputs (its directory is `<id>-<key[:12]>`); '' for the report."""
    status: str
    """done, partial (will resume), todo, incomplete (runs again), damaged, or always (report)."""
    dir: Path | None
    """Its directory under the run directory; None for the report."""
    seed: int
    """The master seed of the plan it belongs to (several with `seeds:`)."""
    same_as: str | None = None
    """The stage it shares (`reuse:`), else None."""
    note: str = ""
    """What `leafe plan` adds: what is wrong, who runs it, what changed since it last ran."""


def _smoke(loaded: "LoadedSpec", smoke: bool) -> "LoadedSpec":
    if not smoke:
        return loaded
    from leafe.smoke import smoke_spec

    return smoke_spec(loaded)


def plan(spec: "LoadedSpec | PathLike", runs_dir: PathLike = "runs", smoke: bool = False) -> list[Stage]:
    """The stage graph `leafe plan` shows, in run order (every seed's, seed by seed);
    `smoke=True`: that of the spec's smoke run (`leafe plan --smoke`)."""
    loaded = _smoke(_loaded(spec), smoke)
    return _plan_at(loaded, None, runs_dir)


def _manifests(root: Path) -> list[Path]:
    """The run directory's own manifests (oldest first), else those of specs sharing it."""
    every = sorted(root.glob("manifest*.json"), key=lambda p: p.stat().st_mtime)
    own = [m for m in every if m.name == "manifest.json" or m.name.startswith("manifest.seed-")]
    return own or every


class Run:
    """A run directory (runs/<name>/), finished or partial, read without writing to it (no lock
    is taken: a `leafe run` may be working on it)."""

    def __init__(self, path: PathLike, loaded: "LoadedSpec"):
        self.path = Path(path)
        """The run directory."""
        self.spec = loaded
        """The spec it ran (`LoadedSpec`)."""

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, spec={self.spec.spec.name!r})"

    @property
    def manifest(self) -> dict:
        """The run's manifest (`manifest.json`, or the newest of a multi-seed run's): the spec,
        its stages, versions, threads."""
        from leafe.cli import _read_manifest

        found = _manifests(self.path)
        if not found:
            raise errors.UserError(f"{self.path}: no manifest.json (the run has not started)")
        return _read_manifest(found[-1])

    def report_data(self) -> dict:
        """The report's data (`leafe.report.collect`), as `reports/<name>.json` holds it."""
        from leafe.report import collect

        return collect(self.spec, self.path.parent, self.path)

    def table(self) -> "pd.DataFrame":
        """One row per method (the report's rows, index `method`): status, `pass@K` for every k
        with `pass@K ci_low`/`ci_high` (bootstrap interval) and `pass@K std` (across seeds),
        `pass^K`, success, steps, tokens, episodes, and the budget (`budget.own`,
        `budget.total`, ...; nested fields joined by dots). The same numbers as the JSON report."""
        pd = _pandas()
        rows = []
        for r in self.report_data()["rows"]:
            flat: dict[str, Any] = {}
            for key, value in r.items():
                if key in ("pass@k", "pass@k_stats", "pass^k", "curve", "per_seed"):
                    continue
                if isinstance(value, dict):
                    flat.update(_flatten(value, key))
                elif isinstance(value, list):
                    flat[key] = list(value)
                else:
                    flat[key] = value
            for k, st in r.get("pass@k_stats", {}).items():
                flat[f"pass@{k}"] = st["mean"]
                flat[f"pass@{k} ci_low"], flat[f"pass@{k} ci_high"] = st["ci"]
                flat[f"pass@{k} std"] = st["std"]
            for k, v in r.get("pass^k", {}).items():
                flat[f"pass^{k}"] = v
            rows.append(flat)
        return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()

    def episodes(self, method: str) -> "pd.DataFrame":
        """The evaluation episode records of `method` (every seed; column `seed`), one row per
        episode: task, sample, success, steps, tokens, ...; empty when its evaluation has not
        started."""
        from leafe.plan import build_plan
        from leafe.stage import read_episodes

        pd = _pandas()
        if method not in self.spec.methods:
            raise errors.UserError(f"{method!r} is not a method of {self.spec.spec.name} "
                                   f"(its methods: {', '.join(self.spec.methods)})")
        rows: list[dict] = []
        for one in self.spec.per_seed():
            p = build_plan(one, self.path.parent)
            p.root = self.path
            for rec in read_episodes(p.dir(p.stage(f"eval.{method}"))):
                rows.append({"seed": one.spec.seed, **rec})
        return pd.DataFrame(rows)

    def plan(self) -> list[Stage]:
        """The run's stages and their status (as `leafe.plan`), read from this directory."""
        return _plan_at(self.spec, self.path)


def _plan_at(loaded: "LoadedSpec", root: Path | None, runs_dir: PathLike = "runs") -> list[Stage]:
    """Every seed's stages; `root`: read this run directory instead of runs_dir/<run name>."""
    from leafe.plan import build_plan

    out = []
    for one in loaded.per_seed():
        p = build_plan(one, runs_dir if root is None else root.parent)
        if root is not None:
            p.root = root
        for s in p.stages:
            report = s.kind == "report"
            out.append(Stage(id=s.id, kind=s.kind, method=s.method, deps=tuple(s.deps + s.after),
                             key="" if report else s.hash, status=p.status(s), dir=None if report else p.dir(s),
                             seed=one.spec.seed, same_as=s.same_as, note=p.note(s)))
    return out


def _pandas():
    try:
        import pandas
    except ImportError:
        raise errors.UserError("Run.table() and Run.episodes() need pandas: pip install pandas") from None
    return pandas


def _flatten(d: dict, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def run(spec: "LoadedSpec | PathLike", runs_dir: PathLike = "runs", reports_dir: PathLike = "reports",
        console: "Console | None" = None, quiet: bool = False, smoke: bool = False) -> Run:
    """What `leafe run` does: every stage not done (finished ones reused, partial ones resumed),
    then the report into `reports_dir`. Prints progress to `console` (default: the terminal;
    `quiet=True`: nothing); `smoke=True`: the spec's smoke run (`leafe run --smoke`, into
    runs/<name>-smoke/). Returns the run's handle."""
    from rich.console import Console

    from leafe.runner import run as run_plan

    loaded = _smoke(_loaded(spec), smoke)
    if console is None:
        console = Console(quiet=True) if quiet else Console()
    run_plan(loaded, runs_dir, reports_dir, console)
    return Run(Path(runs_dir) / loaded.spec.run_name(), loaded)


def open_run(path: PathLike) -> Run:
    """A run directory (runs/<name>/, finished or partial; renamed or copied ones too) with the
    spec its manifest recorded. Reads only: takes no lock and writes nothing."""
    from leafe.cli import _load_source

    root = Path(path)
    if not root.is_dir():
        raise errors.UserError(f"{root}: not a run directory (pass runs/<name>/ of a `leafe run`)")
    return Run(root, _load_source(root, None))


_FORMATS = ("md", "json", "tex", "html")


def report(sources: "LoadedSpec | Run | PathLike | Sequence[LoadedSpec | Run | PathLike]",
           formats: Sequence[str] | None = None, reports_dir: PathLike = "reports", runs_dir: PathLike = "runs",
           name: str | None = None) -> list[Path]:
    """What `leafe report` does: the report of one source, or one combined table for several.
    A source is a spec (file or `load_spec`'s), a run directory or a `Run`. `formats`: any of
    md, json, tex, html (default: the first spec's `report.formats`). Returns the paths written."""
    from leafe.cli import _load_source
    from leafe.report import write_reports
    from leafe.spec.loader import LoadedSpec

    many = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if not many:
        raise errors.UserError("report: give at least one source")
    if formats is not None:
        bad = [f for f in formats if f not in _FORMATS]
        if bad or not formats:
            raise errors.UserError(f"formats: {bad or '[]'} not among {', '.join(_FORMATS)}")
    loaded: list[LoadedSpec] = []
    roots: list[Path | None] = []
    for s in many:
        if isinstance(s, Run):
            loaded.append(s.spec)
            roots.append(s.path)
        elif isinstance(s, LoadedSpec):
            loaded.append(s)
            roots.append(None)
        elif Path(s).is_dir():
            loaded.append(_load_source(Path(s), None))
            roots.append(Path(s))
        else:
            loaded.append(load_spec(s))
            roots.append(None)
    if formats is not None:
        first = loaded[0]
        rep = first.spec.report.model_copy(update={"formats": list(formats)})
        loaded[0] = dataclasses.replace(first, spec=first.spec.model_copy(update={"report": rep}))
    if name is None and len(many) == 1 and roots[0] is not None:
        folder = roots[0].resolve().name  # as `leafe report runs/<folder>`
        name = folder if folder != loaded[0].spec.run_name() else None
    data = write_reports(loaded if len(loaded) > 1 else loaded[0], runs_dir, reports_dir, None,
                         name=name, roots=roots)
    return [Path(p) for p in data["written"]]
