"""torch's CPU threads on an idle and on a loaded machine (`runtime.threads`, leafe/threads.py).

One fixed workload: a batch of Sokoban first-step prompts (the quickstart's environment and
prompt template, distinct rooms), sampled with fixed seeds (the same tokens at every setting),
`--repeats` times per setting; the figure is the median seconds per `generate` call. Settings:
leafe's default rule for `runtime.threads: null` (half the usable cores), 1 thread, and all
usable cores (what torch takes by itself: one thread per physical core). Conditions: idle
(nothing started by the benchmark), and loaded: the benchmark starts busy processes that spin
(pure Python, pinned one per core) on all usable cores but one, as another job would.

    python benchmarks/threads.py [--models tiny smollm2] [--batch 16] [--tokens 16] [--repeats 5]
    python benchmarks/threads.py --quick     # a seconds-long check that it runs; writes nothing

"Idle" means idle only when nothing else runs: the load average before each condition is
recorded, and a run whose idle condition starts under load says so (`idle_was_busy`). A call
slower than `--max-seconds` ends that setting's repeats (recorded as `cut_short`). Results:
stdout and benchmarks/results/threads.json (not with --quick, unless --out is given).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from leafe.progress import quiet_libraries  # noqa: E402

quiet_libraries()

from leafe import envs, models, threads  # noqa: E402
from leafe.loop import render_conversation  # noqa: E402
from leafe.models.base import Sampling  # noqa: E402
from leafe.spec import load_spec  # noqa: E402
from leafe.spec.schema import TransformersModelSpec  # noqa: E402

NAMES = {"tiny": "leafe:tiny-qwen2", "smollm2": "leafe:smollm2-135m-instruct"}
ROOT = Path(__file__).resolve().parents[1]
SPIN = "import os, sys\ntry:\n    os.sched_setaffinity(0, {int(sys.argv[1])})\nexcept (AttributeError, OSError):\n    pass\nwhile True:\n    pass\n"


def conversations(n: int) -> list:
    """The first-step conversations of `n` distinct Sokoban test rooms (the quickstart's prompts)."""
    loaded = load_spec(ROOT / "specs" / "quickstart.yaml")
    env_spec, options = loaded.spec.env, loaded.env_options.model_dump()
    env = envs.make("sokoban", **options)
    tasks = env.tasks("test") + env.tasks("train")
    out = []
    for task in tasks[:n]:
        out.append(render_conversation(env_spec, env.reset(task), [], 0))
    env.close()
    return out


def start_load(cores: list[int]) -> list[subprocess.Popen]:
    """One spinning process per core in `cores` (their own children; stopped by `stop_load`)."""
    return [subprocess.Popen([sys.executable, "-c", SPIN, str(c)], stdin=subprocess.DEVNULL) for c in cores]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def measure(model, convs, sampling, seeds, n_threads: int, repeats: int, max_seconds: float) -> dict:
    import torch

    torch.set_num_threads(n_threads)
    model.generate(convs[:1], Sampling(temperature=sampling.temperature, max_tokens=2), seeds=seeds[:1])  # warm-up
    times, tokens, cut = [], 0, False
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(convs, sampling, seeds=seeds)
        times.append(time.perf_counter() - t0)
        tokens = sum(c.completion_tokens for c in out)
        if times[-1] > max_seconds:
            cut = len(times) < repeats
            break
    return {"threads": n_threads, "torch_threads": torch.get_num_threads(),
            "seconds_median": round(statistics.median(times), 4), "seconds": [round(t, 4) for t in times],
            "completion_tokens": tokens, "cut_short": cut}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(NAMES))
    ap.add_argument("--batch", type=int, default=16, help="conversations per generate call")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per sample")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="a call slower than this ends the setting")
    ap.add_argument("--conditions", nargs="+", default=["idle", "loaded"], choices=["idle", "loaded"])
    ap.add_argument("--quick", action="store_true", help="tiny model, batch 4, 4 tokens, 2 repeats; writes nothing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.models, args.batch, args.tokens, args.repeats = ["tiny"], 4, 4, 2
    out = args.out or (None if args.quick else ROOT / "benchmarks" / "results" / "threads.json")

    usable = threads.usable_cores()
    rule = threads.resolve(None, environ={}, cores=usable).threads
    affinity = sorted(threads.affinity())
    settings = {"default": rule, "one": 1, "all": usable}
    convs = conversations(args.batch)
    seeds = list(range(args.batch))
    sampling = Sampling(temperature=0.7, max_tokens=args.tokens, stop=[])
    result: dict = {
        "benchmark": "benchmarks/threads.py",
        "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "affinity": len(affinity),
                 "usable_cores": usable, "torch": torch.__version__,
                 "torch_default_threads": torch.get_num_threads(),
                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "workload": {"batch": args.batch, "new_tokens": args.tokens, "repeats": args.repeats,
                     "prompts": "Sokoban first steps, quickstart template", "temperature": 0.7},
        "settings": settings, "rule": "runtime.threads null: half the usable cores, at least 1",
        "quick": args.quick, "models": {},
    }
    for key in args.models:
        model = models.load(TransformersModelSpec(name=NAMES[key], batch_size=args.batch))
        entry: dict = {}
        for condition in args.conditions:
            load_before = os.getloadavg()
            procs = start_load(affinity[1:] or affinity) if condition == "loaded" else []
            try:
                if procs:
                    time.sleep(1.0)  # let the spinners take their cores
                rows = {name: measure(model, convs, sampling, seeds, n, args.repeats, args.max_seconds)
                        for name, n in settings.items()}
            finally:
                stop_load(procs)
            base = rows["one"]["seconds_median"]
            for name, row in rows.items():
                row["vs_one_thread"] = round(row["seconds_median"] / base, 2)
            entry[condition] = {"competing_processes": len(procs),
                                "loadavg_before": [round(x, 2) for x in load_before],
                                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                                "idle_was_busy": condition == "idle" and load_before[0] > 0.5,
                                "rows": rows}
            for name, row in rows.items():
                print(f"{key:8s} {condition:6s} {name:8s} ({row['threads']:2d} threads): "
                      f"{row['seconds_median']:8.3f} s per call ({row['vs_one_thread']:.2f}x one thread)"
                      + (" [cut short]" if row["cut_short"] else ""))
            if entry[condition]["idle_was_busy"]:
                print(f"  note: the machine was busy before the idle condition (load {load_before[0]:.2f}): "
                      "these are not idle figures")
        result["models"][key] = entry
        model.close()
    torch.set_num_threads(result["host"]["torch_default_threads"])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {out}")


if __name__ == "__main__":
    main()
