"""Execute a plan: run every stage that is not done, in dependency order, then the report.

A finished stage (DONE marker) is reused; a partial one resumes from its records. One run at a
time per run directory (an advisory file lock). The DONE marker records what the stage wrote
(`leafe.integrity`): a finished stage that lost a file runs again (resuming from what it
kept); one whose files changed stops the run (exit 2) before anything runs, naming the file.

A training stage whose environment worker crashed or hung (`EnvWorkerError`) is resumed in
place, from what it saved, up to `runtime.env_workers.episode_retries` times, exactly as a
re-run of `leafe run` would resume it (evaluation retries the failed chunk itself).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from leafe.errors import EnvWorkerError, UserError
from leafe.integrity import DONE, write_done
from leafe.manifest import write_manifest
from leafe.plan import Plan, build_plan
from leafe.report import write_reports
from leafe.runlock import run_lock
from leafe.spec.loader import LoadedSpec
from leafe.stage import StageContext, run_eval
from leafe.store import atomic_write_json, relax_modes


def run(loaded: LoadedSpec, runs_dir: Path | str = "runs", reports_dir: Path | str = "reports",
        console: Console | None = None) -> dict:
    """Run the experiment under each of its master seeds (`Spec.run_seeds`), then write the
    report over all of them."""
    console = console or Console()
    per_seed = loaded.per_seed()
    for one in per_seed:
        if len(per_seed) > 1:
            console.print(f"[bold]seed {one.spec.seed}[/bold]")
        run_one(one, runs_dir, console)
    return write_reports(loaded, runs_dir, reports_dir, console)


def run_one(loaded: LoadedSpec, runs_dir: Path | str, console: Console) -> Plan:
    """Every stage of one seed's plan that is not done, in order."""
    from leafe.progress import quiet_libraries

    quiet_libraries()
    plan = build_plan(loaded, runs_dir)
    plan.raise_if_damaged()  # never build on a finished stage whose files changed
    work_left = any(plan.status(s) not in ("done", "always") for s in plan.stages)
    if work_left:
        check_data(loaded)  # before the run directory is touched
    current: list = [None]  # the stage running, for the message of a full disk
    try:
        _run_stages(loaded, plan, work_left, console, current)
    except (OSError, RuntimeError) as e:
        err = _storage_error(e, plan, current[0], work_left)
        if err is None:
            raise
        raise err from None
    return plan


def _storage_error(e: BaseException, plan: Plan, stage, work_left: bool) -> UserError | None:
    """A full disk (ENOSPC, torch's `unexpected pos`) or a run directory that cannot be written,
    as a UserError saying where and what to do (a re-run resumes); None for other errors."""
    from leafe.oserrors import storage_problem

    where = plan.dir(stage) if stage is not None else plan.root
    found = storage_problem(e, where)
    if found is None:
        return None
    kind, what = found
    doing = f"{stage.id} stopped" if stage is not None else "leafe run stopped"
    if kind == "full":
        return UserError(f"{doing}: {what}. Free space there, then run the same `leafe run` again: it resumes "
                         "from what was saved (finished stages, records, trainer checkpoints)")
    if not work_left:
        return UserError(f"{doing}: cannot write in the run directory {plan.root} ({what}). Every stage is "
                         "done, but `leafe run` still writes its lock, log and manifest there: make it writable "
                         f"for you, or read the run without writing to it: `leafe report {plan.root} "
                         "--reports-dir DIR`")
    return UserError(f"{doing}: cannot write in the run directory {plan.root} ({what}); make it writable for "
                     "you, then run the same `leafe run` again: it resumes from what was saved")


def _run_stages(loaded: LoadedSpec, plan: Plan, work_left: bool, console: Console, current: list) -> None:
    """The stages not done, in order, under the run's lock; `current[0]`: the stage running."""
    from leafe.progress import run_logging

    with run_lock(plan.root) as lock, run_logging(console, plan.root / "leafe.log"), \
            _threads(loaded, work_left, console) as threads:
        write_manifest(loaded, plan, threads)
        if work_left:
            _preflight(loaded, console)
        for stage in plan.stages:
            if stage.kind == "report":
                continue
            status = plan.status(stage)
            if stage.same_as is not None:  # `reuse:`: that stage ran first, in its own directory
                if status != "done":
                    raise RuntimeError(f"{stage.id} shares {stage.same_as}, which has not finished")
                console.print(f"[dim]✓ {stage.id} (= {stage.same_as}: {plan.dir(stage)})[/dim]")
                continue
            if status == "done":
                console.print(f"[dim]✓ {stage.id} (cached: {plan.dir(stage)})[/dim]")
                continue
            d = plan.dir(stage)
            if status == "incomplete":
                _reopen(stage.id, d, plan.check(stage), console)
            current[0] = stage
            lock.at_stage(stage.id, stage.dirname)  # `leafe plan` meanwhile: "in use by pid N"
            d.mkdir(parents=True, exist_ok=True)
            # what the key was made of: `leafe plan` names what changed when a stage runs anew
            atomic_write_json(d / "stage.json", {"id": stage.id, "kind": stage.kind, "hash": stage.hash,
                                                 "deps": stage.deps, "inputs": stage.inputs,
                                                 "version": stage.version, **stage.key_record()})
            verb = {"partial": "resuming", "incomplete": "re-running"}.get(status, "running")
            console.print(f"[bold]▶ {verb} {stage.id}[/bold] → {d}")
            t0 = time.perf_counter()
            if stage.kind == "eval":
                run_eval(StageContext(loaded, plan, stage, d, console))
            else:
                _run_resuming(loaded, plan, stage, d, console)
            relax_modes(d)  # weights that safetensors wrote 0600, readable as the umask allows
            write_done(d, time.perf_counter() - t0)
            current[0] = None
            lock.at_stage(None, None)
            write_manifest(loaded, plan, threads)


def _reopen(stage_id: str, d: Path, check, console: Console) -> None:
    """A finished stage lost a file it wrote: remove its DONE marker so it runs again, from
    what it kept (as if killed just before it finished), and say so."""
    import logging

    from rich.markup import escape

    console.print(f"[yellow]⚠ {stage_id}: {escape(', '.join(check.missing))} missing from the finished stage "
                  f"({d}); running the stage again to write it[/yellow]")
    logging.getLogger("leafe").info("%s: %s missing from the finished stage; running it again",
                                    stage_id, ", ".join(check.missing))
    (d / DONE).unlink(missing_ok=True)


@contextmanager
def _threads(loaded: LoadedSpec, work_left: bool, console: Console):
    """torch's CPU threads while stages run (`runtime.threads`, see leafe.threads); yields what
    torch uses (for the manifest), or None, and imports no torch, when every stage is done."""
    if not work_left:
        yield None
        return
    from leafe import threads

    resolved = threads.resolve(loaded.spec.runtime.threads)
    with threads.using(resolved) as record:
        now = f"; {record['threads']} now" if resolved.source == "auto" else ""
        console.print(f"[dim]torch threads: {resolved.describe()}{now}[/dim]")
        yield record


def _run_resuming(loaded: LoadedSpec, plan: Plan, stage, d: Path, console: Console) -> None:
    """Run a training stage; after an environment worker failure, resume it (a fresh context
    over the same directory) up to `episode_retries` times."""
    import gc
    import logging

    from rich.markup import escape

    assert stage.run is not None
    retries = loaded.spec.runtime.env_workers.episode_retries
    attempt = 0
    while True:
        try:
            ctx = StageContext(loaded, plan, stage, d, console)
            if loaded.smoke is not None:  # a smoke run: its labelled fallbacks (leafe.smoke)
                from leafe.smoke import run_stage

                run_stage(ctx)
            else:
                stage.run(ctx)
            return
        except EnvWorkerError as err:
            if attempt >= retries:
                raise
            attempt += 1
            console.print(f"[yellow]⚠ {stage.id}: {escape(str(err))}; resuming the stage "
                          f"(retry {attempt}/{retries})[/yellow]")
            logging.getLogger("leafe").warning("%s: resuming after an environment worker failure (retry %d/%d): %s",
                                               stage.id, attempt, retries, err)
            gc.collect()  # the failed attempt's models, before the next loads its own


def check_data(loaded: LoadedSpec) -> None:
    """Stop before any stage when the environment's data is missing: a UserError of one line
    with the command that gets it (`Env.missing_data`, file checks only)."""
    from leafe import envs

    problem = envs.env_class(loaded.spec.env.adapter).missing_data(loaded.env_options)
    if problem is not None:
        raise UserError(problem)


def _preflight(loaded: LoadedSpec, console: Console) -> None:
    """Fail before any work when the policy's weights cannot be found (a clear UserError);
    built-in models are built here on first use (SmolLM2: a one-time GGUF conversion)."""
    policy = loaded.spec.models.policy
    if policy.backend == "transformers":
        from leafe.models.builtin import resolve

        with console.status(f"preparing model {policy.name} (first use of a built-in model converts it once)"):
            path, _ = resolve(policy.name, policy.revision)
        console.print(f"[dim]model {policy.name} → {path}[/dim]")
