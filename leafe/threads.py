"""CPU threads of torch in leafe's processes (`runtime.threads`).

torch's own default, one intra-op thread per physical core, suits a machine nobody else uses.
Next to another job its threads spin waiting for one another while the other job holds a core:
measured on a 2-core machine, the quickstart's base evaluation took 469 s next to another job
against 95 s alone (issue 17). `runtime.threads` sets the threads of every leafe process that
runs torch: the `leafe run` process (generation, evaluation, GRPO, in-process training) and the
processes of a training job under `accelerate launch`, which share it (threads // processes
each, at least 1). Environment workers load no torch; inference servers leafe starts (`runtime.
generation`) keep their own settings.

The rule for `threads: null` (`resolve`): the environment's `OMP_NUM_THREADS` when it is set (a
scheduler's or the user's choice); otherwise half the usable cores, at least 1, where usable is
the fewest of: physical cores among the CPUs this process may run on, those CPUs
(`os.sched_getaffinity`), and the cgroup's CPU quota. Half leaves room for a neighbour's job and
for leafe's own other work (environment workers, tokenisers); see `benchmarks/threads.py`.

How, never what: the setting is outside every stage key, like the rest of `runtime`. This module
imports torch only in `apply`, so `leafe validate` and `leafe plan` stay light.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Set for launched training processes, so their OpenMP/MKL pools start at the same size."""


@dataclass(frozen=True)
class Threads:
    threads: int
    """Intra-op threads of a leafe process."""
    source: str
    """`runtime.threads`, `OMP_NUM_THREADS`, `rule` (half the usable cores), or `launch job` (a
    launched training process: its share of the run's threads)."""
    usable_cores: int
    setting: int | None
    """The spec's `runtime.threads` (None: the rule)."""

    def describe(self) -> str:
        if self.source == "runtime.threads":
            return f"{self.threads} (runtime.threads)"
        if self.source == "OMP_NUM_THREADS":
            return f"{self.threads} (OMP_NUM_THREADS in the environment; runtime.threads unset)"
        return f"{self.threads} (half of {self.usable_cores} usable cores; set runtime.threads to change)"


def affinity() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _physical_cores(cpus: set[int], text: str | None = None) -> int | None:
    """Distinct (package, core) pairs among `cpus` (Linux /proc/cpuinfo, or `text`); None when unknown."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    cores = set()
    for block in text.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "processor" not in fields or "core id" not in fields:
            continue
        if int(fields["processor"]) in cpus:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def _cgroup_quota() -> int | None:
    """CPUs the cgroup's quota allows (rounded up); None when unlimited or unknown."""
    try:  # cgroup v2
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process can use: physical cores among its CPUs, its CPUs, the cgroup quota."""
    cpus = affinity()
    counts = [len(cpus) or 1]
    for extra in (_physical_cores(cpus), _cgroup_quota()):
        if extra is not None:
            counts.append(extra)
    return max(1, min(counts))


def _env_threads(environ: Mapping[str, str]) -> int | None:
    value = environ.get("OMP_NUM_THREADS", "").strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 1 else None


def resolve(setting: int | None, environ: Mapping[str, str] | None = None, cores: int | None = None) -> Threads:
    """The threads a leafe process uses under `runtime.threads = setting` (see the module)."""
    environ = os.environ if environ is None else environ
    cores = usable_cores() if cores is None else cores
    if setting is not None:
        return Threads(setting, "runtime.threads", cores, setting)
    env = _env_threads(environ)
    if env is not None:
        return Threads(env, "OMP_NUM_THREADS", cores, None)
    return Threads(max(1, cores // 2), "rule", cores, None)


def per_process(threads: int, processes: int) -> int:
    """Each process's share when `processes` processes (a launched training job) share `threads`."""
    return max(1, threads // max(1, processes))


def child_env(threads: int) -> dict[str, str]:
    """Environment variables that start a child process's OpenMP/MKL pools at `threads`."""
    return {name: str(threads) for name in ENV_VARS}


_applied: dict[str, Any] | None = None


def applied() -> dict[str, Any] | None:
    """What the last `apply` in this process set (None: none yet); the run manifest records it."""
    return None if _applied is None else dict(_applied)


def apply(resolved: Threads) -> dict[str, Any]:
    """Set torch's intra-op threads (and its inter-op threads where torch still allows: before
    any parallel work of the process); return what torch now uses."""
    global _applied
    import torch

    torch.set_num_threads(resolved.threads)
    try:
        torch.set_num_interop_threads(resolved.threads)
    except RuntimeError:  # parallel work already started, or set before: torch allows it once
        pass
    _applied = {**asdict(resolved), "torch_intra_op": torch.get_num_threads(),
                "torch_inter_op": torch.get_num_interop_threads()}
    return dict(_applied)


@contextmanager
def using(resolved: Threads) -> Iterator[dict[str, Any]]:
    """`apply` for the duration of a block, then torch's previous intra-op threads again (a
    library caller of `leafe.runner.run` keeps its own setting)."""
    import torch

    before = torch.get_num_threads()
    record = apply(resolved)
    try:
        yield record
    finally:
        torch.set_num_threads(before)
