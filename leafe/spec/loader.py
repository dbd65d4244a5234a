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

from leafe.errors import SpecError, UserError
from leafe.spec.schema import SUPPORTED_VERSIONS, Spec

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
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _problem(where: Where | None, path: Path_, msg: str) -> str:
    loc = f"{where[0]}:{where[1]}" if where else "<spec>"
    return f"{loc}: {_fmt_path(path)}: {msg}"


# -- YAML with locations ------------------------------------------------------------------------
def _node_to_data(node: yaml.Node, origin: str, path: Path_, where: dict[Path_, Where]) -> Any:
    where[path] = (origin, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for k_node, v_node in node.value:
            key = yaml.safe_load(yaml.serialize(k_node)) if k_node.tag != "tag:yaml.org,2002:str" else k_node.value
            if not isinstance(key, str):
                raise SpecError([_problem((origin, k_node.start_mark.line + 1), path, f"mapping key {key!r} must be a string")])
            if key in out:
                raise SpecError([_problem((origin, k_node.start_mark.line + 1), path + (key,), "duplicate key")])
            out[key] = _node_to_data(v_node, origin, path + (key,), where)
            where[path + (key,)] = (origin, k_node.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_data(n, origin, path + (i,), where) for i, n in enumerate(node.value)]
    # A scalar: let PyYAML's safe resolver type it (int, float, bool, null, str).
    return yaml.safe_load(yaml.serialize(node))


def read_yaml(file: Path, display: str | None = None) -> Located:
    """Parse one YAML file, keeping the line of every node."""
    origin = display or str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{origin}: no such file") from None
    except OSError as e:
        raise UserError(f"{origin}: cannot read: {e.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else 1
        what = getattr(e, "problem", None) or str(e)
        ctx = getattr(e, "context", None)
        msg = f"YAML syntax error: {what}" + (f" ({ctx})" if ctx else "")
        raise SpecError([f"{origin}:{line}: {msg}; fix the YAML syntax at that line"]) from None
    if node is None:
        return Located({}, {(): (origin, 1)})
    where: dict[Path_, Where] = {}
    data = _node_to_data(node, origin, (), where)
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
        return [_problem(where, at + ("use",), f"must be a preset name (string), got {name!r}")]
    if name in chain:
        return [_problem(where, at + ("use",), f"preset cycle: {' -> '.join(chain + (name,))}")]
    file = _find_preset(kind, name, spec_file)
    if file is None:
        avail = available_presets(kind, spec_file)
        return [_problem(where, at + ("use",), f"unknown preset {name!r}; presets in {kind}/: "
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
    """Apply one `dotted.key=value` override; the value is parsed as a YAML scalar/flow value."""
    key, sep, raw = assignment.partition("=")
    origin = f"--set {assignment}"
    if not sep or not key.strip():
        raise SpecError([f"{origin}: expected KEY=VALUE, e.g. --set eval.samples=16"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise SpecError([f"{origin}: cannot parse the value: {e}"]) from None
    parts = key.strip().split(".")
    node = doc.data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part) if isinstance(node, dict) else None
        if nxt is None:
            nxt = {}
            node[part] = nxt
        elif not isinstance(nxt, dict):
            raise SpecError([f"{origin}: {'.'.join(parts[: i + 1])} is not a mapping"])
        node = nxt
    node[parts[-1]] = value
    path = tuple(parts)
    for p in [p for p in doc.where if p[: len(path)] == path]:
        del doc.where[p]
    doc.where[path] = (origin, 0)


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
        elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
            msg += f" (got {e['input']!r})"
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
            why = f"names {other!r}, which is not a method of this spec ({', '.join(configs)})"
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
        return f"{w[0]}:{w[1]}" if w else "<spec>"

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
                                  f"spec format version {version!r} is not supported; this release "
                                  f"reads version(s): {', '.join(map(str, SUPPORTED_VERSIONS))}")])
    for a in overrides:
        apply_set(doc, a)

    problems: list[str] = []
    if isinstance(doc.data.get("env"), dict) and "use" in doc.data["env"]:
        problems += _resolve_use(doc, ("env",), "envs", file)
    methods_raw = doc.data.get("methods")
    if isinstance(methods_raw, dict):
        for name, cfg in list(methods_raw.items()):
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
            problems.append(_problem(doc.locate(at), at, f"unknown method {mtype!r}; registered: "
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
            problems.append(_problem(doc.locate(at), at, f"init names {init!r}, which is not a "
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
        problems.append(_problem(doc.locate(at), at, f"unknown environment {spec.env.adapter!r}; "
                                 f"registered: {', '.join(envs.names())}"))
    else:
        try:
            env_options = envs.env_class(spec.env.adapter).Options.model_validate(spec.env.options)
        except ValidationError as e:
            problems += _pydantic_problems(e, doc, ("env", "options"))

    # Templates must compile.
    from leafe.prompts import check_template

    for key in ("system", "user"):
        t = getattr(spec.env.prompt, key)
        if t is not None:
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
                problems.append(_problem(doc.locate(at), at, f"{m!r} is not a method of this spec "
                                         f"({', '.join(spec.methods)})"))
    if problems:
        raise SpecError(problems)
    assert env_options is not None
    loaded = LoadedSpec(spec, configs, types, env_options, file, doc)
    problems = _whole_spec_problems(loaded)
    if problems:
        raise SpecError(problems)
    return loaded


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
