"""One progress display for every long loop: rich bar with items/s and ETA, or nothing."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


@contextmanager
def progress_bar(total: int, label: str, *, enabled: bool = True, unit: str = "img") -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a bar (to stderr) only when enabled."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               _Rate(unit), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


class EpochDisplay:
    """A rich bar per training phase advancing one epoch at a time, with loss, val top-1 and codes in use."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), disable=not enabled,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "EpochDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, phase: str, epochs: int, done: int = 0) -> None:
        self.tasks[phase] = self.progress.add_task(phase, total=epochs, completed=done, status="")

    def update(self, record: dict) -> None:
        parts = [f"loss {record['loss']:.3f}" if "loss" in record else ""]
        val = record.get("val_top1")
        if val is not None and val == val:
            parts.append(f"val top-1 {val:.3f}")
        if "codes_in_use" in record:
            parts.append(f"codes in use {record['codes_in_use']}")
        self.progress.update(self.tasks[record["phase"]], completed=record["epoch"], status="  ".join(p for p in parts if p))
