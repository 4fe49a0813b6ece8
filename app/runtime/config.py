"""What to start: MindSpore Serving's `ServableStartConfig` and `SSLConfig`, with
its parameter checks and messages (``RuntimeError("Parameter '...' ...")``), and
`merge_configs`, which unites several configs of one servable as MindSpore does.

Kept apart from the runtime so that the device and front-end processes, which
rebuild configs from JSON, need nothing else of the server.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


DEVICE_TYPES = ("ascend", "gpu", "cpu")


@dataclass
class ServableStartConfig:
    """Which servable to load, and where: MindSpore Serving's ``ServableStartConfig``.

    ``servable_directory`` holds the folder ``servable_name``; a relative directory is
    taken from the start script's own folder (``sys.argv[0]``), as MindSpore does.
    ``version_number=0`` loads the newest version folder, a number that one (mserve:
    a list loads several); a servable that declares no model needs no version folder.
    ``device_ids``: an int or a sequence of them (``None``, as in MindSpore Serving:
    no device ids; declared models then run on the CPU, device 0, unless
    ``device_type`` names another type) of ``device_type``: ``"CPU"``, ``"GPU"``, ``"Ascend"``
    (any case; it must be one an installed backend runs on), or ``None``: each
    model's backend picks its default. A model that declares a sharding is one
    instance spanning all of them. ``num_parallel_workers`` (0..64) sizes the thread
    pool of per-instance Python stages. ``dec_key`` (bytes of length 16, 24 or 32)
    and ``dec_mode`` (``AES-GCM``/``AES-CBC``) are checked here; loading fails unless
    the model's backend can decrypt.
    """

    servable_directory: str | os.PathLike
    servable_name: str
    device_ids: int | Sequence[int] | None = None
    version_number: int | Sequence[int] = 0
    device_type: str | None = None
    num_parallel_workers: int = 0
    dec_key: bytes | None = None
    dec_mode: str = "AES-GCM"
    # mserve additions: batching of models with a batch dimension (see BatchSettings).
    max_batch_size: int = 32
    batch_sizes: Sequence[int] | None = None
    max_batch_delay_ms: float = 2.0
    batching: bool = True
    # With device processes: a model of at most this many KiB of files, on the CPU,
    # not batched across requests, also gets a copy in each front-end, which runs it
    # on its HTTP I/O thread (a round trip to the device process costs more than such
    # a model's whole call). 0: never. Never for accelerators. See mserve.devices.
    frontend_copy_max_kb: float = 256.0

    def __post_init__(self) -> None:
        self.check()
        self.servable_directory = script_relative(self.servable_directory)
        self.device_ids = _int_tuple("device_ids", self.device_ids, 0) if self.device_ids is not None else None

    def check(self) -> None:
        """MindSpore Serving's checks and messages (``RuntimeError``); called again by
        `start_servables`, so a field changed after construction is checked too."""
        directory = self.servable_directory
        if not isinstance(directory, os.PathLike):  # mserve also takes a pathlib.Path
            _check_str("servable_directory", directory)
        _check_str("servable_name", self.servable_name)
        if isinstance(self.version_number, (list, tuple)):  # mserve: several versions
            if not self.version_number:
                raise RuntimeError("Parameter 'version_number' should not be an empty list")
            _int_tuple("version_number", self.version_number, 0)
        else:
            _check_int("version_number", self.version_number, 0)
        _check_int("num_parallel_workers", self.num_parallel_workers, 0, 64)
        if self.dec_key is not None:
            if not isinstance(self.dec_key, bytes):
                raise RuntimeError(f"Parameter 'dec_key' should be bytes, but actually {type(self.dec_key)}")
            if not self.dec_key:
                raise RuntimeError("Parameter 'dec_key' should not be empty bytes")
            if len(self.dec_key) not in (16, 24, 32):
                raise RuntimeError(f"Parameter 'dec_key' length {len(self.dec_key)} expected to be 16, 24 or 32")
        _check_str("dec_mode", self.dec_mode)
        if self.dec_mode not in ("AES-GCM", "AES-CBC"):
            raise RuntimeError("Parameter 'dec_mode' expected to be 'AES-GCM' or 'AES-CBC'")
        if self.device_ids is not None:
            _int_tuple("device_ids", self.device_ids, 0)
        validate_device_type(self.device_type)

    def versions(self) -> list[int]:
        return [self.version_number] if isinstance(self.version_number, int) else list(self.version_number)

    def device_list(self) -> list[int]:
        if self.device_ids is None:
            return [0]
        return [self.device_ids] if isinstance(self.device_ids, int) else list(self.device_ids)

    def target_device_type(self) -> str | None:
        """The device type models load on: as MindSpore Serving means ``device_ids=None``
        (no device ids), the CPU serves the declared models unless a type is named."""
        if self.device_ids is None and self.device_type is None:
            return "cpu"
        return self.device_type


def validate_device_type(device_type: str | None) -> None:
    """``None``, or one of MindSpore Serving's device types in any case."""
    if device_type is None:
        return
    _check_str("device_type", device_type)
    if device_type.lower() not in DEVICE_TYPES + ("none",):
        raise RuntimeError(
            f"Unsupported device type '{device_type}', only support 'Ascend', 'GPU', 'CPU' and None, case ignored"
        )


def script_relative(directory: str | os.PathLike) -> str:
    """An absolute servable directory: a relative one is taken from the start
    script's folder, as MindSpore Serving does (not from the current directory)."""
    script_dir = os.path.dirname(os.path.realpath(sys.argv[0])) if sys.argv and sys.argv[0] else os.getcwd()
    return os.path.realpath(os.path.join(script_dir, os.fspath(directory)))


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RuntimeError(f"Parameter '{name}' should be str, but actually {type(value)}")
    if not value:
        raise RuntimeError(f"Parameter '{name}' should not be empty str")


def _check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, item: bool = False) -> None:
    prefix = f"The item value '{value}' in parameter '{name}'" if item else f"Parameter '{name}'"
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuntimeError(f"{prefix} should be int, but actually {type(value)}")
    if minimum is not None and value < minimum:
        raise RuntimeError(f"{prefix} should be in range [{minimum},{maximum}]" if maximum is not None else f"{prefix} should be >= {minimum}")
    if maximum is not None and value > maximum:
        raise RuntimeError(f"{prefix} should be in range [{minimum},{maximum}]" if minimum is not None else f"{prefix} should be <= {maximum}")


def _int_tuple(name: str, values: Any, minimum: int | None = None) -> tuple[int, ...]:
    """An int, or a list/tuple of distinct ints, as a tuple (MindSpore's check)."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (tuple, list)):
        raise RuntimeError(f"Parameter '{name}' should be int or tuple/list of int, but actually {type(values)}")
    seen: list[int] = []
    for value in values:
        if value in seen:
            raise RuntimeError(f"The item value '{value}' in parameter '{name}' should not be repeated")
        _check_int(name, value, minimum, item=True)
        seen.append(value)
    return tuple(seen)


@dataclass
class SSLConfig:
    """TLS for the RESTful and gRPC servers: one-way, or mutual with ``verify_client=True``."""

    certificate: str
    private_key: str
    custom_ca: str | None = None
    verify_client: bool = False


_MERGED_ALIKE = ("device_type", "dec_key", "dec_mode", "max_batch_size", "batch_sizes", "max_batch_delay_ms", "batching")


def _alike(key: str, value: Any) -> Any:
    return (value or "none").lower() if key == "device_type" else value


def merge_configs(configs: Sequence[ServableStartConfig]) -> list[ServableStartConfig]:
    """One config per servable: configs of the same servable (the same version or
    not) unite their versions and device ids, and take the most parallel workers,
    as MindSpore Serving's ``merge_config`` does."""
    merged: dict[str, ServableStartConfig] = {}
    for config in configs:
        name = config.servable_name
        first = merged.get(name)
        if first is None:
            merged[name] = dataclasses.replace(config)
            continue
        if Path(first.servable_directory) != Path(config.servable_directory):
            raise RuntimeError(
                f"The servable directory of servable name {name} is different in multiple configurations, servable "
                f"directory: {config.servable_directory} and {first.servable_directory}"
            )
        if (first.dec_key, first.dec_mode) != (config.dec_key, config.dec_mode):
            raise RuntimeError(f"The dec key or dec mode of servable name {name} is different in multiple configurations.")
        for key in _MERGED_ALIKE:
            if _alike(key, getattr(first, key)) != _alike(key, getattr(config, key)):
                raise RuntimeError(
                    f"The {key} of servable name {name} is different in multiple configurations: "
                    f"{getattr(first, key)!r} and {getattr(config, key)!r}"
                )
        versions = list(dict.fromkeys(first.versions() + config.versions()))
        first.version_number = versions[0] if len(versions) == 1 else versions
        devices = [] if first.device_ids is None and config.device_ids is None else (
            list(dict.fromkeys(first.device_list() + config.device_list()))
        )
        first.device_ids = tuple(devices) if devices else None
        first.num_parallel_workers = max(first.num_parallel_workers, config.num_parallel_workers)
    return list(merged.values())
