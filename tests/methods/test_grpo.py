"""GRPO: grouped rollouts under the interaction budget (scripted policy, real Sokoban rooms),
the environment mask in TRL's loss (the tiny model on one constructed batch), and end to end
through `leafe.runner.run` (grpo → checkpoint → evaluation, and `sft: {init: grpo}`)."""

from __future__ import annotations

import copy
import io
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from rich.console import Console

from leafe import envs
from leafe.methods.grpo import GRPOConfig, Rollouts, build_batch, minibatches, step_advantages
from leafe.models.base import ChatModel, Completion, Sampling
from leafe.spec.schema import EnvSpec

MOVES = ["<action>up</action>", "<action>down</action>", "<action>left</action>", "<action>right</action>",
         "no idea"]  # the last one is unparsable: an invalid reply that never reaches the environment


class SeededPolicy(ChatModel):
    """Replies a move chosen by each row's seed (so group members differ)."""

    def _generate(self, conversations, sampling, seeds):
        return [Completion(random.Random(s).choice(MOVES), i, 0, 5, 3) for i, s in enumerate(seeds)]


def rollouts(tmp_path, *, budget, total=None, tasks=("train-00000", "train-00001", "train-00002"), **kw):
    from leafe.budget import Allowance

    cfg = GRPOConfig(method="grpo", **{"group_size": 3, "tasks_per_iteration": 2, **kw})
    spec = EnvSpec(adapter="sokoban", max_steps=4, prompt={"user": "{{ observation }}"})
    return Rollouts(make_env=lambda: envs.make("sokoban"), env_spec=spec, tasks=list(tasks),
                    allowance=Allowance(per_task=budget, total=total), cfg=cfg, seed=5, dir=tmp_path,
                    sampling=Sampling(temperature=1.0))


def verl_grpo_advantages(rows, cross_steps=True, norm=True):
    """verl-agent's `compute_grpo_outcome_advantage` (verl/trainer/ppo/core_algos.py) transcribed
    with torch: rows are (uid, traj_uid, score); a score is the episode return minus
    invalid_action_penalty_coef on an invalid row (`apply_invalid_action_penalty`)."""
    import torch

    scores = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    id2score, seen = defaultdict(list), set()
    for (uid, traj, _), sc in zip(rows, scores):
        if (uid, traj) in seen:
            continue
        id2score[uid].append(sc)
        if not cross_steps:
            seen.add((uid, traj))
    mean, std = {}, {}
    for uid, xs in id2score.items():
        if len(xs) == 1:
            mean[uid], std[uid] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            mean[uid], std[uid] = torch.mean(torch.tensor(xs)), torch.std(torch.tensor([xs]))
    out = []
    for (uid, _, _), sc in zip(rows, scores):
        out.append(float((sc - mean[uid]) / (std[uid] + 1e-6)) if norm else float(sc - mean[uid]))
    return out


def _group():
    """A hand-made group: episode 0 succeeds in 3 valid steps; episode 1 fails in 5 valid steps;
    episodes 2 and 3 fail in 10 steps, every reply unparsable. (The old episode-level reward,
    success - 0.1 x invalid replies, gave episode 1 a positive advantage: 0 > the mean.)"""
    rows = []
    for sample, (ret, valid) in enumerate([(1.0, [1] * 3), (0.0, [1] * 5), (0.0, [0] * 10), (0.0, [0] * 10)]):
        rows += [{"sample": sample, "step": i, "score": ret - 0.1 * (1 - v)} for i, v in enumerate(valid)]
    return rows


def test_step_advantages_match_verl_agents_formula():
    rows = _group()
    verl_rows = [("g", r["sample"], r["score"]) for r in rows]
    cfg = GRPOConfig(method="grpo")
    adv = step_advantages(rows, cfg)
    assert adv == pytest.approx(verl_grpo_advantages(verl_rows), rel=1e-5)
    # the failed episode without an invalid reply is below the group's (row) mean: negative
    assert all(a < 0 for r, a in zip(rows, adv) if r["sample"] == 1)
    assert all(a > 0 for r, a in zip(rows, adv) if r["sample"] == 0)
    # an invalid row is penalised against the valid rows of the same return
    assert adv[-1] < adv[3]
    # episode-level statistics (compute_mean_std_cross_steps=False: each trajectory's first row)
    ep = step_advantages(rows, cfg.model_copy(update={"group_stats": "episodes"}))
    assert ep == pytest.approx(verl_grpo_advantages(verl_rows, cross_steps=False), rel=1e-5)
    assert ep != pytest.approx(adv)
    # Dr. GRPO: the mean only
    none = step_advantages(rows, cfg.model_copy(update={"scale_rewards": "none"}))
    assert none == pytest.approx(verl_grpo_advantages(verl_rows, norm=False), rel=1e-5)
    # no signal in a uniform group; a single row: mean 0, std 1 (as verl)
    assert step_advantages([{"sample": 0, "score": 0.5}, {"sample": 1, "score": 0.5}], cfg) == [0.0, 0.0]
    assert step_advantages([{"sample": 0, "score": 0.5}], cfg) == pytest.approx([0.5])


def test_penalty_is_per_step_and_only_for_unparsable_replies(tmp_path):
    """An unknown move is rejected by Sokoban (valid: false) but its reply parsed: no penalty
    (verl-agent's projection checks the format); only the unparsable reply's own row is
    penalised."""

    class WithUnknownMove(ChatModel):
        def _generate(self, conversations, sampling, seeds):
            moves = MOVES + ["<action>jump</action>"]
            return [Completion(random.Random(s).choice(moves), i, 0, 5, 3) for i, s in enumerate(seeds)]

    r = rollouts(tmp_path, budget=100, invalid_penalty=0.25)
    samples = r.run_iteration(WithUnknownMove())
    eps = {(e["task"], e["sample"]): e for e in
           (json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()) if e["kind"] == "episode"}
    assert any(not s["valid"] and s["parsed"] for s in samples)  # a rejected but well-formed action
    for s in samples:
        ret = eps[(s["task"], s["sample"])]["episode_return"]
        assert s["score"] == pytest.approx(ret - (0.0 if s["parsed"] else 0.25))
    assert any(not s["parsed"] for s in samples)


def test_budget_needs_no_reservation_and_holds_exactly(tmp_path):
    """A per-task budget of 5 is less than one group's worst case (3 episodes x 4 steps = 12),
    which the old reservation refused; now groups run and are cut when the next turn would
    overspend, and the caps hold exactly."""
    r = rollouts(tmp_path, budget=5)
    policy = SeededPolicy()
    iterations = 0
    while r.can_continue():
        samples = r.run_iteration(policy)
        iterations += 1
        assert samples and all("advantage" in s for s in samples)
        assert iterations < 10
    spent = r.state["spent"]
    assert all(0 < spent[t] <= 5 for t in spent)
    assert all(spent[t] + 3 > 5 for t in spent)  # no task could pay another turn of a group
    recs = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    eps = [x for x in recs if x["kind"] == "episode"]
    steps = [x for x in recs if x["kind"] == "step"]
    per_task = Counter()
    for e in eps:
        per_task[e["task"]] += e["interactions"]
    assert dict(per_task) == spent
    assert sum(1 for s in steps if s["action"] is not None) == sum(spent.values())
    assert any(e.get("stop") == "budget" and not e["success"] for e in eps)

    # group members start from the same state; every row carries an advantage from its group
    groups = defaultdict(list)
    for e in eps:
        groups[(e["iteration"], e["task"])].append(e)
    assert all(len(g) == 3 for g in groups.values())
    first = {(s["task"], s["sample"]): s["prompt"] for s in steps if s["step"] == 0}
    for (it, task), g in groups.items():
        assert len({json.dumps(first[(task, e["sample"])]) for e in g}) == 1
    # a resumed stage keeps the accounting: no task can spend again
    again = rollouts(tmp_path, budget=5)
    assert again.state["spent"] == spent and not again.can_continue()


def test_a_total_budget_is_spent_exactly_across_drawn_tasks(tmp_path):
    r = rollouts(tmp_path, budget=100, total=30, iterations=10)
    policy = SeededPolicy()
    while r.can_continue():
        r.run_iteration(policy)
    total = sum(r.state["spent"].values())
    assert 30 - 3 < total <= 30  # stopped only when one turn of a group no longer fits
    assert r.state["groups"]["train-00002"] >= 1  # tasks are drawn round-robin from the pool


def test_every_step_sample_is_in_exactly_one_minibatch():
    samples = [{"id": i} for i in range(23)]
    batches = minibatches(samples, 8, random.Random(0))
    assert [len(b) for b in batches] == [8, 8, 7]
    assert sorted(x["id"] for b in batches for x in b) == list(range(23))
    rows = [{"prompt_ids": [7] * (i + 1), "completion_ids": [9] * (i + 1), "advantage": float(i), "score": 1.0}
            for i in range(2)]
    batch = build_batch(rows, 4, 0)
    assert batch["completion_ids"] == [[9], [9, 9], [0], [0]] and batch["logprobs"] is None
    assert batch["env_mask"] == [[1], [1, 1], [0], [0]]
    assert batch["advantage"] == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        build_batch(rows * 3, 4, 0)
    # server mode: the sampling log-probs travel with their rows; unknown ones are None
    rows[0]["logprobs"] = [-0.5]
    batch = build_batch(rows, 3, 0, with_logprobs=True)
    assert batch["logprobs"] == [[-0.5], [None, None], [0.0]]


class FakeVLLMClient:
    """Stand-in for TRL's VLLMClient (server mode needs vLLM and a GPU; see the real GRPO test
    below for the in-process path): answers `generate` with scripted token ids and log-probs."""

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def generate(self, prompts, n, temperature, top_p, max_tokens, logprobs, generation_kwargs):
        self.calls.append({"prompts": prompts, "n": n, "temperature": temperature, "max_tokens": max_tokens,
                           "logprobs": logprobs, "generation_kwargs": generation_kwargs})
        ids = [self.replies[i % len(self.replies)] for i in range(len(prompts))]
        return {"prompt_ids": prompts, "completion_ids": ids,
                "logprobs": [[[-0.1 * (j + 1)] for j in range(len(r))] for r in ids]}


def test_server_mode_rollouts_keep_the_servers_tokens_and_logprobs(leafe_cache):
    """With TRL's client set, the recording model sends token-id prompts (the chat template
    applied as in training) to the server, cuts replies at the stop string exactly as the
    in-process backend does, and keeps the server's ids and log-probs for the batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leafe.methods.grpo import _recording_model_class
    from leafe.models.base import Sampling
    from leafe.models.builtin import resolve
    from leafe.spec.schema import TransformersModelSpec

    path, _ = resolve("leafe:tiny-qwen2", None)
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModelForCausalLM.from_pretrained(path)
    spec = TransformersModelSpec(name="leafe:tiny-qwen2", max_tokens=8)
    model = _recording_model_class()(net, tok, spec, {"path": path})
    stop_ids = tok("</action>", add_special_tokens=False)["input_ids"]
    up = tok("<action>up", add_special_tokens=False)["input_ids"]
    eos = model.eos_ids[0]
    model.client = FakeVLLMClient([up + stop_ids + up, up + [eos]])
    convs = [[{"role": "user", "content": "move"}], [{"role": "user", "content": "again"}]]
    out = model.generate(convs, Sampling(temperature=1.0, max_tokens=8, stop=["</action>"], n=2))
    call = model.client.calls[0]
    assert call["prompts"] == [model._encode(convs[0])] * 2 + [model._encode(convs[1])] * 2
    assert call["generation_kwargs"] == {"stop": ["</action>"], "include_stop_str_in_output": True}
    assert [c.text for c in out] == ["<action>up</action>", "<action>up", "<action>up</action>", "<action>up"]
    assert [(c.index, c.sample) for c in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    ids, logps = model.completion_ids(convs[0], "<action>up</action>")
    assert ids == up + stop_ids  # the tokens after the stop string are not trained on
    assert logps == [-0.1 * (j + 1) for j in range(len(ids))]
    ids, logps = model.completion_ids(convs[0], "<action>up")
    assert ids == up + [eos] and len(logps) == len(ids)


def test_trl_server_args():
    from leafe.methods.grpo import trl_server_args
    from leafe.spec.schema import GenerationRuntime

    gen = GenerationRuntime(backend="vllm", launch="external", grpo_server="http://10.0.0.7:8000",
                            startup_timeout_s=300)
    assert trl_server_args(None, gen) == {}
    args = trl_server_args("http://10.0.0.7:8000", gen)
    assert args == {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://10.0.0.7:8000",
                    "vllm_server_timeout": 300.0, "vllm_importance_sampling_correction": False}
    from trl import GRPOConfig as TRLGRPOConfig

    cfg = TRLGRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", **args)
    assert cfg.use_vllm and cfg.vllm_mode == "server" and cfg.vllm_server_base_url == "http://10.0.0.7:8000"


# -- the environment mask in TRL's loss -----------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*rollout_func", "ignore:.*gradient_checkpointing")
def test_loss_ignores_environment_tokens(leafe_cache):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig as TRLGRPOConfig

    from leafe.methods.grpo import episode_reward, leafe_grpo_trainer
    from leafe.models.builtin import resolve

    path, _ = resolve("leafe:tiny-qwen2", None)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    args = TRLGRPOConfig(output_dir=str(leafe_cache / "grpo-mask"), per_device_train_batch_size=4,
                         num_generations=2, beta=0.01, loss_type="dapo", scale_rewards="none", use_cpu=True,
                         report_to="none", max_steps=1, disable_tqdm=True, max_completion_length=8)
    batch: dict = {}
    trainer = leafe_grpo_trainer()(
        model=model, reward_funcs=[episode_reward], args=args, processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}]}] * 2),
        rollout_func=lambda prompts, trainer: copy.deepcopy(batch))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    prompt = tok("a b c", add_special_tokens=False)["input_ids"]
    reply = tok("d e f g", add_special_tokens=False)["input_ids"]
    env = tok("h i", add_special_tokens=False)["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def grad(completion0, completion3, mask0, mask3):
        """The policy gradient of TRL's loss on a batch of 4 rows: row 0 a reply followed by
        environment tokens (`mask0`), rows 1-2 replies, row 3 a padding row (`mask3`)."""
        batch.clear()
        batch.update(prompt_ids=[prompt] * 4, completion_ids=[completion0, reply, reply[:2], completion3],
                     logprobs=None, env_mask=[mask0, [1] * len(reply), [1, 1], mask3],
                     advantage=[1.0, -0.5, 0.7, 0.0], episode_reward=[1.0, 0.0, 1.0, None])
        inputs = trainer._generate_and_score_completions([{"prompt": [{"role": "user", "content": "x"}]}
                                                          for _ in range(4)])
        assert inputs["advantages"].tolist() == pytest.approx([1.0, -0.5, 0.7, 0.0])  # the rollout's own
        assert inputs["tool_mask"].shape == inputs["completion_ids"].shape  # env_mask reached the loss
        trainer.model.zero_grad()
        trainer._compute_loss(trainer.model, inputs).backward()
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])

    # (on-policy the loss VALUE is -mean advantage whatever the tokens: ratio 1, KL 0; the
    # gradient is what depends on the tokens, so compare gradients)
    ones, masked = [1] * len(reply), [0] * len(env)
    base = grad(reply + env, [pad], ones + masked, [0])
    assert base.abs().sum() > 0
    same = lambda g: torch.allclose(g, base, atol=1e-7, rtol=1e-5)  # noqa: E731
    # other environment tokens after the reply, and other padding tokens: the same gradient
    assert same(grad(reply + env[::-1], [pad], ones + masked, [0]))
    assert same(grad(reply + env, env + env, ones + masked, [0] * 2 * len(env)))
    # the environment tokens as policy tokens (mask 1), another reply token, or the padding row
    # unmasked: a different gradient
    assert not same(grad(reply + env, [pad], ones + [1] * len(env), [0]))
    assert not same(grad(reply[:-1] + env[:1] + env, [pad], ones + masked, [0]))
    assert not same(grad(reply + env, env + env, ones + masked, [1] * 2 * len(env)))


@pytest.mark.filterwarnings("ignore:.*rollout_func", "ignore:.*gradient_checkpointing")
def test_old_logprobs_are_the_sampling_policys_for_every_minibatch(leafe_cache):
    """The ratio's old policy is the model that sampled the iteration: `old_logprobs` computed
    before any update equal TRL's own per-token log-probs of that batch (ratio 1 on the first
    mini-batch), and after an update TRL's loss uses them, not the updated model's."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig as TRLGRPOConfig

    from leafe.methods.grpo import episode_reward, leafe_grpo_trainer, old_logprobs
    from leafe.models.builtin import resolve

    path, _ = resolve("leafe:tiny-qwen2", None)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    args = TRLGRPOConfig(output_dir=str(leafe_cache / "grpo-old"), per_device_train_batch_size=4,
                         num_generations=2, beta=0.0, loss_type="dapo", scale_rewards="none", use_cpu=True,
                         report_to="none", max_steps=1, disable_tqdm=True, max_completion_length=8,
                         temperature=0.7)
    batch: dict = {}
    trainer = leafe_grpo_trainer()(
        model=model, reward_funcs=[episode_reward], args=args, processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}]}] * 2),
        rollout_func=lambda prompts, trainer: copy.deepcopy(batch))
    trainer.current_gradient_accumulation_steps = 1
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [{"prompt_ids": ids("a b c"), "completion_ids": ids("d e f g"), "advantage": 1.0, "score": 1.0},
            {"prompt_ids": ids("a"), "completion_ids": ids("h i"), "advantage": -1.0, "score": 0.0},
            {"prompt_ids": ids("b c d e f"), "completion_ids": ids("j"), "advantage": 0.5, "score": 1.0}]
    b = build_batch(rows, 4, tok.pad_token_id)
    b["old_logps"] = old_logprobs(trainer, b)
    assert [len(x) for x in b["old_logps"]] == [len(c) for c in b["completion_ids"]]
    batch.update(copy.deepcopy(b))
    prompts = [{"prompt": [{"role": "user", "content": "x"}]}] * 4
    inputs = trainer._generate_and_score_completions(prompts)
    logits_to_keep = inputs["completion_ids"].size(1)
    now, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), logits_to_keep)
    mask = inputs["completion_mask"].bool()
    assert torch.allclose(inputs["old_per_token_logps"][mask], now[mask], atol=1e-5)
    # one update later, the next mini-batch of the same iteration keeps the sampling policy's
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = trainer._generate_and_score_completions(prompts)
    later, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), logits_to_keep)
    assert torch.allclose(inputs["old_per_token_logps"][mask], now[mask], atol=1e-5)
    assert not torch.allclose(later[mask], now[mask], atol=1e-3)


# -- end to end -----------------------------------------------------------------------------------
SPEC = """\
leafe: 1
name: grpo-e2e
seed: 3
env: {use: sokoban, max_steps: 2, train_tasks: 2, test_tasks: 1,
      action: {on_parse_failure: passthrough}}
models:
  policy: {name: "leafe:tiny-qwen2", max_tokens: 4, batch_size: 8, temperature: 1.0}
budget: {interactions_per_task: 9}
methods:
  base: {}
  grpo: {use: grpo-verl-agent, group_size: 2, tasks_per_iteration: 2, iterations: 5, lr: 0.01,
         batch_size: 4, grad_accum: 1}
eval: {samples: 2, k: [1, 2], batch_size: 4}
report: {formats: [json]}
"""


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing")
def test_grpo_trains_through_leafe_run_and_evaluation_loads_it(tmp_path, leafe_cache, monkeypatch):
    from safetensors.torch import load_file

    from leafe.plan import build_plan
    from leafe.runner import run
    from leafe.spec import load_spec

    # the random tiny model never solves a room, so every episode would score the same and
    # every advantage be 0: reward odd-numbered samples instead, to see the update move weights
    import leafe.methods.grpo as grpo_mod

    real_return = Rollouts.episode_return
    monkeypatch.setattr(Rollouts, "episode_return", lambda self, e: real_return(self, e) + (e["sample"] % 2))
    trained: list[int] = []  # real (env_mask 1) rows of every mini-batch handed to TRL
    real_build = grpo_mod.build_batch

    def counting_build(rows, n, pad_id, with_logprobs=False):
        batch = real_build(rows, n, pad_id, with_logprobs)
        trained.append(sum(1 for m in batch["env_mask"] if any(m)))
        return batch

    monkeypatch.setattr(grpo_mod, "build_batch", counting_build)
    f = tmp_path / "grpo.yaml"
    f.write_text(SPEC)
    loaded = load_spec(f)
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    plan = build_plan(loaded, tmp_path / "runs")
    assert all(plan.status(s) == "done" for s in plan.stages if s.kind != "report")

    stage = plan.dir(plan.stage("grpo.train"))
    ck = stage / "checkpoint"
    assert (ck / "config.json").exists() and list(ck.glob("*.safetensors"))
    assert json.loads((ck / "leafe_model.json").read_text())["method"] == "grpo"
    model_info = json.loads((plan.dir(plan.stage("eval.grpo")) / "model.json").read_text())
    assert Path(model_info["policy"]["path"]).resolve() == ck.resolve()

    # passthrough makes every reply an environment step: a group of 2 episodes x 2 steps costs
    # 4; a task is drawn while its budget of 9 pays one turn (2): groups at 0 and 4 spent, none
    # at 8, so training stops after 2 of the 5 iterations
    m = json.loads((stage / "metrics.json").read_text())
    assert m["iterations"] == 2 and m["interactions"] == 2 * 2 * 2 * 2 and m["interactions_per_task_max"] == 8 <= 9
    # every step sample is trained: 8 per iteration in mini-batches of 4, one optimizer step each
    recs = [json.loads(line) for line in (stage / "records.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "step" and r["finish_reason"] != "error"]
    assert m["step_samples"] == len(steps) == sum(trained) == 16
    assert m["minibatches"] == len(trained) == 4 == m["steps"] == len(m["losses"])
    assert m["mean_return"] == pytest.approx([0.5, 0.5])  # +1 for half of the episodes
    # per-row scores: the return minus 0.1 on each unparsable reply's own row
    assert all(r["score"] == pytest.approx(float(r["sample"] % 2) - (0.0 if r["parsed"] else 0.1)) for r in steps)
    # the update moved the weights away from the initial policy
    initial = Path(json.loads((stage / "model.json").read_text())["initial"]["path"])
    before, after = load_file(next(initial.glob("*.safetensors"))), load_file(next(ck.glob("*.safetensors")))
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)
    assert sum(r["interactions"] for r in recs if r["kind"] == "episode") == m["interactions"]
    report = json.loads((tmp_path / "reports" / "grpo-e2e.json").read_text())
    row = next(r for r in report["rows"] if r["method"] == "grpo")
    assert row["train_interactions"] == m["interactions"]


def test_other_methods_start_from_the_grpo_checkpoint(tmp_path):
    from leafe.plan import build_plan
    from leafe.spec import load_spec
    from leafe.stage import StageContext

    f = tmp_path / "grpo.yaml"
    f.write_text(SPEC.replace("eval:", "  sft: {init: grpo}\n  leafe: {use: leafe, init: grpo}\neval:"))
    loaded = load_spec(f)
    plan = build_plan(loaded, tmp_path / "runs")
    grpo_ck = plan.dir(plan.stage("grpo.train")) / "checkpoint"
    for sid in ("sft.train", "leafe.explore"):
        s = plan.stage(sid)
        ctx = StageContext(loaded, plan, s, plan.dir(s), Console(file=io.StringIO()))
        assert ctx.start_checkpoint() == grpo_ck
        assert ctx.policy_spec(ctx.start_checkpoint()).name == str(grpo_ck)
        assert "grpo.train" in s.deps  # and so it runs after GRPO training


@pytest.mark.slow
def test_grpo_with_lora_writes_a_merged_checkpoint(tmp_path, leafe_cache):
    from leafe.plan import build_plan
    from leafe.runner import run
    from leafe.spec import load_spec

    f = tmp_path / "grpo.yaml"
    f.write_text(SPEC.replace("grad_accum: 1}", "grad_accum: 1, lora: {r: 4, alpha: 8}}"))
    loaded = load_spec(f)
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    plan = build_plan(loaded, tmp_path / "runs")
    ck = plan.dir(plan.stage("grpo.train")) / "checkpoint"
    assert json.loads((ck / "leafe_model.json").read_text())["lora"] is True
    assert not (ck / "adapter_config.json").exists() and list(ck.glob("*.safetensors"))  # merged
    model_info = json.loads((plan.dir(plan.stage("eval.grpo")) / "model.json").read_text())
    assert Path(model_info["policy"]["path"]).resolve() == ck.resolve()


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing")
@pytest.mark.parametrize("moment", ["before_charge", "between_minibatches"])
def test_grpo_killed_mid_iteration_resumes_without_losing_or_duplicating(tmp_path, leafe_cache, monkeypatch,
                                                                          moment):
    """The stage dies (a) after an iteration's records were appended but before its
    interactions were charged, or (b) between two mini-batches of an iteration (the first one
    trained and checkpointed): the resumed run restarts TRL from its checkpoint, re-plays (a) or
    takes up (b) that iteration once, trains every step sample once, and charges every
    interaction exactly once."""
    import leafe.methods.grpo as grpo_mod
    import leafe.store
    from leafe.plan import build_plan
    from leafe.runner import run
    from leafe.spec import load_spec

    class Killed(Exception):
        pass

    # budget 13, a turn of a group costs 2: groups at 0, 4 and 8 spent per task, 3 iterations of
    # 8 step samples, each in 2 mini-batches of 4; a TRL checkpoint every optimizer step
    text = SPEC.replace("interactions_per_task: 9", "interactions_per_task: 13").replace(
        "grad_accum: 1}", "grad_accum: 1, save_steps: 1}")
    f = tmp_path / "grpo.yaml"
    f.write_text(text)
    loaded = load_spec(f)
    real_write, real_take = leafe.store.atomic_write_json, grpo_mod.MiniBatchQueue.take
    served: list[tuple[int, bool]] = []  # (optimizer step, batch served from the saved iteration)

    def dies_at_second_charge(path, data):
        if Path(path).name == "rollouts.json" and data["iteration"] == 2:
            raise Killed
        return real_write(path, data)

    def dies_before_step_3(self, step, charged):
        if step == 3:
            raise Killed
        return real_take(self, step, charged)

    def spying_take(self, step, charged):
        batch = real_take(self, step, charged)
        served.append((step, batch is not None))
        return batch

    if moment == "before_charge":
        monkeypatch.setattr(leafe.store, "atomic_write_json", dies_at_second_charge)
    else:
        monkeypatch.setattr(grpo_mod.MiniBatchQueue, "take", dies_before_step_3)
    with pytest.raises(Killed):
        run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    plan = build_plan(loaded, tmp_path / "runs")
    stage = plan.dir(plan.stage("grpo.train"))
    recs = [json.loads(line) for line in (stage / "records.jsonl").read_text().splitlines()]
    assert {r["iteration"] for r in recs} == {0, 1}  # iteration 1's records were written
    charged = json.loads((stage / "rollouts.json").read_text())["iteration"]
    assert charged == (1 if moment == "before_charge" else 2)
    assert list((stage / "trainer").glob(f"checkpoint-{2 if moment == 'before_charge' else 3}"))

    monkeypatch.setattr(leafe.store, "atomic_write_json", real_write)
    monkeypatch.setattr(grpo_mod.MiniBatchQueue, "take", spying_take)
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    if moment == "between_minibatches":
        assert served[0] == (3, True)  # the second mini-batch of iteration 1, from the saved one
    m = json.loads((stage / "metrics.json").read_text())
    assert m["resumed"] is True and m["iterations"] == 3 and m["steps"] == 6 == m["minibatches"]
    recs = [json.loads(line) for line in (stage / "records.jsonl").read_text().splitlines()]
    eps = [r for r in recs if r["kind"] == "episode"]
    assert Counter(r["iteration"] for r in eps) == {0: 4, 1: 4, 2: 4}
    assert len({(r["task"], r["sample"]) for r in eps}) == len(eps)  # no episode twice
    steps = [(r["task"], r["sample"], r["step"]) for r in recs if r["kind"] == "step"]
    assert len(steps) == len(set(steps)) == m["step_samples"] == 24
    per_task = Counter()
    for e in eps:
        per_task[e["task"]] += e["interactions"]
    assert m["budget"]["per_task"] == dict(per_task) and m["interactions"] == sum(per_task.values()) == 3 * 2 * 4
    assert m["budget"]["max_per_task"] == 12 <= 13


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing")
def test_a_worker_crash_mid_rollout_resumes_the_stage_to_the_same_records(tmp_path, leafe_cache):
    """With environment workers, a worker SIGKILLed during GRPO's first rollouts: `leafe run`
    resumes the stage in place, and its records and metrics equal an undisturbed run's."""
    import sys

    from leafe import envs
    from leafe.runner import run
    from leafe.spec import load_spec

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "envs"))  # the worker test doubles
    envs.registry.register("faulty-sokoban", "_worker_envs:FaultySokoban")
    f = tmp_path / "grpo.yaml"
    f.write_text(SPEC.replace("env: {use: sokoban,", "env: {use: sokoban, adapter: faulty-sokoban,"))
    workers = ["runtime.env_workers.count=2"]
    marker = tmp_path / "faulted"
    fault = ["env.options.fault=kill", "env.options.fault_step=1", f"env.options.marker={marker}"]

    def grpo_run(root, sets):
        out = io.StringIO()
        run(load_spec(f, workers + sets), root / "runs", root / "reports", Console(file=out, width=250))
        stage = next((root / "runs" / "grpo-e2e").glob("grpo.train-*"))
        recs = [json.loads(line) for line in (stage / "records.jsonl").read_text().splitlines()]
        return recs, json.loads((stage / "metrics.json").read_text()), " ".join(out.getvalue().split())

    recs, m, out = grpo_run(tmp_path / "faulted-run", fault)
    assert marker.exists() and "environment worker" in out and "resuming the stage (retry 1/2)" in out
    ref_recs, ref_m, _ = grpo_run(tmp_path / "reference", ["env.options.fault=none"])
    key = lambda r: (r["iteration"], r["kind"], r["task"], r["sample"], r.get("step", -1))  # noqa: E731
    assert sorted(recs, key=key) == sorted(ref_recs, key=key)
    same = ("iterations", "steps", "interactions", "budget", "mean_reward", "episodes")
    assert {k: m[k] for k in same} == {k: ref_m[k] for k in same}


def test_padding_rows_do_not_flood_the_log_with_trls_none_reward_warning():
    """Padding rows have no reward by design; TRL's warning about them comes through
    accelerate's adapter ("[RANK 0] ..."): the filter drops it and nothing else."""
    import logging

    import trl.trainer.grpo_trainer as trl_grpo
    from accelerate import PartialState

    from leafe.methods.grpo import _padding_reward_filter

    PartialState()
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    log, handler = logging.getLogger("trl.trainer.grpo_trainer"), Keep()
    log.addHandler(handler)
    log.addFilter(_padding_reward_filter)
    try:
        trl_grpo.logger.warning("All reward functions returned None for the following kwargs: {}")
        trl_grpo.logger.warning("something else")
    finally:
        log.removeHandler(handler)
        log.removeFilter(_padding_reward_filter)
    assert got == ["[RANK 0] something else"]
