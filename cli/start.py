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

from . import progress, render
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
  [dim]# mutual TLS, with /health and /ready on a plain-HTTP port for probes[/]
  mserve start --ssl-certfile cert.pem --ssl-keyfile key.pem --ssl-ca ca.pem --verify-client --health-port 5501
  [dim]# MindSpore Serving's gRPC service too (mserve.client / mindspore_serving.client)[/]
  mserve start --port 1500 --grpc-port 5500
  [dim]# two front-end processes on one port (HTTP, JSON, Python stages); models stay in one device process per device[/]
  mserve start --workers 2
  [dim]# everything in one process (no device processes)[/]
  mserve start --workers 0
  [dim]# a sharded model over 2 hosts, each running `mserve agent` (docs/distributed.md)[/]
  mserve start --servable mlp --distributed-address 0.0.0.0:6200 --hosts 2
  [dim]# settings from a file; flags override it[/]
  mserve start --config mserve.yaml --port 6000

[bold]Config file[/]: YAML, keys are the option names (servable_directory, servables, host, port, grpc_port, device_type, device_ids, max_msg_mb, threads, ssl_certfile, ssl_keyfile, ssl_ca, verify_client, drain_timeout, access_log, log_level, workers, max_batch_size, max_batch_delay_ms, batching, max_enqueued_requests, request_timeout, poll_interval, inline_max_ms, frontend_copy_max_kb, health_port, health_host, max_instances, max_connections, idle_timeout, header_timeout, handshake_timeout, max_header_kb, distributed_address, hosts, wait_agents); paths are relative to the file.

[bold]Exit codes[/]: 0 stopped by SIGINT/SIGTERM, 1 load or listen failure, 2 bad options or config.
"""

LIST_EPILOG = """\
[bold]Examples[/]

  mserve list
  mserve list ./servables --servable add --json
  [dim]# what a running server serves[/]
  mserve list --url http://127.0.0.1:5500
"""

log = logging.getLogger("mserve.cli")


@contextlib.contextmanager
def logging_to_stderr(level: str = "info", access_log: bool = True) -> Iterator[None]:
    """Server logs to stderr, ``mserve.access`` as one plain line per request
    (``HH:MM:SS POST /model/add:add_common 200 0.52ms``); restored afterwards."""
    root = logging.getLogger("mserve")
    access = logging.getLogger("mserve.access")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (root, access)]

    from mserve.logsetup import StderrHandler, access_formatter, formatter

    handler = StderrHandler()
    handler.setFormatter(formatter())
    root.handlers = [handler]
    root.setLevel(level.upper())
    root.propagate = False

    from mserve.ops.access_log import deferred as deferred_access_records
    from mserve.ops.batched_log import BatchedStreamHandler

    access_handler = BatchedStreamHandler()  # to sys.stderr in batches, off the request path
    access_handler.setFormatter(access_formatter())
    access.handlers = [access_handler]
    # Probes (/health, /ready, /metrics) are access-logged at DEBUG: --log-level debug shows them.
    access_level = logging.DEBUG if level.lower() == "debug" else logging.INFO
    access.setLevel(access_level if access_log else logging.WARNING)
    access.propagate = False
    deferred_access_records.enable()  # records made and written off the request path
    try:
        yield
    finally:
        deferred_access_records.disable()  # hands what is queued to the handler ...
        access_handler.close()  # ... which writes it
        for lg, handlers, lvl, propagate in saved:
            lg.handlers = handlers
            lg.setLevel(lvl)
            lg.propagate = propagate


def _load(
    configs: list[Any], poll_interval: float | None = None, show_progress: bool = False, frontends: int = 0
) -> None:
    """Load servables (with a progress display when asked; ``frontends``: how many
    front-end processes follow the device processes); load failures exit 1 with one
    line (after unloading)."""
    from mserve import server
    from mserve.errors import ServableLoadError

    display = (
        progress.LoadDisplay({c.servable_name for c in configs}, frontends) if show_progress
        else contextlib.nullcontext()
    )
    try:
        with display:
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
    grpc_port: Optional[int] = typer.Option(
        None, help="Also serve gRPC on this port of --host, with the same TLS settings: MindSpore Serving's MSService "
        "and the Open Inference Protocol's GRPCInferenceService.  \\[default: no gRPC]", show_default=False,
    ),
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
    health_port: Optional[int] = typer.Option(
        None, metavar="PORT",
        help="Also answer GET /health and /ready on this plain-HTTP port, without a client certificate "
        "(for probes under mutual TLS).  \\[default: off]",
        show_default=False,
    ),
    health_host: Optional[str] = typer.Option(
        None, help="Address of --health-port (0.0.0.0 for a kubelet's httpGet probes).  \\[default: 127.0.0.1]",
        show_default=False,
    ),
    max_instances: Optional[int] = typer.Option(
        None, help="Most instances in one request; more get 413.  \\[default: 10000]", show_default=False
    ),
    max_connections: Optional[int] = typer.Option(
        None,
        help="Open connections per process; at the limit the longest-idle are closed to make room (gRPC: new"
        " connections are refused).  \\[default: 10000, or what `ulimit -n` allows]",
        show_default=False,
    ),
    idle_timeout: Optional[float] = typer.Option(
        None, help="Seconds a connection may sit idle between requests (REST and gRPC).  \\[default: 60]",
        show_default=False,
    ),
    header_timeout: Optional[float] = typer.Option(
        None, help="Seconds to receive a request's line and headers once they start.  \\[default: 30]",
        show_default=False,
    ),
    handshake_timeout: Optional[float] = typer.Option(
        None, help="Seconds for a TLS handshake, from connect.  \\[default: 10]", show_default=False
    ),
    max_header_kb: Optional[int] = typer.Option(
        None, help="Largest request line + headers in KiB; more get 431.  \\[default: 64]", show_default=False
    ),
    distributed_address: Optional[str] = typer.Option(
        None, metavar="HOST:PORT",
        help="Serve sharded models over several hosts: the address their `mserve agent`s connect to "
        "(docs/distributed.md). Needs --hosts.", show_default=False,
    ),
    hosts: Optional[int] = typer.Option(
        None, metavar="N", help="How many hosts (agents) a distributed servable spans.", show_default=False
    ),
    wait_agents: Optional[float] = typer.Option(
        None, metavar="SECONDS", help="How long start-up waits for every host's agent (0: no limit).  \\[default: 0]",
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
            "grpc_port": grpc_port,
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
            "health_port": health_port,
            "health_host": health_host,
            "max_instances": max_instances,
            "max_connections": max_connections,
            "idle_timeout": idle_timeout,
            "header_timeout": header_timeout,
            "handshake_timeout": handshake_timeout,
            "max_header_kb": max_header_kb,
            "distributed_address": distributed_address,
            "hosts": hosts,
            "wait_agents": wait_agents,
        }
        settings = StartSettings.build(config, flags)
        serve(settings)


def serve(settings: StartSettings) -> None:
    """Load, listen, print the table, block until a signal, stop gracefully."""
    with logging_to_stderr(settings.log_level, settings.access_log):
        _serve(settings)


def _serve(settings: StartSettings) -> None:
    from mserve import server

    server.default_runtime().ready_log.quiet()  # this command says "ready" itself (progress.announce_ready)
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
        _start_distributed(settings, stop_requested)
        # Listen first: a port in use or a bad certificate is reported before any model
        # compiles, and while they load /health answers 200 and /ready 503.
        restful, probes, grpc_target = _listen(settings)
        render.note(
            f"listening on {escape(restful.url)}: /health answers 200, /ready 503 until the servables are loaded"
        )
        _load(configs, settings.poll_interval or None, show_progress=True)
        if stop_requested.is_set():
            server.stop(settings.drain_timeout)
            return
        progress.announce_ready(escape(restful.url))
        try:
            extra = f"\nprobes without a client certificate: {probes.url}/health  {probes.url}/ready" if probes else ""
            _announce_and_wait(
                _describe_loaded(), restful.url, "", settings, stop_requested, signals_seen, extra, grpc_target
            )
        finally:
            server.stop(settings.drain_timeout)
        render.note("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_distributed(settings: StartSettings, stop_requested: threading.Event) -> None:
    """With --hosts: serve the distributed servable over the hosts' agents
    (docs/distributed.md), from the device process or (``--workers 0``) from this
    one, which then listens for the agents now: a port in use exits 1 with one line.
    A stop while start-up waits for the agents ends the wait."""
    if settings.hosts is None:
        return
    from mserve import server
    from mserve.distributed.coordinator import GroupSettings
    from mserve.distributed.serving import serve_over_hosts

    runtime = server.default_runtime()
    try:
        group = serve_over_hosts(runtime, GroupSettings(settings.distributed_address, settings.hosts,
                                                        settings.wait_agents))
    except (OSError, ValueError) as exc:
        render.fail(str(exc), code=1)
    # Starting up waits for the agents, without limit by default: a stop ends the wait.
    cancel = group.close if group is not None else runtime.cancel_start
    threading.Thread(target=lambda: stop_requested.wait() and cancel(), name="mserve-distributed-stop",
                     daemon=True).start()
    address = group.address if group is not None else settings.distributed_address
    render.note(f"distributed: waiting for {settings.hosts} host(s) on {escape(address)} "
                f"(mserve agent --distributed-address {escape(address)} --host-index I)")


def _listen(settings: StartSettings, workers: int | None = None) -> tuple[Any, Any, str | None]:
    """Start the RESTful server (its front-end processes when ``workers`` is given),
    the health port and gRPC before loading; exit 1 with one line when a port cannot
    be used or a TLS file is bad. Returns the REST server, the health server and what
    gRPC clients dial (None without gRPC). With ``workers``, gRPC gets front-end
    processes of its own, sharing its port (SO_REUSEPORT): as many when ``--workers``
    was given, else `default_grpc_workers`."""
    from mserve import server

    probes = grpc_target = None
    front = {} if workers is None else {"workers": workers}
    try:
        restful = server.start_restful_server(
            settings.address, ssl_config=settings.ssl_config(), **front, **settings.restful_options()
        )
        if settings.health_port is not None:
            host = settings.health_host
            host = f"[{host}]" if ":" in host and not host.startswith("[") else host
            probes = server.start_health_server(f"{host}:{settings.health_port}")
        if settings.grpc_address is not None:
            grpc_front = front if settings.workers is not None else {}
            grpc_target = server.start_grpc_server(
                settings.grpc_address, ssl_config=settings.ssl_config(), **grpc_front, **settings.grpc_options()
            ).target
    except ImportError as exc:
        server.stop()
        render.fail(f"HTTPS is not available in this mserve build ({exc})", code=1)
    except socket.gaierror as exc:
        server.stop()
        render.fail(f"cannot listen on {settings.address}: {exc.strerror or exc}", code=1)
    except (RuntimeError, ValueError, OSError) as exc:  # port in use, bad address, TLS files
        server.stop()
        render.fail(str(exc), code=1)
    return restful, probes, grpc_target


def _serve_processes(
    settings: StartSettings, configs: list[Any], stop_requested: threading.Event, signals_seen: list[int]
) -> None:
    """The default: ``settings.workers`` front-end processes on the port and one device
    process per device (see mserve.devices). The port is served first, so /health
    answers 200 and /ready 503 while the device processes load."""
    from mserve import server

    server.use_processes("devices")
    _start_distributed(settings, stop_requested)
    workers = settings.workers if settings.workers is not None else server.default_workers()
    restful, probes, grpc_target = _listen(settings, workers)
    render.note(
        f"listening on {escape(restful.url)} ({workers} front-end process{'es' if workers > 1 else ''}): "
        "/health answers 200, /ready 503 until the device processes have loaded the servables"
    )
    # The device processes report progress; start_servables returns once every
    # front-end serves the servables, which is when /ready turns 200.
    _load(configs, settings.poll_interval or None, show_progress=True, frontends=workers)
    if not stop_requested.is_set():
        progress.announce_ready(escape(restful.url))
    pool = restful.transport.pool
    devices = server.default_runtime().devices
    try:
        how = f" with {workers} front-end process{'es' if workers > 1 else ''} and " \
              f"{len(devices.devices)} device process{'es' if len(devices.devices) > 1 else ''}"
        extra = f"\nprobes without a client certificate: {probes.url}/health  {probes.url}/ready" if probes else ""
        _announce_and_wait(
            pool.description, restful.url, how, settings, stop_requested, signals_seen, extra, grpc_target
        )
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
    extra: str = "",
    grpc_target: str | None = None,
) -> None:
    """Print what is served and where, then block until SIGINT/SIGTERM."""
    console = render.out()
    table = render.servables_table(described, url)
    if grpc_target:
        table.caption = f"gRPC: Client({grpc_target!r}, SERVABLE, METHOD) from mserve.client or mindspore_serving.client"
        table.caption_justify = "left"
    console.print(table)
    where = f"[bold]{escape(url)}[/]" + (f" and gRPC [bold]{escape(grpc_target)}[/]" if grpc_target else "")
    console.print(f"[bold green]mserve[/] serving on {where}{how}  (Ctrl+C to stop)", soft_wrap=True)
    console.print(
        f"docs: {escape(url)}/docs  health: {escape(url)}/health  ready: {escape(url)}/ready  "
        f"metrics: {escape(url)}/metrics  openapi: {escape(url)}/openapi.json{escape(extra)}", soft_wrap=True,
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
    url: Optional[str] = typer.Option(
        None, "--url", help="Describe the servables of a running server instead (e.g. http://127.0.0.1:5500).",
        show_default=False,
    ),
    cacert: Optional[Path] = typer.Option(None, help="With --url https://: CA bundle (PEM).", show_default=False),
    cert: Optional[Path] = typer.Option(None, help="With --url https://: client certificate (PEM).", show_default=False),
    key: Optional[Path] = typer.Option(None, help="Private key of --cert, if not inside it.", show_default=False),
    insecure: bool = typer.Option(False, "--insecure", "-k", help="Do not verify the server's certificate."),
    timeout: float = typer.Option(30.0, help="With --url: seconds to wait for the answer."),
    protocol: str = typer.Option(
        "mindspore", "--protocol", metavar="mindspore|v2",
        help="With --url: v2 lists the models of any Open Inference Protocol (KServe v2) server.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Show what `mserve start` would serve, without starting a server; or, with --url, what a running server serves.

    Loads each servable (so every model is checked), describes versions, methods, inputs and outputs, then unloads.
    """
    with render.reported(debug, unexpected_code=1):
        if protocol not in ("mindspore", "v2"):
            render.fail(f"--protocol {protocol!r}: give mindspore (the default) or v2")
        if protocol == "v2":
            _list_v2(url, servable, cacert, cert, key, insecure, timeout, as_json)
            return
        if url is not None:
            if servable_directory is not None or device_type is not None:
                render.fail("--url describes a running server: SERVABLE_DIR and --device-type do not apply")
            descriptions = _describe_remote(url, servable or [], cacert, cert, key, insecure, timeout)
            base: Optional[str] = url.rstrip("/")
        else:
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
            base = None
        if as_json:
            import orjson

            sys.stdout.write(orjson.dumps({"servables": descriptions}, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            render.out().print(render.servables_table(descriptions, base))


def _list_v2(url: Optional[str], names: Optional[list[str]], cacert: Optional[Path], cert: Optional[Path],
             key: Optional[Path], insecure: bool, timeout: float, as_json: bool) -> None:
    """``mserve list --url URL --protocol v2``: the models of an Open Inference Protocol server."""
    from . import v2
    from .client import check_base, ssl_context

    if url is None:
        render.fail("--protocol v2 lists a running server's models: give --url")
    if names:
        render.fail("--servable does not apply to --protocol v2: every model is listed")
    base = check_base(url)
    models = v2.list_models(base, timeout, ssl_context(base, cacert, cert, key, insecure))
    if as_json:
        import orjson

        sys.stdout.write(orjson.dumps({"models": models}, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render.out().print(v2.models_table(models, base))


def _describe_remote(
    url: str, names: list[str], cacert: Optional[Path], cert: Optional[Path], key: Optional[Path], insecure: bool,
    timeout: float,
) -> list[dict[str, Any]]:
    """``GET /models`` of a running server, optionally only the servables ``names``."""
    from .client import check_base, get_json, ssl_context

    base = check_base(url)
    context = ssl_context(base, cacert, cert, key, insecure)
    status, answer = get_json(base + "/models", timeout, context)
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("servables"), list):
        detail = answer.get("error_msg") if isinstance(answer, dict) else None
        render.fail(f"{base}/models answered HTTP {status}{': ' + str(detail) if detail else ''} "
                    "(is this an mserve server? for an Open Inference Protocol server, add --protocol v2)")
    descriptions = answer["servables"]
    if names:
        wanted = {n.partition(":")[0] for n in names}
        missing = sorted(wanted - {d.get("name") for d in descriptions})
        if missing:
            served = ", ".join(sorted(str(d.get("name")) for d in descriptions)) or "nothing"
            render.fail(f"{base} does not serve {', '.join(missing)} (it serves {served})")
        descriptions = [d for d in descriptions if d.get("name") in wanted]
    return descriptions
