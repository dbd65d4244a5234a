"""What a plan will do, for people and tools: which model role runs where in every stage, and
upper bounds on the model calls, generated tokens and environment interactions of each stage,
derived from the spec alone (`leafe plan`, `leafe plan --json`). Light: no torch, transformers
or litellm; environments are asked for their task lists only (no episode runs).

Notation: T train tasks used (`env.train_tasks`, else the train split's size), E test tasks
(`env.test_tasks`, else the test split's size), S = `env.max_steps`, B = the per-task budget a
method's own stages may spend (`budget.interactions_per_task`; for methods that spend task by
task, at most `budget.interactions` // T), mt(role) = that role's `max_tokens`. A *call* is one
reply a model generates (a sample: `n` samples of one request are n calls); *tokens* are
generated tokens, at most calls x the reply's token limit. An unparsable reply is a call that
costs no interaction, which is why call bounds use S, not B.

| stage | calls (role) | interactions |
| --- | --- | --- |
| `eval.<m>` | policy: E x eval.samples x S | (not charged) |
| `sft.train` | none | T x min(B, S) (expert steps) |
| `rft.train` | policy: T x r x S, r = min(samples_per_task, B // S) | T x r x S |
| `grpo.train` | policy: iterations x tasks_per_iteration x group_size x S | min(that, T x B, budget.interactions) |
| `early_experience.explore` | policy: T x min(B, S) x alternatives | T x min(B, min(B, S) x (1 + alternatives)) |
| `early_experience.reflect` | teacher: T x min(min(B, S) x alternatives, B - 1) | none |
| `leafe.explore` | policy: T x max_attempts x S; reflector: T x max_attempts x P x branches_per_node x (1 + reflection.retries), P = floor(S / reflect_every) + 1 reflection points per attempt (1 with `rollback: false` or `reflect_every: null`; no reflector with `explore_mode: independent`) | min(T x B, T x max_attempts x S) |
| other training stages | none | none |

Tokens: calls x mt(policy) for the policy, x (`reflection.max_tokens` or mt(reflector)) for
LEAFE's reflector, x (`rationale.max_tokens` or mt(teacher)) for Early Experience's teacher.
A bound is null where T or E is unknown (the data is missing and the spec gives no
`env.train_tasks` / `env.test_tasks`); `per_task` still gives it per train (or test) task.
"""

from __future__ import annotations

from typing import Any

from leafe.plan import Plan, PlannedStage
from leafe.spec.loader import LoadedSpec


def task_counts(loaded: LoadedSpec) -> dict[str, int | None]:
    """Train and test tasks a run uses: the spec's `env.train_tasks` / `env.test_tasks` when
    set (at most that many), else the size of the environment's split (None where it cannot
    list it, e.g. its data is missing)."""
    from leafe import envs
    from leafe.errors import UserError

    spec = loaded.spec
    out: dict[str, int | None] = {"train": spec.env.train_tasks, "test": spec.env.test_tasks}
    if all(v is not None for v in out.values()):
        return out
    env = None
    try:
        env = envs.env_class(spec.env.adapter)(loaded.env_options)
        for key, split in (("train", "train"), ("test", spec.env.test_split)):
            if out[key] is None:
                try:
                    out[key] = len(env.tasks(split))
                except (UserError, OSError, ValueError):
                    pass
    finally:
        if env is not None:
            env.close()
    return out


def _mul(*xs: int | None) -> int | None:
    out = 1
    for x in xs:
        if x is None:
            return None
        out *= x
    return out


def _min(*xs: int | None) -> int | None:
    known = [x for x in xs if x is not None]
    return min(known) if known else None


def _role_tokens(loaded: LoadedSpec, role: str, override: int | None = None) -> int:
    if loaded.spec.is_oracle(role):
        return 0  # the environment's solver writes its replies without a model
    return override if override is not None else loaded.spec.role(role).max_tokens


def stage_bounds(loaded: LoadedSpec, stage: PlannedStage, counts: dict[str, int | None]) -> dict[str, Any]:
    """Upper bounds of one stage (see the module docstring): `calls` and `tokens` per role,
    `interactions`, `per_task` (calls per train task, or per test task for evaluation), the
    `formula` per role, and `known: false` for stages of methods this module has no formula for."""
    loaded = loaded.for_method(stage.method)  # the method's own reflector / teacher
    spec = loaded.spec
    T, E, S = counts["train"], counts["test"], spec.env.max_steps
    b = spec.budget
    out: dict[str, Any] = {"calls": {}, "tokens": {}, "interactions": None, "per_task": {}, "formula": {}}

    def add(role: str, per_task: int, tasks: int | None, formula: str, max_tokens: int | None = None) -> None:
        out["per_task"][role] = per_task
        out["calls"][role] = _mul(per_task, tasks)
        out["tokens"][role] = _mul(out["calls"][role], _role_tokens(loaded, role, max_tokens))
        out["formula"][role] = formula

    if stage.kind == "report":
        return out
    if stage.kind == "eval":
        add("policy", spec.eval.samples * S, E, "E x eval.samples x S")
        return out
    mtype = loaded.method_types[stage.method]
    cfg = loaded.methods[stage.method]
    short = stage.id.split(".", 1)[1]
    from leafe import methods as registry
    from leafe.budget import Allowance

    # a method that spends task by task splits a total evenly (`Allowance.task_cap`)
    allow = Allowance(per_task=b.interactions_per_task, total=b.interactions)
    B = allow.task_cap(T) if registry.get(mtype).spends == "task" and T else allow.per_task
    if mtype == "sft" and short == "train":
        out["interactions"] = _mul(T, min(B, S))
    elif mtype == "rft" and short == "train":
        r = min(cfg.samples_per_task, B // S)
        add("policy", r * S, T, "T x min(samples_per_task, B // S) x S")
        out["interactions"] = out["calls"]["policy"]
    elif mtype == "grpo" and short == "train":
        n = cfg.iterations * cfg.tasks_per_iteration * cfg.group_size * S
        out["calls"]["policy"] = n
        out["tokens"]["policy"] = n * _role_tokens(loaded, "policy")
        out["formula"]["policy"] = "iterations x tasks_per_iteration x group_size x S"
        out["interactions"] = _min(n, _mul(T, B), b.interactions)
    elif mtype == "early_experience" and short == "explore":
        add("policy", min(B, S) * cfg.alternatives, T, "T x min(B, S) x alternatives")
        out["interactions"] = _mul(T, min(B, min(B, S) * (1 + cfg.alternatives)))  # expert steps + alternatives
    elif mtype == "early_experience" and short == "reflect":
        add("teacher", min(min(B, S) * cfg.alternatives, max(B - 1, 0)), T,
            "T x min(min(B, S) x alternatives, B - 1)", cfg.rationale.max_tokens)
    elif mtype == "leafe" and short == "explore":
        add("policy", cfg.max_attempts * S, T, "T x max_attempts x S")
        out["interactions"] = _min(_mul(T, B), _mul(T, cfg.max_attempts, S))
        if cfg.explore_mode == "leafe":
            points = S // cfg.reflect_every + 1 if (cfg.rollback and cfg.reflect_every) else 1
            per = cfg.max_attempts * points * cfg.branches_per_node * (1 + cfg.reflection.retries)
            how = "floor(S / reflect_every) + 1" if (cfg.rollback and cfg.reflect_every) else "1"
            add("reflector", per, T, "T x max_attempts x P x branches_per_node x (1 + reflection.retries), "
                f"P = {how} = {points} reflection point(s) per attempt", cfg.reflection.max_tokens)
    elif (mtype, short) in {("early_experience", "world_model"), ("early_experience", "train"),
                            ("leafe", "distill")}:
        pass  # fine-tuning on what an earlier stage collected
    else:
        out["known"] = False
    return out


def _token_limit(loaded: LoadedSpec, stage: PlannedStage, role: str) -> int | None:
    """The reply limit a stage sets for a role instead of the role's own `max_tokens`."""
    if stage.kind != "train":
        return None
    cfg = loaded.methods[stage.method]
    if role == "reflector" and hasattr(cfg, "reflection"):
        return cfg.reflection.max_tokens
    if role == "teacher" and hasattr(cfg, "rationale"):
        return cfg.rationale.max_tokens
    return None


def stage_roles(loaded: LoadedSpec, plan: Plan, stage: PlannedStage) -> dict[str, dict[str, Any]]:
    """Per model role the stage calls: the model, its backend and where it runs (`in-process`,
    `servers` or `trl-server` as `leafe.models.servers.site` decides for the policy; `api` for
    an API model), or `same_as: policy` for a role that shares the policy's weights. A training
    stage adds `trainer`: where its fine-tuning runs."""
    from leafe.models.servers import site
    from leafe.plan import start_checkpoint

    spec = loaded.for_method(stage.method).spec  # the method's own reflector / teacher
    gen = spec.runtime.generation
    roles: dict[str, dict[str, Any]] = {}
    if stage.kind == "report":
        return roles
    start = start_checkpoint(plan.stages, stage)
    uses = [k.split(":", 1)[1] for k in stage.inputs if k.startswith("role:")]
    if stage.kind == "eval" or stage.generates != "none" or any(getattr(spec.models, r) == "policy" for r in uses):
        p = spec.models.policy
        # a role written as `policy` is served like the policy (`StageContext.load_models`)
        where = site(gen, "trained" if stage.generates == "trained" else "policy", start is not None)
        roles["policy"] = {"model": f"checkpoint of {start}" if start else p.name, "backend": p.backend,
                           "where": where}
        if where == "servers":
            roles["policy"]["servers"] = (list(gen.servers or []) if gen.launch == "external"
                                          else f"{gen.num_servers} managed {gen.backend} server(s)")
    for r in uses:
        model = getattr(spec.models, r)
        if model == "policy":
            roles[r] = {"same_as": "policy"}
        elif model == "oracle":
            roles[r] = {"model": f"{spec.env.adapter}'s solver", "backend": "oracle", "where": "oracle"}
        elif model.backend == "litellm":
            base = getattr(model, "api_bases", None) or getattr(model, "api_base", None) or "the provider's API"
            roles[r] = {"model": model.name, "backend": "litellm", "where": "api", "api": base,
                        "api_key_env": getattr(model, "api_key_env", None)}
        else:
            roles[r] = {"model": model.name, "backend": model.backend, "where": "in-process"}
    if stage.produces_checkpoint:
        t = spec.runtime.training
        if stage.generates == "trained" or t.launcher != "accelerate":
            roles["trainer"] = {"model": f"checkpoint of {start}" if start else spec.models.policy.name,
                                "where": "in-process"}
        else:
            roles["trainer"] = {"model": f"checkpoint of {start}" if start else spec.models.policy.name,
                                "where": "accelerate", "num_processes": t.num_processes,
                                "num_machines": t.num_machines, "config": t.config}
    return roles


def _stage_budget(loaded: LoadedSpec, stage: PlannedStage) -> dict[str, Any] | None:
    from leafe import methods as registry
    from leafe.budget import matched_methods

    if stage.kind != "train":
        return None
    b = loaded.spec.budget
    spends = registry.get(loaded.method_types[stage.method]).spends
    matched = b.match if stage.method in matched_methods(loaded.methods, b.match) else None
    return {"per_task": b.interactions_per_task, "total": b.interactions, "matched": matched, "spends": spends}


def _resolved_spec(loaded: LoadedSpec) -> dict[str, Any]:
    """The spec as validated: presets merged, every method with its type and init and all its
    fields, the environment's validated options."""
    data = loaded.spec.model_dump(mode="json")
    data["env"]["options"] = loaded.env_options.model_dump(mode="json")
    data["methods"] = {name: cfg.model_dump(mode="json") for name, cfg in loaded.methods.items()}
    return data


def plan_json(loaded: LoadedSpec, plans: list[tuple[int, Plan]]) -> dict[str, Any]:
    """`leafe plan --json`: `spec` (resolved), `tasks`, `stages` (every seed's; `running`: the
    `leafe run` working on it now, `changed`: what differs from the stage's last run),
    `methods`, `smoke` (the smoke notes, or null)."""
    from leafe.budget import budget_fit, method_budget

    counts = task_counts(loaded)
    stages = []
    for seed, plan in plans:
        for s in plan.stages:
            stages.append({
                "id": s.id, "seed": seed, "kind": s.kind, "method": s.method,
                "type": loaded.method_types.get(s.method) if s.method else None,
                "deps": s.deps, "after": s.after, "same_as": s.same_as,
                "key": s.hash if s.kind != "report" else None,
                "dir": str(plan.dir(s)) if s.kind != "report" else None,
                "status": plan.status(s), "generates": s.generates, "checkpoint": s.produces_checkpoint,
                "running": plan.running(s), "changed": plan.changes(s),
                "roles": stage_roles(loaded, plan, s), "budget": _stage_budget(loaded, s),
                "bounds": stage_bounds(loaded, s, counts),
            })
    lines = budget_fit(loaded.spec, loaded.methods, loaded.method_types)[0]
    first = plans[0][1]
    methods = {}
    for i, (name, cfg) in enumerate(loaded.methods.items()):
        methods[name] = {
            "type": loaded.method_types[name], "init": cfg.init, "reuse": cfg.reuse, "extra": cfg.extra,
            "stages": [s.id for s in first.stages if s.method == name and s.kind == "train"],
            "checkpoint": first.checkpoint_of.get(name),
            "budget": {"fit": lines[i + 1].strip(),
                       **method_budget(first, name, loaded.spec.budget.interactions_per_task)},
        }
    return {"spec": _resolved_spec(loaded), "name": loaded.spec.name, "run_dir": str(first.root),
            "tasks": counts, "stages": stages, "methods": methods, "budget": lines[0], "smoke": loaded.smoke}


def _n(x: int | None) -> str:
    if x is None:
        return "?"
    for unit, size in (("G", 10**9), ("M", 10**6)):
        if x >= 10 * size:
            return f"{x / size:,.1f}{unit}"
    return f"{x:,}"


def plan_lines(loaded: LoadedSpec, plan: Plan, counts: dict[str, int | None] | None = None) -> list[str]:
    """`leafe plan`'s text: per stage, which role runs where and at most how many calls (and
    tokens) it makes; interactions of training stages."""
    counts = counts or task_counts(loaded)
    lines = [f"model calls, at most (T = {counts['train'] if counts['train'] is not None else '?'} train, "
             f"E = {counts['test'] if counts['test'] is not None else '?'} test tasks; "
             "formulas: leafe/planinfo.py):"]
    for s in plan.stages:
        if s.kind == "report":
            continue
        if s.same_as:
            lines.append(f"  {s.id}: = {s.same_as} (reuse: runs once)")
            continue
        roles = stage_roles(loaded, plan, s)
        bounds = stage_bounds(loaded, s, counts)
        parts = []
        for role, info in roles.items():
            if role == "trainer":
                where = ("accelerate launch" if info["where"] == "accelerate" else "in process")
                parts.append(f"trains {info['model']} {where}")
                continue
            calls = bounds["calls"].get(role)
            if "same_as" in info:
                what = "the policy's weights"
            else:
                what = {"in-process": f"in process ({info['backend']} {info['model']})",
                        "servers": f"on the servers ({info['model']})",
                        "trl-server": f"on TRL's vLLM server ({info['model']})",
                        "api": f"API {info['model']} via litellm",
                        "oracle": f"oracle: {info['model']}, no model (privileged)"}[info["where"]]
            if role in bounds["calls"] and calls is None:  # the number of tasks is unknown
                unit = "test task" if s.kind == "eval" else "train task"
                per = bounds["per_task"][role]
                tokens = per * _role_tokens(loaded.for_method(s.method), role, _token_limit(loaded, s, role))
                parts.append(f"{role} ≤ {_n(per)} calls, {_n(tokens)} tokens per {unit}, {what}")
            elif role in bounds["calls"]:
                parts.append(f"{role} ≤ {_n(calls)} calls, {_n(bounds['tokens'][role])} tokens, {what}")
            else:
                parts.append(f"{role}: {what}")
        if bounds.get("interactions") is not None:
            parts.append(f"≤ {_n(bounds['interactions'])} interactions")
        if bounds.get("known") is False:
            parts.append("no bound known for this stage")
        lines.append(f"  {s.id}: " + ("; ".join(parts) or "no model calls"))
    return lines
