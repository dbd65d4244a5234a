"""Reports: the methods x Pass@k table, recomputed from the evaluation records, and for
LEAFE methods a Stage 1 table (the exploration's own Pass@k on the train tasks, recomputed from
their trees; definitions in `leafe.methods.leafe.stats`).

Reads only run records (never models or trainers). Table rendering is tabulate's (Markdown)
and rich's (terminal).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tabulate import tabulate

from leafe.budget import method_budget
from leafe.metrics import episode_metrics
from leafe.plan import Plan
from leafe.spec.loader import LoadedSpec
from leafe.stage import read_episodes
from leafe.store import atomic_write_json, atomic_write_text, read_json

REPORT_VERSION = 3  # 2: the `stage1` section; 3: `init` and `budget` per row


def collect(loaded: LoadedSpec, plan: Plan) -> dict:
    """The report's data: one row per method, from its evaluation records; `stage1`: one row
    per LEAFE method, from its exploration trees (empty rows without LEAFE methods)."""
    spec = loaded.spec
    rows = []
    for name in loaded.methods:
        ev = plan.stage(f"eval.{name}")
        episodes = read_episodes(plan.dir(ev)) if plan.status(ev) == "done" else []
        usage: dict[str, dict] = {}
        budget = method_budget(plan, name, spec.budget.interactions_per_task)
        for s in plan.stages:
            if s.method != name:
                continue
            uf = plan.dir(s) / "usage.json"
            if uf.exists():  # model usage per role, summed over the method's stages
                for role, u in read_json(uf).items():
                    tot = usage.setdefault(role, {})
                    for k, v in u.items():
                        tot[k] = round(tot.get(k, 0) + v, 3)
        row = {"method": name, "type": loaded.method_types[name], "status": plan.status(ev),
               "init": loaded.methods[name].init,
               "train_interactions": budget["own"], "budget": budget, "usage": usage}
        if episodes:
            m = episode_metrics(episodes, spec.eval.k)
            m.pop("per_task")
            row.update(m)
        rows.append(row)
    return {"report_version": REPORT_VERSION, "name": spec.name, "env": spec.env.adapter,
            "model": spec.models.policy.name, "k": spec.eval.k, "samples": spec.eval.samples,
            "budget_per_task": spec.budget.interactions_per_task,
            "rows": rows, "stage1": _stage1(loaded, plan),
            "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _stage1(loaded: LoadedSpec, plan: Plan) -> dict:
    """One row per LEAFE method: its exploration's stats once its explore stage is done."""
    from leafe.methods.leafe import LeafeConfig
    from leafe.methods.leafe.explore import read_trees
    from leafe.methods.leafe.stats import exploration_ks, exploration_stats, variant

    spec, rows, ks = loaded.spec, [], set()
    for name, cfg in loaded.methods.items():
        if not isinstance(cfg, LeafeConfig):
            continue
        st = plan.stage(f"{name}.explore")
        row = {"method": name, "variant": variant(cfg), "status": plan.status(st),
               "max_attempts": cfg.max_attempts}
        mk = exploration_ks(spec.eval.k, cfg.max_attempts)
        ks.update(mk)
        if row["status"] == "done":
            row.update(exploration_stats(read_trees(plan.dir(st)), mk))
        rows.append(row)
    return {"k": sorted(ks), "budget": spec.budget.interactions_per_task, "rows": rows}


def _stage1_cells(s1: dict) -> tuple[list[str], list[list[str]]]:
    """Stage 1 header and body; the best rate per column in bold; `–` where k exceeds a
    method's `max_attempts` (and in the row of an exploration not done yet)."""
    header = (["method", "exploration"] + [f"pass@{k}" for k in s1["k"]]
              + ["solved", "fixed by branch", "trajectories", "interactions", "replayed", "reflections",
                 "parse failures", "branches"])
    done = [r for r in s1["rows"] if "pass@k" in r]
    rates = {f"pass@{k}": (lambda r, k=k: r["pass@k"].get(str(k))) for k in s1["k"]}
    rates |= {"solved": lambda r: r["solved"], "fixed by branch": lambda r: r["fixed_by_branch"]}
    best = {c: max((v for r in done if (v := get(r)) is not None), default=0.0) for c, get in rates.items()}
    body = []
    for r in s1["rows"]:
        if "pass@k" not in r:
            body.append([r["method"], r["variant"], "(not run)"] + ["–"] * (len(header) - 3))
            continue
        cells = [r["method"], r["variant"]]
        for col, get in rates.items():
            v = get(r)
            s = "–" if v is None else f"{100 * v:.1f}"
            cells.append(f"**{s}**" if v and abs(v - best[col]) < 1e-12 else s)
        cells += [f"{r[k]:,}" for k in ("trajectories", "interactions", "replay_steps", "reflections",
                                        "reflection_parse_failures", "branches")]
        body.append(cells)
    return header, body


def _cells(data: dict) -> tuple[list[str], list[list[str]]]:
    """Header and body cells; the best value of each score column is marked **bold** (ties all
    bold; a column where every method scores 0 has no bold)."""
    ks = data["k"]
    chained = any(r.get("budget", {}).get("inherited") for r in data["rows"])
    header = ["method"] + [f"pass@{k}" for k in ks] + [f"pass^{ks[-1]}", "success", "steps",
                                                       "tokens", "train interactions"]
    header += ["with init", "max/task"] if chained else ["max/task"]
    done = [r for r in data["rows"] if "pass@k" in r]
    scores = {f"pass@{k}": (lambda r, k=k: r["pass@k"][str(k)]) for k in ks}
    scores[f"pass^{ks[-1]}"] = lambda r: r["pass^k"][str(ks[-1])]
    scores["success"] = lambda r: r["success_rate"]
    best = {col: max((get(r) for r in done), default=0.0) for col, get in scores.items()}
    body = []
    for r in data["rows"]:
        if "pass@k" not in r:
            body.append([r["method"]] + ["(not run)"] * (len(header) - 1))
            continue
        cells = [r["method"] + (f" ← {r['init']}" if r.get("init") else "")]
        for col, get in scores.items():
            v = get(r)
            s = f"{100 * v:.1f}"
            cells.append(f"**{s}**" if v > 0 and abs(v - best[col]) < 1e-12 else s)
        cells += [f"{r['mean_steps']:.1f}", f"{r['prompt_tokens'] + r['completion_tokens']:,}",
                  f"{r['train_interactions']:,}"]
        b = r.get("budget")
        if chained:
            cells.append(f"{b['total']:,}" if b else "–")
        cells.append(_max_cell(b, "total_max_per_task" if chained else "own_max_per_task"))
        body.append(cells)
    return header, body


def _max_cell(b: dict | None, key: str) -> str:
    """`max/budget` of the busiest train task; `!` marks a method whose own stages exceeded the
    budget (leafe's methods never do; a stage recorded under an older leafe might)."""
    if not b:
        return "–"
    over = b.get("own_within") is False
    return f"{b[key]}/{b['budget_per_task']}" + (" !" if over else "")


def to_markdown(data: dict) -> str:
    header, body = _cells(data)
    lines = [
        f"# {data['name']}",
        "",
        f"Environment `{data['env']}`, policy `{data['model']}`, {data['samples']} samples per test "
        f"task. Pass@k (unbiased estimator), pass^k and success in %, the best per column in bold; steps are "
        f"mean policy steps per episode; tokens are prompt + completion tokens in evaluation. "
        f"Train interactions: environment steps the method's own training spent on the train tasks "
        f"(budget {data.get('budget_per_task', '?')} per task)"
        + ("; with init: including the methods it starts from (`a ← b`: a starts from b's checkpoint); "
           "max/task: the busiest train task, own and inherited steps together." if any(
               r.get("budget", {}).get("inherited") for r in data["rows"])
           else "; max/task: the busiest train task."),
        "",
        tabulate(body, headers=header, tablefmt="github", disable_numparse=True,
                 colalign=["left"] + ["right"] * (len(header) - 1)),
        "",
    ]
    for r in data["rows"]:
        for role, u in r.get("usage", {}).items():
            if u.get("retries") or u.get("errors"):
                lines.append(f"Model calls of `{r['method']}` ({role}): {u.get('retries', 0)} retried "
                             f"request(s), {u.get('errors', 0)} sample(s) failed after retries (their "
                             f"episodes count as failures).")
                lines.append("")
    tasks = {r.get("tasks") for r in data["rows"] if "tasks" in r}
    if tasks:
        lines.append(f"Test tasks: {', '.join(map(str, sorted(tasks)))}. Generated {data['generated']} by leafe.")
        lines.append("")
    s1 = data.get("stage1") or {"rows": []}
    if s1["rows"]:
        header, body = _stage1_cells(s1)
        train = sorted({r["tasks"] for r in s1["rows"] if "tasks" in r})
        lines += [
            "## Stage 1 (exploration on the train tasks)",
            "",
            f"Budget {s1['budget']} interactions per task. Exploration: `independent` sampling, "
            f"`refinement` (restart from step 1 with the experience) or `rollback` (LEAFE). Pass@k: the share of train tasks "
            f"(in %) with a success among the first k trajectories the exploration ran (root first, then "
            f"breadth-first; k clipped to the method's max_attempts); solved: within the whole budget; "
            f"fixed by branch: the root failed and a branch succeeded. The other columns are totals "
            f"(interactions are budgeted policy steps; replayed steps restore branch starts).",
            "",
            tabulate(body, headers=header, tablefmt="github", disable_numparse=True,
                     colalign=["left", "left"] + ["right"] * (len(header) - 2)),
            "",
        ]
        if train:
            lines += [f"Train tasks: {', '.join(map(str, train))}.", ""]
    return "\n".join(lines)


SHORT = {"success": "succ.", "train interactions": "train int.", "with init": "w/ init", "fixed by branch": "fixed",
         "trajectories": "traj.", "interactions": "int.", "reflections": "refl.", "parse failures": "unp.",
         "replayed": "repl.", "branches": "br."}


def _rich_table(title: str, header: list[str], body: list[list[str]], left: int = 1) -> Table:
    from rich import box

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, h in enumerate(header):
        table.add_column(SHORT.get(h, h), justify="left" if i < left else "right", no_wrap=True)
    for row in body:
        table.add_row(*[c.replace("**", "") if not c.startswith("**") else f"[bold]{c.strip('*')}[/bold]" for c in row])
    return table


def to_rich(data: dict) -> Table:
    return _rich_table(f"{data['name']} — pass@k (%)", *_cells(data))


def to_rich_stage1(data: dict) -> Table | None:
    """The Stage 1 table, or None when the spec has no LEAFE method."""
    s1 = data.get("stage1") or {"rows": []}
    if not s1["rows"]:
        return None
    return _rich_table(f"{data['name']} — Stage 1 (exploration on the train tasks, %; "
                       f"budget {s1['budget']} interactions per task)", *_stage1_cells(s1), left=2)


def write_reports(loaded: LoadedSpec, plan: Plan, reports_dir: Path | str, console: Console | None) -> dict:
    data = collect(loaded, plan)
    out = Path(reports_dir)
    written = []
    for fmt in loaded.spec.report.formats:
        path = out / f"{data['name']}.{fmt}"
        if fmt == "md":
            atomic_write_text(path, to_markdown(data))
        elif fmt == "json":
            atomic_write_json(path, data)
        written.append(str(path))
    if console is not None:
        console.print(to_rich(data))
        if (stage1 := to_rich_stage1(data)) is not None:
            console.print(stage1)
        for w in written:
            console.print(f"report written: {w}")
    data["written"] = written
    return data
