"""Run untrusted Python in a throwaway sandbox.

Two modes:

`bwrap` (the default, and the only one that isolates the host). The program runs under
bubblewrap (Debian/Ubuntu package `bubblewrap`) with the host's root file system mounted
read-only, a private size-limited tmpfs as /tmp (its working directory, gone after the run),
/root and /home hidden behind empty tmpfs mounts (the interpreter's installation is mounted back
if it lives there), fresh /dev and /proc, and new network, PID, IPC and UTS namespaces (only a
loopback with nothing listening: connections get "connection refused" or "network
unreachable"). As root, bwrap sets up the mounts and the program then drops to an unprivileged
uid (`setpriv`) with no capabilities, no groups and no-new-privs, because the process-count
limit (RLIMIT_NPROC) is not enforced for root. That uid is an otherwise unused one derived from
the host process id (`sandbox_uid`): the limit counts the processes of a uid, so sandboxes of
parallel environment workers must not share one (a fork bomb in one would starve the others).
As a normal user, bwrap uses an unprivileged user namespace and the limits count that user's
processes. Every process gets resource limits (`prlimit`): address space, CPU seconds, file
size, process count, no core files.

Nothing outlives a run: on the wall-clock timeout (or an early stop) the host SIGKILLs the init
of the sandbox's PID namespace, which takes every process of the namespace with it. When the
program exits, the in-sandbox supervisor (`SUPERVISOR`, a child subreaper: the program's
orphans become its children) kills and reaps whatever the program left, children that left
its session included; bwrap's own init would otherwise wait for them, outliving the run. If
the host itself dies, the supervisor sees the host's end of the result pipe close and does the
same. As root the host then waits until the sandbox uid has no process left, so a run never
starts under its predecessor's leftovers (they count against its process limit). (bwrap's --die-with-parent is not used: killing bwrap between its
clone and its handshake with the child leaves that child blocked forever.)

`rlimits` (weaker; for hosts without bubblewrap or without user namespaces, e.g. some
containers). A plain subprocess with the same resource limits, a scrubbed environment, a fresh
session, a private temporary working directory and, when run as root, the same uid switch (and
after each run every process of that uid is killed). It does NOT isolate the network or the
file system: the program can read what the uid can read and write where it can write (e.g. the
host's /tmp). As a normal user, a process that escapes the supervisor (where the kernel
lacks child subreapers or /proc/<pid>/task/<tid>/children) can outlive the run. Choosing it
logs a warning.

The program reports to the host over a pipe: JSON lines on a file descriptor whose number it is
given (see `Sandbox.run`). stdout and stderr go to files of the host's private job directory,
bounded by the file-size limit, and come back trimmed.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from leafe.errors import UserError

log = logging.getLogger(__name__)

#: Sandbox uids (as root): UID_BASE + pid % UID_SPAN (UID_SPAN is the largest pid_max).
UID_BASE = 1_500_000_000
UID_SPAN = 4_194_304

#: Where the job directory (read-only) appears inside a bwrap sandbox.
SANDBOX_JOB_DIR = "/tmp/job"
#: The writable working directory inside a bwrap sandbox (its private tmpfs).
SANDBOX_TMP = "/tmp"

#: Environment of every sandboxed program (nothing of the host's environment is passed on).
#: PYTHONHASHSEED=0 makes set/dict-of-str iteration order, and so feedback, reproducible.
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONUNBUFFERED": "1",
}

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install -y bubblewrap`; Fedora: `dnf install "
    "bubblewrap`), or set the environment option `sandbox: rlimits` to accept a weaker sandbox "
    "without network or file-system isolation"
)


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    timeout: float = 30.0
    """Wall-clock seconds for the whole run, sandbox start included; then everything is killed."""
    cpu_seconds: int = 30
    """CPU seconds per process (RLIMIT_CPU); the kernel kills a process past it."""
    memory_mb: int = 1024
    """Address space per process in MiB (RLIMIT_AS): allocations past it raise MemoryError."""
    max_processes: int = 16
    """Processes and threads of the sandbox uid (RLIMIT_NPROC): stops fork bombs. The memory
    limit is per process, so a program can hold up to max_processes x memory_mb."""
    tmp_mb: int = 128
    """Size of the private /tmp (bwrap) and the largest file a process may write (RLIMIT_FSIZE),
    which also bounds stdout and stderr."""
    output_kb: int = 64
    """stdout/stderr kept per stream (the start and the end, when longer)."""
    events_mb: int = 64
    """Longest result-channel line (MiB); a longer one stops the run as flooding it."""


@dataclass
class RunResult:
    """What one sandboxed run produced."""

    returncode: int | None
    """Exit status (negative: killed by that signal; None: killed by the host)."""
    stdout: str
    stderr: str
    events: list[dict] = field(default_factory=list)
    """The JSON objects the program wrote to its result channel, in order."""
    timed_out: bool = False
    """True when the wall-clock limit killed the run."""
    stopped: bool = False
    """True when the `on_event` callback stopped the run early."""
    flooded: bool = False
    """True when the program wrote a result-channel line longer than `Limits.events_mb`."""
    duration: float = 0.0
    """Wall-clock seconds of the run."""

    @property
    def signal_name(self) -> str | None:
        """Name of the signal that ended the program, if one did."""
        code = self.returncode
        if code is None:
            return None
        # bwrap reports a child killed by a signal as 128 + signal number.
        num = -code if code < 0 else (code - 128 if 128 < code < 128 + 65 else None)
        if num is None:
            return None
        try:
            return signal.Signals(num).name
        except ValueError:
            return f"signal {num}"


def trim(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters, keeping its start and end."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - head - tail} characters cut] ...\n{text[len(text) - tail:]}"


def _read_trimmed(path: Path, limit_bytes: int) -> str:
    """A file's text; when longer than `limit_bytes`, its start and end with a marker between."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if size <= limit_bytes:
                return f.read().decode("utf-8", "replace")
            head = limit_bytes * 2 // 3
            tail = limit_bytes - head
            start = f.read(head)
            f.seek(size - tail)
            end = f.read(tail)
    except OSError:
        return ""
    return (start.decode("utf-8", "replace") + f"\n... [{size - head - tail} bytes cut] ...\n"
            + end.decode("utf-8", "replace"))


def _processes_of(uid: int) -> int:
    """How many processes `uid` runs now (from /proc)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


def _world_traversable(path: Path) -> bool:
    """True when every directory from / down to `path` is searchable by any user."""
    p = Path("/")
    for part in path.parts[1:]:
        p = p / part
        try:
            if not os.stat(p).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def default_python() -> str:
    """The base interpreter of the running Python (not a virtualenv's): sandboxed programs get
    the standard library and the base installation's packages, never the host project's."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(base)


#: The first process inside the sandbox: runs the program as its child and kills it (and,
#: where kill(-1) reaches only the sandbox's processes: inside bwrap's PID namespace, or with
#: the dedicated uid of rlimits mode as root, everything else there) as soon as the host's end
#: of the result channel closes: the host is gone (or gave up on the run). When the program
#: exits it kills those same processes (children that left its session), which would otherwise
#: outlive the run (bwrap's own init waits for them) and count against the next run's limits.
#: Parent-death signals leave a window while the sandbox starts; this check does not, since it
#: looks at the channel once the sandbox runs. Exits with the program's status (128 + N when
#: killed by signal N). Standard library only, run with -S (no site: fast).
SUPERVISOR = r"""
import ctypes, os, select, signal, sys
host_fd, kill_uid, argv = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[4:]
try:  # PR_SET_CHILD_SUBREAPER: the program's orphans become our children, not pid 1's
    subreaper = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
except (OSError, AttributeError):
    subreaper = False
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *a: None)
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    os.close(wake_r)
    os.close(wake_w)
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)


def children():
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return None


def clear():
    # what the program left (children that left its session): killed, and reaped here
    if kill_uid:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not subreaper:
        return
    while True:
        kids = children()
        if kids is None:
            return
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


poll = select.poll()
poll.register(host_fd, 0)
poll.register(wake_r, select.POLLIN)
main = None
while True:
    while True:  # reap every exited child (orphans too: zombies count against the limits)
        try:
            done, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            done = 0
        if not done:
            break
        if done == pid:
            main = status
    if main is not None:
        clear()
        code = os.waitstatus_to_exitcode(main)
        os._exit(code if code >= 0 else 128 - code)
    for fd, _ in poll.poll():
        if fd == host_fd:
            if subreaper and children() is not None:
                clear()  # the program and everything it left
                os._exit(137)
            if kill_uid:
                os.kill(-1, signal.SIGKILL)
            os.killpg(0, signal.SIGKILL)
        os.read(wake_r, 512)
"""

_PROBED: dict[tuple, str | None] = {}
_WARNED_RLIMITS = False


class Sandbox:
    """Runs a Python script with its job files in a sandbox (see the module docstring)."""

    def __init__(self, mode: str = "bwrap", limits: Limits | None = None,
                 python: str | None = None, uid: int | None = None):
        if mode not in ("bwrap", "rlimits"):
            raise UserError(f"sandbox mode {mode!r} is not one of: bwrap, rlimits")
        self.mode = mode
        self.limits = limits or Limits()
        self.python = os.path.realpath(python) if python else default_python()
        self.uid = sandbox_uid() if uid is None else uid
        self.is_root = os.geteuid() == 0
        if not os.access(self.python, os.X_OK):
            raise UserError(f"sandbox python {self.python!r} is not an executable; set the "
                            "environment option `python` to a Python 3 interpreter")
        if mode == "bwrap":
            self.bwrap = shutil.which("bwrap")
            if self.bwrap is None:
                raise UserError(f"the coding sandbox needs bubblewrap (`bwrap`), which is not "
                                f"on PATH: {INSTALL_HINT}")
            if self.is_root and shutil.which("setpriv") is None:
                raise UserError("running as root, the coding sandbox drops to an unprivileged "
                                "uid with `setpriv` (util-linux), which is not on PATH: install "
                                "util-linux (Debian/Ubuntu: apt-get install -y util-linux)")
        else:
            self.bwrap = None
            global _WARNED_RLIMITS
            if not _WARNED_RLIMITS:
                _WARNED_RLIMITS = True
                log.warning("coding sandbox in `rlimits` mode: resource limits only, NO network or "
                            "file-system isolation for the submitted code; use `sandbox: bwrap` "
                            "(needs bubblewrap) wherever untrusted code runs")
            if self.is_root and not _world_traversable(Path(self.python)):
                raise UserError(
                    f"sandbox python {self.python} is not reachable by uid {self.uid} (a parent "
                    "directory is private); set the environment option `python` to an "
                    "interpreter every user can run, e.g. /usr/bin/python3")

    # -- command lines ------------------------------------------------------------------------
    def _prefix_binds(self) -> list[str]:
        """Directories to hide from the program, re-exposing the interpreter's installation."""
        hidden = []
        for d in ("/root", "/home", os.path.expanduser("~")):
            if d not in ("/", "") and os.path.isdir(d) and d not in hidden:
                hidden.append(os.path.realpath(d))
        args: list[str] = []
        for d in hidden:
            args += ["--tmpfs", d]
        # The interpreter's installation: <prefix>/bin/python3.X (self.python is resolved, so
        # a virtualenv's python is its base interpreter).
        for root in [Path(self.python).parent.parent]:
            under = [Path(d) for d in hidden if Path(d) == root or Path(d) in root.parents]
            if not under:
                continue
            # bwrap would create the directories leading to the mount point private (0700):
            # make them searchable for the unprivileged uid.
            top = max(under, key=lambda d: len(d.parts))
            for parent in reversed(root.parents):
                if len(parent.parts) > len(top.parts):
                    args += ["--perms", "0755", "--dir", str(parent)]
            args += ["--ro-bind", str(root), str(root)]
        return args

    def _bwrap_argv(self, job_dir: Path, argv: list[str], info_fd: int) -> list[str]:
        lim = self.limits
        cmd = [self.bwrap, "--ro-bind", "/", "/", *self._prefix_binds(),
               "--dev", "/dev", "--proc", "/proc"]
        cmd += ["--perms", "1777"]
        if _bwrap_supports("--size"):
            cmd += ["--size", str(lim.tmp_mb * 1024 * 1024)]
        cmd += ["--tmpfs", SANDBOX_TMP, "--ro-bind", str(job_dir), SANDBOX_JOB_DIR,
                "--info-fd", str(info_fd),
                "--chdir", SANDBOX_TMP,
                "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--new-session", "--"]
        if self.is_root:
            cmd += [shutil.which("setpriv") or "setpriv", *self._setpriv_args()]
        return cmd + argv

    def _rlimits(self, nproc: int) -> list[tuple[int, int, int]]:
        lim = self.limits
        mem = lim.memory_mb * 1024 * 1024
        fsize = lim.tmp_mb * 1024 * 1024
        return [(resource.RLIMIT_AS, mem, mem),
                (resource.RLIMIT_CPU, lim.cpu_seconds, lim.cpu_seconds + 1),
                (resource.RLIMIT_FSIZE, fsize, fsize),
                (resource.RLIMIT_NPROC, nproc, nproc),
                (resource.RLIMIT_CORE, 0, 0)]

    def _limit_prefix(self, nproc: int, switch_uid: bool) -> tuple[list[str], Callable | None]:
        """The command prefix that applies the limits (and the uid switch of rlimits mode as
        root): `prlimit` and `setpriv` from util-linux, which exec the command. Without them,
        a preexec function does it (Python warns it is unsafe in threaded programs)."""
        limits = self._rlimits(nproc)
        prlimit, setpriv = shutil.which("prlimit"), shutil.which("setpriv")
        if prlimit and (setpriv or not switch_uid):
            names = {resource.RLIMIT_AS: "as", resource.RLIMIT_CPU: "cpu",
                     resource.RLIMIT_FSIZE: "fsize", resource.RLIMIT_NPROC: "nproc",
                     resource.RLIMIT_CORE: "core"}
            prefix = [prlimit] + [f"--{names[r]}={soft}:{hard}" for r, soft, hard in limits]
            prefix.append("--")
            # rlimits mode: the program also dies with this process (PR_SET_PDEATHSIG; it
            # survives exec but not a uid change, hence set by the uid-switching setpriv where
            # there is one). Not for bwrap: killing bwrap between its clone and its handshake
            # with the child leaves that child blocked forever; the supervisor covers it.
            if switch_uid:
                prefix += [setpriv, *self._setpriv_args(), "--pdeathsig", "KILL", "--"]
            elif setpriv and self.mode == "rlimits":
                prefix = [setpriv, "--pdeathsig", "KILL", "--", *prefix]
            return prefix, None
        uid = self.uid

        def setup() -> None:  # runs in the child between fork and exec
            for r, soft, hard in limits:
                resource.setrlimit(r, (soft, hard))
            if switch_uid:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)

        return [], setup

    def _supervised(self, program: list[str], channel_fd: int, kill_uid: bool) -> list[str]:
        """`program` under the in-sandbox supervisor (`SUPERVISOR`)."""
        return [self.python, "-S", "-B", "-c", SUPERVISOR, str(channel_fd),
                "1" if kill_uid else "0", "--", *program]

    def _setpriv_args(self) -> list[str]:
        return [f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]

    def _kill_uid(self) -> None:
        """rlimits mode as root: SIGKILL every process of the sandbox uid (it is this host
        process's own, see `sandbox_uid`), catching children that left the session. kill(-1)
        from that uid reaches exactly them."""
        setpriv, kill = shutil.which("setpriv"), shutil.which("kill")
        if not (setpriv and kill):
            return
        subprocess.run([setpriv, f"--reuid={self.uid}", f"--regid={self.uid}",
                        "--clear-groups", kill, "-KILL", "-1"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=BASE_ENV,
                       timeout=10, check=False)

    # -- running ------------------------------------------------------------------------------
    def check(self) -> None:
        """Run a trivial program once per process and configuration; raise a UserError saying
        why when the sandbox cannot start here (no user namespaces, unreadable interpreter)."""
        key = (self.mode, self.python, self.uid, self.limits.memory_mb)
        if key not in _PROBED:
            try:
                r = self.run("probe.py", [], {"probe.py": "print('leafe-sandbox-ok')\n"},
                             _checked=True)
                ok = r.returncode == 0 and "leafe-sandbox-ok" in r.stdout
                _PROBED[key] = None if ok else (r.stderr.strip() or f"exit status {r.returncode}")
            except OSError as e:
                _PROBED[key] = str(e)
        problem = _PROBED[key]
        if problem:
            hint = ("bubblewrap needs user namespaces or root (containers: run with "
                    "--privileged or enable them; Ubuntu 24.04: `sysctl -w "
                    "kernel.apparmor_restrict_unprivileged_userns=0`), or " + INSTALL_HINT
                    if self.mode == "bwrap" else "set the environment option `python`")
            raise UserError(f"the coding sandbox ({self.mode}) cannot run Python here: "
                            f"{trim(problem, 800)}; {hint}")

    def run(self, script: str, args: list[str], files: dict[str, str | bytes], *,
            stdin: bytes | None = None, on_event: Callable[[dict], bool] | None = None,
            keep_events: bool = True, _checked: bool = False) -> RunResult:
        """Run `python <job>/<script> <job> <fd> *args` in a fresh sandbox.

        `files` are written to a private job directory, readable (not writable) by the program
        at the path given as its first argument. The program may write JSON lines to the file
        descriptor given as its second argument; each parsed object is passed to `on_event`
        (a false return value kills the run: the host has seen enough) and, with
        `keep_events`, kept in `RunResult.events`. Lines that are not JSON objects are ignored.
        """
        if not _checked:
            self.check()
        lim = self.limits
        host_dir = Path(tempfile.mkdtemp(prefix="leafe-sandbox-"))
        read_fd = write_fd = info_w = -1
        info_path: Path | None = None
        proc = None
        try:
            job_dir = host_dir / "job"
            job_dir.mkdir()
            for name, content in files.items():
                p = job_dir / name
                p.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, str):
                    content = content.encode("utf-8")
                p.write_bytes(content)
                p.chmod(0o644)
            out_path, err_path = host_dir / "stdout", host_dir / "stderr"
            in_path = host_dir / "stdin"
            in_path.write_bytes(stdin or b"")

            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            switch_uid = False
            pass_fds = [write_fd]
            if self.mode == "bwrap":
                # bwrap reports the host pid of the sandbox's PID-namespace init here. A file,
                # not a pipe: bwrap writes it between its clone and its handshake with the
                # child, and a write to a pipe whose host is gone kills bwrap there (SIGPIPE),
                # which leaves the child blocked forever, holding the result channel open.
                info_path = host_dir / "bwrap-info"
                info_w = os.open(info_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                pass_fds.append(info_w)
                os.chmod(host_dir, 0o711)
                os.chmod(job_dir, 0o755)
                inner_job = SANDBOX_JOB_DIR
                cwd = str(host_dir)
                env = {**BASE_ENV, "HOME": SANDBOX_TMP, "TMPDIR": SANDBOX_TMP}
                program = [self.python, "-s", "-B", f"{inner_job}/{script}", inner_job,
                           str(write_fd), *args]
                # kill(-1) inside the PID namespace reaches only the sandbox's processes
                argv = self._bwrap_argv(job_dir, self._supervised(program, write_fd, True),
                                        info_w)
            else:
                work = host_dir / "work"
                work.mkdir()
                if self.is_root:
                    os.chown(work, self.uid, self.uid)
                    os.chmod(host_dir, 0o711)
                    os.chmod(job_dir, 0o755)
                    switch_uid = True
                inner_job = str(job_dir)
                cwd = str(work)
                env = {**BASE_ENV, "HOME": cwd, "TMPDIR": cwd}
                program = [self.python, "-s", "-B", f"{inner_job}/{script}", inner_job,
                           str(write_fd), *args]
                argv = self._supervised(program, write_fd, switch_uid)
            nproc_uid = self.uid if self.is_root else os.getuid()
            nproc = lim.max_processes
            if not self.is_root:
                # Not root: the limit counts every process of this user, sandbox or not.
                nproc += _processes_of(nproc_uid)

            prefix, preexec = self._limit_prefix(nproc, switch_uid)
            start = time.monotonic()
            deadline = start + lim.timeout
            with in_path.open("rb") as fin, out_path.open("wb") as fout, \
                    err_path.open("wb") as ferr:
                proc = subprocess.Popen(
                    prefix + argv, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd, env=env,
                    pass_fds=tuple(pass_fds), start_new_session=True, preexec_fn=preexec,
                )
            for fd in pass_fds:
                os.close(fd)
            write_fd = info_w = -1
            result = RunResult(returncode=None, stdout="", stderr="")
            self._pump(proc, read_fd, deadline, on_event, result, keep_events)
            if not (result.timed_out or result.stopped or result.flooded):
                # The channel is closed; the program may still run (it can close it early).
                result.timed_out = not _wait_exited(proc.pid, deadline)
            killed = result.timed_out or result.stopped or result.flooded
            if killed:
                self._terminate(proc, info_path)
            # What is left of the process group (rlimits mode: stray children) goes before
            # the leader is reaped, so the group id cannot have been reused.
            self._kill(proc)
            code = proc.wait()
            if switch_uid:
                self._kill_uid()
            if self.is_root:
                # Killed processes count against RLIMIT_NPROC until their parent (bwrap's init,
                # or pid 1 for rlimits mode's orphans) reaps them: the next run must not start
                # under its predecessor's leftovers (EAGAIN in its first fork under load).
                _wait_uid_clear(self.uid, time.monotonic() + 10)
            result.returncode = None if killed else code
            result.duration = time.monotonic() - start
            limit = lim.output_kb * 1024
            # Job paths differ between modes (and runs, in rlimits mode): leave them out.
            result.stdout = _read_trimmed(out_path, limit).replace(inner_job + "/", "")
            result.stderr = _read_trimmed(err_path, limit).replace(inner_job + "/", "")
            return result
        finally:
            if proc is not None and proc.returncode is None:
                self._terminate(proc, info_path)
                self._kill(proc)
                proc.wait()
            for fd in (read_fd, write_fd, info_w):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(host_dir, ignore_errors=True)

    def _pump(self, proc: subprocess.Popen, read_fd: int, deadline: float,
              on_event: Callable[[dict], bool] | None, result: RunResult,
              keep_events: bool) -> None:
        """Read the result channel until EOF, the deadline, a stop or a flood."""
        sel = selectors.DefaultSelector()
        sel.register(read_fd, selectors.EVENT_READ)
        buf = bytearray()
        cap = self.limits.events_mb * 1024 * 1024
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    result.timed_out = True
                    return
                if not sel.select(timeout=min(remaining, 0.5)):
                    # A program that closed the channel early (or a lingering grandchild in
                    # rlimits mode) must not keep us here past its own exit.
                    if self.mode == "rlimits" and _wait_exited(proc.pid, 0):
                        return
                    continue
                try:
                    chunk = os.read(read_fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    return  # EOF: every writer has exited
                if b"\n" not in chunk:  # part of a long line: no need to split it all again
                    buf += chunk
                    if len(buf) > cap:
                        result.flooded = True
                        return
                    continue
                buf += chunk
                *lines, last = buf.split(b"\n")
                buf = bytearray(last)
                if len(buf) > cap:
                    result.flooded = True
                    return
                for line in lines:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(event, dict):
                        continue
                    if keep_events:
                        result.events.append(event)
                    if on_event is not None and not on_event(event):
                        result.stopped = True
                        return
        finally:
            sel.close()

    def _terminate(self, proc: subprocess.Popen, info_path: Path | None) -> None:
        """Stop a run that is still going. bwrap: SIGKILL the init of the sandbox's PID
        namespace; the kernel kills every process of the namespace and the init's exit waits
        for them, and bwrap exits once it has reaped the init, so when `proc` has exited
        nothing of the sandbox is left. Otherwise (or if that fails): the process group."""
        init_pid = None
        if info_path is not None:
            # Killing bwrap between its clone and its info write would leave the child blocked
            # forever: wait for the write (it comes right after the clone) or bwrap's exit.
            wait_until = time.monotonic() + 10
            while (init_pid := _read_child_pid(info_path)) is None:
                if _wait_exited(proc.pid, 0) or time.monotonic() >= wait_until:
                    break
                time.sleep(0.005)
        if init_pid is not None:
            try:
                os.kill(init_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if _wait_exited(proc.pid, time.monotonic() + 10):
                return
        self._kill(proc)

    def _kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the run's process group (bwrap itself, or the rlimits-mode program)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _read_child_pid(path: Path) -> int | None:
    """The `child-pid` of bwrap's --info-fd JSON, once bwrap has written all of it."""
    try:
        pid = json.loads(path.read_bytes()).get("child-pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 1 else None


def _wait_uid_clear(uid: int, deadline: float) -> bool:
    """Wait until `uid` has no process (zombies included) or the deadline passes; True if clear."""
    while _processes_of(uid):
        if time.monotonic() >= deadline:
            log.warning("processes of sandbox uid %d outlived their run by 10 s; the next run's "
                        "process limit counts them", uid)
            return False
        time.sleep(0.005)
    return True


def _wait_exited(pid: int, deadline: float) -> bool:
    """Wait until `pid` exits or the deadline passes, without reaping it; True if it exited."""
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _bwrap_supports(flag: str) -> bool:
    """Whether the installed bwrap knows `flag` (--size is newer than some distributions')."""
    key = ("bwrap-flag", flag)
    if key not in _PROBED:
        try:
            out = subprocess.run([shutil.which("bwrap") or "bwrap", "--help"], capture_output=True,
                                 text=True, timeout=10)
            _PROBED[key] = "yes" if flag in out.stdout + out.stderr else None
        except (OSError, subprocess.SubprocessError):
            _PROBED[key] = None
    return _PROBED[key] == "yes"


def sandbox_uid() -> int:
    """The uid sandboxed programs of this host process run as (when leafe runs as root): one
    per live process (pids are unique), in a range no distribution or container tool assigns."""
    return UID_BASE + os.getpid() % UID_SPAN
