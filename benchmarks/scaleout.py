"""Scale-out benchmark: environment steps per second with the local worker pool vs Ray actors
(`runtime.engine: ray`, a private local Ray instance), 1, 2 and 4 workers, on Sokoban (a fast
environment: the message costs more than the step) and ScienceWorld (a slow one, a JVM per
environment), plus the per-call overhead (median round trip of a no-op call).

    LEAFE_CACHE=/tmp/exp/bench_cache python benchmarks/scaleout.py [--envs sokoban sciworld]
        [--workers 1 2 4] [--quick] [--out benchmarks/results/scaleout.json]

Throughput is measured as in benchmarks/envs.py (B environments in lockstep through the
submit/collect API, seeded actions, identical trajectories in every configuration: checked).
Startup (processes, actors, JVMs, first resets) is not timed. Compare ratios measured in one
run; absolute figures depend on the machine and its load (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from envs import BENCHES, lockstep, package_versions, throughput_setup  # noqa: E402

STEPS = {"sokoban": 3000, "sciworld": 240}
BATCH = 8
PINGS = 300


def _pool(engine: str, adapter: str, options: dict, n: int):
    if engine == "local":
        from leafe.envs.workers import WorkerPool

        return WorkerPool(adapter, options, n=n, timeout=300.0)
    from leafe.envs.ray_pool import RayPool
    from leafe.spec.schema import RaySpec

    return RayPool(adapter, options, n=n, timeout=300.0, ray_spec=RaySpec(num_cpus=os.cpu_count()))


def call_overhead(engine: str, adapter: str, options: dict) -> dict[str, float]:
    """Median and p90 round trip (ms) of a no-op call on one worker."""
    with _pool(engine, adapter, options, 1) as pool:
        pool.wait_ready()
        times = []
        for _ in range(PINGS):
            t = time.perf_counter()
            if engine == "local":
                w = pool._workers[0]
                w.wait(w.gen, w.send(w.gen, 0, "ping"))
            else:
                import ray

                s = pool._slots[0]
                ray.get(s.actor.ping.remote())
            times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * len(times))], 3)}


def throughput(key: str, workers: list[int], steps: int, seed: int = 0) -> dict[str, Any]:
    b = BENCHES[key]
    options, tasks, actor, cap = throughput_setup(key)
    rows = []
    for engine in ("local", "ray"):
        for n in workers:
            t0 = time.perf_counter()
            with _pool(engine, b.adapter, options, n) as pool:
                pool.wait_ready()
                start = time.perf_counter() - t0
                row = lockstep(pool.make, key, actor, tasks, steps, BATCH, cap, seed)
            rows.append({"engine": engine, "workers": n, "batch": BATCH, "start_s": round(start, 3), **row})
            print(f"  {engine:5} {n} worker(s): {row['steps_per_s']:9.1f} steps/s (start {start:.1f} s)", flush=True)
    base = {r["workers"]: r["steps_per_s"] for r in rows if r["engine"] == "local"}
    for r in rows:
        r["ray_vs_local"] = round(r["steps_per_s"] / base[r["workers"]], 2) if r["engine"] == "ray" else 1.0
    same = len({r["trajectory"] for r in rows}) == 1
    return {"rows": rows, "same_trajectory": same,
            "call_overhead": {e: call_overhead(e, b.adapter, options) for e in ("local", "ray")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--envs", nargs="+", default=["sokoban", "sciworld"], choices=list(BENCHES))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--quick", action="store_true", help="a tenth of the steps")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaleout.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="leafe-ray-"))
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    results = {}
    for key in args.envs:
        print(f"[{time.perf_counter() - t0:6.1f} s] {key}", flush=True)
        steps = STEPS.get(key, 500) // (10 if args.quick else 1)
        results[key] = throughput(key, args.workers, steps)
        print(f"  call overhead: {results[key]['call_overhead']}", flush=True)
    report = {
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "load_avg_start": [round(x, 2) for x in load_start],
                 "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "packages": {**package_versions(), "ray": _version("ray")},
        "settings": {"envs": args.envs, "workers": args.workers, "batch": BATCH, "quick": args.quick,
                     "wall_s": round(time.perf_counter() - t0, 1)},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
