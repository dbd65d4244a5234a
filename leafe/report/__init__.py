"""Reports: paper-style comparison tables and Pass@k curves, recomputed from run records.

`collect` gathers one spec's report data (all its seeds), `combine` joins several specs into one
table with a column group per environment x model; `write_reports` renders the formats the spec
asks for (`report.formats`: md, json, tex, html) into `reports/<name>.*` and prints the terminal
tables. Modules: `data` (statistics), `tables` (one table model for every format), `render`
(Markdown, LaTeX, rich, HTML tables), `plots` (matplotlib SVG), `html` (the self-contained page).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from leafe.errors import UserError
from leafe.report.data import REPORT_VERSION, collect, combine, groups_of
from leafe.report.render import latex_document, table_markdown, table_rich, to_latex
from leafe.report.tables import main_table, stage1_table, tables
from leafe.spec.loader import LoadedSpec
from leafe.store import atomic_write_json, atomic_write_text

__all__ = ["REPORT_VERSION", "collect", "combine", "groups_of", "latex_document", "main_table",
           "stage1_table", "tables", "to_latex", "to_markdown", "write_reports", "render_all"]


def to_markdown(data: dict, plot_files: dict[str, str] | None = None) -> str:
    """The whole report as Markdown: every table, then links to the plot files beside it."""
    lines = [f"# {data['name']}", ""]
    for t in tables(data):
        lines.append(table_markdown(t))
    for name, file in (plot_files or {}).items():
        lines += [f"![{name}]({file})", ""]
    groups = groups_of(data)
    tasks = sorted({r["tasks"] for g in groups for r in g["rows"] if "tasks" in r})
    if tasks:
        lines += [f"Test tasks: {', '.join(map(str, tasks))}. Generated {data['generated']} by leafe.", ""]
    train = sorted({r["tasks"] for g in groups for r in (g.get("stage1") or {}).get("rows", []) if "tasks" in r})
    if train:
        lines += [f"Train tasks (Stage 1): {', '.join(map(str, train))}.", ""]
    return "\n".join(lines)


def render_all(data: dict, formats: list[str], out: Path, plots: bool = True) -> list[str]:
    """Write `out/<name>.<fmt>` for each format (and the plots as `<name>.<plot>.svg` beside the
    Markdown); returns the paths written."""
    from leafe.report import plots as plotting
    from leafe.report.html import to_html

    name = data["name"]
    svgs = plotting.all_plots(data) if plots and ({"md", "html"} & set(formats)) else {}
    written: list[str] = []
    ts = tables(data)
    if "md" in formats:
        files = {}
        for k, svg in svgs.items():
            path = out / f"{name}.{k}.svg"
            atomic_write_text(path, svg)
            files[k] = path.name
            written.append(str(path))
        atomic_write_text(out / f"{name}.md", to_markdown(data, files))
        written.append(str(out / f"{name}.md"))
    if "json" in formats:
        atomic_write_json(out / f"{name}.json", data)
        written.append(str(out / f"{name}.json"))
    if "tex" in formats:
        atomic_write_text(out / f"{name}.tex", to_latex(ts, name))
        written.append(str(out / f"{name}.tex"))
    if "html" in formats:
        atomic_write_text(out / f"{name}.html", to_html(data, ts, svgs))
        written.append(str(out / f"{name}.html"))
    return written


def _raise_if_nothing_finished(loaded: LoadedSpec, root: Path, group: dict) -> None:
    """A UserError when no evaluation of the group finished and no Stage 1 exploration did."""
    if any(r.get("seeds_done") for r in group["rows"]) or any(
            r.get("status") == "done" for r in group["stage1"]["rows"]):
        return
    states = ", ".join(f"eval.{r['method']} {r['status']}" for r in group["rows"])
    spec = loaded.file or "SPEC"
    raise UserError(f"{root}: no evaluation has finished ({states}), so there is nothing to report; no report "
                    f"was written. `leafe run {spec}` runs them (resuming what was started); `leafe plan "
                    f"{spec}` shows what is left")


def print_tables(data: dict, console: Console) -> None:
    for t in tables(data):
        console.print(table_rich(t))


def write_reports(loaded: LoadedSpec | list[LoadedSpec], runs_dir, reports_dir: Path | str,
                  console: Console | None, name: str | None = None,
                  roots: list[Path | None] | None = None) -> dict:
    """Collect and render the report of one spec, or the combined report of several (named
    `name`, default `combined`); `runs_dir` may be a Plan (its run directory is used). `roots`:
    per spec, the run directory to read (a path the user gave), or None for runs_dir/<run name>.

    A spec with nothing finished (no evaluation, no LEAFE exploration for the Stage 1 table) is
    a `UserError` and nothing is written: a table of `(not run)` would replace a good report."""
    from leafe.plan import Plan

    specs = loaded if isinstance(loaded, list) else [loaded]
    roots = list(roots) if roots is not None else [None] * len(specs)
    if isinstance(runs_dir, Plan):
        if len(specs) == 1:
            roots = [roots[0] or runs_dir.root]
        runs_dir = runs_dir.root.parent
    groups = [collect(one, runs_dir, root) for one, root in zip(specs, roots)]
    for one, root, group in zip(specs, roots, groups):
        _raise_if_nothing_finished(one, root or Path(runs_dir) / one.spec.run_name(), group)
    rep = specs[0].spec.report
    if len(groups) == 1:
        data = groups[0] | ({"name": name} if name else {})
    else:
        data = combine(groups, name or "combined")
    try:
        written = render_all(data, list(rep.formats), Path(reports_dir), rep.plots)
    except OSError as e:
        from leafe.oserrors import os_error_message

        raise UserError(os_error_message(
            e, f"cannot write the report into {reports_dir}",
            "make that folder writable for you, or write the report elsewhere with --reports-dir DIR",
            "run the same command again (the report is recomputed from the records)")) from None
    if console is not None:
        print_tables(data, console)
        for w in written:
            console.print(f"report written: {w}")
    data["written"] = written
    return data


