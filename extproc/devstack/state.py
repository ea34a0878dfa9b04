"""Where running local stacks are recorded, so the CLI finds one from any directory.

`make run` writes one small JSON file per stack, named by its port, in a per-user
directory (`$XDG_STATE_HOME/extproc/stacks`, else `~/.local/state/extproc/stacks`), and
removes it on the way out. A file whose process is gone (the stack was killed) is
ignored and cleaned up, so the CLI never talks to a Redis that no longer exists.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

START_HINT = "start one with `make run` in the extproc checkout"
URL_HINT = "or pass --redis-url (or set EXTPROC_REDIS_URL) for another Redis"


class NoStackError(LookupError):
    """No (or no unambiguous) running stack; the message is one line that says what to do."""


@dataclass(frozen=True, slots=True)
class StackState:
    port: int
    pid: int
    base_url: str
    redis_url: str
    policy: str
    data_dir: str


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "extproc" / "stacks"


def _file(port: int) -> Path:
    return state_dir() / f"{port}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds that pid now
        return False
    return True


def write(state: StackState) -> Path:
    path = _file(state.port)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)
    return path


def remove(port: int, pid: int) -> None:
    """Remove the record of our own stack only (never one another process wrote since)."""
    current = read(port)
    if current is not None and current.pid == pid:
        _file(port).unlink(missing_ok=True)


def read(port: int) -> StackState | None:
    try:
        raw = json.loads(_file(port).read_text())
        return StackState(**{k: raw[k] for k in StackState.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running() -> list[StackState]:
    """Every recorded stack whose process is still alive, by port; stale records removed."""
    found: list[StackState] = []
    try:
        paths = sorted(state_dir().glob("*.json"))
    except OSError:
        return []
    for path in paths:
        if not path.stem.isdigit():
            continue
        state = read(int(path.stem))
        if state is None:
            continue
        if _alive(state.pid):
            found.append(state)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return sorted(found, key=lambda s: s.port)


def find(port: int | None = None) -> StackState:
    """The stack on `port`, else the only running one; NoStackError says what to do."""
    stacks = running()
    if port is not None:
        for state in stacks:
            if state.port == port:
                return state
        others = f" (running: {', '.join(str(s.port) for s in stacks)})" if stacks else ""
        raise NoStackError(
            f"no extproc stack is running on port {port}{others}; "
            f"start it with `EXTPROC_PORT={port} make run`, {URL_HINT}"
        )
    if not stacks:
        raise NoStackError(f"no running extproc stack found; {START_HINT}, {URL_HINT}")
    if len(stacks) > 1:
        ports = ", ".join(str(s.port) for s in stacks)
        raise NoStackError(f"several extproc stacks are running (ports {ports}): pass --stack PORT")
    return stacks[0]
