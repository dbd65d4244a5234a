"""The report's data, recomputed from run records only (evaluation episodes, training metrics,
LEAFE trees, trainer logs); never from models or trainers.

One spec gives one *group*: its methods as rows under its environment and policy, over every
master seed it ran under (`Spec.run_seeds`). Several specs give a combined report: one group
each, rendered as column groups (environment x model) of one table.

Statistics:
- Pass@k: the unbiased estimator (`leafe.metrics.pass_at_k`) averaged over test tasks, per seed;
  with several seeds the cell is the mean over seeds and `std` their sample standard deviation.
- Confidence interval: percentile bootstrap over test tasks (`report.bootstrap` resamples,
  level `report.ci`, fixed generator seed so a report is reproducible) of the mean of the
  per-task pass@k, each task's value averaged over the seeds first.
- Curve: pass@k with its interval for k = 1, 2, 4, ... up to the samples per task (and n).
- Paired comparisons (`report.compare`): for methods a and b, the difference of pass@k on the
  test tasks both evaluated, each task's value averaged over the seeds both finished; the
  interval is the same percentile bootstrap of the mean of the per-task differences (one index
  draw resamples a task for both methods at once: paired).
- The oracle reflector: a row whose method, or a method it starts from, explored with
  `models.reflector: oracle` carries `oracle_reflector` (the methods that did), so every format
  labels it.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from leafe.budget import method_budget, upstream_train_stages
from leafe.metrics import episode_metrics, pass_at_k_per_task, pass_hat_k
from leafe.plan import Plan, build_plan
from leafe.spec.loader import LoadedSpec
from leafe.stage import read_episodes
from leafe.store import read_json

REPORT_VERSION = 7  # 2: `stage1`; 3: `init`, `budget` per row; 4: seeds, CIs, curves, training, groups;
# 5: `compare` (paired differences), `oracle_reflector` per row, `reflector` per Stage 1 row
# 6: `stage1.compare` (paired differences of exploration between report.compare pairs)
# 7: `train_interactions` is the mean over seeds (was the first seed's), `train_interactions_by_seed`


def bootstrap_ci(values: np.ndarray, level: float, resamples: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per task).

    Written here rather than taken from scipy.stats.bootstrap: it is five lines of numpy and
    scipy would join the light core (`leafe report` runs without the training extras)."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    a = (1.0 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


def curve_ks(n: int, ks: list[int]) -> list[int]:
    """k values of the Pass@k curve: powers of two up to n, the spec's k values, and n."""
    out = {k for k in ks if k <= n} | {n}
    k = 1
    while k <= n:
        out.add(k)
        k *= 2
    return sorted(out)


def _seed_plans(loaded: LoadedSpec, runs_dir: Path | str,
                root: Path | None = None) -> list[tuple[int, LoadedSpec, Plan]]:
    """Each seed's plan; `root`: the run directory to read instead of runs_dir/<run name> (a
    run directory given by path, which may have been renamed or copied)."""
    plans = [(one.spec.seed, one, build_plan(one, runs_dir)) for one in loaded.per_seed()]
    if root is not None:
        for _, _, plan in plans:
            plan.root = Path(root)
    return plans


def _usage(plan: Plan, method: str) -> dict[str, dict]:
    """Model usage per role, summed over the method's stages."""
    usage: dict[str, dict] = {}
    for s in plan.stages:
        uf = plan.dir(s) / "usage.json"
        if s.method != method or not uf.exists():
            continue
        for role, u in read_json(uf).items():
            tot = usage.setdefault(role, {})
            for k, v in u.items():
                tot[k] = round(tot.get(k, 0) + v, 3)
    return usage


def oracle_methods(plan: Plan, method: str) -> list[str]:
    """The methods whose stages upstream of `method`'s evaluation (its own, and those of the
    methods it starts from) called the reflector filled by the environment's solver (a stage
    key holding `role:reflector` `{backend: oracle}`), in plan order."""
    upstream = set(upstream_train_stages(plan, method))
    return list(dict.fromkeys(s.method for s in plan.stages if s.id in upstream
                              and (s.inputs.get("role:reflector") or {}).get("backend") == "oracle"))


def method_label(row: dict, init: bool = True) -> str:
    """A row's method as every table and plot names it: `a ← b` (a starts from b's checkpoint),
    and `[oracle reflector]` where it, or a method it starts from (`via`), explored with the
    environment's solver as reflector (privileged information)."""
    label = row["method"] + (f" ← {row['init']}" if init and row.get("init") else "")
    via = [m for m in row.get("oracle_reflector") or [] if m != row["method"]]
    if row.get("oracle_reflector"):
        label += " [oracle reflector" + (f" via {', '.join(via)}" if via else "") + "]"
    return label


def _row(loaded: LoadedSpec, name: str, seeds: list[tuple[int, LoadedSpec, Plan]],
         keep: dict | None = None) -> dict:
    """One method's row; `keep[name]` receives its per-task counts per finished seed
    ({seed: {task: {n, c}}}) for the paired comparisons."""
    spec, rep = loaded.spec, loaded.spec.report
    ks = sorted(spec.eval.k)
    row: dict = {"method": name, "type": loaded.method_types[name], "init": loaded.methods[name].init,
                 "seeds": [s for s, _, _ in seeds]}
    if oracle := oracle_methods(seeds[0][2], name):
        row["oracle_reflector"] = oracle
    if getattr(loaded.methods[name], "extra", False):
        row["extra"] = True  # a row the paper's table does not have (e.g. sft, rft)
    per_seed = []
    for seed, _, plan in seeds:
        ev = plan.stage(f"eval.{name}")
        status = plan.status(ev)
        entry = {"seed": seed, "status": status,
                 "budget": method_budget(plan, name, spec.budget.interactions_per_task),
                 "usage": _usage(plan, name)}
        if status == "done":
            m = episode_metrics(read_episodes(plan.dir(ev)), ks)
            entry.update(m)
        per_seed.append(entry)
    done = [e for e in per_seed if e["status"] == "done"]
    if keep is not None:
        keep[name] = {e["seed"]: e["per_task"] for e in done}
    row["status"] = "done" if len(done) == len(per_seed) else (
        "partial" if done or any(e["status"] == "partial" for e in per_seed) else "todo")
    row["seeds_done"] = [e["seed"] for e in done]
    row["per_seed"] = [{k: v for k, v in e.items() if k != "per_task"} for e in per_seed]
    first = per_seed[0]
    row["budget"], row["usage"] = first["budget"], first["usage"]  # the first seed's, as in one-seed runs
    # the method's own training interactions: the mean over the seeds evaluated (all, if none is)
    owns = [e["budget"]["own"] for e in (done or per_seed)]
    row["train_interactions"] = int(round(float(np.mean(owns))))
    if len(set(owns)) > 1:
        row["train_interactions_by_seed"] = owns
    if not done:
        return row
    # tasks every finished seed evaluated (the same test split under every seed)
    tasks = sorted(set.intersection(*(set(e["per_task"]) for e in done)))
    ns = np.array([[e["per_task"][t]["n"] for t in tasks] for e in done])
    cs = np.array([[e["per_task"][t]["c"] for t in tasks] for e in done])
    n_min = int(ns.min()) if ns.size else 0
    row["tasks"] = len(tasks)
    row["samples_per_task"] = n_min

    def per_task(k: int) -> np.ndarray:  # (seeds, tasks)
        return np.array([pass_at_k_per_task(list(n), list(c), k) for n, c in zip(ns, cs)])

    def summary(k: int) -> dict:
        v = per_task(k)
        by_seed = v.mean(axis=1)
        lo, hi = bootstrap_ci(v.mean(axis=0), rep.ci, rep.bootstrap)
        return {"mean": float(by_seed.mean()), "std": float(by_seed.std(ddof=1)) if len(done) > 1 else None,
                "ci": [lo, hi], "by_seed": [float(x) for x in by_seed]}

    row["pass@k"] = {}
    row["pass@k_stats"] = {}
    for k in ks:
        if k > n_min:
            continue
        st = summary(k)
        row["pass@k"][str(k)] = st["mean"]
        row["pass@k_stats"][str(k)] = st
    row["curve"] = {str(k): summary(k) for k in curve_ks(n_min, ks)} if n_min else {}
    top = max((k for k in ks if k <= n_min), default=None)
    row["pass^k"] = ({str(top): float(np.mean([pass_hat_k(list(n), list(c), top) for n, c in zip(ns, cs)]))}
                     if top else {})
    for key in ("success_rate", "mean_steps"):
        row[key] = float(np.mean([e[key] for e in done]))
    for key in ("prompt_tokens", "completion_tokens", "episodes", "interactions", "parse_failures",
                "invalid", "errored"):
        row[key] = int(round(np.mean([e[key] for e in done])))  # per seed (mean over seeds)
    return row


def _training(seed_plan: tuple[int, LoadedSpec, Plan]) -> dict[str, list[dict]]:
    """Per method: its finished training stages' curves (trainer loss per optimizer step; GRPO's
    success rate and mean reward per iteration), from the first seed."""
    _, loaded, plan = seed_plan
    out: dict[str, list[dict]] = {}
    for s in plan.stages:
        if s.kind != "train" or plan.status(s) != "done":
            continue
        d = plan.dir(s)
        entry: dict = {"stage": s.id}
        if (d / "train_log.json").exists():
            log = [h for h in read_json(d / "train_log.json") if "loss" in h and "step" in h]
            entry["loss"] = [[int(h["step"]), float(h["loss"])] for h in log]
        if (d / "metrics.json").exists():
            m = read_json(d / "metrics.json")
            for key in ("success_rate", "mean_reward"):
                if isinstance(m.get(key), list):
                    entry[key] = m[key]
        if len(entry) > 1:
            out.setdefault(s.method, []).append(entry)
    return out


def _stage1(loaded: LoadedSpec, seeds: list[tuple[int, LoadedSpec, Plan]]) -> dict:
    """One row per LEAFE method (and seed, when several ran): its exploration's statistics once
    its explore stage is done."""
    from leafe.methods.leafe import LeafeConfig
    from leafe.methods.leafe.explore import read_trees
    from leafe.methods.leafe.stats import exploration_ks, exploration_stats, first_success, variant

    spec, rows, ks = loaded.spec, [], set()
    firsts: dict[str, dict[int, dict[str, int | None]]] = {}  # method -> seed -> task -> first success
    dirs: dict[str, set] = {}  # method -> its explore stages' directories (shared through `reuse:`)
    for name, cfg in loaded.methods.items():
        if not isinstance(cfg, LeafeConfig):
            continue
        mk = exploration_ks(spec.eval.k, cfg.max_attempts)
        ks.update(mk)
        for seed, _, plan in seeds:
            st = plan.stage(f"{name}.explore")
            row = {"method": name, "variant": variant(cfg), "status": plan.status(st),
                   "max_attempts": cfg.max_attempts}
            if cfg.explore_mode == "leafe" and loaded.for_method(name).spec.is_oracle("reflector"):
                row["oracle_reflector"] = [name]
            if len(seeds) > 1:
                row["seed"] = seed
            if row["status"] == "done":
                trees = read_trees(plan.dir(st))
                row.update(exploration_stats(trees, mk))
                firsts.setdefault(name, {})[seed] = {t["task"]: first_success(t) for t in trees}
                dirs.setdefault(name, set()).add(plan.dir(st))
            rows.append(row)
    out = {"k": sorted(ks), "budget": spec.budget.interactions_per_task, "rows": rows}
    if pairs := _stage1_compare(spec, firsts, sorted(ks), dirs):
        out["compare"] = pairs
    return out


def _stage1_compare(spec, firsts: dict[str, dict[int, dict[str, int | None]]], ks: list[int],
                    dirs: dict[str, set]) -> list[dict]:
    """For each `report.compare` pair of two explored methods: exploration pass@k (a success
    among a task's first k trajectories) and `solved` (within the whole budget) of a minus b,
    with a paired bootstrap interval over the train tasks both explored (each task's indicator
    averaged over the seeds both finished), as the test-set comparison does. A pair that shares
    its exploration (`reuse:`, e.g. Table 4's ablations) has nothing to compare here."""
    rep, out = spec.report, []
    for a, b in rep.compare:
        if a not in firsts or b not in firsts or dirs[a] == dirs[b]:
            continue
        s = sorted(set(firsts[a]) & set(firsts[b]))
        tasks = sorted(set.intersection(*(set(firsts[a][x]) & set(firsts[b][x]) for x in s))) if s else []
        if not tasks:
            continue

        def hits(m: str, k: int | None) -> np.ndarray:  # (tasks,), averaged over the seeds
            return np.mean([[f is not None and (k is None or f <= k) for f in (firsts[m][x][t] for t in tasks)]
                            for x in s], axis=0)

        entry: dict = {"a": a, "b": b, "tasks": len(tasks), "seeds": s,
                       "k": {str(k): _paired(hits(a, k), hits(b, k), rep.ci, rep.bootstrap) for k in ks},
                       "solved": _paired(hits(a, None), hits(b, None), rep.ci, rep.bootstrap)}
        out.append(entry)
    return out


def _paired(va: np.ndarray, vb: np.ndarray, level: float, resamples: int) -> dict:
    """a minus b over the same tasks (per-task values, already averaged over seeds): the mean
    difference, its percentile-bootstrap interval, and whether that interval excludes 0."""
    lo, hi = bootstrap_ci(va - vb, level, resamples)
    return {"diff": float((va - vb).mean()), "ci": [lo, hi], "significant": bool(lo > 0 or hi < 0),
            "a": float(va.mean()), "b": float(vb.mean())}


def paired_difference(a: dict[int, dict[str, dict]], b: dict[int, dict[str, dict]], k: int,
                      level: float, resamples: int) -> dict | None:
    """pass@k of a minus b with a paired bootstrap interval, from per-task counts per seed
    ({seed: {task: {n, c}}}): over the seeds both finished and the tasks both evaluated under
    every one of them, each task's pass@k averaged over those seeds, then the percentile
    bootstrap of the mean per-task difference (the same task draws for both methods). None when
    they share no seed or task, or some task has fewer than k samples."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    tasks = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if not tasks or min(x[s][t]["n"] for x in (a, b) for s in seeds for t in tasks) < k:
        return None

    def per_task(x: dict) -> np.ndarray:  # (tasks,), averaged over the seeds
        return np.mean([pass_at_k_per_task([x[s][t]["n"] for t in tasks], [x[s][t]["c"] for t in tasks], k)
                        for s in seeds], axis=0)

    return {**_paired(per_task(a), per_task(b), level, resamples), "tasks": len(tasks), "seeds": seeds}


def _compare(spec, kept: dict[str, dict]) -> dict:
    """The paired comparisons `report.compare` asks for (a pair with a method not finished on
    any seed says `todo`)."""
    rep, pairs = spec.report, []
    for a, b in spec.report.compare:
        entry: dict = {"a": a, "b": b, "k": {}}
        for k in sorted(spec.eval.k):
            if (d := paired_difference(kept.get(a, {}), kept.get(b, {}), k, rep.ci, rep.bootstrap)) is not None:
                entry["tasks"], entry["seeds"] = d.pop("tasks"), d.pop("seeds")
                entry["k"][str(k)] = d
        entry["status"] = "done" if entry["k"] else "todo"
        pairs.append(entry)
    return {"ci": rep.ci, "bootstrap": rep.bootstrap, "pairs": pairs}


def _model_label(name: str) -> str:
    """A short model name for column groups: the last path part, `leafe:` dropped."""
    return name.removeprefix("leafe:").rstrip("/").rsplit("/", 1)[-1]


def collect(loaded: LoadedSpec, runs_dir: Path | str | Plan = "runs", root: Path | None = None) -> dict:
    """The report of one spec (a group): rows per method over all its seeds, the Stage 1
    table, training curves. `runs_dir` may be a Plan (its run directory is used); `root`: read
    this run directory (whatever its name) instead of runs_dir/<run name>. A finished
    stage whose files changed or went missing since it finished is an error (a `RunDataError`
    naming the files; `leafe.integrity`), never reported from."""
    if isinstance(runs_dir, Plan):
        root = root or runs_dir.root
        runs_dir = runs_dir.root.parent
    spec = loaded.spec
    seeds = _seed_plans(loaded, runs_dir, root)
    for _, _, plan in seeds:
        plan.records_only = True  # a report loads no model: a stage's checkpoint/ is not its concern
        plan.raise_if_damaged(incomplete_too=True)
    kept: dict[str, dict] = {}
    rows = [_row(loaded, name, seeds, kept) for name in loaded.methods]
    return {
        "report_version": REPORT_VERSION, "name": spec.name, "env": spec.env.adapter,
        "model": spec.models.policy.name, "label": f"{spec.env.adapter} / {_model_label(spec.models.policy.name)}",
        "k": sorted(spec.eval.k), "samples": spec.eval.samples, "seeds": spec.run_seeds(),
        "budget_per_task": spec.budget.interactions_per_task,
        "ci": spec.report.ci, "bootstrap": spec.report.bootstrap,
        "rows": rows, "compare": _compare(spec, kept),
        "stage1": _stage1(loaded, seeds), "training": _training(seeds[0]),
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def combine(groups: list[dict], name: str) -> dict:
    """A combined report: one column group per spec (environment x model)."""
    return {"report_version": REPORT_VERSION, "name": name, "combined": True, "groups": groups,
            "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def groups_of(data: dict) -> list[dict]:
    """The groups of a report: a combined report's, or the one-spec report itself."""
    return data["groups"] if data.get("combined") else [data]
