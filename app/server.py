"""The server API, MindSpore Serving's ``server`` module in shape.

    from mserve import server

    server.start_servables(server.ServableStartConfig("servables", "add"))
    server.start_restful_server("127.0.0.1:5500")
    ...
    server.stop()

``start_*`` return once the servables are loaded and warm, and the socket listens;
the server runs in background threads until `stop`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ServableLoadError
from .http import create_app
from .predict import PredictHandler
from .compile_cache import enable_compile_cache
from .servable import BatchSettings, Servable, ServableRegistry, list_versions, load_definition, load_version
from .transport import WaitressTransport, bind_socket, parse_address

log = logging.getLogger("mserve.server")


@dataclass
class ServableStartConfig:
    """Which servable to load, and where.

    ``version_number=0`` loads the newest version folder; a number loads that one; a
    list loads several. ``device_ids`` picks devices of ``device_type`` (``"cpu"``,
    ``"gpu"``, or a backend plugin's type; ``None``: JAX's default device kind).
    """

    servable_directory: str | os.PathLike
    servable_name: str
    device_ids: int | Sequence[int] = 0
    version_number: int | Sequence[int] = 0
    device_type: str | None = None
    num_parallel_workers: int = 0
    dec_key: Any = None
    dec_mode: str = "AES-GCM"
    # mserve additions: batching of models with a batch dimension (see BatchSettings).
    max_batch_size: int = 32
    batch_sizes: Sequence[int] | None = None
    max_batch_delay_ms: float = 2.0
    batching: bool = True

    def versions(self) -> list[int]:
        numbers = [self.version_number] if isinstance(self.version_number, int) else list(self.version_number)
        return numbers

    def device_list(self) -> list[int]:
        return [self.device_ids] if isinstance(self.device_ids, int) else list(self.device_ids)


@dataclass
class SSLConfig:
    """TLS for the RESTful server: one-way, or mutual with ``verify_client=True``."""

    certificate: str
    private_key: str
    custom_ca: str | None = None
    verify_client: bool = False


@dataclass
class _State:
    registry: ServableRegistry = field(default_factory=ServableRegistry)
    transports: list[Any] = field(default_factory=list)
    handlers: list[PredictHandler] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    observer: Any = None  # metrics hooks for the batchers


_state = _State()


def registry() -> ServableRegistry:
    """The servables this process serves (for tools and tests)."""
    return _state.registry


def resolve_devices(device_type: str | None, device_ids: Sequence[int]) -> list[Any]:
    """JAX devices for ``device_type``; other types go to their backend as (type, id)."""
    kind = (device_type or "").lower()
    if kind in ("", "none", "cpu", "gpu", "cuda"):
        import jax

        platform = {"": None, "none": None, "cuda": "gpu"}.get(kind, kind)
        try:
            devices = jax.devices(platform)
        except RuntimeError as exc:
            raise ServableLoadError(f"device_type {device_type!r} is not available here: {exc}") from None
        missing = [i for i in device_ids if not 0 <= i < len(devices)]
        if missing:
            raise ServableLoadError(
                f"device_ids {missing} do not exist: {len(devices)} {devices[0].platform} device(s) present"
            )
        return [devices[i] for i in device_ids]
    return [(kind, i) for i in device_ids]


def start_servables(servable_configs: ServableStartConfig | Sequence[ServableStartConfig], **ignored: Any) -> None:
    """Load and warm up the servables; raises `ServableLoadError` on any problem.

    Extra MindSpore arguments (``enable_lite``) are accepted and ignored.
    """
    configs = [servable_configs] if isinstance(servable_configs, ServableStartConfig) else list(servable_configs)
    enable_compile_cache()
    with _state.lock:
        for config in configs:
            _load(config)


def _load(config: ServableStartConfig) -> None:
    root = Path(config.servable_directory)
    definition = load_definition(root, config.servable_name)
    present = list_versions(root / config.servable_name)
    if not present:
        raise ServableLoadError(
            f"servable '{config.servable_name}': no version folder (1/, 2/, ...) in {root / config.servable_name}"
        )
    wanted = []
    for number in config.versions():
        if number == 0:
            wanted.append(present[-1])
        elif number in present:
            wanted.append(number)
        else:
            raise ServableLoadError(
                f"servable '{config.servable_name}': version {number} not found in {root / config.servable_name} "
                f"(present: {', '.join(map(str, present))})"
            )
    devices = resolve_devices(config.device_type, config.device_list())
    servable = Servable(config.servable_name, root, definition)
    batching = BatchSettings(
        config.max_batch_size, config.batch_sizes, config.max_batch_delay_ms, config.batching, _state.observer
    )
    for number in dict.fromkeys(wanted):
        loaded = load_version(root, definition, number, devices, batching, config.num_parallel_workers)
        _state.registry.add(servable, loaded)
        log.info("loaded servable %s version %d", config.servable_name, number)


class RestfulServer:
    """A started RESTful endpoint (returned by `start_restful_server`)."""

    def __init__(self, transport: Any, host: str):
        self.transport = transport
        self.host = host

    @property
    def port(self) -> int:
        return self.transport.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport.scheme}://{host}:{self.port}"


def start_restful_server(
    address: str = "127.0.0.1:5500",
    max_msg_mb_size: int = 100,
    ssl_config: SSLConfig | None = None,
    threads: int = 16,
    max_enqueued_requests: int = 10000,
    request_timeout: float = 100.0,
    sock: socket.socket | None = None,
) -> RestfulServer:
    """Serve the loaded servables over HTTP (HTTPS with ``ssl_config``) at ``address``
    (``host:port``; port 0 picks a free one, see the returned server's ``port``).

    mserve additions: ``threads`` (HTTP worker threads; requests waiting on a batch
    hold one each), ``max_enqueued_requests`` (more at once get 503), and
    ``request_timeout`` in seconds (late instances get ``Time out``), and ``sock``, an
    already listening socket to serve instead of binding ``address`` (worker
    processes share one this way).
    """
    if not isinstance(max_msg_mb_size, int) or not 1 <= max_msg_mb_size <= 512:
        raise RuntimeError(f"max_msg_mb_size must be an integer from 1 to 512, got {max_msg_mb_size!r}")
    host, port = parse_address(address)
    max_body = max_msg_mb_size * 1024 * 1024
    handler = PredictHandler(_state.registry, max_enqueued_requests, request_timeout)
    app = create_app(handler, max_body)
    with _state.lock:
        _state.handlers.append(handler)
        if sock is None:
            sock = bind_socket(host, port)
        if ssl_config is not None:
            from .tls import TlsTransport

            transport: Any = TlsTransport(app, sock, ssl_config, threads=threads, max_body_bytes=max_body)
        else:
            transport = WaitressTransport(app, sock, threads=threads, max_body_bytes=max_body)
        transport.start()
        _state.transports.append(transport)
    server = RestfulServer(transport, host)
    log.info("RESTful server listening on %s", server.url)
    return server


def stop(drain_timeout: float = 30.0) -> None:
    """Stop every RESTful server (letting in-flight requests finish) and unload."""
    with _state.lock:
        transports, _state.transports = _state.transports, []
        handlers, _state.handlers = _state.handlers, []
        for handler in handlers:
            handler.draining = True
        for transport in transports:
            transport.stop(drain_timeout)
        _state.registry.clear()
