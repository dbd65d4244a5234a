"""`grpo`: multi-turn GRPO (group-relative policy optimisation), the paper's RL baseline.

Each iteration plays `group_size` episodes of each of `tasks_per_iteration` train tasks through
the one agent loop (`leafe.loop.run_episodes`) with the policy being trained; every member of a
group starts from the same initial state (`reset(task_id)` is deterministic per task). An
episode's reward is its success (or its summed environment score) minus `invalid_penalty` per
invalid reply; advantages are normalised within the group (mean, and std unless
`scale_rewards: none`). TRL's GRPOTrainer does the update: clipped ratio objective, KL to the
reference (initial) policy, full fine-tuning or LoRA (merged into the saved checkpoint).

Sequence construction (why one sample per step). The agent loop re-renders the policy's prompt
at every step from the environment preset's templates (system message plus one user message
holding the observation and at most `env.history` past steps), so step t's prompt is not step
t-1's prompt plus its reply: one concatenated episode sequence would condition each reply on
context the policy never saw. So, as verl-agent's GRPO does, every step is one training
sample: prompt = the token ids the backend encoded for that step's conversation, completion =
the token ids it sampled (captured at generation, so no re-tokenisation drift), and every step
of an episode carries the episode's group-normalised advantage. Group normalisation is done
here over episodes (TRL's own groups assume a fixed number of completions per prompt, which
variable-length episodes do not give); a small GRPOTrainer subclass hands these advantages to
TRL's loss.

`env_mask` (TRL's mask of tokens the policy did not generate; they carry no loss and are not
counted in the token normaliser) is 1 on every sampled reply token. An iteration yields a
variable number of step samples while TRL's generation batch is fixed (`batch_size *
grad_accum * mini_batches`): surplus steps are dropped at random (seeded), and a short batch is
filled with padding rows whose env_mask is 0 throughout, so they add nothing to the loss.

Budget: a group may cost at most `group_size * env.max_steps` interactions; a task's next group
is sampled only while that fits in what is left of `budget.interactions_per_task`, and
training stops early when no task can afford another group. Interactions actually spent are
counted per task (persisted, so a resumed stage keeps counting) and written to metrics.json.
"""

from __future__ import annotations

import json
import logging
import math
import random
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from leafe.budget import stage_budget
from leafe.methods.api import Method, MethodConfig, StageDef
from leafe.methods.sft import LoraSpec


class GRPOConfig(MethodConfig):
    """Multi-turn GRPO through the agent loop, the update by TRL's GRPOTrainer."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    # -- rollouts -------------------------------------------------------------------------------
    group_size: int = Field(8, ge=2)
    """Episodes per task per group, all from the task's same initial state (verl-agent: 8)."""
    tasks_per_iteration: int = Field(16, ge=1)
    """Groups (distinct train tasks) played per iteration (verl-agent's train batch: 16)."""
    iterations: int = Field(100, ge=1)
    """Most iterations (rollout, then update); fewer when the interaction budget runs out."""
    temperature: float | None = Field(1.0, gt=0)
    """Rollout sampling temperature (TRL's log-probabilities use the same one); null: the
    policy's. Rollouts sample from the full distribution (top_p 1), which the ratio assumes."""

    # -- reward and advantage -------------------------------------------------------------------
    reward: Literal["success", "score"] = "success"
    """Episode reward: `success` (1 or 0) or `score` (the environment's summed rewards)."""
    invalid_penalty: float = Field(0.1, ge=0)
    """Subtracted from the episode reward per invalid reply (unparsable, or an action the
    environment rejected); verl-agent: 0.1."""
    scale_rewards: Literal["group", "none"] = "group"
    """Advantage = reward - group mean, divided by the group's std (`group`) or not (`none`,
    Dr. GRPO)."""

    # -- update (TRL GRPOConfig) ----------------------------------------------------------------
    lr: float = Field(1e-6, gt=0)
    """Learning rate (constant schedule)."""
    beta_kl: float = Field(0.01, ge=0)
    """KL coefficient to the reference (initial) policy (TRL `beta`, k3 estimator); 0 loads no
    reference model."""
    epsilon: float = Field(0.2, gt=0, lt=1)
    """Clip range of the probability ratio. The loss is TRL's `dapo` aggregation: the token
    mean over the iteration's sampled tokens (verl's token-mean)."""
    epochs: int = Field(1, ge=1)
    """Passes over each iteration's samples (TRL `num_iterations`, μ); > 1 makes later passes
    off-policy, corrected by the clipped ratio."""
    batch_size: int = Field(8, ge=1)
    """Step samples per device per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    mini_batches: int = Field(1, ge=1)
    """Optimizer steps per pass over an iteration's samples. An iteration trains on
    `batch_size * grad_accum * mini_batches` step samples (must be even: TRL's grouping)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    lora: LoraSpec | None = None
    """LoRA settings; null: full fine-tuning. The adapter is merged into the checkpoint."""
    save_steps: int = Field(50, ge=1)
    """Trainer checkpoint interval in optimizer steps (a killed stage resumes from the last)."""

    @property
    def samples_per_iteration(self) -> int:
        return self.batch_size * self.grad_accum * self.mini_batches

    @model_validator(mode="after")
    def _even_batch(self) -> "GRPOConfig":
        if self.samples_per_iteration % 2:
            raise ValueError(f"batch_size * grad_accum * mini_batches = {self.samples_per_iteration} must be "
                             "even (TRL groups the generation batch in pairs here)")
        return self


# ------------------------------------------------------------------------------------ rollouts


def group_advantages(rewards: list[float], scale: str) -> list[float]:
    """Group-relative advantages: reward minus the group mean, over the (unbiased) std when
    `scale` is `group` (0 for every member of a group whose rewards are all equal)."""
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if scale == "none":
        return centred
    std = math.sqrt(sum(c * c for c in centred) / (len(rewards) - 1)) if len(rewards) > 1 else 0.0
    return [c / (std + 1e-6) for c in centred]


class Rollouts:
    """Iterations of grouped episodes under the per-task interaction budget.

    State (spent interactions per task, groups per task, the task cursor, per-iteration stats)
    is persisted in `dir/rollouts.json` after every iteration and the iteration's step and
    episode records are appended to `dir/records.jsonl` in one piece, so a resumed stage keeps
    its accounting."""

    def __init__(self, *, make_env, env_spec, tasks: list[str], budget: int, cfg: GRPOConfig, seed: int,
                 dir: Path, sampling):
        from leafe.store import read_json

        self.make_env, self.env_spec, self.cfg, self.seed, self.sampling = make_env, env_spec, cfg, seed, sampling
        self.budget = budget
        self.reserve = cfg.group_size * env_spec.max_steps
        order = list(tasks)
        random.Random(seed).shuffle(order)
        self.order = order
        self.dir = Path(dir)
        self.state_file = self.dir / "rollouts.json"
        if self.state_file.exists():
            self.state = read_json(self.state_file)
        else:
            self.state = {"iteration": 0, "cursor": 0, "spent": {t: 0 for t in tasks},
                          "groups": {t: 0 for t in tasks}, "history": []}
        self._drop_uncharged_records()

    def _drop_uncharged_records(self) -> None:
        """Records of an iteration the state does not count (the stage died between appending
        them and saving the state) are dropped: the iteration re-runs from the same state and
        seed, so its records are written once and its interactions charged once."""
        from leafe.store import RecordLog

        log = RecordLog(self.dir / "records.jsonl")
        if not log.path.exists():
            return
        recs = log.read()
        kept = [r for r in recs if r.get("iteration", -1) < self.state["iteration"]]
        if len(kept) != len(recs):
            log.rewrite(kept)

    # -- budget ---------------------------------------------------------------------------------
    def affordable(self, task: str) -> bool:
        """Whether `task` can pay for one more group even if every episode runs to max_steps."""
        return self.state["spent"][task] + self.reserve <= self.budget

    def can_continue(self) -> bool:
        return any(self.affordable(t) for t in self.order)

    def next_tasks(self) -> list[str]:
        """Up to `tasks_per_iteration` affordable tasks, round-robin in a seeded order."""
        picked: list[str] = []
        n = len(self.order)
        cursor = self.state["cursor"]
        for i in range(n):
            if len(picked) == self.cfg.tasks_per_iteration:
                break
            task = self.order[(cursor + i) % n]
            if self.affordable(task):
                picked.append(task)
        if picked:
            self.state["cursor"] = (self.order.index(picked[-1]) + 1) % n
        return picked

    # -- one iteration --------------------------------------------------------------------------
    def episode_reward(self, episode: dict) -> float:
        base = float(episode["success"]) if self.cfg.reward == "success" else float(episode["reward"])
        return base - self.cfg.invalid_penalty * episode["invalid"]

    def run_iteration(self, model) -> list[dict]:
        """Play one iteration with `model` (a ChatModel); return its usable step records, each
        with `advantage` and `episode_reward`. Charges the interactions to the tasks."""
        from leafe.loop import run_episodes
        from leafe.seeds import derive_seed
        from leafe.store import RecordLog, atomic_write_json

        it = self.state["iteration"]
        tasks = self.next_tasks()
        if not tasks:
            raise RuntimeError("no train task can afford another group (the budget check should have "
                               "stopped training before this iteration)")
        G = self.cfg.group_size
        pairs = [(t, self.state["groups"][t] * G + k) for t in tasks for k in range(G)]
        steps: list[dict] = []
        episodes = run_episodes(self.make_env, pairs, model, self.sampling, self.env_spec,
                                seed=derive_seed(self.seed, "iteration", it), on_step=steps.append)
        stats = {"iteration": it, "tasks": len(tasks), "episodes": len(episodes), "steps": len(steps),
                 "interactions": 0}
        by_episode: dict[tuple[str, int], dict] = {}
        rewards: list[float] = []
        successes = 0
        for t in tasks:
            group = [e for e in episodes if e["task"] == t]
            r = [self.episode_reward(e) for e in group]
            for e, reward, adv in zip(group, r, group_advantages(r, self.cfg.scale_rewards)):
                e.update(iteration=it, episode_reward=reward, advantage=adv)
                by_episode[(e["task"], e["sample"])] = e
            spent = sum(e["interactions"] for e in group)
            self.state["spent"][t] += spent
            self.state["groups"][t] += 1
            stats["interactions"] += spent
            rewards += r
            successes += sum(bool(e["success"]) for e in group)
        stats["mean_reward"] = sum(rewards) / len(rewards)
        stats["success_rate"] = successes / len(episodes)
        usable = []
        for s in steps:
            e = by_episode[(s["task"], s["sample"])]
            s.update(iteration=it, episode_reward=e["episode_reward"], advantage=e["advantage"])
            if s["finish_reason"] != "error":  # a backend error produced no reply to train on
                usable.append(s)
        RecordLog(self.dir / "records.jsonl").append(steps + list(by_episode.values()))
        self.state["iteration"] = it + 1
        self.state["history"].append(stats)
        atomic_write_json(self.state_file, self.state)
        return usable


# ------------------------------------------------------------------------- TRL integration


def _recording_model_class():
    """A TransformersModel that remembers the token ids it sampled for each (conversation,
    reply text), so training sees exactly the sampled tokens. With `client` set (TRL's
    VLLMClient, server mode) it generates on the server instead, from the same token-id
    prompts, and remembers the server's per-token log-probabilities too (TRL's importance
    sampling correction needs them)."""
    from leafe.models.transformers import TransformersModel

    class RecordingModel(TransformersModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sampled: dict[tuple[str, str], list[tuple[list[int], list[float] | None]]] = {}
            self._ids: list[list[int]] = []
            self._logps: list[list[float] | None] = []
            self.client: Any = None

        def _completion(self, ids, index, sample, prompt_tokens, max_tokens, stop):
            c = super()._completion(ids, index, sample, prompt_tokens, max_tokens, stop)
            self._ids.append(list(ids[:c.completion_tokens]))
            return c

        def _generate(self, conversations, sampling, seeds):
            self._ids, self._logps = [], []
            if self.client is None:
                out = super()._generate(conversations, sampling, seeds)
                self._logps = [None] * len(out)
            else:
                out = self._generate_on_server(conversations, sampling)
            for c, ids, logps in zip(out, self._ids, self._logps):
                key = (json.dumps(conversations[c.index]), c.text)
                self.sampled.setdefault(key, []).append((ids, logps))
            return out

        def _generate_on_server(self, conversations, sampling):
            # One batched request, unseeded: vLLM would give every copy of a prompt (a GRPO
            # group's first step) the same sample under one request seed.
            prompts = [self._encode(c) for c in conversations]
            n = sampling.n
            rows = [p for p in prompts for _ in range(n)]
            stop = [s for s in sampling.stop if s]
            extra = {"stop": stop, "include_stop_str_in_output": True} if stop else None
            res = self.client.generate(prompts=rows, n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                                       max_tokens=sampling.max_tokens, logprobs=0, generation_kwargs=extra)
            out = []
            logprobs = res.get("logprobs") or [None] * len(rows)
            for r, (ids, lp) in enumerate(zip(res["completion_ids"], logprobs)):
                c = self._completion(list(ids), r // n, r % n, len(rows[r]), sampling.max_tokens, stop)
                # logprobs=0: one entry (the sampled token's) per position
                self._logps.append(None if lp is None else [t[0] for t in lp][:c.completion_tokens])
                out.append(c)
            return out

        def completion_ids(self, conversation, text: str) -> tuple[list[int], list[float] | None] | None:
            queue = self.sampled.get((json.dumps(conversation), text))
            return queue.pop(0) if queue else None

    return RecordingModel


def trl_server_args(url: str | None, gen: Any) -> dict[str, Any]:
    """TRL GRPOConfig fields for generation on TRL's vLLM server at `url` (None: in-process)."""
    if url is None:
        return {}
    return {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": url,
            "vllm_server_timeout": gen.startup_timeout_s}


def build_batch(samples: list[dict], n: int, encode, completion_ids, pad_id: int, rng: random.Random,
                with_logprobs: bool = False) -> tuple[dict, dict]:
    """TRL `rollout_func` output for exactly `n` rows from step `samples`.

    `encode(conversation) -> prompt ids`; `completion_ids(step) -> (ids, logprobs or None)`. More
    samples than `n`: a seeded random subset; fewer: padding rows with env_mask 0 (no loss) and
    advantage 0. `with_logprobs` (server mode): the sampling log-probabilities per token, None
    where unknown (TRL then applies no correction to that token)."""
    stats = {"samples": len(samples), "dropped": max(0, len(samples) - n), "padded": max(0, n - len(samples))}
    if len(samples) > n:
        samples = [samples[i] for i in sorted(rng.sample(range(len(samples)), n))]
    out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [] if with_logprobs else None,
                            "env_mask": [], "advantage": [], "episode_reward": []}
    for s in samples:
        ids, logps = completion_ids(s)
        out["prompt_ids"].append(encode(s["prompt"]))
        out["completion_ids"].append(ids)
        out["env_mask"].append([1] * len(ids))
        out["advantage"].append(float(s["advantage"]))
        out["episode_reward"].append(float(s["episode_reward"]))
        if with_logprobs:
            out["logprobs"].append(logps if logps is not None and len(logps) == len(ids) else [None] * len(ids))
    for _ in range(n - len(samples)):
        out["prompt_ids"].append([pad_id])
        out["completion_ids"].append([pad_id])
        out["env_mask"].append([0])
        out["advantage"].append(0.0)
        out["episode_reward"].append(None)
        if with_logprobs:
            out["logprobs"].append([0.0])
    return out, stats


def episode_reward(completions, episode_reward=None, **kwargs):
    """TRL reward function: the episode reward the rollout attached to each step (logged by TRL;
    the advantages are the rollout's own)."""
    return list(episode_reward)


def _padding_reward_filter(record) -> bool:
    # padding rows have no reward by design; TRL warns about every batch that has one
    return not record.getMessage().startswith("All reward functions returned None")


def leafe_grpo_trainer():
    """TRL's GRPOTrainer taking each sample's advantage from the rollout (`advantage` field)
    instead of recomputing it from rewards over fixed-size prompt groups."""
    import torch
    from trl import GRPOTrainer

    class LeafeGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            out = super()._generate(prompts)
            extra = out[5]  # the rollout's extra fields (TRL 1.16: 6th of 8 returned values)
            self._rollout_advantages = extra.get("advantage") if isinstance(extra, dict) else None
            return out

        def _generate_and_score_completions(self, inputs):
            self._rollout_advantages = None
            out = super()._generate_and_score_completions(inputs)
            adv = self._rollout_advantages
            if adv is None or len(adv) != len(out["advantages"]) or any(a is None for a in adv):
                raise RuntimeError("the rollout did not attach an advantage to every sample (has TRL's "
                                   "rollout_func contract changed?)")
            out["advantages"] = torch.tensor(adv, dtype=out["advantages"].dtype, device=out["advantages"].device)
            return out

    return LeafeGRPOTrainer


def run_grpo_stage(ctx) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLGRPOConfig

    from leafe.errors import UserError
    from leafe.methods.sft import load_start_policy, save_checkpoint
    from leafe.models.base import Sampling
    from leafe.models.servers import grpo_server
    from leafe.seeds import derive_seed
    from leafe.store import atomic_write_json

    cfg: GRPOConfig = ctx.loaded.methods[ctx.stage.method]
    spec = ctx.spec
    budget = spec.budget.interactions_per_task
    if cfg.group_size * spec.env.max_steps > budget:
        raise UserError(f"{ctx.stage.id}: one group may cost group_size * env.max_steps = "
                        f"{cfg.group_size} * {spec.env.max_steps} interactions, more than "
                        f"budget.interactions_per_task = {budget}; lower group_size or max_steps, or "
                        "raise the budget")
    tasks = ctx.tasks("train")
    if not tasks:
        raise UserError(f"{ctx.stage.id}: the environment has no train tasks")
    seed = derive_seed(spec.seed, ctx.stage.id)

    policy = ctx.policy_spec(ctx.start_checkpoint())
    model, tokenizer, provenance = load_start_policy(ctx)
    path = provenance["path"]
    cuda = torch.cuda.is_available()
    dtype = model.dtype
    adapter = provenance.get("adapter")
    peft_config = None
    if cfg.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")

    temperature = cfg.temperature if cfg.temperature is not None else policy.temperature
    if temperature <= 0:
        raise UserError(f"{ctx.stage.id}: GRPO needs sampled rollouts: set methods.{ctx.stage.method}."
                        "temperature (or the policy's) above 0")
    sampling = Sampling(temperature=temperature, top_p=1.0, max_tokens=policy.max_tokens)
    n = cfg.samples_per_iteration
    per_iteration = cfg.mini_batches * cfg.epochs  # optimizer steps
    out = ctx.dir / "trainer"
    # placeholder prompts: the rollout function plays the real episodes
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"rollout slot {i}"}]}
                                 for i in range(n // 2)])
    RecordingModel = _recording_model_class()
    batches: list[dict] = []
    rng = random.Random(derive_seed(seed, "subsample"))

    with grpo_server(ctx, path) as server_url, ctx.env_factory() as make_env:
        args = TRLGRPOConfig(
            output_dir=str(out), learning_rate=cfg.lr, lr_scheduler_type="constant", weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, steps_per_generation=cfg.grad_accum * cfg.mini_batches,
            num_generations=2, num_iterations=cfg.epochs, beta=cfg.beta_kl, epsilon=cfg.epsilon,
            # `dapo`: token sum over the real (env_mask 1) tokens divided by their count, so
            # padding rows change nothing (per-sequence means would count them)
            loss_type="dapo", scale_rewards="none", temperature=temperature,
            max_completion_length=policy.max_tokens, max_steps=cfg.iterations * per_iteration,
            logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
            report_to="none", seed=seed, data_seed=seed, bf16=dtype == torch.bfloat16, use_cpu=not cuda,
            dataloader_num_workers=0, disable_tqdm=True, **trl_server_args(server_url, spec.runtime.generation),
        )
        rollouts = Rollouts(make_env=make_env, env_spec=spec.env, tasks=tasks, budget=budget, cfg=cfg, seed=seed,
                            dir=ctx.dir, sampling=sampling)
        holder: dict[str, Any] = {}

        def rollout_func(prompts, trainer):
            if len(prompts) != n:
                raise RuntimeError(f"expected a generation batch of {n}, got {len(prompts)}")
            net = trainer.accelerator.unwrap_model(trainer.model)
            if "model" not in holder:
                holder["model"] = RecordingModel(net, tokenizer, policy, {"path": path, **provenance})
            wrapper = holder["model"]
            wrapper.model = net
            if server_url is not None:  # TRL synced the weights to the server before this call
                wrapper.client = trainer.vllm_generation.vllm_client
            was_training = net.training
            net.eval()
            try:
                samples = rollouts.run_iteration(wrapper)
            finally:
                net.train(was_training)

            def ids_of(step):
                got = wrapper.completion_ids(step["prompt"], step["completion"])
                if got is None:  # not captured (should not happen): re-tokenise the reply
                    ids = tokenizer(step["completion"], add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
                    return ids, None
                return got

            batch, stats = build_batch(samples, n, wrapper._encode, ids_of, tokenizer.pad_token_id, rng,
                                       with_logprobs=server_url is not None)
            wrapper.sampled.clear()
            batches.append(stats)
            h = rollouts.state["history"][-1]
            ctx.console.print(f"  iteration {h['iteration']}: {h['tasks']} tasks, {h['episodes']} episodes, "
                              f"reward {h['mean_reward']:.3f}, success {h['success_rate']:.2f}, "
                              f"{stats['samples']} step samples ({stats['dropped']} dropped, "
                              f"{stats['padded']} padding)")
            return batch

        class BudgetStop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % per_iteration == 0 and not rollouts.can_continue():
                    control.should_training_stop = True

        with warnings.catch_warnings():  # rollout_func is experimental in TRL: we know
            warnings.filterwarnings("ignore", message=".*'rollout_func'.*experimental")
            trainer = leafe_grpo_trainer()(
                model=model, reward_funcs=[episode_reward], args=args, train_dataset=dataset,
                processing_class=tokenizer, peft_config=peft_config, rollout_func=rollout_func)
        if adapter is not None and trainer.ref_model is not None:
            # TRL reloads the reference from the base path; the start policy has the adapter merged
            trainer.ref_model.load_state_dict(model.state_dict())
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from leafe.progress import training_callback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(training_callback(ctx.console, ctx.stage.id))
        trainer.add_callback(BudgetStop())
        resume = any(out.glob("checkpoint-*")) if out.exists() else False
        trl_log = logging.getLogger("trl.trainer.grpo_trainer")
        trl_log.addFilter(_padding_reward_filter)
        try:
            trainer.train(resume_from_checkpoint=True if resume else None)
        finally:
            trl_log.removeFilter(_padding_reward_filter)

    save_checkpoint(ctx, trainer.model, tokenizer, provenance, lora=peft_config is not None)
    atomic_write_json(ctx.dir / "train_log.json", trainer.state.log_history)
    if "model" in holder:
        ctx.save_usage({"policy": holder["model"]})
    history = rollouts.state["history"]
    spent = rollouts.state["spent"]
    metrics = {
        "interactions": sum(spent.values()), "interactions_per_task_max": max(spent.values()),
        "budget_per_task": budget, "budget": stage_budget(spent, budget), "tasks": len(tasks), "iterations": len(history),
        "steps": trainer.state.global_step, "resumed": resume,
        "mean_reward": [h["mean_reward"] for h in history],
        "success_rate": [h["success_rate"] for h in history],
        "episodes": sum(h["episodes"] for h in history),
        "dropped_steps": sum(b["dropped"] for b in batches), "padded_rows": sum(b["padded"] for b in batches),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    ctx.console.print(f"  {metrics['iterations']} iterations, {metrics['steps']} steps, "
                      f"{metrics['interactions']} interactions (max {metrics['interactions_per_task_max']}"
                      f"/{budget} per task)")
    atomic_write_json(ctx.dir / "metrics.json", metrics)


class GRPOMethod(Method):
    Config = GRPOConfig

    def stages(self, instance, config, spec):
        return [StageDef("train", run=run_grpo_stage, produces_checkpoint=True, generates="trained")]
