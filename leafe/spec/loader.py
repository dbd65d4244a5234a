"""Load a spec: YAML with line numbers, `use:` presets, `--set` overrides, validation.

Every problem is reported as `file:line: field.path: message` and raised together as one
`SpecError` (the CLI prints them and exits 2).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from leafe.errors import SpecError, UserError, cut, shown
from leafe.spec.schema import SUPPORTED_VERSIONS, Spec, name_problem

Path_ = tuple[str | int, ...]
Where = tuple[str, int]  # (file or origin, 1-based line)

#: Where `use:` names are looked up, per spec section: the preset folder name.
PRESET_KINDS = {("env",): "envs", ("methods", "*"): "baselines"}


@dataclass
class Located:
    """Plain YAML data plus the origin of every node."""

    data: Any
    where: dict[Path_, Where] = field(default_factory=dict)

    def locate(self, path: Path_) -> Where | None:
        """The origin of `path`, or of its nearest ancestor that has one."""
        p = tuple(path)
        while True:
            if p in self.where:
                return self.where[p]
            if not p:
                return None
            p = p[:-1]


def _fmt_path(path: Path_) -> str:
    out = ""
    for part in path:
        part = part if isinstance(part, int) else cut(part, NAME_SHOWN)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _fmt_where(where: Where) -> str:
    """`file:line`; a `--set` override (line 0) by itself."""
    return f"{where[0]}:{where[1]}" if where[1] else where[0]


def _problem(where: Where | None, path: Path_, msg: str) -> str:
    loc = _fmt_where(where) if where else "<spec>"
    # values are cut where they are quoted; this bounds what slipped through (a long list)
    return f"{loc}: {_fmt_path(path)}: {cut(msg, MESSAGE_SHOWN)}"


#: The most characters of a key a message shows, and of one message (`_problem`).
NAME_SHOWN = 100
MESSAGE_SHOWN = 2000

#: How many values YAML aliases (`*name`) may add to a spec. A few aliases are a convenience;
#: nine levels of nine aliases (an "alias bomb") would expand to 387 million values, minutes
#: of work before any error.
MAX_ALIAS_VALUES = 10_000
#: How deep a spec may nest: a spec is a few levels deep, and deeper input exhausts Python's
#: recursion (a traceback, not an error) or is a recursive alias.
MAX_DEPTH = 64


# -- YAML with locations ------------------------------------------------------------------------
_MERGE_TAG = "tag:yaml.org,2002:merge"
#: libyaml's parser when PyYAML has it: a 10 MB value parses in a fraction of a second, not the
#: pure-Python parser's many seconds. Both give the same nodes and line numbers.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _node_to_data(root: yaml.Node, origin: str, where: dict[Path_, Where], at: Path_ = (),
                  lines: bool = True) -> Any:
    """The plain data of a composed YAML document at path `at`, recording each node's line in
    `where` (line 0, no line, with `lines=False`: a `--set` value).

    Work is linear in the document's size: scalars are constructed directly (no round trip
    through the YAML emitter), and the values aliases add are counted and bounded."""
    constructor = yaml.constructor.SafeConstructor()
    seen: set[int] = set()  # nodes converted once: meeting one again is an alias
    open_: set[int] = set()  # collections being converted: meeting one of them is recursion
    added = 0  # values added by aliases
    alias_at: Path_ | None = None  # where the outermost alias being expanded is used

    def fail(path: Path_, msg: str) -> SpecError:
        return SpecError([_problem(where.get(path) or _nearest(path), path, msg)])

    def _nearest(path: Path_) -> Where:
        while path not in where and path:
            path = path[:-1]
        return where.get(path, (origin, 1 if lines else 0))

    def line(mark: yaml.Mark) -> Where:
        return (origin, mark.line + 1 if lines else 0)

    def rec(node: yaml.Node, path: Path_) -> Any:
        nonlocal added, alias_at
        alias = id(node) in seen
        # an alias is located where it is used (its parent), not at the anchor it names
        where.setdefault(path, _nearest(path[:-1]) if alias else line(node.start_mark))
        if len(path) > MAX_DEPTH:
            raise fail(path, f"nested more than {MAX_DEPTH} levels deep; a spec is a few levels deep")
        outermost = False
        if alias and alias_at is None:
            alias_at, outermost = path, True
        seen.add(id(node))
        if alias_at is not None:
            added += 1
            if added > MAX_ALIAS_VALUES:
                raise fail(alias_at, f"YAML aliases (*name) expand to more than {MAX_ALIAS_VALUES} "
                           "values here; write the values out, or alias fewer or smaller ones")
        try:
            if isinstance(node, yaml.MappingNode):
                if id(node) in open_:
                    raise fail(path, "a YAML alias (*name) inside the value it names (recursive); "
                               "remove that alias")
                open_.add(id(node))
                out: dict[str, Any] = {}
                for k_node, v_node in node.value:
                    at = line(k_node.start_mark)
                    if not isinstance(k_node, yaml.ScalarNode):
                        kind = "mapping" if isinstance(k_node, yaml.MappingNode) else "list"
                        raise SpecError([_problem(at, path, f"a mapping key must be a string, not a {kind}")])
                    if k_node.tag == _MERGE_TAG:
                        raise SpecError([_problem(at, path, "YAML merge keys (<<) are not supported; write "
                                                  "the keys out (presets merge with `use:`)")])
                    key = k_node.value if k_node.tag == "tag:yaml.org,2002:str" else _scalar(k_node, at, path)
                    if not isinstance(key, str):
                        raise SpecError([_problem(at, path, f"mapping key {shown(key)} must be a string")])
                    if key in out:
                        raise SpecError([_problem(at, path + (key,), "duplicate key")])
                    where[path + (key,)] = at
                    out[key] = rec(v_node, path + (key,))
                open_.discard(id(node))
                return out
            if isinstance(node, yaml.SequenceNode):
                if id(node) in open_:
                    raise fail(path, "a YAML alias (*name) inside the value it names (recursive); "
                               "remove that alias")
                open_.add(id(node))
                items = [rec(n, path + (i,)) for i, n in enumerate(node.value)]
                open_.discard(id(node))
                return items
            # A scalar: PyYAML's safe resolver typed it (int, float, bool, null, str).
            return _scalar(node, where[path], path)
        finally:
            if outermost:
                alias_at = None

    def _scalar(node: yaml.Node, at: Where, path: Path_) -> Any:
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            what = getattr(e, "problem", None) or str(e)
            raise SpecError([_problem(at, path, f"cannot read this value: {cut(what)}")]) from None

    return rec(root, at)


def _check_depth(text: str, origin: str, lines: bool = True) -> None:
    """Refuse YAML nested deeper than MAX_DEPTH before composing it: the composers recurse once
    per level (libyaml's in C, where megabytes of `[` overflow the stack: a crash)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                at = f"{origin}:{event.start_mark.line + 1}" if lines else origin
                raise SpecError([f"{at}: nested more than {MAX_DEPTH} levels deep; a spec is a few "
                                 "levels deep"])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def read_yaml(file: Path, display: str | None = None) -> Located:
    """Parse one YAML file, keeping the line of every node."""
    origin = display or str(file)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{origin}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{origin}: is a directory; pass a spec file (YAML)") from None
    except OSError as e:
        raise UserError(f"{origin}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{origin}: not a spec: byte {e.start} is not UTF-8 text (a binary file?); "
                        "pass a YAML spec file") from None
    try:
        _check_depth(text, origin)
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        if mark is not None:
            line = mark.line + 1
        elif isinstance(getattr(e, "position", None), int):  # a ReaderError: a character YAML refuses
            line = text.count("\n", 0, e.position) + 1
        else:
            line = 1
        what = getattr(e, "problem", None) or str(e)
        ctx = getattr(e, "context", None)
        msg = f"YAML syntax error: {cut(what)}" + (f" ({cut(ctx)})" if ctx else "")
        raise SpecError([f"{origin}:{line}: {msg}; fix the YAML syntax at that line"]) from None
    if node is None:
        return Located({}, {(): (origin, 1)})
    where: dict[Path_, Where] = {}
    data = _node_to_data(node, origin, where)
    return Located(data, where)


# -- presets --------------------------------------------------------------------------------------
def preset_dirs(kind: str, spec_file: Path | None) -> list[Path]:
    """Folders searched for `use:` presets of `kind` ("envs" or "baselines"), in order:
    `$LEAFE_PRESETS` entries (os.pathsep-separated roots), the spec's project (the folder
    above `specs/`, or the spec's own folder), the leafe source checkout, the installed copy."""
    roots: list[Path] = [Path(p) for p in os.environ.get("LEAFE_PRESETS", "").split(os.pathsep) if p]
    if spec_file is not None:
        roots += [spec_file.resolve().parent.parent, spec_file.resolve().parent]
    pkg = Path(__file__).resolve().parent.parent
    roots += [pkg.parent, pkg / "_presets"]
    seen, out = set(), []
    for r in roots:
        d = (r / kind).resolve()
        if d not in seen and d.is_dir():
            seen.add(d)
            out.append(d)
    return out


def available_presets(kind: str, spec_file: Path | None) -> list[str]:
    names = set()
    for d in preset_dirs(kind, spec_file):
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def _find_preset(kind: str, name: str, spec_file: Path | None) -> Path | None:
    for d in preset_dirs(kind, spec_file):
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    return None


def _merge(base: Located, over: Located, base_at: Path_, over_at: Path_, into: Path_) -> tuple[Any, dict]:
    """Deep-merge `over` (at over_at) onto `base` (at base_at); mappings merge, the rest replaces.
    Returns the merged data and its locations re-rooted at `into`."""
    where: dict[Path_, Where] = {}

    def rec(b: Any, o: Any, bp: Path_, op: Path_, ip: Path_) -> Any:
        if isinstance(b, dict) and isinstance(o, dict):
            out = {}
            for k in list(b) + [k for k in o if k not in b]:
                if k in o and k in b:
                    out[k] = rec(b[k], o[k], bp + (k,), op + (k,), ip + (k,))
                elif k in o:
                    out[k] = copy.deepcopy(o[k])
                    _copy_where(over, op + (k,), ip + (k,))
                else:
                    out[k] = copy.deepcopy(b[k])
                    _copy_where(base, bp + (k,), ip + (k,))
            if op in over.where:
                where[ip] = over.where[op]
            return out
        _copy_where(over, op, ip)
        return copy.deepcopy(o)

    def _copy_where(src: Located, sp: Path_, ip: Path_) -> None:
        n = len(sp)
        for p, w in src.where.items():
            if p[:n] == sp:
                where[ip + p[n:]] = w

    data = rec(base.data, over.data, base_at, over_at, into)
    return data, where


def _resolve_use(doc: Located, at: Path_, kind: str, spec_file: Path | None, chain: tuple[str, ...] = ()) -> list[str]:
    """Replace the mapping at `at` (which has a `use:` key) by preset + overrides, in place."""
    node = doc.data
    for p in at:
        node = node[p]
    name = node.get("use")
    where = doc.locate(at + ("use",))
    if not isinstance(name, str):
        return [_problem(where, at + ("use",), f"must be a preset name (string), got {shown(name)}")]
    msg = name_problem(name, f"a preset file, {kind}/<name>.yaml")
    if msg:
        return [_problem(where, at + ("use",), msg)]
    if name in chain:
        return [_problem(where, at + ("use",), f"preset cycle: {' -> '.join(chain + (name,))}")]
    file = _find_preset(kind, name, spec_file)
    if file is None:
        avail = available_presets(kind, spec_file)
        return [_problem(where, at + ("use",), f"unknown preset {shown(name)}; presets in {kind}/: "
                         f"{', '.join(avail) or '(none found)'}")]
    preset = read_yaml(file, _display(file))
    if not isinstance(preset.data, dict):
        return [_problem(preset.locate(()), (), f"preset {name!r} must be a mapping")]
    problems: list[str] = []
    if "use" in preset.data:  # presets may build on presets
        problems += _resolve_use(preset, (), kind, spec_file, chain + (name,))
    overrides = {k: v for k, v in node.items() if k != "use"}
    over = Located(overrides, {p[len(at):]: w for p, w in doc.where.items() if p[: len(at)] == at})
    merged, where_map = _merge(preset, over, (), (), at)
    # Drop stale locations under `at`, then install the merged ones.
    for p in [p for p in doc.where if p[: len(at)] == at and p != at]:
        del doc.where[p]
    doc.where.update({p: w for p, w in where_map.items() if p != at})
    parent = doc.data
    for p in at[:-1]:
        parent = parent[p]
    if at:
        parent[at[-1]] = merged
    else:
        doc.data = merged
    return problems


def _display(file: Path) -> str:
    """A path for messages: relative to the working directory when it is inside it."""
    if not file.is_absolute():
        return str(file)
    try:
        rel = os.path.relpath(file)
    except ValueError:
        return str(file)
    return str(file) if rel.startswith("..") else rel


# -- --set overrides ------------------------------------------------------------------------------
def apply_set(doc: Located, assignment: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as a YAML scalar/flow value.
    What it sets (and every mapping it creates on the way) is located at the `--set` itself, so
    a message about it blames the override, not the spec file."""
    key, sep, raw = assignment.partition("=")
    origin = f"--set {cut(assignment)}"
    if not sep or not key.strip():
        raise SpecError([f"{origin}: expected KEY=VALUE, e.g. --set eval.samples=16"])
    parts = key.strip().split(".")
    try:
        if raw.strip():
            _check_depth(raw, origin, lines=False)
        node = yaml.compose(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise SpecError([f"{origin}: cannot parse the value: {cut(str(e))}"]) from None
    located: dict[Path_, Where] = {}
    if node is not None:  # as a spec's value: aliases bounded, every part located at the --set
        value = _node_to_data(node, origin, located, tuple(parts), lines=False)
    else:
        value = "" if not raw.strip() else None
    node = doc.data
    created: Path_ | None = None  # the first mapping this override creates
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part) if isinstance(node, dict) else None
        if nxt is None:
            nxt = {}
            node[part] = nxt
            created = created or tuple(parts[: i + 1])
        elif not isinstance(nxt, dict):
            raise SpecError([f"{origin}: {cut('.'.join(parts[: i + 1]))} is not a mapping"])
        node = nxt
    node[parts[-1]] = value
    path = created or tuple(parts)
    for p in [p for p in doc.where if p[: len(path)] == path]:
        del doc.where[p]
    for n in range(len(path), len(parts) + 1):
        doc.where[tuple(parts[:n])] = (origin, 0)
    doc.where.update(located)


# -- validation ----------------------------------------------------------------------------------
def _pydantic_problems(err: ValidationError, doc: Located, prefix: Path_ = ()) -> list[str]:
    out = []
    for e in err.errors(include_url=False):
        # union tags ("@litellm", see schema.AnyModelSpec) are not part of the user's path
        loc = prefix + tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("@")))
        msg = e["msg"]
        if e["type"] == "invalid_backend":
            loc += ("backend",)
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `leafe validate --help` or the README list the fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "value_error" and "error" in e.get("ctx", {}):
            msg = str(e["ctx"]["error"])  # our validators' own words, without "Value error, "
        elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
            msg += f" (got {shown(e['input'])})"
        out.append(_problem(doc.locate(loc), loc, msg))
    return out


def _reuse_problems(configs: dict[str, BaseModel], types: dict[str, str], doc: Located) -> list[str]:
    """`reuse:` must name another method of the spec of the same type that does not start
    from this one (its stages would depend on the stages they replace)."""
    out = []
    for name, cfg in configs.items():
        other = getattr(cfg, "reuse", None)
        if other is None:
            continue
        at = ("methods", name, "reuse")
        if other == name:
            why = "a method cannot reuse its own stages"
        elif other not in configs:
            why = f"names {shown(other)}, which is not a method of this spec ({', '.join(configs)})"
        elif types[other] != types[name]:
            why = (f"{other!r} is a {types[other]} method and {name!r} a {types[name]} one: only a method "
                   "of the same type has stages to share")
        else:
            chain, cur = [], getattr(configs[other], "init", None)
            while cur is not None and cur in configs and cur not in chain:
                chain.append(cur)
                cur = getattr(configs[cur], "init", None)
            if name not in chain:
                continue
            why = f"{other!r} starts from {name!r} (init:), so {name!r} cannot share {other!r}'s stages"
        out.append(_problem(doc.locate(at), at, why))
    return out


@dataclass
class LoadedSpec:
    """A validated spec with everything resolved."""

    spec: Spec
    methods: dict[str, BaseModel]
    """Per method instance, its validated config (the method's own model)."""
    method_types: dict[str, str]
    """Per method instance, the registered method type."""
    env_options: BaseModel
    """The environment adapter's validated options."""
    file: Path | None
    doc: Located
    """The merged YAML (presets and --set applied) with origins, for messages."""
    smoke: list[str] | None = None
    """Set on the smoke run of a spec (`leafe.smoke.smoke_spec`, `--smoke`): what the smoke
    transformation changed, one line each. None for a spec as written."""

    def where(self, *path: str | int) -> str:
        w = self.doc.locate(path)
        return _fmt_where(w) if w else "<spec>"

    def with_seed(self, seed: int) -> "LoadedSpec":
        """This spec under master seed `seed` (one run of a multi-seed experiment)."""
        import dataclasses

        return dataclasses.replace(self, spec=self.spec.model_copy(update={"seed": seed}))

    def for_method(self, name: str) -> "LoadedSpec":
        """This spec as method `name`'s stages see it: its own `models:` roles (reflector,
        teacher) in place of the spec's; itself when the method names none (or `name` is not a
        method, e.g. an evaluation's id)."""
        import dataclasses

        own = getattr(self.methods.get(name), "models", None)
        roles = own.model_dump(exclude_unset=True) if own is not None else {}
        if not roles:
            return self
        models = self.spec.models.model_copy(update={r: getattr(own, r) for r in roles})
        return dataclasses.replace(self, spec=self.spec.model_copy(update={"models": models}))

    def per_seed(self) -> list["LoadedSpec"]:
        """One LoadedSpec per master seed the experiment runs under (`Spec.run_seeds`)."""
        return [self.with_seed(s) for s in self.spec.run_seeds()]


def load_dump(spec: dict[str, Any], method_order: list[str] | None = None,
              overrides: list[str] | None = None) -> LoadedSpec:
    """A LoadedSpec again from `Spec.model_dump()` as a manifest or a launch job recorded it.
    `method_order`: the methods' order (the table's rows), which JSON written with sorted keys
    loses."""
    data = dict(spec)
    order = method_order or list(data["methods"])
    data["methods"] = {k: data["methods"][k] for k in order}
    return load_doc(Located(data), overrides or [], None)


def load_spec(file: str | Path, overrides: list[str] | None = None) -> LoadedSpec:
    """Read, merge and validate a spec file. Raises SpecError listing every problem."""
    file = Path(file)
    doc = read_yaml(file, _display(file))
    return load_doc(doc, overrides or [], file)


def load_doc(doc: Located, overrides: list[str], file: Path | None = None) -> LoadedSpec:
    if not isinstance(doc.data, dict):
        raise SpecError([_problem(doc.locate(()), (), "a spec must be a YAML mapping")])
    # The version first: a spec of another version may have a different shape entirely.
    if "leafe" not in doc.data:
        raise SpecError([_problem(doc.locate(()), ("leafe",), "missing the spec format version; "
                                  f"add `leafe: {SUPPORTED_VERSIONS[-1]}` as the first line")])
    version = doc.data["leafe"]
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise SpecError([_problem(doc.locate(("leafe",)), ("leafe",),
                                  f"spec format version {shown(version)} is not supported; this release "
                                  f"reads version(s): {', '.join(map(str, SUPPORTED_VERSIONS))}")])
    for a in overrides:
        apply_set(doc, a)

    problems: list[str] = []
    if isinstance(doc.data.get("env"), dict) and "use" in doc.data["env"]:
        problems += _resolve_use(doc, ("env",), "envs", file)
    methods_raw = doc.data.get("methods")
    if isinstance(methods_raw, dict):
        for name, cfg in list(methods_raw.items()):
            msg = name_problem(name, "its stages' folders, runs/<name>/<method>.<stage>-<key>/", method=True)
            if msg:
                problems.append(_problem(doc.locate(("methods", name)), ("methods", name), msg))
                continue
            if cfg is None:
                methods_raw[name] = {}
            elif isinstance(cfg, dict) and "use" in cfg:
                problems += _resolve_use(doc, ("methods", name), "baselines", file)
    if problems:
        raise SpecError(problems)

    try:
        spec = Spec.model_validate(doc.data)
    except ValidationError as e:
        raise SpecError(_pydantic_problems(e, doc)) from None

    # Methods: each validated by its registered config model.
    from leafe import methods as method_registry

    configs: dict[str, BaseModel] = {}
    types: dict[str, str] = {}
    for name, raw in spec.methods.items():
        if not isinstance(raw, dict):
            problems.append(_problem(doc.locate(("methods", name)), ("methods", name),
                                     "must be a mapping of the method's fields (`{}` for defaults)"))
            continue
        mtype = raw.get("method", name)
        if mtype not in method_registry.registry:
            at = ("methods", name, "method") if "method" in raw else ("methods", name)
            problems.append(_problem(doc.locate(at), at, f"unknown method {shown(mtype)}; registered: "
                                     f"{', '.join(method_registry.names())} (set `method:` to one "
                                     "of them to name an instance differently)"))
            continue
        cls = method_registry.registry.get(mtype)
        try:
            configs[name] = cls.Config.model_validate({**raw, "method": mtype})
            types[name] = mtype
        except ValidationError as e:
            problems += _pydantic_problems(e, doc, ("methods", name))
    for name, cfg in configs.items():
        init = getattr(cfg, "init", None)
        if init is not None and init not in spec.methods:
            at = ("methods", name, "init")
            problems.append(_problem(doc.locate(at), at, f"init names {shown(init)}, which is not a "
                                     f"method of this spec ({', '.join(spec.methods)})"))
    problems += _reuse_problems(configs, types, doc)

    # Every method must be able to spend something under the budget.
    if not problems:
        from leafe.budget import budget_fit

        for name, msg in budget_fit(spec, configs, types)[1]:
            at = ("budget", "interactions_per_task")
            problems.append(_problem(doc.locate(at) or doc.locate(("methods", name)), at, msg))

    # The environment adapter's own options.
    from leafe import envs

    env_options: BaseModel | None = None
    if spec.env.adapter not in envs.registry:
        at = ("env", "adapter")
        problems.append(_problem(doc.locate(at), at, f"unknown environment {shown(spec.env.adapter)}; "
                                 f"registered: {', '.join(envs.names())}"))
    else:
        try:
            env_options = envs.env_class(spec.env.adapter).Options.model_validate(spec.env.options)
        except ValidationError as e:
            problems += _pydantic_problems(e, doc, ("env", "options"))

    # Prompts must fit the policy's context (where it is known), before compiling them: a
    # megabytes-long template would otherwise be tokenized at every step, minutes per episode.
    too_long = _prompt_problems(spec, doc)
    problems += too_long.values()
    # Templates must compile.
    from leafe.prompts import check_template

    for key in ("system", "user"):
        t = getattr(spec.env.prompt, key)
        if t is not None and key not in too_long:
            msg = check_template(t)
            if msg:
                at = ("env", "prompt", key)
                problems.append(_problem(doc.locate(at), at, f"template error: {msg}"))
    msg = check_template(spec.env.action.render)
    if msg:
        problems.append(_problem(doc.locate(("env", "action", "render")), ("env", "action", "render"),
                                 f"template error: {msg}"))
    for i, pair in enumerate(spec.report.compare):
        for j, m in enumerate(pair):
            if m not in spec.methods:
                at = ("report", "compare", i, j)
                problems.append(_problem(doc.locate(at), at, f"{shown(m)} is not a method of this spec "
                                         f"({', '.join(spec.methods)})"))
    if problems:
        raise SpecError(problems)
    assert env_options is not None
    loaded = LoadedSpec(spec, configs, types, env_options, file, doc)
    problems = _whole_spec_problems(loaded)
    if problems:
        raise SpecError(problems)
    return loaded


#: Characters one token covers at most, generously: byte-level BPE vocabularies' longest
#: tokens (runs of spaces or dashes) are shorter, English averages about 4. A prompt longer than
#: the context times this cannot fit it, whatever the tokenizer.
MAX_CHARS_PER_TOKEN = 256
#: Context lengths (tokens) of the built-in models (`leafe.models.builtin`): their configs'
#: max_position_embeddings.
BUILTIN_CONTEXT = {"leafe:tiny-qwen2": 8192, "leafe:smollm2-135m-instruct": 8192}


def model_context(model: Any) -> tuple[int, str] | None:
    """The context length in tokens of a model spec, and where it comes from, when it is known
    without loading anything: a built-in's, vLLM's `max_model_len`, or a local directory's
    config.json. None otherwise (hub ids, API models)."""
    limit = getattr(model, "max_model_len", None)
    if limit:
        return limit, "its max_model_len"
    name = getattr(model, "name", None)
    if not isinstance(name, str) or getattr(model, "backend", None) == "litellm":
        return None
    if name in BUILTIN_CONTEXT:
        return BUILTIN_CONTEXT[name], name
    try:
        config = Path(os.path.expanduser(name)) / "config.json"
        if not config.is_file():
            return None
        import json

        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key], f"{cut(name)}/config.json"
    return None


def _prompt_problems(spec: Spec, doc: Located) -> dict[str, str]:
    """Per prompt template (`system`, `user`) that cannot fit the policy's context, why."""
    known = model_context(spec.models.policy)
    if known is None:
        return {}
    tokens, source = known
    out = {}
    for key in ("system", "user"):
        t = getattr(spec.env.prompt, key)
        if t is not None and len(t) > tokens * MAX_CHARS_PER_TOKEN:
            at = ("env", "prompt", key)
            out[key] = _problem(doc.locate(at), at, (
                f"{len(t)} characters cannot fit the policy's context of {tokens} tokens ({source}): "
                f"even at {MAX_CHARS_PER_TOKEN} characters a token it would take {len(t) // MAX_CHARS_PER_TOKEN} "
                "tokens; shorten the prompt (it is sent at every step)"))
    return out


#: Prompt templates longer than this (characters) are named by `validate` and `run`: every
#: policy step renders and tokenizes them, so a run can seem stuck.
LONG_PROMPT = 100_000


def prompt_notes(spec: Spec) -> list[str]:
    """A line per prompt template long enough to slow every step (and that validation did not
    refuse: the policy's context is not known), saying what will be slow."""
    known = model_context(spec.models.policy)
    context = (f"the policy's context is {known[0]} tokens ({known[1]})" if known else
               "the policy's context is not known before the model loads")
    out = []
    for key in ("system", "user"):
        t = getattr(spec.env.prompt, key)
        if t is not None and len(t) > LONG_PROMPT:
            out.append(f"note: env.prompt.{key} is {len(t)} characters: every policy step renders and tokenizes "
                       f"it, which is slow, and it may not fit ({context})")
    return out


def _whole_spec_problems(loaded: LoadedSpec) -> list[str]:
    """Checks that need the whole validated spec: a role filled by the oracle (`reflector:
    oracle`) that some method calls needs an environment whose solver can diagnose; each
    method's own `Method.check`."""
    from leafe import envs
    from leafe import methods as registry
    from leafe.envs.oracle import OracleUnavailable, check_support

    spec, doc, out = loaded.spec, loaded.doc, []
    callers: dict[tuple[str, ...], list[str]] = {}  # where the oracle is named -> its callers
    for name, cfg in loaded.methods.items():
        method = registry.get(loaded.method_types[name])
        own = loaded.for_method(name).spec
        for role in dict.fromkeys(r for sd in method.stages(name, cfg, loaded) for r in sd.roles):
            if own.is_oracle(role):
                mine = getattr(getattr(cfg, "models", None), role, None) is not None
                at = ("methods", name, "models", role) if mine else ("models", role)
                callers.setdefault(at, []).append(name)
        for path, msg in method.check(name, cfg, loaded):
            at = ("methods", name, *path)
            out.append(_problem(doc.locate(at), at, msg))
    for at, names in callers.items():
        role = at[-1]
        try:
            check_support(envs.env_class(spec.env.adapter), loaded.env_options)
        except OracleUnavailable as e:
            out.append(_problem(doc.locate(at), at, f"methods.{names[0]} calls the {role}" + (f" (so do {', '.join(names[1:])})" if names[1:] else "") + f": {e}"))
    return out
