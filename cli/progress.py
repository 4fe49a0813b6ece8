"""What `mserve start` shows while servables load and compile, and when it is ready.

On a terminal: a rich progress display on stderr, one line per servable version
(servable, version, the model being compiled, bucket k of n, elapsed time), gone
once everything is loaded. Otherwise (a pipe, a log file, a container): one plain
log line per compile step on the ``mserve.load`` logger, so a slow compile is never
silent (the loading and loaded lines come from ``mserve.serving.servable`` itself,
so they are not repeated here). Both listen to `mserve.serving.progress`.

A servable compiled is not yet a servable served: with front-end processes, each
front-end then loads its own copies of small CPU models, which takes seconds more.
So a compiled servable shows as ``compiled``, a line says what is still being waited
for, and ``ready`` is said once, by `announce_ready`, when the load call has returned,
which is when ``/ready`` answers 200.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from . import render

log = logging.getLogger("mserve.load")


class LoadDisplay:
    """A context manager: shows load progress while the block loads servables.

    ``expected``: the servable names being loaded; ``frontends``: how many front-end
    processes must pick them up after the device processes compiled them (0: none)."""

    def __init__(self, expected: Iterable[str] = (), frontends: int = 0) -> None:
        self._expected = set(expected)
        self._frontends = frontends
        self._compiled: set[str] = set()
        self._started: dict[tuple[str, int], float] = {}
        self._tasks: dict[tuple[str, int], Any] = {}
        self._progress: Any = None
        self._listening: Any = None
        self._waiting_task: Any = None

    def __enter__(self) -> "LoadDisplay":
        from mserve.serving.progress import listening

        console = render.err()
        if console.is_terminal and not console.is_dumb_terminal:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.fields[servable]}[/] {task.fields[version]}"),
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
        elif event.phase == "compiling":
            where = f"servable {event.servable} version {event.version}"
            size = f"batch size {event.batch_size}" if event.batch_size is not None else "one instance"
            log.info("%s: compiling %s for %s (bucket %d of %d), %.1fs", where, event.model, size, event.step,
                     event.total, elapsed)
        if event.phase == "ready":
            self._compiled.add(event.servable)
            if self._frontends and self._expected and self._expected <= self._compiled:
                self._wait_for_frontends()

    def _wait_for_frontends(self) -> None:
        what = (f"every servable is compiled; waiting for the {self._frontends} front-end "
                f"process{'es' if self._frontends > 1 else ''} to serve them (/ready answers 503 until then)")
        if self._progress is None:
            log.info("%s", what)
        elif self._waiting_task is None:
            self._waiting_task = self._progress.add_task(
                "waiting for the front-end processes", servable="front-ends", version="", bucket="", total=None)

    def _show(self, key: tuple[str, int], event: Any) -> None:
        progress = self._progress
        task = self._tasks.get(key)
        if task is None:
            task = progress.add_task("loading", servable=event.servable, version=f"v{event.version}", bucket="",
                                     total=None)
            self._tasks[key] = task
        if event.phase == "loading":
            progress.update(task, description=f"loading {event.model} ({event.backend}, {', '.join(event.devices)})")
        elif event.phase == "compiling":
            progress.update(
                task, description=f"compiling {event.model}", total=event.total, completed=event.step - 1,
                bucket=f"bucket {event.step} of {event.total}",
            )
        elif event.phase == "ready":
            progress.update(task, description="compiled", completed=progress.tasks[task].total or 1, bucket="")
            progress.console.print(f"[green]compiled[/] {event.servable} version {event.version}")


def announce_ready(url: str) -> None:
    """The one ``ready`` line: said when ``/ready`` (at ``url``) answers 200."""
    render.note(f"[bold green]ready[/]: every servable is loaded and served; {url}/ready answers 200")
