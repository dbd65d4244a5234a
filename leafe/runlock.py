"""One `leafe run` at a time per run directory: an advisory lock on `runs/<name>/.lock`.

The holder writes who it is into the lock file (pid, host, start time, the stage it is running),
so `leafe plan` can say that a stage is in use and by which process instead of calling it
`partial`. Whether the lock is held is asked of the kernel (a non-blocking shared `flock`), never
read from the file alone: a run killed with SIGKILL leaves its last words there but no lock.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from leafe.errors import UserError

LOCK = ".lock"
#: how long a starting run retries a lock held for an instant (a `leafe plan` looking at it)
RETRY_S = 1.0


class RunLock:
    """The held lock of one run directory; `at_stage` records which stage runs now."""

    def __init__(self, f: IO[str], root: Path):
        self._f = f
        self.root = root
        self._info = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      "stage": None, "dir": None}
        self._write()

    def at_stage(self, stage_id: str | None, dirname: str | None) -> None:
        self._info.update(stage=stage_id, dir=dirname)
        self._write()

    def _write(self) -> None:
        try:
            self._f.seek(0)
            self._f.truncate()
            self._f.write(json.dumps(self._info) + "\n")
            self._f.flush()
        except OSError:  # who holds the lock is a courtesy to `leafe plan`; the lock itself holds
            pass


@contextmanager
def run_lock(root: Path) -> Iterator[RunLock]:
    """Hold `root`'s lock while the block runs; a `UserError` naming the holder when another
    `leafe run` has it. An OSError (a read-only directory, a full disk) is left to the caller,
    which knows what the run was about to do."""
    root.mkdir(parents=True, exist_ok=True)
    # not open(..., "w"): that would empty the holder's record before knowing it holds the lock
    f = os.fdopen(os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666), "r+", encoding="utf-8")
    deadline = time.monotonic() + RETRY_S
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            holder = _parse(f.read())
            f.close()
            raise UserError(f"{root} is in use by another `leafe run`{describe_holder(holder)}; wait for it "
                            "or stop it") from None
    try:
        yield RunLock(f, root)
    finally:
        try:
            f.seek(0)
            f.truncate()
        except OSError:
            pass
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def lock_holder(root: Path) -> dict | None:
    """Who holds `root`'s lock ({pid, host, started, stage, dir}; empty when an older leafe
    holds it and wrote nothing), or None when no `leafe run` does (or the lock cannot be read)."""
    try:
        f = open(root / LOCK, "rb")
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _parse(f.read())
        except OSError:
            return None
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def describe_holder(holder: dict | None) -> str:
    """` (pid 123)`, ` (pid 123 on host h)`, or '' when unknown."""
    if not holder or not holder.get("pid"):
        return ""
    host = holder.get("host")
    return f" (pid {holder['pid']}" + (f" on {host}" if host and host != socket.gethostname() else "") + ")"


def _parse(data: str | bytes) -> dict:
    try:
        info = json.loads(data)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}
