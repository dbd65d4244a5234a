"""The policy's generation on inference servers (`runtime.generation`).

Rollouts and evaluation can send the policy's requests to OpenAI-compatible servers instead of
generating in the `leafe run` process: vLLM (`vllm serve`), or any other server speaking the
OpenAI API (SGLang, `transformers serve`, ...). Requests are spread over the servers by
litellm's Router through the `litellm` backend (leafe's retry policy around every request), so
nothing here speaks HTTP except the health check of the servers leafe starts.

Two ways to get servers:

- `launch: external`: the servers at `servers` are running already and serve the spec's policy.
  Stages that generate with the untrained policy use them; a stage whose policy is a trained
  checkpoint (not on those servers) generates in process with the policy's own backend, and
  `leafe plan` lists which stage generates where (`site`).
- `launch: managed`: for every stage that generates with the policy, leafe starts
  `num_servers` servers serving that stage's policy (the upstream checkpoint, or the spec's
  model), each on `tensor_parallel_size` GPUs of `gpus` (its own `CUDA_VISIBLE_DEVICES`) and
  port `port + i`, waits for their `/health`, and stops them (process group, TERM then KILL)
  when the stage's models are closed. Their output goes to `<stage dir>/servers/server-i.log`.
  The served model's name is its local path (the name the servers answer to).

GRPO is the exception: its rollouts must come from the weights being trained, so it uses TRL's
server mode (`trl vllm-serve`, which receives the weights after every update over NCCL): a
managed run starts one such server from the stage's start checkpoint; an external one uses
`grpo_server`. Several replicas are not possible there (TRL connects to one server).

The default commands (placeholders `{model}`, `{host}`, `{port}`, `{tp}`, `{seed}`, replaced
in each argument; anything else is passed as written):
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from leafe.errors import UserError
from leafe.models.base import ChatModel, Completion, Conversation, Sampling

VLLM_COMMAND = ["vllm", "serve", "{model}", "--host", "{host}", "--port", "{port}",
                "--tensor-parallel-size", "{tp}", "--seed", "{seed}"]
TRL_COMMAND = ["trl", "vllm-serve", "--model", "{model}", "--host", "{host}", "--port", "{port}",
               "--tensor-parallel-size", "{tp}"]
__doc__ += f"\n    vLLM:  {' '.join(VLLM_COMMAND)}\n    GRPO:  {' '.join(TRL_COMMAND)}\n"

#: Seconds servers get to exit after SIGTERM before they are killed.
STOP_GRACE = 30.0
PLACEHOLDERS = ("model", "host", "port", "tp", "seed")


@dataclass
class ServerLaunch:
    """One server leafe starts: its command, GPUs and addresses."""

    argv: list[str]
    gpus: list[int] | None
    """CUDA_VISIBLE_DEVICES of the server (None: inherited)."""
    host: str
    port: int
    openai: bool = True
    """The server speaks the OpenAI API under /v1 (TRL's server: its client adds the paths)."""

    @property
    def base(self) -> str:
        """http://host:port"""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL clients use: `base/v1` for the OpenAI API, `base` for TRL's client."""
        return self.base + "/v1" if self.openai else self.base


def fill(template: list[str], values: dict[str, Any]) -> list[str]:
    """`template` with each `{name}` of PLACEHOLDERS replaced (no other brace is touched, so JSON
    arguments pass unchanged)."""
    out = []
    for arg in template:
        for k in PLACEHOLDERS:
            arg = arg.replace("{" + k + "}", str(values[k]))
        out.append(arg)
    return out


def launch_plan(gen: Any, model: str, seed: int | str, grpo: bool = False) -> list[ServerLaunch]:
    """The servers a managed stage starts (`gen`: the spec's `runtime.generation`): `num_servers`
    of them (one for GRPO), server i on port `port + i` with GPUs
    `gpus[i*tp:(i+1)*tp]` (default 0, 1, ...)."""
    n = 1 if grpo else gen.num_servers
    tp = gen.tensor_parallel_size
    gpus = list(gen.gpus) if gen.gpus is not None else list(range(gen.num_servers * tp))
    template = TRL_COMMAND if grpo else (list(gen.command) if gen.command else VLLM_COMMAND)
    plans = []
    for i in range(n):
        port = gen.port + i
        argv = fill(template, {"model": model, "host": gen.host, "port": port, "tp": tp, "seed": seed})
        mine = gpus[i * tp:(i + 1) * tp]
        plans.append(ServerLaunch(argv + list(gen.extra_args), mine or None, gen.host, port, openai=not grpo))
    return plans


# Linux: the server gets SIGTERM when `leafe run` dies (even by SIGKILL), so no server outlives
# its run holding GPUs. A tiny Python sets PR_SET_PDEATHSIG (1), which survives exec, then execs
# the server: no preexec_fn, which is unsafe in a process with threads.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "try:\n    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\nexcept OSError:\n    pass\n"
                    "os.execvp(sys.argv[1], sys.argv[1:])")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class ManagedServers:
    """Servers started for one stage: `start()` launches them and waits for `/health`, `close()`
    stops them (also at exit)."""

    def __init__(self, launches: list[ServerLaunch], log_dir: Path, startup_timeout: float):
        self.launches = launches
        self.log_dir = Path(log_dir)
        self.startup_timeout = startup_timeout
        self.procs: list[subprocess.Popen] = []
        self.seconds_to_ready: float | None = None

    def __enter__(self) -> "ManagedServers":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.launches]

    def _log(self, i: int) -> Path:
        return self.log_dir / f"server-{i}.log"

    def _tail(self, i: int, lines: int = 15) -> str:
        try:
            text = self._log(i).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for s in self.launches:
            if not _port_free(s.host, s.port):
                raise UserError(f"runtime.generation: port {s.port} on {s.host} is in use; stop what listens "
                                "there or set runtime.generation.port to a free range")
        atexit.register(self.close)
        t0 = time.monotonic()
        try:
            for i, s in enumerate(self.launches):
                env = dict(os.environ)
                if s.gpus is not None:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, s.gpus))
                with open(self._log(i), "ab") as log:
                    log.write(f"$ {' '.join(s.argv)}\n".encode())
                    log.flush()
                    if shutil.which(s.argv[0], path=env.get("PATH")) is None:
                        raise UserError(f"runtime.generation: cannot start `{s.argv[0]}` (not found on PATH); "
                                        "install the server (`pip install vllm`) or set "
                                        "runtime.generation.command")
                    proc = subprocess.Popen([sys.executable, "-c", _DIE_WITH_PARENT, *s.argv], stdout=log,
                                            stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
                self.procs.append(proc)
            self._wait_healthy(t0)
        except BaseException:
            self.close()
            raise
        self.seconds_to_ready = round(time.monotonic() - t0, 1)

    def _wait_healthy(self, t0: float) -> None:
        import httpx

        pending = set(range(len(self.launches)))
        with httpx.Client(timeout=5.0, follow_redirects=True, trust_env=False) as client:
            while pending:
                for i in sorted(pending):
                    code = self.procs[i].poll()
                    if code is not None:
                        raise UserError(f"runtime.generation: server {i} (`{' '.join(self.launches[i].argv)}`) "
                                        f"exited with code {code} before it was ready; the end of its log "
                                        f"({self._log(i)}):\n{self._tail(i)}")
                    try:
                        if client.get(self.launches[i].base + "/health").status_code == 200:
                            pending.discard(i)
                    except httpx.HTTPError:
                        pass
                if not pending:
                    return
                if time.monotonic() - t0 > self.startup_timeout:
                    i = min(pending)
                    raise UserError(f"runtime.generation: server {i} did not answer {self.launches[i].base}/health "
                                    f"within {self.startup_timeout:g} s (startup_timeout_s); the end of its log "
                                    f"({self._log(i)}):\n{self._tail(i)}")
                time.sleep(0.5)

    def close(self) -> None:
        atexit.unregister(self.close)
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for p in self.procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # the group: whatever the server started too
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5.0)
        self.procs = []


def site(gen: Any, generates: str, trained_start: bool) -> str:
    """Where a stage generates: `servers` (the generation block's OpenAI servers), `trl-server`
    (GRPO on TRL's vLLM server) or `in-process` (the policy's own backend). `generates` is the
    stage's StageDef.generates; `trained_start`: its policy is a trained checkpoint."""
    if gen.backend == "local" or generates == "none":
        return "in-process"
    if generates == "trained":
        ok = gen.backend == "vllm" and (gen.launch == "managed" or gen.grpo_server)
        return "trl-server" if ok else "in-process"
    if gen.launch == "managed" or (gen.servers and not trained_start):
        return "servers"
    return "in-process"


def describe(gen: Any, stages: list[Any]) -> list[str]:
    """What `leafe plan` says about `runtime.generation` for a plan's `stages`: the servers (their
    commands and GPUs when managed), then where each generating stage generates."""
    from leafe.plan import start_checkpoint

    if gen.backend == "local":
        return []
    grpo = any(s.generates == "trained" for s in stages)
    if gen.launch == "external":
        lines = [f"policy generation: external {gen.backend} servers "
                 f"{', '.join(gen.servers or []) or '(none)'} (serving {gen.served_model_name or 'models.policy.name'})"]
        if grpo and gen.grpo_server:
            lines.append(f"GRPO stages generate on TRL's vLLM server at {gen.grpo_server}")
    else:
        lines = []
        for i, s in enumerate(launch_plan(gen, "<checkpoint>", "<stage seed>")):
            gpus = ",".join(map(str, s.gpus)) if s.gpus else "inherited"
            lines.append(f"policy generation, server {i} (per stage; GPUs {gpus}): {' '.join(s.argv)}")
        if grpo and gen.backend == "vllm":
            s = launch_plan(gen, "<start checkpoint>", "<stage seed>", grpo=True)[0]
            gpus = ",".join(map(str, s.gpus)) if s.gpus else "inherited"
            lines.append(f"GRPO stages (TRL server mode; GPUs {gpus}): {' '.join(s.argv)}")
    by: dict[str, list[str]] = {}
    for s in stages:
        if s.generates != "none":
            by.setdefault(site(gen, s.generates, start_checkpoint(stages, s) is not None), []).append(s.id)
    names = {"servers": "on the servers", "trl-server": "on TRL's vLLM server",
             "in-process": "in process (policy backend)"}
    return lines + [f"  generates {names[k]}: {', '.join(v)}" for k, v in by.items()]


def client_spec(policy: Any, gen: Any, urls: list[str], name: str) -> Any:
    """The litellm model spec that sends the policy's requests to `urls`: the policy's sampling
    defaults, the servers' model name, the generation block's concurrency and timeout."""
    from leafe.spec.schema import LiteLLMModelSpec

    prefix = "hosted_vllm" if gen.backend == "vllm" else "openai"
    replicas = {"api_bases": list(urls)} if len(urls) > 1 else {"api_base": urls[0]}
    return LiteLLMModelSpec(
        backend="litellm", name=f"{prefix}/{name}", temperature=policy.temperature, top_p=policy.top_p,
        max_tokens=policy.max_tokens, batch_size=policy.batch_size, concurrency=gen.concurrency,
        timeout=gen.timeout_s, **replicas)


class ServedPolicy(ChatModel):
    """The policy generating on servers: a litellm client over them, plus the servers leafe
    started for it (stopped by `close`)."""

    def __init__(self, client: ChatModel, servers: ManagedServers | None, served: dict[str, Any]):
        self.client, self.servers, self.served = client, servers, served

    def _generate(self, conversations: list[Conversation], sampling: Sampling,
                  seeds: list[int] | None) -> list[Completion]:
        return self.client._generate(conversations, sampling, seeds)

    def provenance(self) -> dict[str, Any]:
        prov = {**self.served, "client": self.client.provenance()}
        if self.servers is not None:
            prov["seconds_to_ready"] = self.servers.seconds_to_ready
        return prov

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.servers is not None:
                self.servers.close()


def server_key(gen: Any) -> str:
    """The API key sent to the servers: `api_key_env`'s value, else a placeholder (an OpenAI
    client refuses to send no key; servers started without one accept any)."""
    if gen.api_key_env is None:
        return "no-key"
    key = os.environ.get(gen.api_key_env)
    if not key:
        raise UserError(f"runtime.generation.api_key_env: the environment variable {gen.api_key_env} is not set "
                        "or empty; export the servers' API key")
    return key


def local_model_path(policy: Any, what: str) -> tuple[str, dict[str, Any]]:
    """The local directory of `policy`'s weights (resolved as the transformers backend does) and
    its provenance; an adapter on top cannot be served (checkpoints leafe writes are merged)."""
    from leafe.models.transformers import resolve_with_adapter

    path, prov, adapter, _ = resolve_with_adapter(policy.name, policy.revision, getattr(policy, "adapter", None))
    if adapter is not None:
        raise UserError(f"{what}: runtime.generation serves plain model directories; the policy has a "
                        f"LoRA adapter ({adapter}). Merge it into the model (or set generation.backend: local)")
    return path, prov


def serve_policy(ctx: Any, checkpoint: Path | None) -> ChatModel:
    """The stage's policy as a `ServedPolicy` (see the module docstring)."""
    from leafe import models
    from leafe.seeds import derive_seed

    gen = ctx.spec.runtime.generation
    policy = ctx.policy_spec(checkpoint)
    where = ctx.stage.id
    if site(gen, "policy", checkpoint is not None) != "servers":
        # external servers without this stage's weights: the policy's own backend, in process
        ctx.console.print(f"  {where} generates in process: its checkpoint is not on the external servers")
        return models.load(policy)
    if gen.launch == "external":
        name = gen.served_model_name or policy.name
        client = models.load(client_spec(policy, gen, list(gen.servers), name), api_key=server_key(gen))
        return ServedPolicy(client, None, {"backend": f"servers:{gen.backend}", "launch": "external",
                                           "model": name, "servers": list(gen.servers)})
    path, prov = local_model_path(policy, where)
    launches = launch_plan(gen, path, derive_seed(ctx.spec.seed, where, "servers"))
    servers = ManagedServers(launches, ctx.dir / "servers", gen.startup_timeout_s)
    ctx.console.print(f"  starting {len(launches)} {gen.backend} server(s) for {where}: {' '.join(launches[0].argv)}")
    servers.start()
    ctx.console.print(f"  servers ready in {servers.seconds_to_ready:g} s: {', '.join(servers.urls)}")
    try:
        client = models.load(client_spec(policy, gen, servers.urls, path), api_key=server_key(gen))
    except BaseException:
        servers.close()
        raise
    return ServedPolicy(client, servers, {"backend": f"servers:{gen.backend}", "launch": "managed", "model": path,
                                          "weights": prov, "servers": servers.urls,
                                          "commands": [s.argv for s in launches]})


@contextlib.contextmanager
def grpo_server(ctx: Any, model_path: str) -> Iterator[str | None]:
    """The TRL vLLM server GRPO generates on (its base URL), or None with `backend: local`.
    A managed one is started from `model_path` and stopped on exit."""
    gen = ctx.spec.runtime.generation
    if site(gen, "trained", True) != "trl-server":
        # TRL's server mode needs vLLM (`openai` servers cannot receive weights) and a server
        if gen.backend != "local":
            ctx.console.print(f"  {ctx.stage.id} generates in process (TRL's server mode needs backend: vllm and "
                              "a managed server or `grpo_server`)")
        yield None
        return
    if gen.launch == "external":
        yield gen.grpo_server.rstrip("/").removesuffix("/v1")
        return
    launches = launch_plan(gen, model_path, 0, grpo=True)
    ctx.console.print(f"  starting TRL's vLLM server for {ctx.stage.id}: {' '.join(launches[0].argv)}")
    with ManagedServers(launches, ctx.dir / "servers", gen.startup_timeout_s) as servers:
        ctx.console.print(f"  server ready in {servers.seconds_to_ready:g} s: {servers.urls[0]}")
        yield servers.urls[0]
