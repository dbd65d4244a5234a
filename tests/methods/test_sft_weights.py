"""Per-example loss weights in `train_sft` (LEAFE's β): the trainer's loss is the weighted sum
of token losses over the batch's completion tokens, weight-0 examples are left out, and
unweighted training is plain TRL SFT. Checked against per-example losses computed with the
model directly."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from rich.console import Console

from leafe.methods.sft import TrainSpec, train_sft
from leafe.spec.schema import RuntimeSpec, TransformersModelSpec

torch = pytest.importorskip("torch")


class Ctx:
    """What `train_sft` reads of a stage context."""

    def __init__(self, d):
        self.dir, self.console = d, Console(file=io.StringIO())
        self.stage = SimpleNamespace(id="t.train", method="t")
        self.loaded = SimpleNamespace(method_types={"t": "sft"})
        self.spec = SimpleNamespace(runtime=RuntimeSpec())  # trains in this process

    def start_checkpoint(self):
        return None

    def policy_spec(self, checkpoint=None):
        return TransformersModelSpec(name="leafe:tiny-qwen2")


def ex(user: str, reply: str, weight: float | None = None) -> dict:
    e = {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": reply}]}
    return e if weight is None else {**e, "weight": weight}


EXAMPLES = [ex("push the box", "<action>left</action>"), ex("where now?", "<action>up</action> then down"),
            ex("a longer observation of the room", "<action>right</action>"), ex("go", "down")]


def token_losses(examples: list[dict]) -> list[tuple[float, int]]:
    """Per example: (sum of the completion tokens' NLL, their count), from the initial model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leafe.models.builtin import resolve

    path, _ = resolve("leafe:tiny-qwen2", None)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def ids(conv, **kw):
        out = tok.apply_chat_template(conv, tokenize=True, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    out = []
    for e in examples:
        prompt, full = ids(e["prompt"], add_generation_prompt=True), ids(e["prompt"] + e["completion"])
        start = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(full[1:]), reduction="none")
        out.append((float(nll[start - 1:].sum()), len(full) - start))
    return out


def first_loss(tmp_path, name: str, examples: list[dict], **train) -> tuple[float, dict]:
    """Train one optimizer step over all `examples` (its logged loss is the initial model's)."""
    ctx = Ctx(tmp_path / name)
    ctx.dir.mkdir()
    spec = TrainSpec(**{"epochs": 1, "lr": 1e-3, "batch_size": len(examples), "grad_accum": 1, **train})
    stats = train_sft(ctx, examples, spec, seed=0)
    log = json.loads((ctx.dir / "train_log.json").read_text())
    return next(h["loss"] for h in log if "loss" in h), stats


def test_weighted_loss_is_the_weighted_token_sum_over_the_batch(tmp_path, leafe_cache):
    parts = token_losses(EXAMPLES)
    n = sum(c for _, c in parts)
    weights = [1.0, 2.5, 0.5, 1.0]
    expected = sum(w * s for w, (s, _) in zip(weights, parts)) / n
    plain = sum(s for s, _ in parts) / n

    got, stats = first_loss(tmp_path, "w", [{**e, "weight": w} for e, w in zip(EXAMPLES, weights)])
    assert got == pytest.approx(expected, rel=1e-4)
    assert abs(expected - plain) > 0.05 * plain  # the weights matter at this size
    assert stats["examples"] == 4 and stats["steps"] == 1

    # two micro-batches accumulated into one step: one normaliser, all completion tokens of the step
    got2, stats2 = first_loss(tmp_path, "acc", [{**e, "weight": w} for e, w in zip(EXAMPLES, weights)],
                              batch_size=2, grad_accum=2)
    assert stats2["steps"] == 1 and got2 == pytest.approx(expected, rel=1e-4)

    # unweighted (and all weights 1): plain TRL SFT, the token mean over the batch
    got_plain, _ = first_loss(tmp_path, "plain", EXAMPLES)
    assert got_plain == pytest.approx(plain, rel=1e-4)
    got_ones, _ = first_loss(tmp_path, "ones", [{**e, "weight": 1.0} for e in EXAMPLES])
    assert got_ones == got_plain


def test_zero_weight_examples_are_left_out(tmp_path, leafe_cache):
    cf = EXAMPLES[:2]
    reh = [{**e, "weight": 0.0} for e in EXAMPLES[2:]]
    loss_mixed, stats = first_loss(tmp_path, "mixed", cf + reh, batch_size=4)
    loss_cf, _ = first_loss(tmp_path, "cf", cf, batch_size=4)
    assert stats["examples"] == 2 and loss_mixed == loss_cf
    parts = token_losses(cf)
    assert loss_cf == pytest.approx(sum(s for s, _ in parts) / sum(c for _, c in parts), rel=1e-4)
    with pytest.raises(ValueError, match="weight"):
        first_loss(tmp_path, "bad", [{**EXAMPLES[0], "weight": -1.0}])
