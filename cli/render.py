"""Terminal output shared by the commands: consoles, one-line errors, tables.

Conventions (the same for every command):

* data goes to stdout, messages and errors to stderr;
* colors only on a terminal, and never when ``NO_COLOR`` is set (rich does both);
* an error is one red line, ``error: ...``, then exit with the command's code; the
  traceback is shown only with ``--debug``.

Consoles are made per call, not at import, so they follow whatever ``sys.stdout`` /
``sys.stderr`` is at the time (Typer's test runner swaps them).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator, NoReturn, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Width used when the output is not a terminal (a pipe, a file, a test runner), so
# that tables of URLs are not folded at rich's 80-column default. COLUMNS wins.
_PIPE_WIDTH = 200


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None
    if not os.environ.get("COLUMNS") and not _isatty(stream):
        width = _PIPE_WIDTH
    # emoji=False: "a:b:c" must not turn into an emoji. rich itself turns color off
    # when the stream is not a terminal or NO_COLOR is set.
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False, emoji=False)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def out() -> Console:
    """Console on stdout (data)."""
    return _console(stderr=False)


def err() -> Console:
    """Console on stderr (messages, errors)."""
    return _console(stderr=True)


class CliError(Exception):
    """A failure to report as one line, exiting with ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.message = message
        self.code = code


def fail(message: str, code: int = 2) -> NoReturn:
    raise CliError(message, code)


def error_line(message: str) -> None:
    err().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    """A dim informational line on stderr (``message`` is rich markup)."""
    err().print(message, soft_wrap=True)


@contextlib.contextmanager
def reported(debug: bool, unexpected_code: int = 1) -> Iterator[None]:
    """Turn errors into one stderr line and an exit code (tracebacks with ``debug``).

    `CliError` exits with its own code; anything unexpected with ``unexpected_code``.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except CliError as exc:
        if debug:
            err().print_exception()
        error_line(exc.message)
        raise typer.Exit(exc.code) from None
    except Exception as exc:  # noqa: BLE001 - the whole point: no traceback without --debug
        if debug:
            err().print_exception()
        error_line(f"{type(exc).__name__}: {exc}" + ("" if debug else " (run with --debug for the traceback)"))
        raise typer.Exit(unexpected_code) from None


# --------------------------------------------------------------------------- servables


def spec_text(spec: dict[str, Any]) -> str:
    """``x1 float32[2,2]``, ``x1 float32[?,4]`` or just ``x1`` when unknown."""
    name = spec.get("name", "")
    dtype = spec.get("dtype")
    shape = spec.get("shape")
    if dtype is None and shape is None:
        return name
    dims = "?" if shape is None else ",".join("?" if d is None else str(d) for d in shape)
    return f"{name} {dtype or '?'}[{dims}]"


def predict_path(servable: str, method: str, version: int | None = None) -> str:
    """The predict URL path (PROTOCOL.md section 1); no version means the newest."""
    if version:
        return f"/model/{servable}/version/{version}:{method}"
    return f"/model/{servable}:{method}"


def runs_on(model: dict[str, Any]) -> str:
    """``jax_export on cpu:0, cpu:1`` (one instance per device) or ``jax_function on
    cpu:0+cpu:1`` (one instance spanning both: a sharded model)."""
    instances = model.get("instances") or []
    where = ", ".join("+".join(group) for group in instances) or "?"
    return f"{model.get('backend', model.get('format', '?'))} on {where}"


def servables_table(descriptions: Sequence[dict[str, Any]], base_url: str | None = None) -> Table:
    """One row per servable/version/method, from `mserve.ops.metadata.describe_servable`,
    with the backend and devices of the version's models.

    With ``base_url`` the last column is the URL to POST to, else the path. The newest
    version is addressed without ``/version/N``, older ones with it.
    """
    table = Table(show_lines=True, title="servables", title_justify="left")
    table.add_column("servable", style="bold")
    table.add_column("version", justify="right")
    table.add_column("method", style="cyan")
    table.add_column("inputs")
    table.add_column("outputs")
    table.add_column("runs on")
    table.add_column("POST to" if base_url else "path", style="green", overflow="fold")
    for desc in descriptions:
        latest = desc["latest_version"]
        for version in desc["versions"]:
            number = version["version"]
            for method in version["methods"]:
                path = predict_path(desc["name"], method["name"], None if number == latest else number)
                table.add_row(
                    escape(desc["name"]),
                    str(number),
                    escape(method["name"]),
                    escape("\n".join(spec_text(s) for s in method["inputs"])),
                    escape("\n".join(spec_text(s) for s in method["outputs"])),
                    escape("\n".join(runs_on(m) for m in version.get("models", []))),
                    escape((base_url or "") + path),
                )
    return table
