"""Soak: thousands of tiny-model episodes through `leafe run`, SIGKILLed at random moments and
re-run until the run completes; nothing lost, nothing duplicated, no memory growth.

The script writes a spec into a temporary folder: the built-in tiny model `leafe:tiny-qwen2` (no
download), Sokoban with `max_steps` 4, methods `base` and `sft` (SFT on the BFS expert's moves
with a trainer checkpoint every 5 optimizer steps, so kills also land in training and in
checkpoint saves), and an evaluation of up to the 200 test rooms x `samples` per method, sized so
that both evaluations together hold about `--episodes` episodes; `runtime.threads: 1`.

1. Reference: `python -m leafe run SPEC --runs-dir ... --reports-dir ...` once, undisturbed, in
   its own folders. Its wall time and the time to its first stage set the kill window.
2. Soak: the same command in fresh folders, as a process group of its own; after a delay drawn
   from a seeded RNG, uniform over the kill window, SIGKILL the group, and start it again, until
   an attempt exits 0 (after `--max-kills` kills the next attempt runs undisturbed). The window
   is [0.5 s, first-stage time + 4 x work time / max-kills] (work time: the reference's wall
   time after its first stage started), so most attempts progress a little and the run ends
   after at most about `--max-kills` kills (16 of 25 in the committed run); kills land in the
   start-up, in training between and during its checkpoint saves, in both evaluations and in
   the report. Per kill the phase it hit is recorded (from the run's lock file: the stage
   running, `start-up` before the lock, `report, exit` after it) and the trainer checkpoints
   there were. --quick draws from the middle 60% of the reference's work time instead (its
   kills land in the evaluation).
3. Compare the soaked run with the reference, stage by stage: per evaluation, the records keyed
   by (kind, task, sample, step): **lost** (an episode of the reference missing), **duplicated**
   (an episode record present more than once), differing (the same key, other contents), the
   same for step records; metrics.json (without `usage`, which counts the work the kills
   wasted); the SFT checkpoint's weights and loss; the report's pass@k and pass^k per method;
   and `leafe plan --json` must call every stage done (the DONE markers' sizes, hashes and
   record counts hold). leafe seeds evaluation per chunk and re-runs an incomplete chunk whole,
   so a resumed run must reproduce the reference exactly: a difference is a finding.
4. Memory: every 0.2 s the RSS of the `leafe run` process and its children (psutil) and the
   episodes recorded so far (the evaluations' records.jsonl, read incrementally). The peak RSS
   per segment of `--segment` episodes (1000), for the reference (one process through all
   episodes: the growth figure) and the soak; growth = last segment's peak - first's. Samples
   before the first episode (start-up, training) are reported apart.

    python benchmarks/soak.py [--episodes 4000] [--seed 0] [--max-kills 25] [--segment 1000]
                              [--kill-window LO HI] [--workdir DIR] [--out FILE]
    python benchmarks/soak.py --quick    # base only, 48 episodes, 2 kills; < 1 min; writes nothing

Children run with OMP_NUM_THREADS=1 (the benchmark shares the machine). Results: stdout and
benchmarks/results/soak.json (not with --quick, unless --out is given); the run folders are
deleted unless --workdir is given or a check failed (then the folder is kept and named).
Exit status 1 when a check failed (records lost, duplicated or different, a crash on resume).
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
NAME = "soak"
TEST_ROOMS = 200  # Sokoban's test split (`test_size` default)
SPEC = """\
leafe: 1
name: {name}
seed: {seed}
env: {{use: sokoban, max_steps: {max_steps}, train_tasks: {train_tasks}, test_tasks: {test_tasks}}}
models:
  policy: {{name: "leafe:tiny-qwen2", max_tokens: 6, batch_size: 16, temperature: 1.0}}
budget: {{interactions_per_task: 8}}
methods:
{methods}
eval: {{samples: {samples}, k: [1, {samples}], batch_size: {eval_batch}}}
runtime: {{threads: 1}}
report: {{formats: [json]}}
"""
SFT = "  sft: {train: {epochs: 6, lr: 0.001, batch_size: 8, save_steps: 5}}"
EPISODE_LINE = b'{"kind": "episode"'  # how RecordLog writes an episode record (json.dumps)
LOG_EVENTS = re.compile(r"▶ (?:resuming|re-running|running) \S+|resuming from checkpoint-\d+|"
                        r"skipped incomplete trainer checkpoints[^\n]*|training from the start|⚠[^\n]*")


def config(episodes: int, quick: bool, seed: int) -> dict:
    """The spec's sizes: both methods' evaluations together about `episodes` episodes."""
    if quick:
        return {"name": NAME, "seed": seed, "max_steps": 4, "train_tasks": 8, "test_tasks": 12, "samples": 4,
                "eval_batch": 8, "methods": ["base"]}
    methods = ["base", "sft"]
    samples = max(2, math.ceil(episodes / (len(methods) * TEST_ROOMS)))
    tasks = max(1, min(TEST_ROOMS, round(episodes / (len(methods) * samples))))
    return {"name": NAME, "seed": seed, "max_steps": 4, "train_tasks": 64, "test_tasks": tasks,
            "samples": samples, "eval_batch": 16, "methods": methods}


def spec_text(cfg: dict) -> str:
    methods = "\n".join("  base: {}" if m == "base" else SFT for m in cfg["methods"])
    return SPEC.format(methods=methods, **{k: v for k, v in cfg.items() if k != "methods"})


def child_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", COLUMNS="200", NO_COLOR="1")
    return env


# -- watching a run ----------------------------------------------------------------------------

class EpisodeCounter:
    """Episode records in `<run>/eval.*/records.jsonl`, read incrementally (a file rewritten on
    resume, shorter or replaced, is counted again from its start)."""

    def __init__(self, run_root: Path):
        self.run_root = run_root
        self.files: dict[Path, tuple[int, int, int]] = {}  # path -> (inode, offset, episodes)

    def count(self) -> int:
        total = 0
        for path in sorted(self.run_root.glob("eval.*/records.jsonl")):
            try:
                st = path.stat()
                ino, offset, n = self.files.get(path, (st.st_ino, 0, 0))
                if ino != st.st_ino or st.st_size < offset:
                    ino, offset, n = st.st_ino, 0, 0
                if st.st_size > offset:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        data = f.read(st.st_size - offset)
                    whole = data[: data.rfind(b"\n") + 1]  # a line being written waits for the next look
                    n += sum(1 for line in whole.split(b"\n") if line.startswith(EPISODE_LINE))
                    offset += len(whole)
                self.files[path] = (ino, offset, n)
                total += n
            except FileNotFoundError:
                self.files.pop(path, None)
        return total


def lock_info(run_root: Path) -> dict | None:
    try:
        return json.loads((run_root / ".lock").read_text() or "null")
    except (OSError, ValueError):
        return None


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS of the process, RSS of it and its descendants), bytes."""
    own = proc.memory_info().rss
    total = own
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return own, total


class Monitor(threading.Thread):
    """Samples (seconds since start, episodes recorded, RSS of the process, RSS of its tree) and
    the stage the run's lock names, every `interval` seconds until `stop`."""

    def __init__(self, pid: int, run_root: Path, counter: EpisodeCounter, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.run_root, self.counter, self.interval = pid, run_root, counter, interval
        self.samples: list[tuple[float, int, int, int]] = []
        self.stages_seen: list[str] = []
        self.first_stage_s: float | None = None
        self.held = False  # the run took its lock
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            try:
                own, total = tree_rss(proc)
            except psutil.Error:
                break
            t = time.monotonic() - self.t0
            self.samples.append((round(t, 2), self.counter.count(), own, total))
            info = lock_info(self.run_root)
            if info and info.get("pid") == self.pid:
                self.held = True
            if info and info.get("pid") == self.pid and info.get("stage"):
                if self.first_stage_s is None:
                    self.first_stage_s = t
                if not self.stages_seen or self.stages_seen[-1] != info["stage"]:
                    self.stages_seen.append(info["stage"])
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def phase(run_root: Path, pid: int, held: bool) -> str:
    """What the run was doing: the stage its lock names (`between stages`: none); `start-up`
    before it took the lock; `report, exit` after it let the lock go (the report is written
    then)."""
    info = lock_info(run_root)
    if not info or info.get("pid") != pid:
        return "report, exit" if held else "start-up"
    return info.get("stage") or "between stages"


def trainer_checkpoints(run_root: Path) -> list[str]:
    return sorted(f"{ck.parent.parent.name.split('-')[0]}/{ck.name}"
                  for ck in run_root.glob("*/trainer/checkpoint-*"))


def attempt(spec: Path, runs: Path, reports: Path, log: Path, counter: EpisodeCounter,
            kill_after: float | None, timeout: float) -> dict:
    """One `leafe run`; SIGKILL its process group after `kill_after` seconds (None: let it end,
    or kill it after `timeout` seconds as hung)."""
    cmd = [sys.executable, "-m", "leafe", "run", str(spec), "--runs-dir", str(runs), "--reports-dir", str(reports)]
    run_root = runs / NAME
    with open(log, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        mon = Monitor(proc.pid, run_root, counter)
        mon.t0 = t0
        mon.start()
        limit = kill_after if kill_after is not None else timeout
        killed, hit, episodes_at_kill, checkpoints = False, None, None, None
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            hit = phase(run_root, proc.pid, mon.held)
            episodes_at_kill = counter.count()
            checkpoints = trainer_checkpoints(run_root)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        wall = time.monotonic() - t0
        mon.stop()
    leftover = _group_alive(proc.pid)
    text = log.read_text(errors="replace")
    res = {"rc": proc.returncode, "wall_s": round(wall, 2), "killed": killed,
           "kill_after_s": None if kill_after is None else round(kill_after, 2),
           "hung": killed and kill_after is None, "phase": hit, "episodes_at_kill": episodes_at_kill,
           "trainer_checkpoints_at_kill": checkpoints,
           "episodes_after": counter.count(), "stages_seen": mon.stages_seen,
           "first_stage_s": None if mon.first_stage_s is None else round(mon.first_stage_s, 2),
           "events": LOG_EVENTS.findall(text), "leftover_processes": leftover}
    if not killed and proc.returncode != 0:
        res["log_tail"] = text[-3000:]
    res["_samples"] = mon.samples
    return res


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- comparing ---------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_dirs(run_root: Path) -> dict[str, Path]:
    out = {}
    for d in sorted(run_root.iterdir()):
        if d.is_dir() and (d / "stage.json").exists():
            out[json.loads((d / "stage.json").read_text())["id"]] = d
    return out


def compare_eval(ref: Path, got: Path) -> dict:
    key = lambda r: (r["kind"], r["task"], r["sample"], r.get("step"))  # noqa: E731
    ref_recs, got_recs = read_jsonl(ref / "records.jsonl"), read_jsonl(got / "records.jsonl")
    ref_map = {key(r): r for r in ref_recs}
    got_count = collections.Counter(key(r) for r in got_recs)
    got_first: dict = {}
    for r in got_recs:
        got_first.setdefault(key(r), r)
    out: dict = {"records_reference": len(ref_recs), "records": len(got_recs),
                 "reference_duplicates": len(ref_recs) - len(ref_map)}
    for kind, label in (("episode", "episodes"), ("step", "steps")):
        ref_keys = [k for k in ref_map if k[0] == kind]
        lost = [k for k in ref_keys if k not in got_count]
        dup = sum(c - 1 for k, c in got_count.items() if k[0] == kind and c > 1)
        extra = [k for k in got_count if k[0] == kind and k not in ref_map]
        differ = [k for k in ref_keys if k in got_first and got_first[k] != ref_map[k]]
        out[label] = {"reference": len(ref_keys), "got": sum(c for k, c in got_count.items() if k[0] == kind),
                      "lost": len(lost), "duplicated": dup, "extra": len(extra), "differing": len(differ),
                      "examples": [list(k[1:3]) for k in (lost + extra + differ)[:5]]}
    out["same_order"] = [key(r) for r in ref_recs] == [key(r) for r in got_recs]
    out["byte_identical"] = _sha(ref / "records.jsonl") == _sha(got / "records.jsonl")
    m_ref, m_got = (json.loads((d / "metrics.json").read_text()) for d in (ref, got))
    u_ref, u_got = m_ref.pop("usage", None), m_got.pop("usage", None)
    out["metrics_equal"] = m_ref == m_got
    out["metrics_differing_keys"] = sorted(k for k in set(m_ref) | set(m_got) if m_ref.get(k) != m_got.get(k))
    out["usage_samples"] = {"reference": _usage_samples(u_ref), "soak": _usage_samples(u_got)}
    return out


def _usage_samples(u: dict | None) -> int | None:
    return None if not u else sum(v.get("samples", 0) for v in u.values() if isinstance(v, dict))


def compare_train(ref: Path, got: Path) -> dict:
    m_ref, m_got = (json.loads((d / "metrics.json").read_text()) for d in (ref, got))
    keys = ("steps", "train_loss", "first_loss", "last_loss")
    out: dict = {"resumed": m_got.get("resumed"), "steps": m_got.get("steps"),
                 "loss_max_rel_diff": max((abs(m_got[k] - m_ref[k]) / max(abs(m_ref[k]), 1e-12)
                                           for k in keys[1:] if isinstance(m_ref.get(k), (int, float))
                                           and isinstance(m_got.get(k), (int, float))), default=None),
                 "steps_equal": m_ref.get("steps") == m_got.get("steps"),
                 "demos_identical": _sha(ref / "demos.jsonl") == _sha(got / "demos.jsonl")
                 if (ref / "demos.jsonl").exists() else None}
    w_ref, w_got = ref / "checkpoint" / "model.safetensors", got / "checkpoint" / "model.safetensors"
    out["weights_identical"] = _sha(w_ref) == _sha(w_got)
    if not out["weights_identical"]:
        from safetensors.numpy import load_file

        a, b = load_file(str(w_ref)), load_file(str(w_got))
        out["weights_max_abs_diff"] = (float(max(abs(a[k].astype("float64") - b[k].astype("float64")).max()
                                                 for k in a)) if a.keys() == b.keys() else "different tensors")
    return out


def report_rows(path: Path) -> dict:
    rep = json.loads(path.read_text())
    return {r["method"]: {"pass@k": r.get("pass@k"), "pass^k": r.get("pass^k")} for r in rep["rows"]}


def plan_status(spec: Path, runs: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "leafe", "plan", str(spec), "--runs-dir", str(runs), "--json"],
                       cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return {"error": (r.stdout + r.stderr)[-2000:]}
    return {s["id"]: s["status"] for s in json.loads(r.stdout)["stages"]}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rss_segments(samples: list[tuple[float, int, int, int]], segment: int, total: int) -> dict:
    """Peak RSS (MB, the process tree) per segment of `segment` recorded episodes, and before
    the first; growth: the last segment's peak against the first's."""
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    before = [s[3] for s in samples if s[1] == 0]
    last_index = max(0, (total - 1) // segment)
    peaks: dict[int, int] = {}
    for _, eps, _, rss in samples:
        if eps > 0:
            i = min((eps - 1) // segment, last_index)
            peaks[i] = max(peaks.get(i, 0), rss)
    rows = [{"episodes": f"{i * segment + 1}-{min((i + 1) * segment, total)}", "peak_rss_mb": mb(peaks[i])}
            for i in sorted(peaks)]
    out: dict = {"segment": segment, "before_first_episode_peak_mb": mb(max(before)) if before else None,
                 "segments": rows, "peak_mb": mb(max(s[3] for s in samples)) if samples else None,
                 "samples": len(samples)}
    if len(rows) >= 2:
        first, last = rows[0]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
        out["growth_mb"] = round(last - first, 1)
        out["growth_pct"] = round(100 * (last - first) / first, 1)
    return out


# -- the benchmark -----------------------------------------------------------------------------

def soak(workdir: Path, cfg: dict, seed: int, max_kills: int, segment: int, quick: bool,
         window: tuple[float, float] | None, say=print) -> dict:
    spec = workdir / f"{NAME}.yaml"
    spec.write_text(spec_text(cfg))
    total = len(cfg["methods"]) * cfg["test_tasks"] * cfg["samples"]
    say(f"spec: {spec} ({total} evaluation episodes: {len(cfg['methods'])} method(s) x {cfg['test_tasks']} "
        f"rooms x {cfg['samples']} samples)")

    # 1. reference
    ref_runs, ref_reports = workdir / "reference" / "runs", workdir / "reference" / "reports"
    counter = EpisodeCounter(ref_runs / NAME)
    t0 = time.monotonic()
    ref = attempt(spec, ref_runs, ref_reports, workdir / "reference.log", counter, None, timeout=3600)
    ref_samples = ref.pop("_samples")
    if ref["rc"] != 0:
        raise SystemExit(f"the reference run failed (rc {ref['rc']}):\n{ref.get('log_tail', '')}")
    first = ref["first_stage_s"] or 0.0
    work = max(1.0, ref["wall_s"] - first)
    if window is None:
        window = ((first + 0.2 * work, first + 0.8 * work) if quick
                  else (0.5, first + 4 * work / max(1, max_kills)))
    say(f"reference: {ref['wall_s']:.1f} s (first stage after {first:.1f} s); kill window "
        f"{window[0]:.1f}-{window[1]:.1f} s")

    # 2. soak
    runs, reports = workdir / "soak" / "runs", workdir / "soak" / "reports"
    counter = EpisodeCounter(runs / NAME)
    rng = random.Random(seed)
    attempts, samples, offset = [], [], 0.0
    t_soak = time.monotonic()
    while True:
        kills = sum(a["killed"] for a in attempts)
        delay = rng.uniform(*window) if kills < max_kills else None
        before = counter.count()
        a = attempt(spec, runs, reports, workdir / f"attempt-{len(attempts):03d}.log", counter, delay,
                    timeout=max(600.0, 5 * ref["wall_s"]))
        a["episodes_before"] = before
        samples += [(t + offset, e, own, tot) for t, e, own, tot in a.pop("_samples")]
        offset += a["wall_s"]
        attempts.append(a)
        what = (f"killed after {a['kill_after_s']:.1f} s in {a['phase']}" if a["killed"]
                else f"exit {a['rc']} after {a['wall_s']:.1f} s")
        say(f"  attempt {len(attempts):3d}: {what}; {a['episodes_after']}/{total} episodes recorded")
        if not a["killed"] and a["rc"] == 0:
            break
        if a.get("hung") or (not a["killed"] and a["rc"] != 0):
            how = "hung" if a.get("hung") else f"failed (rc {a['rc']})"
            say(f"  attempt {len(attempts)} {how}; stopping")
            break
    soak_wall = time.monotonic() - t_soak
    completed = attempts[-1]["rc"] == 0 and not attempts[-1]["killed"]

    # 3. compare
    checks: dict = {"completed": completed}
    stages_ref, stages_got = stage_dirs(ref_runs / NAME), stage_dirs(runs / NAME)
    comparison: dict = {}
    if completed:
        for sid, d in stages_ref.items():
            if sid not in stages_got:
                comparison[sid] = {"missing": True}
            elif sid.startswith("eval."):
                comparison[sid] = compare_eval(d, stages_got[sid])
            else:
                comparison[sid] = compare_train(d, stages_got[sid])
        comparison["report"] = {"reference": report_rows(ref_reports / f"{NAME}.json"),
                                "soak": report_rows(reports / f"{NAME}.json")}
        comparison["report"]["equal"] = comparison["report"]["reference"] == comparison["report"]["soak"]
        comparison["plan_status"] = plan_status(spec, runs)
    evals = [c for s, c in comparison.items() if s.startswith("eval.")]
    lost = sum(c["episodes"]["lost"] for c in evals) if completed else None
    dup = sum(c["episodes"]["duplicated"] for c in evals) if completed else None
    checks.update({
        "episodes_lost": lost, "episodes_duplicated": dup,
        "episodes_differing": sum(c["episodes"]["differing"] + c["episodes"]["extra"] for c in evals) if completed else None,
        "steps_lost": sum(c["steps"]["lost"] for c in evals) if completed else None,
        "steps_duplicated": sum(c["steps"]["duplicated"] for c in evals) if completed else None,
        "steps_differing": sum(c["steps"]["differing"] + c["steps"]["extra"] for c in evals) if completed else None,
        "metrics_equal": all(c["metrics_equal"] for c in evals) if completed else None,
        "report_equal": comparison.get("report", {}).get("equal"),
        "train_identical": all(c.get("weights_identical") and c.get("steps_equal")
                               for s, c in comparison.items() if s.endswith(".train")) if completed else None,
        "all_stages_done": completed and all(v in ("done", "always") for v in comparison["plan_status"].values()),
        "no_leftover_processes": not any(a["leftover_processes"] for a in attempts),
    })
    checks["ok"] = bool(completed and lost == 0 and dup == 0 and checks["episodes_differing"] == 0
                        and checks["steps_lost"] == 0 and checks["steps_duplicated"] == 0
                        and checks["steps_differing"] == 0 and checks["metrics_equal"] and checks["report_equal"]
                        and checks["train_identical"] and checks["all_stages_done"]
                        and checks["no_leftover_processes"])

    kills = [a for a in attempts if a["killed"]]
    events = collections.Counter(re.sub(r"checkpoint-\d+", "checkpoint-N", e) for a in attempts[1:]
                                 for e in a["events"])
    ref_rss, soak_rss = rss_segments(ref_samples, segment, total), rss_segments(samples, segment, total)
    return {
        "episodes": total, "spec": spec_text(cfg), "config": cfg,
        "kill_window_s": [round(window[0], 2), round(window[1], 2)],
        "reference": {k: v for k, v in ref.items() if k not in ("events",)} | {"rss": ref_rss},
        "soak": {"wall_s": round(soak_wall, 1), "attempts": len(attempts), "kills": len(kills),
                 "resumes": len(attempts) - 1,
                 "kills_by_phase": dict(collections.Counter(a["phase"] for a in kills)),
                 "kills_after_new_episodes": sum(1 for a in kills if a["episodes_at_kill"] > a["episodes_before"]),
                 "resume_events": dict(sorted(events.items())), "rss": soak_rss,
                 "attempt_log": attempts},
        "comparison": comparison, "checks": checks,
        "wall_s": round(time.monotonic() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=4000, help="evaluation episodes, both methods together")
    ap.add_argument("--seed", type=int, default=0, help="the kill delays' RNG seed (and the spec's seed)")
    ap.add_argument("--max-kills", type=int, default=25, help="kills at most; then the run finishes undisturbed")
    ap.add_argument("--segment", type=int, default=1000, help="episodes per RSS segment")
    ap.add_argument("--kill-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                    help="seconds after start; default from the reference run (see the module docstring)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the spec, runs and logs here")
    ap.add_argument("--quick", action="store_true", help="base only, 48 episodes, 2 kills; writes nothing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.max_kills, args.segment = min(args.max_kills, 2), 24
    out = args.out or (None if args.quick else ROOT / "benchmarks" / "results" / "soak.json")
    cfg = config(args.episodes, args.quick, args.seed)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="leafe-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    res = soak(workdir, cfg, args.seed, args.max_kills, args.segment, args.quick,
               tuple(args.kill_window) if args.kill_window else None, say=lambda s: print(s, flush=True))
    result = {
        "benchmark": "benchmarks/soak.py",
        "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_avg_start": [round(x, 2) for x in load_start],
                 "load_avg_end": [round(x, 2) for x in os.getloadavg()], "OMP_NUM_THREADS": "1"},
        "settings": {"episodes_asked": args.episodes, "seed": args.seed, "max_kills": args.max_kills,
                     "segment": args.segment, "quick": args.quick},
        **res,
    }
    print_summary(result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    if args.workdir is None and result["checks"]["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not result["checks"]["ok"]:
        print(f"kept the runs and logs for inspection: {workdir}")
    sys.exit(0 if result["checks"]["ok"] else 1)


def print_summary(r: dict) -> None:
    s, c, ref = r["soak"], r["checks"], r["reference"]
    print(f"\nsoak: {r['episodes']} episodes; {s['kills']} kills ({s['kills_after_new_episodes']} after new episodes were recorded), "
          f"{s['resumes']} resumed runs, {s['attempts']} attempts in {s['wall_s']:.0f} s "
          f"(reference {ref['wall_s']:.0f} s; benchmark {r['wall_s']:.0f} s)")
    print(f"  kills by phase: {s['kills_by_phase']}")
    if s["resume_events"]:
        print(f"  on resume: {s['resume_events']}")
    print(f"  episodes lost {c['episodes_lost']}, duplicated {c['episodes_duplicated']}, differing "
          f"{c['episodes_differing']}; step records lost {c['steps_lost']}, duplicated {c['steps_duplicated']}, "
          f"differing {c['steps_differing']}")
    print(f"  metrics.json equal {c['metrics_equal']}, report pass@k equal {c['report_equal']}, training "
          f"identical {c['train_identical']}, every stage done {c['all_stages_done']}, no leftover processes "
          f"{c['no_leftover_processes']}")
    for label, rss in (("reference", ref["rss"]), ("soak", s["rss"])):
        segs = ", ".join(f"{x['episodes']}: {x['peak_rss_mb']:.0f}" for x in rss["segments"])
        growth = f"; growth {rss['growth_mb']:+.1f} MB ({rss['growth_pct']:+.1f}%)" if "growth_mb" in rss else ""
        print(f"  peak RSS, {label} (MB per {rss['segment']} episodes): before the first episode "
              f"{rss['before_first_episode_peak_mb']}; {segs}{growth}")
    print(f"  {'OK' if c['ok'] else 'FAILED'}")


if __name__ == "__main__":
    main()
