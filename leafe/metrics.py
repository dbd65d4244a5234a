"""Pass@k (unbiased estimator of Chen et al. 2021) and pass^k, from per-task counts.

pass@k for one task with n samples of which c succeed is 1 - C(n-c, k) / C(n, k): the chance
that k samples drawn without replacement include a success. pass^k is C(c, k) / C(n, k): all
k succeed. Both are averaged over tasks. Computed with exact integer binomials.
"""

from __future__ import annotations

from collections import defaultdict
from math import comb
from typing import Iterable, Sequence

import numpy as np


def _check(n: int, c: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < k:
        raise ValueError(f"pass@k needs at least k samples per task: n={n} < k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"num_correct must be between 0 and num_samples: c={c}, n={n}")


def _per_task(num_samples, num_correct) -> tuple[list[int], list[int]]:
    if isinstance(num_correct, (int, np.integer)):
        cs = [int(num_correct)]
        ns = [int(num_samples)] if isinstance(num_samples, (int, np.integer)) else [int(x) for x in num_samples]
    else:
        cs = [int(x) for x in num_correct]
        ns = ([int(num_samples)] * len(cs) if isinstance(num_samples, (int, np.integer))
              else [int(x) for x in num_samples])
    if len(ns) != len(cs):
        raise ValueError(f"num_samples has {len(ns)} entries but num_correct has {len(cs)}")
    if not cs:
        raise ValueError("no tasks")
    return ns, cs


def pass_at_k_per_task(num_samples: int | Sequence[int], num_correct: int | Sequence[int], k: int) -> np.ndarray:
    ns, cs = _per_task(num_samples, num_correct)
    out = []
    for n, c in zip(ns, cs):
        _check(n, c, k)
        out.append(1.0 - comb(n - c, k) / comb(n, k))
    return np.array(out, dtype=float)


def pass_at_k(num_samples: int | Sequence[int], num_correct: int | Sequence[int], k: int) -> float:
    """Mean unbiased pass@k over tasks. Scalars mean one task; an int `num_samples` with a
    sequence `num_correct` means the same n for every task. Raises ValueError when n < k."""
    return float(pass_at_k_per_task(num_samples, num_correct, k).mean())


def pass_hat_k(num_samples: int | Sequence[int], num_correct: int | Sequence[int], k: int) -> float:
    """Mean pass^k over tasks: the chance that k samples drawn without replacement all succeed."""
    ns, cs = _per_task(num_samples, num_correct)
    vals = []
    for n, c in zip(ns, cs):
        _check(n, c, k)
        vals.append(comb(c, k) / comb(n, k))
    return float(np.mean(vals))


def episode_metrics(episodes: Iterable[dict], ks: Sequence[int]) -> dict:
    """Metrics of an evaluation from its episode records. Errored episodes (an `error` key:
    their environment crashed or hung on every attempt) count as failures, never dropped."""
    eps = list(episodes)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for e in eps:
        by_task[e["task"]].append(e)
    tasks = sorted(by_task)
    ns = [len(by_task[t]) for t in tasks]
    cs = [sum(bool(e["success"]) and not e.get("error") for e in by_task[t]) for t in tasks]
    out = {
        "tasks": len(tasks),
        "episodes": len(eps),
        "samples_per_task": min(ns) if ns else 0,
        "pass@k": {str(k): pass_at_k(ns, cs, k) for k in ks},
        "pass^k": {str(k): pass_hat_k(ns, cs, k) for k in ks},
        "success_rate": float(np.mean([bool(e["success"]) and not e.get("error") for e in eps]))
        if eps else 0.0,
        "mean_steps": float(np.mean([e["steps"] for e in eps])) if eps else 0.0,
        "prompt_tokens": int(sum(e["prompt_tokens"] for e in eps)),
        "completion_tokens": int(sum(e["completion_tokens"] for e in eps)),
        "interactions": int(sum(e.get("interactions", 0) for e in eps)),
        "parse_failures": int(sum(e.get("parse_failures", 0) for e in eps)),
        "invalid": int(sum(e.get("invalid", 0) for e in eps)),
        "errored": int(sum(bool(e.get("error")) for e in eps)),
        "per_task": {t: {"n": n, "c": c} for t, n, c in zip(tasks, ns, cs)},
    }
    return out
