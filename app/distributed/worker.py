"""The JAX process of one host in a distributed servable.

Started by the host's agent (`mserve.distributed.agent`) as ``python -m
mserve.distributed.worker`` with its orders as one JSON line on stdin: which servable,
version and model to load, its process index in the group, and the JAX coordinator's
address. It checks that its model files are the main host's (sha256), joins the group
(``jax.distributed.initialize``; gloo for collectives between CPUs, NCCL between
GPUs), builds its shards of the weights (`shards.GlobalProgram`) and tells the main
host it is ready. Then it runs every batch the main host sends, in order, like every
other process of the group; process 0 sends the outputs back.

It never outlives its agent, and exits when the main host's connection closes: a
process stuck in a collective whose peer died is killed by its agent, so restarts
never depend on JAX noticing anything.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .links import ChannelClosed, Link, connect

AGENT_PID_VARIABLE = "MSERVE_AGENT_PID"  # set by the agent that starts this process


def check_same_files(folder: Path, digests: dict[str, str], index: int, here: dict[str, str]) -> None:
    """Refuse to join with model files other than the main host's. ``here``: files
    this host's agent was given (by file name), used instead of the servable's."""
    from .shards import file_digest

    for relative, wanted in digests.items():
        path = Path(here.get(Path(relative).name) or folder / relative)
        if not path.is_file():
            raise ValueError(f"host {index}: {path} does not exist (the main host serves it: copy the servable here)")
        found = file_digest(path)
        if found != wanted:
            raise ValueError(
                f"host {index}: {path} differs from the main host's copy (sha256 {found[:12]}... here, "
                f"{wanted[:12]}... there): every host must serve the same model files"
            )


def model_definition(orders: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The model's jax_function options and weights file on this host."""
    index = orders["index"]
    root = Path(orders["servable_directory"])
    name = orders["servable"]
    folder = root / name / str(orders["version"])
    here = orders.get("model_paths") or {}
    if orders["model_format"] == "jax_distributed":  # a model file (distributed.declare_servable)
        from .model_module import load_model_module

        module = orders["model_files"][0]
        return load_model_module(Path(here.get(module) or folder / module))
    from ..serving.servable import load_definition

    definition = load_definition(root, name)
    matching = [m for m in definition.models if list(m.model_files) == orders["model_files"]]
    if not matching:
        raise ValueError(f"host {index}: servable '{name}' here declares no model with files {orders['model_files']}")
    return matching[0].options, folder / matching[0].model_files[0]


def load_program(orders: dict[str, Any]) -> Any:
    from .shards import GlobalProgram

    index = orders["index"]
    folder = Path(orders["servable_directory"]) / orders["servable"]
    check_same_files(folder, orders["digests"], index, orders.get("model_paths") or {})
    options, weights = model_definition(orders)

    import jax

    # gloo carries the collectives between CPU devices of different processes
    # (GPUs use NCCL whatever this says).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            orders["coordinator"], num_processes=orders["hosts"], process_id=index,
            initialization_timeout=int(orders["init_timeout"]),
        )
    except Exception as exc:
        raise ValueError(
            f"host {index}: could not join the JAX group through the coordinator {orders['coordinator']} "
            f"(host 0's agent; is it reachable from here?): {exc}"
        ) from None
    wanted = orders.get("devices") or 0
    if wanted and len(jax.devices()) != wanted:
        raise ValueError(
            f"the group has {len(jax.devices())} devices ({len(jax.local_devices())} on host {index}), but the servable "
            f"declares rank_size={wanted}: give the hosts {wanted} devices in all"
        )
    return GlobalProgram(options, weights)


def serve(link: Link, program: Any, index: int) -> None:
    while True:
        message = link.recv()
        kind = message[0]
        if kind == "run":
            _, seq, arrays = message
            try:
                outputs = program.run(arrays)
            except Exception as exc:  # the same batch fails alike everywhere: report, keep serving
                link.send(("error", seq, f"host {index}: {type(exc).__name__}: {exc}"))
                continue
            link.send(("done", seq, outputs if index == 0 else None))
        elif kind == "report":
            link.send(("report", message[1], program.shard_report()))
        elif kind == "close":
            return


def die_with_agent() -> None:
    """Be killed by the kernel the moment the agent that started this process is gone
    (``PR_SET_PDEATHSIG``; the agent starts it from the thread that runs the agent for
    its whole life). A polling thread (`mserve.devices.process.die_with_parent`) is not
    enough here: a JAX process waiting on the coordination service or a collective can
    hold the interpreter lock, so the thread never runs, and an orphan left over from a
    killed agent then troubles the next generation of the group (JAX sees a task
    "connect with a different incarnation" and aborts them all). The agent names
    itself in ``MSERVE_AGENT_PID``: one killed while this process was starting up
    is already gone here, and then this process's parent is another one."""
    parent = int(os.environ.get(AGENT_PID_VARIABLE) or os.getppid())
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError):  # not Linux
        from ..devices.process import die_with_parent

        die_with_parent()
    if os.getppid() != parent:  # the agent was gone before the line above took effect
        os._exit(1)


def main() -> int:
    die_with_agent()
    orders = json.loads(sys.stdin.readline())
    index = orders["index"]
    link = connect(orders["main"])
    link.send(("worker", {"index": index, "generation": orders["generation"], "pid": os.getpid()}))
    started = time.monotonic()
    try:
        program = load_program(orders)
    except Exception as exc:
        link.send(("failed", str(exc) if str(exc).startswith("host ") else f"host {index}: {type(exc).__name__}: {exc}"))
        return 1
    report = program.shard_report()
    report["load_seconds"] = round(time.monotonic() - started, 3)
    # One line for whoever reads the agent's output: what this host holds.
    print(f"mserve host {index}: loaded in {report['load_seconds']:.1f} s, holding {report['bytes']} bytes of "
          f"weights on {', '.join(report['devices'])}; SHARDS {json.dumps(report['weights'])}", file=sys.stderr,
          flush=True)
    link.send(("ready", report))
    try:
        serve(link, program, index)
    except ChannelClosed:
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not a normal exit: JAX's distributed shutdown waits for every peer at a
    # barrier, and a peer may be gone. The agent owns the lifecycle.
    os._exit(code)
