"""Agent-loop throughput: policy steps per second at batch 1 vs batch 16, and the share of wall
time spent outside `generate` (framework overhead: prompt rendering, parsing, env steps,
recording), for the tiny test model and the real SmolLM2-135M-Instruct, on Sokoban.

    python benchmarks/agent_loop.py [--models tiny smollm2] [--episodes 16] [--steps 5]
                                    [--repeats 5] [--threads 1]

Each repeat runs batch 1 then batch 16 (interleaved, so a change in the machine's load hits
both); the figures are medians over the repeats, and the ratio is the median of the repeats'
ratios. torch runs on `--threads` intra-op threads (default 1: the same for both batch sizes,
and a ratio that holds on a machine shared with other jobs; with more threads than idle cores
torch's spinning threads slow both sizes unevenly). Ratios measured in one run are the figures
to compare; absolute times vary with the machine and its load (recorded: the load average).
Results go to stdout and benchmarks/results/agent_loop.json, one entry per model (a run
replaces the entries of the models it measured and keeps the others).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from leafe.progress import quiet_libraries  # noqa: E402

quiet_libraries()

from leafe import envs, models  # noqa: E402
from leafe.loop import LoopStats, run_episodes  # noqa: E402
from leafe.models.base import Sampling  # noqa: E402
from leafe.spec import load_spec  # noqa: E402
from leafe.spec.schema import TransformersModelSpec  # noqa: E402

NAMES = {"tiny": "leafe:tiny-qwen2", "smollm2": "leafe:smollm2-135m-instruct"}
ROOT = Path(__file__).resolve().parents[1]


def measure(model, env_spec, env_options, episodes: int, batch: int, steps: int, seed: int = 0) -> dict:
    env_spec = env_spec.model_copy(update={"max_steps": steps})
    tasks = envs.make("sokoban", **env_options).tasks("test")
    pairs = [(tasks[i % len(tasks)], i) for i in range(episodes)]
    stats = LoopStats()
    t0 = time.perf_counter()
    for i in range(0, episodes, batch):
        run_episodes(lambda: envs.make("sokoban", **env_options), pairs[i:i + batch], model,
                     Sampling(temperature=0.7, max_tokens=16), env_spec, seed=seed + i, stats=stats)
    wall = time.perf_counter() - t0
    return {"batch": batch, "episodes": episodes, "policy_steps": stats.policy_steps,
            "env_steps": stats.env_steps, "wall_s": round(wall, 3),
            "generate_s": round(stats.generate_s, 3),
            "steps_per_s": round(stats.policy_steps / wall, 2),
            "outside_generate_share": round(1 - stats.generate_s / wall, 4),
            "completion_tokens": stats.completion_tokens}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(NAMES))
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="runs of each batch size; medians are reported")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both batch sizes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_spec(ROOT / "specs" / "quickstart.yaml")
    env_spec, env_options = loaded.spec.env, loaded.env_options.model_dump()
    out = ROOT / "benchmarks" / "results" / "agent_loop.json"
    try:
        entries = json.loads(out.read_text()).get("models", {})
    except (OSError, ValueError):
        entries = {}
    for key in args.models:
        model = models.load(TransformersModelSpec(name=NAMES[key], batch_size=16))
        measure(model, env_spec, env_options, 2, 2, 1)  # warm-up
        load_before = os.getloadavg()
        runs = {1: [], 16: []}
        for _ in range(args.repeats):
            for b in (1, 16):
                runs[b].append(measure(model, env_spec, env_options, args.episodes, b, args.steps))
        ratios = [r16["steps_per_s"] / r1["steps_per_s"] for r1, r16 in zip(runs[1], runs[16])]
        summary = {}
        for b in (1, 16):
            rate = [r["steps_per_s"] for r in runs[b]]
            share = [r["outside_generate_share"] for r in runs[b]]
            summary[f"batch_{b}"] = {"steps_per_s_median": round(statistics.median(rate), 2),
                                     "steps_per_s_min": min(rate), "steps_per_s_max": max(rate),
                                     "outside_generate_share_median": round(statistics.median(share), 4)}
            print(f"{key:8s} batch {b:2d}: {statistics.median(rate):7.2f} steps/s (median of {args.repeats}; "
                  f"{min(rate):.2f}-{max(rate):.2f}), {100 * statistics.median(share):5.2f}% of wall time outside generate")
        print(f"{key:8s} batch 16 / batch 1 throughput: {statistics.median(ratios):.2f}x "
              f"(median; repeats {min(ratios):.2f}-{max(ratios):.2f})")
        entries[key] = {
            "model": NAMES[key],
            "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "note": (f"torch on {torch.get_num_threads()} intra-op thread(s) for both batch sizes; "
                     + (f"the machine was busy (load average {load_before[0]:.1f} on {os.cpu_count()} CPUs before "
                        "the run): " if load_before[0] > 0.5 else "")
                     + "compare the ratio within a run, not absolute rates"),
            "conditions": {"torch_threads": torch.get_num_threads(),
                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "repeats": args.repeats,
                           "episodes": args.episodes, "steps": args.steps, "batch_sizes": [1, 16],
                           "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                           "loadavg_before": [round(x, 2) for x in load_before],
                           "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
            **summary,
            "ratio_16_over_1_median": round(statistics.median(ratios), 2),
            "ratio_16_over_1_per_repeat": [round(r, 2) for r in ratios],
            "runs": [dict(r, model=key) for b in (1, 16) for r in runs[b]],
        }
        model.close()
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"benchmark": "benchmarks/agent_loop.py", "models": entries}, indent=2) + "\n")


if __name__ == "__main__":
    main()
