"""JAX's persistent compilation cache, so a restart does not recompile every bucket.

The cache lives in ``$MSERVE_CACHE_DIR`` or ``~/.cache/mserve/jax`` (per user);
``MSERVE_COMPILE_CACHE=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("mserve.serving.compile_cache")
_enabled: Path | None = None


def cache_dir() -> Path:
    base = os.environ.get("MSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mserve"
    )
    return Path(base) / "jax"


def enable_compile_cache() -> Path | None:
    """Point JAX at the persistent cache (once per process); returns the folder."""
    global _enabled
    if _enabled is not None or os.environ.get("MSERVE_COMPILE_CACHE", "1") == "0":
        return _enabled
    import jax

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("compilation cache disabled: cannot create %s: %s", folder, exc)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache every compilation: serving models are small and recompiled at each start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = folder
    return folder
