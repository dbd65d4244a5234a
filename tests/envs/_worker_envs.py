"""Test doubles for tests/envs/test_workers.py: Sokoban variants that are slow, crash or hang.

A module of its own (not the test file) so that worker processes import only this; the test
puts this directory on sys.path, which the workers inherit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Literal

from leafe.envs.base import Observation, Step
from leafe.envs.sokoban import SokobanEnv


class SlowSokoban(SokobanEnv):
    """Sokoban whose every step sleeps `delay` seconds (a slow environment, without CPU)."""

    name = "slow-sokoban"

    class Options(SokobanEnv.Options):
        delay: float = 0.2
        """Seconds each step sleeps."""

    def _step(self, action: str) -> Step:
        time.sleep(self.options.delay)
        return super()._step(action)


class FaultySokoban(SokobanEnv):
    """Sokoban that kills its own process (`kill`) or hangs (`hang`) at step `fault_step` of
    task `fault_task`, once per `marker` file (created atomically by the first one to fault;
    no marker: every time). `child` starts a `sleep` child process (think: a JVM) whose pid
    the observations carry as `info["child_pid"]`."""

    name = "faulty-sokoban"

    class Options(SokobanEnv.Options):
        fault: Literal["none", "kill", "hang"] = "none"
        """What happens at the fault step."""
        fault_step: int = 1
        """Number of actions taken before the faulting step."""
        fault_task: str | None = None
        """Only this task faults (null: any)."""
        marker: str = ""
        """Fault only if this file does not exist yet (creating it); empty: always fault."""
        child: bool = False
        """Start a child process when built."""

    def __init__(self, options=None):
        super().__init__(options)
        self._child = subprocess.Popen(["sleep", "300"]) if self.options.child else None

    def _observation(self, feedback: str, **extra) -> Observation:
        obs = super()._observation(feedback, **extra)
        if self._child is not None:
            obs.info["child_pid"] = self._child.pid
        return obs

    def _should_fault(self) -> bool:
        o = self.options
        if o.fault == "none" or len(self._actions) != o.fault_step:
            return False
        if o.fault_task is not None and self._task_id != o.fault_task:
            return False
        if not o.marker:
            return True
        try:
            fd = os.open(o.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, str(os.getpid()).encode())  # which process faulted (its node, under Ray)
        os.close(fd)
        return True

    def _step(self, action: str) -> Step:
        if self._should_fault():
            if self.options.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
        return super()._step(action)

    def close(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child = None
