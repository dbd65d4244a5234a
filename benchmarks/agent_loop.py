"""Agent-loop throughput: policy steps per second at batch 1 vs batch 16, and the share of wall
time spent outside `generate` (framework overhead: prompt rendering, parsing, env steps,
recording), for the tiny test model and the real SmolLM2-135M-Instruct, on Sokoban.

    python benchmarks/agent_loop.py [--models tiny smollm2] [--episodes 16] [--steps 5]

Ratios measured in one run are the figures to compare; absolute times vary with the machine.
Results go to stdout and benchmarks/results/agent_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(NAMES))
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    loaded = load_spec(ROOT / "specs" / "quickstart.yaml")
    env_spec, env_options = loaded.spec.env, loaded.env_options.model_dump()
    results = []
    for key in args.models:
        model = models.load(TransformersModelSpec(name=NAMES[key], batch_size=16))
        measure(model, env_spec, env_options, 2, 2, 1)  # warm-up
        rows = [measure(model, env_spec, env_options, args.episodes, b, args.steps) for b in (1, 16)]
        speedup = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
        for r in rows:
            r["model"] = key
            results.append(r)
            print(f"{key:8s} batch {r['batch']:2d}: {r['steps_per_s']:7.2f} steps/s, "
                  f"{100 * r['outside_generate_share']:5.2f}% of wall time outside generate "
                  f"({r['policy_steps']} steps in {r['wall_s']:.1f} s)")
        print(f"{key:8s} batch 16 / batch 1 throughput: {speedup:.2f}x")
        model.close()
    out = ROOT / "benchmarks" / "results" / "agent_loop.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"host": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
