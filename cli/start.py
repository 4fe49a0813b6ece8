"""`mserve start` (serve until SIGINT/SIGTERM) and `mserve list` (describe, don't serve).

Both load servables through the server API (``mserve.server``) and describe them with
``mserve.ops.metadata``; heavy modules are imported inside the commands so ``mserve
--help`` stays fast.

Exit codes of ``start``: 0 after a graceful stop; 1 when loading or listening fails
(a servable that does not load, a port in use, HTTPS unavailable); 2 for a bad
command line or config file (including a directory without servables).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.markup import escape

from . import render
from .settings import StartSettings, resolve_servables, start_configs

START_EPILOG = """\
[bold]Examples[/]

  [dim]# the bundled servables on 127.0.0.1:5500[/]
  mserve start
  [dim]# one servable of a directory, version 1[/]
  mserve start ./servables --servable add:1
  [dim]# a servable made by `mserve new`, in the current directory[/]
  mserve new demo && mserve start --servable demo
  mserve start --host 0.0.0.0 --port 8080 --device-type gpu --device-ids 0,1
  mserve start --ssl-certfile cert.pem --ssl-keyfile key.pem
  [dim]# two front-end processes on one port (HTTP, JSON, Python stages); models stay in one device process per device[/]
  mserve start --workers 2
  [dim]# everything in one process (no device processes)[/]
  mserve start --workers 0
  [dim]# settings from a file; flags override it[/]
  mserve start --config mserve.yaml --port 6000

[bold]Config file[/]: YAML, keys are the option names (servable_directory, servables, host, port, device_type, device_ids, max_msg_mb, threads, ssl_certfile, ssl_keyfile, ssl_ca, verify_client, drain_timeout, access_log, log_level, workers, max_batch_size, max_batch_delay_ms, batching, max_enqueued_requests, request_timeout, poll_interval, inline_max_ms, frontend_copy_max_kb); paths are relative to the file.

[bold]Exit codes[/]: 0 stopped by SIGINT/SIGTERM, 1 load or listen failure, 2 bad options or config.
"""

LIST_EPILOG = """\
[bold]Examples[/]

  mserve list
  mserve list ./servables --servable add --json
"""

log = logging.getLogger("mserve.cli")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (a test runner may swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@contextlib.contextmanager
def logging_to_stderr(level: str = "info", access_log: bool = True) -> Iterator[None]:
    """Server logs to stderr, ``mserve.access`` as one plain line per request
    (``HH:MM:SS POST /model/add:add_common 200 0.52ms``); restored afterwards."""
    root = logging.getLogger("mserve")
    access = logging.getLogger("mserve.access")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (root, access)]

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.handlers = [handler]
    root.setLevel(level.upper())
    root.propagate = False

    access_handler = _StderrHandler()
    access_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    access.handlers = [access_handler]
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    access.propagate = False
    try:
        yield
    finally:
        for lg, handlers, lvl, propagate in saved:
            lg.handlers = handlers
            lg.setLevel(lvl)
            lg.propagate = propagate


def _load(configs: list[Any], poll_interval: float | None = None) -> None:
    """Load servables; load failures exit 1 with one line (after unloading)."""
    from mserve import server
    from mserve.errors import ServableLoadError

    try:
        server.start_servables(configs, poll_interval=poll_interval)
    except (ServableLoadError, RuntimeError) as exc:
        server.stop()
        render.fail(str(exc), code=1)


def _describe_loaded() -> list[dict[str, Any]]:
    from mserve.ops import metadata
    from mserve import server

    servables = server.registry().servables()
    return [metadata.describe_servable(servables[name]) for name in sorted(servables)]


def start(
    servable_directory: Optional[str] = typer.Argument(
        None,
        metavar="SERVABLE_DIR",
        help="Folder of servables (NAME/servable_config.py + version folders). "
        "Default: the bundled servables, or with --servable NAME, ./NAME if it exists.",
        show_default=False,
    ),
    servable: Optional[list[str]] = typer.Option(
        None, "--servable", "-s", metavar="NAME[:VERSION]",
        help="Serve only this servable (repeatable). VERSION: a number, or 1,2 for several; default the newest.",
    ),
    host: Optional[str] = typer.Option(None, help="Address to listen on.  \\[default: 127.0.0.1]", show_default=False),
    port: Optional[int] = typer.Option(None, help="Port (0 picks a free one).  \\[default: 5500]", show_default=False),
    device_type: Optional[str] = typer.Option(
        None, help="cpu, gpu, or a backend plugin's type.  \\[default: JAX's default device]", show_default=False
    ),
    device_ids: Optional[str] = typer.Option(
        None, metavar="IDS", help="Devices to run each model on, e.g. 0,1.  \\[default: 0]", show_default=False
    ),
    max_msg_mb: Optional[int] = typer.Option(
        None, help="Largest request body in MB (1-512).  \\[default: 100]", show_default=False
    ),
    threads: Optional[int] = typer.Option(None, help="HTTP worker threads.  \\[default: the server's default]", show_default=False),
    ssl_certfile: Optional[Path] = typer.Option(None, help="Server certificate (PEM): serve HTTPS.", show_default=False),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="Private key of --ssl-certfile (PEM).", show_default=False),
    ssl_ca: Optional[Path] = typer.Option(None, help="CA bundle (PEM) that client certificates must chain to."),
    verify_client: Optional[bool] = typer.Option(
        None, "--verify-client/--no-verify-client", help="Require a client certificate (mutual TLS).", show_default=False
    ),
    drain_timeout: Optional[float] = typer.Option(
        None, help="Seconds to let in-flight requests finish on stop.  \\[default: 30]", show_default=False
    ),
    access_log: Optional[bool] = typer.Option(
        None, "--access-log/--no-access-log", help="One log line per request.  \\[default: on]", show_default=False
    ),
    log_level: Optional[str] = typer.Option(None, help="debug, info, warning or error.  \\[default: info]", show_default=False),
    workers: Optional[int] = typer.Option(
        None, help="Front-end processes sharing the port (HTTP, JSON, Python stages); the models live in one device"
        " process per device whatever N is. 0: everything in this one process.  \\[default: CPU cores, at most 8]",
        show_default=False,
    ),
    max_batch_size: Optional[int] = typer.Option(
        None, help="Most instances per device call for models with a free batch size.  \\[default: 32]",
        show_default=False,
    ),
    max_batch_delay_ms: Optional[float] = typer.Option(
        None, help="How long a batch may wait for requests already on their way.  \\[default: 2]", show_default=False
    ),
    batching: Optional[bool] = typer.Option(
        None, "--batching/--no-batching", help="Batch instances across requests.  \\[default: on]", show_default=False
    ),
    max_enqueued_requests: Optional[int] = typer.Option(
        None, help="Requests in the server at once; more get 503 + Retry-After.  \\[default: 10000]", show_default=False
    ),
    request_timeout: Optional[float] = typer.Option(
        None, help="Seconds before a request's instances answer 'Time out'.  \\[default: 100]", show_default=False
    ),
    poll_interval: Optional[float] = typer.Option(
        None, help="Hot reload: seconds between scans of the version folders (0: off).  \\[default: 0]",
        show_default=False,
    ),
    inline_max_ms: Optional[float] = typer.Option(
        None,
        help="Predicts that take at most this long (and do not batch across requests) run on the HTTP I/O thread,"
        " skipping two thread hand-offs (0: off).  \\[default: 1]",
        show_default=False,
    ),
    frontend_copy_max_kb: Optional[float] = typer.Option(
        None,
        help="Models of at most this many KiB, on the CPU and not batched across requests, also get a copy in each"
        " front-end process, saving the round trip to the device process (0: never; never on accelerators)."
        "  \\[default: 256]",
        show_default=False,
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", metavar="FILE.yaml", help="Settings file (same names as the options; options win)."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Load servables and serve them over HTTP(S) until Ctrl+C or SIGTERM.

    Prints a table of what is served (methods, inputs, outputs, the URL to POST to), then one log line per request. SIGINT/SIGTERM stop gracefully: no new connections, in-flight requests finish, exit 0.
    """
    with render.reported(debug, unexpected_code=1):
        flags = {
            "servable_directory": servable_directory,
            "servables": servable,
            "host": host,
            "port": port,
            "device_type": device_type,
            "device_ids": device_ids,
            "max_msg_mb": max_msg_mb,
            "threads": threads,
            "ssl_certfile": ssl_certfile,
            "ssl_keyfile": ssl_keyfile,
            "ssl_ca": ssl_ca,
            "verify_client": verify_client,
            "drain_timeout": drain_timeout,
            "access_log": access_log,
            "log_level": log_level,
            "workers": workers,
            "max_batch_size": max_batch_size,
            "max_batch_delay_ms": max_batch_delay_ms,
            "batching": batching,
            "max_enqueued_requests": max_enqueued_requests,
            "request_timeout": request_timeout,
            "poll_interval": poll_interval,
            "inline_max_ms": inline_max_ms,
            "frontend_copy_max_kb": frontend_copy_max_kb,
        }
        settings = StartSettings.build(config, flags)
        serve(settings)


def serve(settings: StartSettings) -> None:
    """Load, listen, print the table, block until a signal, stop gracefully."""
    with logging_to_stderr(settings.log_level, settings.access_log):
        _serve(settings)


def _serve(settings: StartSettings) -> None:
    resolved = resolve_servables(settings.servable_directory, settings.servables)
    configs = start_configs(resolved, settings.device_type, settings.device_ids, settings)

    # Signals are caught from here on, so a Ctrl+C during a long load stops cleanly too.
    stop_requested = threading.Event()
    signals_seen: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        # A second Ctrl+C means "now": exit without draining. A repeated SIGTERM (a
        # supervisor and a process-group kill both sending one) just keeps draining.
        if signum == signal.SIGINT and signal.SIGINT in signals_seen:
            render.note("[red]second Ctrl+C: exiting without draining[/]")
            import os

            os._exit(130)
        signals_seen.append(signum)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if settings.workers != 0:
            _serve_processes(settings, configs, stop_requested, signals_seen)
            return
        from mserve import server

        server.use_processes("single")
        _load(configs, settings.poll_interval or None)
        if stop_requested.is_set():
            server.stop(settings.drain_timeout)
            return
        try:
            restful = server.start_restful_server(
                settings.address, ssl_config=settings.ssl_config(), **settings.restful_options()
            )
        except ImportError as exc:
            server.stop()
            render.fail(f"HTTPS is not available in this mserve build ({exc})", code=1)
        except socket.gaierror as exc:
            server.stop()
            render.fail(f"cannot listen on {settings.address}: {exc.strerror or exc}", code=1)
        except (RuntimeError, ValueError, OSError) as exc:  # port in use, bad address, TLS files
            server.stop()
            render.fail(str(exc), code=1)

        try:
            _announce_and_wait(_describe_loaded(), restful.url, "", settings, stop_requested, signals_seen)
        finally:
            server.stop(settings.drain_timeout)
        render.note("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_processes(
    settings: StartSettings, configs: list[Any], stop_requested: threading.Event, signals_seen: list[int]
) -> None:
    """The default: ``settings.workers`` front-end processes on the port and one device
    process per device (see mserve.devices). The port is served first, so /health
    answers 200 and /ready 503 while the device processes load."""
    from mserve import server
    from mserve.errors import ServableLoadError

    server.use_processes("devices")
    workers = settings.workers if settings.workers is not None else server.default_workers()
    try:
        restful = server.start_restful_server(
            settings.address, ssl_config=settings.ssl_config(), workers=workers, **settings.restful_options()
        )
    except ImportError as exc:
        server.stop()
        render.fail(f"HTTPS is not available in this mserve build ({exc})", code=1)
    except socket.gaierror as exc:
        server.stop()
        render.fail(f"cannot listen on {settings.address}: {exc.strerror or exc}", code=1)
    except (RuntimeError, ValueError, OSError) as exc:  # port in use, bad address, TLS files
        server.stop()
        render.fail(str(exc), code=1)
    try:
        server.start_servables(configs, poll_interval=settings.poll_interval or None)
    except (ServableLoadError, RuntimeError) as exc:
        server.stop(drain_timeout=0)
        render.fail(str(exc), code=1)
    pool = restful.transport.pool
    devices = server._state.devices
    try:
        how = f" with {workers} front-end process{'es' if workers > 1 else ''} and " \
              f"{len(devices.devices)} device process{'es' if len(devices.devices) > 1 else ''}"
        _announce_and_wait(pool.description, restful.url, how, settings, stop_requested, signals_seen)
    finally:
        server.stop(settings.drain_timeout)
    render.note("stopped")


def _announce_and_wait(
    described: list[Any],
    url: str,
    how: str,
    settings: StartSettings,
    stop_requested: threading.Event,
    signals_seen: list[int],
) -> None:
    """Print what is served and where, then block until SIGINT/SIGTERM."""
    console = render.out()
    console.print(render.servables_table(described, url))
    console.print(f"[bold green]mserve[/] serving on [bold]{escape(url)}[/]{how}  (Ctrl+C to stop)", soft_wrap=True)
    console.print(
        f"health: {escape(url)}/health  ready: {escape(url)}/ready  metrics: {escape(url)}/metrics  "
        f"openapi: {escape(url)}/openapi.json", soft_wrap=True,
    )
    sys.stdout.flush()
    while not stop_requested.wait(0.5):
        pass
    name = signal.Signals(signals_seen[0]).name if signals_seen else "signal"
    render.note(f"{name}: stopping, letting in-flight requests finish (up to {settings.drain_timeout:g}s)")


def list_servables(
    servable_directory: Optional[str] = typer.Argument(
        None, metavar="SERVABLE_DIR", help="Folder of servables.  \\[default: the bundled servables]", show_default=False
    ),
    servable: Optional[list[str]] = typer.Option(
        None, "--servable", "-s", metavar="NAME[:VERSION]", help="Only this servable (repeatable)."
    ),
    device_type: Optional[str] = typer.Option(None, help="Device type to load on (as for start).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Show what `mserve start` would serve, without starting a server.

    Loads each servable (so every model is checked), describes versions, methods, inputs and outputs, then unloads.
    """
    with render.reported(debug, unexpected_code=1):
        resolved = resolve_servables(servable_directory, servable or [])
        configs = start_configs(resolved, device_type)
        from mserve import server

        server.use_processes("single")  # describe only: no device processes needed
        with logging_to_stderr("warning", access_log=False):
            _load(configs)
            try:
                descriptions = _describe_loaded()
            finally:
                server.stop()
        if as_json:
            import orjson

            sys.stdout.write(orjson.dumps({"servables": descriptions}, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            render.out().print(render.servables_table(descriptions))
