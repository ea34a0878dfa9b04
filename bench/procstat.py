"""CPU time and resident memory of a process and its descendants, from /proc.

The sidecar may be a supervisor with worker processes, so its cost is the whole tree's.
Only the measured processes count: the load generator shares the cores but not the bill.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant (via /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes, every thread, in nanoseconds' resolution.

    /proc/PID/stat counts in clock ticks (10 ms), too coarse for a few hundred requests
    at ~100 µs each; each thread's schedstat holds its time on CPU in ns. A thread or
    process that exited between two readings counts 0.
    """
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except OSError:
            continue
    return total


def own_cpu_seconds() -> float:
    """This process's CPU time (every thread): the load generator's share of the bill."""
    return time.process_time()
