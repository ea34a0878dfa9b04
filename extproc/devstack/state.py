"""Where running local stacks are recorded, so the CLI finds one from any directory.

`make run` writes one small JSON file per stack, named by its port, in a per-user
directory (`$XDG_STATE_HOME/extproc/stacks`, else `~/.local/state/extproc/stacks`), and
removes it on the way out. A file whose process is gone (the stack was killed) is
ignored and cleaned up, so the CLI never talks to a Redis that no longer exists.

Several checkouts (git worktrees) may each run a stack. Without a port, the CLI takes
the stack started from the directory it runs in (or one above it), else the one started
from the checkout the CLI itself is installed from, else the only one running; the CLI
names the stack it used on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

SOURCE_CHECKOUT = Path(__file__).resolve().parents[2]
"""The checkout this CLI runs from (an editable install)."""

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
    # Where the sidecar sends provider traffic (no /v1); "" in records of older versions.
    upstream_url: str = ""
    # The upstream is the local simulator: upstream keys are simulated, and so is the
    # provider's admin API (`extproc reconcile`).
    simulated: bool = False

    @property
    def checkout(self) -> Path:
        """The directory `make run` was started in: the data is in <checkout>/.data/<port>."""
        return Path(self.data_dir).parent.parent

    def describe(self) -> str:
        return f"the stack on port {self.port} (started in {self.checkout})"


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
        wanted = [f.name for f in fields(StackState) if f.name in raw or f.default is MISSING]
        return StackState(**{name: raw[name] for name in wanted})
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


def _preferred(stacks: list[StackState], here: Path) -> list[StackState]:
    """The stacks started from `here` or a directory above it, else from this CLI's own
    checkout, else all of them."""
    for wanted in ({here, *here.parents}, {SOURCE_CHECKOUT}):
        mine = [s for s in stacks if s.checkout.resolve() in wanted]
        if mine:
            return mine
    return stacks


def find(port: int | None = None, here: Path | None = None) -> StackState:
    """The stack on `port`, else the one this checkout started (see the module's notes),
    else the only running one; NoStackError says what to do."""
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
    stacks = _preferred(stacks, (here or Path.cwd()).resolve())
    if len(stacks) > 1:
        ports = ", ".join(str(s.port) for s in stacks)
        raise NoStackError(f"several extproc stacks are running (ports {ports}): pass --stack PORT")
    return stacks[0]
