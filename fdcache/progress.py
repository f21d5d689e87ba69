"""One progress display for every long job (train, finetune, flyp, eval, wise, extract).

On a terminal: a rich bar, updated every step and clamped to its total (a resumed run
starts part-way). Elsewhere (a log file, a job scheduler): one plain line every
``every_s`` seconds and a last one at the end, so logs stay readable."""

from __future__ import annotations

import sys
import time

from rich.console import Console

__all__ = ["Progress"]


class Progress:
    """``update(completed=None, advance=0, **fields)``; fields (loss, img/s) are shown after
    the count. A no-op when not ``enabled`` (other ranks, tests)."""

    def __init__(self, desc: str, total: int, *, completed: int = 0, unit: str = "step",
                 enabled: bool = True, every_s: float = 30.0, console: Console | None = None):
        self.desc, self.total, self.unit, self.enabled = desc, max(int(total), 0), unit, enabled
        self.n = min(completed, self.total)
        self.fields: dict = {}
        self.every_s, self._last = every_s, time.monotonic()
        self._t0, self._n0 = self._last, self.n
        self._bar, self._ended = None, False
        if not enabled:
            return
        self.console = console or Console(file=sys.stderr)
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), console=self.console, transient=False)
            self._task = self._bar.add_task(desc, total=self.total, completed=self.n, info="")
            self._bar.start()

    def _info(self) -> str:
        rate = (self.n - self._n0) / max(time.monotonic() - self._t0, 1e-9)
        return f"{rate:,.2f} {self.unit}/s  " + "  ".join(f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items())

    def update(self, completed: int | None = None, advance: int = 0, **fields) -> None:
        if not self.enabled:
            return
        self.n = min(self.total, (self.n if completed is None else completed) + advance)
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        if self._bar is not None:
            self._bar.update(self._task, completed=self.n, info=self._info())
        elif time.monotonic() - self._last >= self.every_s or (self.n == self.total and not self._ended):
            self._ended = self.n == self.total
            self._line()

    def _line(self) -> None:
        self._last = time.monotonic()
        pct = 100 * self.n / max(self.total, 1)
        self.console.print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%) {self._info()}".rstrip(),
                           highlight=False, soft_wrap=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
