"""The spec format as JSON Schema (for editors) and as a Markdown reference page.

`spec_json_schema()` is the JSON Schema (draft 2020-12) of spec format 1 as written in a file:
the `Spec` model of `leafe.spec.schema`, each registered method's config (chosen by the block's
`method:`, else its `use:` preset's method, else its key in `methods:`) and each environment
adapter's `Options` (chosen by `env.adapter`, else by the adapter of the `env.use` preset), every
field's docstring as its `description`. `reference_markdown()` renders the same schema as
`docs/spec-reference.md`. `leafe schema --write` rebuilds both committed files; a test fails
when they are stale.

What JSON Schema cannot say is left to `leafe validate`: cross-field rules (`eval.k` <=
`eval.samples`, `init:` naming a method of the spec, ...), templates, and presets outside this
checkout (`$LEAFE_PRESETS`, a project's own `envs/`): the schema knows the shipped presets only.
Built-in methods and adapters only, so the output does not depend on installed plugins.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from leafe.spec.schema import MAX_NAME, SUPPORTED_VERSIONS, Spec, _FILE_NAME, _METHOD_NAME

#: Where the committed files live, relative to the checkout's root.
SCHEMA_FILE = Path("schema/leafe-spec-1.json")
REFERENCE_FILE = Path("docs/spec-reference.md")
#: The line every shipped spec starts with (editors running yaml-language-server read it).
EDITOR_LINE = f"# yaml-language-server: $schema=../{SCHEMA_FILE.as_posix()}"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
REF = "#/$defs/"


# -- field docstrings -----------------------------------------------------------------------------
def _attribute_docstrings(cls: type) -> dict[str, str]:
    """`{field: docstring}` of the string literals written right after a class's annotated
    fields (its own body only)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(src)
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
    out = {}
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            out[a.target.id] = inspect.cleandoc(b.value.value)
    return out


def _field_docstrings(cls: type[BaseModel]) -> dict[str, str]:
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if isinstance(base, type) and issubclass(base, BaseModel) and base is not BaseModel:
            out.update(_attribute_docstrings(base))
    return out


def _jsonable(v: Any) -> Any:
    try:
        return json.loads(json.dumps(v))
    except (TypeError, ValueError):
        return None


class _Generator(GenerateJsonSchema):
    """pydantic's generator, plus: each field's docstring as its `description` (leafe's models
    document fields with docstrings), the defaults of fields with a `default_factory` (lists,
    mappings), and no generated `title`s (the field name says it)."""

    def model_schema(self, schema: Any) -> Any:
        out = super().model_schema(schema)
        cls = schema["cls"]
        props = out.get("properties") if isinstance(out, dict) else None
        if not props:
            return out
        docs = _field_docstrings(cls)
        for name, info in cls.model_fields.items():
            prop = props.get(info.alias or name)
            if prop is None:
                continue
            if "description" not in prop and name in docs:
                prop["description"] = docs[name]
            if "default" not in prop and info.default_factory is not None:
                value = info.get_default(call_default_factory=True)
                if not isinstance(value, BaseModel):
                    value = _jsonable(value)
                    if value is not None:
                        prop["default"] = value
        return out

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


# -- registries and presets -----------------------------------------------------------------------
def _builtin(registry: Any) -> list[str]:
    return sorted(registry.builtin)


def _preset_dir(kind: str) -> Path | None:
    """The shipped presets of `kind` ("envs", "baselines"): the checkout's, else the installed copy's."""
    pkg = Path(__file__).resolve().parent.parent
    for d in (pkg.parent / kind, pkg / "_presets" / kind):
        if d.is_dir():
            return d
    return None


def shipped_presets(kind: str, field: str) -> dict[str, str | None]:
    """`{preset name: value of field}` for the shipped presets of `kind`, following their `use:`
    chains (e.g. the adapter of each `envs/` preset, the method of each `baselines/` one)."""
    d = _preset_dir(kind)
    if d is None:
        return {}
    raw = {}
    for p in sorted(d.glob("*.yaml")):
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
        raw[p.stem] = data if isinstance(data, dict) else {}

    def value(name: str, seen: tuple[str, ...] = ()) -> str | None:
        data = raw.get(name, {})
        if field in data:
            return data[field]
        up = data.get("use")
        return value(up, seen + (name,)) if isinstance(up, str) and up not in seen else None

    return {name: value(name) for name in raw}


# -- the schema -----------------------------------------------------------------------------------
def _method_def(name: str) -> str:
    return f"method.{name}"


def _options_def(name: str) -> str:
    return f"env-options.{name}"


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of spec format 1 (see the module docstring)."""
    from leafe import envs
    from leafe import methods as method_registry

    method_names = _builtin(method_registry.registry)
    adapters = _builtin(envs.registry)
    configs = {m: method_registry.registry.get(m).Config for m in method_names}
    options = {a: envs.env_class(a).Options for a in adapters}
    models: list[tuple[type[BaseModel], str]] = [(Spec, "validation")]
    models += [(c, "validation") for c in configs.values()] + [(o, "validation") for o in options.values()]
    top, defs_wrap = models_json_schema(models, schema_generator=_Generator)
    defs: dict[str, Any] = defs_wrap["$defs"]

    def ref_name(model: type[BaseModel]) -> str:
        return top[(model, "validation")]["$ref"][len(REF):]

    # Readable names for the method configs and adapter options.
    renames = {ref_name(c): _method_def(m) for m, c in configs.items()}
    renames.update({ref_name(o): _options_def(a) for a, o in options.items()})
    spec_def = ref_name(Spec)
    text = json.dumps(defs)
    for old, new in renames.items():
        text = text.replace(json.dumps(REF + old), json.dumps(REF + new))
    defs = {renames.get(k, k): v for k, v in json.loads(text).items()}
    root = defs.pop(spec_def)

    env_presets = shipped_presets("envs", "adapter")
    method_presets = shipped_presets("baselines", "method")

    # Version and names.
    props = root["properties"]
    props["leafe"] = {**props["leafe"], "enum": list(SUPPORTED_VERSIONS)}
    name_rule = {"pattern": f"^{_FILE_NAME.pattern}$", "maxLength": MAX_NAME}
    props["name"].update(name_rule)
    for alt in props["run_dir"]["anyOf"]:
        if alt.get("type") == "string":
            alt.update(name_rule)

    # Model roles: a role without `backend` is a transformers model, so the other backends need it.
    for cls in ("VLLMModelSpec", "LiteLLMModelSpec"):
        d = defs[cls]
        d["required"] = ["backend"] + [r for r in d.get("required", []) if r != "backend"]

    # The environment: `use:` a shipped preset (which then fills any field), or `adapter` and
    # `prompt` inline; `options` validated by the adapter's options model.
    env = defs["EnvSpec"]
    env["properties"] = {"use": {
        "enum": sorted(env_presets),
        "description": "A preset: `envs/<name>.yaml` (the shipped ones are listed here), merged under "
                       "the fields given inline (mappings merge, other values replace).",
    }, **env["properties"]}
    env["properties"]["adapter"]["enum"] = adapters
    env.pop("required", None)
    defs["PromptSpec"].pop("required", None)  # a preset may give `user`
    conds: list[dict[str, Any]] = [{
        "if": {"not": {"required": ["use"]}},
        "then": {"required": ["adapter", "prompt"], "properties": {"prompt": {"required": ["user"]}}},
    }]
    for a in adapters:
        chosen: list[dict[str, Any]] = [{"required": ["adapter"], "properties": {"adapter": {"const": a}}}]
        via = sorted(p for p, ad in env_presets.items() if ad == a)
        if via:
            chosen.append({"not": {"required": ["adapter"]}, "required": ["use"],
                           "properties": {"use": {"enum": via}}})
        conds.append({"if": {"anyOf": chosen}, "then": {"properties": {"options": {"$ref": REF + _options_def(a)}}}})
    env["allOf"] = conds

    # Methods: a block's type is its `method:`, else its `use:` preset's method, else its key.
    for m in method_names:
        d = defs[_method_def(m)]
        d["required"] = [r for r in d.get("required", []) if r != "method"]
        if not d["required"]:
            d.pop("required")
        d["properties"] = {"use": {"$ref": REF + "method-preset"}, **d["properties"]}
        d["properties"]["method"] = {**d["properties"]["method"], "enum": method_names}
    defs["method-preset"] = {
        "enum": sorted(method_presets),
        "description": "A preset: `baselines/<name>.yaml` (the shipped ones are listed here), merged "
                       "under the fields given inline (mappings merge, other values replace).",
    }

    def dispatch(default: str | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in method_names:
            out.append({"if": {"type": "object", "required": ["method"], "properties": {"method": {"const": m}}},
                        "then": {"$ref": REF + _method_def(m)}})
            via = sorted(p for p, mt in method_presets.items() if mt == m)
            if via:
                out.append({"if": {"type": "object", "not": {"required": ["method"]}, "required": ["use"],
                                   "properties": {"use": {"enum": via}}},
                            "then": {"$ref": REF + _method_def(m)}})
        given = {"anyOf": [{"required": ["method"]}, {"required": ["use"]}]}
        if default is None:
            out.append(given)
        else:
            out.append({"if": {"type": "object", "not": given}, "then": {"$ref": REF + _method_def(default)}})
        return out

    common = {"type": "object", "properties": {"method": {"enum": method_names},
                                               "use": {"$ref": REF + "method-preset"}}}
    defs["method-block"] = {
        **common, "allOf": dispatch(None),
        "description": "A method under a name of your choice: give `method:` (a registered method) or "
                       "`use:` (a preset that names one). Its fields are the method's config.",
    }
    method_props = {}
    for m in method_names:
        defs[f"method-block.{m}"] = {
            **common, "type": ["object", "null"], "allOf": dispatch(m),
            "description": f"The `{m}` method (its config unless `method:` or `use:` says otherwise); "
                           "null or `{}` for its defaults.",
        }
        method_props[m] = {"$ref": REF + f"method-block.{m}"}
    props["methods"] = {
        "type": "object",
        "description": props["methods"].get("description", ""),
        "minProperties": 1,
        "propertyNames": {"pattern": f"^{_METHOD_NAME.pattern}$", "maxLength": MAX_NAME},
        "properties": method_props,
        "additionalProperties": {"$ref": REF + "method-block"},
    }

    return {"$schema": DRAFT, **root, "title": "leafe spec, format version 1",
            "$defs": dict(sorted(defs.items()))}


def schema_text() -> str:
    """The schema file's text."""
    return json.dumps(spec_json_schema(), indent=2, ensure_ascii=False) + "\n"


# -- the reference page ---------------------------------------------------------------------------
#: Fields required when the spec gives them itself, not when a preset may (`env.use`).
UNLESS_PRESET = {("EnvSpec", "adapter"), ("EnvSpec", "prompt"), ("PromptSpec", "user")}

def _anchor(title: str) -> str:
    """GitHub's heading anchor."""
    out = "".join(c for c in title.lower() if c.isalnum() or c in " -_").replace(" ", "-")
    return out


def _one_line(text: str) -> str:
    """Markdown table cell text: paragraphs kept apart, pipes escaped."""
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return "<br><br>".join(p for p in paras if p).replace("|", "\\|")


class _Reference:
    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self.defs = schema["$defs"]
        self.titles: dict[str, str] = {}  # def name -> section title
        self.order: list[str] = []
        self.used: dict[str, list[str]] = {}  # def name -> the fields that hold it
        self.named = False  # title new sections by their model's name (not their path)
        self.listed: set[str] = set()  # sections that list where they are used

    def assign(self, name: str, title: str) -> None:
        if name not in self.titles:
            self.titles[name] = title
            self.order.append(name)

    def walk(self, node: Any, path: str) -> None:
        """Assign a section to every model def reachable from `node` (at dotted `path`)."""
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref and ref.startswith(REF):
                name = ref[len(REF):]
                d = self.defs[name]
                if "properties" in d and not name.startswith("method"):
                    self.used.setdefault(name, [])
                    if path not in self.used[name]:
                        self.used[name].append(path)
                    new = name not in self.titles
                    if new:
                        self.assign(name, name if self.named else f"{path} ({name})")
                        if self.named:
                            self.listed.add(name)
                    if new or (self.named and path.count(".") < 8):  # where nested ones are used, too
                        for k, v in d["properties"].items():
                            self.walk(v, f"{path}.{k}")
            for k, v in node.items():
                if k in ("anyOf", "oneOf", "allOf", "items", "additionalProperties", "prefixItems"):
                    self.walk(v, path + ("[]" if k == "items" else ""))
        elif isinstance(node, list):
            for v in node:
                self.walk(v, path)

    def type_of(self, node: dict[str, Any]) -> str:
        if "$ref" in node:
            name = node["$ref"][len(REF):]
            if name.startswith("method-block"):
                return "a method block ([Methods](#methods))"
            if name in self.titles:
                return f"[{name}](#{_anchor(self.titles[name])})"
            return self.type_of(self.defs[name])
        if "const" in node:
            return f"`{json.dumps(node['const'])}`"
        if "enum" in node:
            return "one of: " + ", ".join(f"`{json.dumps(v) if not isinstance(v, str) else v}`" for v in node["enum"])
        for key in ("anyOf", "oneOf"):
            if key in node:
                alts = [a for a in node[key] if a.get("type") != "null"]
                out = " or ".join(dict.fromkeys(self.type_of(a) for a in alts))
                return out + (" or null" if len(alts) < len(node[key]) else "")
        t = node.get("type")
        bounds = []
        for k, sym in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
            if k in node:
                bounds.append(f"{sym} {node[k]}")
        for k, what in (("minItems", "at least {} items"), ("maxLength", "at most {} characters")):
            if k in node and not (k == "minItems" and "prefixItems" in node):
                bounds.append(what.format(node[k]))
        if t == "array":
            if "prefixItems" in node:
                base = "[" + ", ".join(self.type_of(a) for a in node["prefixItems"]) + "]"
            else:
                item = self.type_of(node.get("items", {}))
                base = f"list, each {item}" if item.startswith("one of") else f"list of {item}"
        elif t == "object":
            extra = node.get("additionalProperties")
            base = f"mapping of {self.type_of(extra)}" if isinstance(extra, dict) and extra else "mapping"
        elif t:
            base = t
        else:
            base = "any"
        return base + (f" ({', '.join(bounds)})" if bounds else "")

    def table(self, d: dict[str, Any], name: str = "") -> list[str]:
        required = set(d.get("required", []))
        lines = ["| field | type | default | description |", "|---|---|---|---|"]
        for k, v in d.get("properties", {}).items():
            if (name, k) in UNLESS_PRESET:
                default = "required unless `env.use` gives it"
            elif k in required:
                default = "required"
            elif "default" in v:
                default = f"`{json.dumps(v['default'], ensure_ascii=False)}`"
            elif "$ref" in v and "properties" in self.defs.get(v["$ref"][len(REF):], {}):
                default = "its defaults"
            else:
                default = ""
            kind = self.type_of(v)
            if (name, k) == ("EnvSpec", "options"):
                kind = "mapping: the adapter's options ([Environments](#environments))"
            desc = v.get("description") or self.defs.get(v.get("$ref", "")[len(REF):], {}).get("description", "")
            lines.append(f"| `{k}` | {kind.replace('|', chr(92) + '|')} | "
                         f"{default.replace('|', chr(92) + '|')} | {_one_line(desc)} |")
        return lines

    def section(self, name: str, level: str = "###") -> list[str]:
        d = self.defs[name] if name in self.defs else self.schema
        out = [f"{level} {self.titles[name]}", ""]
        if d.get("description"):
            out += [d["description"].strip(), ""]
        if name in self.listed:
            out += ["Where (method or adapter, then field): " + ", ".join(f"`{p}`" for p in self.used[name]), ""]
        return out + self.table(d, name) + [""]


def reference_markdown(schema: dict[str, Any] | None = None) -> str:
    """`docs/spec-reference.md`: one section per block of the spec, per method and per
    environment adapter: each field's type, default and docstring."""
    schema = schema or spec_json_schema()
    ref = _Reference(schema)
    env_presets = shipped_presets("envs", "adapter")
    method_presets = shipped_presets("baselines", "method")
    defs = ref.defs
    ref.titles["(spec)"] = "The spec (top level)"
    for k, v in schema["properties"].items():
        if k != "methods":
            ref.walk(v, k)
    methods = sorted(n[len("method."):] for n in defs if n.startswith("method.") and "block" not in n)
    adapters = sorted(n[len("env-options."):] for n in defs if n.startswith("env-options."))
    blocks = list(ref.order)
    for m in methods:
        ref.assign(_method_def(m), f"methods.<name> with method: {m}")
    ref.named = True
    for m in methods:
        for k, v in defs[_method_def(m)]["properties"].items():
            ref.walk(v, f"{m}.{k}")
    method_parts = [n for n in ref.order if n not in blocks]
    for a in adapters:
        ref.assign(_options_def(a), f"env.options with adapter: {a}")
    for a in adapters:
        for k, v in defs[_options_def(a)]["properties"].items():
            ref.walk(v, f"{a}.{k}")
    env_parts = [n for n in ref.order if n not in blocks and n not in method_parts]

    out = ["<!-- Generated by `leafe schema --write` from leafe's pydantic models (leafe/spec/export.py); "
           "do not edit: edit the docstrings and run it again. -->", "",
           "# Spec reference (format version 1)", "",
           "Every field of a spec, with its type, default and documentation, generated from the models "
           "that validate it (`leafe/spec/schema.py`, each method's config, each environment adapter's "
           "options). The same information is in the JSON Schema "
           f"[`{SCHEMA_FILE.as_posix()}`](../{SCHEMA_FILE.as_posix()}), which editors use for completion and "
           "checking (see the README, \"The spec\"). `leafe validate` checks more than the schema can: "
           "rules across fields, templates, presets outside this checkout.", "",
           "## Blocks", ""]
    root = dict(schema)
    out += [f"### {ref.titles['(spec)']}", "", root.get("description", ""), ""]
    out += ref.table({k: v for k, v in root.items() if k in ("properties", "required")})
    out.append("")
    for n in blocks:
        out += ref.section(n)
    out += ["## Methods", "",
            "A block of `methods:` is validated by the config of its method: its `method:`, else the "
            "method of its `use:` preset, else its key. `use` and the fields every method has (`method`, `init`, "
            "`reuse`, `extra`, `models`) come first in each table.", ""]
    out += _with_presets(ref, method_parts, "method.", method_presets)
    out += ["## Environments", "",
            "`env.options` is validated by the options of the environment adapter: `env.adapter`, else "
            "the adapter of the `env.use` preset.", ""]
    out += _with_presets(ref, env_parts, "env-options.", env_presets)
    return "\n".join(out).rstrip("\n") + "\n"


def _with_presets(ref, parts: list[str], prefix: str, presets: dict[str, str]) -> list[str]:
    """Sections of `parts`: a `prefix<name>` part (a method, an adapter's options) followed by
    the presets that select it; the others (their sub-models) one level down."""
    out: list[str] = []
    for n in parts:
        if n.startswith(prefix):
            via = sorted(p for p, target in presets.items() if target == n[len(prefix):])
            out += ref.section(n)[:-1]
            if via:
                out += ["", "Presets: " + ", ".join(f"`use: {p}`" for p in via)]
            out.append("")
        else:
            out += ref.section(n, "####")
    return out


def checkout_root() -> Path | None:
    """The leafe source checkout this module runs from (where the committed files live), or None
    for an installed copy."""
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "specs").is_dir() else None


def generated_files() -> dict[Path, str]:
    """`{path relative to the checkout: text}` of the committed generated files."""
    schema = spec_json_schema()
    return {SCHEMA_FILE: json.dumps(schema, indent=2, ensure_ascii=False) + "\n",
            REFERENCE_FILE: reference_markdown(copy.deepcopy(schema))}
