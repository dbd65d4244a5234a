"""Environment workers as Ray actors (`runtime.engine: ray`): the same records as local
workers and in-process environments; a killed actor, a hung actor and a killed node cost a
chunk re-run, never a lost or duplicated record. Ray runs here as a private local instance or
a two-node cluster on this machine (ray.cluster_utils), with a private RAY_TMPDIR."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from leafe import envs  # noqa: E402
from leafe.envs.ray_pool import RayPool  # noqa: E402
from leafe.errors import EnvWorkerError  # noqa: E402
from leafe.spec.schema import RaySpec  # noqa: E402
from test_workers import (FAULT_ONCE, OPTS, check_once, key, run_eval_scripted, run_spec,  # noqa: E402,F401
                          same_metrics, scripted_reference)


@pytest.fixture(autouse=True)
def private_ray(tmp_path_factory, monkeypatch):
    """A private temp dir per test (a stale cluster file elsewhere cannot redirect ray.init),
    and the test doubles importable in the actors (they inherit PYTHONPATH)."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_ray_env_matches_the_in_process_env():
    ref = envs.make("sokoban", **OPTS)
    task = ref.tasks("test")[0]
    with RayPool("sokoban", OPTS, n=2, timeout=60, ray_spec=RaySpec(num_cpus=2)) as pool:
        pool.wait_ready()
        env = pool.make()
        assert env.tasks("test") == ref.tasks("test") and env.expert(task) == ref.expert(task)
        assert env.reset(task).text == ref.reset(task).text
        for a in ["up", "left", "jump", "down"]:
            env.submit_step(a)
            got, want = env.collect_step(), ref.step(a)
            assert (got.observation.text, got.reward, got.done, got.valid) == \
                (want.observation.text, want.reward, want.done, want.valid)
        snap = env.snapshot()
        after = env.step("right").observation.text
        env.restore(snap)
        assert env.step("right").observation.text == after and env.actions == ref.actions + ["right"]
        with pytest.raises(ValueError):  # the environment's own exception, raised again here
            env.reset("no-such-task")
        assert env.reset(task).text == ref.reset(task).text  # the actor survived it
    assert not ray.is_initialized()  # the pool's private instance is stopped


def test_a_killed_actor_raises_and_is_replaced():
    with RayPool("sokoban", OPTS, n=2, timeout=60, ray_spec=RaySpec(num_cpus=2)) as pool:
        a, b = pool.make(), pool.make()
        task = a.tasks("test")[0]
        a.reset(task)
        b.reset(task)
        ray.kill(a._slot.actor)
        deadline = time.monotonic() + 30  # ray.kill is asynchronous: wait until the actor is gone
        while time.monotonic() < deadline:
            try:
                ray.get(a._slot.actor.ping.remote(), timeout=5)
            except Exception:
                break
            time.sleep(0.1)
        with pytest.raises(EnvWorkerError, match="died"):
            a.step("up")
        with pytest.raises(EnvWorkerError, match="replaced"):
            a.step("up")  # its state is gone for good
        assert b.step("up").observation.text  # the other actor is untouched
        assert pool.restarts == 1
        c = pool.make()
        assert c.reset(task).text == envs.make("sokoban", **OPTS).reset(task).text


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_eval_on_ray_reruns_the_chunk_of_a_killed_or_hung_actor(tmp_path, scripted_reference, monkeypatch, fault):
    marker = tmp_path / "faulted"
    recs, metrics, out = run_eval_scripted(tmp_path, [
        "runtime.env_workers.count=2", "runtime.engine=ray", "runtime.ray.num_cpus=2", "runtime.env_workers.step_timeout_s=6",
        f"env.options.fault={fault}", *FAULT_ONCE, f"env.options.marker={marker}"], monkeypatch)
    assert marker.exists()
    check_once(recs)
    ref_recs, ref_metrics = scripted_reference
    assert sorted(recs, key=key) == sorted(ref_recs, key=key)
    assert metrics["env_errors"] == 1 and metrics["chunk_retries"] == 1 and same_metrics(metrics, ref_metrics)
    assert ("died" if fault == "kill" else "did not answer within 6 s") in out


def test_same_spec_and_seed_local_and_ray_give_identical_records(tmp_path, leafe_cache):
    local = run_spec(tmp_path / "local", ["runtime.env_workers.count=2"])
    on_ray = run_spec(tmp_path / "ray", ["runtime.env_workers.count=2", "runtime.engine=ray", "runtime.ray.num_cpus=2"])
    check_once(on_ray[0])
    assert sorted(on_ray[0], key=key) == sorted(local[0], key=key)
    assert same_metrics(on_ray[1], local[1]) and on_ray[1]["env_errors"] == 0


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def test_two_node_cluster_survives_a_killed_node(tmp_path, scripted_reference, monkeypatch):
    """Actors spread over two worker nodes; the node of the actor that hangs is killed while
    the run waits on it: the death is seen long before the step timeout, the chunk re-runs on
    the surviving node, and the records equal the reference."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, resources={"envnode": 4}) for _ in range(2)]
    cluster.wait_for_nodes()
    marker = tmp_path / "faulted"
    killed: list = []

    def kill_the_hung_node():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (marker.exists() and marker.read_text()):
            time.sleep(0.1)
        pid = int(marker.read_text())
        for node in nodes:
            raylet = node.all_processes["raylet"][0].process.pid
            if raylet in _ancestors(pid):
                cluster.remove_node(node, allow_graceful=False)
                killed.append(node)
                return

    t = threading.Thread(target=kill_the_hung_node, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        recs, metrics, out = run_eval_scripted(tmp_path, [
            "runtime.env_workers.count=2", "runtime.engine=ray", f"runtime.ray.address={cluster.address}",
            "runtime.env_workers.resources={envnode: 1}", "runtime.env_workers.step_timeout_s=90", "runtime.env_workers.episode_retries=4",
            "env.options.fault=hang", *FAULT_ONCE, f"env.options.marker={marker}"], monkeypatch)
        elapsed = time.monotonic() - t0
        t.join(5)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert killed, "the hung actor's node was not found"
    assert elapsed < 90  # seen as a dead actor, not as a timeout
    check_once(recs)
    ref_recs, ref_metrics = scripted_reference
    assert sorted(recs, key=key) == sorted(ref_recs, key=key)
    # A replacement actor may still be placed on the killed node before Ray has declared it
    # dead (seen in CI): it fails too and the chunk runs once more. Every failure was retried.
    assert 1 <= metrics["env_errors"] == metrics["chunk_retries"] <= 4 and metrics["errored"] == 0
    assert same_metrics(metrics, ref_metrics)
    assert "died" in out
