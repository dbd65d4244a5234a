"""Rich progress bars for stages: episodes done, environment steps, tokens per second."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StageProgress:
    """A progress bar over episodes with live step and token counters."""

    def __init__(self, console: Console, description: str, total: int, done: int = 0):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("episodes · {task.fields[steps]} steps · {task.fields[tps]} tok/s"),
            TimeElapsedColumn(), console=console, transient=False,
        )
        self.task = self.progress.add_task(description, total=total, completed=done, steps=0, tps="-")
        self.steps = 0
        self.tokens = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> "StageProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def on_step(self, record: dict) -> None:
        self.steps += 1
        self.tokens += record.get("completion_tokens", 0)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(self.task, steps=self.steps, tps=f"{self.tokens / dt:.0f}")

    def on_episode(self, _record: dict | None = None) -> None:
        self.progress.advance(self.task)


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars and info logs (leafe draws its own bars).
    Must run before transformers/datasets are imported; LEAFE_VERBOSE=1 keeps them."""
    import os

    if os.environ.get("LEAFE_VERBOSE"):
        return
    for var, val in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                     ("TRANSFORMERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
                     ("TOKENIZERS_PARALLELISM", "false"), ("TQDM_DISABLE", "1")):
        os.environ.setdefault(var, val)
    import sys
    import warnings

    if "transformers" in sys.modules:  # already imported: the env vars came too late
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|trl|torch)\..*")


def training_callback(console: Console, description: str):
    """A transformers TrainerCallback that draws a rich bar over optimizer steps with the loss."""
    from transformers import TrainerCallback

    class RichTrainingBar(TrainerCallback):
        def __init__(self) -> None:
            self.progress: Progress | None = None
            self.task = None

        def on_train_begin(self, args, state, control, **kw):
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("steps · loss {task.fields[loss]}"), TimeElapsedColumn(), console=console)
            self.task = self.progress.add_task(description, total=state.max_steps,
                                               completed=state.global_step, loss="-")
            self.progress.start()

        def on_step_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.progress is not None and logs and "loss" in logs:
                self.progress.update(self.task, loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kw):
            if self.progress is not None:
                # max_steps is a ceiling (GRPO stops when the budget is spent): show the bar full
                self.progress.update(self.task, total=state.global_step, completed=state.global_step)
                self.progress.stop()
                self.progress = None

    return RichTrainingBar()


@contextlib.contextmanager
def run_logging(console: Console, log_file: Path) -> Iterator[None]:
    """While a run lasts, leafe's log records at WARNING and above (retried API calls, worker
    restarts, ...) go to the console and, with timestamps, to `log_file` (appended, so a
    resumed run keeps the history)."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("leafe")
    screen = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    screen.setLevel(logging.WARNING)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    disk = logging.FileHandler(log_file, encoding="utf-8")
    disk.setLevel(logging.INFO)
    disk.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(screen)
    logger.addHandler(disk)
    try:
        yield
    finally:
        logger.removeHandler(screen)
        logger.removeHandler(disk)
        disk.close()
        logger.setLevel(old_level)
