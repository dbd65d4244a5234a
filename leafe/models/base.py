"""The `ChatModel` interface every model backend implements."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
"""One chat message: {"role": "system"|"user"|"assistant", "content": str}."""
Conversation = list[Message]


@dataclass
class Sampling:
    """How to sample completions for one `generate` call."""

    temperature: float = 0.7
    """0 means greedy decoding."""
    top_p: float = 1.0
    max_tokens: int = 64
    """Maximum new tokens per completion."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the completion is cut after the first one (the stop string is kept)."""
    n: int = 1
    """Samples per conversation."""
    seed: int | None = None
    """Seed for this call; the same seed and batch give the same samples."""


@dataclass
class Completion:
    """One sampled reply."""

    text: str
    index: int
    """Index of the conversation this completion answers."""
    sample: int
    """Sample index within that conversation (0..n-1)."""
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    """"stop" (end of turn or stop string), "length" (max_tokens reached) or "error"."""
    error: str | None = None
    """Set when the backend could not produce this sample (an API call that failed after its
    retries); `text` is empty then and the caller fails the episode visibly."""
    retries: int = 0
    """Retried attempts spent on this sample (API backends)."""
    cached: bool = False
    """Served from the persistent cache, not computed or called."""


@dataclass
class ModelUsage:
    """What a model instance spent since it was loaded (totals over `generate` calls)."""

    calls: int = 0
    """`generate` calls."""
    samples: int = 0
    """Completions returned (errored ones included)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    """Retried requests (API backends)."""
    errors: int = 0
    """Completions that failed after their retries."""
    cached: int = 0
    """Completions served from the cache."""
    seconds: float = 0.0
    """Wall time inside `generate`."""

    def add(self, completions: list["Completion"], seconds: float) -> None:
        self.calls += 1
        self.seconds += seconds
        for c in completions:
            self.samples += 1
            self.prompt_tokens += c.prompt_tokens
            self.completion_tokens += c.completion_tokens
            self.retries += c.retries
            self.errors += c.error is not None
            self.cached += c.cached

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


class ChatModel(ABC):
    """A chat model that samples replies for a batch of conversations.

    Backends implement `_generate`; `generate` checks the arguments and keeps `usage`."""

    @property
    def usage(self) -> ModelUsage:
        """Totals since this instance was loaded."""
        if "_usage" not in self.__dict__:
            self._usage = ModelUsage()
        return self._usage

    def generate(
        self, conversations: list[Conversation], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[Completion]:
        """Sample `sampling.n` replies per conversation, returned conversation-major
        (`index` = conversation, `sample` = 0..n-1).

        `seeds`, one per conversation, make each conversation's samples a function of its own
        seed alone (not of the other conversations in the batch or of `sampling.seed`), so a
        resumed run re-draws exactly the samples it lost. Without them, `sampling.seed` seeds
        the call as a whole. A sample that cannot be produced (an API call that failed after
        its retries) comes back with `error` set instead of raising."""
        if sampling.n < 1 or sampling.max_tokens < 1:
            raise ValueError(f"need n >= 1 and max_tokens >= 1, got {sampling}")
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError(f"got {len(seeds)} seeds for {len(conversations)} conversations")
        if not conversations:
            return []
        t0 = time.perf_counter()
        out = self._generate(conversations, sampling, seeds)
        self.usage.add(out, time.perf_counter() - t0)
        return out

    @abstractmethod
    def _generate(
        self, conversations: list[Conversation], sampling: Sampling, seeds: list[int] | None
    ) -> list[Completion]:
        """The backend's sampling (arguments already checked, see `generate`)."""

    def provenance(self) -> dict[str, Any]:
        """What exactly was loaded (backend, name, revision or file hash, adapter, default
        sampling); written to the stage's model.json and the run manifest."""
        return {}

    def close(self) -> None:
        """Free memory / processes."""


class RoleView(ChatModel):
    """Another role served by an already loaded model (e.g. `reflector: policy`): the same
    weights and sampling, its own `usage`, and `close` leaves the model to its owner."""

    def __init__(self, model: ChatModel, role: str):
        self.model = model
        self.role = role

    def _generate(self, conversations: list[Conversation], sampling: Sampling,
                  seeds: list[int] | None) -> list[Completion]:
        return self.model._generate(conversations, sampling, seeds)

    def provenance(self) -> dict[str, Any]:
        return {**self.model.provenance(), "shared_with": "policy"}

    def close(self) -> None:
        pass
