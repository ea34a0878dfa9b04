"""Repeated log lines are folded: the first at once, then one per window with a count."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from extproc.dataplane.logrepeat import RepeatFilter, install


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO, Clock]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    clock = Clock()
    handler.addFilter(RepeatFilter(window=10.0, clock=clock))
    logger = logging.getLogger("extproc.test.logrepeat")
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, out, clock
    logger.removeHandler(handler)
    logger.propagate = True


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_an_outage_burst_is_one_line_then_one_per_window(
    logged: tuple[logging.Logger, io.StringIO, Clock],
) -> None:
    log, out, clock = logged
    for i in range(1874):  # what 3 s of refused requests logged during a Redis outage
        clock.now = 100.0 + i * 3 / 1874
        log.warning("budget: redis unavailable for %s (%s)", "dev", "Connection refused")
    assert lines(out) == ["WARNING budget: redis unavailable for dev (Connection refused)"]
    clock.now = 110.5
    log.warning("budget: redis unavailable for %s (%s)", "dev", "Connection refused")
    assert lines(out)[1] == (
        "WARNING budget: redis unavailable for dev (Connection refused) "
        "[1873 more like this in the last 10 s]"
    )


def test_distinct_events_are_never_merged(
    logged: tuple[logging.Logger, io.StringIO, Clock],
) -> None:
    log, out, _clock = logged
    log.warning("hard limit reached: %s", "workspace dev")
    log.warning("hard limit reached: %s", "workspace ci")
    log.error("hard limit reached: %s", "workspace dev")  # another level is another line
    log.warning("hard limit reached: %s", "workspace dev")
    assert lines(out) == [
        "WARNING hard limit reached: workspace dev",
        "WARNING hard limit reached: workspace ci",
        "ERROR hard limit reached: workspace dev",
    ]


def test_tracebacks_repeat_once_and_unique_lines_do_not_pile_up(
    logged: tuple[logging.Logger, io.StringIO, Clock],
) -> None:
    log, out, clock = logged
    for _ in range(50):
        try:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379")
        except ConnectionError:
            log.exception("key lookup failed")
    assert out.getvalue().count("Traceback") == 1
    repeat = next(f for f in log.handlers[0].filters if isinstance(f, RepeatFilter))
    for i in range(10_000):  # lines that never repeat, e.g. with a request id in them
        clock.now += 0.01
        log.info("request %d", i)
    assert len(repeat._seen) <= 4096


def test_install_puts_one_filter_on_each_handler() -> None:
    logger = logging.getLogger("extproc.test.logrepeat.install")
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    try:
        install(logger)
        install(logger)
        assert sum(isinstance(f, RepeatFilter) for f in handler.filters) == 1
    finally:
        logger.removeHandler(handler)
