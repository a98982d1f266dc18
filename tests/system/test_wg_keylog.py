"""The key log for Wireshark (issue 9 item 6): a real capture of a wiretun-wg <-> wireguard-go tunnel,
taken with tcpdump on the veth between their namespaces, is decrypted by tshark with the key log
wiretun-wg wrote (and not without it); the file is 0600; an unusable key log never stops the tunnel.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from .wgutil import WIREGUARD_GO, Lab, Node, Wire, nsx, ping, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None or shutil.which("tcpdump") is None,
                                reason="tshark and tcpdump are needed")

PEER_KIND = "wggo" if WIREGUARD_GO is not None else "daemon"
KEY_LINE = re.compile(r"^(LOCAL_STATIC_PRIVATE_KEY|REMOTE_STATIC_PUBLIC_KEY|LOCAL_EPHEMERAL_PRIVATE_KEY|PRESHARED_KEY)"
                      r" = [A-Za-z0-9+/]{43}=$")


def keyed_pair(lab: Lab, keylog: Path, kind: str = "daemon") -> tuple[Node, Node, Wire]:
    """A wiretun node (with the key log) and a wireguard-go node, each the other's peer over IPv4."""
    left_ns, right_ns = lab.namespace(), lab.namespace()
    wire = lab.wire(left_ns, right_ns)
    if kind == "daemon":
        left = lab.node("daemon", left_ns, 51001, env={"WIRETUN_KEYLOG_FILE": str(keylog)})
    else:
        left = lab.node("inproc", left_ns, 51001, device_options={"keylog": keylog})
    right = lab.node(PEER_KIND, right_ns, 51002)
    left.add_peer(right, wire.b4)
    right.add_peer(left, wire.a4)
    return left, right, wire


class Capture:
    """tcpdump on one interface of a namespace, into a pcap file, until stopped."""

    def __init__(self, ns: str, ifname: str, path: Path) -> None:
        self.path = path
        argv = ["tcpdump", "-i", ifname, "-n", "-U", "--immediate-mode", "-w", str(path), "udp"]
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        ready, _, _ = select.select([self.proc.stderr], [], [], 10)
        line = self.proc.stderr.readline().decode() if ready else ""
        if "listening on" not in line:
            self.stop()
            raise AssertionError(f"tcpdump did not start: {line!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def decrypted_icmp(pcap: Path, keylog: Path | None) -> list[tuple[str, str, str]]:
    """(inner source, inner destination, ICMP type) of every ICMP message tshark finds in ``pcap``."""
    argv = ["tshark", "-r", str(pcap), "-n", "-d", "udp.port==51001,wg", "-d", "udp.port==51002,wg",
            "-Y", "icmp", "-T", "fields", "-E", "occurrence=l", "-e", "ip.src", "-e", "ip.dst", "-e", "icmp.type"]
    if keylog is not None:
        argv[3:3] = ["-o", f"wg.keylog_file:{keylog}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [tuple(line.split("\t")) for line in r.stdout.splitlines() if line.strip()]  # type: ignore[misc]


@pytest.mark.parametrize("kind, initiator", [("daemon", "wiretun"), ("daemon", "peer"), ("inproc", "wiretun")])
def test_tshark_decrypts_a_capture_with_the_key_log(lab: Lab, tmp_path: Path, kind: str, initiator: str) -> None:
    """With wiretun as the initiator and as the responder (then its log holds the responder's keys)."""
    keylog = tmp_path / "wg.keys"
    left, right, wire = keyed_pair(lab, keylog, kind)
    capture = Capture(left.ns, wire.a_if, tmp_path / "wg.pcap")
    try:
        if initiator == "wiretun":
            assert ping(left.ns, right.inner4) == 3
            assert ping(right.ns, left.inner4) == 3
        else:
            assert ping(right.ns, left.inner4) == 3
            assert ping(left.ns, right.inner4) == 3
    finally:
        capture.stop()
    assert stat.S_IMODE(os.stat(keylog).st_mode) == 0o600
    lines = keylog.read_text().splitlines()
    assert lines and len(lines) % 4 == 0 and all(KEY_LINE.match(line) for line in lines), lines[:4]
    assert f"LOCAL_STATIC_PRIVATE_KEY = {left.private}" in lines
    assert f"REMOTE_STATIC_PUBLIC_KEY = {right.public}" in lines
    # Without the key log the capture is opaque; with it, tshark finds the inner echo requests and
    # replies between the tunnel addresses.
    assert decrypted_icmp(capture.path, None) == []
    found = decrypted_icmp(capture.path, keylog)
    assert found.count((left.inner4, right.inner4, "8")) >= 3, found
    assert found.count((right.inner4, left.inner4, "0")) >= 3, found
    assert found.count((right.inner4, left.inner4, "8")) >= 3, found
    if left.log_path is not None:  # the daemon warns that the key log is on
        assert "key log on" in left.log_path.read_text()


def test_a_key_log_that_cannot_be_written_leaves_the_tunnel_working(lab: Lab, tmp_path: Path) -> None:
    # A file others may read is refused (and left as it was); a missing directory cannot be opened.
    exposed = tmp_path / "exposed.keys"
    exposed.write_text("precious\n")
    exposed.chmod(0o644)
    left, right, _ = keyed_pair(lab, exposed)
    assert ping(left.ns, right.inner4) == 3
    assert exposed.read_text() == "precious\n"
    assert left.log_path is not None
    wait_for(lambda: "refused" in left.log_path.read_text(), 5, "the log line")
    assert "0644" in left.log_path.read_text()

    missing = tmp_path / "no" / "such" / "dir.keys"
    left2, right2, _ = keyed_pair(lab, missing)
    assert ping(left2.ns, right2.inner4) == 3
    assert not missing.parent.exists()
    assert left2.log_path is not None
    assert "cannot be opened" in left2.log_path.read_text()


def test_no_key_log_unless_asked(lab: Lab, tmp_path: Path) -> None:
    env_before = os.environ.pop("WIRETUN_KEYLOG_FILE", None)
    try:
        left_ns, right_ns = lab.namespace(), lab.namespace()
        wire = lab.wire(left_ns, right_ns)
        left = lab.node("daemon", left_ns, 51001)
        right = lab.node(PEER_KIND, right_ns, 51002)
        left.add_peer(right, wire.b4)
        right.add_peer(left, wire.a4)
        assert ping(left.ns, right.inner4) == 3
        assert left.device is None and left.log_path is not None
        assert "key log" not in left.log_path.read_text()
        assert "LOCAL_STATIC_PRIVATE_KEY" not in nsx(left.ns, "ls", "-la", str(tmp_path)).stdout
    finally:
        if env_before is not None:
            os.environ["WIRETUN_KEYLOG_FILE"] = env_before
