"""One progress-bar factory so every long stage looks the same.

On a terminal: a rich progress bar. Elsewhere (CI logs, `nohup`, pipes): one plain line per
task when it starts, then one every few seconds and one when it ends, so long work is never
silent in a log file either (a step's first update can be many seconds away: a search's first
evaluation, a measurement's first round).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    last_print: float = 0.0
    printed: tuple = ()  # what the last line showed: the closing line is not a repeat of it


class PlainProgress:
    """The subset of `rich.progress.Progress` edgeprune uses, printing plain periodic lines."""

    def __init__(self, stream=None, every_s: float = 10.0, enabled: bool = True, label: str = "") -> None:
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.enabled = enabled
        self.label = label
        self.tasks: list[_Task] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        for t in self.tasks:
            if t.printed != self._shown(t):
                self._print(t)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        self.tasks.append(_Task(description, total, completed, fields))
        self._print(self.tasks[-1])  # the step is under way: said now, not at its first update
        return len(self.tasks) - 1

    def update(
        self,
        task_id: int,
        *,
        advance: float = 0,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **fields,
    ) -> None:
        t = self.tasks[task_id]
        t.completed = completed if completed is not None else t.completed + advance
        t.total = total if total is not None else t.total
        t.description = description or t.description
        t.fields.update(fields)
        if time.monotonic() - t.last_print >= self.every_s:
            self._print(t)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    @staticmethod
    def _shown(t: _Task) -> tuple:
        return (t.description, t.completed, t.total, t.fields.get("status", ""))

    def _print(self, t: _Task) -> None:
        if not self.enabled:
            return
        t.last_print, t.printed = time.monotonic(), self._shown(t)
        elapsed = t.last_print - t.started
        of = f"/{t.total:g}" if t.total else ""
        eta = ""
        if t.total and t.completed:
            eta = f" eta {max(0.0, elapsed * (t.total - t.completed) / t.completed):.0f}s"
        status = t.fields.get("status", "")
        line = f"{self.label}{t.description}: {t.completed:g}{of} {status} [{elapsed:.0f}s{eta}]"
        print(line, file=self.stream, flush=True)


def progress_bar(*, enabled: bool | str = True, console: Console | None = None) -> Progress | PlainProgress:
    """A progress display; `enabled` as a string: plain lines starting with it (work running beside
    other work, e.g. one device of several profiled at once: a terminal holds one live display)."""
    console = console or Console(file=sys.stderr, emoji=False)
    if isinstance(enabled, str):
        return PlainProgress(console.file, label=enabled)
    if not console.is_terminal:
        return PlainProgress(console.file, enabled=enabled)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
