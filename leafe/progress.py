"""Rich progress bars for stages: episodes done, environment steps, tokens per second."""

from __future__ import annotations

import time

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
