"""`sft`: imitation of the environment's expert trajectories (behaviour cloning).

Demonstrations come from `Env.expert(task_id)` on the train tasks, rendered with the same
prompt templates as the agent loop, so the model learns exactly the replies it must produce.
Training is TRL's SFTTrainer on prompt-completion pairs with the loss on the assistant reply
only (`completion_only_loss`), full fine-tuning or LoRA (merged into the saved checkpoint so
evaluation loads one plain model directory). A killed stage resumes from the last complete
trainer checkpoint (`leafe.training.checkpoints`: one cut short while saving is skipped and
removed, with a line saying so).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from leafe.budget import stage_budget
from leafe.methods.api import Method, MethodConfig, StageDef


class LoraSpec(BaseModel):
    """LoRA adapter settings (peft)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1)
    """Adapter rank."""
    alpha: int = Field(32, ge=1)
    """Scaling numerator (lora_alpha)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules to adapt."""


class TrainSpec(BaseModel):
    """Supervised fine-tuning hyper-parameters (TRL SFTConfig)."""

    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(2.0, gt=0)
    """Passes over the training examples."""
    lr: float = Field(5e-5, gt=0)
    """Peak learning rate."""
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Share of steps spent warming up."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    batch_size: int = Field(8, ge=1)
    """Examples per device per step."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps (effective batch = batch_size * grad_accum * devices)."""
    max_length: int = Field(1024, ge=16)
    """Token limit per example (longer ones are truncated)."""
    lora: LoraSpec | None = None
    """LoRA settings; null: full fine-tuning."""
    save_steps: int = Field(50, ge=1)
    """Trainer checkpoint interval (a killed stage resumes from the last one)."""


class SFTConfig(MethodConfig):
    """Imitation of expert trajectories."""

    train: TrainSpec = Field(default_factory=TrainSpec)
    """Fine-tuning hyper-parameters."""


def collect_demonstrations(ctx, budget: int) -> tuple[list[dict], dict]:
    """Expert trajectories on the train tasks as prompt-completion examples.

    Executing the expert's actions costs interactions like any other rollout; at most `budget`
    per task are spent. Returns the examples and statistics."""
    from leafe.loop import render_action, render_conversation

    spec = ctx.spec
    env = ctx.make_env()
    examples: list[dict] = []
    stats = {"tasks": 0, "no_expert": 0, "expert_failed": 0, "interactions": 0, "truncated": 0}
    per_task: dict[str, int] = {}
    try:
        for task in ctx.tasks("train"):
            stats["tasks"] += 1
            actions = env.expert(task)
            if not actions:
                stats["no_expert"] += 1
                continue
            truncated = len(actions) > min(budget, spec.env.max_steps)
            if truncated:
                stats["truncated"] += 1
                actions = actions[: min(budget, spec.env.max_steps)]
            obs = env.reset(task)
            history: list[dict] = []
            steps: list[dict] = []
            success = False
            for i, action in enumerate(actions):
                conv = render_conversation(spec.env, obs, history, i)
                steps.append({"task": task, "step": i, "prompt": conv, "completion": [
                    {"role": "assistant", "content": render_action(spec.env, action)}]})
                result = env.step(action)
                stats["interactions"] += 1
                per_task[task] = per_task.get(task, 0) + 1
                history.append({"action": action, "observation": result.observation.text})
                obs = result.observation
                success = result.success
                if result.done:
                    break
            if not success and not truncated:
                stats["expert_failed"] += 1
            examples += steps
    finally:
        env.close()
    stats["budget"] = stage_budget(per_task, budget)
    return examples, stats


def _weighted_sft_trainer():
    """TRL's SFTTrainer with a per-example loss weight (a `weight` column).

    Each completion token's loss is multiplied by its example's weight; the normaliser stays
    TRL's own, the number of completion tokens in the optimizer step's (accumulated) batch N.
    So a step's loss is (Σ_i w_i Σ_t ℓ_it) / N: with weight 1 on counterfactual and β on
    rehearsal examples it is exactly L_cf + β·L_reh, both token sums over the same N (β = 1 is
    plain SFT on the union), and with every weight 1 it is TRL's loss unchanged."""
    from trl import SFTTrainer

    class _WeightedForward:
        # TRL computes the loss as -Σ log_probs / N from the fused LM head's per-token
        # log-probs (zero off the completion), so weighting them weights the token losses
        def __init__(self, model, weight):
            self.model, self.weight, self.used = model, weight, False

        def __call__(self, *args, **kwargs):
            out = self.model(*args, **kwargs)
            if kwargs.get("fused_lm_head"):
                out.log_probs = out.log_probs * self.weight.to(out.log_probs.dtype)[:, None]
                self.used = True
            return out

        def __getattr__(self, name):
            return getattr(self.model, name)

    class _CollateWithWeights:
        def __init__(self, collate):
            self.collate = collate

        def __call__(self, examples):
            import torch

            batch = self.collate([{k: v for k, v in e.items() if k != "weight"} for e in examples])
            batch["weight"] = torch.tensor([float(e["weight"]) for e in examples])
            return batch

    class WeightedSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.args.loss_type != "nll" or self.padding_free or self.args.packing:
                raise ValueError("per-example weights need loss_type nll without packing or padding-free batches")
            self.data_collator = _CollateWithWeights(self.data_collator)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "weight" not in self._signature_columns:  # else `remove_unused_columns` drops it
                self._signature_columns = [*self._signature_columns, "weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weighted = _WeightedForward(model, inputs.pop("weight"))
            out = super().compute_loss(weighted, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if not weighted.used:
                raise RuntimeError("this TRL version's SFTTrainer no longer computes the loss from the fused "
                                   "LM head's log-probs: per-example weights cannot be applied")
            return out

    return WeightedSFTTrainer


def load_start_policy(ctx):
    """The stage's starting policy for training: (model, tokenizer, provenance). The model is
    the upstream checkpoint or the spec's policy, with its adapter merged (a checkpoint is one
    plain model), bfloat16 on GPUs that support it, else float32; the tokenizer gets a pad
    token. Writes model.json ({"initial": provenance})."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leafe.models.transformers import merge_adapter, resolve_with_adapter
    from leafe.store import atomic_write_json

    policy = ctx.policy_spec(ctx.start_checkpoint())
    path, provenance, adapter, adapter_prov = resolve_with_adapter(
        policy.name, policy.revision, getattr(policy, "adapter", None))
    provenance = {"path": path, **provenance}
    if adapter is not None:
        provenance = {**provenance, "adapter": adapter_prov}
    atomic_write_json(ctx.dir / "model.json", {"initial": provenance})
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if adapter is not None:
        model = merge_adapter(model, adapter)
    return model, tokenizer, provenance


def save_checkpoint(ctx, model, tokenizer, provenance: dict, lora: bool, state_dict: dict | None = None) -> None:
    """Write the trained policy to `ctx.dir/checkpoint` atomically: one plain model directory
    (a LoRA adapter merged in) with leafe_model.json naming what it was trained from and by.
    `state_dict`: the full weights gathered from sharded training (FSDP, ZeRO-3)."""
    from leafe.store import atomic_replace_dir, atomic_write_json

    if lora:
        model = model.merge_and_unload()
    tmp = ctx.dir / ".checkpoint.tmp"
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(tmp)
    method = ctx.loaded.method_types.get(ctx.stage.method, "sft")
    atomic_write_json(tmp / "leafe_model.json", {"trained_from": provenance, "stage": ctx.stage.id,
                                                 "method": method, "lora": lora})
    atomic_replace_dir(tmp, ctx.dir / "checkpoint")


def train_sft(ctx, examples: list[dict], train: TrainSpec, seed: int) -> dict:
    """Fine-tune the stage's starting policy on prompt-completion `examples`; write
    `checkpoint/` (a plain model directory) and return training statistics.

    An example may carry a loss `weight` (default 1; see `_weighted_sft_trainer` for the exact
    loss). Examples of weight 0 are left out (they would add no gradient); with every weight 1
    training is plain TRL SFT. Under `runtime.training.launcher: accelerate` the training runs
    in `accelerate launch` processes (`leafe.methods.launch`), with the same result files."""
    import math
    import os

    from rich.markup import escape

    from leafe.methods.launch import IN_LAUNCH, run_launched
    from leafe.training.checkpoints import resume_checkpoint, whole_run_loss

    out = ctx.dir / "trainer"
    if not os.environ.get(IN_LAUNCH):  # one process looks (and removes incomplete checkpoints)
        resume_checkpoint(out, lambda line: ctx.console.print(f"  [yellow]⚠ {ctx.stage.id}: {escape(line)}[/yellow]"))
    if ctx.spec.runtime.training.launcher == "accelerate" and not os.environ.get(IN_LAUNCH):
        return run_launched(ctx, examples, train, seed)
    # a launched process takes its share of the global batch
    world = int(os.environ.get("WORLD_SIZE", "1")) if os.environ.get(IN_LAUNCH) else 1

    import torch
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from leafe.store import atomic_write_json

    model, tokenizer, provenance = load_start_policy(ctx)
    cuda = torch.cuda.is_available()
    dtype = model.dtype

    peft_config = None
    if train.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
                                 target_modules=train.lora.target_modules, task_type="CAUSAL_LM")

    args = TRLSFTConfig(
        output_dir=str(out), num_train_epochs=train.epochs, learning_rate=train.lr,
        lr_scheduler_type=train.scheduler, warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay, per_device_train_batch_size=train.batch_size // world,
        gradient_accumulation_steps=train.grad_accum, max_length=train.max_length,
        completion_only_loss=True, logging_steps=1, save_strategy="steps",
        save_steps=train.save_steps, save_total_limit=1, report_to="none", seed=seed,
        data_seed=seed, bf16=dtype == torch.bfloat16, use_cpu=not cuda,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    weights = [float(e.get("weight", 1.0)) for e in examples]
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError("example weights must be finite and >= 0")
    weighted = any(w != 1.0 for w in weights)
    rows = [{"prompt": e["prompt"], "completion": e["completion"], **({"weight": w} if weighted else {})}
            for e, w in zip(examples, weights) if w > 0]
    if not rows:
        raise ValueError("every example has weight 0: nothing to train on")
    dataset = Dataset.from_list(rows)
    trainer_cls = _weighted_sft_trainer() if weighted else SFTTrainer
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from leafe import threads
    from leafe.progress import training_callback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(training_callback(ctx.console, ctx.stage.id))
    trainer.add_callback(threads.trainer_callback())  # runtime.threads null: adapt
    start = resume_checkpoint(out)  # complete ones only (incomplete ones were removed above)
    resume = start is not None
    trainer.train(resume_from_checkpoint=str(start) if resume else None)

    acc = trainer.accelerator
    state_dict = None
    if acc.distributed_type.value in ("FSDP", "DEEPSPEED") and peft_config is None:
        state_dict = acc.get_state_dict(trainer.model_wrapped)  # gathers the shards: every rank calls it
    if acc.is_main_process:  # one writer when launched over several processes
        save_checkpoint(ctx, acc.unwrap_model(trainer.model), tokenizer, provenance,
                        lora=peft_config is not None, state_dict=state_dict)
        atomic_write_json(ctx.dir / "train_log.json", trainer.state.log_history)
    trainer.accelerator.wait_for_everyone()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # over the whole run: the trainer's own `training_loss` covers only this session's steps
    return {"train_loss": whole_run_loss(trainer.state.log_history), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "steps": trainer.state.global_step,
            "examples": len(rows), "resumed": resume, "processes": trainer.accelerator.num_processes,
            "distributed": str(trainer.accelerator.distributed_type.value),
            "torch_threads": torch.get_num_threads()}  # per process (runtime.threads)


def run_sft_stage(ctx) -> None:
    from leafe.seeds import derive_seed
    from leafe.store import RecordLog, atomic_write_json

    cfg: SFTConfig = ctx.loaded.methods[ctx.stage.method]
    demos_file = ctx.dir / "demos.jsonl"
    stats_file = ctx.dir / "demos.json"
    if stats_file.exists():  # demonstrations were collected completely before a restart
        from leafe.store import read_json

        examples, stats = RecordLog(demos_file).read(), read_json(stats_file)
    else:
        from leafe.budget import allowance

        allow = allowance(ctx.plan, ctx.loaded, ctx.stage.method)
        examples, stats = collect_demonstrations(ctx, allow.task_cap(len(ctx.tasks("train"))))
        stats["allowance"] = allow.model_dump()
        RecordLog(demos_file).rewrite(examples)
        atomic_write_json(stats_file, stats)
    if not examples:
        from leafe.errors import UserError

        raise UserError(f"{ctx.stage.id}: no expert demonstrations: environment "
                        f"{ctx.spec.env.adapter!r} gave no expert trajectory for any train task")
    ctx.console.print(f"  {len(examples)} demonstration steps from {stats['tasks']} tasks "
                      f"({stats['interactions']} interactions)")
    train_stats = train_sft(ctx, examples, cfg.train, derive_seed(ctx.spec.seed, ctx.stage.id))
    ctx.console.print(f"  trained {train_stats['steps']} steps, loss {train_stats['first_loss']:.3f} → "
                      f"{train_stats['last_loss']:.3f}")
    atomic_write_json(ctx.dir / "metrics.json", {**stats, **train_stats})


class SFTMethod(Method):
    Config = SFTConfig

    def stages(self, instance, config, spec):
        return [StageDef("train", run=run_sft_stage, produces_checkpoint=True)]
