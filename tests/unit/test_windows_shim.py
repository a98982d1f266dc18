"""The platform shim's Linux branch (the one the stand-in uses): events as eventfds with Windows' meaning.

An event HANDLE here is an eventfd: ``signal`` sets it, ``wait`` takes it (auto-reset), ``create_event``
makes one that stays set (nobody takes it but a reader), ``duplicate`` is a second handle to the same
event, outliving the first.
"""

from __future__ import annotations

import select
import sys
import threading
import time

import pytest

from wiretun.windows import _platform

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the Linux branch of the shim")


def test_wait_is_auto_reset_and_times_out():
    event = _platform.create_event()
    try:
        assert _platform.wait(event, 0) is False
        t0 = time.monotonic()
        assert _platform.wait(event, 100) is False
        assert 0.08 < time.monotonic() - t0 < 10.0  # never early; the upper bound only catches a hang
        _platform.signal(event)
        _platform.signal(event)
        assert _platform.wait(event, 0) is True  # both sets are taken by one wait: an event, not a count
        assert _platform.wait(event, 0) is False
    finally:
        _platform.close(event)


def test_a_set_event_stays_readable_for_select_until_waited_on():
    event = _platform.create_event()
    try:
        _platform.signal(event)
        for _ in range(3):
            assert select.select([event], [], [], 0)[0] == [event]
        assert _platform.wait(event, 0) is True
        assert select.select([event], [], [], 0)[0] == []
    finally:
        _platform.close(event)


def test_duplicate_outlives_the_original_and_wakes_a_waiter():
    event = _platform.create_event()
    dup = _platform.duplicate(event)
    assert dup != event
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(_platform.wait(dup, 3000)))
    t.start()
    time.sleep(0.05)
    _platform.signal(event)
    _platform.close(event)  # the DLL closing its own handle: the duplicate still works
    t.join(5)
    assert woke == [True]
    _platform.signal(dup)
    assert _platform.wait(dup, 0) is True
    _platform.close(dup)


def test_infinite_wait_constant_is_windows_infinite():
    assert _platform.WAIT_INFINITE == 0xFFFFFFFF
    event = _platform.create_event()
    try:
        threading.Timer(0.05, _platform.signal, (event,)).start()
        assert _platform.wait(event, _platform.WAIT_INFINITE) is True
    finally:
        _platform.close(event)
