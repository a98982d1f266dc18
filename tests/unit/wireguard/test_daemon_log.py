"""wiretun-wg's log: wiretun's levels keep their meaning (info -> DEBUG, warning -> WARNING, error ->
ERROR), each shown at the LOG_LEVEL wireguard-go would show it."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pytest

from wiretun import log
from wiretun.wireguard.daemon import Logger, LogLevel, log_level_from_env

LINE = re.compile(r"^(DEBUG|WARNING|ERROR): \(wg7\) \d{4}/\d\d/\d\d \d\d:\d\d:\d\d (.*)$")


@pytest.fixture
def reset() -> Iterator[None]:
    try:
        yield
    finally:
        log.reset_logger()


def lines_at(level: LogLevel) -> list[tuple[str, str]]:
    out = io.StringIO()
    logger = Logger(level, "wg7", out)
    logger.bridge()
    log.info("an info")
    log.warn("a warning")
    log.err("an error")
    got = []
    for line in out.getvalue().splitlines():
        m = LINE.match(line)
        assert m, line
        got.append((m.group(1), m.group(2)))
    return got


def test_verbose_shows_every_level_under_its_own_tag(reset: None) -> None:
    assert lines_at(LogLevel.VERBOSE) == [("DEBUG", "an info"), ("WARNING", "a warning"), ("ERROR", "an error")]


def test_error_level_shows_warnings_as_warnings_and_errors_as_errors(reset: None) -> None:
    assert lines_at(LogLevel.ERROR) == [("WARNING", "a warning"), ("ERROR", "an error")]


def test_silent_shows_nothing(reset: None) -> None:
    assert lines_at(LogLevel.SILENT) == []


@pytest.mark.parametrize(
    ("value", "level"),
    [("verbose", LogLevel.VERBOSE), ("debug", LogLevel.VERBOSE), ("error", LogLevel.ERROR),
     ("silent", LogLevel.SILENT), (None, LogLevel.ERROR), ("loud", LogLevel.ERROR)],
)
def test_log_level_from_env(value: str | None, level: LogLevel) -> None:
    assert log_level_from_env(value) == level
