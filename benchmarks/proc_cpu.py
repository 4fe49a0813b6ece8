"""CPU time of a whole process tree, from /proc: what a server spent, all of it.

A server is often more than one process (mserve's front-ends and device process,
MindSpore Serving's master and worker). Summing ``utime + stime`` over the root and
every live descendant before and after a load run, and dividing by the requests
served, gives the server's CPU per request: steadier than req/s on a shared machine,
where throughput follows whatever else runs. (A descendant that exits during the run
takes its CPU with it; the servers measured here keep theirs.)
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def _processes() -> tuple[dict[int, list[int]], dict[int, float]]:
    """Each live process's children, and its CPU seconds so far."""
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        used[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    return children, used


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (not ``pid`` itself)."""
    children, _ = _processes()
    found, todo = [], list(children.get(pid, ()))
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants."""
    children, used = _processes()
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += used.get(current, 0.0)
        todo.extend(children.get(current, ()))
    return total
