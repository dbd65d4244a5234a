"""Environment workers as Ray actors (`runtime.engine: ray`), behind the same interface as the
local `WorkerPool`: `pool.make()` returns an `Env` proxy with two-phase `submit_*`/`collect_*`
calls, so the agent loop steps the actors in parallel.

Failure policy is leafe's, not Ray's: actors are created with `max_restarts=0,
max_task_retries=0` (Ray's own task retries would replay a failed step on a fresh, un-reset
environment: wrong trajectories). An actor that dies (its process or its node) or does not
answer within `timeout` seconds is killed and replaced; the call raises `EnvWorkerError`, and
so does any later call on the other environments it hosted. The agent loop's callers then
re-run the affected episodes (`runtime.env_workers.episode_retries`), exactly as with local
workers.

Placement: actors ask for `runtime.env_workers.num_cpus` CPUs each (a fraction is fine) plus
its `resources`, spread over the cluster's nodes (`SPREAD`). Without `runtime.ray.address`
the pool starts a private local Ray instance (and stops it on close); with an address it joins
that cluster (`auto`, `ray://...` or `host:port`) and leaves it running.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

from leafe.envs.base import Env
from leafe.envs.workers import ProxyEnv, call_hosted, count_restart, place
from leafe.errors import EnvWorkerError, UserError


class _EnvHost:
    """The actor: hosts any number of environments of one adapter."""

    def __init__(self, name: str, target: str, options: dict):
        from leafe import envs

        envs.registry.register(name, target)  # plugin or test envs registered at run time
        self.name, self.options = name, options
        self.hosted: dict[int, Any] = {}

    def ping(self) -> int:
        return os.getpid()

    def new(self, eid: int) -> None:
        from leafe import envs

        try:
            self.hosted[eid] = envs.make(self.name, **self.options)
        except Exception as e:  # raised again by this environment's next call
            self.hosted[eid] = e

    def call(self, eid: int, method: str, args: tuple) -> Any:
        return call_hosted(self.hosted, eid, method, args, "environment actor")

    def close_env(self, eid: int) -> None:
        env = self.hosted.pop(eid, None)
        if isinstance(env, Env):
            env.close()


class _Slot:
    """One actor position of the pool; `gen` counts its replacements."""

    def __init__(self, pool: RayPool, index: int):
        self.pool, self.index, self.gen, self.live = pool, index, 0, 0
        self.actor = pool._spawn()

    def replace(self, reason: str) -> None:
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already dead
            pass
        self.gen += 1
        self.live = 0
        count_restart(self.pool, reason)
        self.actor = self.pool._spawn()


class RayPool:
    """`n` Ray actors hosting environments of one adapter (the local `WorkerPool`'s API)."""

    def __init__(self, env_name: str, options: dict[str, Any] | None = None, n: int = 1,
                 timeout: float = 120.0, ray_spec: Any = None, target: str | None = None,
                 num_cpus: float = 0.25, resources: dict[str, float] | None = None,
                 max_restarts: int | None = None, envs_per_worker: int | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("runtime.engine: ray needs the `ray` package: pip install 'leafe[ray]'") from None
        from leafe import envs

        if n < 1:
            raise ValueError(f"a Ray pool needs n >= 1 actors, got {n}")
        cls = envs.env_class(env_name)
        self.env_name, self.options, self.timeout = env_name, dict(options or {}), float(timeout)
        self.target = target or f"{cls.__module__}:{cls.__qualname__}"
        self.spec = ray_spec
        self.max_restarts, self.envs_per_worker = max_restarts, envs_per_worker
        self.restarts = 0
        self._closed = False
        self._own_ray = False
        if not ray.is_initialized():
            address = getattr(ray_spec, "address", None)
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if getattr(ray_spec, "runtime_env", None):
                kwargs["runtime_env"] = ray_spec.runtime_env
            if address is None:  # a private instance (`local` ignores any running cluster)
                ray.init(address="local", num_cpus=getattr(ray_spec, "num_cpus", None), **kwargs)
                self._own_ray = True
            else:
                ray.init(address=address, **kwargs)
        resources = dict(resources or {})
        self._actor_cls = ray.remote(num_cpus=num_cpus, resources=resources or None, max_restarts=0,
                                     max_task_retries=0, scheduling_strategy="SPREAD")(_EnvHost)
        self._next_eid = 0
        self._rr = 0
        atexit.register(self.close)
        self._slots = [_Slot(self, i) for i in range(n)]

    def _spawn(self):
        return self._actor_cls.remote(self.env_name, self.target, self.options)

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def n(self) -> int:
        return len(self._slots)

    def actors(self) -> list[Any]:
        """The current actor handles (they change when an actor is replaced)."""
        return [s.actor for s in self._slots]

    def wait_ready(self) -> None:
        """Block until every actor answers (replacing any that fails, then raising)."""
        for s in self._slots:
            self.get(s, s.gen, s.actor.ping.remote())

    def get(self, slot: _Slot, gen: int, ref: Any) -> Any:
        """The result of a call on `slot`'s actor; a dead or silent actor is replaced and the
        call raises EnvWorkerError."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, WorkerCrashedError

        if slot.gen != gen:
            raise EnvWorkerError(f"{self.env_name}: the Ray actor hosting this environment was replaced "
                                 "after a failure; the environment's state is gone")
        try:
            return ray.get(ref, timeout=self.timeout)
        except GetTimeoutError:
            slot.replace(f"Ray actor {slot.index} did not answer within {self.timeout:g} s")
            raise EnvWorkerError(f"{self.env_name}: Ray actor {slot.index} did not answer within "
                                 f"{self.timeout:g} s; killed and replaced") from None
        except (RayActorError, WorkerCrashedError) as e:
            slot.replace(f"Ray actor {slot.index} died ({type(e).__name__})")
            raise EnvWorkerError(f"{self.env_name}: Ray actor {slot.index} died ({type(e).__name__}); "
                                 "replaced") from None

    def make(self) -> RayEnv:
        """A new environment on the least loaded actor (round-robin among equals)."""
        if self._closed:
            raise RuntimeError("the Ray pool is closed")
        s = place(self, self._slots, lambda s: s.index)
        self._next_eid += 1
        return RayEnv(self, s, self._next_eid)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        import ray

        if not ray.is_initialized():
            return
        for s in self._slots:
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:
                pass
        if self._own_ray:
            ray.shutdown()


class RayEnv(ProxyEnv):
    """An environment hosted by a `RayPool` actor; every call is forwarded to it."""

    def __init__(self, pool: RayPool, slot: _Slot, eid: int):
        super().__init__(pool.env_name)
        self._pool, self._slot, self._gen, self._eid = pool, slot, slot.gen, eid
        slot.live += 1
        # not awaited: a failed construction is raised by the next call
        slot.actor.new.remote(eid)

    def _start(self, method: str, *args: Any) -> Any:
        if self._closed:
            raise RuntimeError(f"{self.name}: environment used after close()")
        if self._slot.gen != self._gen:
            raise EnvWorkerError(f"{self.name}: the Ray actor hosting this environment was replaced "
                                 "after a failure; the environment's state is gone")
        return self._slot.actor.call.remote(self._eid, method, args)

    def _finish(self, ref: Any) -> Any:
        return self._pool.get(self._slot, self._gen, ref)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gen != self._slot.gen or self._pool._closed:
            return  # its actor is gone, and the environment with it
        self._slot.live -= 1
        self._inflight = None
        try:
            self._slot.actor.close_env.remote(self._eid)  # fire and forget
        except Exception:
            pass
