"""Environments: the `Env` protocol, the registry, and `make`.

>>> from leafe import envs
>>> env = envs.make("sokoban", dim=[6, 6], num_boxes=1)
"""

from __future__ import annotations

from typing import Any

from leafe.envs.base import Env, EnvOptions, Observation, Snapshot, Step
from leafe.registry import Registry

__all__ = ["Env", "EnvOptions", "Observation", "Snapshot", "Step", "make", "names", "registry"]

registry = Registry(
    "environment",
    "leafe.envs",
    {
        "sokoban": "leafe.envs.sokoban:SokobanEnv",
        "alfworld": "leafe.envs.alfworld:AlfworldEnv",
        "coding": "leafe.envs.coding:CodingEnv",
        "textworld": "leafe.envs.textworld:TextWorldEnv",
        "sciworld": "leafe.envs.sciworld:ScienceWorldEnv",
        "webshop": "leafe.envs.webshop:WebShopEnv",
    },
)


def names() -> list[str]:
    """Names of the registered environment adapters."""
    return registry.names()


def env_class(name: str) -> type[Env]:
    return registry.get(name)


def make(name: str, **options: Any) -> Env:
    """Build environment `name` with adapter options validated by its `Options` model."""
    cls = env_class(name)
    return cls(cls.Options(**options))
