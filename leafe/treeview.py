"""`leafe show tree`: a LEAFE exploration tree drawn in the terminal.

Reads the `trees.jsonl` of a LEAFE explore stage (`<method>.explore-<hash>/`, one record per
train task, written by `leafe.methods.leafe.explore`) and draws one task's tree with rich: per
node its depth, τ (the step of the parent's trajectory it revises, and the reflector's τ when
it differs), what made the parent reflect, the experience, the node's own actions, its outcome
and how its start state was restored (a native snapshot, or the number of actions replayed), and
whether its revised action merely repeated the original one. Branches that fixed the task (a
success in the subtree of a node that did not succeed itself) are marked; a tree whose
reflections came from the environment's solver (`models.reflector: oracle`) says so.

Light: no torch, transformers or litellm; the run directory is only read (a stage still being
written is read up to its last complete line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from leafe.envs.oracle import ORACLE
from leafe.errors import UserError
from leafe.methods.leafe.stats import subtree_success

TREES = "trees.jsonl"
#: How a tree reflected on by the environment's solver (`models.reflector: oracle`) is labelled.
ORACLE_LABEL = "[bold yellow]oracle reflector[/bold yellow] (the environment's solver: privileged)"
_OUTCOME_STYLE = {"success": "bold green", "failure": "bold red", "error": "bold red",
                  "rolled_back": "yellow", "budget": "magenta", "not_run": "dim"}


@dataclass
class ExploreStage:
    method: str
    """The LEAFE method instance (`leafe`, or the name given in the spec's `methods:`)."""
    dir: Path
    done: bool
    """The stage finished (DONE marker); else its trees so far."""


def _method_of(stage_dir: Path) -> str | None:
    name = stage_dir.name
    return name.split(".explore-", 1)[0] if ".explore-" in name else None


def _from_run_dir(run: Path) -> dict[str, list[Path]]:
    if (run / TREES).exists():  # a stage directory itself
        return {_method_of(run) or run.name: [run]}
    found: dict[str, list[Path]] = {}
    for f in sorted(run.glob(f"*.explore-*/{TREES}")):
        found.setdefault(_method_of(f.parent), []).append(f.parent)
    return found


def _current(run: Path, method: str, dirs: list[Path]) -> Path:
    """Of several explore directories of one method (older keys), the one the run's manifest
    names, else the most recently written."""
    if len(dirs) == 1:
        return dirs[0]
    try:
        manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
        named = {s["dir"] for s in manifest.get("stages", []) if s.get("id") == f"{method}.explore"}
    except (OSError, ValueError):
        named = set()
    for d in dirs:
        if d.name in named:
            return d
    return max(dirs, key=lambda d: (d / TREES).stat().st_mtime_ns)


def _from_spec(spec: Path, sets: list[str], runs_dir: Path) -> tuple[dict[str, list[Path]], str]:
    from leafe.plan import build_plan
    from leafe.spec import load_spec

    loaded = load_spec(spec, sets)
    plan = build_plan(loaded, runs_dir)
    leafe_methods = [m for m, t in loaded.method_types.items() if t == "leafe"]
    if not leafe_methods:
        raise UserError(f"{spec}: no LEAFE method in this spec (methods: {', '.join(loaded.methods)})")
    found = {}
    for m in leafe_methods:
        d = plan.dir(plan.stage(f"{m}.explore"))
        found[m] = [d]
    return found, str(plan.root)


def locate(run: Path, method: str | None = None, *, sets: list[str] | None = None,
           runs_dir: Path | str = "runs") -> ExploreStage:
    """The explore stage of `run`: a run directory (`runs/<name>`), an explore stage directory,
    or a spec file (its current stage keys under `runs_dir`)."""
    if run.is_file():
        found, where = _from_spec(run, sets or [], Path(runs_dir))
    elif run.is_dir():
        found, where = _from_run_dir(run), str(run)
    else:
        raise UserError(f"{run}: no such run directory or spec file (give runs/<name> or the spec)")
    if not found:
        raise UserError(f"{where}: no LEAFE exploration trees here (no <method>.explore-*/{TREES}); "
                        "run a spec with a `leafe` method first")
    if method is None:
        if len(found) > 1:
            raise UserError(f"{where}: several LEAFE methods ({', '.join(sorted(found))}); "
                            "choose one with --method NAME")
        method = next(iter(found))
    elif method not in found:
        raise UserError(f"{where}: no LEAFE method {method!r} here; known: {', '.join(sorted(found))}")
    d = _current(run, method, found[method]) if run.is_dir() else found[method][0]
    if not (d / TREES).exists():
        raise UserError(f"{method}.explore has not run yet: no {TREES} in {d}; "
                        f"`leafe run {run}` explores first")
    return ExploreStage(method, d, (d / "DONE").exists())


def read_trees(stage_dir: Path) -> dict[str, dict]:
    """Tree records by task (first record wins, as Stage 2 reads them), in file order; a torn
    last line (a stage killed mid-write) is skipped, the file is not modified."""
    from leafe.store import iter_records

    out: dict[str, dict] = {}
    for r in iter_records(stage_dir / TREES, complete_only=True):
        out.setdefault(r["task"], r)
    return out


def task_or_error(trees: dict[str, dict], task: str, stage: ExploreStage) -> dict:
    if task in trees:
        return trees[task]
    known = list(trees)
    shown = ", ".join(known[:5]) + (f", … ({len(known) - 5} more)" if len(known) > 5 else "")
    state = "" if stage.done else " (the stage has not finished: more trees may come)"
    raise UserError(f"{stage.dir}: no tree for task {task!r}{state}; known tasks: "
                    f"{shown or 'none yet'} (`--list` shows them all)")


# -- rendering ----------------------------------------------------------------------------------
def _trim(text: str, limit: int | None) -> str:
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def _outcome(outcome: str | None) -> str:
    o = outcome or "none"
    style = _OUTCOME_STYLE.get(o, "white")
    return f"[{style}]{escape(o)}[/{style}]"


def _actions(node: dict, limit: int | None) -> str:
    # an unparsable reply sent nothing to the environment: shown as ∅
    acts = ["∅" if a is None else _trim(str(a), 40) for a in node.get("actions", [])]
    if limit is not None and len(acts) > limit:
        acts = acts[:limit] + [f"… +{len(acts) - limit}"]
    return " → ".join(acts) if acts else "(none)"


def _reflections(node: dict, children: list[dict], limit: int | None) -> list[str]:
    # branching reflections created the node's children in order (while the limits allowed)
    queue = sorted(children, key=lambda c: c["id"])
    out = []
    for r in node.get("reflections", []):
        retry = f", retry {r['attempt']}" if r.get("attempt") else ""
        head = f"at step {r['at_step']} ({r['trigger']}{retry}): "
        if not r.get("ok"):
            what = f"[red]unparsed[/red] ({escape(_trim(str(r.get('error')), limit))})"
        elif r.get("branch"):
            what = f"τ={r['step']}"
            if queue and queue[0].get("reflected_tau") == r["step"] and queue[0].get("trigger") == r["trigger"]:
                what += f" → #{queue.pop(0)['id']}"
            else:
                what += " [dim](no branch: depth, attempts or budget)[/dim]"
        else:
            what = "declined"
        line = head + what
        if limit is None:
            line += f"\n      raw: {escape(str(r.get('raw')))}"
        out.append(line)
    return out


def node_label(node: dict, children: list[dict], fixes: bool, on_fix_path: bool, *,
               full: bool = False) -> Text:
    limit = None if full else 160
    own = len(node.get("steps", node.get("actions", [])))
    first = node.get("start_step", 0) + 1
    head = [f"[bold]#{node['id']}[/bold]", f"depth {node['depth']}"]
    if node["parent"] is not None:
        tau = f"τ={node['tau']}"
        if node.get("reflected_tau") not in (None, node["tau"]):
            tau += f" (reflector's τ={node['reflected_tau']})"
        restored = ("native restore" if (node.get("restore") or {}).get("kind") == "native"
                    else f"replayed {node.get('replay_steps', 0)}")
        head += [tau, f"after {node.get('trigger') or '?'}", restored]
    head.append(f"steps {first}–{first + own - 1}" if own else "no steps")
    head.append(_outcome(node.get("outcome")))
    if node.get("same_action"):
        head.append("[yellow]a′τ = aτ (not distilled)[/yellow]")
    if fixes:
        head.append("[bold green]★ fixed the task[/bold green]")
    elif on_fix_path:
        head.append("[green]↳ leads to the fix[/green]")
    lines = ["  ·  ".join(head)]
    if node.get("experience") is not None:
        shown = "" if node.get("in_prompt", True) else " [dim](not in the prompt)[/dim]"
        lines.append(f"  experience: [italic]{escape(_trim(node['experience'], limit))}[/italic]{shown}")
    lines.append(f"  actions: {escape(_actions(node, None if full else 12))}")
    refl = _reflections(node, children, limit)
    if refl:
        lines.append("  reflections: " + "; ".join(refl) if not full
                     else "  reflections:\n    " + "\n    ".join(refl))
    return Text.from_markup("\n".join(lines))


def render_tree(tree: dict, *, full: bool = False) -> Tree:
    """One task's exploration tree as a rich `Tree`."""
    nodes = tree["nodes"]
    by_id = {n["id"]: n for n in nodes}
    ok = subtree_success(nodes)
    root_outcome = nodes[0]["outcome"] if nodes else None
    header = (f"[bold]{escape(tree['task'])}[/bold]  ·  {len(nodes)} node(s), {tree.get('branches', len(nodes) - 1)} "
              f"branch(es)  ·  {tree.get('interactions', 0)} interactions (+{tree.get('replay_steps', 0)} replayed)  ·  "
              f"root {_outcome(root_outcome)} → tree {_outcome('success' if tree.get('success') else 'failure')}")
    if tree.get("reflector") == ORACLE:
        header += f"  ·  {ORACLE_LABEL}"
    out = Tree(Text.from_markup(header))
    children: dict[int | None, list[dict]] = {}
    for n in nodes:
        children.setdefault(n["parent"], []).append(n)

    def add(parent_branch: Tree, node: dict) -> None:
        parent = by_id.get(node["parent"]) if node["parent"] is not None else None
        # a branch fixed the task when its subtree succeeds but its parent's own trajectory did not
        on_path = parent is not None and ok[node["id"]] and parent["outcome"] != "success"
        fixes = on_path and node["outcome"] == "success"
        kids = sorted(children.get(node["id"], []), key=lambda c: c["id"])
        branch = parent_branch.add(node_label(node, kids, fixes, on_path and not fixes, full=full))
        for c in kids:
            add(branch, c)

    for r in children.get(None, []):
        add(out, r)
    return out


def task_table(trees: dict[str, dict], stage: ExploreStage) -> Table:
    state = "done" if stage.done else "not finished"
    oracle = any(t.get("reflector") == ORACLE for t in trees.values())
    table = Table(title=f"{stage.method}.explore → {stage.dir} ({len(trees)} trees, {state})"
                  + (f"  ·  {ORACLE_LABEL}" if oracle else ""), title_justify="left")
    for col in ("task", "nodes", "depth", "interactions", "replayed", "root", "tree", "fixed by"):
        table.add_column(col, justify="right" if col in ("nodes", "depth", "interactions", "replayed") else "left")
    for task, t in trees.items():
        nodes = t["nodes"]
        fixed_by = [f"#{n['id']}" for n in nodes if n["parent"] is not None and n["outcome"] == "success"]
        table.add_row(escape(task), str(len(nodes)), str(max((n["depth"] for n in nodes), default=0)),
                      str(t.get("interactions", 0)), str(t.get("replay_steps", 0)),
                      _outcome(nodes[0]["outcome"] if nodes else None),
                      _outcome("success" if t.get("success") else "failure"), ", ".join(fixed_by) or "-")
    return table
