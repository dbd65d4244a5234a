"""Model backends: the `ChatModel` interface, the backend registry, and `load`.

>>> from leafe import models
>>> policy = models.load(spec.models.policy)          # doctest: +SKIP
>>> policy.generate([[{"role": "user", "content": "Hi"}]], models.sampling_from(spec.models.policy))

Importing this package does not import torch or transformers; `load` does.
"""

from __future__ import annotations

from typing import Any

from leafe.errors import UserError
from leafe.models.base import ChatModel, Completion, Conversation, Message, Sampling
from leafe.registry import Registry
from leafe.spec.schema import ModelSpec

__all__ = [
    "ChatModel",
    "Completion",
    "Conversation",
    "Message",
    "Sampling",
    "load",
    "names",
    "registry",
    "sampling_from",
]

registry = Registry(
    "model backend",
    "leafe.models",
    {
        "transformers": "leafe.models.transformers:TransformersModel",
        "vllm": "leafe.models.vllm:VLLMModel",
        "litellm": "leafe.models.litellm:LiteLLMModel",
    },
)


def names() -> list[str]:
    """Names of the registered model backends."""
    return registry.names()


def load(spec: ModelSpec, **kwargs: Any) -> ChatModel:
    """Load the model of `spec` with backend `spec.backend` (`kwargs` go to its `from_spec`)."""
    if spec.backend not in registry:
        raise UserError(
            f"model backend {spec.backend!r} is not available in this release; "
            f"available backends: {', '.join(registry.names())}"
        )
    cls = registry.get(spec.backend)
    return cls.from_spec(spec, **kwargs)


def sampling_from(spec: ModelSpec, **overrides: Any) -> Sampling:
    """Sampling defaults of `spec` (temperature, top_p, max_tokens), then `overrides`
    (any `Sampling` field; overrides that are None are ignored, so optional settings such as
    `eval.temperature: null` fall back to the model's)."""
    fields = {"temperature": spec.temperature, "top_p": spec.top_p, "max_tokens": spec.max_tokens}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Sampling(**fields)
    except TypeError as e:
        raise TypeError(f"sampling_from: {e}") from None
