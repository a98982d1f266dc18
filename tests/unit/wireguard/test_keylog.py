"""The Wireshark key log file: format, mode, refusals, and a failing write that only logs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from wiretun import log
from wiretun.wireguard.keylog import KeyLog


def capture_log() -> list[str]:
    lines: list[str] = []
    log.set_logger(lambda level, stamp, message: lines.append(message))
    return lines


def test_appends_wiresharks_format_to_a_0600_file(tmp_path: Path) -> None:
    lines = capture_log()
    try:
        path = tmp_path / "keys"
        k = KeyLog(path, "wg0")
        assert k.active
        k.write(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, bytes(32))
        k.close()
        k = KeyLog(path)  # appends, never truncates
        k.write(b"\x04" * 32, b"\x05" * 32, b"\x06" * 32, b"\xff" * 32)
        k.close()
    finally:
        log.reset_logger()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().splitlines() == [
        "LOCAL_STATIC_PRIVATE_KEY = AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
        "REMOTE_STATIC_PUBLIC_KEY = AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
        "LOCAL_EPHEMERAL_PRIVATE_KEY = AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=",
        "PRESHARED_KEY = AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "LOCAL_STATIC_PRIVATE_KEY = BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=",
        "REMOTE_STATIC_PUBLIC_KEY = BQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU=",
        "LOCAL_EPHEMERAL_PRIVATE_KEY = BgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgY=",
        "PRESHARED_KEY = //////////////////////////////////////////8=",
    ]
    assert any("key log on" in line and "wg0" in line for line in lines)
    assert not any("AQEBAQ" in line for line in lines)  # keys go to the file only, never to the log


def test_refuses_files_others_can_read_links_and_non_files(tmp_path: Path) -> None:
    lines = capture_log()
    try:
        exposed = tmp_path / "exposed"
        exposed.write_text("x")
        exposed.chmod(0o640)
        assert not KeyLog(exposed).active
        link = tmp_path / "link"
        link.symlink_to(tmp_path / "target")
        assert not KeyLog(link).active
        assert not (tmp_path / "target").exists()
        assert not KeyLog(tmp_path).active  # a directory
        missing = KeyLog(tmp_path / "no" / "dir" / "keys")
        assert not missing.active
        missing.write(bytes(32), bytes(32), bytes(32), bytes(32))  # a no-op, not an error
    finally:
        log.reset_logger()
    assert exposed.read_text() == "x"
    assert any("0640" in line for line in lines)
    assert any("symbolic link" in line for line in lines)
    assert any("cannot be opened" in line for line in lines)


def test_a_failing_write_is_logged_once_and_stops_logging(tmp_path: Path) -> None:
    lines = capture_log()
    try:
        k = KeyLog(tmp_path / "keys")
        fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
        os.dup2(fd, k._fd)  # the key log's descriptor now points at /dev/full
        os.close(fd)
        for _ in range(3):
            k.write(bytes(32), bytes(32), bytes(32), bytes(32))
        assert not k.active
        k.close()
    finally:
        log.reset_logger()
    assert sum("failed" in line for line in lines) == 1
