"""Helpers shared by the WireGuard system tests: commands, waiting, names, keys, wg-quick set-up, and
the lab (:class:`Lab`: namespaces joined by veth :class:`Wire` s, with WireGuard :class:`Node` s in them).

A node is a wiretun device in this process (``inproc``), the ``wiretun-wg`` daemon (``daemon``) or
wireguard-go (``wggo``), each configured with the real ``wg`` tool through its UAPI socket in
/var/run/wireguard.  The ``lab`` fixture (tests/system/conftest.py) closes every node afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

import wiretun
from tests import netns as _netns
from wiretun.wireguard.uapi import DEFAULT_SOCKET_DIRECTORY

SOCK_DIR = Path(DEFAULT_SOCKET_DIRECTORY)  # where wg looks for userspace sockets (no override in Debian's wg)
WIREGUARD_GO = shutil.which("wireguard-go")


def sh(*argv: str, check: bool = True, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()} {r.stdout.strip()}")
    return r


def nsx(ns: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *argv, **kw)


def wg(*args: str, input: str | None = None, check: bool = True, cwd: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(["wg", *args], input=input, capture_output=True, text=True, timeout=20, cwd=cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"wg {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it is truthy (returning its value); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def unique(prefix: str = "wtu") -> str:
    """An interface (or namespace) name unlikely to exist: ``prefix`` and 8 hex digits."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def genkey() -> tuple[str, str]:
    """(private, public) base64 keys from ``wg genkey`` / ``wg pubkey``."""
    private = wg("genkey").stdout.strip()
    public = wg("pubkey", input=private + "\n").stdout.strip()
    return private, public


def wg_quick_with_wiretun_wg() -> tuple[Path, dict[str, str]]:
    """(the wiretun-wg script, environment) for running wg-quick on wiretun-wg; skips when that cannot work."""
    if shutil.which("wg-quick") is None:
        pytest.skip("wg-quick is not installed")
    if os.path.exists("/sys/module/wireguard"):
        pytest.skip("the kernel has WireGuard: wg-quick would not use a userspace implementation")
    script = Path(sys.executable).with_name("wiretun-wg")
    if not script.exists():
        pytest.skip(f"the wiretun-wg console script is not installed next to {sys.executable}")
    env = dict(os.environ, WG_QUICK_USERSPACE_IMPLEMENTATION=str(script))
    env.pop("LOG_LEVEL", None)
    return script, env


# ------------------------------------------------------------------ the lab: nodes joined by veth wires


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns: str, address: str, count: int = 3, *, source: str | None = None, interval: float = 0.1,
         wait: float = 2, size: int = 56) -> int:
    """Send ``count`` ICMP echo requests from namespace ``ns``; return how many distinct replies came.

    A raw ICMP socket made in that namespace (iputils ping is not always installed). The loop is
    bounded: ``count`` sends, then at most ``wait`` seconds after the last one.
    """
    v6 = ":" in address
    family = socket.AF_INET6 if v6 else socket.AF_INET
    with _netns.entered(ns):
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    try:
        if source:
            sock.bind((source, 0))
        ident = random.randint(1, 0xFFFF)
        payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        request_type, reply_type = (128, 129) if v6 else (8, 0)
        want = ipaddress.ip_address(address)
        replied: set[int] = set()
        next_send = time.monotonic()
        deadline = None
        seq = 0
        while True:
            now = time.monotonic()
            if seq < count and now >= next_send:
                header = struct.pack("!BBHHH", request_type, 0, 0, ident, seq)
                message = header + payload
                if not v6:  # the kernel fills in the ICMPv6 checksum (it needs the pseudo-header)
                    message = header[:2] + struct.pack("!H", _icmp_checksum(message)) + header[4:] + payload
                with contextlib.suppress(OSError):  # e.g. "network unreachable": counts as lost
                    sock.sendto(message, (address, 0))
                seq += 1
                next_send = now + interval
                if seq == count:
                    deadline = now + wait
            if deadline is not None and (now >= deadline or len(replied) == count):
                return len(replied)
            limit = (deadline if deadline is not None else next_send) - now
            ready, _, _ = select.select([sock], [], [], max(0.0, min(limit, interval)))
            if not ready:
                continue
            data, sender = sock.recvfrom(65535)
            if not v6:
                data = data[(data[0] & 15) * 4:]  # raw IPv4 sockets see the IP header
            if len(data) < 8 or ipaddress.ip_address(sender[0].split("%")[0]) != want:
                continue
            rtype, _, _, rid, rseq = struct.unpack_from("!BBHHH", data)
            if rtype == reply_type and rid == ident and rseq < count and data[8:] == payload:
                replied.add(rseq)
    finally:
        sock.close()


@dataclasses.dataclass
class PeerDump:
    public_key: str
    preshared_key: str
    endpoint: str
    allowed_ips: str
    latest_handshake: int
    rx: int
    tx: int
    keepalive: str


@dataclasses.dataclass
class Wire:
    """A veth pair between two namespaces, with an IPv4 and an IPv6 address on each end."""

    a_if: str
    b_if: str
    a4: str
    b4: str
    a6: str
    b6: str


class Node:
    """One WireGuard interface (wiretun in-process, wiretun-wg daemon, or wireguard-go) in a namespace."""

    def __init__(self, lab: Lab, kind: str, ns: str, index: int, ifname: str | None = None) -> None:
        self.lab = lab
        self.kind = kind
        self.ns = ns
        self.index = index
        self.ifname = ifname or unique({"inproc": "wti", "daemon": "wtd", "wggo": "wgg"}[kind])
        self.private, self.public = genkey()
        self.inner4 = f"10.77.0.{index}"
        self.inner6 = f"fd77::{index}"
        self.port = 0
        self.device: Any = None
        self.adapter: Any = None
        self.server: Any = None
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def __repr__(self) -> str:
        return f"<{self.kind} {self.ifname} in {self.ns}>"

    @property
    def socket_path(self) -> Path:
        return SOCK_DIR / f"{self.ifname}.sock"

    def key_file(self, private: str) -> str:
        path = self.lab.tmp / f"{self.ifname}-{uuid.uuid4().hex[:6]}.key"
        path.write_text(private + "\n")
        path.chmod(0o600)
        return str(path)

    # -- wg --

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("wg", *args, check=check)

    def set(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("wg", "set", self.ifname, *args, check=check)

    def dump(self) -> tuple[list[str], dict[str, PeerDump]]:
        lines = sh("wg", "show", self.ifname, "dump").stdout.splitlines()
        peers = {}
        for line in lines[1:]:
            f = line.split("\t")
            peers[f[0]] = PeerDump(f[0], f[1], f[2], f[3], int(f[4]), int(f[5]), int(f[6]), f[7])
        return lines[0].split("\t"), peers

    def peer(self, other: Node | str) -> PeerDump:
        key = other if isinstance(other, str) else other.public
        return self.dump()[1][key]

    def configure(self, port: int) -> None:
        self.port = port
        self.set("private-key", self.key_file(self.private), "listen-port", str(port))
        nsx(self.ns, "ip", "addr", "add", f"{self.inner4}/24", "dev", self.ifname)
        nsx(self.ns, "ip", "addr", "add", f"{self.inner6}/64", "dev", self.ifname, "nodad")
        nsx(self.ns, "ip", "link", "set", self.ifname, "up")

    def add_peer(self, other: Node, endpoint: str | None = None, *extra: str,
                 allowed: str | None = None) -> None:
        args = ["peer", other.public, "allowed-ips", allowed or f"{other.inner4}/32,{other.inner6}/128"]
        if endpoint is not None:
            args += ["endpoint", f"{bracket(endpoint)}:{other.port}"]
        self.set(*args, *extra)

    def stats(self) -> dict[str, int]:
        assert self.device is not None, "counters are read from in-process devices"
        return self.device.stats

    def close(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.close()
        if self.device is not None:
            with contextlib.suppress(Exception):
                self.device.close()
        if self.adapter is not None:
            with contextlib.suppress(Exception):
                self.adapter.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


class Lab:
    """Namespaces, wires and WireGuard nodes for one test; :meth:`close` undoes all of it."""

    def __init__(self, make_netns: Callable[[str], str], tmp: Path) -> None:
        self._make_netns = make_netns
        self.tmp = tmp
        self.nodes: list[Node] = []
        self._wires = 0
        self._indexes = iter(range(1, 200))

    def namespace(self) -> str:
        return self._make_netns("wtw")

    def wire(self, a: str, b: str) -> Wire:
        """A veth pair a<->b: 192.168.k.1/24 + fd00:k::1/64 on a's end, .2 / ::2 on b's."""
        self._wires += 1
        k = self._wires
        w = Wire(unique("va"), unique("vb"), f"192.168.{k}.1", f"192.168.{k}.2", f"fd00:{k}::1", f"fd00:{k}::2")
        sh("ip", "link", "add", w.a_if, "netns", a, "type", "veth", "peer", "name", w.b_if, "netns", b)
        for ns, ifname, v4, v6 in ((a, w.a_if, w.a4, w.a6), (b, w.b_if, w.b4, w.b6)):
            nsx(ns, "ip", "addr", "add", f"{v4}/24", "dev", ifname)
            nsx(ns, "ip", "addr", "add", f"{v6}/64", "dev", ifname, "nodad")
            nsx(ns, "ip", "link", "set", ifname, "up")
        return w

    def node(self, kind: str, ns: str, port: int, *, ifname: str | None = None, configure: bool = True,
             env: dict[str, str] | None = None, device_options: dict[str, Any] | None = None) -> Node:
        """Start a node; ``configure`` gives it its key, ``port`` and inner addresses and sets it up.
        ``env`` adds to a process's environment, ``device_options`` are keywords for an in-process Device."""
        node = Node(self, kind, ns, next(self._indexes), ifname)
        self.nodes.append(node)
        if kind == "inproc":
            self._start_inproc(node, device_options or {})
        elif kind == "daemon":
            self._start_process(node, [sys.executable, "-m", "wiretun.wireguard.daemon", "-f", node.ifname], env)
        elif kind == "wggo":
            self._start_process(node, [WIREGUARD_GO, "-f", node.ifname], env)
        else:
            raise ValueError(kind)
        if configure:
            node.configure(port)
        else:
            node.port = port
        return node

    def _start_inproc(self, node: Node, device_options: dict[str, Any]) -> None:
        from wiretun.wireguard.device import Device
        from wiretun.wireguard.uapi import UAPIServer

        with _netns.entered(node.ns):  # the adapter, sockets and the loop thread live there
            node.adapter = wiretun.Adapter.create(node.ifname, "WireGuard")
            node.device = Device(node.adapter, **device_options)
            node.server = UAPIServer(node.ifname, node.device)
            node.device.start()

    def _start_process(self, node: Node, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        env = dict(os.environ, LOG_LEVEL="error", WG_PROCESS_FOREGROUND="1", **(extra_env or {}))
        node.log_path = self.tmp / f"{node.ifname}.log"  # what the process printed (error level)
        with open(node.log_path, "w") as out:
            node.proc = subprocess.Popen(["ip", "netns", "exec", node.ns, *argv], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: node.socket_path.exists() or node.proc.poll() is not None, 20, f"{node} to start")
        assert node.proc.poll() is None, f"{node} exited with {node.proc.returncode}"

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.close()


def stream_tcp(src_ns: str, dst_ns: str, address: str, pieces: Iterable[bytes | memoryview],
               timeout: float = 90) -> tuple[int, str]:
    """Send ``pieces`` one after another over one TCP connection from ``src_ns`` to ``address`` in
    ``dst_ns`` (bounded by ``timeout`` per step); returns how many bytes arrived and their sha256 (hex)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with _netns.entered(dst_ns):
        server = socket.socket(family, socket.SOCK_STREAM)
    result: list[tuple[int, str]] = []
    try:
        server.bind((address, 0))
        server.listen(1)
        server.settimeout(timeout)
        port = server.getsockname()[1]

        def serve() -> None:
            conn, _ = server.accept()
            conn.settimeout(timeout)
            digest = hashlib.sha256()
            count = 0
            with conn:
                while True:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    digest.update(chunk)
                    count += len(chunk)
            result.append((count, digest.hexdigest()))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with _netns.entered(src_ns):
            client = socket.socket(family, socket.SOCK_STREAM)
        with client:
            client.settimeout(timeout)
            client.connect((address, port))
            for piece in pieces:
                client.sendall(piece)
            client.shutdown(socket.SHUT_WR)
            thread.join(timeout)
        assert result, "the receiver did not finish in time"
        return result[0]
    finally:
        server.close()


def pair(lab: Lab, left_kind: str, right_kind: str, outer: int = 4, *,
         left_extra: tuple[str, ...] = (), right_extra: tuple[str, ...] = ()) -> tuple[Node, Node, Wire]:
    """Two nodes in two namespaces joined by a veth pair, each the other's peer over IPv4 or IPv6."""
    left_ns, right_ns = lab.namespace(), lab.namespace()
    wire = lab.wire(left_ns, right_ns)
    left = lab.node(left_kind, left_ns, 51001)
    right = lab.node(right_kind, right_ns, 51002)
    left.add_peer(right, wire.b4 if outer == 4 else wire.b6, *left_extra)
    right.add_peer(left, wire.a4 if outer == 4 else wire.a6, *right_extra)
    return left, right, wire


def iperf(server: Node, client: Node, address: str, *, reverse: bool = False, seconds: int = 1) -> int:
    """Bytes the receiving side got in an iperf3 TCP run (client -> server, or back with ``reverse``)."""
    port = random.randint(20000, 40000)
    srv = subprocess.Popen(["ip", "netns", "exec", server.ns, "iperf3", "-s", "-1", "-B", address, "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: nsx(server.ns, "ss", "-Hltn", f"sport = :{port}").stdout.strip(), 10, "iperf3 to listen")
        argv = ["iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "5000"]
        if reverse:
            argv.append("-R")
        r = nsx(client.ns, *argv, check=False, timeout=seconds + 30)
        result = json.loads(r.stdout)
        assert "error" not in result, result["error"]
        return int(result["end"]["sum_received"]["bytes"])
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(5)
