"""What `mserve start` shows while servables load and compile.

On a terminal: a rich progress display on stderr, one line per servable version
(servable, version, the model being compiled, bucket k of n, elapsed time), gone
once everything is loaded. Otherwise (a pipe, a log file, a container): one plain
log line per step on the ``mserve.load`` logger, so a slow compile is never silent.
Both listen to `mserve.serving.progress`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import render

log = logging.getLogger("mserve.load")


class LoadDisplay:
    """A context manager: shows load progress while the block loads servables."""

    def __init__(self) -> None:
        self._started: dict[tuple[str, int], float] = {}
        self._tasks: dict[tuple[str, int], Any] = {}
        self._progress: Any = None
        self._listening: Any = None

    def __enter__(self) -> "LoadDisplay":
        from mserve.serving.progress import listening

        console = render.err()
        if console.is_terminal and not console.is_dumb_terminal:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.fields[servable]}[/] v{task.fields[version]}"),
                TextColumn("{task.description}"),
                BarColumn(bar_width=20),
                TextColumn("{task.fields[bucket]}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._progress.start()
        self._listening = listening(self._on_event)
        self._listening.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._listening.__exit__(*exc)
        if self._progress is not None:
            self._progress.stop()

    def _on_event(self, event: Any) -> None:
        key = (event.servable, event.version)
        started = self._started.setdefault(key, time.monotonic())
        elapsed = time.monotonic() - started
        if self._progress is not None:
            self._show(key, event)
            return
        where = f"servable {event.servable} version {event.version}"
        if event.phase == "loading":
            log.info("%s: loading %s (%s) on %s", where, event.model, event.backend, ", ".join(event.devices))
        elif event.phase == "compiling":
            size = f"batch size {event.batch_size}" if event.batch_size is not None else "one instance"
            log.info("%s: compiling %s for %s (bucket %d of %d), %.1fs", where, event.model, size, event.step,
                     event.total, elapsed)
        elif event.phase == "ready":
            log.info("%s: loaded and warm in %.1fs", where, elapsed)

    def _show(self, key: tuple[str, int], event: Any) -> None:
        progress = self._progress
        task = self._tasks.get(key)
        if task is None:
            task = progress.add_task("loading", servable=event.servable, version=event.version, bucket="", total=None)
            self._tasks[key] = task
        if event.phase == "loading":
            progress.update(task, description=f"loading {event.model} ({event.backend}, {', '.join(event.devices)})")
        elif event.phase == "compiling":
            progress.update(
                task, description=f"compiling {event.model}", total=event.total, completed=event.step - 1,
                bucket=f"bucket {event.step} of {event.total}",
            )
        elif event.phase == "ready":
            progress.update(task, description="ready", completed=progress.tasks[task].total or 1, bucket="")
            progress.console.print(f"[green]loaded[/] {event.servable} version {event.version}")
