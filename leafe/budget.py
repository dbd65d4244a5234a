"""Interaction-budget accounting shared by every method.

`budget.interactions_per_task` bounds the environment steps a training method spends on each
train task (expert steps, rollouts, executed alternatives, LEAFE's branches; replayed steps that
only restore a saved state are not spent). Each training stage that touches an environment writes
a `budget` section into its metrics.json (`stage_budget`); `method_budget` sums them for a method,
both its own stages and the stages it inherits through `init:` (the checkpoint it starts from was
paid for too), per task. The manifest and the report show both, so a comparison "at the same
budget" can be checked from the run directory alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from leafe.store import read_json

if TYPE_CHECKING:
    from leafe.plan import Plan


class StageBudget(BaseModel):
    """What one training stage spent on its train tasks."""

    budget_per_task: int
    """`budget.interactions_per_task` of the spec the stage ran under."""
    interactions: int
    """Environment steps spent, summed over tasks."""
    max_per_task: int
    """The most any one task spent."""
    within: bool
    """Every task stayed within `budget_per_task`."""
    per_task: dict[str, int] = Field(default_factory=dict)
    """Steps spent per train task id."""


def stage_budget(per_task: Mapping[str, int], budget: int) -> dict:
    """The `budget` section of a training stage's metrics.json."""
    per = {str(t): int(n) for t, n in sorted(per_task.items())}
    top = max(per.values(), default=0)
    return StageBudget(budget_per_task=budget, interactions=sum(per.values()), max_per_task=top,
                       within=top <= budget, per_task=per).model_dump()


class MethodBudget(BaseModel):
    """A method's interactions: its own stages and those its `init:` chain ran first."""

    budget_per_task: int
    """`budget.interactions_per_task` of the spec."""
    own: int
    """Environment steps the method's own training stages spent."""
    inherited: int
    """Steps spent by the stages of the methods it starts from (`init:`, transitively)."""
    total: int
    """own + inherited."""
    own_max_per_task: int | None
    """The most one task cost the method's own stages (each method keeps this within budget);
    None when a stage recorded only a total (written before per-task accounting)."""
    total_max_per_task: int | None
    """The most one task cost, own and inherited stages together (None: as above)."""
    own_within: bool | None
    """The own stages together kept every task within the budget (None: a stage recorded only
    a total, from before per-task accounting)."""
    stages: dict[str, int] = Field(default_factory=dict)
    """Steps per contributing training stage id (own and inherited) that has finished."""
    pending: list[str] = Field(default_factory=list)
    """Contributing training stages not finished yet (their spend is not counted)."""


def upstream_train_stages(plan: "Plan", method: str) -> list[str]:
    """Training stage ids a method's evaluation depends on, transitively (own and via `init:`)."""
    by_id = {s.id: s for s in plan.stages}
    seen: list[str] = []
    todo = list(by_id[f"eval.{method}"].deps) if f"eval.{method}" in by_id else []
    while todo:
        sid = todo.pop()
        if sid in seen or sid not in by_id:
            continue
        seen.append(sid)
        todo += by_id[sid].deps
    return [s.id for s in plan.stages if s.id in seen and s.kind == "train"]


def _stage_spend(metrics: dict) -> tuple[int, dict[str, int] | None]:
    """(interactions, per task or None) from a stage's metrics.json; stages written before the
    `budget` section existed have only a total."""
    if "budget" in metrics:
        return int(metrics["budget"]["interactions"]), metrics["budget"].get("per_task")
    return int(metrics.get("interactions", 0)), None


def method_budget(plan: "Plan", method: str, budget: int) -> dict:
    """`MethodBudget` of one method from its finished stages' metrics."""
    own = inherited = 0
    own_tasks: Counter = Counter()
    all_tasks: Counter = Counter()
    own_max_known = all_known = True
    stages: dict[str, int] = {}
    pending: list[str] = []
    for sid in upstream_train_stages(plan, method):
        st = plan.stage(sid)
        mf = plan.dir(st) / "metrics.json"
        if plan.status(st) != "done" or not mf.exists():
            pending.append(sid)
            continue
        n, per = _stage_spend(read_json(mf))
        if n == 0:
            continue
        stages[sid] = n
        mine = st.method == method
        if mine:
            own += n
        else:
            inherited += n
        if per is None:
            own_max_known = own_max_known and not mine
            all_known = False
            continue
        all_tasks.update(per)
        if mine:
            own_tasks.update(per)
    own_max = max(own_tasks.values(), default=0)
    return MethodBudget(
        budget_per_task=budget, own=own, inherited=inherited, total=own + inherited,
        own_max_per_task=own_max if own_max_known else None,
        total_max_per_task=max(all_tasks.values(), default=0) if all_known else None,
        own_within=own_max <= budget if own_max_known else None, stages=stages, pending=pending,
    ).model_dump()
