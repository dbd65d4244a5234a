"""The run manifest: everything needed to know what produced a run directory."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import leafe
from leafe.budget import method_budget
from leafe.plan import Plan
from leafe.spec.loader import LoadedSpec
from leafe.store import atomic_write_json, read_json

PACKAGES = ["leafe", "pydantic", "typer", "rich", "pyyaml", "jinja2", "numpy", "torch",
            "transformers", "trl", "peft", "accelerate", "tokenizers", "gguf", "gym-sokoban",
            "vllm", "litellm"]


def package_versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_revision(cwd: Path | None = None) -> dict:
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    # The leafe source tree when it is a checkout; else the current directory's repository.
    src = Path(leafe.__file__).resolve().parent.parent
    rev = git("-C", str(src), "rev-parse", "HEAD")
    dirty = git("-C", str(src), "status", "--porcelain", "--untracked-files=no")
    return {"revision": rev, "dirty": bool(dirty) if dirty is not None else None, "tree": str(src)}


def host() -> dict:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "cpus": os.cpu_count()}
    torch = sys.modules.get("torch")  # only when the run already loaded it: a cached re-run stays light
    if torch is not None and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def roles(loaded: LoadedSpec) -> dict[str, dict]:
    """What fills each model role: the policy's spec, `{same_as: policy}`, another model's spec,
    or `{backend: oracle, env: <adapter>}` where the environment's solver reflects (privileged
    information, so a reader of the manifest sees it without reading the spec). A method with
    roles of its own (`methods.<name>.models`) adds `by_method: {name: {role: ...}}`."""
    out = _roles_of(loaded.spec, ("policy", "reflector", "teacher"))
    own = {name: _roles_of(loaded.for_method(name).spec, [r for r in ("reflector", "teacher")
                                                         if getattr(cfg.models, r) is not None])
           for name, cfg in loaded.methods.items() if getattr(cfg, "models", None) is not None}
    if own := {k: v for k, v in own.items() if v}:
        out["by_method"] = own
    return out


def _roles_of(spec: Any, names: Any) -> dict[str, dict]:
    out = {}
    for role in names:
        value = getattr(spec.models, role)
        if spec.is_oracle(role):
            out[role] = {"backend": "oracle", "env": spec.env.adapter}
        elif value == "policy" and role != "policy":
            out[role] = {"same_as": "policy"}
        else:
            out[role] = spec.role(role).model_dump(mode="json")
    return out


def manifest_path(loaded: LoadedSpec, plan: Plan) -> Path:
    """runs/<name>/manifest.json; one `manifest.seed-<N>.json` per seed of a multi-seed spec. A
    spec that shares another's run directory (`run_dir`) writes `manifest.<name>[.seed-<N>].json`
    there, so the directory's own spec keeps its manifest."""
    spec = loaded.spec
    stem = "manifest" if spec.run_name() == spec.name else f"manifest.{spec.name}"
    if len(spec.run_seeds()) > 1:
        return plan.root / f"{stem}.seed-{spec.seed}.json"
    return plan.root / f"{stem}.json"


def write_manifest(loaded: LoadedSpec, plan: Plan, threads: dict | None = None) -> Path:
    """`threads`: what torch used in the `leafe run` that writes it (`leafe.threads.apply`);
    None keeps the previous manifest's (a run with nothing left to do starts no torch)."""
    path = manifest_path(loaded, plan)
    created = None
    if path.exists():
        try:
            previous = read_json(path)
        except (OSError, ValueError):  # unreadable: rewritten whole below
            previous = None
        if isinstance(previous, dict):
            created = previous.get("created")
            if threads is None:
                threads = previous.get("threads")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    stages = []
    models = {}
    usage = {}
    for s in plan.stages:
        entry = {"id": s.id, "kind": s.kind, "hash": s.hash, "dir": s.dirname if s.kind != "report" else None,
                 "deps": s.deps, "status": plan.status(s)}
        model_file = plan.dir(s) / "model.json"
        if model_file.exists():
            models[s.id] = read_json(model_file)
        usage_file = plan.dir(s) / "usage.json"
        if usage_file.exists():
            usage[s.id] = read_json(usage_file)
        stages.append(entry)
    atomic_write_json(path, {
        "leafe_version": leafe.__version__,
        "spec_file": str(loaded.file) if loaded.file else None,
        "spec": loaded.spec.model_dump(mode="json"),
        "methods": {k: v.model_dump(mode="json") for k, v in loaded.methods.items()},
        "method_order": list(loaded.methods),  # JSON objects are written with sorted keys
        "smoke": loaded.smoke,  # a smoke run (`--smoke`): what leafe.smoke changed
        "env_options": loaded.env_options.model_dump(mode="json"),
        "roles": roles(loaded),
        "seeds": {"master": loaded.spec.seed,
                  "derivation": "sha256 of (master, stage, chunk/turn names); see leafe.seeds"},
        "stages": stages,
        "models": models,
        "usage": usage,
        "budget": {"interactions_per_task": loaded.spec.budget.interactions_per_task,
                   "methods": {m: method_budget(plan, m, loaded.spec.budget.interactions_per_task)
                               for m in loaded.methods}},
        "packages": package_versions(),
        "git": git_revision(),
        "host": host(),
        "threads": threads,  # torch's CPU threads (runtime.threads; see leafe.threads)
        "created": created or now,
        "updated": now,
    })
    return path
