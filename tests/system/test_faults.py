"""Process faults on a userspace WireGuard carrying traffic: kill -9, ``ip link del``, SIGTERM, its UAPI
socket removed, a second daemon for the same name.

Each scenario runs on ``wiretun-wg`` and on Debian's wireguard-go alike, and what each leaves behind
(the interface, the UAPI socket file, a running process) is compared: wiretun-wg may leave nothing that
wireguard-go does not leave too. The expected leftovers are written down per scenario, so a change in
either shows here. Traffic is a bounded UDP stream from the peer through the tunnel.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .wgutil import WIREGUARD_GO, Lab, Node, Wire, _netns, nsx, pair, ping, sh, wait_for

RUN_DIR = Path("/run/wiretun")
IMPLS = ["daemon", "wggo"]  # wiretun-wg and wireguard-go, as the lab names them


def impls() -> list[str]:
    return IMPLS if WIREGUARD_GO else ["daemon"]


def interface_exists(node: Node) -> bool:
    return nsx(node.ns, "ip", "link", "show", "dev", node.ifname, check=False).returncode == 0


LOCK_FILES: dict[str, Path] = {}  # interface name -> wiretun's session lock file for it
NOT_OURS: set[Path] = set()  # lock files there before a wireguard-go node started (namespace inodes are reused)


def lock_file(node: Node) -> Path:
    """wiretun's session lock file of the node's interface: /run/wiretun/<netns inode>-<ifindex>.lock."""
    index = nsx(node.ns, "cat", f"/sys/class/net/{node.ifname}/ifindex").stdout.strip()
    return RUN_DIR / f"{os.stat(f'/var/run/netns/{node.ns}').st_ino}-{index}.lock"


def leftovers(node: Node) -> set[str]:
    """What is left of ``node`` once its process was faulted and given time to react."""
    left = set()
    path = LOCK_FILES.get(node.ifname)
    if path is not None and path.exists() and path not in NOT_OURS:
        left.add("lock file")
    if interface_exists(node):
        left.add("interface")
    if node.socket_path.exists():
        left.add("socket file")
    if node.proc is not None and node.proc.poll() is None:
        left.add("process")
    return left


def settle(node: Node, timeout: float = 10.0) -> None:
    """Wait until the node's process has exited (at most ``timeout``), then for its interface to go."""
    assert node.proc is not None
    try:
        node.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return  # still running: leftovers() reports it
    deadline = time.monotonic() + 5
    while interface_exists(node) and time.monotonic() < deadline:
        time.sleep(0.05)


class Traffic:
    """UDP from the peer through the tunnel to the node, in a thread: bounded in count and in time."""

    def __init__(self, sender: Node, receiver: Node, count: int = 200_000, seconds: float = 20.0) -> None:
        with _netns.entered(sender.ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.target = (receiver.inner4, 9)
        self.count, self.seconds = count, seconds
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        payload = b"x" * 1000
        while self.sent < self.count and not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.sock.sendto(payload, self.target)
            except OSError:
                time.sleep(0.001)  # no route for a moment (the peer is re-handshaking): keep it bounded
            self.sent += 1
            if self.sent % 64 == 0:
                time.sleep(0.001)

    def __enter__(self) -> Traffic:
        self.thread.start()
        time.sleep(0.5)  # well under way
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.sock.close()


def lab_pair(lab: Lab, impl: str) -> tuple[Node, Node, Wire]:
    """The node under test (``impl``) and its peer (wiretun in-process), with a working tunnel."""
    node, peer, wire = pair(lab, impl, "inproc")
    path = LOCK_FILES[node.ifname] = lock_file(node)
    if node.kind != "daemon" and path.exists():
        NOT_OURS.add(path)  # left by a dead namespace that had the same inode
    assert ping(peer.ns, node.inner4, 2) == 2
    return node, peer, wire


@pytest.fixture(params=impls())
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


# What wireguard-go leaves, and wiretun-wg may leave at most, per fault.
EXPECTED = {
    "kill -9": {"socket file"},  # nothing removes a socket file after SIGKILL; the next start replaces it
    "ip link del": set(),
    "SIGTERM": set(),
    "socket removed": set(),
}
# The one difference: after SIGKILL wiretun-wg also leaves its session's (empty) lock file, as it leaves
# the socket file; the lock was the kernel's and went with the process, and the next session reuses it.
EXTRA_FOR_WIRETUN = {"kill -9": {"lock file"}}


def check_leftovers(node: Node, fault: str) -> None:
    left = leftovers(node)
    allowed = EXPECTED[fault] | (EXTRA_FOR_WIRETUN.get(fault, set()) if node.kind == "daemon" else set())
    assert EXPECTED[fault] - {"lock file"} <= left <= allowed, f"{node.kind} after {fault}: left {left or 'nothing'}"


def test_kill_9_mid_traffic_then_restart_with_the_same_name(lab: Lab, impl: str) -> None:
    node, peer, wire = lab_pair(lab, impl)
    with Traffic(peer, node):
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        settle(node)
    assert node.proc.returncode == -signal.SIGKILL
    check_leftovers(node, "kill -9")
    # Started again under the same name (and the same key and port): the stale socket is replaced and the
    # peer, which still knows the key, gets through again.
    again = lab.node(impl, node.ns, node.port, ifname=node.ifname, configure=False)
    # (The lab waits for the socket file, which the dead one left: wait until the new one answers.)
    wait_for(lambda: sh("wg", "show", node.ifname, check=False).returncode == 0, 20, "the restarted daemon")
    again.private, again.public = node.private, node.public
    again.inner4, again.inner6 = node.inner4, node.inner6
    again.configure(node.port)
    again.add_peer(peer, wire.b4)
    # The restarted side has no session: it starts the handshake (the peer's old keys are useless now).
    assert ping(again.ns, peer.inner4, 3, wait=5) >= 1
    assert ping(peer.ns, again.inner4, 3) == 3


def test_ip_link_del_mid_traffic(lab: Lab, impl: str) -> None:
    node, peer, wire = lab_pair(lab, impl)
    with Traffic(peer, node):
        nsx(node.ns, "ip", "link", "del", "dev", node.ifname)
        settle(node)
    assert node.proc is not None and node.proc.returncode is not None, "still running after its interface went"
    if impl == "daemon":
        assert node.proc.returncode == 0  # the normal way to stop (wg-quick down)
    check_leftovers(node, "ip link del")


def test_sigterm_mid_traffic(lab: Lab, impl: str) -> None:
    node, peer, wire = lab_pair(lab, impl)
    with Traffic(peer, node):
        assert node.proc is not None
        # ip netns exec execs the daemon itself, so this pid is the daemon's.
        node.proc.send_signal(signal.SIGTERM)
        settle(node)
    assert node.proc.returncode is not None
    if impl == "daemon":
        assert node.proc.returncode == 0
    check_leftovers(node, "SIGTERM")


def test_uapi_socket_removed_mid_traffic(lab: Lab, impl: str) -> None:
    node, peer, wire = lab_pair(lab, impl)
    with Traffic(peer, node):
        os.unlink(node.socket_path)
        settle(node)
    assert node.proc is not None and node.proc.returncode is not None, "still running without its socket"
    check_leftovers(node, "socket removed")


def test_second_daemon_for_the_same_name_fails_and_leaves_the_first_alone(lab: Lab, impl: str) -> None:
    node, peer, wire = lab_pair(lab, impl)
    argv = {"daemon": [sys.executable, "-m", "wiretun.wireguard.daemon", "-f", node.ifname],
            "wggo": [WIREGUARD_GO or "wireguard-go", "-f", node.ifname]}[impl]
    env = dict(os.environ, LOG_LEVEL="error", WG_PROCESS_FOREGROUND="1")
    with Traffic(peer, node):
        second = subprocess.run(["ip", "netns", "exec", node.ns, *argv], env=env, capture_output=True, text=True,
                                timeout=30)
    assert second.returncode != 0, f"{impl}: a second daemon for {node.ifname} started: {second.stdout}"
    if impl == "daemon":
        assert "in use" in second.stdout + second.stderr, second.stdout + second.stderr
    # The first is untouched: still running, its socket and interface there, traffic still flows.
    assert {"interface", "socket file", "process"} <= leftovers(node)
    assert node.wg("show", node.ifname, "listen-port").stdout.strip() == str(node.port)
    assert ping(peer.ns, node.inner4, 3) == 3


def test_sessions_remove_their_lock_file_when_the_last_one_ends(netns: str) -> None:
    import wiretun

    with wiretun.Adapter.create(f"wtl{os.getpid() % 10000}", "Faults") as adapter:
        index = adapter.luid  # the ifindex
        path = RUN_DIR / f"{os.stat('/proc/thread-self/ns/net').st_ino}-{index}.lock"
        with adapter.start_session(0x20000):
            assert path.exists()
        assert not path.exists()
        a = adapter.start_session(0x20000, multi_queue=True)
        b = adapter.start_session(0x20000, multi_queue=True)
        a.end()
        assert path.exists()  # b still holds it
        with pytest.raises(wiretun.Busy):
            adapter.start_session(0x20000)
        b.end()
        assert not path.exists()
        with adapter.start_session(0x20000):  # and a new one makes it again
            assert path.exists()
