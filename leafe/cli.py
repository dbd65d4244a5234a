"""The `leafe` command line. Heavy packages are imported only by the commands that need them:
`--help`, `validate`, `plan`, `envs` and `show` never import torch, transformers or litellm."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup
from rich.markup import escape  # error texts quote spec values: `[..]` there is not markup

import leafe
from leafe.errors import RunDataError, SpecError, UserError, cut

INTERRUPTED = "interrupted; re-run the same command to resume"


class _Commands(TyperGroup):
    """leafe's command group: Ctrl-C (KeyboardInterrupt) in any command prints how to go on
    and exits 130; typer would exit 130 before `main` could say anything. A full disk or a
    place that cannot be written exits 2 with a message, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            err.print(INTERRUPTED, highlight=False)
            raise typer.Exit(130) from None
        except OSError as e:  # a full disk or an unwritable place no command turned into a message
            from leafe.oserrors import storage_problem

            found = storage_problem(e)
            if found is None:
                raise
            fix = ("free space there, then run the same command again" if found[0] == "full" else
                   "make it writable for you (or choose another place), then run the same command again")
            err.print(f"[red]error:[/red] {escape(found[1])}; {fix}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Commands,
    name="leafe",
    help="LEAFE and baselines for LLM agents: one YAML spec → training, Pass@k evaluation, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
if not console.is_terminal:  # piped or logged: do not squeeze tables into 80 columns
    console = Console(width=120)
err = Console(stderr=True)

SetOpt = typer.Option(None, "--set", "-s", help="Override a spec field: dotted.key=value (repeatable).")
RunsOpt = typer.Option(Path("runs"), "--runs-dir", help="Where run artifacts go.")
ReportsOpt = typer.Option(Path("reports"), "--reports-dir", help="Where reports go.")


#: The most characters of one error message printed: messages cut the values they quote, and
#: this bounds what slipped through (rich lays a megabytes-long line out for minutes).
MESSAGE_LIMIT = 4000


def _print_error(msg: str) -> None:
    err.print(f"[red]error:[/red] {escape(cut(msg, MESSAGE_LIMIT))}", highlight=False, soft_wrap=True)


def _fail(e: Exception) -> None:
    for p in e.problems if isinstance(e, (SpecError, RunDataError)) else [str(e)]:
        _print_error(p)
    raise typer.Exit(2)


def _load(spec: Path, sets: list[str] | None, smoke: bool = False):
    from leafe.spec import load_spec

    loaded = load_spec(spec, sets or [])
    if smoke:
        from leafe.smoke import smoke_spec

        loaded = smoke_spec(loaded)
    return loaded


def _prompt_notes(loaded) -> None:
    """Say which prompts are long enough to make every step slow (a run that seems stuck)."""
    from leafe.spec.loader import prompt_notes

    for line in prompt_notes(loaded.spec):
        err.print(f"[yellow]{escape(line)}[/yellow]", soft_wrap=True, highlight=False)


SmokeOpt = typer.Option(False, "--smoke", help="The spec's smoke run: every method and stage with the tiny "
                        "model, a handful of tasks, small budgets, offline stand-ins for missing data, into "
                        "runs/<name>-smoke/ (see leafe/smoke.py).")


def _version(value: bool) -> None:
    if value:
        console.print(f"leafe {leafe.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@app.command()
def validate(specs: List[Path] = typer.Argument(..., help="Spec files."), sets: Optional[List[str]] = SetOpt) -> None:
    """Check specs: schema, presets, method fields, environment options, templates."""
    failed = False
    for s in specs:
        try:
            loaded = _load(s, sets)
            console.print(f"[green]ok[/green] {s} ({loaded.spec.name}: {', '.join(loaded.methods)})")
            _prompt_notes(loaded)
        except UserError as e:
            failed = True
            if isinstance(e, SpecError):
                for p in e.problems:
                    _print_error(p)
            else:
                from leafe.spec.loader import _display

                _print_error(str(e) if _display(s) in str(e) else f"{s}: {e}")
    if failed:
        raise typer.Exit(2)


@app.command()
def plan(spec: Path = typer.Argument(..., help="Spec file."), sets: Optional[List[str]] = SetOpt,
         runs_dir: Path = RunsOpt, smoke: bool = SmokeOpt,
         as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object: the resolved "
                                      "spec, every stage (key, status, roles and where they run, budget, "
                                      "bounds on model calls and tokens) and every method.")) -> None:
    """Show the stage graph, each stage's key and whether it is already done, where each model
    role runs and at most how many calls each stage makes."""
    from rich.table import Table

    from leafe.plan import build_plan

    try:
        loaded = _load(spec, sets, smoke)
        plans = [(one.spec.seed, build_plan(one, runs_dir)) for one in loaded.per_seed()]
        if as_json:
            import json

            from leafe.planinfo import plan_json

            sys.stdout.write(json.dumps(plan_json(loaded, plans), indent=2, ensure_ascii=False) + "\n")
            return
    except UserError as e:
        _fail(e)
    for line in loaded.smoke or []:
        console.print(f"smoke: {line}", soft_wrap=True, highlight=False, markup=False)
    colors = {"done": "green", "partial": "yellow", "todo": "white", "always": "dim", "incomplete": "yellow",
              "damaged": "red"}
    for seed, p in plans:  # one table per master seed of a multi-seed spec
        title = f"plan for {loaded.spec.name} → {p.root}" + (f" (seed {seed})" if len(plans) > 1 else "")
        table = Table(title=title, title_justify="left")
        for col in ("stage", "kind", "depends on", "key", "status"):
            table.add_column(col)
        for s in p.stages:
            st = p.status(s)
            deps = ", ".join(s.deps + [f"{a} (budget.match)" for a in s.after])
            sid = s.id + (f" = {s.same_as}" if s.same_as else "")
            note = p.note(s)  # what is wrong, who runs it, or what changed since it last ran
            cell = f"{st} ({escape(note)})" if note else st
            table.add_row(sid, s.kind, deps or "-", s.hash[:12] if s.kind != "report" else "-",
                          f"[{colors[st]}]{cell}[/{colors[st]}]")
        console.print(table)
        if (holder := p.in_use()) is not None:
            from leafe.runlock import describe_holder

            at = f", running {holder['stage']}" if holder.get("stage") else ""
            console.print(f"[yellow]{escape(str(p.root))} is in use by `leafe run`{describe_holder(holder)}{at}"
                          "[/yellow]", soft_wrap=True, highlight=False)
    damaged = _unusable_stages(plans)
    from leafe.budget import budget_fit

    for line in budget_fit(loaded.spec, loaded.methods, loaded.method_types)[0]:
        console.print(line, soft_wrap=True, highlight=False)
    extra = [m for m, c in loaded.methods.items() if getattr(c, "extra", False)]
    if extra:
        console.print(f"extra rows (not in the paper's table): {', '.join(extra)}", highlight=False)
    from leafe.planinfo import plan_lines

    for line in plan_lines(loaded, plans[0][1]):
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    from leafe import envs as env_registry

    missing = env_registry.env_class(loaded.spec.env.adapter).missing_data(loaded.env_options)
    if missing is not None:  # `leafe run` would stop here
        console.print(f"[yellow]data missing:[/yellow] {escape(missing)}", soft_wrap=True, highlight=False)
    spec_ = loaded.spec
    workers = spec_.runtime.env_workers
    if workers.count >= 1:
        if spec_.runtime.engine == "ray":
            where = (f"the Ray cluster at {spec_.runtime.ray.address}" if spec_.runtime.ray.address
                     else "a private local Ray instance")
            console.print(f"environment workers: {workers.count} Ray actors "
                          f"({workers.num_cpus:g} CPU each) on {where}")
        else:
            console.print(f"environment workers: {workers.count} local processes")
    from leafe.threads import resolve as resolve_threads

    console.print(f"torch threads: {resolve_threads(spec_.runtime.threads).describe()}", highlight=False)
    if spec_.runtime.generation.backend != "local":
        from leafe.models.servers import describe

        for line in describe(spec_.runtime.generation, plans[0][1].stages):
            console.print(line, soft_wrap=True)
    training = spec_.runtime.training
    if training.launcher == "accelerate":
        from leafe.methods.launch import launch_command

        try:
            cmd = launch_command(training, "<stage dir>/launch/job.json", cuda=False)
        except UserError as e:
            _fail(e)
        def shown(cmd: list[str]) -> str:
            text = " ".join(cmd[1:] if cmd[0] == sys.executable else cmd)
            return text.replace("-m accelerate.commands.launch", "accelerate launch", 1)

        console.print("training stages run as: " + shown(cmd), soft_wrap=True)
        if training.num_machines > 1:  # leafe starts rank 0 only
            other = launch_command(training, "<stage dir>/launch/job.json", cuda=False, machine_rank=1)
            console.print(f"  and on each of the other {training.num_machines - 1} machines (the run directory on a "
                          "shared filesystem, machine_rank 1, 2, ...): " + shown(other), soft_wrap=True)
    if damaged:
        _fail(damaged)


def _unusable_stages(plans) -> RunDataError | None:
    """Print a line per incomplete finished stage (`leafe run` runs it again); the error for
    damaged ones (`leafe plan` exits 2 after the plan), None when there are none."""
    from leafe.integrity import damaged_error

    problems = []
    for _, p in plans:
        for s, c in p.unusable():
            if c.status == "damaged":
                problems.append(str(damaged_error(s.id, p.dir(s), c)))
            else:
                console.print(f"[yellow]{s.id}: {escape(c.reason())} from the finished stage; `leafe run` runs "
                              "it again[/yellow]", soft_wrap=True, highlight=False)
    return RunDataError(problems) if problems else None


@app.command()
def run(spec: Path = typer.Argument(..., help="Spec file."), sets: Optional[List[str]] = SetOpt,
        runs_dir: Path = RunsOpt, reports_dir: Path = ReportsOpt, smoke: bool = SmokeOpt) -> None:
    """Run every stage that is not done (resuming partial ones), then write the report."""
    try:
        loaded = _load(spec, sets, smoke)
        for line in loaded.smoke or []:
            console.print(f"smoke: {line}", soft_wrap=True, highlight=False, markup=False)
        _prompt_notes(loaded)
        from leafe.runner import run as run_plan

        run_plan(loaded, runs_dir, reports_dir, console)
    except UserError as e:
        _fail(e)


def _load_source(path: Path, sets: list[str] | None):
    """A spec file, or a run directory (runs/<name>/): the spec its manifest recorded."""
    if not path.is_dir():
        return _load(path, sets)
    from leafe.spec.loader import load_dump

    every = sorted(path.glob("manifest*.json"), key=lambda p: p.stat().st_mtime)
    # the directory's own spec (manifest.json, manifest.seed-N.json) before specs that share it
    # (`run_dir`: manifest.<name>.json)
    own = [m for m in every if m.name == "manifest.json" or m.name.startswith("manifest.seed-")]
    manifests = own or every
    if not manifests:
        raise UserError(f"{path}: not a run directory (no manifest.json); pass the spec file or "
                        f"runs/<name>/ of a `leafe run`")
    m = _read_manifest(manifests[-1])
    spec = dict(m["spec"])
    if spec.get("seeds") and isinstance(spec["seeds"], list):
        spec["seed"] = spec["seeds"][0]
    try:
        return load_dump(spec, m.get("method_order"), sets)
    except UserError as e:
        raise UserError(f"{manifests[-1]}: its recorded spec does not load under leafe {leafe.__version__} "
                        f"({e}); pass the spec file instead") from None


def _read_manifest(path: Path) -> dict:
    """A run manifest as a dict with a `spec` object; a UserError naming the file otherwise."""
    from leafe.store import read_json

    fix = "restore it from a copy, or pass the spec file instead of the run directory"
    try:
        m = read_json(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a leafe manifest (not UTF-8 text); {fix}") from None
    except ValueError as e:
        raise UserError(f"{path}: not a leafe manifest (not valid JSON: {e}); {fix}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    if not isinstance(m, dict):
        raise UserError(f"{path}: not a leafe manifest (a JSON {type(m).__name__}, not an object); {fix}")
    if not isinstance(m.get("spec"), dict):
        raise UserError(f"{path}: not a leafe manifest (no `spec` object: the spec it ran is not recorded); {fix}")
    methods = m["spec"].get("methods")
    if not isinstance(methods, dict):
        raise UserError(f"{path}: not a leafe manifest (its `spec` has no `methods` object); {fix}")
    order = m.get("method_order")
    if order is not None and not (isinstance(order, list) and all(isinstance(x, str) and x in methods
                                                                   for x in order)):
        raise UserError(f"{path}: not a leafe manifest (`method_order` is not a list of the spec's methods); {fix}")
    return m


@app.command()
def report(sources: List[Path] = typer.Argument(..., help="Spec files or run directories (runs/<name>/); "
                                                "several give one combined table."),
           sets: Optional[List[str]] = SetOpt, runs_dir: Path = RunsOpt, reports_dir: Path = ReportsOpt,
           name: Optional[str] = typer.Option(None, "--name", help="Name of a combined report "
                                              "(reports/<name>.*; default: combined).")) -> None:
    """Render the report from the records of finished evaluations: one spec's table, or one
    combined table (a column group per environment x model) for several."""
    from leafe.report import write_reports

    try:
        loaded = [_load_source(s, sets) for s in sources]
        if name is not None:
            from leafe.spec.schema import name_problem

            if (msg := name_problem(name, "reports/<name>.*")) is not None:
                raise UserError(f"--name: {msg}")
        # a run directory is read where it is, whatever its name (renamed, copied); its report is
        # named after it when that differs from the run's name, so it never replaces another's
        roots = [s if s.is_dir() else None for s in sources]
        if name is None and len(sources) == 1 and roots[0] is not None:
            folder = roots[0].resolve().name
            name = folder if folder != loaded[0].spec.run_name() else None
        write_reports(loaded if len(loaded) > 1 else loaded[0], runs_dir, reports_dir, console,
                      name=name, roots=roots)
    except UserError as e:
        _fail(e)


@app.command()
def envs() -> None:
    """List the registered environments."""
    from leafe import envs as registry

    for name in registry.names():
        console.print(name)


@app.command()
def schema(out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to this file instead of "
                                              "printing."),
           reference: bool = typer.Option(False, "--reference", help="The Markdown reference page "
                                          "(docs/spec-reference.md) instead of the JSON Schema."),
           write: bool = typer.Option(False, "--write", help="Rebuild the committed files of this checkout: "
                                      "schema/leafe-spec-1.json and docs/spec-reference.md."),
           check: bool = typer.Option(False, "--check", help="Exit 1 when the committed files differ from "
                                      "what --write would write.")) -> None:
    """Print the JSON Schema of spec format 1 (every method's and environment adapter's fields
    included; editors use it for completion and checking), or the reference page."""
    from leafe.spec import export

    try:
        _schema(export, out, reference, write, check)
    except UserError as e:  # an adapter or method whose module cannot be imported here
        _fail(e)


def _schema(export, out: Optional[Path], reference: bool, write: bool, check: bool) -> None:
    if write or check:
        root = export.checkout_root()
        if root is None:
            _fail(UserError("--write and --check work in a leafe source checkout (the committed files "
                            "live there); this leafe is installed elsewhere"))
        stale = []
        for rel, text in export.generated_files().items():
            path = root / rel
            current = path.read_text(encoding="utf-8") if path.is_file() else None
            if current == text:
                continue
            stale.append(rel)
            if write:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
        for rel in stale:
            console.print(f"{'wrote' if write else 'stale'}: {rel}", highlight=False)
        if not stale:
            console.print("up to date", highlight=False)
        if check and stale and not write:
            err.print("run `leafe schema --write` and commit the files", highlight=False)
            raise typer.Exit(1)
        return
    if reference:
        text = export.reference_markdown()
    else:
        text = export.schema_text()
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")


show_app = typer.Typer(help="Inspect a run's artifacts.", no_args_is_help=True)
app.add_typer(show_app, name="show")


@show_app.command("tree")
def show_tree(
    run: Path = typer.Argument(..., help="A run directory (runs/<name>) or its spec file."),
    task: Optional[str] = typer.Argument(None, help="A train task id (see --list)."),
    method: Optional[str] = typer.Option(None, "--method", help="The LEAFE method, when the run has several."),
    list_tasks: bool = typer.Option(False, "--list", help="List the tasks with their tree size and outcome."),
    full: bool = typer.Option(False, "--full", help="Untrimmed experiences, every action and raw reflection."),
    sets: Optional[List[str]] = SetOpt,
    runs_dir: Path = RunsOpt,
) -> None:
    """Draw a LEAFE exploration tree: each branch's τ, experience, actions and outcome, and which
    branches fixed the task."""
    from leafe import treeview

    try:
        stage = treeview.locate(run, method, sets=sets, runs_dir=runs_dir)
        trees = treeview.read_trees(stage.dir)
        if list_tasks:
            console.print(treeview.task_table(trees, stage))
            return
        if task is None:
            raise UserError(f"give a TASK (one of {', '.join(list(trees)[:3])}, ...) or --list")
        tree = treeview.task_or_error(trees, task, stage)
    except UserError as e:
        _fail(e)
    console.print(f"[dim]{stage.method}.explore → {stage.dir}{'' if stage.done else ' (not finished)'}[/dim]")
    console.print(treeview.render_tree(tree, full=full))


data_app = typer.Typer(help="The datasets leafe can fetch (ALFWorld, WebShop, CodeContests, MBPP): list them, "
                       "get one into $LEAFE_DATA.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list(as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table.")) -> None:
    """The datasets leafe can fetch: whether each is installed and where, what reads it, its size."""
    import os

    from rich.table import Table

    from leafe import data

    rows = []
    for name, d in data.DATASETS.items():
        target, where = data.dataset_dir(name), data.locate(name)
        marker = data.read_marker(name) if data.installed(name) else None
        if marker is not None:
            status, size = "installed", data.human_bytes(marker.get("bytes", 0))
        elif where != target:
            status, size = "found (not by leafe)", "-"
        else:
            status = "incomplete" if target.exists() else "missing"
            size = f"download {d.download_size}" if d.download_size else "download size unknown"
        rows.append({"name": name, "status": status, "path": str(where), "size": size,
                     "bytes": marker.get("bytes") if marker else None, "title": d.title, "source": d.origin,
                     "used_by": d.used_by, "contents": marker.get("contents") if marker else None,
                     "get": f"leafe data get {name}"})
    if as_json:
        import json

        sys.stdout.write(json.dumps({"data_root": str(data.data_root()), "mirror": os.environ.get("LEAFE_DATA_MIRROR"),
                                     "datasets": rows}, indent=2) + "\n")
        return
    table = Table(title=f"datasets in $LEAFE_DATA = {data.data_root()}", title_justify="left")
    table.add_column("dataset")
    table.add_column("status")
    table.add_column("path", overflow="fold")
    table.add_column("size")
    table.add_column("used by")
    colors = {"installed": "green", "missing": "yellow", "incomplete": "red"}
    for r in rows:
        c = colors.get(r["status"], "cyan")
        table.add_row(f"{r['name']}\n[dim]{escape(r['title'])}[/dim]", f"[{c}]{r['status']}[/{c}]",
                      escape(r["path"]), r["size"], escape(r["used_by"]))
    console.print(table)
    if os.environ.get("LEAFE_DATA_MIRROR"):
        console.print(f"LEAFE_DATA_MIRROR = {escape(os.environ['LEAFE_DATA_MIRROR'])}: `leafe data get` fetches "
                      "from there", highlight=False)
    console.print("get one: leafe data get NAME [--from PATH_OR_URL] [--force]", highlight=False, markup=False)


@data_app.command("get")
def data_get(
    name: str = typer.Argument(..., help="The dataset (see `leafe data list`)."),
    source: Optional[str] = typer.Option(None, "--from", help="Install from a copy instead of the official "
                                         "source: a local folder or archive with the dataset's files (or its "
                                         "installed folder), the URL of such an archive, or a mirror URL (a "
                                         "folder served over HTTP with the files under their names)."),
    force: bool = typer.Option(False, "--force", help="Fetch and install again even if installed."),
) -> None:
    """Download a dataset into $LEAFE_DATA/NAME (default $LEAFE_CACHE/data), check it, install it
    atomically and print its folder. An interrupted download resumes when run again."""
    from leafe import data

    try:
        path = data.get(name, source, force, console=err)
    except UserError as e:
        _fail(e)
    sys.stdout.write(f"{path}\n")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # outside a command (e.g. while parsing arguments)
        err.print(INTERRUPTED, highlight=False)
        sys.exit(130)
