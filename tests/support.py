"""Test helpers: write servable directories, export tiny JAX artifacts, run a server.

Servers here are the real thing: servables loaded through the backends, Waitress on
a free port of 127.0.0.1, requests sent over a socket.
"""

from __future__ import annotations

import contextlib
import socket
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import export

from mserve import server

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "servables"
ADD_BODY = {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]}


def free_port() -> int:
    """A port that was free a moment ago, for servers started as subprocesses."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_to(path: Path, fn: Callable[..., Any], *specs: jax.ShapeDtypeStruct) -> Path:
    """Write ``jax.export`` bytes of ``fn`` for ``specs`` to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(export.export(jax.jit(fn))(*specs).serialize())
    return path


def spec(shape: str | Sequence[int], dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    """``spec("b, 4")`` (symbolic) or ``spec((2, 2))``."""
    dims = export.symbolic_shape(shape) if isinstance(shape, str) else tuple(shape)
    return jax.ShapeDtypeStruct(dims, dtype)


def write_servable(root: Path, name: str, config: str, files: dict[str, bytes | Path] | None = None) -> Path:
    """Create ``root/name/servable_config.py`` (dedented) and version files, given as
    ``{"1/model.jaxexport": bytes_or_source_path}``."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "servable_config.py").write_text(textwrap.dedent(config))
    for rel, content in (files or {}).items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    return folder


@contextlib.contextmanager
def serving(
    configs: server.ServableStartConfig | Sequence[server.ServableStartConfig], **restful: Any
) -> Iterator[str]:
    """Start the servables and a RESTful server on a free port; yield its base URL."""
    try:
        server.start_servables(configs)
        started = server.start_restful_server(restful.pop("address", "127.0.0.1:0"), **restful)
        yield started.url
    finally:
        server.stop()
