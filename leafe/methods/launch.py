"""Training under `accelerate launch` (`runtime.training.launcher: accelerate`).

`train_sft` in the `leafe run` process writes a job (the examples, the training
hyper-parameters, the spec as loaded, the stage and its start checkpoint) into
`<stage dir>/launch/`, then runs `accelerate launch ... -m leafe.methods.launch JOB`. Every
process rebuilds the stage's context from the job and calls `train_sft` itself; TRL's trainer
does the data-parallel (or FSDP/ZeRO) training, the main process writes the checkpoint and
`result.json`, exactly as a single process would. A failed launch raises with the tail of
`launch/launch.log`.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

from leafe.errors import UserError

#: TRL's named accelerate configs (files shipped in trl/accelerate_configs/)
NAMED_CONFIGS = {"ddp": "multi_gpu", "fsdp": "fsdp2", "fsdp1": "fsdp1", "fsdp2": "fsdp2", "zero1": "zero1",
                 "zero2": "zero2", "zero3": "zero3"}
IN_LAUNCH = "LEAFE_IN_ACCELERATE_LAUNCH"


#: A launched job's log showing a full disk (ENOSPC/EDQUOT, torch's short zip write)
_DISK_FULL_IN_LOG = re.compile(r"No space left on device|Disk quota exceeded|\[Errno (28|122)\]|"
                               r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing")


def config_file(name: str) -> Path:
    """The accelerate config YAML a `runtime.training.config` names."""
    if name in NAMED_CONFIGS:
        import trl

        path = Path(trl.__file__).parent / "accelerate_configs" / f"{NAMED_CONFIGS[name]}.yaml"
        if not path.exists():
            raise UserError(f"runtime.training.config: {name!r}: this TRL has no {path.name}; give a path "
                            "to an accelerate config YAML instead")
        return path
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"runtime.training.config: {name!r} is neither one of {sorted(NAMED_CONFIGS)} nor an "
                        "existing accelerate config file")
    return path


def launch_command(training, job: Path | str, cuda: bool | None = None, machine_rank: int = 0) -> list[str]:
    """The `accelerate launch` command line for one training job (`leafe run` starts rank 0;
    with several machines the others run the same command with their `machine_rank`, reading
    the job from a shared filesystem)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if training.config is not None:
        cmd += ["--config_file", str(config_file(training.config))]
    elif training.num_processes > 1 or training.num_machines > 1:
        # data parallel; without a GPU the trainer's `use_cpu` makes it DDP over gloo
        cmd += ["--multi_gpu"]
    elif not cuda:
        cmd += ["--cpu"]
    cmd += ["--num_processes", str(training.num_processes), "--num_machines", str(training.num_machines)]
    if training.num_machines > 1:
        cmd += ["--machine_rank", str(machine_rank)]
    if training.main_process_port is not None:
        cmd += ["--main_process_port", str(training.main_process_port)]
    return cmd + ["-m", "leafe.methods.launch", str(job)]


def run_launched(ctx, examples: list[dict], train, seed: int) -> dict:
    """Write the job, run it under accelerate, return the main process's statistics."""
    from leafe.store import RecordLog, atomic_write_json, read_json

    rt = ctx.spec.runtime.training
    if train.batch_size % rt.num_processes:
        raise UserError(f"{ctx.stage.id}: batch_size {train.batch_size} is the global batch and must divide "
                        f"over runtime.training.num_processes = {rt.num_processes}")
    d = ctx.dir / "launch"
    d.mkdir(parents=True, exist_ok=True)
    RecordLog(d / "examples.jsonl").rewrite(examples)
    start = ctx.start_checkpoint()
    job = d / "job.json"
    (d / "result.json").unlink(missing_ok=True)
    from leafe import threads

    # the job's processes share the run's threads (runtime.threads)
    each = threads.per_process(threads.now(threads.resolve(ctx.spec.runtime.threads)), rt.num_processes)
    atomic_write_json(job, {
        "spec": ctx.loaded.spec.model_dump(mode="json"), "method_order": list(ctx.loaded.methods),
        "runs_dir": str(ctx.plan.root.parent), "stage": ctx.stage.id, "dir": str(ctx.dir),
        "start": str(start) if start is not None else None,
        "train": train.model_dump(mode="json"), "seed": seed, "threads": each,
    })
    cmd = launch_command(rt, job)
    ctx.console.print(f"  launching: {' '.join(cmd)} ({each} torch thread{'s' if each > 1 else ''} per process)")
    env = {**os.environ, **threads.child_env(each), IN_LAUNCH: "1"}
    with open(d / "launch.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not (d / "result.json").exists():
        tail = (d / "launch.log").read_text(errors="replace")[-3000:]
        if _DISK_FULL_IN_LOG.search(tail):  # the job's own full disk: the run says so, as in process
            raise OSError(errno.ENOSPC, f"a training process ran out of space (see {d / 'launch.log'})",
                          str(ctx.dir))
        raise RuntimeError(f"{ctx.stage.id}: `accelerate launch` failed (exit {rc}); {d / 'launch.log'} ends:\n{tail}")
    return read_json(d / "result.json")


def main(job_path: str) -> None:
    """One process of a launched training job."""
    import io

    from rich.console import Console

    from leafe.methods.sft import TrainSpec, train_sft
    from leafe.plan import build_plan
    from leafe.spec.loader import load_dump
    from leafe.stage import StageContext
    from leafe.store import RecordLog, atomic_write_json, read_json

    job = read_json(Path(job_path))
    if job.get("threads"):
        from leafe import threads

        threads.apply(threads.Threads(job["threads"], "launch job", threads.usable_cores(), job["threads"]))
    rank = int(os.environ.get("RANK", "0"))
    loaded = load_dump(job["spec"], job["method_order"])
    plan = build_plan(loaded, job["runs_dir"])
    stage = plan.stage(job["stage"])
    console = Console(stderr=True) if rank == 0 else Console(file=io.StringIO())
    ctx = StageContext(loaded, plan, stage, Path(job["dir"]), console)
    start = job["start"]
    ctx.start_checkpoint = lambda: Path(start) if start else None
    examples = RecordLog(Path(job_path).parent / "examples.jsonl").read()
    stats = train_sft(ctx, examples, TrainSpec.model_validate(job["train"]), job["seed"])
    if rank == 0:
        atomic_write_json(Path(job_path).parent / "result.json", stats)


if __name__ == "__main__":
    main(sys.argv[1])
