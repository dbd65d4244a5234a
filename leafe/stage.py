"""What a running stage sees (`StageContext`), and the evaluation stage.

Evaluation runs `eval.samples` independent rollouts per test task through the agent loop,
in fixed chunks of `eval.batch_size` episodes, each chunk with its own derived seed. Records
are append-only JSONL keyed by (task, sample, step) plus one `episode` record per finished
episode. On resume, steps of unfinished episodes are dropped and every incomplete chunk is
re-run whole (so its samples are exactly those of an uninterrupted run); only episodes not
yet recorded are written.

With `runtime.env_workers.count` >= 1 the environments live in a pool of worker processes (or
Ray actors). A chunk whose worker crashed or hung is re-run the same way (same seed, its
recorded episodes skipped, its partial steps dropped), up to `episode_retries` times; then its
unrecorded episodes are recorded as errored failures (`error` field), never dropped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from rich.console import Console
from rich.markup import escape

from leafe.envs import Env
from leafe.errors import EnvWorkerError
from leafe.plan import Plan, PlannedStage
from leafe.seeds import derive_seed
from leafe.spec.loader import LoadedSpec
from leafe.spec.schema import ModelSpec
from leafe.store import RecordLog, atomic_write_json, iter_records, read_json

if TYPE_CHECKING:
    from leafe.models.base import ChatModel

log_ = logging.getLogger("leafe.stage")


@dataclass
class StageContext:
    loaded: LoadedSpec
    plan: Plan
    stage: PlannedStage
    dir: Path
    console: Console

    @functools.cached_property
    def spec(self):
        """The spec as this stage's method sees it (its own `models:` roles applied; built once
        per context: `for_method` copies the spec)."""
        return self.loaded.for_method(self.stage.method).spec

    def make_env(self) -> Env:
        from leafe import envs

        cls = envs.env_class(self.spec.env.adapter)
        return cls(self.loaded.env_options)

    @contextlib.contextmanager
    def env_factory(self) -> Iterator[Callable[[], Env]]:
        """A `make_env` for the agent loop: in-process environments, or with
        `runtime.env_workers.count` >= 1 proxies of environments in a worker pool, local
        processes or Ray actors (`runtime.engine`; closed on exit)."""
        w = self.spec.runtime.env_workers
        if w.count < 1:
            yield self.make_env
            return
        adapter = self.spec.env.adapter
        options = self.loaded.env_options.model_dump(mode="json")
        limits = {"n": w.count, "timeout": w.step_timeout_s, "max_restarts": w.max_restarts,
                  "envs_per_worker": w.envs_per_worker}
        if self.spec.runtime.engine == "ray":
            from leafe.envs.ray_pool import RayPool

            pool = RayPool(adapter, options, ray_spec=self.spec.runtime.ray, num_cpus=w.num_cpus,
                           resources=w.resources, **limits)
        else:
            from leafe.envs.workers import WorkerPool

            pool = WorkerPool(adapter, options, **limits)
        with pool:
            yield pool.make

    def tasks(self, split: str) -> list[str]:
        env = self.make_env()
        try:
            ids = env.tasks(split)
        finally:
            env.close()
        limit = self.spec.env.train_tasks if split == "train" else self.spec.env.test_tasks
        return ids[:limit] if limit else ids

    def start_checkpoint(self) -> Path | None:
        """The checkpoint this stage starts from (`leafe.plan.start_checkpoint`), else None (the
        policy)."""
        from leafe.integrity import verify_checkpoint
        from leafe.plan import start_checkpoint

        sid = start_checkpoint(self.plan.stages, self.stage)
        if sid is None:
            return None
        verify_checkpoint(sid, self.plan.dir(self.plan.stage(sid)))  # the weights as written
        return self.plan.dir(self.plan.stage(sid)) / "checkpoint"

    def policy_spec(self, checkpoint: Path | None = None) -> ModelSpec:
        """The policy's spec, pointing at `checkpoint` when given."""
        policy = self.spec.models.policy
        if checkpoint is None:
            return policy
        update = {"name": str(checkpoint), "revision": None}
        if getattr(policy, "adapter", None) is not None:  # already merged into the checkpoint
            update["adapter"] = None
        return policy.model_copy(update=update)

    def load_models(self, roles: tuple[str, ...] = ("policy",),
                    checkpoint: Path | None = None) -> dict[str, "ChatModel"]:
        """Load the models of `roles` (`policy`, `reflector`, `teacher`), the policy from
        `checkpoint` when given. A role written as `policy` shares the policy's loaded weights
        (the current policy, checkpoint included) through a `RoleView` that keeps its own usage;
        `reflector: oracle` is the environment's solver (`leafe.envs.oracle.EnvOracle`).
        Writes model.json ({role: provenance}) for the manifest."""
        from leafe import models
        from leafe.models.base import RoleView

        loaded: dict[str, "ChatModel"] = {}
        prov: dict[str, dict] = {}
        policy = None
        try:
            for role in roles:
                if role == "policy" or getattr(self.spec.models, role) == "policy":
                    if policy is None and self.spec.runtime.generation.backend != "local":
                        from leafe.models.servers import serve_policy

                        policy = serve_policy(self, checkpoint)
                    elif policy is None:
                        policy = models.load(self.policy_spec(checkpoint))
                    loaded[role] = policy if role == "policy" else RoleView(policy, role)
                    prov[role] = policy.provenance() if role == "policy" else {"same_as": "policy"}
                elif self.spec.is_oracle(role):
                    # the environment's own solver fills the role (no model: `leafe.envs.oracle`),
                    # on an environment instance of its own
                    from leafe.envs.oracle import EnvOracle

                    loaded[role] = EnvOracle(self.make_env(), self.spec.env.adapter)
                    prov[role] = loaded[role].provenance()
                else:
                    loaded[role] = models.load(self.spec.role(role))
                    prov[role] = loaded[role].provenance()
        except BaseException:
            close_models(loaded)
            raise
        atomic_write_json(self.dir / "model.json", prov)
        self._usage_base = read_json(self.dir / "usage.json") if (self.dir / "usage.json").exists() else {}
        return loaded

    def save_usage(self, loaded: dict[str, "ChatModel"]) -> dict[str, dict]:
        """Write usage.json: per role, what this stage's models spent, totalled over resumed
        sessions (calls, samples, tokens, retries, errors, cache hits, seconds)."""
        base = getattr(self, "_usage_base", {})
        out = {}
        for role, model in loaded.items():
            now = model.usage.as_dict()
            before = base.get(role, {})
            out[role] = {k: round(v + before.get(k, 0), 3) if isinstance(v, float) else v + before.get(k, 0)
                         for k, v in now.items()}
        atomic_write_json(self.dir / "usage.json", out)
        self._usage_saved = {role: model.usage.calls for role, model in loaded.items()}
        return out

    def sync_usage(self, loaded: dict[str, "ChatModel"]) -> None:
        """`save_usage` when a model was called since the last save. Called before records are
        appended, so a killed stage's usage.json covers at least every recorded sample (what it
        re-draws on resume is counted again: usage is what was spent)."""
        if getattr(self, "_usage_saved", None) != {role: m.usage.calls for role, m in loaded.items()}:
            self.save_usage(loaded)


def close_models(loaded: dict[str, "ChatModel"]) -> None:
    """Close each distinct loaded model once (role views close nothing)."""
    for model in {id(m): m for m in loaded.values()}.values():
        model.close()


def run_eval(ctx: StageContext) -> dict:
    from leafe.loop import run_episodes
    from leafe.metrics import episode_metrics
    from leafe.models.base import Sampling
    from leafe.progress import StageProgress

    spec = ctx.spec
    tasks = ctx.tasks(spec.env.test_split)
    pairs = [(t, s) for t in tasks for s in range(spec.eval.samples)]
    bs = spec.eval.batch_size
    chunks = [pairs[i:i + bs] for i in range(0, len(pairs), bs)]

    log = RecordLog(ctx.dir / "records.jsonl")
    finished = {(r["task"], r["sample"]) for r in log if r["kind"] == "episode"}
    _drop_unfinished(log, finished)
    # worker crashes survive a resume: counted in a file next to the records
    errors_file = ctx.dir / "env_errors.json"
    errors = {"env_errors": 0, "chunk_retries": 0}
    if errors_file.exists():
        errors.update(read_json(errors_file))

    todo = [i for i, ch in enumerate(chunks) if any(p not in finished for p in ch)]
    if todo:
        policy = ctx.policy_spec(ctx.start_checkpoint())
        sampling = Sampling(
            temperature=spec.eval.temperature if spec.eval.temperature is not None else policy.temperature,
            top_p=spec.eval.top_p if spec.eval.top_p is not None else policy.top_p,
            max_tokens=policy.max_tokens,
        )
        loaded = ctx.load_models(("policy",), ctx.start_checkpoint())
        model = loaded["policy"]
        retries = spec.runtime.env_workers.episode_retries
        try:
            with ctx.env_factory() as make_env, \
                    StageProgress(ctx.console, ctx.stage.id, len(pairs), len(finished)) as bar:
                for i in todo:
                    attempt = 0
                    while True:
                        fresh = {p for p in chunks[i] if p not in finished}

                        def on_step(r: dict, fresh=fresh) -> None:
                            if (r["task"], r["sample"]) in fresh:
                                ctx.sync_usage(loaded)
                                log.append([r])
                                bar.on_step(r)

                        def on_episode(r: dict, fresh=fresh) -> None:
                            if (r["task"], r["sample"]) in fresh:
                                ctx.sync_usage(loaded)
                                log.append([r])
                                finished.add((r["task"], r["sample"]))
                                bar.on_episode()

                        try:
                            run_episodes(make_env, chunks[i], model, sampling, spec.env,
                                         seed=derive_seed(spec.seed, "eval", i),
                                         on_step=on_step, on_episode=on_episode)
                            ctx.save_usage(loaded)
                            break
                        except EnvWorkerError as err:
                            errors["env_errors"] += 1
                            if attempt < retries:
                                attempt += 1
                                errors["chunk_retries"] += 1
                                atomic_write_json(errors_file, errors)
                                ctx.console.print(
                                    f"[yellow]⚠ {ctx.stage.id}: re-running chunk {i} (retry "
                                    f"{attempt}/{retries}): {escape(str(err))}[/yellow]")
                                log_.info("%s: re-running chunk %d (retry %d/%d): %s",
                                          ctx.stage.id, i, attempt, retries, err)
                                # as on resume: the re-run writes the unfinished episodes anew
                                _drop_unfinished(log, finished)
                                continue
                            atomic_write_json(errors_file, errors)
                            lost = _errored_episodes(err, chunks[i], finished)
                            log_.info("%s: chunk %d failed %d time(s); %d episode(s) recorded as "
                                      "errored: %s", ctx.stage.id, i, attempt + 1, len(lost), err)
                            ctx.console.print(
                                f"[red]✗ {ctx.stage.id}: chunk {i} failed {attempt + 1} time(s); "
                                f"{len(lost)} episode(s) recorded as errored (failures): "
                                f"{escape(str(err))}[/red]")
                            log.append(lost)
                            for r in lost:
                                finished.add((r["task"], r["sample"]))
                                bar.on_episode()
                            break
        finally:
            ctx.save_usage(loaded)
            close_models(loaded)

    episodes = [r for r in log if r["kind"] == "episode"]
    metrics = episode_metrics(episodes, spec.eval.k)
    metrics.update(errors)
    if (ctx.dir / "usage.json").exists():
        metrics["usage"] = read_json(ctx.dir / "usage.json")
    atomic_write_json(ctx.dir / "metrics.json", metrics)
    return metrics


def _drop_unfinished(log: RecordLog, finished: set[tuple[str, int]]) -> None:
    """Drop the step records of unfinished episodes (and any duplicate key, defensively)."""
    records = log.read()
    seen: set[tuple] = set()
    keep = []
    for r in records:
        key = (r["task"], r["sample"], r.get("step", "episode"), r["kind"])
        if (r["task"], r["sample"]) in finished and key not in seen:
            seen.add(key)
            keep.append(r)
    if len(keep) != len(records):
        log.rewrite(keep)


def _errored_episodes(err: EnvWorkerError, chunk: list[tuple[str, int]],
                      finished: set[tuple[str, int]]) -> list[dict]:
    """Episode records for a chunk's unrecorded episodes after its last failed attempt: their
    summaries at the failure (steps so far, matching the step records kept), as failures."""
    from leafe.loop import Episode

    partial = {(s["task"], s["sample"]): s for s in getattr(err, "episodes", [])}
    out = []
    for task, sample in chunk:
        if (task, sample) in finished:
            continue
        summary = partial.get((task, sample))
        if summary is None:
            summary = Episode(task, sample, None, None).summary()  # type: ignore[arg-type]
        out.append({**summary, "success": False, "error": str(err)})
    return out


def read_episodes(stage_dir: Path) -> list[dict]:
    """The episode records of an evaluation stage (a line still being written is skipped; a
    damaged one is a `CorruptRecordError` naming the file and line)."""
    path = stage_dir / "records.jsonl"
    if not path.exists():
        return []
    return [r for r in iter_records(path, complete_only=True) if r.get("kind") == "episode"]
