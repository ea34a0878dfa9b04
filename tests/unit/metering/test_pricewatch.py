"""Hot reload of the price file: a valid edit is compiled and swapped in, a broken one never."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from extproc.metering.prices import PriceTable
from extproc.metering.pricewatch import PriceWatcher
from extproc.wire.usage import Usage

ROW = """
version = "{version}"
updated = 2026-12-07

[models."gpt-x"]
input = "{input}"
output = "4.00"
source = "https://example.com/gpt-x"
as_of = 2026-12-07
"""


def _write(path: Path, text: str, tick: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(tick * 10**9, tick * 10**9))  # a new signature whatever the clock


def test_a_valid_edit_swaps_in_and_a_broken_one_keeps_the_prices_in_force(
    tmp_path: Path, caplog: object
) -> None:
    path = tmp_path / "prices.toml"
    _write(path, ROW.format(version="v1", input="1.00"), 1)
    table = PriceTable.load(path)
    swapped: list[PriceTable] = []
    watcher = PriceWatcher(path, table, swapped.append)

    async def run() -> None:
        assert not await watcher.poll_once()  # unchanged
        _write(path, ROW.format(version="v2", input="2.00"), 2)
        assert await watcher.poll_once()
        _write(path, ROW.format(version="v3", input="two"), 3)
        assert not await watcher.poll_once()

    asyncio.run(run())
    assert [t.override_version for t in swapped] == ["v2"]
    assert swapped[0].charge("gpt-x", Usage(1000, 0, 0)).nanos == 2_000_000
    assert watcher.table is swapped[0]
    assert 'models."gpt-x".input: must be a decimal string' in caplog.text  # type: ignore[attr-defined]
