"""Process lifetime as MindSpore Serving's: a started server outlives the script.

MindSpore Serving's start scripts call ``start_servables``, ``start_grpc_server`` and
``start_restful_server`` and then simply end; the process keeps serving until
SIGINT or SIGTERM, then stops gracefully and exits 0. mserve's server threads are
daemons, so every ``start_*_server`` calls `keep_serving`, which starts one
non-daemon waiter thread (whatever the number of servers): the interpreter cannot
exit while it waits. It ends when

* the script calls ``server.stop()`` (`release`), or
* SIGINT or SIGTERM arrives: the handler installed here wakes the waiter, which
  runs ``server.stop()`` (drain and unload) and ends, so the process exits 0, or
* the script returns and nothing is served (no servable was started, `serve_while`):
  as in MindSpore Serving the process then stops its servers and ends.

The handlers are installed only from the main thread and only over Python's
defaults, so a program with its own handlers (``mserve start``) keeps them. A
SIGINT ignored from the start counts as the default: shells start background jobs
that way, and MindSpore Serving stops on SIGINT there as well. While
the script itself is still running, a signal also does what it would have done
without mserve (SIGINT raises KeyboardInterrupt, SIGTERM exits with status 0
after the graceful stop); once the script has returned, it only stops the server.
A second signal during the stop acts as Python's default (exits at once).

The wait happens before the interpreter winds down its thread pools: once the main
thread ends, Python runs the exit hooks of ``concurrent.futures`` (which refuse new
work to every ThreadPoolExecutor, grpcio's server pool included) before it joins
non-daemon threads. A plain non-daemon waiter would keep the process alive with a
gRPC server that can no longer run a call, so the waiter is also joined from a
threading exit hook registered after those (such hooks run newest first).
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - its exit hook must be registered before ours
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from .ops.child_stderr import StderrRelay

log = logging.getLogger("mserve.lifetime")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_lock = threading.Lock()
_waiter: threading.Thread | None = None
_wake = threading.Event()
_signalled: list[int] = []  # the signal that woke the waiter, if one did
_stop_now: list[bool] = []  # the script ended with nothing to serve: stop without a signal
_previous: dict[int, Any] = {}  # handlers replaced by ours, restored on release
_sigint_ignored_on_purpose = False  # set by `ignore_sigint`: an ignored SIGINT is not the shell's
_exit_hooked = False
_script_returned = False  # the main thread is in the interpreter's exit, waiting here
_serves: Callable[[], bool] = lambda: True  # whether there is anything to keep serving (see `serve_while`)


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
                _hook_interpreter_exit()
                return
            if not _wake.is_set():
                return  # the waiter keeps the process alive for this server too
        # A server was stopped just now and its waiter is on its way out: let it end
        # (outside the lock: a stop after a signal releases through it), then start anew.
        waiter.join()


def serve_while(serves: Callable[[], bool]) -> None:
    """What keeps the process alive once the script returns: MindSpore Serving keeps
    serving only when servables were started; a script that started a server and
    nothing to serve ends (after a graceful `stop`)."""
    global _serves
    _serves = serves


def release() -> None:
    """The servers were stopped (``server.stop()``): let the process end."""
    with _lock:
        _restore_handlers()
        _wake.set()


def _wait(stop: Callable[[], None]) -> None:
    _wake.wait()
    if _stop_now:
        _stop_now.clear()
        try:
            stop()
        except Exception:
            log.exception("stopping at exit failed")
        return
    if _signalled:
        name = signal.Signals(_signalled[0]).name
        log.info("%s received: stopping gracefully", name)
        try:
            stop()
        except Exception:
            log.exception("stopping after %s failed", name)


def _hook_interpreter_exit() -> None:
    """Wait for the waiter before the interpreter shuts thread pools down (see the
    module docstring); ``threading._register_atexit`` is how concurrent.futures
    itself hooks in there."""
    global _exit_hooked
    if not _exit_hooked:
        threading._register_atexit(_join_waiter)  # type: ignore[attr-defined]
        _exit_hooked = True


def _join_waiter() -> None:
    global _script_returned
    _script_returned = True
    waiter = _waiter
    if waiter is not None and waiter.is_alive() and not _wake.is_set() and not _serves():
        _signalled.clear()
        _wake.set()  # nothing to serve: the waiter ends without a signal ...
        _stop_now.append(True)  # ... and stops the servers on its way out
    while True:
        waiter = _waiter
        if waiter is None or not waiter.is_alive():
            return
        waiter.join()


def ignore_sigint() -> None:
    """Ignore SIGINT on purpose for the rest of this process (a front-end: Ctrl+C
    reaches the whole process group, and its pool stops it), so that `keep_serving`
    leaves it ignored instead of taking it as inherited from a shell."""
    global _sigint_ignored_on_purpose
    _sigint_ignored_on_purpose = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    for sig in _SIGNALS:
        if sig in _previous:
            continue
        current = signal.getsignal(sig)
        if sig == signal.SIGINT and current is signal.SIG_IGN:
            if _sigint_ignored_on_purpose:
                continue
            # Inherited, not chosen: a shell starts background jobs (`python serve.py &`)
            # with SIGINT ignored. MindSpore Serving stops on SIGINT there too, so it is
            # taken as Python's default (and left as that default after the stop).
            current = signal.default_int_handler
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
    if threading.main_thread().is_alive() and not _script_returned:
        # The script is still running (not yet returned from its main): let the
        # signal end it as it would have without mserve; the waiter stops the
        # servers meanwhile, and the interpreter waits for it before exiting.
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(0)


@contextmanager
def children_born_blocking(signals: set[signal.Signals]) -> Iterator[None]:
    """Processes started inside this block begin life with ``signals`` blocked (a
    signal mask survives fork and exec). A device or front-end process waits for its
    stop signals with ``sigwait`` in its main thread; blocking them there, once its
    code runs, is too late: importing numpy has already started OpenBLAS's threads
    with them unblocked, and a signal that comes while the main thread is busy goes
    to such a thread, whose default action kills the process on the spot (requests
    in flight lost). Born blocked, every thread it starts keeps them blocked."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_child(
    args: Sequence[str], name: str, blocked: set[signal.Signals], relays: list[StderrRelay], **popen: Any
) -> subprocess.Popen:
    """Start one of the server's own processes (a front-end, a device process): born
    with ``blocked`` (the stop signals it waits for, see `children_born_blocking`), its
    stderr copied out whole lines at a time by a relay added to ``relays`` (see
    `mserve.ops.child_stderr`). ``popen``: the rest of ``subprocess.Popen``'s arguments."""
    relay = StderrRelay(name)
    try:
        with children_born_blocking(blocked):
            proc = subprocess.Popen(list(args), stderr=relay.child_end, **popen)
    except BaseException:
        relay.abandon()
        raise
    relay.started()
    relays.append(relay)
    return proc


def stop_processes(
    procs: Sequence[subprocess.Popen],
    drain_timeout: float,
    ask: Callable[[subprocess.Popen], None] | None = None,
    grace: float = 1.0,
) -> None:
    """Ask every live process to stop (``ask``; by default SIGTERM), each draining
    its work within ``drain_timeout``; wait for all of them up to ``drain_timeout``
    plus ``grace`` seconds, and kill whichever outlives that."""
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        if ask is None:
            proc.send_signal(signal.SIGTERM)
        else:
            ask(proc)
    deadline = time.monotonic() + drain_timeout + grace
    for proc in live:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("process %d still running %gs after its drain timeout: killed", proc.pid, grace)
            proc.kill()
            proc.wait()


def exit_at_once(code: int) -> None:
    """End a device or front-end process whose servers are stopped, without the
    interpreter's teardown (finalizing JAX's runtime and every module takes a second
    or more under load, counted against the whole server's drain timeout)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def stop_concurrently(stoppers: Sequence[Callable[[float], None]], drain_timeout: float) -> None:
    """Call every ``stop(drain_timeout)`` at once, in threads, and wait for all: the
    servers of one process (REST, gRPC, their front-end pools) drain side by side,
    so the whole stop takes one drain timeout, not one per server."""
    threads = [
        threading.Thread(target=_stop_logged, args=(stop, drain_timeout), name="mserve-stop", daemon=True)
        for stop in stoppers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _stop_logged(stop: Callable[[float], None], drain_timeout: float) -> None:
    try:
        stop(drain_timeout)
    except Exception:  # noqa: BLE001 - one server failing to stop must not keep the others up
        log.exception("stopping a server failed")
