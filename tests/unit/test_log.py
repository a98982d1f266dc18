"""The logger callback (WintunSetLogger): levels, Wintun timestamps, disabling, logging fallback."""

import logging
import threading
import time

import pytest

import wiretun
from wiretun import log
from wiretun.errors import InvalidParameter
from wiretun.log import LogLevel, filetime_now, filetime_to_unix

# 1601-01-01 .. 1970-01-01 in 100 ns units, written out independently of log.py.
_UNIX_EPOCH_AS_FILETIME = 11_644_473_600 * 10_000_000


@pytest.fixture
def records():
    got: list[tuple[LogLevel, int, str]] = []
    lock = threading.Lock()

    def callback(level, timestamp, message):
        with lock:
            got.append((level, timestamp, message))

    wiretun.set_logger(callback)
    try:
        yield got
    finally:
        log.reset_logger()


def test_levels_text_and_timestamps(records):
    before = time.time()
    log.info("hello")
    log.warn("careful")
    log.err("broken")
    after = time.time()
    assert [(r[0], r[2]) for r in records] == [
        (LogLevel.INFO, "hello"),
        (LogLevel.WARN, "careful"),
        (LogLevel.ERR, "broken"),
    ]
    assert [int(r[0]) for r in records] == [0, 1, 2]  # WINTUN_LOG_INFO, _WARN, _ERR
    for _, stamp, _ in records:
        assert isinstance(stamp, int)
        unix = (stamp - _UNIX_EPOCH_AS_FILETIME) / 1e7
        assert before - 1 <= unix <= after + 1
        assert abs(filetime_to_unix(stamp) - unix) < 1e-6
    stamps = [r[1] for r in records]
    assert stamps == sorted(stamps)


def test_filetime_now_is_wintun_epoch():
    assert abs(filetime_to_unix(filetime_now()) - time.time()) < 2
    # 2020-01-01T00:00:00Z as a FILETIME (a published constant: 132223104000000000).
    assert filetime_to_unix(132_223_104_000_000_000) == 1_577_836_800.0


def test_none_disables(records):
    wiretun.set_logger(None)
    log.info("dropped")
    assert records == []


def test_non_callable_is_rejected():
    with pytest.raises(InvalidParameter, match="callable"):
        wiretun.set_logger("not a function")  # type: ignore[arg-type]


def test_raising_callback_does_not_propagate(caplog):
    def bad(level, timestamp, message):
        raise RuntimeError("logger bug")

    wiretun.set_logger(bad)
    try:
        with caplog.at_level(logging.ERROR, logger="wiretun"):
            log.info("still fine")
        assert any("logger callback raised" in r.getMessage() for r in caplog.records)
    finally:
        log.reset_logger()


def test_default_goes_to_logging(caplog):
    log.reset_logger()
    with caplog.at_level(logging.INFO, logger="wiretun"):
        log.info("to logging")
        log.warn("a warning")
        log.err("an error")
    got = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "wiretun"]
    assert got == [(logging.INFO, "to logging"), (logging.WARNING, "a warning"), (logging.ERROR, "an error")]


def test_callback_from_many_threads(records):
    def worker(n):
        for i in range(50):
            log.info(f"t{n}-{i}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(r[2] for r in records) == sorted(f"t{n}-{i}" for n in range(4) for i in range(50))
