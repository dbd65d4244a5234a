"""torch's CPU threads on an idle and on a loaded machine (`runtime.threads`, leafe/threads.py).

Two fixed workloads on the quickstart's Sokoban first-step prompts (its environment and prompt
template, distinct rooms): `generate`, a batch sampled with fixed seeds (the same tokens at every
setting), and `train`, one optimizer step (forward, backward, AdamW) on a batch of those prompts
with a reply, as SFT does (`--train-batch`, the quickstart's batch size). Each runs `--repeats`
times per setting; the figure is the median seconds per call or step. Settings:
leafe's default for `runtime.threads: null` (`auto`: the usable cores other processes leave
free, applied as `leafe run` applies it, under each condition), 1 thread, and all usable cores
(what torch takes by itself: one thread per physical core). Conditions: idle
(nothing started by the benchmark), and loaded: the benchmark starts busy processes that spin
(pure Python, pinned one per core) on all usable cores but one, as another job would.

    python benchmarks/threads.py [--models tiny smollm2] [--workloads generate train]
                                 [--batch 16] [--tokens 16] [--train-batch 8] [--repeats 5]
    python benchmarks/threads.py --quick     # a seconds-long check that it runs; writes nothing

"Idle" means idle only when nothing else runs: the cores other processes kept busy in the second
before each condition are recorded (`leafe.threads.CpuMeter`; the load average is recorded too,
but it counts the benchmark's own work), and an idle condition that starts next to busy
processes says so (`idle_was_busy`). A call
slower than `--max-seconds` ends that setting's repeats (recorded as `cut_short`). Results:
stdout and benchmarks/results/threads.json (not with --quick, unless --out is given).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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


@contextlib.contextmanager
def setting(n_threads: int | None):
    """torch on `n_threads`, or (None) on leafe's default applied as `leafe run` applies it."""
    import torch

    if n_threads is None:
        with threads.using(threads.resolve(None, environ={})) as record:
            yield record
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(n_threads)
        try:
            yield {"threads": n_threads}
        finally:
            torch.set_num_threads(before)


def measure(model, convs, sampling, seeds, n_threads: int | None, repeats: int, max_seconds: float) -> dict:
    with setting(n_threads) as record:
        return _measure(model, convs, sampling, seeds, record, repeats, max_seconds)


def _measure(model, convs, sampling, seeds, record: dict, repeats: int, max_seconds: float) -> dict:
    import torch

    model.generate(convs[:1], Sampling(temperature=sampling.temperature, max_tokens=2), seeds=seeds[:1])  # warm-up
    times, tokens, cut = [], 0, False
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(convs, sampling, seeds=seeds)
        times.append(time.perf_counter() - t0)
        tokens = sum(c.completion_tokens for c in out)
        texts = hashlib.sha256("\x00".join(c.text for c in out).encode()).hexdigest()[:16]
        if times[-1] > max_seconds:
            cut = len(times) < repeats
            break
    return {"threads": record["threads"], "torch_threads": torch.get_num_threads(),
            "seconds_median": round(statistics.median(times), 4), "seconds": [round(t, 4) for t in times],
            "completion_tokens": tokens, "texts_sha256": texts, "cut_short": cut,
            **({"others_busy_cores": record["others_busy_cores"]} if "others_busy_cores" in record else {})}


def train_batch(model, convs: list) -> dict:
    """Token ids of `convs` with a one-word reply, padded: what an SFT step sees."""
    tok = model.tokenizer
    texts = [tok.apply_chat_template(c + [{"role": "assistant", "content": "up"}], tokenize=False)
             for c in convs]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(texts, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


def measure_train(model, batch: dict, n_threads: int | None, repeats: int, max_seconds: float) -> dict:
    """Seconds per optimizer step (forward, backward, AdamW) of the whole model on `batch`; the
    weights are put back afterwards (later generation sees the weights it would have seen)."""
    with setting(n_threads) as record:
        return _measure_train(model, batch, record, repeats, max_seconds)


def _measure_train(model, batch: dict, record: dict, repeats: int, max_seconds: float) -> dict:
    import torch

    net = model.model
    saved = {k: v.detach().clone() for k, v in net.state_dict().items()}  # put back afterwards
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)

    def step() -> None:
        threads.adapt()  # as leafe's trainer callback does before each step
        opt.zero_grad(set_to_none=True)
        net(**batch).loss.backward()
        opt.step()

    step()  # warm-up (allocates the optimizer state)
    times, cut = [], False
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if times[-1] > max_seconds:
            cut = len(times) < repeats
            break
    net.eval()
    del opt
    net.load_state_dict(saved)  # the next measurements see the same weights
    return {"threads": record["threads"], "torch_threads": torch.get_num_threads(),
            "seconds_median": round(statistics.median(times), 4), "seconds": [round(t, 4) for t in times],
            "sequences": int(batch["input_ids"].shape[0]), "tokens": int(batch["attention_mask"].sum()),
            "cut_short": cut,
            **({"others_busy_cores": record["others_busy_cores"]} if "others_busy_cores" in record else {})}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(NAMES))
    ap.add_argument("--batch", type=int, default=16, help="conversations per generate call")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per sample")
    ap.add_argument("--workloads", nargs="+", default=["generate", "train"], choices=["generate", "train"])
    ap.add_argument("--train-batch", type=int, default=8, help="sequences per training step")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="a call slower than this ends the setting")
    ap.add_argument("--conditions", nargs="+", default=["idle", "loaded"], choices=["idle", "loaded"])
    ap.add_argument("--quick", action="store_true", help="tiny model, batch 4, 4 tokens, 2 repeats; writes nothing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.models, args.batch, args.tokens, args.repeats, args.train_batch = ["tiny"], 4, 4, 2, 2
    out = args.out or (None if args.quick else ROOT / "benchmarks" / "results" / "threads.json")

    usable = threads.usable_cores()
    affinity = sorted(threads.affinity())
    settings: dict[str, int | None] = {"default": None, "one": 1, "all": usable}
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
                     "train_batch": args.train_batch, "workloads": args.workloads,
                     "prompts": "Sokoban first steps, quickstart template", "temperature": 0.7},
        "settings": settings,
        "rule": "runtime.threads null (default): auto, the usable cores other processes leave free",
        "quick": args.quick, "models": {},
    }
    for key in args.models:
        model = models.load(TransformersModelSpec(name=NAMES[key], batch_size=args.batch))
        batch = train_batch(model, convs[:args.train_batch]) if "train" in args.workloads else None
        entry: dict = {}
        for condition in args.conditions:
            load_before = os.getloadavg()
            meter = threads.CpuMeter()  # what others kept busy just before (the load average counts us too)
            time.sleep(1.0)
            others_before = meter.others()
            procs = start_load(affinity[1:] or affinity) if condition == "loaded" else []
            tables: dict = {}
            try:
                if procs:
                    time.sleep(1.0)  # let the spinners take their cores
                for workload in args.workloads:
                    if workload == "generate":
                        tables[workload] = {name: measure(model, convs, sampling, seeds, n, args.repeats,
                                                          args.max_seconds) for name, n in settings.items()}
                    else:
                        tables[workload] = {name: measure_train(model, batch, n, args.repeats, args.max_seconds)
                                            for name, n in settings.items()}
            finally:
                stop_load(procs)
            if "generate" in tables:  # the same seeds: the same replies at every thread count?
                same = len({r["texts_sha256"] for r in tables["generate"].values()}) == 1
                print(f"{key:8s} generate {condition:6s} same replies at every setting: {same}")
            for workload, rows in tables.items():
                base = rows["one"]["seconds_median"]
                for name, row in rows.items():
                    row["vs_one_thread"] = round(row["seconds_median"] / base, 2)
            entry[condition] = {"competing_processes": len(procs),
                                "loadavg_before": [round(x, 2) for x in load_before],
                                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                                "others_busy_cores_before": None if others_before is None else round(others_before, 2),
                                "idle_was_busy": condition == "idle" and (others_before or 0.0) > 0.3,
                                "rows": tables.get("generate"), "train_rows": tables.get("train")}
            for workload, rows in tables.items():
                for name, row in rows.items():
                    print(f"{key:8s} {workload:8s} {condition:6s} {name:8s} ({row['threads']:2d} threads): "
                          f"{row['seconds_median']:8.3f} s per {'call' if workload == 'generate' else 'step'} "
                          f"({row['vs_one_thread']:.2f}x one thread)" + (" [cut short]" if row["cut_short"] else ""))
            if entry[condition]["idle_was_busy"]:
                print(f"  note: other processes kept {others_before:.2f} cores busy before the idle condition: "
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
