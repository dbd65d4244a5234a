"""Training under `accelerate launch`: the command lines, and SFT over 2 CPU processes (real
DDP over gloo) writing the checkpoint evaluation loads, in the single-process format."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from leafe.errors import UserError
from leafe.methods.launch import launch_command
from leafe.spec.schema import TrainingRuntime

SPEC = """\
leafe: 1
name: acc
seed: 1
env: {use: sokoban, max_steps: 3, train_tasks: 4, test_tasks: 2}
models:
  policy: {name: "leafe:tiny-qwen2", max_tokens: 6, batch_size: 8, temperature: 1.0}
budget: {interactions_per_task: 8}
methods:
  sft: {train: {epochs: 1, lr: 0.001, batch_size: 4}}
eval: {samples: 2, k: [1, 2], batch_size: 4}
report: {formats: [json]}
"""


def test_launch_commands():
    tail = ["-m", "leafe.methods.launch", "job.json"]
    ddp = launch_command(TrainingRuntime(launcher="accelerate", num_processes=2), "job.json", cuda=False)
    assert ddp == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1"] + tail
    one = launch_command(TrainingRuntime(launcher="accelerate"), "job.json", cuda=False)
    assert one[3] == "--cpu" and "--multi_gpu" not in one
    assert "--cpu" not in launch_command(TrainingRuntime(launcher="accelerate"), "job.json", cuda=True)
    z3 = launch_command(TrainingRuntime(launcher="accelerate", config="zero3", num_processes=8,
                                        main_process_port=29600), "job.json", cuda=True)
    cfg = Path(z3[z3.index("--config_file") + 1])
    assert cfg.name == "zero3.yaml" and "zero_stage: 3" in cfg.read_text()  # TRL's own config
    assert z3[z3.index("--main_process_port") + 1] == "29600" and "--multi_gpu" not in z3
    with pytest.raises(UserError, match="neither one of"):
        launch_command(TrainingRuntime(launcher="accelerate", config="nope"), "job.json", cuda=False)


def test_sft_under_accelerate_on_two_cpu_processes(tmp_path, leafe_cache):
    from safetensors.torch import load_file

    from leafe.plan import build_plan
    from leafe.runner import run
    from leafe.spec import load_spec

    f = tmp_path / "acc.yaml"
    f.write_text(SPEC + "runtime: {training: {launcher: accelerate, num_processes: 2}}\n")
    loaded = load_spec(f)
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    plan = build_plan(loaded, tmp_path / "runs")
    d = plan.dir(plan.stage("sft.train"))
    m = json.loads((d / "metrics.json").read_text())
    assert m["processes"] == 2 and m["distributed"] == "MULTI_CPU"  # real DDP, over gloo
    assert m["steps"] >= 1 and m["last_loss"] < m["first_loss"]
    ck = d / "checkpoint"
    info = json.loads((ck / "leafe_model.json").read_text())
    assert info["method"] == "sft" and info["stage"] == "sft.train"
    ev = json.loads((plan.dir(plan.stage("eval.sft")) / "model.json").read_text())
    assert Path(ev["policy"]["path"]).resolve() == ck.resolve()  # evaluation loaded it
    assert (plan.dir(plan.stage("eval.sft")) / "DONE").exists()

    # the same stage in one process: same checkpoint format (files and tensor names, shapes)
    f1 = tmp_path / "one.yaml"
    f1.write_text(SPEC.replace("name: acc", "name: one"))
    one = load_spec(f1)
    run(one, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    p1 = build_plan(one, tmp_path / "runs")
    ck1 = p1.dir(p1.stage("sft.train")) / "checkpoint"
    assert sorted(p.name for p in ck.iterdir()) == sorted(p.name for p in ck1.iterdir())
    a, b = load_file(next(ck.glob("*.safetensors"))), load_file(next(ck1.glob("*.safetensors")))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    # runtime is how, not what: both specs key their stages alike
    assert plan.stage("sft.train").hash == p1.stage("sft.train").hash


def test_global_batch_must_divide_over_the_processes(tmp_path, leafe_cache):
    from leafe.runner import run
    from leafe.spec import load_spec

    f = tmp_path / "acc.yaml"
    f.write_text(SPEC.replace("batch_size: 4}}", "batch_size: 3}}")
                 + "runtime: {training: {launcher: accelerate, num_processes: 2}}\n")
    with pytest.raises(UserError, match="batch_size 3 is the global batch and must divide"):
        run(load_spec(f), tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
