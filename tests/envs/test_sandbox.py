"""The coding sandbox: limits and isolation hold, and nothing outlives a run.

The isolation guarantees are bubblewrap's: those tests skip (saying why) only when bwrap is
not installed or cannot create namespaces on this host. The `rlimits` fallback is tested for
what it promises (limits, no isolation).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from leafe.envs.coding import sandbox as sb
from leafe.envs.coding.sandbox import Limits, Sandbox
from leafe.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
FAST = Limits(timeout=4.0, cpu_seconds=4, memory_mb=512, max_processes=32, tmp_mb=16,
              output_kb=16)


def _bwrap_problem() -> str | None:
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed: apt-get install -y bubblewrap"
    try:
        Sandbox("bwrap", FAST).check()
    except UserError as e:
        return f"bubblewrap cannot run here: {e}"
    return None


BWRAP_PROBLEM = _bwrap_problem()
needs_bwrap = pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=str(BWRAP_PROBLEM))


@pytest.fixture
def box() -> Sandbox:
    return Sandbox("bwrap", FAST)


def _pids_running(marker: str) -> list[int]:
    """Processes whose command line contains `marker` (our sandboxed scripts)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker.encode() in cmd:  # (a zombie's cmdline is empty)
            found.append(int(entry.name))
    return found


def _uid_pids(uid: int) -> set[int]:
    """Live processes of `uid` (zombies are dead: killed children reparented to an init that
    has not reaped them yet)."""
    out = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid != uid:
                    continue
                with open(f"/proc/{entry.name}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if state not in ("Z", "X"):
                out.add(int(entry.name))
    return out


def run_attack(box: Sandbox, code: str):
    """Run `code` as a uniquely named script; return the result and the processes of the
    sandbox left afterwards (by script name, and by uid when the sandbox switches uid)."""
    script = f"attack_{uuid.uuid4().hex}.py"
    before = _uid_pids(box.uid) if box.is_root else set()
    result = box.run(script, [], {script: code})
    leftover = _pids_running(script)
    if box.is_root:
        leftover += sorted(_uid_pids(box.uid) - before)
    return result, leftover


# -- bubblewrap ------------------------------------------------------------------------------------
@needs_bwrap
def test_plain_run_channel_and_scrubbed_environment(box, monkeypatch):
    monkeypatch.setenv("LEAFE_SECRET_TOKEN", "hunter2")
    code = (
        "import json, os, sys\n"
        "fd = int(sys.argv[2])\n"
        "os.write(fd, (json.dumps({'uid': os.getuid(), 'cwd': os.getcwd(), 'job': sys.argv[1],"
        " 'env': sorted(os.environ), 'secret': os.environ.get('LEAFE_SECRET_TOKEN')}) + '\\n'"
        ").encode())\n"
        "os.write(fd, b'not json\\n[1, 2]\\n')\n"
        "print('to stdout'); print('to stderr', file=sys.stderr)\n"
    )
    r = box.run("p.py", [], {"p.py": code})
    assert r.returncode == 0 and not r.timed_out
    assert r.stdout == "to stdout\n" and r.stderr == "to stderr\n"
    assert len(r.events) == 1  # non-objects and non-JSON lines are ignored
    ev = r.events[0]
    assert ev["secret"] is None and "LEAFE_SECRET_TOKEN" not in ev["env"]
    assert ev["cwd"] == sb.SANDBOX_TMP and ev["job"] == sb.SANDBOX_JOB_DIR
    if box.is_root:
        assert ev["uid"] == box.uid != 0


@needs_bwrap
def test_infinite_loop_is_killed_at_the_wall_clock_limit(box):
    t0 = time.monotonic()
    r, leftover = run_attack(box, "while True:\n    pass\n")
    elapsed = time.monotonic() - t0
    assert r.timed_out and r.returncode is None
    assert FAST.timeout <= elapsed < FAST.timeout + 3
    assert leftover == []


@needs_bwrap
def test_cpu_limit_kills_a_busy_process():
    box = Sandbox("bwrap", Limits(timeout=10, cpu_seconds=1, memory_mb=512, tmp_mb=16))
    t0 = time.monotonic()
    r, leftover = run_attack(box, "while True:\n    pass\n")
    assert not r.timed_out and time.monotonic() - t0 < 6
    assert r.signal_name in ("SIGXCPU", "SIGKILL")
    assert leftover == []


@needs_bwrap
def test_memory_bomb_raises_memory_error(box):
    r, leftover = run_attack(box, "x = bytearray(8 * 1024 ** 3)\n")
    assert r.returncode not in (0, None) and "MemoryError" in r.stderr
    r, leftover2 = run_attack(box, "chunks = []\nwhile True:\n    chunks.append(b'x' * 2 ** 24)\n")
    assert r.returncode not in (0, None) and "MemoryError" in r.stderr
    assert leftover == leftover2 == []


@needs_bwrap
def test_fork_bomb_stops_at_the_process_limit_and_leaves_nothing(box):
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(1000)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('forks', n, type(e).__name__, flush=True)\n"
        "time.sleep(1000)\n"
    )
    r, leftover = run_attack(box, code)
    assert r.timed_out
    forks = int(r.stdout.split()[1])
    assert 0 < forks < FAST.max_processes  # stopped by RLIMIT_NPROC, not by the clock
    assert "BlockingIOError" in r.stdout
    assert leftover == []


@needs_bwrap
def test_writes_outside_the_private_tmp_fail_or_vanish(box, tmp_path):
    name = f"leafe-escape-{uuid.uuid4().hex}"
    targets = [Path("/tmp") / name, ROOT / name, tmp_path / name, Path("/var/tmp") / name,
               Path.home() / name, Path("/dev/shm") / name]
    code = (
        "import os, sys\n"
        f"targets = {[str(t) for t in targets]!r}\n"
        "for t in targets:\n"
        "    try:\n"
        "        with open(t, 'w') as f:\n"
        "            f.write('x')\n"
        "        print('wrote', t)\n"
        "    except OSError as e:\n"
        "        print('refused', t, type(e).__name__)\n"
        "open('private.txt', 'w').write('scratch')\n"
        "print('cwd-write', os.path.exists('private.txt'))\n"
        "try:\n"
        "    open(sys.argv[1] + '/x', 'w')\n"
        "except OSError as e:\n"
        "    print('job-dir', type(e).__name__)\n"
    )
    r, leftover = run_attack(box, code)
    assert r.returncode == 0, r.stderr
    assert "cwd-write True" in r.stdout  # the private /tmp is writable...
    assert "job-dir OSError" in r.stdout or "job-dir PermissionError" in r.stdout
    # ...and nothing reached the host: not the targets, not the private scratch file.
    for t in targets:
        assert not t.exists(), t
    assert not (ROOT / "private.txt").exists() and not Path("/tmp/private.txt").exists()
    assert [line for line in r.stdout.splitlines() if line.startswith("refused")]
    assert leftover == []


@needs_bwrap
def test_sockets_cannot_reach_the_host(box):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    try:
        code = (
            "import socket\n"
            "for addr in [('127.0.0.1', %d), ('8.8.8.8', 53)]:\n"
            "    try:\n"
            "        socket.create_connection(addr, timeout=2)\n"
            "        print('connected', addr)\n"
            "    except OSError as e:\n"
            "        print('blocked', addr[0], type(e).__name__, e.errno)\n" % port
        )
        r, leftover = run_attack(box, code)
        assert "connected" not in r.stdout
        assert "blocked 127.0.0.1 ConnectionRefusedError" in r.stdout  # a listener on the host
        assert "blocked 8.8.8.8" in r.stdout
        with pytest.raises(socket.timeout):
            server.accept()
        assert leftover == []
    finally:
        server.close()


@needs_bwrap
def test_output_flood_is_bounded(box):
    r, leftover = run_attack(box, "while True:\n    print('x' * 4096)\n")
    assert "File too large" in r.stderr  # RLIMIT_FSIZE stopped it
    assert len(r.stdout) < 2 * FAST.output_kb * 1024
    assert leftover == []


@needs_bwrap
def test_on_event_can_stop_the_run(box):
    code = ("import os, sys, time\n"
            "for i in range(100):\n"
            "    os.write(int(sys.argv[2]), b'{\"i\": %d}\\n' % i)\n"
            "    time.sleep(0.01)\n"
            "time.sleep(100)\n")
    script = f"stop_{uuid.uuid4().hex}.py"
    t0 = time.monotonic()
    r = box.run(script, [], {script: code}, on_event=lambda ev: ev["i"] < 3)
    assert r.stopped and not r.timed_out and r.returncode is None
    assert [e["i"] for e in r.events] == [0, 1, 2, 3]
    assert time.monotonic() - t0 < 3
    assert _pids_running(script) == []


# -- configuration errors and the weaker mode ---------------------------------------------------
def test_missing_bwrap_is_a_user_error_with_the_fix(monkeypatch):
    monkeypatch.setattr(sb.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install -y bubblewrap.*sandbox: rlimits"):
        Sandbox("bwrap")
    with pytest.raises(UserError, match="not one of"):
        Sandbox("docker")


def _reachable_python() -> str | None:
    """An interpreter the sandbox uid can run in rlimits mode (no bind mounts there)."""
    candidates = [sb.default_python(), "/usr/bin/python3", shutil.which("python3") or ""]
    for c in candidates:
        if c and os.path.exists(c) and (os.geteuid() != 0 or sb._world_traversable(Path(c))):
            return c
    return None


RLIMITS_PYTHON = _reachable_python()


@pytest.mark.skipif(RLIMITS_PYTHON is None, reason="no Python interpreter the sandbox uid can run")
def test_rlimits_mode_warns_and_enforces_limits(caplog, monkeypatch):
    monkeypatch.setattr(sb, "_WARNED_RLIMITS", False)
    with caplog.at_level(logging.WARNING, logger=sb.__name__):
        box = Sandbox("rlimits", Limits(timeout=3, cpu_seconds=3, memory_mb=512, tmp_mb=16),
                      python=RLIMITS_PYTHON)
    assert "NO network or file-system isolation" in caplog.text
    r = box.run("p.py", [], {"p.py": "import os; print(os.getuid(), os.getcwd())"})
    uid, cwd = r.stdout.split()
    assert r.returncode == 0
    if os.geteuid() == 0:
        assert int(uid) == box.uid
    assert not os.path.exists(cwd)  # the private working directory is removed
    r = box.run("p.py", [], {"p.py": "x = bytearray(8 * 1024 ** 3)"})
    assert "MemoryError" in r.stderr
    t0 = time.monotonic()
    r = box.run("p.py", [], {"p.py": "while True: pass"})
    assert (r.timed_out or r.signal_name in ("SIGXCPU", "SIGKILL")) and time.monotonic() - t0 < 6
    if os.geteuid() == 0:  # a child that left the session is killed through the sandbox uid
        code = ("import subprocess\n"
                "subprocess.Popen(['sleep', '300'], start_new_session=True)\n")
        r = box.run("p.py", [], {"p.py": code})
        assert r.returncode == 0 and _uid_pids(box.uid) == set()


def test_rlimits_mode_refuses_an_interpreter_the_uid_cannot_reach(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("the uid switch (and this check) only happens as root")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    fake = private / "python3"
    fake.symlink_to(sys.executable)
    monkeypatch.setattr(sb.os.path, "realpath", lambda p: str(p))
    with pytest.raises(UserError, match="not reachable by uid"):
        Sandbox("rlimits", python=str(fake))


@needs_bwrap
@pytest.mark.parametrize("delay", ["stopped", 0.0, 1.0])  # frozen before it starts / while it
def test_a_killed_host_leaves_no_sandbox_behind(tmp_path, delay):  # starts / once it runs
    """The host process is SIGKILLed mid-run (no cleanup runs): the sandbox dies with it.
    "stopped": bwrap is frozen as soon as it appears and thawed after the host is dead, so it
    writes its startup report with no host to read it (bwrap died of SIGPIPE there once,
    leaving its child blocked forever)."""
    script = f"orphan_{uuid.uuid4().hex}.py"
    host = tmp_path / "host.py"
    host.write_text(
        "import sys\n"
        "from leafe.envs.coding.sandbox import Sandbox, Limits\n"
        "box = Sandbox('bwrap', Limits(timeout=120, cpu_seconds=120))\n"
        "print(box.uid, flush=True)\n"
        f"box.run({script!r}, [], {{{script!r}: 'import time\\ntime.sleep(300)'}})\n"
    )
    # The killed host cannot remove its job directory: keep it under tmp_path.
    proc = subprocess.Popen([sys.executable, str(host)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    uid = int(proc.stdout.readline())
    deadline = time.monotonic() + 20
    while not (frozen := _pids_running(script)):
        assert time.monotonic() < deadline, "the sandbox never started"
        time.sleep(0 if delay == "stopped" else 0.01)
    if delay == "stopped":
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
    else:
        time.sleep(delay)
    proc.kill()  # SIGKILL to the host process only
    proc.wait()
    if delay == "stopped":
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    # Event-driven (the supervisor sees the host's pipe close), but a sandbox killed while it
    # starts finishes starting first: on a busy 2-core machine that took just over 5 s once.
    deadline = time.monotonic() + 15
    while _pids_running(script) or (os.geteuid() == 0 and _uid_pids(uid)):
        assert time.monotonic() < deadline, "the sandbox outlived its host"
        time.sleep(0.05)


LEAVES_CHILDREN = ("import subprocess, sys\n"
                   "kids = [subprocess.Popen(['sleep', '60'], start_new_session=True) for _ in range(6)]\n"
                   "print('left', len(kids))\n")


def _back_to_back_under_load(box: Sandbox, marker: str, runs: int = 12) -> list:
    """`runs` submissions, each leaving detached children, one after the other while busy
    processes spin on every CPU; returns the failed results."""
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        failed = []
        for _ in range(runs):
            r = box.run(marker, [], {marker: LEAVES_CHILDREN})
            if r.returncode != 0 or r.stdout.strip() != "left 6":
                failed.append(r)
        return failed
    finally:
        for p in spin:
            p.kill()
            p.wait()


@needs_bwrap
def test_back_to_back_runs_under_load_start_clean_bwrap():
    """Each run's detached children die with it (bwrap's init used to wait for them, keeping the
    namespace alive) and the next run's process limit counts none of them (it failed with
    EAGAIN in its first fork)."""
    box = Sandbox("bwrap", Limits(timeout=20, cpu_seconds=20, max_processes=10))
    marker = f"leaver_{uuid.uuid4().hex}.py"
    before = _sleepers()
    failed = _back_to_back_under_load(box, marker)
    assert not failed, [(r.returncode, r.stderr[-300:]) for r in failed]
    assert _pids_running(marker) == [] and _sleepers() - before == set()
    if box.is_root:
        assert _uid_pids(box.uid) == set()


@pytest.mark.skipif(RLIMITS_PYTHON is None, reason="no Python interpreter the sandbox uid can run")
def test_back_to_back_runs_under_load_start_clean_rlimits():
    box = Sandbox("rlimits", Limits(timeout=20, cpu_seconds=20, max_processes=10), python=RLIMITS_PYTHON)
    before = {p for p in _sleepers()}
    failed = _back_to_back_under_load(box, f"leaver_{uuid.uuid4().hex}.py")
    assert not failed, [(r.returncode, r.stderr[-300:]) for r in failed]
    assert _sleepers() - before == set()  # the detached children died with their runs


def _sleepers() -> set[int]:
    """Live `sleep 60` processes."""
    out = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if f.read() == b"sleep\x0060\x00":
                        with open(f"/proc/{entry.name}/stat") as st:
                            if st.read().rpartition(")")[2].split()[0] != "Z":
                                out.add(int(entry.name))
            except OSError:
                continue
    return out
