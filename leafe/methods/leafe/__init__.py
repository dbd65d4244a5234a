"""`leafe`: LEAFE (arXiv 2603.16843), reflect on environment feedback, roll back, distil.

Two training stages:

- `explore` (Stage 1, no gradient updates): per train task, roll out with the current policy;
  upon failure (and every `reflect_every` steps of a running attempt) the reflector names the
  step τ where the trajectory went wrong and an experience e (after a failure it must name one:
  an unusable reply is retried with its parse error quoted back; a periodic reflection may
  decline). A branch starts from the state before τ (the environment's native snapshot taken
  during the rollout where it has one, else reset + replay of the actions before τ), samples the
  revised action with e in the prompt and continues; a periodic branch does not stop the running
  attempt (it is queued). Branch requests run breadth-first (one agent-loop wave per tree depth,
  batched across tasks and branches) until `max_depth`, `max_attempts` or the interaction budget
  is reached. One exploration tree per task is appended to `trees.jsonl` as soon as the task is
  finished (resumable).
- `distill` (Stage 2): SFT on L = L_cf + β·L_reh with TRL's SFTTrainer (`train_sft`):
  counterfactual examples (the ORIGINAL, experience-free prompt before τ → the revised action
  a'_τ, only where a'_τ differs from the original a_τ and, with `only_successful`, lies on a
  successful trajectory) and rehearsal examples (every step of a random share of the successful
  trajectories), the latter with loss weight β on each completion token.

Test time is the plain evaluation stage (no reflection, no rollback). See `LeafeConfig` for
every choice the paper leaves open and its default.

Table 3 of the paper compares Stage 1 against two ways of spending the same execution budget:
independent sampling (`explore_mode: independent`: up to `max_attempts` fresh rollouts per task,
no reflector) and iterative refinement (`rollback: false`: after each failed full attempt the
reflector's experience restarts the task from step 1). `leafe.methods.leafe.stats` computes the exploration's own
Pass@k from the trees, which the report shows as its "Stage 1" table.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from leafe.methods.api import Method, MethodConfig, StageDef
from leafe.methods.sft import TrainSpec

DEFAULT_REFLECTION_SYSTEM = (
    "You review an agent's attempt at a task and find where it went wrong. Be brief."
)

DEFAULT_REFLECTION_USER = """\
Task: {{ task }}
Initial observation:
{{ initial_observation }}

The agent's attempt so far ({{ steps }} steps, {{ status }}):
{% for h in history %}
Step {{ h.step }}: {{ h.action }}
-> {{ h.observation }}
{% endfor %}
{% if lessons %}

Lessons already tried on this path (do not repeat them):
{% for lesson in lessons %}
- {{ lesson }}
{% endfor %}
{% endif %}
{% if hint %}

Hint: {{ hint }}
{% endif %}

{% if trigger == "failure" %}
The attempt failed. Which step's action (1-{{ steps }}) first led it astray? Answer exactly as
<step>N</step><experience>what went wrong at that step and what to do instead, in one or two sentences</experience>
{% else %}
Which step's action (1-{{ steps }}) first led the attempt astray? Answer exactly as
<step>N</step><experience>what went wrong at that step and what to do instead, in one or two sentences</experience>
or, if the attempt is on track, <step>none</step>.
{% endif %}"""

DEFAULT_REFLECTION_RETRY = """\
Your reply could not be used: {{ error }}.
{% if format == "json" %}
Answer again with one JSON object {"step": N, "experience": "what went wrong at that step and what to do instead"}\
{% if trigger == "periodic" %} (or {"step": null} if the attempt is on track){% endif %}, N between 1 and {{ steps }}.
{% else %}
Answer again exactly as <step>N</step><experience>what went wrong at that step and what to do instead</experience>\
{% if trigger == "periodic" %} (or <step>none</step> if the attempt is on track){% endif %}, N between 1 and {{ steps }}.
{% endif %}"""

class ReflectionSpec(BaseModel):
    """The reflector's prompt (sandboxed Jinja2) and output format.

    Template variables: `task` (goal text), `initial_observation`, `history` (list of
    {step (1-based), action, observation}), `steps` (steps so far), `max_steps`, `status`
    (`failed` or `in progress`), `trigger` (`failure` or `periodic`), `lessons` (the
    experiences already tried on this path, oldest first: those of the branch's ancestors and
    its own, then those of the branches this trajectory already made), `hint` (see `hints`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    system: str | None = DEFAULT_REFLECTION_SYSTEM
    """System message template; omitted when null."""
    user: str = DEFAULT_REFLECTION_USER
    """User message template. The default offers a decline (`on track`) only to a periodic
    reflection (`trigger` periodic); after a failure it asks for a step."""
    retry: str = DEFAULT_REFLECTION_RETRY
    """User message template of a retry, sent after the unusable reply (as the assistant's
    message) in the same conversation. Variables: `error` (why the reply could not be used),
    `format`, `trigger`, `steps`."""
    retries: int = Field(2, ge=0)
    """Retries of a reflection whose reply cannot be used (unparsable, a step out of range, no
    experience, or a decline after a failure), each with the parse error quoted back; then the
    reflection point is given up (no branch). Every attempt is kept in the node's `reflections`
    (`attempt` 0 is the first) and counted (`reflection_retries`). A reply the backend failed
    to produce (`error`) is not retried. (Not in the paper.)"""
    format: Literal["tags", "json"] = "tags"
    """Reply format the prompt asks for (see `leafe.parsing.parse_reflection`): `tags`
    (<step>N</step><experience>...</experience>, <step>none</step> declines) or `json`
    ({"step": N, "experience": "..."}, {"step": null} declines). A decline is an answer only to
    a periodic reflection."""
    hints: dict[str, str] = Field(default_factory=dict)
    """Per environment adapter name, the reflector's hint (template variable `hint`), replacing
    the environment's: an entry here, even empty (`{sokoban: ""}`: no hint), wins. Without an
    entry the reflector gets the environment preset's `env.reflection_hint` only when
    `env.share_hint` is on, i.e. when every method's policy prompt shows it too. A non-empty
    entry gives LEAFE's reflector a hint no other method sees: an ablation, not a fair
    comparison."""
    max_tokens: int | None = Field(256, ge=1)
    """Token limit of a reflection; null: the reflector's `max_tokens`."""
    temperature: float | None = Field(None, ge=0)
    """Reflection temperature; null: the reflector's."""

    @field_validator("system", "user", "retry")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        from leafe.prompts import check_template

        if v is not None and (msg := check_template(v)):
            raise ValueError(f"template error: {msg}")
        return v


def _paper_train() -> TrainSpec:
    # The paper: lr 1e-6, batch 128, 2-3 epochs, standard next-token SFT (full fine-tuning).
    return TrainSpec(epochs=2, lr=1e-6, batch_size=8, grad_accum=16)


class LeafeConfig(MethodConfig):
    """LEAFE: reflective exploration with rollback (Stage 1), then distillation (Stage 2).
    Fields the paper does not state are marked "(not in the paper)" with the reason for the
    default."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    # -- Stage 1: exploration -------------------------------------------------------------------
    explore_mode: Literal["leafe", "independent"] = "leafe"
    """`leafe`: reflect, roll back and branch (the fields below). `independent`: the Table 3
    baseline, independent sampling at the same budget: up to `max_attempts` rollouts per task,
    each from the start with the plain prompt, the next one only after a failure (none after a
    success or an errored episode), under the same `budget.interactions_per_task` accounting;
    no reflector is called (nor loaded), so the reflection fields are ignored and the trees are
    root-only (one root per attempt). Its distillation is rehearsal only (no branch events)."""
    reflect_every: int | None = Field(5, ge=1)
    """K: reflect after every K steps of a running attempt (periodic; it may decline) and always
    upon failure; null: only upon failure (the paper's setting for code, where rollback happens
    only when the turns are exhausted). Ignored with `rollback: false` (iterative refinement
    reflects on full attempts only). (Not in the paper; 5 is the value of the project's example
    spec.)"""
    periodic_stops_attempt: bool = False
    """What a periodic reflection that names a step does to the running attempt. False (default,
    the paper's reading: a rollback branch explores from τ while the current attempt is not
    thrown away): the branch is queued for the next wave and the attempt runs on to its end
    (success, failure, max_steps or budget), reflecting again every K steps and on failure.
    True (a deviation, this project's earlier behaviour): the attempt stops there (outcome
    `rolled_back`) and only its branch continues."""
    max_depth: int = Field(4, ge=1)
    """Deepest branch (the first rollout is depth 0). (Not in the paper.)"""
    branches_per_node: int = Field(1, ge=1)
    """Reflections sampled at each reflection point; every one that branches adds a child.
    (Not in the paper; 1 keeps the tree a chain of corrections per failure.)"""
    max_attempts: int = Field(16, ge=1)
    """Attempt budget: trajectories per task, the first rollout included (a node of the
    tree is one attempt). Exploration also stops at `budget.interactions_per_task`
    policy-chosen environment steps. (Not in the paper.)"""
    experience_scope: Literal["branch", "step"] = "branch"
    """Where the experience stays in the prompt: `branch`, every step of the revised branch
    (its descendants start from their own experience); `step`, only the revised step τ.
    (Not in the paper.)"""
    experience_template: str = "Lesson from an earlier attempt: {{ experience }}"
    """Jinja2 template of the note put before the last user message of the policy's prompt
    (variable: `experience`)."""
    batch_tasks: int = Field(16, ge=1)
    """Tasks explored together in one batch of waves; also the unit of resumption (a killed
    stage re-runs the unfinished batch whole, so its trees are those of an uninterrupted
    run). Execution only."""
    reflection: ReflectionSpec = Field(default_factory=ReflectionSpec)
    """The reflection prompt and output format."""

    # -- ablations ------------------------------------------------------------------------------
    rollback: bool = True
    """False: iterative refinement (Table 3's middle column), no rollback: reflection happens
    only after a full attempt has failed (no periodic reflection), and the next attempt restarts
    the task from step 1 with the experience (it never restarts mid-attempt). Set `max_depth`
    >= `max_attempts` - 1 to let the chain of restarts use every attempt. The reflector's τ is
    recorded (`reflected_tau`); the counterfactual target is the first action of the new
    attempt."""
    use_experience: bool = True
    """False: no experience, a branch only resamples the action at τ (the reflector still
    picks τ)."""
    counterfactual: bool = True
    """False: no L_cf, rehearsal only."""

    # -- Stage 2: distillation ------------------------------------------------------------------
    only_successful: bool = True
    """Distil a branch event only when the revised action a'_τ lies on a successful
    trajectory: some successful node of the branch's subtree (the branch itself included) has
    the branch's revised step at index τ-1 of its full trajectory, i.e. no node between them
    rolled back to τ or before. (A descendant that succeeded after rolling back before τ does not
    vouch for a'_τ.) Recommended; not stated in the paper. In every case a branch whose revised
    action equals the original one (`same_action`, compared after stripping, collapsing
    whitespace and case-folding) is never distilled: it teaches nothing counterfactual (counted
    as `same_action_branches` in Stage 1 and `same_action_skipped` in the dataset stats)."""
    cf_per_task: int = Field(3, ge=1)
    """Branch events sampled per task for L_cf (the paper: 3)."""
    rehearsal_fraction: float = Field(0.2, ge=0, le=1)
    """Share of the successful trajectories (branched ones included) whose every step joins
    L_reh (the paper: 20%); at least one when there is any and the share is > 0."""
    beta: float = Field(1.0, ge=0)
    """β, the weight of L_reh: a loss weight on every rehearsal token. A step's loss is
    (Σ_cf-tokens ℓ + β·Σ_reh-tokens ℓ) / N, N the completion tokens of the step's batch: exactly
    L_cf + β·L_reh with both terms normalised by the same N (β = 1 is plain SFT on the union);
    β = 0 leaves rehearsal out. (The paper gives no value; 1.)"""
    target: Literal["completion", "action"] = "completion"
    """Training target of a step: the policy's own reply text, or the action rendered with
    `env.action.render` (drops any reasoning before the action)."""
    train: TrainSpec = Field(default_factory=_paper_train)
    """Fine-tuning hyper-parameters; defaults are the paper's (lr 1e-6, effective batch 128 =
    8 x 16 accumulation, 2 epochs, full fine-tuning; set `lora` for LoRA)."""

    @field_validator("experience_template")
    @classmethod
    def _template_compiles(cls, v: str) -> str:
        from leafe.prompts import check_template

        if msg := check_template(v):
            raise ValueError(f"template error: {msg}")
        return v

    @model_validator(mode="after")
    def _some_loss(self) -> "LeafeConfig":
        if not self.counterfactual and (self.rehearsal_fraction == 0 or self.beta == 0):
            raise ValueError("counterfactual: false with rehearsal_fraction: 0 or beta: 0 leaves "
                             "nothing to train on; enable one of them")
        if self.explore_mode == "independent":
            if not (self.rollback and self.use_experience):
                raise ValueError("explore_mode: independent never reflects, so rollback: false and "
                                 "use_experience: false mean nothing there; drop them")
            if self.rehearsal_fraction == 0 or self.beta == 0:
                raise ValueError("explore_mode: independent makes no branch events, so its "
                                 "distillation is rehearsal only: rehearsal_fraction and beta must be > 0")
        return self


def _run_explore(ctx) -> None:
    from leafe.methods.leafe.explore import run_explore_stage

    run_explore_stage(ctx)


def _run_distill(ctx) -> None:
    from leafe.methods.leafe.distill import run_distill_stage

    run_distill_stage(ctx)


#: The config fields each stage's result depends on (its key). `batch_tasks` is execution
#: only (samples are seeded per episode and step, not per batch). Distillation depends on the
#: exploration through the explore stage's key. Independent sampling depends on nothing but
#: the attempt budget (and the policy, env, budget and seed, as every stage): no reflection
#: field and no reflector re-run it.
EXPLORE_FIELDS = ("explore_mode", "reflect_every", "periodic_stops_attempt", "max_depth", "branches_per_node",
                  "max_attempts", "experience_scope", "experience_template", "reflection", "rollback",
                  "use_experience")
INDEPENDENT_FIELDS = ("explore_mode", "max_attempts")
DISTILL_FIELDS = ("counterfactual", "only_successful", "cf_per_task", "rehearsal_fraction", "beta",
                  "target", "train")


class LeafeMethod(Method):
    Config = LeafeConfig

    def check(self, instance, config, spec):
        # the oracle's answer is a function of the trajectory: n samples would be n equal branches
        if (config.explore_mode == "leafe" and config.branches_per_node > 1
                and spec.for_method(instance).spec.is_oracle("reflector")):
            return [(("branches_per_node",), "the oracle reflector (models.reflector: oracle) gives one answer per "
                     "trajectory, so more than one branch per reflection point would repeat it; set "
                     "branches_per_node: 1")]
        return []

    def stages(self, instance, config, spec):
        # The reflector's hint is `reflection.hints` (a config field of the key) or the shared
        # `env.reflection_hint` (in every stage's key when `env.share_hint` is on); an unshared
        # preset hint reaches no prompt and keys nothing.
        # Versions: explore 2 (reflection must name a step on failure with retries, periodic
        # branches no longer stop the attempt, lessons, native restores); distill 3
        # (counterfactual eligibility requires the revised step on the successful trajectory,
        # same-action branches excluded). distill 2: β as a loss weight (was duplication).
        # Independent sampling's trees and datasets are unchanged by these (no branches): its
        # stages keep their versions, so its results are reused.
        if config.explore_mode == "independent":
            explore = StageDef("explore", run=_run_explore, config_fields=INDEPENDENT_FIELDS, generates="policy")
            distill_version = 2
        else:
            explore = StageDef("explore", run=_run_explore, roles=("reflector",), config_fields=EXPLORE_FIELDS,
                               generates="policy", version=2)
            distill_version = 3
        return [explore,
                StageDef("distill", run=_run_distill, produces_checkpoint=True, config_fields=DISTILL_FIELDS,
                         version=distill_version)]
