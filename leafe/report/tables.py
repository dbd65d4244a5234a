"""Tables of a report as one format-neutral model (`TableModel`), built once from the report
data and rendered to Markdown (tabulate), LaTeX (booktabs), the terminal (rich) and HTML, so
every format shows the same numbers.

Conventions: rates in %, one decimal; the best value per score column in bold, ties all bold, a
column where every method scores 0 has no bold; a method that has not finished says
`(not run)`; a method missing from one group of a combined table says `n/a`; a method that
explored with the environment's solver as reflector, or starts from one that did, is labelled
`[oracle reflector]` with a note saying what that means. Paired differences (`report.compare`)
are in percentage points, `*` where the interval excludes 0, `n.s.` where it contains 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from leafe.report.data import groups_of, method_label

#: The note under every table with a row labelled `[oracle reflector]`.
ORACLE_NOTE = ("[oracle reflector]: LEAFE's reflections (the step τ to roll back to and the experience) "
               "came from the environment's own solver (models.reflector: oracle), not from a model: "
               "privileged information that no other method and no deployed agent has. Such a row measures "
               "what LEAFE's rollback and distillation do with a perfect reflector, not the policy's own "
               "reflection.")

#: The note under a table with a row marked `(extra)` (a method with `extra: true` in its spec).
EXTRA_NOTE = "(extra): a method the compared paper's table does not have (`extra: true` in the spec)."


@dataclass
class Cell:
    text: str
    """The number as shown (no markup)."""
    value: float | None = None
    """The value compared for bold (None: not a score)."""
    bold: bool = False
    extra: str = ""
    """Secondary text: the confidence interval and/or ± std, shown after the number."""


@dataclass
class TableModel:
    title: str
    header: list[str]
    rows: list[list[Cell]]
    left: int = 1
    """Leading left-aligned label columns."""
    groups: list[tuple[str, int]] = field(default_factory=list)
    """Column groups above the header after the label columns: (label, span)."""
    caption: str = ""
    notes: list[str] = field(default_factory=list)


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _mark_best(rows: list[list[Cell]], cols: range) -> None:
    for j in cols:
        vals = [r[j].value for r in rows if r[j].value is not None]
        best = max(vals, default=0.0)
        if best <= 0:
            continue
        for r in rows:
            if r[j].value is not None and abs(r[j].value - best) < 1e-12:
                r[j].bold = True


def _score(stats: dict | None, value: float | None) -> Cell:
    """A pass@k cell: the mean, then ± std across seeds and the bootstrap interval."""
    if value is None:
        return Cell("–")
    extra = []
    if stats is not None:
        if stats.get("std") is not None:
            extra.append(f"± {pct(stats['std'])}")
        lo, hi = stats.get("ci", [math.nan, math.nan])
        if not (math.isnan(lo) or math.isnan(hi)):
            extra.append(f"[{pct(lo)}, {pct(hi)}]")
    return Cell(pct(value), value, extra=" ".join(extra))


def _chained(rows: list[dict]) -> bool:
    return any((r.get("budget") or {}).get("inherited") for r in rows)


def _max_cell(b: dict | None, key: str) -> Cell:
    """`max/budget` of the busiest train task; `!` marks a method whose own stages exceeded
    the budget (leafe's methods never do; a stage recorded under an older leafe might)."""
    if not b or b.get(key) is None:
        return Cell("–")
    return Cell(f"{b[key]}/{b['budget_per_task']}" + (" !" if b.get("own_within") is False else ""))


def _interactions_cell(row: dict) -> Cell:
    """A method's own training interactions: the mean over its seeds, their range when they differ."""
    by_seed = row.get("train_interactions_by_seed")
    spread = f" ({min(by_seed):,}–{max(by_seed):,})" if by_seed else ""
    return Cell(f"{row['train_interactions']:,}{spread}")


def main_table(group: dict, ci: bool = True) -> TableModel:
    """Methods x (pass@k, pass^k, success, steps, tokens, interactions) of one spec."""
    ks = group["k"]
    chained = _chained(group["rows"])
    capped = any((r.get("budget") or {}).get("cap") is not None for r in group["rows"])
    restoring = any((r.get("budget") or {}).get("restore_seconds") or (r.get("budget") or {}).get("replay_steps")
                    for r in group["rows"])
    header = (["method"] + [f"pass@{k}" for k in ks] + [f"pass^{ks[-1]}", "success", "steps", "tokens",
                                                       "train interactions"]
              + (["cap"] if capped else [])
              + (["restores"] if restoring else [])
              + (["with init", "max/task"] if chained else ["max/task"]))
    n_scores = len(ks) + 2
    rows = []
    for r in group["rows"]:
        label = Cell(method_label(r) + (" (extra)" if r.get("extra") else ""))
        if "pass@k" not in r:
            rows.append([label] + [Cell("(not run)")] * (len(header) - 1))
            continue
        stats = r.get("pass@k_stats", {})
        cells = [label]
        for k in ks:
            cells.append(_score(stats.get(str(k)) if ci else None, r["pass@k"].get(str(k))))
        ph = r.get("pass^k", {}).get(str(ks[-1]))
        cells.append(Cell(pct(ph), ph) if ph is not None else Cell("–"))
        cells.append(Cell(pct(r["success_rate"]), r["success_rate"]))
        cells.append(Cell(f"{r['mean_steps']:.1f}"))
        cells.append(Cell(f"{r['prompt_tokens'] + r['completion_tokens']:,}"))
        b = r.get("budget")
        cells.append(_interactions_cell(r))
        if capped:
            cap = (b or {}).get("cap")
            cells.append(Cell("–" if cap is None else f"≤ {cap:,}" + (f" ({b['matched']})" if b.get("matched") else "")))
        if restoring:
            busy = b and (b.get("own") or b.get("replay_steps") or b.get("restore_seconds"))
            cells.append(Cell(f"{b.get('replay_steps', 0):,} replayed · {b.get('restore_seconds', 0.0):.2g} s"
                              if busy else "–"))
        if chained:
            cells.append(Cell(f"{b['total']:,}" if b else "–"))
        cells.append(_max_cell(b, "total_max_per_task" if chained else "own_max_per_task"))
        rows.append(cells)
    _mark_best(rows, range(1, 1 + n_scores))
    seeds = group.get("seeds") or [0]
    caption = (
        f"Environment `{group['env']}`, policy `{group['model']}`, {group['samples']} samples per test task"
        + (f", {len(seeds)} seeds (mean ± std across seeds)" if len(seeds) > 1 else "")
        + ". Pass@k (unbiased estimator), pass^k and success in %, the best per column in bold"
        + (f"; [lo, hi]: {round(100 * group.get('ci', 0.95))}% bootstrap interval over test tasks" if ci else "")
        + "; steps: mean policy steps per episode; tokens: prompt + completion tokens in evaluation"
        + (" (per seed)" if len(seeds) > 1 else "")
        + f". Train interactions: environment steps the method's own training spent on the train tasks "
        f"(budget {group.get('budget_per_task', '?')} per task)"
        + ("; with several seeds their mean, (lo–hi) their range when they differ" if len(seeds) > 1 else "")
        + ("; cap: the most the method's own stages could spend in total (`(m)`: matched to what method m "
           "spent, its own and inherited steps, minus what this method inherits; budget.match)" if capped else "")
        + ("; restores: environment steps replayed to restore saved states (not charged) and the seconds "
           "restoring took, native snapshots included" if restoring else "")
        + ("; with init: including the methods it starts from (`a ← b`: a starts from b's checkpoint); "
           "max/task: the busiest train task, own and inherited steps together." if chained
           else "; max/task: the busiest train task.")
    )
    notes = []
    for r in group["rows"]:
        for role, u in (r.get("usage") or {}).items():
            if u.get("retries") or u.get("errors"):
                notes.append(f"Model calls of `{r['method']}` ({role}): {u.get('retries', 0)} retried request(s), "
                             f"{u.get('errors', 0)} sample(s) failed after retries (their episodes count as failures).")
        if r.get("status") == "partial" and r.get("seeds_done"):
            notes.append(f"`{r['method']}`: seeds {r['seeds_done']} of {r['seeds']} finished; the row shows those.")
    if any(r.get("oracle_reflector") for r in group["rows"]):
        notes.append(ORACLE_NOTE)
    if any(r.get("extra") for r in group["rows"]):
        notes.append(EXTRA_NOTE)
    return TableModel(title=f"{group['name']} — pass@k (%)", header=header, rows=rows, caption=caption, notes=notes)


def stage1_table(group: dict) -> TableModel | None:
    """LEAFE Stage 1 (exploration on the train tasks), or None without LEAFE methods."""
    s1 = group.get("stage1") or {"rows": []}
    if not s1["rows"]:
        return None
    seeded = any("seed" in r for r in s1["rows"])
    head = ["method"] + (["seed"] if seeded else []) + ["exploration"]
    header = (head + [f"pass@{k}" for k in s1["k"]]
              + ["solved", "fixed by branch", "trajectories", "interactions", "replayed", "restore s",
                 "reflections", "parse failures", "branches", "same action"])
    n_rates = len(s1["k"]) + 2
    rows = []
    for r in s1["rows"]:
        label = [Cell(method_label(r, init=False))] + ([Cell(str(r.get("seed", "")))] if seeded else []) + [Cell(r["variant"])]
        if "pass@k" not in r:
            rows.append(label + [Cell("(not run)")] + [Cell("–")] * (len(header) - len(head) - 1))
            continue
        cells = label + [Cell(pct(v), v) if (v := r["pass@k"].get(str(k))) is not None else Cell("–")
                         for k in s1["k"]]
        cells += [Cell(pct(r["solved"]), r["solved"]), Cell(pct(r["fixed_by_branch"]), r["fixed_by_branch"])]
        cells += [Cell(f"{r[k]:,}") for k in ("trajectories", "interactions", "replay_steps")]
        cells.append(Cell(f"{r.get('restore_seconds', 0.0):.1f}"))
        cells += [Cell(f"{r[k]:,}") for k in ("reflections", "reflection_parse_failures", "branches")]
        cells.append(Cell(f"{r.get('same_action_branches', 0):,}"))
        rows.append(cells)
    _mark_best(rows, range(len(head), len(head) + n_rates))
    caption = (
        f"Budget {s1['budget']} interactions per task. Exploration: `independent` sampling, `refinement` "
        "(restart from step 1 with the experience) or `rollback` (LEAFE). Pass@k: the share of train tasks "
        "(in %) with a success among the first k trajectories the exploration ran (root first, then "
        "breadth-first; k clipped to the method's max_attempts); solved: within the whole budget; fixed by "
        "branch: the root failed and a branch succeeded. The other columns are totals (interactions are "
        "budgeted policy steps; replayed steps and restore seconds are the cost of restoring branch starts, "
        "nothing replayed where the environment has native snapshots; same action: branches whose revised action "
        "repeated the original one, not distilled).")
    notes = [ORACLE_NOTE] if any(r.get("oracle_reflector") for r in s1["rows"]) else []
    return TableModel(title=f"{group['name']} — Stage 1 (exploration on the train tasks, %)", header=header,
                      rows=rows, left=len(head), caption=caption, notes=notes)


def _diff_cell(d: dict | None) -> Cell:
    """A paired difference: a − b in percentage points, its interval, `*` (the interval
    excludes 0) or `n.s.` (it contains 0)."""
    if d is None:
        return Cell("–")

    def pp(v: float) -> str:
        v = round(100 * v, 1)
        return "0.0" if v == 0 else f"{v:+.1f}"

    lo, hi = d["ci"]
    return Cell(f"{pp(d['diff'])} [{pp(lo)}, {pp(hi)}] {'*' if d['significant'] else 'n.s.'}", d["diff"])


def _pair_label(by: dict, pair: dict) -> Cell:
    """"a − b" with each method's label (its oracle mark included)."""
    return Cell(" − ".join(method_label(by.get(m, {"method": m}), init=False) for m in (pair["a"], pair["b"])))


def _pairs_table(title: str, header: list[str], by: dict, pairs: list[dict], rows: list[list[Cell]],
                 unit: str, caption: str) -> TableModel:
    """A table of paired differences: `caption` then, per finished pair, the tasks (`unit`) and
    seeds it was computed on; the oracle note when a pair involves an oracle-reflector method."""
    where = "; ".join(f"{p['a']} − {p['b']}: {p['tasks']} {unit}, seed{'s' if len(p['seeds']) > 1 else ''} "
                      f"{', '.join(map(str, p['seeds']))}" for p in pairs if "tasks" in p)
    notes = [ORACLE_NOTE] if any(by.get(m, {}).get("oracle_reflector") for p in pairs
                                 for m in (p["a"], p["b"])) else []
    return TableModel(title=title, header=header, rows=rows,
                      caption=caption + (f" {where}." if where else ""), notes=notes)


def compare_table(group: dict) -> TableModel | None:
    """Paired differences of pass@k between the method pairs of `report.compare`, or None."""
    cmp = group.get("compare") or {}
    if not cmp.get("pairs"):
        return None
    by = {r["method"]: r for r in group["rows"]}
    ks = group["k"]
    rows = []
    for p in cmp["pairs"]:
        if p["status"] != "done":
            rows.append([_pair_label(by, p), Cell("(not run)")] + [Cell("–")] * (len(ks) - 1))
        else:
            rows.append([_pair_label(by, p)] + [_diff_cell(p["k"].get(str(k))) for k in ks])
    caption = (
        "a − b: pass@k of method a minus that of method b, in percentage points, on the same test tasks; "
        f"[lo, hi]: {round(100 * cmp['ci'])}% paired bootstrap interval ({cmp['bootstrap']} resamples of the test "
        "tasks, each draw taking the same tasks for both methods; each task's pass@k averaged over the seeds "
        "both methods finished first). *: the interval excludes 0; n.s.: it contains 0 (no difference shown "
        "at this level).")
    return _pairs_table(f"{group['name']} — paired differences of pass@k (percentage points)",
                        ["a − b"] + [f"Δpass@{k}" for k in ks], by,
                        cmp["pairs"], rows,
                        "test tasks", caption)


def stage1_compare_table(group: dict) -> TableModel | None:
    """Paired differences of Stage 1 exploration between the `report.compare` pairs that both
    explored (Table 3's claims), or None."""
    s1 = group.get("stage1") or {}
    pairs = s1.get("compare") or []
    if not pairs:
        return None
    by = {r["method"]: r for r in s1["rows"]}
    rows = [[_pair_label(by, p)] + [_diff_cell(p["k"].get(str(k))) for k in s1["k"]] + [_diff_cell(p["solved"])]
            for p in pairs]
    caption = (
        "a − b: exploration pass@k (a success among the first k trajectories) and solved (within the whole "
        "budget) of method a minus method b, in percentage points, on the same train tasks; [lo, hi]: "
        f"{round(100 * group.get('ci', 0.95))}% paired bootstrap interval over the train tasks (each task's "
        "outcome averaged over the seeds both explored). *: the interval excludes 0; n.s.: it contains 0.")
    return _pairs_table(f"{group['name']} — Stage 1, paired differences (percentage points)",
                        ["a − b"] + [f"Δpass@{k}" for k in s1["k"]] + ["Δsolved"], by, pairs, rows,
                        "train tasks", caption)


def combined_table(data: dict, ci: bool = True) -> TableModel:
    """Methods as rows, one column group per spec (environment / model): pass@k per k and the
    method's own train interactions; the best per column in bold."""
    groups = groups_of(data)
    methods: list[str] = []
    for g in groups:
        for r in g["rows"]:
            if r["method"] not in methods:
                methods.append(r["method"])
    header = ["method"]
    spans = []
    for g in groups:
        cols = [f"pass@{k}" for k in g["k"]] + ["int."]
        header += cols
        spans.append((g["label"], len(cols)))
    # a method labelled `[oracle reflector]` in any group is labelled so here (the note says where)
    oracle = {r["method"]: r for g in groups for r in g["rows"] if r.get("oracle_reflector")}
    rows = [[Cell(method_label(oracle[m], init=False) if m in oracle else m)] for m in methods]
    score_cols = []
    for g in groups:
        by = {r["method"]: r for r in g["rows"]}
        start = len(rows[0])
        score_cols += list(range(start, start + len(g["k"])))
        for i, m in enumerate(methods):
            r = by.get(m)
            if r is None:
                rows[i] += [Cell("n/a")] * (len(g["k"]) + 1)
            elif "pass@k" not in r:
                rows[i] += [Cell("(not run)")] + [Cell("–")] * len(g["k"])
            else:
                st = r.get("pass@k_stats", {})
                rows[i] += [_score(st.get(str(k)) if ci else None, r["pass@k"].get(str(k))) for k in g["k"]]
                rows[i].append(_interactions_cell(r))
    _mark_best(rows, score_cols)
    caption = ("Pass@k in % (unbiased estimator) per environment / policy; the best per column in bold"
               + ("; [lo, hi]: bootstrap interval over test tasks" if ci else "")
               + "; ± std across seeds where several ran. int.: environment steps the method's own training "
               "spent. n/a: the method is not in that spec; (not run): its evaluation has not finished. "
               + "Specs: " + ", ".join(f"{g['label']} = {g['name']}" for g in groups) + ".")
    notes = []
    if oracle:
        notes = [ORACLE_NOTE + " Labelled in: " + "; ".join(
            f"{g['label']}: {', '.join(r['method'] for r in g['rows'] if r.get('oracle_reflector'))}"
            for g in groups if any(r.get("oracle_reflector") for r in g["rows"])) + "."]
    return TableModel(title=f"{data['name']} — pass@k (%)", header=header, rows=rows, groups=spans,
                      caption=caption, notes=notes)


def tables(data: dict, ci: bool = True) -> list[TableModel]:
    """Every table of a report, in order."""
    if data.get("combined"):
        out = [combined_table(data, ci)]
        groups = groups_of(data)
    else:
        out, groups = [], [data]
    for g in groups:
        if not data.get("combined"):
            out.append(main_table(g, ci))
        if (cmp := compare_table(g)) is not None:
            out.append(cmp)
        if (s1 := stage1_table(g)) is not None:
            out.append(s1)
        if (s1c := stage1_compare_table(g)) is not None:
            out.append(s1c)
    return out
