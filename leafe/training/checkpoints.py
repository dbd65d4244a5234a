"""Resuming a TRL/transformers trainer from its `checkpoint-N` directories, and its whole-run
loss.

The trainer writes a checkpoint in place: weights, optimizer, scheduler, RNG state, and
`trainer_state.json` last, then deletes the older ones (`save_total_limit`). A kill, Ctrl-C or
full disk in between leaves a `checkpoint-N` without weights or state, which the trainer's own
`resume_from_checkpoint=True` picks (the highest N) and dies on. `resume_checkpoint` picks the
newest *complete* checkpoint instead, removes the incomplete ones (they would be mistaken for
complete ones by the trainer's rotation), and says so in one line.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Callable

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
#: files that hold a trainer checkpoint's weights, single-file or sharded (`*.index.json`)
WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
#: what sharded trainers (DeepSpeed, FSDP) write instead of weight files
SHARDED_DIRS = ("global_step*", "pytorch_model_fsdp_*")


def checkpoints(out: Path) -> list[Path]:
    """The trainer's `checkpoint-N` directories under `out`, by step."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_problem(ck: Path) -> str | None:
    """Why a trainer checkpoint cannot be resumed from (None: it is complete): no or an
    unreadable `trainer_state.json`, no weights, weights or optimizer state cut short."""
    state = ck / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        if not isinstance(json.loads(state.read_text(encoding="utf-8")), dict):
            return "trainer_state.json is not a trainer state"
    except (OSError, ValueError):
        return "trainer_state.json is unreadable"
    if any(any(ck.glob(pattern)) for pattern in SHARDED_DIRS):
        return None  # DeepSpeed / FSDP: their own layout, written before trainer_state.json
    weights = [ck / name for name in WEIGHTS if (ck / name).is_file()]
    for index in [*ck.glob("*.safetensors.index.json"), *ck.glob("*.bin.index.json")]:
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is unreadable"
        missing = sorted(s for s in shards if not (ck / s).is_file())
        if missing:
            return f"weight shard {missing[0]} missing"
        weights += [ck / s for s in shards]
    if not weights:
        return "no model weights"
    for w in weights:
        if w.suffix == ".safetensors" and not _safetensors_whole(w):
            return f"{w.name} is cut short"
    optimizer = ck / "optimizer.pt"
    if not optimizer.is_file():
        return "no optimizer.pt"
    if not zipfile.is_zipfile(optimizer):  # torch.save writes a zip archive; a cut one has no directory
        return "optimizer.pt is cut short"
    return None


def _safetensors_whole(path: Path) -> bool:
    """The file is as long as its header says (a write cut short is not)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return False


def resume_checkpoint(out: Path, say: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint under the trainer's output directory `out` (None: start
    from the beginning). Incomplete ones are removed, with one line through `say` naming them,
    why, and where training resumes."""
    found = checkpoints(out)
    bad = {ck: problem for ck in found if (problem := checkpoint_problem(ck)) is not None}
    good = [ck for ck in found if ck not in bad]
    start = good[-1] if good else None
    if bad:
        for ck in bad:
            shutil.rmtree(ck, ignore_errors=True)
        what = ", ".join(f"{ck.name} ({problem})" for ck, problem in bad.items())
        where = f"resuming from {start.name}" if start is not None else "training from the start"
        line = (f"skipped incomplete trainer checkpoint{'s' if len(bad) > 1 else ''} in {out}: {what} "
                f"(interrupted while saving?), removed; {where}")
        logging.getLogger("leafe.training").info("%s", line)  # the run's log file
        if say is not None:
            say(line)
    return start


def whole_run_loss(log_history: list[dict]) -> float | None:
    """The mean training loss over every optimizer step of the run, resumed ones included,
    from the trainer's log (`trainer_state.json` `log_history`, restored on resume): each
    logged loss is the mean over the steps since the previous log, so it is weighted by them.
    None when nothing was logged. (The trainer's own `training_loss` covers only the steps of
    the last session: a resumed stage reported 0.432 for a run whose loss was 1.390, 0.0 when
    nothing was left to train.)"""
    logged = {}
    for h in log_history:
        if "loss" in h and "step" in h:
            logged[int(h["step"])] = float(h["loss"])
    total, last = 0.0, 0
    for step in sorted(logged):
        total += logged[step] * (step - last)
        last = step
    return total / last if last else None
