"""Process lifetime as MindSpore Serving's: a started server outlives the script.

MindSpore Serving's start scripts call ``start_servables``, ``start_grpc_server`` and
``start_restful_server`` and then simply end; the process keeps serving until
SIGINT or SIGTERM, then stops gracefully and exits 0. mserve's server threads are
daemons, so every ``start_*_server`` calls `keep_serving`, which starts one
non-daemon waiter thread (whatever the number of servers): the interpreter cannot
exit while it waits. It ends when

* the script calls ``server.stop()`` (`release`), or
* SIGINT or SIGTERM arrives: the handler installed here wakes the waiter, which
  runs ``server.stop()`` (drain and unload) and ends, so the process exits 0.

The handlers are installed only from the main thread and only over Python's
defaults, so a program with its own handlers (``mserve start``) keeps them. While
the script itself is still running, a signal also does what it would have done
without mserve (SIGINT raises KeyboardInterrupt, SIGTERM exits with status 0
after the graceful stop); once the script has returned, it only stops the server.
A second signal during the stop acts as Python's default (exits at once).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

log = logging.getLogger("mserve.lifetime")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_lock = threading.Lock()
_waiter: threading.Thread | None = None
_wake = threading.Event()
_signalled: list[int] = []  # the signal that woke the waiter, if one did
_previous: dict[int, Any] = {}  # handlers replaced by ours, restored on release


def keep_serving(stop: Callable[[], None]) -> None:
    """Keep the process alive until `release` or a stop signal (which then calls
    ``stop``). Called by every ``start_*_server``; one waiter serves them all."""
    global _waiter
    while True:
        with _lock:
            waiter = _waiter
            if waiter is None or not waiter.is_alive():
                _wake.clear()
                _signalled.clear()
                _waiter = threading.Thread(target=_wait, args=(stop,), name="mserve-keep-serving", daemon=False)
                _waiter.start()
                _install_handlers()
                return
            if not _wake.is_set():
                return  # the waiter keeps the process alive for this server too
        # A server was stopped just now and its waiter is on its way out: let it end
        # (outside the lock: a stop after a signal releases through it), then start anew.
        waiter.join()


def release() -> None:
    """The servers were stopped (``server.stop()``): let the process end."""
    with _lock:
        _restore_handlers()
        _wake.set()


def serving() -> bool:
    """Whether a waiter keeps the process alive."""
    waiter = _waiter
    return waiter is not None and waiter.is_alive()


def _wait(stop: Callable[[], None]) -> None:
    _wake.wait()
    if _signalled:
        name = signal.Signals(_signalled[0]).name
        log.info("%s received: stopping gracefully", name)
        try:
            stop()
        except Exception:
            log.exception("stopping after %s failed", name)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    for sig in _SIGNALS:
        if sig in _previous:
            continue
        current = signal.getsignal(sig)
        if current is defaults[sig]:
            _previous[sig] = current
            signal.signal(sig, _on_signal)


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # _on_signal restores them itself on the way out
    for sig, handler in list(_previous.items()):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, handler)
        del _previous[sig]


def _on_signal(signum: int, frame: Any) -> None:
    # Runs in the main thread: wake the waiter (it stops the servers), and hand the
    # signals back to Python's defaults, so that a second one ends the process.
    _signalled.append(signum)
    _wake.set()
    for sig, handler in list(_previous.items()):
        signal.signal(sig, handler)
        del _previous[sig]
    if threading.main_thread().is_alive():
        # The script is still running (not yet returned from its main): let the
        # signal end it as it would have without mserve; the waiter stops the
        # servers meanwhile, and the interpreter waits for it before exiting.
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(0)
