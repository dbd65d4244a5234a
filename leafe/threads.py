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
scheduler's or the user's choice); otherwise `auto`: the usable cores that other processes leave
free, at least 1, looked at again every `ADAPT_EVERY_S` seconds while stages run (before each
generation call and each optimizer step), so a neighbour that starts or stops later moves it.
Usable is the fewest of: physical cores among the CPUs this process may run on, those CPUs
(`os.sched_getaffinity`), and the cgroup's CPU quota. Free is usable minus the cores that other
processes kept busy over the last window (`CpuMeter`: /proc/stat on this process's CPUs, or the
cgroup's own usage when its quota is what limits; this process's own time left out), rounded, so
a neighbour using more than half a core takes one. Measured on 2 cores (benchmarks/threads.py):
idle, 2 threads train SmolLM2 in about 0.55x the time of 1; next to one busy process, 2 threads
take 3-10x the time of 1. A fixed half of the cores (this module's earlier rule) paid the first
cost on every idle machine to avoid the second.

How, never what: the setting is outside every stage key, like the rest of `runtime`. This module
imports torch only in `apply`, so `leafe validate` and `leafe plan` stay light.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

ADAPT_EVERY_S = 5.0
"""How often (at most) an `auto` process looks again at what the other processes use."""

FIRST_LOOK_S = 0.2
"""The window of the first look, when a run starts."""

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Set for launched training processes, so their OpenMP/MKL pools start at the same size."""


@dataclass(frozen=True)
class Threads:
    threads: int
    """Intra-op threads of a leafe process (`auto`: the most it takes, the usable cores)."""
    source: str
    """`runtime.threads`, `OMP_NUM_THREADS`, `auto` (the free usable cores, looked at again while
    stages run), or `launch job` (a launched training process: its share of the run's threads)."""
    usable_cores: int
    setting: int | None
    """The spec's `runtime.threads` (None: the rule)."""

    def describe(self) -> str:
        if self.source == "runtime.threads":
            return f"{self.threads} (runtime.threads)"
        if self.source == "OMP_NUM_THREADS":
            return f"{self.threads} (OMP_NUM_THREADS in the environment; runtime.threads unset)"
        return (f"auto, at most {self.usable_cores} (the usable cores other processes leave free, looked at "
                f"every {ADAPT_EVERY_S:g} s; set runtime.threads to fix it)")


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
    """The threads a leafe process uses under `runtime.threads = setting` (see the module);
    `auto` is measured when applied (`apply`, `now`)."""
    environ = os.environ if environ is None else environ
    cores = usable_cores() if cores is None else cores
    if setting is not None:
        return Threads(setting, "runtime.threads", cores, setting)
    env = _env_threads(environ)
    if env is not None:
        return Threads(env, "OMP_NUM_THREADS", cores, None)
    return Threads(cores, "auto", cores, None)


def free_threads(usable: int, others: float) -> int:
    """Threads for `usable` cores of which other processes keep `others` busy: the free cores,
    rounded (a neighbour using more than half a core takes one), at least 1."""
    return max(1, min(usable, math.floor(usable - others + 0.5)))


def _cgroup_usage_s() -> float | None:
    """CPU seconds the cgroup (v2) has used, or None."""
    try:
        for line in Path("/sys/fs/cgroup/cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
    except (OSError, ValueError):
        pass
    return None


def _proc_stat_busy_s(cpus: set[int], text: str | None = None) -> float | None:
    """Busy CPU seconds (user, nice, system, irq, softirq, steal) of `cpus` since boot, from
    /proc/stat (or `text`); None when unknown. Steal counts: the hypervisor gave the core to
    someone else."""
    try:
        text = Path("/proc/stat").read_text() if text is None else text
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy, seen = 0, False
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in fields[:8]] + [0] * (8 - len(fields[:8]))
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        seen = True
    return busy / tick if seen else None


class CpuMeter:
    """CPU time that other processes spent where this one runs, between two readings: the
    cgroup's usage when its quota is what limits this process's cores, else /proc/stat over the
    CPUs this process may run on; this process's own time (all its threads) left out."""

    def __init__(self) -> None:
        cpus = affinity()
        quota = _cgroup_quota()
        use_cgroup = quota is not None and quota < len(cpus) and _cgroup_usage_s() is not None
        self._busy = _cgroup_usage_s if use_cgroup else (lambda: _proc_stat_busy_s(cpus))
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        busy = self._busy()
        if busy is None:
            return None
        t = os.times()
        return time.monotonic(), busy, t.user + t.system

    def others(self) -> float | None:
        """Cores the other processes kept busy on average since the last reading (or since the
        meter was made); None when unknown or when no time has passed."""
        now, last = self._read(), self._last
        if now is None or last is None or now[0] - last[0] <= 0:
            return None
        self._last = now
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0]))


def now(resolved: Threads) -> int:
    """The threads `resolved` means right now: `auto` looks at the other processes for
    `FIRST_LOOK_S` (e.g. for a launched training job's share)."""
    if resolved.source != "auto":
        return resolved.threads
    meter = CpuMeter()
    time.sleep(FIRST_LOOK_S)
    others = meter.others()
    return resolved.usable_cores if others is None else free_threads(resolved.usable_cores, others)


def per_process(threads: int, processes: int) -> int:
    """Each process's share when `processes` processes (a launched training job) share `threads`."""
    return max(1, threads // max(1, processes))


def child_env(threads: int) -> dict[str, str]:
    """Environment variables that start a child process's OpenMP/MKL pools at `threads`."""
    return {name: str(threads) for name in ENV_VARS}


_applied: dict[str, Any] | None = None
_auto: "_Auto | None" = None


class _Auto:
    """The `auto` setting while it is applied: when `adapt` last looked, and what it saw."""

    def __init__(self, usable: int, meter: CpuMeter) -> None:
        self.usable = usable
        self.meter = meter
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.changes = 0


def applied() -> dict[str, Any] | None:
    """What the last `apply` in this process set (None: none yet); the run manifest records it."""
    return None if _applied is None else dict(_applied)


def apply(resolved: Threads) -> dict[str, Any]:
    """Set torch's intra-op threads (and its inter-op threads where torch still allows: before
    any parallel work of the process); return what torch now uses. `auto`: the free cores now,
    looked at again by `adapt`."""
    global _applied, _auto
    import torch

    n, others = resolved.threads, None
    _auto = None
    if resolved.source == "auto":
        meter = CpuMeter()
        time.sleep(FIRST_LOOK_S)
        others = meter.others()
        n = resolved.usable_cores if others is None else free_threads(resolved.usable_cores, others)
        _auto = _Auto(resolved.usable_cores, meter)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # parallel work already started, or set before: torch allows it once
        pass
    _applied = {**asdict(resolved), "threads": n, "torch_intra_op": torch.get_num_threads(),
                "torch_inter_op": torch.get_num_interop_threads()}
    if others is not None:
        _applied["others_busy_cores"] = round(others, 2)
    return dict(_applied)


def adapt() -> int | None:
    """Under `auto`, at most every `ADAPT_EVERY_S` seconds: set torch's intra-op threads to the
    cores the other processes left free since the last look. Cheap otherwise (a clock read);
    called before each generation call and optimizer step. Returns the threads set, or None."""
    auto = _auto
    if auto is None or time.monotonic() - auto.last < ADAPT_EVERY_S:
        return None
    if not auto.lock.acquire(blocking=False):
        return None
    try:
        import torch

        auto.last = time.monotonic()
        others = auto.meter.others()
        if others is None:
            return None
        n = free_threads(auto.usable, others)
        if n != torch.get_num_threads():
            log.debug("torch threads %d -> %d (other processes kept %.2f cores busy)",
                      torch.get_num_threads(), n, others)
            torch.set_num_threads(n)
            auto.changes += 1
        return n
    finally:
        auto.lock.release()


def trainer_callback():
    """A transformers TrainerCallback that calls `adapt` before each optimizer step."""
    from transformers import TrainerCallback

    class AdaptThreads(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            adapt()

    return AdaptThreads()


@contextmanager
def using(resolved: Threads) -> Iterator[dict[str, Any]]:
    """`apply` for the duration of a block, then torch's previous intra-op threads again (a
    library caller of `leafe.runner.run` keeps its own setting) and no more adapting."""
    global _auto
    import torch

    before = torch.get_num_threads()
    record = apply(resolved)
    try:
        yield record
    finally:
        _auto = None
        torch.set_num_threads(before)
