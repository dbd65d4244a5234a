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


def print_tables(data: dict, console: Console) -> None:
    for t in tables(data):
        console.print(table_rich(t))


def write_reports(loaded: LoadedSpec | list[LoadedSpec], runs_dir, reports_dir: Path | str,
                  console: Console | None, name: str | None = None) -> dict:
    """Collect and render the report of one spec, or the combined report of several (named
    `name`, default `combined`); `runs_dir` may be a Plan (its runs directory is used)."""
    specs = loaded if isinstance(loaded, list) else [loaded]
    groups = [collect(one, runs_dir) for one in specs]
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


