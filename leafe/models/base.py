"""The `ChatModel` interface every model backend implements."""

from __future__ import annotations

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
    """"stop" (end of turn or stop string) or "length" (max_tokens reached)."""


class ChatModel(ABC):
    """A chat model that samples replies for a batch of conversations."""

    @abstractmethod
    def generate(self, conversations: list[Conversation], sampling: Sampling) -> list[Completion]:
        """Sample `sampling.n` replies per conversation, returned conversation-major."""

    def provenance(self) -> dict[str, Any]:
        """What exactly was loaded (backend, source, revision or file hash, adapter)."""
        return {}

    def close(self) -> None:
        """Free memory / processes."""
