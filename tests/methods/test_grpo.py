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
from leafe.methods.grpo import GRPOConfig, Rollouts, build_batch, group_advantages
from leafe.models.base import ChatModel, Completion, Sampling
from leafe.spec.schema import EnvSpec

MOVES = ["<action>up</action>", "<action>down</action>", "<action>left</action>", "<action>right</action>",
         "no idea"]  # the last one is unparsable: an invalid reply that never reaches the environment


class SeededPolicy(ChatModel):
    """Replies a move chosen by each row's seed (so group members differ)."""

    def _generate(self, conversations, sampling, seeds):
        return [Completion(random.Random(s).choice(MOVES), i, 0, 5, 3) for i, s in enumerate(seeds)]


def rollouts(tmp_path, *, budget, tasks=("train-00000", "train-00001", "train-00002"), **kw):
    cfg = GRPOConfig(method="grpo", **{"group_size": 3, "tasks_per_iteration": 2, **kw})
    spec = EnvSpec(adapter="sokoban", max_steps=4, prompt={"user": "{{ observation }}"})
    return Rollouts(make_env=lambda: envs.make("sokoban"), env_spec=spec, tasks=list(tasks), budget=budget,
                    cfg=cfg, seed=5, dir=tmp_path, sampling=Sampling(temperature=1.0))


def test_group_advantages_are_normalised_within_the_group():
    adv = group_advantages([1.0, 0.0, 0.0, -0.2], "group")
    assert abs(sum(adv)) < 1e-9
    mean = (1.0 + 0.0 + 0.0 - 0.2) / 4
    std = (sum((r - mean) ** 2 for r in [1.0, 0.0, 0.0, -0.2]) / 3) ** 0.5
    assert adv[0] == pytest.approx((1.0 - mean) / std, rel=1e-5)
    assert group_advantages([0.5, 0.5], "group") == [0.0, 0.0]  # no signal in a uniform group
    assert group_advantages([1.0, 0.0], "none") == [0.5, -0.5]


def test_interactions_stay_within_the_budget_and_groups_share_their_start(tmp_path):
    budget = 30  # a group of 3 episodes x 4 steps may cost 12: at most 2 groups per task
    r = rollouts(tmp_path, budget=budget)
    policy = SeededPolicy()
    iterations = 0
    while r.can_continue():
        samples = r.run_iteration(policy)
        iterations += 1
        assert samples and all("advantage" in s for s in samples)
        assert iterations < 10
    spent = r.state["spent"]
    assert all(0 < spent[t] <= budget for t in spent)
    # each task stopped only when one more group could overrun its budget
    assert all(spent[t] + 12 > budget for t in spent)
    assert all(g >= 2 for g in r.state["groups"].values())  # 2 groups fit in any case

    # the recorded interactions are the spent ones: environment steps of valid-or-invalid
    # actions that reached the environment (unparsable replies do not)
    recs = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    eps = [x for x in recs if x["kind"] == "episode"]
    steps = [x for x in recs if x["kind"] == "step"]
    per_task = Counter()
    for e in eps:
        per_task[e["task"]] += e["interactions"]
    assert dict(per_task) == spent
    assert sum(1 for s in steps if s["action"] is not None) == sum(spent.values())
    assert Counter((s["task"], s["sample"]) for s in steps) == Counter(
        {(e["task"], e["sample"]): e["steps"] for e in eps})

    # group members start from the same state; the advantage is the group-normalised reward
    groups = defaultdict(list)
    for e in eps:
        groups[(e["iteration"], e["task"])].append(e)
    assert all(len(g) == 3 for g in groups.values())
    first = {(s["task"], s["sample"]): s["prompt"] for s in steps if s["step"] == 0}
    for (it, task), g in groups.items():
        assert len({json.dumps(first[(task, e["sample"])]) for e in g}) == 1
        rewards = [float(e["success"]) - 0.1 * e["invalid"] for e in g]
        assert [e["episode_reward"] for e in g] == pytest.approx(rewards)
        assert [e["advantage"] for e in g] == pytest.approx(group_advantages(rewards, "group"))
    # a step carries its episode's advantage
    adv = {(e["task"], e["sample"]): e["advantage"] for e in eps}
    assert all(s["advantage"] == adv[(s["task"], s["sample"])] for s in steps)
    assert any(e["advantage"] != 0 for e in eps)

    # a resumed stage keeps the accounting: no task can spend again
    again = rollouts(tmp_path, budget=budget)
    assert again.state["spent"] == spent and not again.can_continue()


def test_build_batch_masks_only_padding():
    samples = [{"prompt": [{"role": "user", "content": "a"}], "completion": "x", "advantage": 1.0,
                "episode_reward": 1.0},
               {"prompt": [{"role": "user", "content": "bb"}], "completion": "yy", "advantage": -1.0,
                "episode_reward": 0.0}]
    enc = lambda conv: [7] * len(conv[0]["content"])  # noqa: E731
    ids = lambda s: ([9] * len(s["completion"]), None)  # noqa: E731
    batch, stats = build_batch(samples, 4, enc, ids, 0, random.Random(0))
    assert batch["completion_ids"] == [[9], [9, 9], [0], [0]] and batch["logprobs"] is None
    assert batch["env_mask"] == [[1], [1, 1], [0], [0]]
    assert batch["advantage"] == [1.0, -1.0, 0.0, 0.0] and stats == {"samples": 2, "dropped": 0, "padded": 2}
    batch, stats = build_batch(samples * 3, 4, enc, ids, 0, random.Random(0))
    assert len(batch["prompt_ids"]) == 4 and stats["dropped"] == 2 and all(m for m in batch["env_mask"])
    # server mode: the sampling log-probs travel with their rows; unknown ones are None
    with_lp = lambda s: ([9] * len(s["completion"]), [-0.5] * len(s["completion"]) if s["completion"] == "x" else None)  # noqa: E731
    batch, _ = build_batch(samples, 3, enc, with_lp, 0, random.Random(0), with_logprobs=True)
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
                    "vllm_server_timeout": 300.0}
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
         batch_size: 4, grad_accum: 1, mini_batches: 1}
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
    real_reward = Rollouts.episode_reward
    monkeypatch.setattr(Rollouts, "episode_reward",
                        lambda self, e: real_reward(self, e) + (e["sample"] % 2))
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

    # passthrough makes every reply an environment step: 2 episodes x 2 steps = 4 per group
    # (the reserve), so a budget of 9 affords 2 groups per task and training stops after 2 of
    # the 5 iterations, one optimizer step each
    m = json.loads((stage / "metrics.json").read_text())
    assert m["iterations"] == 2 and m["steps"] == 2 and len(m["losses"]) == 2
    assert m["interactions"] == 2 * 2 * 2 * 2 and m["interactions_per_task_max"] == 8 <= 9
    # 2 invalid moves per episode (-0.2), +1 for half of them
    assert m["mean_reward"] == pytest.approx([0.3, 0.3])
    # the update moved the weights away from the initial policy
    initial = Path(json.loads((stage / "model.json").read_text())["initial"]["path"])
    before, after = load_file(next(initial.glob("*.safetensors"))), load_file(next(ck.glob("*.safetensors")))
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)
    assert m["dropped_steps"] == 2 * 4  # 8 step samples per iteration, 4 trained on
    recs = [json.loads(line) for line in (stage / "records.jsonl").read_text().splitlines()]
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
    f.write_text(SPEC.replace("mini_batches: 1}", "mini_batches: 1, lora: {r: 4, alpha: 8}}"))
    loaded = load_spec(f)
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    plan = build_plan(loaded, tmp_path / "runs")
    ck = plan.dir(plan.stage("grpo.train")) / "checkpoint"
    assert json.loads((ck / "leafe_model.json").read_text())["lora"] is True
    assert not (ck / "adapter_config.json").exists() and list(ck.glob("*.safetensors"))  # merged
    model_info = json.loads((plan.dir(plan.stage("eval.grpo")) / "model.json").read_text())
    assert Path(model_info["policy"]["path"]).resolve() == ck.resolve()


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing")
def test_grpo_killed_mid_iteration_resumes_without_losing_or_duplicating(tmp_path, leafe_cache, monkeypatch):
    """The stage dies after an iteration's records were appended but before its state was
    saved (the worst moment): the resumed run restarts TRL from its checkpoint, re-plays that
    iteration once, and charges every interaction exactly once."""
    import leafe.store
    from leafe.plan import build_plan
    from leafe.runner import run
    from leafe.spec import load_spec

    class Killed(Exception):
        pass

    # budget 13 with a 4-step reserve: 3 groups per task, 3 iterations, a TRL checkpoint each step
    text = SPEC.replace("interactions_per_task: 9", "interactions_per_task: 13").replace(
        "mini_batches: 1}", "mini_batches: 1, save_steps: 1}")
    f = tmp_path / "grpo.yaml"
    f.write_text(text)
    loaded = load_spec(f)
    real_write = leafe.store.atomic_write_json

    def dies_on_second_iteration(path, data):
        if Path(path).name == "rollouts.json" and data["iteration"] == 2:
            raise Killed
        return real_write(path, data)

    monkeypatch.setattr(leafe.store, "atomic_write_json", dies_on_second_iteration)
    with pytest.raises(Killed):
        run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    plan = build_plan(loaded, tmp_path / "runs")
    stage = plan.dir(plan.stage("grpo.train"))
    recs = [json.loads(line) for line in (stage / "records.jsonl").read_text().splitlines()]
    assert {r["iteration"] for r in recs} == {0, 1}  # iteration 1's records were written...
    assert json.loads((stage / "rollouts.json").read_text())["iteration"] == 1  # ...but not charged
    assert list((stage / "trainer").glob("checkpoint-1")) or list(stage.rglob("checkpoint-1"))

    monkeypatch.setattr(leafe.store, "atomic_write_json", real_write)
    run(loaded, tmp_path / "runs", tmp_path / "reports", Console(file=io.StringIO(), width=150))
    m = json.loads((stage / "metrics.json").read_text())
    assert m["resumed"] is True and m["iterations"] == 3 and m["steps"] == 3
    recs = [json.loads(line) for line in (stage / "records.jsonl").read_text().splitlines()]
    eps = [r for r in recs if r["kind"] == "episode"]
    assert Counter(r["iteration"] for r in eps) == {0: 4, 1: 4, 2: 4}
    assert len({(r["task"], r["sample"]) for r in eps}) == len(eps)  # no episode twice
    steps = [(r["task"], r["sample"], r["step"]) for r in recs if r["kind"] == "step"]
    assert len(steps) == len(set(steps))
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
