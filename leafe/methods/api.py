"""What a method is: a config model and the training stages it adds to the plan.

A method module must not import torch, transformers or TRL at import time (`leafe validate`
and `leafe plan` load it to validate the spec); import them inside the stage functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

from leafe.spec.schema import ReflectorSpec, RoleSpec

if TYPE_CHECKING:
    from leafe.stage import StageContext


class MethodModels(BaseModel):
    """A method's own model roles (`methods.<name>.models`); an unset role is the spec's."""

    model_config = ConfigDict(extra="forbid")

    reflector: ReflectorSpec | None = None
    """As `models.reflector` (`policy`, `oracle` or a model), for this method's stages."""
    teacher: RoleSpec | None = None
    """As `models.teacher` (`policy` or a model), for this method's stages."""


class MethodConfig(BaseModel):
    """Fields every method has."""

    model_config = ConfigDict(extra="forbid")

    method: str
    """The registered method type (defaults to the method's key in `methods:`)."""
    init: str | None = None
    """Start from the final checkpoint of another method in this spec (e.g. `init: sft`)."""
    reuse: str | None = None
    """Another method of this spec, of the same type, whose identical stages this one shares
    instead of running its own: each of this method's stages whose key equals that of the
    named method's stage of the same name, id aside (the same config fields for that stage,
    roles, budget and upstream stages), is that stage: it runs once, in the named method's
    directory, and counts as this method's own too (its interactions included). A stage that
    differs runs on its own, as do those after it. E.g. Table 4's ablations of LEAFE's
    distillation share `leafe`'s exploration: `leafe_no_cf: {use: leafe, init: grpo,
    counterfactual: false, reuse: leafe}`. `leafe plan` shows the shared stages. Not part of
    any stage key."""
    extra: bool = False
    """An extra row: a method the compared paper's table does not have (e.g. sft and rft in the
    Table 1 specs). The plan and the report mark it (`(extra)` after its name). Not part of any
    stage key."""
    models: MethodModels | None = None
    """This method's own reflector and/or teacher, in place of the spec's `models:` roles for
    its stages (e.g. one spec compares LEAFE reflecting with the policy and LEAFE reflecting
    with the environment's solver or an API model: `leafe_oracle: {use: leafe, models:
    {reflector: oracle}}`). The role's model enters the key of each stage that calls it, as a
    spec-level role does; the policy is always the spec's."""


#: MethodConfig fields left out of the stage keys' method slice (`leafe.plan`): how a method is
#: planned or shown, and `models`, whose roles enter the keys as `role:<name>` instead.
PLAN_ONLY_FIELDS = frozenset({"reuse", "extra", "models"})


@dataclass
class StageDef:
    """One training stage a method contributes."""

    name: str
    """Short name, unique within the method (e.g. `train`)."""
    run: Callable[["StageContext"], None]
    """Executes the stage; writes artifacts under `ctx.dir`."""
    inputs: dict[str, Any] = field(default_factory=dict)
    """Everything the result depends on besides upstream stages (hashed into the stage key)."""
    version: int = 1
    """Bump when the stage's behaviour changes, so cached results are not reused."""
    produces_checkpoint: bool = False
    """True when the stage writes `checkpoint/` (a model directory evaluation can load)."""
    roles: tuple[str, ...] = ()
    """Model roles besides the policy that the stage calls (`reflector`, `teacher`): their
    specs join the stage key, so changing an unused role re-runs nothing."""
    generates: str = "none"
    """How the stage samples from the policy, which decides where `runtime.generation` sends it:
    `none`; `policy` (rollouts of its start policy: exploration, RFT sampling); `trained`
    (rollouts of the weights it is training, on-policy RL: GRPO)."""
    config_fields: tuple[str, ...] | None = None
    """The method config fields the stage's result depends on (hashed into its key); None: the
    whole config. `method` and `init` always count. A later stage also depends on its
    upstream stages' keys, so it need not repeat their fields: e.g. a distillation stage lists
    its training fields only, and changing them leaves the exploration before it cached."""


class Method:
    """A training method; subclasses set `Config` and implement `stages`."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def stages(self, instance: str, config: MethodConfig, spec: Any) -> list[StageDef]:
        """Training stages in order (may be empty: evaluate the initial policy)."""
        return []

    #: How the method spends the interaction budget: "task" (task by task: a total cap is split
    #: evenly over the train tasks), "pool" (draws tasks and spends a total as it goes), or
    #: "none" (no environment interactions in training).
    spends: ClassVar[str] = "task"

    def budget_need(self, config: MethodConfig, spec: Any) -> tuple[int, str] | None:
        """The fewest interactions per train task the method needs to spend anything (with why),
        checked at validation against the spec's budget; None: any budget works."""
        return None

    def check(self, instance: str, config: MethodConfig, spec: Any) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems of this method's config given the whole spec (a `LoadedSpec`), found at
        validation: (field path under `methods.<instance>`, message) each; none by default."""
        return []
