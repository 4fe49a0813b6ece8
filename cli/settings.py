"""`mserve start` settings: one dataclass that a YAML file and the flags both fill.

    settings = StartSettings.build(config_file, flags)   # flags override the file

Adding a start option means adding a field here (with its default and a help line
in ``FIELD_HELP``) and a flag in ``start.py``; the YAML key is the field name
(dashes are accepted too: ``max-msg-mb`` = ``max_msg_mb``). Paths in a YAML file are
relative to the file's folder.

Also here: which servables a start (or ``mserve list``) loads, from the servable
directory argument and ``--servable NAME[:VERSION]``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .render import fail

CONFIG_FILE = "servable_config.py"


@dataclass
class StartSettings:
    servable_directory: str | None = None
    servables: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 5500
    grpc_port: int | None = None  # also serve MindSpore's gRPC MSService on host:grpc_port
    device_type: str | None = None
    device_ids: list[int] = field(default_factory=lambda: [0])
    max_msg_mb: int = 100
    threads: int | None = None  # None: the server's default
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_ca: str | None = None
    verify_client: bool = False
    drain_timeout: float = 30.0
    access_log: bool = True
    log_level: str = "info"
    workers: int | None = None  # front-end processes; None: mserve.server.default_workers(); 0: one process
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    batching: bool = True
    max_enqueued_requests: int = 10000
    request_timeout: float = 100.0
    poll_interval: float = 0.0  # seconds between version-folder scans; 0: no hot reload
    inline_max_ms: float = 1.0  # predicts this quick run on the HTTP I/O thread; 0: never
    frontend_copy_max_kb: float = 256.0  # small unbatched CPU models also live in each front-end; 0: never
    health_port: int | None = None  # plain-HTTP /health and /ready (no client certificate); None: off
    health_host: str = "127.0.0.1"
    # What clients may hold (README, "Limits and hostile clients").
    max_instances: int = 10000  # instances per request; more: 413
    max_connections: int | None = None  # None: 10,000 or what the descriptor limit allows
    idle_timeout: float = 60.0
    header_timeout: float = 30.0
    handshake_timeout: float = 10.0
    max_header_kb: int = 64
    # A servable spanning hosts (docs/distributed.md): agents connect to this address.
    distributed_address: str | None = None
    hosts: int | None = None  # hosts (agents) of the group, with --distributed-address
    wait_agents: float = 0.0  # seconds start-up waits for every host's agent; 0: no limit

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, config_file: str | os.PathLike | None, flags: Mapping[str, Any]) -> "StartSettings":
        """Defaults, then the YAML file, then the flags that were given (not None)."""
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(read_config(Path(config_file)))
        for key, value in flags.items():
            if value is None or (isinstance(value, (list, tuple)) and not value):
                continue
            values[key] = coerce(key, value, source="option")
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            fail(f"port {self.port} is out of range (0-65535)")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            fail(f"grpc_port {self.grpc_port} is out of range (0-65535)")
        if self.grpc_port and self.grpc_port in (self.port, self.health_port):
            fail(f"--grpc-port {self.grpc_port} is already the REST or health port; pick another one")
        if not 1 <= self.max_msg_mb <= 512:
            fail(f"max_msg_mb must be from 1 to 512, got {self.max_msg_mb}")
        if self.threads is not None and self.threads < 1:
            fail(f"threads must be at least 1, got {self.threads}")
        if not self.device_ids:
            fail("device_ids is empty")
        if any(d < 0 for d in self.device_ids):
            fail(f"device_ids must be non-negative, got {self.device_ids}")
        if self.workers is not None and self.workers < 0:
            fail(f"workers must be 0 (one process) or more front-end processes, got {self.workers}")
        if self.max_batch_size < 1:
            fail(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_batch_delay_ms < 0:
            fail(f"max_batch_delay_ms must be >= 0, got {self.max_batch_delay_ms}")
        if self.max_enqueued_requests < 1:
            fail(f"max_enqueued_requests must be at least 1, got {self.max_enqueued_requests}")
        if self.poll_interval < 0:
            fail(f"poll_interval must be >= 0, got {self.poll_interval}")
        if self.frontend_copy_max_kb < 0:
            fail(f"frontend_copy_max_kb must be >= 0, got {self.frontend_copy_max_kb}")
        if self.inline_max_ms < 0:
            fail(f"inline_max_ms must be >= 0, got {self.inline_max_ms}")
        if self.request_timeout <= 0:
            fail(f"request_timeout must be > 0, got {self.request_timeout}")
        if self.max_instances < 1:
            fail(f"max_instances must be at least 1, got {self.max_instances}")
        if self.max_connections is not None and self.max_connections < 1:
            fail(f"max_connections must be at least 1, got {self.max_connections}")
        for name in ("idle_timeout", "header_timeout", "handshake_timeout"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_header_kb < 1:
            fail(f"max_header_kb must be at least 1, got {self.max_header_kb}")
        if self.drain_timeout < 0:
            fail(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            fail("HTTPS needs both --ssl-certfile and --ssl-keyfile")
        if (self.ssl_ca or self.verify_client) and not self.ssl_certfile:
            fail("--ssl-ca and --verify-client need HTTPS (--ssl-certfile and --ssl-keyfile)")
        if self.verify_client and not self.ssl_ca:
            fail("--verify-client needs --ssl-ca (the CA that signs client certificates)")
        if self.device_type is not None and self.device_type.lower() not in ("cpu", "gpu", "ascend"):
            fail(f"device_type must be cpu, gpu or ascend (any case; MindSpore Serving's types), got {self.device_type!r}")
        if self.health_port is not None:
            if not 0 <= self.health_port <= 65535:
                fail(f"health_port {self.health_port} is out of range (0-65535)")
            if self.health_port and self.health_port == self.port and self.health_host == self.host:
                fail(f"--health-port {self.health_port} is the serving port; pick another one")
        if (self.distributed_address is None) != (self.hosts is None):
            fail("a distributed servable needs both --distributed-address HOST:PORT and --hosts N")
        if self.hosts is not None:
            if self.hosts < 1:
                fail(f"hosts must be at least 1, got {self.hosts}")
        if self.wait_agents < 0:
            fail(f"wait_agents must be >= 0 seconds (0: wait without limit), got {self.wait_agents}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            fail(f"log_level must be debug, info, warning or error, got {self.log_level!r}")

    @property
    def address(self) -> str:
        return f"{self._host()}:{self.port}"

    @property
    def grpc_address(self) -> str | None:
        """``host:grpc_port`` for server.start_grpc_server, or None without gRPC."""
        return None if self.grpc_port is None else f"{self._host()}:{self.grpc_port}"

    def _host(self) -> str:
        return f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host

    def restful_options(self) -> dict[str, Any]:
        """Keyword arguments of server.start_restful_server beyond address and TLS."""
        options: dict[str, Any] = {
            "max_msg_mb_size": self.max_msg_mb,
            "max_enqueued_requests": self.max_enqueued_requests,
            "request_timeout": self.request_timeout,
            "inline_max_ms": self.inline_max_ms,
            "max_instances_per_request": self.max_instances,
            "idle_timeout": self.idle_timeout,
            "header_timeout": self.header_timeout,
            "handshake_timeout": self.handshake_timeout,
            "max_header_kb": self.max_header_kb,
        }
        if self.threads is not None:
            options["threads"] = self.threads
        if self.max_connections is not None:
            options["max_connections"] = self.max_connections
        return options

    def grpc_options(self) -> dict[str, Any]:
        """Keyword arguments of server.start_grpc_server beyond address and TLS: the
        connection limit and idle timeout apply to gRPC too, per process; the other
        HTTP connection settings are REST's alone."""
        keys = ("max_msg_mb_size", "max_enqueued_requests", "request_timeout", "max_instances_per_request", "threads",
                "max_connections", "idle_timeout", "inline_max_ms")
        return {k: v for k, v in self.restful_options().items() if k in keys}

    def ssl_config(self) -> Any:
        if not self.ssl_certfile:
            return None
        from mserve import server

        return server.SSLConfig(
            certificate=self.ssl_certfile,
            private_key=str(self.ssl_keyfile),
            custom_ca=self.ssl_ca,
            verify_client=self.verify_client,
        )


FIELDS = {f.name: f for f in dataclasses.fields(StartSettings)}
_OPTIONAL_INTS = {"threads", "workers", "health_port", "max_connections", "grpc_port", "hosts"}
_PATH_FIELDS = {"servable_directory", "ssl_certfile", "ssl_keyfile", "ssl_ca"}


def read_config(path: Path) -> dict[str, Any]:
    """The settings in a YAML file, validated; relative paths made relative to it."""
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"config file {path}: {exc.strerror or exc}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        fail(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        fail(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in FIELDS:
            fail(f"config file {path}: unknown setting {raw_key!r}; known: {', '.join(FIELDS)}")
        value = coerce(key, value, source=f"config file {path}")
        if key in _PATH_FIELDS and value is not None and not Path(value).expanduser().is_absolute():
            value = str(path.parent / Path(value).expanduser())
        values[key] = value
    return values


def coerce(key: str, value: Any, source: str) -> Any:
    """``value`` as the type of setting ``key``; a clear error otherwise."""
    default = FIELDS[key].default
    where = f"{source}: {key}"
    if key == "servables":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
            fail(f"{where} must be a list of NAME or NAME:VERSION strings")
        return list(items)
    if key == "device_ids":
        return parse_device_ids(value, where)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) or key in _OPTIONAL_INTS:
        if value is None and key in _OPTIONAL_INTS:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"{where} must be a number, got {value!r}")
        return float(value)
    # strings (and optional strings)
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        fail(f"{where} must be a string, got {value!r}")
    return str(value)


def parse_device_ids(value: Any, where: str = "device_ids") -> list[int]:
    """``0``, ``"0,1"`` or ``[0, 1]``."""
    if isinstance(value, bool):
        fail(f"{where} must be device numbers such as 0 or 0,1, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    ids = []
    for part in parts:
        try:
            if isinstance(part, bool):
                raise ValueError
            ids.append(int(part))
        except (TypeError, ValueError):
            fail(f"{where} must be device numbers such as 0 or 0,1, got {value!r}")
    return ids


# --------------------------------------------------------------------------- servables


def parse_servable_spec(spec: str) -> tuple[str, list[int]]:
    """``NAME`` -> (NAME, [0]) (newest); ``NAME:2`` or ``NAME:1,2`` -> those versions."""
    name, sep, versions = spec.partition(":")
    name = name.strip()
    if not name or "/" in name:
        fail(f"--servable {spec!r}: expected NAME or NAME:VERSION")
    if not sep:
        return name, [0]
    numbers = []
    for part in versions.split(","):
        part = part.strip()
        if not part.isdigit():
            fail(f"--servable {spec!r}: version {part!r} is not a number (expected NAME:VERSION, e.g. add:1)")
        numbers.append(int(part))
    return name, numbers


def servables_in(directory: Path) -> list[str]:
    """Names of the servables in ``directory`` (folders holding servable_config.py)."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())


def bundled_dir() -> Path:
    from mserve.servables import BUNDLED_DIR

    return Path(BUNDLED_DIR)


def resolve_servables(directory: str | None, specs: list[str]) -> list[tuple[Path, str, list[int]]]:
    """(servable directory, name, versions) for each servable to load.

    * a directory given: every servable in it, or those named with ``--servable``;
    * no directory, no ``--servable``: the bundled servables (the embedded default);
    * no directory, ``--servable NAME``: NAME from the current directory if it is
      there (what ``mserve new NAME`` just made), else the bundled one.
    """
    parsed = [parse_servable_spec(s) for s in specs]
    seen = set()
    for name, _ in parsed:
        if name in seen:
            fail(f"--servable {name} is given twice (use NAME:1,2 for several versions)")
        seen.add(name)
    if directory is not None:
        root = Path(directory).expanduser()
        if not root.is_dir():
            fail(f"servable directory {root} does not exist")
        if not parsed:
            names = servables_in(root)
            if not names:
                fail(f"no servables in {root} (a servable is a folder holding {CONFIG_FILE}; try `mserve new NAME`)")
            return [(root, n, [0]) for n in names]
        for name, _ in parsed:
            if not (root / name / CONFIG_FILE).is_file():
                known = ", ".join(servables_in(root)) or "none"
                fail(f"servable {name!r} not found in {root} (servables there: {known})")
        return [(root, n, v) for n, v in parsed]
    bundled = bundled_dir()
    if not parsed:
        names = servables_in(bundled)
        if not names:
            fail(f"no bundled servables in {bundled}")
        return [(bundled, n, [0]) for n in names]
    resolved = []
    for name, versions in parsed:
        for root in (Path.cwd(), bundled):
            if (root / name / CONFIG_FILE).is_file():
                resolved.append((root, name, versions))
                break
        else:
            known = ", ".join(servables_in(bundled)) or "none"
            fail(
                f"servable {name!r} is neither in the current directory nor bundled (bundled: {known}); "
                "give its directory: mserve start DIR --servable NAME"
            )
    return resolved


def start_configs(
    resolved: list[tuple[Path, str, list[int]]],
    device_type: str | None = None,
    device_ids: list[int] | None = None,
    settings: StartSettings | None = None,
) -> list[Any]:
    from mserve import server

    batching: dict[str, Any] = {}
    if settings is not None:
        batching = {
            "max_batch_size": settings.max_batch_size,
            "max_batch_delay_ms": settings.max_batch_delay_ms,
            "batching": settings.batching,
            "frontend_copy_max_kb": settings.frontend_copy_max_kb,
        }
    return [
        server.ServableStartConfig(
            str(Path(root).resolve()),  # a relative one would be taken from the script's folder
            name,
            device_ids=list(device_ids or [0]),
            version_number=versions[0] if len(versions) == 1 else versions,
            device_type=device_type,
            **batching,
        )
        for root, name, versions in resolved
    ]
