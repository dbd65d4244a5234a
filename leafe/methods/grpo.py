"""`grpo`: multi-turn GRPO (group-relative policy optimisation), the paper's RL baseline, as
verl-agent runs it (github langfengQ/verl-agent, the harness the paper's GRPO numbers come from).

Each iteration draws `tasks_per_iteration` train tasks and plays `group_size` episodes of each
through the one agent loop (`leafe.loop.run_episodes`) with the policy being trained; every
member of a group starts from the same initial state (`reset(task_id)` is deterministic per
task).

Rewards and advantages, per step row (verl-agent: `agent_system/multi_turn_rollout/
rollout_loop.py` gives every step row its episode's return; `verl/trainer/ppo/ray_trainer.py`
`apply_invalid_action_penalty` subtracts `invalid_action_penalty_coef` from the row's reward when
that row's reply is invalid; `verl/trainer/ppo/core_algos.py` `compute_grpo_outcome_advantage`
normalises within the group): a row's score is the episode return (success, or the summed
environment score) minus `invalid_penalty` if its own reply could not be parsed into an action;
advantage = (score - group mean) / (group std + 1e-6), the mean and unbiased std over all step
rows of the group (`group_stats: steps`, verl-agent's `compute_mean_std_cross_steps=True`) or
one score per episode (`episodes`); 0 for a group whose scores are all equal.

Sequence construction (why one sample per step). The agent loop re-renders the policy's prompt
at every step from the environment preset's templates (system message plus one user message
holding the observation and at most `env.history` past steps), so step t's prompt is not step
t-1's prompt plus its reply: as in verl-agent, every step is one training sample: prompt = the
token ids the backend encoded for that step's conversation, completion = the token ids it
sampled (captured at generation, so no re-tokenisation drift). A small GRPOTrainer subclass
hands the rollout's advantages to TRL's loss.

Update (verl `dp_actor.py` `update_policy`): every step sample of an iteration is trained, in
mini-batches of `batch_size * grad_accum` samples (shuffled, seeded), one optimizer step each;
the last mini-batch is completed with padding rows whose env_mask is 0 (no loss, not counted in
the token normaliser). The ratio's old policy is the model that sampled the iteration: its
per-token log-probabilities are computed for all mini-batches before the first update (verl's
`old_log_prob`) and persisted with them, so a resumed stage continues at the mini-batch its
trainer checkpoint stopped before.

Budget (`leafe.budget.Allowance`): see `Rollouts`. Interactions actually spent are counted per
task (persisted, so a resumed stage keeps counting) and written to metrics.json.
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
    """Multi-turn GRPO through the agent loop, the update by TRL's GRPOTrainer, matched to
    verl-agent's GRPO (github langfengQ/verl-agent): rewards and advantages as
    `verl/trainer/ppo/ray_trainer.py` `apply_invalid_action_penalty` and
    `verl/trainer/ppo/core_algos.py` `compute_grpo_outcome_advantage` compute them, every step
    row trained in mini-batches as `verl/workers/actor/dp_actor.py` `update_policy` does.
    Known deviations (none configurable): verl's actor default `entropy_coeff: 0.001` has no
    counterpart (TRL's GRPO loss has no entropy bonus); a short last mini-batch is padded with
    zero-loss rows instead of copied rows (`adjust_batch`); `epochs` > 1 repeats each mini-batch
    before the next."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    # -- rollouts -------------------------------------------------------------------------------
    group_size: int = Field(8, ge=2)
    """Episodes per task per group, all from the task's same initial state (verl-agent
    `env.rollout.n`: 8)."""
    tasks_per_iteration: int = Field(16, ge=1)
    """Groups (distinct train tasks) played per iteration (verl-agent `data.train_batch_size`:
    16 on ALFWorld and WebShop, 32 on Sokoban). Tasks are drawn from the train pool in a seeded
    shuffled order, round-robin (every task once per pass), skipping tasks whose per-task budget
    cannot pay one turn of a group. (verl-agent's environments draw a random game at each
    reset; the round-robin covers the pool evenly at the same rate.)"""
    iterations: int = Field(100, ge=1)
    """Most iterations (rollout, then update); fewer when the interaction budget runs out
    (verl-agent: 150 = `trainer.total_epochs`, one batch per epoch)."""
    temperature: float | None = Field(1.0, gt=0)
    """Rollout sampling temperature (TRL's log-probabilities use the same one); null: the
    policy's. Rollouts sample from the full distribution (top_p 1), which the ratio assumes."""

    # -- reward and advantage -------------------------------------------------------------------
    reward: Literal["success", "score"] = "success"
    """Episode return: `success` (`success_reward` on success, else 0) or `score` (the
    environment's summed rewards, verl-agent's `episode_rewards`)."""
    success_reward: float = Field(1.0, gt=0)
    """Return of a successful episode with `reward: success` (verl-agent's ALFWorld and WebShop
    environments pay 10 on success: set 10 to keep its ratio to `invalid_penalty`)."""
    invalid_penalty: float = Field(0.1, ge=0)
    """Subtracted from the score of each step whose reply could not be parsed into an action
    (`env.action.pattern`), that step only: a step row's score is the episode return minus
    this when its own reply is invalid (verl-agent `invalid_action_penalty_coef` 0.1, applied by
    `apply_invalid_action_penalty` to the row's reward; validity is its projection's, i.e. the
    reply's format: an action the environment rejects is a valid reply)."""
    group_stats: Literal["steps", "episodes"] = "steps"
    """Over what the group's mean and std are taken: `steps`, every step row of the group's
    episodes (verl-agent's default `compute_mean_std_cross_steps=True`: longer episodes weigh
    more); `episodes`, one score per episode, its first step row's (verl-agent's False)."""
    scale_rewards: Literal["group", "none"] = "group"
    """Advantage = (score - group mean) / (group std + 1e-6) (`group`, verl-agent's
    `norm_adv_by_std_in_grpo: True`; unbiased std, every advantage 0 when a group's scores are
    all equal) or score - group mean (`none`, Dr. GRPO)."""

    # -- update (TRL GRPOConfig) ----------------------------------------------------------------
    lr: float = Field(1e-6, gt=0)
    """Learning rate (constant schedule)."""
    beta_kl: float = Field(0.01, ge=0)
    """KL coefficient to the reference (initial) policy (TRL `beta`, k3 estimator = verl's
    `low_var_kl`); 0 loads no reference model."""
    epsilon: float = Field(0.2, gt=0, lt=1)
    """Clip range of the probability ratio. The loss is TRL's `dapo` aggregation: the token
    mean over a mini-batch's sampled tokens (verl's `token-mean`)."""
    epochs: int = Field(1, ge=1)
    """Passes over each mini-batch (TRL `num_iterations`; verl `ppo_epochs` 1). With > 1, TRL
    repeats each mini-batch before the next (verl loops over all mini-batches per epoch)."""
    batch_size: int = Field(8, ge=1)
    """Step samples per device per forward pass (verl `ppo_micro_batch_size_per_gpu`)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step: a mini-batch is `batch_size * grad_accum` step samples
    (verl `ppo_mini_batch_size`). Every step sample of an iteration is trained: the iteration's
    samples are shuffled (seeded) and cut into as many mini-batches as they fill, one optimizer
    step each, the last one completed with zero-loss padding rows (verl-agent's `adjust_batch`
    copies random rows instead, which then count twice). The probability ratio of every
    mini-batch is taken against the policy that sampled the iteration (verl's `old_log_prob`)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (verl's actor optimizer default: 0.01)."""
    lora: LoraSpec | None = None
    """LoRA settings; null: full fine-tuning. The adapter is merged into the checkpoint."""
    save_steps: int = Field(50, ge=1)
    """Trainer checkpoint interval in optimizer steps (a killed stage resumes from the last)."""

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mini_batches" in data:
            raise ValueError("mini_batches was removed: every step sample of an iteration is now trained, in "
                             "as many mini-batches of batch_size * grad_accum samples as it fills; drop it")
        return data

    @property
    def minibatch(self) -> int:
        """Step samples per optimizer step."""
        return self.batch_size * self.grad_accum


# ------------------------------------------------------------------------------------ rollouts


def step_advantages(rows: list[dict], cfg: GRPOConfig) -> list[float]:
    """GRPO advantages of one group's step rows, as verl-agent computes them
    (`core_algos.compute_grpo_outcome_advantage`): each row (a dict with `score` and the
    episode id `sample`, first row of an episode first) is normalised by the group's mean and
    unbiased std (+1e-6) over all rows (`group_stats: steps`) or over each episode's first row
    (`episodes`); a group with a single score has mean 0 and std 1, as there."""
    if cfg.group_stats == "steps":
        scores = [r["score"] for r in rows]
    else:
        first: dict[Any, float] = {}
        for r in rows:
            first.setdefault(r["sample"], r["score"])
        scores = list(first.values())
    if len(scores) == 1:
        mean, std = 0.0, 1.0
    else:
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((x - mean) ** 2 for x in scores) / (len(scores) - 1))
    if cfg.scale_rewards == "none":
        return [r["score"] - mean for r in rows]
    return [(r["score"] - mean) / (std + 1e-6) for r in rows]


class Rollouts:
    """Iterations of grouped episodes under the interaction budget.

    Budget (`leafe.budget.Allowance`): a task is drawn only while its per-task budget can pay
    one turn of its whole group, and an iteration only while the total can pay one turn of a
    group. After every turn, a group whose task (or the total) cannot pay the next turn of all
    its running episodes has them ended (`stop: budget`), failures like verl-agent's episodes
    cut at `max_steps`; groups are cut last-drawn first for the total. So the caps hold exactly
    and any budget that pays one turn of a group can be spent (there is no reservation of
    `group_size * max_steps` per group).

    State (spent interactions per task, groups per task, the task cursor, per-iteration stats)
    is persisted in `dir/rollouts.json` after every iteration and the iteration's step and
    episode records are appended to `dir/records.jsonl` in one piece, so a resumed stage keeps
    its accounting."""

    def __init__(self, *, make_env, env_spec, tasks: list[str], allowance, cfg: GRPOConfig, seed: int,
                 dir: Path, sampling):
        from leafe.store import read_json

        self.make_env, self.env_spec, self.cfg, self.seed, self.sampling = make_env, env_spec, cfg, seed, sampling
        self.per_task = allowance.per_task
        self.total = allowance.total_for(len(tasks))
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
    def total_left(self) -> int:
        return self.total - sum(self.state["spent"].values())

    def affordable(self, task: str) -> bool:
        """Whether `task` can pay one turn of a whole group."""
        return self.state["spent"][task] + self.cfg.group_size <= self.per_task

    def can_continue(self) -> bool:
        return (self.state["iteration"] < self.cfg.iterations and self.total_left() >= self.cfg.group_size
                and any(self.affordable(t) for t in self.order))

    def next_tasks(self) -> list[str]:
        """Up to `tasks_per_iteration` affordable tasks, round-robin in a seeded order, as many
        as the total can pay one turn for."""
        picked: list[str] = []
        n = len(self.order)
        cursor = self.state["cursor"]
        most = min(self.cfg.tasks_per_iteration, self.total_left() // self.cfg.group_size)
        for i in range(n):
            if len(picked) >= most:
                break
            task = self.order[(cursor + i) % n]
            if self.affordable(task):
                picked.append(task)
        if picked:
            self.state["cursor"] = (self.order.index(picked[-1]) + 1) % n
        return picked

    def _cut(self, tasks: list[str], episodes, spent: dict[str, int]) -> None:
        """After a turn: end the running episodes of every group the budget cannot carry
        through one more turn (see the class docstring)."""
        running = {t: [e for e in episodes if e.task_id == t and not e.done] for t in tasks}
        for t in tasks:
            if running[t] and spent[t] + len(running[t]) > self.per_task:
                for e in running[t]:
                    e.done, e.stop = True, "budget"
                running[t] = []
        left = self.total - sum(self.state["spent"].values()) - sum(spent.values())
        need = sum(len(r) for r in running.values())
        for t in reversed(tasks):
            if need <= left:
                break
            for e in running[t]:
                e.done, e.stop = True, "budget"
            need -= len(running[t])

    # -- one iteration --------------------------------------------------------------------------
    def episode_return(self, episode: dict) -> float:
        if self.cfg.reward == "success":
            return self.cfg.success_reward * float(bool(episode["success"]))
        return float(episode["reward"])

    def run_iteration(self, model, commit: bool = True) -> list[dict]:
        """Play one iteration with `model` (a ChatModel); return its usable step records, each
        with `score` (the row's reward) and `advantage`. Charges the interactions to the tasks
        (saved by `commit()`, at once unless `commit` is False: a stage that dies before the
        commit re-plays the iteration, its records dropped)."""
        from leafe.loop import run_episodes
        from leafe.seeds import derive_seed
        from leafe.store import RecordLog

        it = self.state["iteration"]
        tasks = self.next_tasks()
        if not tasks:
            raise RuntimeError("no train task can afford another group (the budget check should have "
                               "stopped training before this iteration)")
        G = self.cfg.group_size
        pairs = [(t, self.state["groups"][t] * G + k) for t in tasks for k in range(G)]
        steps: list[dict] = []
        spent = {t: 0 for t in tasks}

        def on_step(r: dict) -> None:
            steps.append(r)
            if r["action"] is not None:
                spent[r["task"]] += 1

        episodes = run_episodes(self.make_env, pairs, model, self.sampling, self.env_spec,
                                seed=derive_seed(self.seed, "iteration", it), on_step=on_step,
                                after_turn=lambda eps: self._cut(tasks, eps, spent))
        stats = {"iteration": it, "tasks": len(tasks), "episodes": len(episodes), "steps": len(steps),
                 "interactions": 0, "cut_by_budget": sum(e.get("stop") == "budget" for e in episodes)}
        by_episode = {(e["task"], e["sample"]): e for e in episodes}
        for e in episodes:
            e.update(iteration=it, episode_return=self.episode_return(e))
        usable = []
        for s in steps:
            e = by_episode[(s["task"], s["sample"])]
            s["iteration"] = it
            if s["finish_reason"] == "error":  # a backend error produced no reply to train on
                continue
            s["score"] = e["episode_return"] - (0.0 if s["parsed"] else self.cfg.invalid_penalty)
            usable.append(s)
        scores: list[float] = []
        for t in tasks:
            rows = sorted((s for s in usable if s["task"] == t), key=lambda s: (s["sample"], s["step"]))
            for s, adv in zip(rows, step_advantages(rows, self.cfg) if rows else []):
                s["advantage"] = adv
            scores += [s["score"] for s in rows]
            group = [e for e in episodes if e["task"] == t]
            self.state["spent"][t] += sum(e["interactions"] for e in group)
            self.state["groups"][t] += 1
            stats["interactions"] += sum(e["interactions"] for e in group)
        if any(spent[t] != sum(e["interactions"] for e in episodes if e["task"] == t) for t in tasks):
            raise RuntimeError("GRPO's budget count disagrees with the episodes' interactions")
        stats["mean_reward"] = sum(scores) / len(scores) if scores else 0.0
        stats["mean_return"] = sum(e["episode_return"] for e in episodes) / len(episodes)
        stats["success_rate"] = sum(bool(e["success"]) for e in episodes) / len(episodes)
        stats["samples"] = len(usable)
        RecordLog(self.dir / "records.jsonl").append(steps + episodes)
        self.state["iteration"] = it + 1
        self.state["history"].append(stats)
        if commit:
            self.commit()
        return usable

    def commit(self) -> None:
        """Save the state: the last iteration's interactions are charged and its records kept."""
        from leafe.store import atomic_write_json

        atomic_write_json(self.state_file, self.state)


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
    """TRL GRPOConfig fields for generation on TRL's vLLM server at `url` (None: in-process).
    TRL's vLLM importance-sampling correction is off: as in verl, the ratio's old policy is the
    training model's log-probabilities at the start of the iteration (`old_logprobs`)."""
    if url is None:
        return {}
    return {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": url,
            "vllm_server_timeout": gen.startup_timeout_s, "vllm_importance_sampling_correction": False}


def minibatches(samples: list[dict], n: int, rng: random.Random) -> list[list[dict]]:
    """An iteration's step samples, shuffled, in mini-batches of `n` (the last may be short):
    every sample is in exactly one."""
    order = list(samples)
    rng.shuffle(order)
    return [order[i:i + n] for i in range(0, len(order), n)]


def build_batch(rows: list[dict], n: int, pad_id: int, with_logprobs: bool = False) -> dict:
    """TRL `rollout_func` output for exactly `n` rows from at most `n` prepared rows (each with
    `prompt_ids`, `completion_ids`, `advantage`, `score`, and `logprobs` in server mode): a
    short batch is completed with padding rows whose env_mask is 0 (no loss, not in the token
    normaliser) and advantage 0."""
    if len(rows) > n:
        raise ValueError(f"{len(rows)} rows for a batch of {n}")
    out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": [] if with_logprobs else None,
                            "env_mask": [], "advantage": [], "episode_reward": []}
    for r in rows:
        ids = r["completion_ids"]
        out["prompt_ids"].append(r["prompt_ids"])
        out["completion_ids"].append(ids)
        out["env_mask"].append([1] * len(ids))
        out["advantage"].append(float(r["advantage"]))
        out["episode_reward"].append(float(r["score"]))
        if with_logprobs:
            lp = r.get("logprobs")
            out["logprobs"].append(lp if lp is not None and len(lp) == len(ids) else [None] * len(ids))
    for _ in range(n - len(rows)):
        out["prompt_ids"].append([pad_id])
        out["completion_ids"].append([pad_id])
        out["env_mask"].append([0])
        out["advantage"].append(0.0)
        out["episode_reward"].append(None)
        if with_logprobs:
            out["logprobs"].append([0.0])
    return out


def old_logprobs(trainer, batch: dict) -> list[list[float]]:
    """Per-token log-probabilities of each row's completion under the trainer's model now (the
    policy that sampled the iteration), padded exactly as TRL pads the batch when it trains on
    it (prompts left, completions right), so they are TRL's own numbers for that batch."""
    import torch
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import pad

    tok = trainer.processing_class
    device = trainer.accelerator.device
    prompts = pad([torch.tensor(p) for p in batch["prompt_ids"]], padding_value=tok.pad_token_id,
                  padding_side="left").to(device)
    pmask = pad([torch.ones(len(p), dtype=torch.long) for p in batch["prompt_ids"]], padding_value=0,
                padding_side="left").to(device)
    comps = pad([torch.tensor(c) for c in batch["completion_ids"]], padding_value=tok.pad_token_id,
                padding_side="right").to(device)
    cmask = pad([torch.ones(len(c), dtype=torch.long) for c in batch["completion_ids"]], padding_value=0,
                padding_side="right").to(device)
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompts, comps], dim=1), torch.cat([pmask, cmask], dim=1), comps.size(1),
            batch_size=trainer.args.per_device_train_batch_size)
    return [row[:len(c)].float().tolist() for row, c in zip(logps, batch["completion_ids"])]


def episode_reward(completions, episode_reward=None, **kwargs):
    """TRL reward function: the score the rollout attached to each step row (logged by TRL;
    the advantages are the rollout's own)."""
    return list(episode_reward)


def _padding_reward_filter(record) -> bool:
    # padding rows have no reward by design; TRL warns about every batch that has one (through
    # accelerate's logger adapter, which prefixes "[RANK n] " to the message)
    return "All reward functions returned None" not in record.getMessage()


def leafe_grpo_trainer():
    """TRL's GRPOTrainer taking each sample's advantage and old log-probabilities from the
    rollout (`advantage`, `old_logps`) instead of recomputing the advantage over fixed-size
    prompt groups and taking the current model as the old policy."""
    import torch
    from trl import GRPOTrainer

    class LeafeGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            out = super()._generate(prompts)
            extra = out[5]  # the rollout's extra fields (TRL 1.16: 6th of 8 returned values)
            self._rollout_extra = extra if isinstance(extra, dict) else {}
            return out

        def _generate_and_score_completions(self, inputs):
            self._rollout_extra = {}
            out = super()._generate_and_score_completions(inputs)
            adv = self._rollout_extra.get("advantage")
            if adv is None or len(adv) != len(out["advantages"]) or any(a is None for a in adv):
                raise RuntimeError("the rollout did not attach an advantage to every sample (has TRL's "
                                   "rollout_func contract changed?)")
            ref = out["advantages"]
            out["advantages"] = torch.tensor(adv, dtype=ref.dtype, device=ref.device)
            old = self._rollout_extra.get("old_logps")
            if old is not None:
                shape = out["completion_ids"].shape
                t = torch.zeros(shape, dtype=torch.float32, device=ref.device)
                for i, row in enumerate(old):
                    if len(row) > shape[1]:
                        raise RuntimeError("old log-probabilities longer than TRL's completion (padding changed?)")
                    t[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
                out["old_per_token_logps"] = t
            return out

    return LeafeGRPOTrainer


class MiniBatchQueue:
    """The prepared mini-batches of the iteration being trained, persisted in
    `dir/minibatches.json` with the optimizer step they start at, so a resumed trainer takes
    up the mini-batch its checkpoint stopped before (old log-probabilities included)."""

    def __init__(self, dir: Path, epochs: int):
        from leafe.store import read_json

        self.file = Path(dir) / "minibatches.json"
        self.epochs = epochs
        self.data = read_json(self.file) if self.file.exists() else None

    def take(self, step: int, charged: int) -> dict | None:
        """The batch for optimizer step `step`, if the current iteration (which must be among
        the `charged` ones) still has one; None: play the next iteration."""
        d = self.data
        if d is None or d["iteration"] >= charged:
            return None
        i = (step - d["first_step"]) // self.epochs
        return d["batches"][i] if 0 <= i < len(d["batches"]) else None

    def exhausted(self, step: int) -> bool:
        d = self.data
        return d is None or step >= d["first_step"] + len(d["batches"]) * self.epochs

    def save(self, iteration: int, first_step: int, batches: list[dict]) -> None:
        from leafe.store import atomic_write_json

        self.data = {"iteration": iteration, "first_step": first_step, "batches": batches}
        atomic_write_json(self.file, self.data)


def run_grpo_stage(ctx) -> None:
    import torch
    from datasets import Dataset
    from rich.markup import escape
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLGRPOConfig

    from leafe.budget import allowance
    from leafe.errors import UserError
    from leafe.methods.sft import load_start_policy, save_checkpoint
    from leafe.models.base import Sampling
    from leafe.models.servers import grpo_server
    from leafe.seeds import derive_seed
    from leafe.store import atomic_write_json
    from leafe.training.checkpoints import resume_checkpoint

    cfg: GRPOConfig = ctx.loaded.methods[ctx.stage.method]
    spec = ctx.spec
    allow = allowance(ctx.plan, ctx.loaded, ctx.stage.method)
    if cfg.group_size > allow.per_task:
        raise UserError(f"{ctx.stage.id}: one turn of a group costs group_size = {cfg.group_size} "
                        f"interactions, more than budget.interactions_per_task = {allow.per_task}; lower "
                        "group_size or raise the budget")
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
    n = cfg.minibatch
    # an upper bound on optimizer steps (the schedule is constant; training stops when the
    # iterations or the budget run out)
    most_rows = cfg.tasks_per_iteration * cfg.group_size * spec.env.max_steps
    max_steps = cfg.iterations * math.ceil(most_rows / n) * cfg.epochs
    out = ctx.dir / "trainer"
    # placeholder prompts: the rollout function plays the real episodes (TRL needs an even count)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"rollout slot {i}"}]}
                                 for i in range(max(1, n // 2))])
    RecordingModel = _recording_model_class()
    shuffle = random.Random(derive_seed(seed, "minibatches"))
    queue = MiniBatchQueue(ctx.dir, cfg.epochs)

    with grpo_server(ctx, path) as server_url, ctx.env_factory() as make_env:
        args = TRLGRPOConfig(
            output_dir=str(out), learning_rate=cfg.lr, lr_scheduler_type="constant", weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, steps_per_generation=cfg.grad_accum,
            num_generations=2, num_iterations=cfg.epochs, beta=cfg.beta_kl, epsilon=cfg.epsilon,
            # `dapo`: token sum over the real (env_mask 1) tokens divided by their count, so
            # padding rows change nothing (per-sequence means would count them)
            loss_type="dapo", scale_rewards="none", temperature=temperature,
            max_completion_length=policy.max_tokens, max_steps=max_steps,
            logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
            report_to="none", seed=seed, data_seed=seed, bf16=dtype == torch.bfloat16, use_cpu=not cuda,
            dataloader_num_workers=0, disable_tqdm=True, **trl_server_args(server_url, spec.runtime.generation),
        )
        rollouts = Rollouts(make_env=make_env, env_spec=spec.env, tasks=tasks, allowance=allow, cfg=cfg,
                            seed=seed, dir=ctx.dir, sampling=sampling)
        holder: dict[str, Any] = {}

        def play(trainer) -> list[dict]:
            """Play the next iteration; its mini-batches (ids, advantages, old log-probs)."""
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
                samples = rollouts.run_iteration(wrapper, commit=False)
            finally:
                net.train(was_training)
            rows = []
            for s in samples:
                got = wrapper.completion_ids(s["prompt"], s["completion"])
                if got is None:  # not captured (should not happen): re-tokenise the reply
                    got = (tokenizer(s["completion"], add_special_tokens=False)["input_ids"]
                           or [tokenizer.eos_token_id], None)
                rows.append({"prompt_ids": wrapper._encode(s["prompt"]), "completion_ids": list(got[0]),
                             "logprobs": got[1], "advantage": s["advantage"], "score": s["score"]})
            wrapper.sampled.clear()
            batches = []
            for chunk in minibatches(rows, n, shuffle):
                b = build_batch(chunk, n, tokenizer.pad_token_id, with_logprobs=server_url is not None)
                b["old_logps"] = old_logprobs(trainer, b)
                batches.append(b)
            queue.save(rollouts.state["iteration"] - 1, trainer.state.global_step, batches)
            h = rollouts.state["history"][-1]
            h.update(minibatches=len(batches), padded=len(batches) * n - len(rows))
            rollouts.commit()
            ctx.console.print(f"  iteration {h['iteration']}: {h['tasks']} tasks, {h['episodes']} episodes, "
                              f"success {h['success_rate']:.2f}, {len(rows)} step samples in {len(batches)} "
                              f"mini-batches (all trained), {h['cut_by_budget']} episodes cut by the budget")
            return batches

        def rollout_func(prompts, trainer):
            if len(prompts) != n:
                raise RuntimeError(f"expected a generation batch of {n}, got {len(prompts)}")
            step = trainer.state.global_step
            batch = queue.take(step, rollouts.state["iteration"])
            if batch is None:
                if not rollouts.can_continue():
                    raise RuntimeError("GRPO asked for a batch after its budget ran out (the stop callback "
                                       "should have ended training)")
                batch = play(trainer)[0]
            return batch

        class BudgetStop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if queue.exhausted(state.global_step) and not rollouts.can_continue():
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

        from leafe import threads
        from leafe.progress import training_callback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(training_callback(ctx.console, ctx.stage.id))
        trainer.add_callback(threads.trainer_callback())  # runtime.threads null: adapt
        trainer.add_callback(BudgetStop())
        start = resume_checkpoint(out, lambda line: ctx.console.print(
            f"  [yellow]⚠ {ctx.stage.id}: {escape(line)}[/yellow]"))  # skips incomplete checkpoints
        resume = start is not None
        trl_log = logging.getLogger("trl.trainer.grpo_trainer")
        trl_log.addFilter(_padding_reward_filter)
        try:
            trainer.train(resume_from_checkpoint=str(start) if resume else None)
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
        "budget_per_task": allow.per_task, "allowance": allow.model_dump(),
        "budget": stage_budget(spent, allow.per_task, total=allow.total),
        "tasks": len(tasks), "iterations": len(history), "steps": trainer.state.global_step, "resumed": resume,
        "mean_reward": [h["mean_reward"] for h in history],
        "mean_return": [h["mean_return"] for h in history],
        "success_rate": [h["success_rate"] for h in history],
        "episodes": sum(h["episodes"] for h in history),
        "step_samples": sum(h["samples"] for h in history),
        "minibatches": sum(h.get("minibatches", 0) for h in history),
        "padded_rows": sum(h.get("padded", 0) for h in history),
        "cut_by_budget": sum(h["cut_by_budget"] for h in history),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    ctx.console.print(f"  {metrics['iterations']} iterations, {metrics['steps']} steps, "
                      f"{metrics['interactions']} interactions (max {metrics['interactions_per_task_max']}"
                      f"/{allow.per_task} per task)")
    atomic_write_json(ctx.dir / "metrics.json", metrics)


class GRPOMethod(Method):
    Config = GRPOConfig
    spends = "pool"

    def budget_need(self, config, spec):
        return config.group_size, f"one turn of a group of {config.group_size} episodes"

    def stages(self, instance, config, spec):
        return [StageDef("train", run=run_grpo_stage, produces_checkpoint=True, generates="trained")]
