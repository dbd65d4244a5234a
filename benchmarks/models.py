"""Model backends: completion tokens per second at batch 1, 8 and 32 for each backend available
on this machine, and the overhead of the litellm path (litellm → HTTP → the loopback
OpenAI-compatible server → the same model) against calling the model directly.

    python benchmarks/models.py [--models tiny smollm2] [--batches 1 8 32] [--tokens 32]

The loopback server answers one request at a time with a batch-1 `generate`, so the litellm
path at batch B is compared with B direct batch-1 calls (same model work): the difference is
litellm + HTTP + JSON. vLLM is measured only where it is installed and a GPU is present.
Ratios measured in one run are the figures to compare. Results: stdout and
benchmarks/results/models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from leafe.progress import quiet_libraries  # noqa: E402

quiet_libraries()

from leafe import models  # noqa: E402
from leafe.models.base import Sampling  # noqa: E402
from leafe.spec.schema import model_spec  # noqa: E402

NAMES = {"tiny": "leafe:tiny-qwen2", "smollm2": "leafe:smollm2-135m-instruct"}
ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("You are playing Sokoban. Push every box onto a target. Board (# wall, _ floor, O target, "
          "X box, P you):\n#######\n#__O__#\n#__X__#\n#__P__#\n#######\nReply with one move in "
          "<action></action> tags: up, down, left or right.")


def conversations(n: int) -> list[list[dict]]:
    # distinct prompts (a different final line), so no cache or dedup can help
    return [[{"role": "user", "content": f"{PROMPT}\nEpisode {i}."}] for i in range(n)]


def timed(fn, reps: int) -> tuple[float, list]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def tokens_per_s(model, batch: int, tokens: int, reps: int) -> dict:
    sampling = Sampling(temperature=1.0, max_tokens=tokens)
    convs = conversations(batch)
    seeds = list(range(batch))
    t, outs = timed(lambda: model.generate(convs, sampling, seeds=seeds), reps)
    made = sum(c.completion_tokens for c in outs)
    return {"batch": batch, "seconds": round(t, 4), "completion_tokens": made,
            "tokens_per_s": round(made / t, 1)}


def litellm_overhead(model, batch: int, tokens: int, reps: int) -> dict:
    """The litellm path at `batch` vs `batch` direct batch-1 calls of the same model."""
    from leafe.models.loopback import LoopbackServer

    sampling = Sampling(temperature=1.0, max_tokens=tokens)
    convs = conversations(batch)
    seeds = list(range(batch))
    os.environ.setdefault("LEAFE_BENCH_KEY", "sk-loopback")
    with LoopbackServer(model) as server:
        api = models.load(model_spec(backend="litellm", name="openai/loopback", api_base=server.api_base,
                                     api_key_env="LEAFE_BENCH_KEY", concurrency=8, batch_size=64))
        try:
            api.generate(convs[:1], sampling, seeds=seeds[:1])  # litellm's one-time setup
            t_api, outs = timed(lambda: api.generate(convs, sampling, seeds=seeds), reps)
        finally:
            api.close()
    t_direct, _ = timed(lambda: [model.generate([c], sampling, seeds=[s]) for c, s in zip(convs, seeds)], reps)
    return {"batch": batch, "litellm_s": round(t_api, 4), "direct_batch1_calls_s": round(t_direct, 4),
            "overhead_per_request_ms": round(1000 * (t_api - t_direct) / batch, 2),
            "ratio": round(t_api / t_direct, 3), "errors": sum(c.error is not None for c in outs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(NAMES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's); 1 avoids spin-waiting on a loaded machine")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "models.json")
    args = ap.parse_args()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "load_start": os.getloadavg()[0]},
                     "tokens": args.tokens, "reps": args.reps, "backends": {}}
    backends = [("transformers", {})]
    try:
        import torch
        import vllm  # noqa: F401

        if torch.cuda.is_available():
            backends.append(("vllm", {"gpu_memory_utilization": 0.5}))
    except ImportError:
        results["vllm"] = "not installed here (GPU-only; see README)"
    for key in args.models:
        for backend, extra in backends:
            model = models.load(model_spec(backend=backend, name=NAMES[key], batch_size=max(args.batches),
                                           **extra))
            try:
                model.generate(conversations(1), Sampling(max_tokens=4))  # warm-up
                rows = [tokens_per_s(model, b, args.tokens, args.reps) for b in args.batches]
                entry = {"tokens_per_s": rows}
                if backend == "transformers" and not args.no_litellm:
                    entry["litellm_vs_direct"] = [litellm_overhead(model, b, args.tokens, args.reps)
                                                  for b in args.batches]
                results["backends"][f"{backend}:{key}"] = entry
            finally:
                model.close()
            for r in entry["tokens_per_s"]:
                print(f"{backend:12s} {key:8s} batch {r['batch']:3d}: {r['tokens_per_s']:8.1f} tok/s "
                      f"({r['seconds']:.3f} s, {r['completion_tokens']} tokens)")
            for r in entry.get("litellm_vs_direct", []):
                print(f"{'litellm':12s} {key:8s} batch {r['batch']:3d}: {r['litellm_s']:.3f} s vs "
                      f"{r['direct_batch1_calls_s']:.3f} s direct batch-1 calls "
                      f"(x{r['ratio']}, {r['overhead_per_request_ms']} ms per request)")
    results["host"]["load_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
