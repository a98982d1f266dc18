"""UDP, handshake and UAPI fuzzing of a running ``wiretun-wg`` with a real peer, in namespaces made here.

Two namespaces joined by a veth pair (IPv4 and IPv6 on it): the *target* runs ``wiretun-wg`` (the daemon
as users run it), the *peer* runs a real WireGuard (Debian's wireguard-go, or a second wiretun-wg). The
peer sends *probes* through the tunnel: UDP datagrams to the target's inner address, each with a
sequence number and a keyed tag. Meanwhile an attacker in the peer's namespace sends the target's UDP
port random datagrams, mutations (bit flips, truncations, extensions) of captured genuine datagrams,
exact replays (from its own ports and, injected as whole frames on the veth, from the peer's own address
and port), UDP GSO trains of all three, a handshake flood (random and MAC1-valid initiations from 256
ports), and the UAPI socket garbage.

What reaches the target's TUN interface is captured (an AF_PACKET socket on it): every delivered packet
must be a probe with a valid tag, and no probe may arrive twice. Anything else is a forged or replayed
delivery. After each phase the target must still be alive and serving: its UAPI answers and a new probe
gets through (else: a hang). At the end its RSS and open file descriptors are compared with the start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wiretun import packet as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.netns
from tests import netns

SOCK_DIR = Path("/var/run/wireguard")
PORT_T, PORT_P = 51820, 51821
PROBE_PORT = 7777
MAGIC = b"WTFZ"
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
GSO_UDP_L4 = 5
PACKET_OUTGOING = 4
UDP_SEGMENT = 103
SOL_UDP = 17
T4, P4, T6, P6 = "10.201.0.1", "10.201.0.2", "fd20::1", "fd20::2"
TI4, PI4, TI6, PI6 = "10.202.0.1", "10.202.0.2", "fd21::1", "fd21::2"
PROBE_SIZES = (64, 200, 1000)


@dataclasses.dataclass
class Budget:
    random: int
    mutated: int
    replayed: int
    gso_trains: int
    flood_seconds: float
    flood_rate: int
    uapi: int
    rate: int  # datagrams per second the attacker aims at (the daemon's queue should not just overflow)


QUICK = Budget(random=3000, mutated=3000, replayed=600, gso_trains=60, flood_seconds=2.0, flood_rate=5000,
               uapi=60, rate=20000)
FULL = Budget(random=200_000, mutated=200_000, replayed=40_000, gso_trains=3000, flood_seconds=60.0,
              flood_rate=20000, uapi=1000, rate=20000)


class Defects:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        self.items.append(text)
        print(f"  DEFECT: {text}", flush=True)


def sh(*argv: str, check: bool = True, input: str | None = None, timeout: float = 30) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


# ------------------------------------------------------------------------------------------ probes


class Probes:
    """Tagged datagrams the peer sends through the tunnel, and the check of what the target's TUN got."""

    def __init__(self) -> None:
        self.key = os.urandom(16)
        self.run = os.urandom(8)
        self.sent = 0
        self.delivered: set[int] = set()
        self.duplicates = 0
        self.unexpected = 0
        self.unexpected_examples: list[str] = []
        self.lock = threading.Lock()
        self._next = 0

    def make(self, size: int) -> tuple[int, bytes]:
        with self.lock:
            seq = self._next
            self._next += 1
            self.sent += 1
        head = MAGIC + self.run + struct.pack("!Q", seq)
        tag = hashlib.blake2s(head, key=self.key, digest_size=16).digest()
        body = head + tag
        return seq, body + bytes(max(0, size - len(body)))

    def check(self, pkt: bytes) -> None:
        """One packet the target delivered to its TUN interface."""
        seq = self._probe_seq(pkt)
        with self.lock:
            if seq is None:
                self.unexpected += 1
                if len(self.unexpected_examples) < 5:
                    self.unexpected_examples.append(pkt[:48].hex())
            elif seq in self.delivered:
                self.duplicates += 1
            else:
                self.delivered.add(seq)

    def _probe_seq(self, pkt: bytes) -> int | None:
        try:
            info = P.parse(pkt)
        except Exception:
            return None
        if info.protocol != P.PROTO_UDP or info.dst_port != PROBE_PORT:
            return None
        body = bytes(pkt[info.payload_offset:])
        if len(body) < 36 or body[:4] != MAGIC or body[4:12] != self.run:
            return None
        tag = hashlib.blake2s(body[:20], key=self.key, digest_size=16).digest()
        if body[20:36] != tag:
            return None
        return int(struct.unpack_from("!Q", body, 12)[0])


# ----------------------------------------------------------------------------------------- capture


class Capture:
    """An AF_PACKET socket read by a thread: frames of an interface, handed to ``sink``."""

    def __init__(self, ns: str, ifname: str, kind: int, sink: Callable[[bytes, int], None], *,
                 vnet_header: bool = False) -> None:
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, kind, socket.htons(ETH_P_ALL))
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE: no capture drops
        if vnet_header:  # each packet comes after its virtio-net header: a GSO super-packet says so
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        self.sock.bind((ifname, ETH_P_ALL))
        self.sink = sink
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            for _ in range(512):
                try:
                    data, addr = self.sock.recvfrom(70000, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    return  # the interface went away
                self.sink(data, addr[2])

    def drops(self) -> int:
        """Frames the kernel dropped for this socket since the last call (PACKET_STATISTICS)."""
        raw = self.sock.getsockopt(263, 6, 8)  # SOL_PACKET, PACKET_STATISTICS: tp_packets, tp_drops
        return int(struct.unpack("II", raw)[1])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def datagrams_of(data: bytes) -> list[bytes]:
    """The packets in one TUN delivery read with its virtio-net header: a UDP GSO super-packet is cut into
    its datagrams (payload in gso_size pieces, each under the same IP and UDP addresses and ports),
    anything else is one packet. Done here, not with wiretun.offload, so the check does not lean on the
    code it checks."""
    if len(data) < 10:
        return [data]
    _flags, gso_type, _hdr_len, gso_size, _start, _off = struct.unpack_from("=BBHHHH", data)
    pkt = data[10:]
    if gso_type & 0x7F != GSO_UDP_L4 or not gso_size:
        return [pkt]
    try:
        info = P.parse(pkt)
    except Exception:
        return [pkt]
    payload = pkt[info.payload_offset:]
    src, dst = str(info.src), str(info.dst)
    make = P.ipv6_udp if info.version == 6 else P.ipv4_udp
    return [make(src, dst, info.src_port or 0, info.dst_port or 0, payload[i : i + gso_size])
            for i in range(0, len(payload), gso_size)]


def udp_of_frame(frame: bytes) -> tuple[int, bytes, bytes] | None:
    """(IP version, IP packet, UDP payload) of an Ethernet frame carrying UDP, else None."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    ip = frame[14:]
    try:
        if ethertype not in (0x0800, 0x86DD):
            return None
        info = P.parse(ip)
    except Exception:
        return None
    if info.protocol != P.PROTO_UDP:
        return None
    return info.version, ip, bytes(ip[info.payload_offset:])


def frame_with_payload(template: bytes, payload: bytes) -> bytes:
    """``template``'s Ethernet, IP and UDP headers (addresses, ports) around a new payload, all checksums right."""
    info = P.parse(template[14:])
    src, dst = str(info.src), str(info.dst)
    sport, dport = info.src_port or 0, info.dst_port or 0
    ip = (P.ipv6_udp if info.version == 6 else P.ipv4_udp)(src, dst, sport, dport, payload)
    return template[:14] + ip


# --------------------------------------------------------------------------------------------- lab


class Lab:
    """The namespaces, the two WireGuards, the captures and the probe traffic."""

    def __init__(self, peer_kind: str, work: Path, defects: Defects) -> None:
        self.defects = defects
        self.work = work
        self.peer_kind = peer_kind
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.captures: list[Capture] = []
        self.sockets: list[socket.socket] = []
        self.tag = os.urandom(3).hex()
        self.tif, self.pif = f"wfzt{self.tag}", f"wfzp{self.tag}"
        self.tveth, self.pveth = f"vfzt{self.tag}", f"vfzp{self.tag}"
        self.probes = Probes()
        self.corpus: dict[int, list[bytes]] = {4: [], 6: []}  # genuine frames peer -> target, by IP version
        self.capturing = False
        self.log = work / "target.log"
        self.target: subprocess.Popen[bytes] | None = None
        self.t_pub = self.p_pub = ""
        self.outer = 4

    # -- set-up --

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.tns = netns.create_up("wtfzt")
        self.namespaces.append(self.tns)
        self.pns = netns.create_up("wtfzp")
        self.namespaces.append(self.pns)
        sh("ip", "link", "add", self.tveth, "netns", self.tns, "type", "veth", "peer", "name", self.pveth,
           "netns", self.pns)
        for ns, dev, a4, a6 in ((self.tns, self.tveth, T4, T6), (self.pns, self.pveth, P4, P6)):
            sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        env = dict(os.environ, LOG_LEVEL="error", WG_PROCESS_FOREGROUND="1")
        log = open(self.log, "wb")  # the daemon writes it until the end
        self.target = subprocess.Popen(
            ["ip", "netns", "exec", self.tns, sys.executable, "-m", "wiretun.wireguard.daemon", "-f", self.tif],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(self.target)
        if self.peer_kind == "wireguard-go":
            peer_argv = [shutil.which("wireguard-go") or "wireguard-go", "-f", self.pif]
        else:
            peer_argv = [sys.executable, "-m", "wiretun.wireguard.daemon", "-f", self.pif]
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.pns, *peer_argv], env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for proc, ifname in ((self.target, self.tif), (self.procs[-1], self.pif)):
            deadline = time.monotonic() + 30
            while not (SOCK_DIR / f"{ifname}.sock").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{ifname} did not start (exit {proc.poll()}); see {self.log}")
                time.sleep(0.05)
        t_priv, p_priv = sh("wg", "genkey").strip(), sh("wg", "genkey").strip()
        self.t_pub = sh("wg", "pubkey", input=t_priv + "\n").strip()
        self.p_pub = sh("wg", "pubkey", input=p_priv + "\n").strip()
        for name, key in (("t", t_priv), ("p", p_priv)):
            path = self.work / f"{name}.key"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(key + "\n")
        self.configure_target()
        sh("wg", "set", self.pif, "listen-port", str(PORT_P), "private-key", str(self.work / "p.key"),
           "peer", self.t_pub, "allowed-ips", f"{TI4}/32,{TI6}/128", "endpoint", f"{T4}:{PORT_T}")
        for ns, dev, a4, a6 in ((self.tns, self.tif, TI4, TI6), (self.pns, self.pif, PI4, PI6)):
            sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        with netns.entered(self.tns):  # the probes' destination port exists: no ICMP back through the tunnel
            sink = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sink.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sink.bind(("::", PROBE_PORT))
            self.sockets.append(sink)
        with netns.entered(self.pns):
            self.probe4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.probe6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sockets += [self.probe4, self.probe6]
        # The target may hand its TUN UDP super-packets (GSO): each is split into its datagrams here.
        self.captures.append(Capture(self.tns, self.tif, socket.SOCK_RAW, self._delivered, vnet_header=True))
        self.captures.append(Capture(self.tns, self.tveth, socket.SOCK_RAW, self._on_wire, vnet_header=True))
        with netns.entered(self.pns):
            self.inject = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.inject.bind((self.pveth, ETH_P_ALL))
        self.sockets.append(self.inject)

    def configure_target(self) -> None:
        sh("wg", "set", self.tif, "listen-port", str(PORT_T), "private-key", str(self.work / "t.key"),
           "peer", self.p_pub, "allowed-ips", f"{PI4}/32,{PI6}/128")

    def _delivered(self, data: bytes, pkttype: int) -> None:
        if pkttype != PACKET_OUTGOING:
            for pkt in datagrams_of(data):
                self.probes.check(pkt)

    def _on_wire(self, data: bytes, pkttype: int) -> None:
        if not self.capturing or pkttype == PACKET_OUTGOING or len(data) < 10:
            return
        got = udp_of_frame(data[10:])
        if got is None:
            return
        version, ip, payload = got
        info = P.parse(ip)
        if info.dst_port != PORT_T or info.src_port != PORT_P:
            return
        gso_type, gso_size = data[1], struct.unpack_from("=H", data, 4)[0]
        if gso_type & 0x7F == GSO_UDP_L4 and gso_size:  # a train (UDP GSO) crosses the veth whole: cut it
            for i in range(0, len(payload), gso_size):
                self.corpus[version].append(frame_with_payload(data[10:], payload[i : i + gso_size]))
        else:
            self.corpus[version].append(data[10:])

    def close(self) -> None:
        for cap in self.captures:
            cap.close()
        for s in self.sockets:
            s.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for ns in self.namespaces:
            netns.remove(ns)
        for ifname in (self.tif, self.pif):
            with contextlib.suppress(FileNotFoundError):
                (SOCK_DIR / f"{ifname}.sock").unlink()

    # -- probes and liveness --

    def send_probe(self, v6: bool | None = None, size: int | None = None) -> int:
        seq, body = self.probes.make(size or random.choice(PROBE_SIZES))
        v6 = random.random() < 0.5 if v6 is None else v6
        try:
            if v6:
                self.probe6.sendto(body, (TI6, PROBE_PORT))
            else:
                self.probe4.sendto(body, (TI4, PROBE_PORT))
        except OSError:
            pass  # no route yet etc.: it simply does not arrive
        return seq

    def probe_through(self, timeout: float) -> bool:
        """A new probe reaches the target's TUN within ``timeout`` (probes every 50 ms until one does)."""
        deadline = time.monotonic() + timeout
        sent: list[int] = []
        while time.monotonic() < deadline:
            sent.append(self.send_probe())
            end = time.monotonic() + 0.05
            while time.monotonic() < end:
                with self.probes.lock:
                    if any(s in self.probes.delivered for s in sent):
                        return True
                time.sleep(0.005)
        return False

    def uapi_get(self, timeout: float = 5.0) -> str | None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(SOCK_DIR / f"{self.tif}.sock"))
                s.sendall(b"get=1\n\n")
                out = b""
                while not out.endswith(b"\n\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    out += chunk
            return out.decode(errors="replace")
        except OSError:
            return None

    def check_alive(self, phase: str, timeout: float = 15.0) -> None:
        assert self.target is not None
        if self.target.poll() is not None:
            self.defects.add(f"{phase}: wiretun-wg exited with status {self.target.returncode} (crash)")
            raise SystemExit(1)
        reply = self.uapi_get()
        if reply is None or "errno=0" not in reply:
            self.defects.add(f"{phase}: the UAPI did not answer get=1 (hang): {reply!r:.80}")
        if not self.probe_through(timeout):
            self.defects.add(f"{phase}: no probe got through the tunnel within {timeout:g} s afterwards (hang)")

    def endpoint(self) -> str:
        for line in sh("wg", "show", self.tif, "endpoints").splitlines():
            key, _, value = line.partition("\t")
            if key == self.p_pub:
                return value.strip()
        return ""

    def rss_kib(self) -> int:
        assert self.target is not None
        for line in Path(f"/proc/{self.target.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        assert self.target is not None
        return len(os.listdir(f"/proc/{self.target.pid}/fd"))

    def udp_stats(self) -> dict[str, int]:
        """The target namespace's UDP counters (/proc/net/snmp as seen from inside)."""
        text = netns.run(self.tns, "cat", "/proc/net/snmp", check=True, timeout=30).stdout
        rows = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
        return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:])} if len(rows) >= 2 else {}


# ------------------------------------------------------------------------------------------ attack


class Attacker:
    """UDP sockets in the peer's namespace (not the peer's port): the fuzzer's voice."""

    def __init__(self, lab: Lab, count: int = 16) -> None:
        self.lab = lab
        self.socks: dict[int, list[socket.socket]] = {4: [], 6: []}
        with netns.entered(lab.pns):
            for _ in range(count):
                for version, family, host in ((4, socket.AF_INET, P4), (6, socket.AF_INET6, P6)):
                    s = socket.socket(family, socket.SOCK_DGRAM)
                    s.bind((host, 0))
                    s.setblocking(False)
                    self.socks[version].append(s)
        self.replies: dict[int, int] = {}
        self.sent = 0
        self.dropped_locally = 0

    def target(self, version: int) -> tuple[str, int]:
        return (T4, PORT_T) if version == 4 else (T6, PORT_T)

    def send(self, version: int, data: bytes) -> None:
        s = random.choice(self.socks[version])
        try:
            s.sendto(data, self.target(version))
            self.sent += 1
        except BlockingIOError:
            self.dropped_locally += 1
        except OSError:
            self.dropped_locally += 1

    def send_gso(self, version: int, segments: list[bytes]) -> bool:
        """One sendmsg with UDP_SEGMENT: equal-sized segments (the last may be shorter)."""
        size = len(segments[0])
        s = random.choice(self.socks[version])
        try:
            s.sendmsg([b"".join(segments)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0,
                       self.target(version))
            self.sent += len(segments)
            return True
        except BlockingIOError:
            self.dropped_locally += len(segments)
        except OSError:
            self.dropped_locally += len(segments)
        return False

    def drain(self) -> None:
        for socks in self.socks.values():
            for s in socks:
                for _ in range(1000):
                    try:
                        data = s.recv(4096)
                    except (BlockingIOError, OSError):
                        break
                    kind = data[0] if data else -1
                    self.replies[kind] = self.replies.get(kind, 0) + 1

    def close(self) -> None:
        for socks in self.socks.values():
            for s in socks:
                s.close()


class Pacer:
    """Keeps a sender near ``rate`` per second (bounded loops: it sleeps, never spins long)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.t0 = time.monotonic()
        self.n = 0

    def tick(self, k: int = 1) -> None:
        self.n += k
        ahead = self.n / self.rate - (time.monotonic() - self.t0)
        if ahead > 0.002:
            time.sleep(ahead)


def random_datagram(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.5:  # shaped like WireGuard: a valid type and a plausible length
        kind = rng.choice([1, 2, 3, 4, 4, 4])
        size = {1: 148, 2: 92, 3: 64}.get(kind, rng.choice([32, 48, 80, 96, 1000, rng.randrange(16, 1500)]))
        body = bytearray(rng.randbytes(size))
        body[0:4] = bytes([kind, 0, 0, 0])
        return bytes(body)
    if r < 0.6:
        return rng.randbytes(rng.randrange(0, 4))
    return rng.randbytes(rng.randrange(0, 1500))


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        if op <= 2 and out:  # bit flips, most of the time
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 3 and out:
            del out[rng.randrange(len(out)):]
        elif op == 4:
            out += rng.randbytes(rng.randrange(1, 64))
        elif out:
            i = rng.randrange(len(out))
            out[i] = rng.choice([0, 0xFF, rng.randrange(256)])
    return bytes(out)


def mac1(pub_b64: str, msg: bytearray) -> None:
    """Fill in MAC1 of a 148-byte initiation for the owner of ``pub_b64`` (BLAKE2s-128, keyed by
    HASH("mac1----" || public key), over the message up to MAC1), computed here independently."""
    import base64

    key = hashlib.blake2s(b"mac1----" + base64.b64decode(pub_b64)).digest()
    msg[116:132] = hashlib.blake2s(bytes(msg[:116]), key=key, digest_size=16).digest()


# ------------------------------------------------------------------------------------------ phases


def capture_corpus(lab: Lab, version: int, count: int) -> None:
    """Quiet traffic (probes only) until ``count`` genuine frames of this IP version are captured, every
    probe of the window delivered: so each captured datagram was processed once, and a replay is a replay.
    First the peer forgets its session, so its next probe starts a handshake: the corpus gets the
    initiation that completed it (kept only when it was the only one, i.e. no retry went unanswered)."""
    endpoint = f"{T4}:{PORT_T}" if version == 4 else f"[{T6}]:{PORT_T}"
    corpus = lab.corpus[version]
    sh("wg", "set", lab.pif, "peer", lab.t_pub, "remove")
    lab.capturing = True
    sh("wg", "set", lab.pif, "peer", lab.t_pub, "allowed-ips", f"{TI4}/32,{TI6}/128", "endpoint", endpoint)
    if not lab.probe_through(20):
        lab.capturing = False
        corpus.clear()
        return
    time.sleep(0.2)
    initiations = [f for f in corpus if _message_type(f) == 1]
    corpus.clear()  # the data frames of the handshake's probes: some may have been lost, so not used
    sent: list[int] = []
    deadline = time.monotonic() + 30
    while len(corpus) < count and time.monotonic() < deadline:
        for _ in range(20):
            sent.append(lab.send_probe(v6=random.random() < 0.5))
        time.sleep(0.02)
    lab.capturing = False
    settle = time.monotonic() + 5
    while time.monotonic() < settle:
        with lab.probes.lock:
            missing = [s for s in sent if s not in lab.probes.delivered]
        if not missing:
            break
        time.sleep(0.05)
    if missing:
        # A probe lost in the quiet window: its datagram may be in the corpus unprocessed, and we cannot
        # tell which: drop the corpus and say so (never a false "replay" alarm).
        print(f"  note: {len(missing)} of {len(sent)} quiet probes were not delivered; corpus discarded")
        corpus.clear()
        return
    if len(initiations) == 1:
        corpus.insert(0, initiations[0])


def _message_type(frame: bytes) -> int:
    got = udp_of_frame(frame)
    return got[2][0] if got and got[2] else -1


def run(budget: Budget, peer_kind: str, seed: int) -> tuple[list[str], dict[str, Any]]:
    defects = Defects()
    rng = random.Random(seed)
    random.seed(seed)
    figures: dict[str, Any] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wtfz-") as tmp, Lab(peer_kind, Path(tmp), defects) as lab:
        lab.start()
        if not lab.probe_through(20):
            defects.add("set-up: no probe got through the tunnel (handshake never completed)")
            return defects.items, figures
        time.sleep(1.0)  # let start-up allocations settle before the baseline
        rss0, fds0 = lab.rss_kib(), lab.fds()
        udp0 = lab.udp_stats()
        attacker = Attacker(lab)
        sent: dict[str, int] = {}
        try:
            for version in (4, 6):
                capture_corpus(lab, version, 200)
                corpus = lab.corpus[version]
                types = [_message_type(f) for f in corpus]
                figures[f"corpus v{version} (initiations / transport)"] = f"{types.count(1)} / {types.count(4)}"
                if not corpus:
                    defects.add(f"IPv{version} outer: no genuine datagram captured (is the tunnel up over it?)")
                payloads = [udp_of_frame(f)[2] for f in corpus]  # type: ignore[index]
                share = 0.8 if version == 4 else 0.2  # most over IPv4, a fifth over IPv6
                real_endpoint = lab.endpoint()

                n = int(budget.random * share)
                pacer = Pacer(budget.rate)
                for _ in range(n):
                    attacker.send(version, random_datagram(rng))
                    pacer.tick()
                sent[f"random v{version}"] = n
                lab.check_alive(f"random v{version}")

                if payloads:
                    n = int(budget.mutated * share)
                    pacer = Pacer(budget.rate)
                    spoofed = 0
                    for i in range(n):
                        j = rng.randrange(len(corpus))
                        data = mutate(rng, payloads[j])
                        if i % 4 == 0:  # from the peer's own address and port, as a whole frame
                            lab.inject.send(frame_with_payload(corpus[j], data))
                            spoofed += 1
                        else:
                            attacker.send(version, data)
                        pacer.tick()
                    sent[f"mutated v{version}"] = n
                    sent[f"mutated v{version} from the peer's address"] = spoofed
                    lab.check_alive(f"mutated v{version}")

                    n = int(budget.replayed * share)
                    pacer = Pacer(budget.rate)
                    for i in range(n):
                        j = rng.randrange(len(corpus))
                        if i % 2 == 0:
                            lab.inject.send(corpus[j])  # the very frame, again
                        else:
                            attacker.send(version, payloads[j])  # the datagram from another port
                        pacer.tick()
                    sent[f"replayed v{version}"] = n
                    lab.check_alive(f"replayed v{version}")
                    now = lab.endpoint()
                    if now != real_endpoint:
                        defects.add(f"replayed v{version}: the peer's endpoint moved from {real_endpoint} to {now}")

                    trains = int(budget.gso_trains * share)
                    segments = 0
                    pacer = Pacer(max(1, budget.rate // 32))
                    for _ in range(trains):
                        kind = rng.randrange(3)
                        j = rng.randrange(len(payloads))
                        size = len(payloads[j])
                        k = rng.randrange(2, min(64, max(2, 60000 // max(1, size))) + 1)
                        if kind == 0:
                            segs = [rng.randbytes(size) for _ in range(k)]
                        elif kind == 1:
                            segs = [mutate(rng, payloads[j])[:size].ljust(size, b"\0") for _ in range(k)]
                        else:
                            same = [p for p in payloads if len(p) == size]
                            segs = [rng.choice(same) for _ in range(k)]
                        if attacker.send_gso(version, segs):
                            segments += k
                        pacer.tick()
                    sent[f"GSO trains v{version}"] = trains
                    sent[f"GSO train datagrams v{version}"] = segments
                    lab.check_alive(f"GSO trains v{version}")
                attacker.drain()

            # Handshake flood: random and MAC1-valid initiations from 256 ports, IPv4.
            flood_socks: list[socket.socket] = []
            with netns.entered(lab.pns):
                for _ in range(256):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind((P4, 0))
                    s.setblocking(False)
                    flood_socks.append(s)
            pool: list[bytes] = []
            for i in range(512):
                msg = bytearray(rng.randbytes(148))
                msg[0:4] = b"\x01\0\0\0"
                msg[132:148] = bytes(16)
                if i % 2 == 0:
                    mac1(lab.t_pub, msg)
                pool.append(bytes(msg))
            flood = 0
            cookies = 0
            t0 = time.monotonic()
            pacer = Pacer(budget.flood_rate)
            i = 0
            while time.monotonic() - t0 < budget.flood_seconds:
                s = flood_socks[i % 256]
                with contextlib.suppress(OSError):
                    s.sendto(pool[i % len(pool)], (T4, PORT_T))
                    flood += 1
                i += 1
                if i % 256 == 0:
                    for r in flood_socks[:32]:
                        with contextlib.suppress(OSError):
                            while True:
                                reply = r.recv(256)
                                if reply[:1] == b"\x03":
                                    cookies += 1
                                elif reply[:1] == b"\x02":
                                    defects.add("flood: a handshake response to a random initiation")
                pacer.tick()
            elapsed = time.monotonic() - t0
            for s in flood_socks:
                s.close()
            sent["handshake flood"] = flood
            figures["flood rate /s"] = round(flood / elapsed)
            figures["cookie replies seen (first 32 ports)"] = cookies
            lab.check_alive("handshake flood", timeout=20)

            # UAPI garbage.
            uapi = uapi_garbage(lab, rng, budget.uapi, defects)
            sent["UAPI requests"] = uapi
            lab.configure_target()  # a garbage request may have been a valid set=1: put the config back
            lab.check_alive("UAPI garbage", timeout=20)
        finally:
            attacker.drain()
            figures["replies to the attacker by message type"] = dict(sorted(attacker.replies.items())) or "none"
            if attacker.replies.get(2):
                defects.add(f"{attacker.replies[2]} handshake responses to replayed or forged initiations")
            attacker.close()
        time.sleep(2.0)  # sockets of closed UAPI clients, timers: let them go
        rss1, fds1 = lab.rss_kib(), lab.fds()
        udp1 = lab.udp_stats()
        figures["sent"] = sent
        figures["datagrams sent in all"] = attacker.sent + sum(v for k, v in sent.items()
                                                             if k == "handshake flood")
        figures["not sent (local EAGAIN)"] = attacker.dropped_locally
        figures["target UDP InDatagrams"] = udp1.get("InDatagrams", 0) - udp0.get("InDatagrams", 0)
        figures["target UDP RcvbufErrors"] = udp1.get("RcvbufErrors", 0) - udp0.get("RcvbufErrors", 0)
        figures["probes sent / delivered"] = f"{lab.probes.sent} / {len(lab.probes.delivered)}"
        figures["forged deliveries"] = lab.probes.unexpected
        figures["replayed deliveries"] = lab.probes.duplicates
        figures["RSS KiB before / after"] = f"{rss0} / {rss1}"
        figures["fds before / after"] = f"{fds0} / {fds1}"
        figures["capture drops"] = sum(c.drops() for c in lab.captures)
        if lab.probes.unexpected:
            defects.add(f"{lab.probes.unexpected} forged packets delivered to the TUN: "
                        f"{lab.probes.unexpected_examples}")
        if lab.probes.duplicates:
            defects.add(f"{lab.probes.duplicates} replayed probes delivered twice")
        if fds1 != fds0:
            defects.add(f"file descriptors {fds0} -> {fds1}: a leak")
        if rss1 - rss0 > 48 * 1024:
            defects.add(f"RSS grew {rss0} -> {rss1} KiB")
        log = lab.log.read_text(errors="replace")
        for needle, what in (("Traceback", "a traceback"), ("event loop failed", "the event loop failed")):
            if needle in log:
                defects.add(f"the target's log shows {what}")
        kinds: dict[str, int] = {}
        for line in log.splitlines():
            if line.startswith(("ERROR", "WARNING")):
                text = line.split(") ", 1)[-1][20:]  # after "(wg0) " and the timestamp
                text = "".join("#" if c.isdigit() else c for c in text)[:70]
                kinds[text] = kinds.get(text, 0) + 1
        figures["target log: what it reported"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:6])
        figures["target log ERROR / WARNING lines"] = (
            f"{sum(1 for x in log.splitlines() if x.startswith('ERROR'))} / "
            f"{sum(1 for x in log.splitlines() if x.startswith('WARNING'))}")
        figures["seconds"] = round(time.monotonic() - started, 1)
    return defects.items, figures


def uapi_garbage(lab: Lab, rng: random.Random, count: int, defects: Defects) -> int:
    """Random bytes, mutated requests, over-long lines, half requests and idle clients on the UAPI socket.
    Every request is answered (``errno=N``, a get reply) or hung up on within 10 s; the daemon lives."""
    path = str(SOCK_DIR / f"{lab.tif}.sock")
    seeds = [
        b"get=1\n\n", b"set=1\nlisten_port=51820\n\n", b"set=1\nfwmark=0\n\n",
        f"set=1\npublic_key={os.urandom(32).hex()}\nallowed_ip=10.9.9.9/32\nremove=true\n\n".encode(),
        f"set=1\npublic_key={os.urandom(32).hex()}\nendpoint=[::1]:9\npersistent_keepalive_interval=1\n"
        "remove=true\n\n".encode(),
        b"set=1\nprivate_key=" + b"0" * 64 + b"\n\n",
    ]
    sent = 0
    for i in range(count):
        r = rng.random()
        if r < 0.3:
            data = rng.randbytes(rng.randrange(0, 512))
        elif r < 0.8:
            data = mutate(rng, rng.choice(seeds))
        elif r < 0.9:
            data = b"set=1\n" + b"a" * rng.choice([4096, 70000]) + b"\n\n"
        else:
            data = rng.choice(seeds)[: rng.randrange(1, 10)]  # half a request, then hang up
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(path)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                out = b""
                with contextlib.suppress(ConnectionResetError):
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        out += chunk
            if out and not (out.endswith(b"\n\n") and (b"errno=" in out)):
                defects.add(f"UAPI: request {i} got a malformed reply {out[:60]!r}")
        except TimeoutError:
            defects.add(f"UAPI: request {i} ({data[:30]!r}) got no answer within 10 s (hang)")
        except OSError as e:
            defects.add(f"UAPI: request {i}: {e}")
        sent += 1
    # Many clients at once, idle, then gone.
    clients: list[socket.socket] = []
    try:
        for _ in range(64):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(c)
            with contextlib.suppress(OSError):
                c.connect(path)
                c.sendall(b"ge")
        sent += 64
    finally:
        for c in clients:
            c.close()
    return sent
