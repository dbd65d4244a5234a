"""The `transformers` backend: local batched sampling with Hugging Face transformers.

Sampling follows `Sampling` exactly and nothing else: the model's own generation defaults
(top_k, repetition penalty, ...) are not applied, so temperature 1 and top_p 1 sample from the
model's full distribution; temperature 0 is greedy decoding.

Every sampled row (one conversation, one sample index) draws from its own `torch.Generator`
(`RowSampler`): with per-conversation `seeds`, sample j of conversation i is a function of
(seeds[i], j), the conversation and the model only, whatever else shares the batch and whatever
`batch_size` is. Without `seeds`, the row seeds are drawn from the global torch RNG (seeded with
`sampling.seed` when given), so the same call gives the same samples.

Floating point: a left-padded batched forward pass may differ from an unbatched one in the last
bits of the logits (other reduction lengths and kernels). A sample changes only where such a
difference reorders the two best Gumbel-perturbed scores of a step. Measured (same seeds; batch
of 8, batch_size 3, and each conversation alone): in float32 no sample changed (tiny model on
CPU, logits apart by <= 7e-7: 64 samples; SmolLM2-135M on CPU, <= 3e-5: 16 samples of 362
tokens; tiny model on an H200: 128 samples of 3,936 tokens); in bfloat16 on an H200, 1 of those
128 samples changed. So seeds make samples batch-independent exactly in float32 and almost
always in bfloat16. Generators live on the model's device: a seed gives other samples on CPU
than on CUDA.

Shared prompt prefixes: the rows of a batch usually begin alike (the environment's system
prompt and instructions; the n samples of one conversation). Their longest common prefix is
prefilled once, in one row, and its key/value cache repeated for every row; each row then
prefills only its own rest (`_generate_rows`). On CPU, where the prefill is compute-bound, this
is most of a batch's gain over single calls (Sokoban prompts: ~122 of ~150 tokens shared; the
tiny model's batch-16 prefill 280 -> 65 ms). It is a floating-point matter of the same kind as
padding, and changes no sample in the float32 tests (tests/models/test_transformers.py).

LoRA/PEFT adapters (`TransformersModelSpec.adapter`, or a `name` that is itself an adapter
directory) are merged into the weights after loading (`merge_and_unload`), so generation runs at
the base model's speed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from leafe import threads
from leafe.errors import UserError
from leafe.models.base import ChatModel, Completion, Conversation, Sampling
from leafe.models.builtin import resolve, weights_hash
from leafe.seeds import derive_seed
from leafe.spec.schema import ModelSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"
SHARED_PREFIX_MIN = 8
"""Fewest common prompt tokens a batch computes once for all its rows (see `_generate_rows`)."""


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: cuda if available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"model device {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model device {device!r} requested but CUDA is not available; use `auto` or `cpu`")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that support it, otherwise float32 (also on CPU)."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------- adapters


def is_adapter_dir(name: str | os.PathLike[str]) -> bool:
    """A local PEFT adapter directory (it has an `adapter_config.json`)."""
    return (Path(os.path.expanduser(str(name))) / ADAPTER_CONFIG).is_file()


def read_adapter(adapter: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """Check a PEFT adapter directory; return (absolute path, provenance: its config's key
    fields and the sha256 of its weight files)."""
    path = Path(os.path.expanduser(str(adapter)))
    if not path.is_dir():
        raise UserError(f"adapter directory {str(adapter)!r} does not exist; give a PEFT adapter "
                        f"directory (adapter_config.json + adapter weights)")
    if not (path / ADAPTER_CONFIG).is_file():
        raise UserError(f"{str(adapter)!r} is not a PEFT adapter directory (no {ADAPTER_CONFIG}); "
                        f"save one with peft_model.save_pretrained(dir)")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path / ADAPTER_CONFIG}: {e}") from None
    hashed = weights_hash(path)
    if not hashed["weight_files"]:
        raise UserError(f"no adapter weights (*.safetensors, *.bin) in adapter directory {str(adapter)!r}")
    prov = {
        "path": str(path.resolve()),
        "peft_type": config.get("peft_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        **hashed,
    }
    return str(path.resolve()), prov


def resolve_with_adapter(
    name: str, revision: str | None, adapter: str | None
) -> tuple[str, dict[str, Any], str | None, dict[str, Any] | None]:
    """Resolve `name` (see `leafe.models.builtin.resolve`) plus an optional adapter.

    `name` may itself be a PEFT adapter directory: its base model (`base_model_name_or_path`
    in its adapter_config.json) is resolved instead and the directory becomes the adapter.
    Returns (base path, base provenance, adapter path or None, adapter provenance or None)."""
    if is_adapter_dir(name):
        if adapter is not None:
            raise UserError(f"model {name!r} is a PEFT adapter directory and `adapter` is set too "
                            f"({adapter!r}); give the base model as `name` with one `adapter`")
        adapter_path, adapter_prov = read_adapter(name)
        base = adapter_prov["base_model_name_or_path"]
        if not base:
            raise UserError(f"adapter {name!r} does not name its base model "
                            f"(no base_model_name_or_path in {ADAPTER_CONFIG}); set `name` to the base "
                            f"model and `adapter` to {name!r}")
        try:
            path, prov = resolve(base, revision)
        except UserError as e:
            raise UserError(f"the base model {base!r} of adapter {name!r} cannot be loaded: {e}. "
                            f"Set `name` to the base model and `adapter` to {name!r}") from None
        return path, prov, adapter_path, adapter_prov
    path, prov = resolve(name, revision)
    if adapter is None:
        return path, prov, None, None
    adapter_path, adapter_prov = read_adapter(adapter)
    return path, prov, adapter_path, adapter_prov


def merge_adapter(model: Any, adapter_path: str) -> Any:
    """`model` with the PEFT adapter at `adapter_path` merged into its weights."""
    try:
        from peft import PeftModel
    except ImportError:
        raise UserError("model adapters need the `peft` package: pip install 'leafe[train]' "
                        "(or pip install peft)") from None
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_path)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"adapter {adapter_path!r} does not fit the base model: {e}") from None
    return peft_model.merge_and_unload()


# ---------------------------------------------------------------------------------- sampling


def truncate_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus truncation per row: keep the most likely tokens until their mass reaches
    `top_p` (at least one), set the others to -inf."""
    if top_p >= 1:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    p = ordered.softmax(dim=-1)
    drop = (p.cumsum(dim=-1) - p) >= top_p  # the mass before this token already reaches top_p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


class RowSampler:
    """A logits processor that turns greedy decoding into sampling with one RNG per row.

    Each row's scores become the tempered, top-p-truncated logits plus Gumbel noise from that
    row's own generator; the argmax greedy decoding then takes is an exact sample of
    softmax(logits / temperature) restricted to the nucleus (the Gumbel-max trick). A row's
    noise depends only on its seed and the step, not on the other rows of the batch."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        if temperature <= 0:
            raise ValueError("RowSampler needs temperature > 0 (temperature 0 is greedy decoding)")
        self.seeds = [int(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.seeds):
            raise RuntimeError(f"RowSampler has {len(self.seeds)} seeds for {scores.shape[0]} rows")
        if self.generators is None:  # created where the logits are (the last layer's device)
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        x = truncate_top_p(scores.float() / self.temperature, self.top_p)
        # -log(E), E ~ Exp(1), is Gumbel(0, 1); clamp so a (rare) E == 0 cannot give +inf.
        e = torch.stack([
            torch.empty(x.shape[-1], device=x.device, dtype=x.dtype).exponential_(generator=g)
            for g in self.generators
        ])
        return x - e.clamp_min_(torch.finfo(x.dtype).tiny).log()


def _cache_of(output: Any) -> Any:
    """The key/value cache a forward pass returned (`cache` in newer transformers, else `past_key_values`)."""
    if "cache" in output:
        return output["cache"]
    return getattr(output, "past_key_values", None)


def row_seeds(n_conversations: int, sampling: Sampling, seeds: list[int] | None) -> list[int]:
    """One seed per (conversation, sample), conversation-major: from `seeds[i]` and the sample
    index when given, else drawn from the global torch RNG (seeded with `sampling.seed`)."""
    if seeds is not None:
        return [derive_seed(seeds[i], "sample", j) for i in range(n_conversations) for j in range(sampling.n)]
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    return torch.randint(0, 2**62, (n_conversations * sampling.n,)).tolist()


# ---------------------------------------------------------------------------------- model


class TransformersModel(ChatModel):
    """A causal LM and its tokenizer; `.model`, `.tokenizer` and `.path` are public so training
    code can reuse them."""

    def __init__(self, model: Any, tokenizer: Any, spec: ModelSpec, provenance: dict[str, Any]):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self._provenance = dict(provenance)
        self.path: str | None = provenance.get("path")
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"model {spec.name!r} has no chat template; use an instruction-tuned (chat) model "
                f"or save a tokenizer with a chat_template"
            )
        eos: set[int] = set()
        for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif src is not None:
                eos.update(int(i) for i in src)
        if not eos:
            raise UserError(f"model {spec.name!r} defines no end-of-sequence token")
        self.eos_ids: list[int] = sorted(eos)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = getattr(model.generation_config, "pad_token_id", None)
        self.pad_id: int = pad if pad is not None else self.eos_ids[0]
        self._share_prefix: bool | None = None

    @classmethod
    def from_spec(
        cls, spec: ModelSpec, *, path: str | None = None, provenance: dict[str, Any] | None = None
    ) -> "TransformersModel":
        """Resolve `spec.name` (see `leafe.models.builtin.resolve`; a PEFT adapter directory
        loads its base model) and load it, with `spec.adapter` merged in when set.

        `path`/`provenance` skip the resolution of `name` (e.g. a fine-tuned checkpoint
        directory); `spec.adapter` still applies on top.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        adapter = getattr(spec, "adapter", None)
        if path is None:
            path, provenance, adapter_path, adapter_prov = resolve_with_adapter(spec.name, spec.revision, adapter)
        elif adapter is not None:
            adapter_path, adapter_prov = read_adapter(adapter)
        else:
            adapter_path = adapter_prov = None
        provenance = dict(provenance or {"path": path})
        provenance.setdefault("path", path)
        device = pick_device(spec.device)
        dtype = pick_dtype(spec.dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.to(device)
        if adapter_path is not None:
            model = merge_adapter(model, adapter_path)
            adapter_prov = {**adapter_prov, "merged": True}
        model.eval()
        provenance["adapter"] = adapter_prov
        return cls(model, tokenizer, spec, provenance)

    # ------------------------------------------------------------------ generation

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, conversation: Conversation) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        # The template writes its own special tokens: add none.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generate(
        self, conversations: list[Conversation], sampling: Sampling, seeds: list[int] | None
    ) -> list[Completion]:
        """Sample `sampling.n` replies per conversation, conversation-major.

        Conversations are processed `spec.batch_size` at a time (each repeated n times), their
        common prompt prefix prefilled once (`_generate_rows`). Decoding is greedy; at temperature > 0 a `RowSampler` makes each row an exact
        sample from its own seed (see the module docstring).
        """
        from transformers import GenerationConfig, LogitsProcessorList

        prompts = [self._encode(c) for c in conversations]
        greedy = sampling.temperature <= 0
        stop = [s for s in sampling.stop if s]
        config = GenerationConfig(
            # Always greedy: sampling, when wanted, is done by RowSampler, which needs an argmax.
            do_sample=False,
            max_new_tokens=sampling.max_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            num_beams=1,
            num_return_sequences=1,
            stop_strings=stop or None,
            # Explicit neutral values, so the model's own defaults do not leak in.
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
        )
        n = sampling.n
        rseeds = None if greedy else row_seeds(len(prompts), sampling, seeds)
        out: list[Completion] = []
        chunk = max(1, self.spec.batch_size)
        with torch.inference_mode():
            for start in range(0, len(prompts), chunk):
                threads.adapt()  # runtime.threads null: follow what other processes leave free
                part = prompts[start : start + chunk]
                rows = [p for p in part for _ in range(n)]
                processors = None
                if rseeds is not None:
                    sampler = RowSampler(rseeds[start * n : (start + len(part)) * n], sampling.temperature, sampling.top_p)
                    processors = LogitsProcessorList([sampler])
                generated = self._generate_rows(rows, config, processors)
                for r, ids in enumerate(generated):
                    c, s = divmod(r, n)
                    out.append(
                        self._completion(ids, start + c, s, len(part[c]), sampling.max_tokens, stop)
                    )
        return out

    def _generate_rows(self, rows: list[list[int]], config: Any, processors: Any = None) -> list[list[int]]:
        """Generate after each row of token ids; return the new ids of each row.

        The rows' longest common prefix (a shared system prompt and instructions, or the n
        copies of one conversation) is computed once when it is at least `SHARED_PREFIX_MIN`
        tokens long: one forward pass over it, its key/value cache repeated for every row, then
        `generate` runs on [prefix | padding | each row's own rest] with the padding masked
        (positions follow the mask, so every row sees the positions of its unpadded prompt).
        Otherwise the rows are left padded and prefilled whole."""
        prefix = self._shared_prefix(rows)
        if prefix:
            width = max(len(r) for r in rows) - prefix
            layout = [r[:prefix] + [self.pad_id] * (width - len(r) + prefix) + r[prefix:] for r in rows]
            keep = [[1] * prefix + [0] * (width - len(r) + prefix) + [1] * (len(r) - prefix) for r in rows]
        else:
            width = max(len(r) for r in rows)
            layout = [[self.pad_id] * (width - len(r)) + r for r in rows]
            keep = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        dev = self.device
        ids = torch.tensor(layout, dtype=torch.long, device=dev)
        mask = torch.tensor(keep, dtype=torch.long, device=dev)
        extra = {}
        if prefix:
            extra[self._cache_kwarg()] = self._prefix_cache(ids[:1, :prefix], len(rows))
        seqs = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=processors,
            tokenizer=self.tokenizer,  # needed by stop_strings
            **extra,
        )
        return seqs[:, ids.shape[1] :].tolist()

    def _shared_prefix(self, rows: list[list[int]]) -> int:
        """Length of the rows' common prefix worth computing once (0: none). At least one token
        of every row stays out of it (the first forward pass of `generate` needs an input)."""
        if len(rows) < 2 or not self._prefix_sharing():
            return 0
        limit = min(len(r) for r in rows) - 1
        first = rows[0]
        n = 0
        while n < limit and all(r[n] == first[n] for r in rows):
            n += 1
        return n if n >= SHARED_PREFIX_MIN else 0

    def _prefix_sharing(self) -> bool:
        """Whether this model's cache can take a shared prefix: a plain `DynamicCache` of full
        attention layers (sliding-window and recurrent layers keep other state). Checked once,
        on a one-token forward pass."""
        if self._share_prefix is None:
            from transformers import DynamicCache
            from transformers.cache_utils import DynamicLayer

            try:
                with torch.inference_mode():
                    out = self.model(input_ids=torch.tensor([[self.pad_id]], device=self.device), use_cache=True)
                cache = _cache_of(out)
                self._share_prefix = (type(cache) is DynamicCache and bool(getattr(cache, "layers", None))
                                      and all(type(layer) is DynamicLayer for layer in cache.layers))
            except Exception:  # an unusual model: prefill whole rows, as before
                self._share_prefix = False
        return self._share_prefix

    def _cache_kwarg(self) -> str:
        """`generate`'s name for a given cache: `cache` (newer transformers 5) or `past_key_values`."""
        return "cache" if "cache" in self._forward_params() else "past_key_values"

    def _forward_params(self) -> set[str]:
        import inspect

        return set(inspect.signature(self.model.forward).parameters)

    def _prefix_cache(self, prefix_ids: torch.Tensor, rows: int) -> Any:
        """The key/value cache of one forward pass over `prefix_ids` (1 x P), repeated for `rows` rows."""
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in self._forward_params() else {}
        out = self.model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids), use_cache=True, **last_only)
        cache = _cache_of(out)
        cache.batch_repeat_interleave(rows)
        return cache

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _completion(
        self, ids: list[int], index: int, sample: int, prompt_tokens: int, max_tokens: int, stop: list[str]
    ) -> Completion:
        eos = set(self.eos_ids)
        end = next((i for i, t in enumerate(ids) if t in eos), None)
        body = ids if end is None else ids[:end]
        text = self._decode(body)
        # Earliest stop string wins; the text keeps it.
        hits = [(p + len(s), s) for s in stop if (p := text.find(s)) >= 0]
        if hits:
            cut, s = min(hits)
            text = text[:cut]
            # Fewest tokens whose decoding contains the stop string (binary search).
            lo, hi = 1, len(body)
            while lo < hi:
                mid = (lo + hi) // 2
                if s in self._decode(body[:mid]):
                    hi = mid
                else:
                    lo = mid + 1
            return Completion(text, index, sample, prompt_tokens, lo, "stop")
        if end is not None:
            return Completion(text, index, sample, prompt_tokens, end + 1, "stop")
        n = len(ids)
        if self.pad_id not in eos:  # padding after a row that stopped early (defensive)
            while n and ids[n - 1] == self.pad_id and n < max_tokens:
                n -= 1
            text = self._decode(ids[:n])
        return Completion(text, index, sample, prompt_tokens, n, "length" if n >= max_tokens else "stop")

    # ------------------------------------------------------------------ misc

    def provenance(self) -> dict[str, Any]:
        prov = dict(self._provenance)
        prov.update(
            backend="transformers",
            name=self.spec.name,
            revision=self.spec.revision,
            path=self.path,
            dtype=str(self.model.dtype).removeprefix("torch."),
            device=str(self.device),
            # the spec's defaults; a call's own `Sampling` may override them
            sampling={k: getattr(self.spec, k) for k in ("temperature", "top_p", "max_tokens")},
            sampler="greedy argmax of top-p-truncated logits / temperature + per-row Gumbel noise",
        )
        prov.setdefault("adapter", None)
        return prov

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
