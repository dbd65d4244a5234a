"""Training methods, by name. Each is a `Method` with a config model and training stages."""

from leafe.methods.api import Method, MethodConfig, StageDef
from leafe.registry import Registry

__all__ = ["Method", "MethodConfig", "StageDef", "names", "registry", "get"]

registry = Registry(
    "method",
    "leafe.methods",
    {
        "base": "leafe.methods.base:BaseMethod",
        "sft": "leafe.methods.sft:SFTMethod",
        "rft": "leafe.methods.rft:RFTMethod",
        "early_experience": "leafe.methods.early_experience:EarlyExperienceMethod",
        "leafe": "leafe.methods.leafe:LeafeMethod",
        "grpo": "leafe.methods.grpo:GRPOMethod",
    },
)


def names() -> list[str]:
    return registry.names()


def get(name: str) -> Method:
    return registry.get(name)()
