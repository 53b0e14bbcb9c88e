"""One progress display for every long loop: rich bars on stderr (never stdout, which holds results), or nothing."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


def _stderr() -> Console:
    # Made per display so that it writes to the sys.stderr of the moment (a test runner swaps it).
    return Console(stderr=True)


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


@contextmanager
def progress_bar(total: int, label: str, *, enabled: bool = True, unit: str = "img") -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a bar on stderr only when enabled."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               _Rate(unit), TimeRemainingColumn())
    with Progress(*columns, transient=False, console=_stderr()) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)


class EpochDisplay:
    """A rich bar (stderr) per training phase advancing one epoch at a time, with loss, val top-1 and codes in use."""

    def __init__(self, enabled: bool):
        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
            TimeElapsedColumn(), TextColumn("{task.fields[status]}"), disable=not enabled, console=_stderr(),
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
        self.progress.update(self.tasks[record["phase"]], completed=record["epoch"], status=epoch_status(record))


def epoch_status(record: dict) -> str:
    """'loss 0.412  val top-1 0.875  codes in use 31' from one log record (missing or NaN parts left out)."""
    parts = [f"loss {record['loss']:.3f}" if "loss" in record else ""]
    val = record.get("val_top1")
    if val is not None and val == val:
        parts.append(f"val top-1 {val:.3f}")
    if "codes_in_use" in record:
        parts.append(f"codes in use {record['codes_in_use']}")
    return "  ".join(part for part in parts if part)
