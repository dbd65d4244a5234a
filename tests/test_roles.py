"""Model roles and API backends through `leafe run`: the same spec with the reflector on the
policy or on litellm (against the loopback server serving the tiny model), and a run whose
API calls meet injected faults."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

pytest.importorskip("leafe.models.litellm", reason="needs the litellm extra (litellm, diskcache, tenacity)")

from leafe import methods, models  # noqa: E402
from leafe.methods.api import Method, MethodConfig, StageDef  # noqa: E402
from leafe.models.loopback import Fault, LoopbackServer  # noqa: E402
from leafe.plan import build_plan  # noqa: E402
from leafe.runner import run  # noqa: E402
from leafe.spec import load_spec  # noqa: E402
from leafe.spec.schema import TransformersModelSpec  # noqa: E402
from leafe.store import RecordLog, atomic_write_json  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")

KEY_ENV = "LEAFE_TEST_ROLES_KEY"


class ProbeConfig(MethodConfig):
    """A test method that asks the reflector about each train task's first observation."""


def run_probe(ctx) -> None:
    loaded = ctx.load_models(("policy", "reflector"))
    try:
        env = ctx.make_env()
        tasks = ctx.tasks("train")
        convs = []
        for t in tasks:
            obs = env.reset(t)
            convs.append([{"role": "user", "content": f"What went wrong here?\n{obs.text}"}])
        env.close()
        sampling = models.sampling_from(ctx.spec.role("reflector"), max_tokens=8)
        outs = loaded["reflector"].generate(convs, sampling, seeds=list(range(len(convs))))
        RecordLog(ctx.dir / "records.jsonl").append(
            [{"task": t, "text": c.text, "error": c.error} for t, c in zip(tasks, outs)])
        atomic_write_json(ctx.dir / "metrics.json", {"interactions": 0})
    finally:
        ctx.save_usage(loaded)
        for m in {id(m): m for m in loaded.values()}.values():
            m.close()


class ProbeMethod(Method):
    Config = ProbeConfig

    def stages(self, instance, config, spec):
        return [StageDef("probe", run=run_probe, roles=("reflector",))]


@pytest.fixture(scope="module", autouse=True)
def probe_method():
    methods.registry.register("probe", ProbeMethod)
    yield
    methods.registry._entries.pop("probe", None)
    methods.registry._loaded.pop("probe", None)


@pytest.fixture(scope="module")
def server(leafe_cache):
    tiny = models.load(TransformersModelSpec(name="leafe:tiny-qwen2"))
    with LoopbackServer(tiny) as srv:
        yield srv
    tiny.close()


@pytest.fixture(autouse=True)
def fresh(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-loopback")
    server.clear_faults()
    server.plan = None
    assert server.wait_idle(30)
    server.reset_counts()
    yield
    server.plan = None


BODY = """leafe: 1
name: roles
seed: 5
env: {use: sokoban, max_steps: 3, train_tasks: 3, test_tasks: 2}
methods:
  probe: {}
eval: {samples: 2, k: [1, 2], batch_size: 4}
report: {formats: [md, json]}
"""

POLICY = '  policy: {name: "leafe:tiny-qwen2", max_tokens: 6, temperature: 1.0}\n'


def litellm_role(server, **extra) -> str:
    fields = {"backend": "litellm", "name": "openai/loopback", "api_base": server.api_base,
              "api_key_env": KEY_ENV, "max_tokens": 6, "temperature": 1.0, "backoff": 0.02,
              "backoff_max": 0.2, **extra}
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}"


def do_run(tmp: Path, name: str, models_block: str, runs: Path) -> tuple[dict, str]:
    f = tmp / f"{name}.yaml"
    f.write_text(BODY + "models:\n" + models_block)
    loaded = load_spec(f)
    out = io.StringIO()
    run(loaded, runs, tmp / "reports", Console(file=out, width=200))
    return loaded, out.getvalue()


def test_reflector_swapped_to_litellm_by_the_models_block_alone(tmp_path, server):
    runs = tmp_path / "runs"
    a, _ = do_run(tmp_path, "a", POLICY + "  reflector: policy\n", runs)
    assert server.requests == 0
    b, out_b = do_run(tmp_path, "b", POLICY + f"  reflector: {litellm_role(server)}\n", runs)

    plan_a, plan_b = build_plan(a, runs), build_plan(b, runs)
    # same name, same runs dir: only the stage that uses the reflector differs
    assert plan_a.stage("probe.probe").hash != plan_b.stage("probe.probe").hash
    assert plan_a.stage("eval.probe").hash == plan_b.stage("eval.probe").hash
    assert "(cached:" in out_b and "eval.probe" in out_b.split("(cached:")[0].splitlines()[-1]

    prov_a = json.loads((plan_a.dir(plan_a.stage("probe.probe")) / "model.json").read_text())
    prov_b = json.loads((plan_b.dir(plan_b.stage("probe.probe")) / "model.json").read_text())
    assert prov_a["reflector"] == {"same_as": "policy"} and prov_a["policy"]["backend"] == "transformers"
    assert prov_b["reflector"]["backend"] == "litellm" and prov_b["reflector"]["api_base"] == server.api_base
    assert "sk-loopback" not in json.dumps(prov_b)

    # the reflector's questions went to the API, one request per train task, none to it before
    probe_b = RecordLog(plan_b.dir(plan_b.stage("probe.probe")) / "records.jsonl").read()
    assert len(probe_b) == 3 and all(r["error"] is None for r in probe_b)
    assert server.requests == 3 and server.counts["ok"] == 3
    usage_a = json.loads((plan_a.dir(plan_a.stage("probe.probe")) / "usage.json").read_text())
    usage_b = json.loads((plan_b.dir(plan_b.stage("probe.probe")) / "usage.json").read_text())
    assert usage_a["reflector"]["samples"] == 3 and usage_a["policy"]["samples"] == 0
    assert usage_b["reflector"]["samples"] == 3 and usage_b["reflector"]["prompt_tokens"] > 0


def test_a_run_under_injected_faults_records_every_sample_once(tmp_path, server):
    """The policy on litellm; transient faults (429 with Retry-After, 500, malformed JSON, a
    dropped connection, a reply slower than the timeout) are retried; one sample's requests all
    fail, so its episode is recorded once as an errored failure."""
    # requests 1-3 are the probe stage's (its reflector is the policy): no faults there
    transient = {5: Fault.rate_limit(retry_after=0.05), 7: Fault.server_error(), 9: Fault.malformed(),
                 11: Fault.drop(), 13: Fault.slow(2.5)}
    doomed: dict[str, int] = {}
    seen: set = set()

    def plan(n: int, body: dict) -> Fault | None:
        first_try = body.get("seed") not in seen
        seen.add(body.get("seed"))
        if n >= 15 and first_try and not doomed:  # a sample's first request: doom all its tries
            doomed["seed"] = body.get("seed")
        if doomed and body.get("seed") == doomed["seed"]:
            return Fault.server_error()
        return transient.get(n)

    server.plan = plan
    policy = f"  policy: {litellm_role(server, timeout=1.5, max_retries=2, concurrency=2)}\n"
    loaded, out = do_run(tmp_path, "faults", policy, tmp_path / "runs")
    assert server.wait_idle(30)
    plan_ = build_plan(loaded, tmp_path / "runs")
    d = plan_.dir(plan_.stage("eval.probe"))
    recs = RecordLog(d / "records.jsonl").read()
    episodes = [r for r in recs if r["kind"] == "episode"]
    steps = [r for r in recs if r["kind"] == "step"]
    # every (task, sample) exactly once; step keys unique
    assert sorted((e["task"], e["sample"]) for e in episodes) == sorted(
        {(e["task"], e["sample"]) for e in episodes}) and len(episodes) == 4
    assert len({(s["task"], s["sample"], s["step"]) for s in steps}) == len(steps)
    errored = [e for e in episodes if "error" in e]
    assert len(errored) == 1 and not errored[0]["success"] and "model:" in errored[0]["error"]
    assert [s for s in steps if s.get("error")][0]["retries"] == 2

    usage = json.loads((d / "usage.json").read_text())["policy"]
    assert usage["errors"] == 1 and usage["samples"] == len(steps)
    assert usage["retries"] == len(transient) + 2
    # nothing counted twice: each request is a sample's first try or one of its retries
    probe_requests = 3  # the probe stage's reflector is the policy: 3 more requests, no faults
    assert server.requests == usage["samples"] + usage["retries"] + probe_requests
    assert server.counts["rate_limit"] == 1 and server.counts["malformed"] == 1

    # visible: warnings in the run log and the console, counts in the metrics and the report
    log = (tmp_path / "runs" / "roles" / "leafe.log").read_text()
    assert log.count("WARNING leafe.models.litellm") == len(transient) + 2
    assert "attempt" in out
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["usage"]["policy"]["retries"] == len(transient) + 2
    md = (tmp_path / "reports" / "roles.md").read_text()
    assert f"{len(transient) + 2} retried request(s), 1 sample(s) failed after retries" in md
