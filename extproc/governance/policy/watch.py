"""Hot reload: the policy file is watched and a valid new version swapped in.

An invalid edit never replaces a working policy: the error is logged and the old policy
keeps serving until the file is fixed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from extproc.governance.policy.load import parse_policy_text
from extproc.governance.policy.model import Policy, PolicyError

log = logging.getLogger("extproc.governance.policy")


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyWatcher:
    """Re-reads the policy when the file changes; a broken edit never replaces a good policy.

    Polling (not inotify) because Kubernetes ConfigMaps are updated by swapping a symlink,
    which stat() through the link sees and most file-watch APIs miss.
    """

    def __init__(
        self,
        path: str | Path,
        on_change: Callable[[Policy], None],
        *,
        policy: Policy | None = None,
        interval: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self.policy = policy
        self.interval = interval
        # The file as it is now is the one the caller has loaded: only later changes count.
        self._signature = _signature(self.path)
        self._digest: str | None = None
        try:
            self._digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            self._signature = None

    async def poll_once(self) -> bool:
        """Check the file once; True when a new policy was loaded and handed to on_change."""
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        if signature is None:
            log.warning("policy %s: cannot stat the file; keeping the current policy", self.path)
            return False
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            log.error("policy %s: cannot read (%s); keeping the current policy", self.path, exc)
            return False
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            policy = await asyncio.to_thread(
                parse_policy_text,
                data.decode("utf-8", errors="replace"),
                str(self.path),
                self.path.resolve().parent,
            )
        except PolicyError as exc:
            log.error("policy reload rejected; keeping the current policy:\n%s", exc)
            return False
        self.policy = policy
        for warning in policy.warnings:
            log.warning("%s", warning)
        self.on_change(policy)
        log.info("policy reloaded from %s (%d workspaces)", self.path, len(policy.workspaces))
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:
                log.exception("policy watcher: unexpected error; keeping the current policy")
            await asyncio.sleep(self.interval)
