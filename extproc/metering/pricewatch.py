"""Hot reload of the price file, like the policy's: a valid edit swaps in, a broken one never.

The price file is polled (stat, then a digest of its bytes: ConfigMaps swap a symlink, which
file-watch APIs miss) and recompiled with the catalogue on a worker thread when it changed;
an edit with a problem is logged, naming the row and field, and the table in force keeps
pricing. The table is also recompiled when a catalogue price that starts later comes into
force (`PriceTable.valid_until`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from extproc.metering.catalogue import CatalogueError
from extproc.metering.overrides import PriceFileError
from extproc.metering.prices import PriceTable

log = logging.getLogger("extproc.metering.prices")


def bundled_path() -> Path | None:
    """The bundled price file on disk, when the package is installed as plain files."""
    from importlib import resources

    found = resources.files("extproc").joinpath("data", "prices.toml")
    return found if isinstance(found, Path) else None


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class PriceWatcher:
    def __init__(
        self,
        path: str | Path | None,
        table: PriceTable,
        on_change: Callable[[PriceTable], None],
        *,
        interval: float = 1.0,
    ) -> None:
        self.path = Path(path) if path else bundled_path()
        self.explicit = bool(path)
        self.table = table
        self.on_change = on_change
        self.interval = interval
        self._signature = self._stat()
        self._digest = _digest(self.path) if self.path else None

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def poll_once(self) -> bool:
        """True when a new table was compiled and handed to on_change."""
        signature = self._stat()
        stale = not self.table.still_valid()
        if signature == self._signature and not stale:
            return False
        self._signature = signature
        digest = _digest(self.path) if self.path else None
        if digest == self._digest and not stale:
            return False
        if digest is None and self.path is not None:
            log.warning("prices %s: cannot read the file; keeping the prices in force", self.path)
            return False
        self._digest = digest
        path = self.path if self.explicit else None
        try:
            table = await asyncio.to_thread(PriceTable.load, path)
        except (PriceFileError, CatalogueError) as exc:
            log.error("price file reload rejected; keeping %s:\n%s", self.table.version, exc)
            return False
        self.table = table
        self.on_change(table)
        log.info("prices reloaded: %s", table.version)
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:
                log.exception("price watcher: unexpected error; keeping the prices in force")
            await asyncio.sleep(self.interval)
