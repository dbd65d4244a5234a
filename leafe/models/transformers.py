"""The `transformers` backend: local batched sampling with Hugging Face transformers.

Sampling follows `Sampling` exactly and nothing else: the model's own generation defaults
(top_k, repetition penalty, ...) are not applied, so temperature 1 and top_p 1 sample from the
model's full distribution; temperature 0 is greedy decoding.
"""

from __future__ import annotations

from typing import Any

import torch

from leafe.errors import UserError
from leafe.models.base import ChatModel, Completion, Conversation, Sampling
from leafe.models.builtin import resolve
from leafe.spec.schema import ModelSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    @classmethod
    def from_spec(
        cls, spec: ModelSpec, *, path: str | None = None, provenance: dict[str, Any] | None = None
    ) -> "TransformersModel":
        """Resolve `spec.name` (see `leafe.models.builtin.resolve`) and load it.

        `path`/`provenance` skip the resolution (e.g. a fine-tuned checkpoint directory).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if path is None:
            path, provenance = resolve(spec.name, spec.revision)
        provenance = dict(provenance or {"path": path})
        provenance.setdefault("path", path)
        device = pick_device(spec.device)
        dtype = pick_dtype(spec.dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.to(device).eval()
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

        Conversations are processed `spec.batch_size` at a time (each repeated n times), left
        padded. With `sampling.seed` set, the global torch RNG is seeded once before the first
        chunk, so the same call returns the same samples.
        """
        from transformers import GenerationConfig

        prompts = [self._encode(c) for c in conversations]
        greedy = sampling.temperature <= 0
        stop = [s for s in sampling.stop if s]
        config = GenerationConfig(
            do_sample=not greedy,
            max_new_tokens=sampling.max_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            num_beams=1,
            num_return_sequences=1,
            stop_strings=stop or None,
            # Explicit neutral values, so the model's own defaults do not leak in.
            repetition_penalty=1.0,
            **(
                {}
                if greedy
                else {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
            ),
        )
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out: list[Completion] = []
        chunk = max(1, self.spec.batch_size)
        with torch.inference_mode():
            for start in range(0, len(prompts), chunk):
                part = prompts[start : start + chunk]
                rows = [p for p in part for _ in range(sampling.n)]
                generated = self._generate_rows(rows, config)
                for r, ids in enumerate(generated):
                    c, s = divmod(r, sampling.n)
                    out.append(
                        self._completion(ids, start + c, s, len(part[c]), sampling.max_tokens, stop)
                    )
        return out

    def _generate_rows(self, rows: list[list[int]], config: Any) -> list[list[int]]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        dev = self.device
        seqs = self.model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            generation_config=config,
            tokenizer=self.tokenizer,  # needed by stop_strings
        )
        return seqs[:, width:].tolist()

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
        )
        return prov

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
