"""Adapters on real TUN devices, each test inside its own network namespace (the ``netns`` fixture).

The kernel's view is checked independently of wiretun's netlink code with ``ip -j`` and ioctls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings

import pytest
from pyroute2 import IPRoute

import wiretun
from tests import netns as _netns
from wiretun import log
from wiretun.adapter import Adapter, delete_driver, get_running_driver_version
from wiretun.errors import AccessDenied, AlreadyExists, Busy, EndOfFile, InvalidParameter, NotFound
from wiretun.linux import tun
from wiretun.linux.names import parse_driver_version

from ..devnode import private_tun_node_unavailable, use_private_tun_node

GUID = uuid.UUID("deadbabe-cafe-beef-0123-456789abcdef")
NOBODY = 65534


# --- independent views of the kernel -----------------------------------------------------------


def ip_json(*argv: str, ns: str | None = None) -> list[dict]:
    cmd = ["ip", *(["-n", ns] if ns else []), "-j", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        return []
    return json.loads(out.stdout or "[]")


def link(name: str, ns: str | None = None) -> dict | None:
    got = ip_json("-d", "link", "show", "dev", name, ns=ns)
    return got[0] if got else None


def link_names(ns: str | None = None) -> set[str]:
    return {entry["ifname"] for entry in ip_json("link", "show", ns=ns)}


def run_python(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """A second process; it inherits the test thread's network namespace."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def in_child(fn, timeout: float = 20.0) -> tuple[int, str]:
    """Run ``fn`` in a forked child (same namespace as this thread); return (exit status, its text)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 1
        try:
            os.close(r)
            text = fn()
            os.write(w, str(text).encode())
            status = 0
        except BaseException as exc:  # report anything back to the parent
            with contextlib.suppress(BaseException):
                os.write(w, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 0.5)
            if ready:
                data = os.read(r, 65536)
                if not data:
                    break
                chunks.append(data)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


def drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.fixture
def adapters():
    """Adapters made by a test; closed at the end even if the test fails."""
    made: list[Adapter] = []
    yield made
    for a in made:
        with contextlib.suppress(Exception):
            a.close()


@pytest.fixture
def log_records():
    got: list[tuple] = []
    wiretun.set_logger(lambda level, stamp, message: got.append((level, stamp, message)))
    try:
        yield got
    finally:
        log.reset_logger()


# --- identity ------------------------------------------------------------------------------------


def test_tunnel_type_and_guid_read_back_from_another_process(netns, adapters):
    a = Adapter.create("Demo", "Example", GUID)
    adapters.append(a)
    b = Adapter.create("Other", "Example type with spaces")  # GUID generated
    adapters.append(b)
    assert a.guid == GUID and a.tunnel_type == "Example"
    assert isinstance(b.guid, uuid.UUID) and b.guid.version == 4 and b.guid != GUID
    assert a.name == "Demo" and a.kernel_name == "Demo"
    assert a.luid == link("Demo")["ifindex"]

    out = run_python(
        "import wiretun\n"
        "for n in ('Demo', 'Other'):\n"
        "    with wiretun.Adapter.open(n) as x:\n"
        "        print(x.name, x.guid, x.luid, x.tunnel_type, sep='|')\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"Demo|{GUID}|{a.luid}|Example",
        f"Other|{b.guid}|{b.luid}|Example type with spaces",
    ]
    # The opened handles in the other process did not remove anything.
    assert {"Demo", "Other"} <= link_names()
    assert link("Demo")["ifalias"] == f"wiretun/1 {GUID} Example"


def test_enumerate_filters_by_tunnel_type(netns, adapters):
    for name, kind in [("EnumA", "Example"), ("EnumB", "Example"), ("EnumC", "Other"), ("EnumD", "Example ")]:
        adapters.append(Adapter.create(name, kind))
    foreign = tun.open_queue("plaintun0", create=True)  # a TUN device wiretun did not make
    try:
        found = Adapter.enumerate("Example")
        assert sorted(x.name for x in found) == ["EnumA", "EnumB"]
        assert {x.guid for x in found} == {adapters[0].guid, adapters[1].guid}
        assert [x.name for x in Adapter.enumerate("Other")] == ["EnumC"]
        assert [x.name for x in Adapter.enumerate("Example ")] == ["EnumD"]
        assert Adapter.enumerate("Nothing") == []
        for x in found:
            x.close()  # not owning: the adapters stay
        assert {"EnumA", "EnumB"} <= link_names()
    finally:
        os.close(foreign)


def test_sixty_character_name_works_and_opens_by_both_names(netns, adapters):
    name = "Sixty-character-adapter-name-" + "abcdefghijklmnopqrstuvwxyz01234"
    assert len(name) == 60
    a = Adapter.create(name, "Example", GUID)
    adapters.append(a)
    assert a.name == name
    kernel = a.kernel_name
    assert re.fullmatch(r"wt[0-9a-f]{13}", kernel)
    seen = link(kernel)
    assert seen is not None and name in seen.get("altnames", [])
    for key in (name, kernel):
        with Adapter.open(key) as b:
            assert (b.luid, b.guid, b.name, b.kernel_name) == (a.luid, GUID, name, kernel)
    out = run_python(f"import wiretun; print(wiretun.Adapter.open({name!r}).kernel_name)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == kernel


def test_a_name_with_spaces_is_an_altname(netns, adapters):
    """Wintun names may hold spaces ("Data Center"): on Linux the name is an altname (set through
    netlink; Debian's ip refuses to set such names but lists them) and the kernel name is derived."""
    a = Adapter.create("Data Center", "Example", GUID)
    adapters.append(a)
    kernel = a.kernel_name
    assert a.name == "Data Center" and re.fullmatch(r"wt[0-9a-f]{13}", kernel)
    shown = subprocess.run(["ip", "link", "show", "dev", kernel], capture_output=True, text=True, check=True).stdout
    assert "altname Data Center\n" in shown
    with Adapter.open("Data Center") as b:
        assert (b.luid, b.guid, b.name, b.kernel_name) == (a.luid, GUID, "Data Center", kernel)
    out = run_python("import wiretun; x = wiretun.Adapter.open('Data Center'); print(x.luid, x.name)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{a.luid} Data Center"
    longest = "Data Center " + "x" * 115  # 127 bytes
    b = Adapter.create(longest, "Example")
    adapters.append(b)
    assert b.get_name() == longest
    with pytest.raises(InvalidParameter, match="128 bytes in UTF-8; the limit is 127 bytes"):
        Adapter.create(longest[:-1] + "é", "Example")  # 127 characters, 128 bytes


def test_longest_names(netns, adapters):
    ascii127 = "n" * 127
    wide = "é" * 63  # 126 bytes of UTF-8
    short_unicode = "ünï"  # short but not ASCII: still an altname
    for name in (ascii127, wide, short_unicode):
        a = Adapter.create(name, "Example")
        adapters.append(a)
        assert a.name == name
        assert re.fullmatch(r"wt[0-9a-f]{13}", a.kernel_name)
        with Adapter.open(name) as b:
            assert b.luid == a.luid


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must not be empty"),
        ("a/b", "contains '/'"),
        ("a\tb", "whitespace"),
        ("tab\tname", "whitespace"),
        ("x" * 128, "the limit is 127"),
    ],
)
def test_invalid_names_raise(netns, name, fragment):
    before = link_names()
    with pytest.raises(InvalidParameter, match=re.escape(fragment)):
        Adapter.create(name, "Example")
    with pytest.raises(InvalidParameter, match=re.escape(fragment)):
        Adapter.open(name)
    assert link_names() == before


def test_invalid_tunnel_type_and_guid(netns):
    before = link_names()
    with pytest.raises(InvalidParameter, match="tunnel type"):
        Adapter.create("Bad", "")
    with pytest.raises(InvalidParameter, match="limit is 127"):
        Adapter.create("Bad", "t" * 128)
    with pytest.raises(InvalidParameter, match="requested_guid"):
        Adapter.create("Bad", "Example", "deadbabe-cafe-beef-0123-456789abcdef")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter, match="owner uid"):
        Adapter.create("Bad", "Example", owner=-1)
    assert link_names() == before


def test_duplicate_names_raise_already_exists(netns, adapters):
    first = Adapter.create("Dup", "Example")
    adapters.append(first)
    long = "Duplicate-long-name-" + "z" * 30
    adapters.append(Adapter.create(long, "Example"))
    for taken in ("Dup", "lo", long, adapters[1].kernel_name):
        with pytest.raises(AlreadyExists, match="already taken"):
            Adapter.create(taken, "Example")
    assert first.name == "Dup" and link("Dup") is not None
    assert len([n for n in link_names() if n.startswith("wt")]) == 1


# --- lifetime ------------------------------------------------------------------------------------


def test_created_adapter_disappears_on_close(netns):
    a = Adapter.create("Gone", "Example")
    assert link("Gone") is not None
    opened = Adapter.open("Gone")
    opened.close()  # an opened handle only releases
    assert link("Gone") is not None
    a.close()
    assert link("Gone") is None
    a.close()  # idempotent
    assert a.closed
    with pytest.raises(InvalidParameter, match="closed"):
        a.set_mtu(1400)
    with Adapter.create("GoneToo", "Example") as b:
        assert link("GoneToo") is not None
    assert link("GoneToo") is None
    assert b.closed


def test_close_removes_adapter_even_while_queues_are_attached(netns):
    a = Adapter.create("Held", "Example")
    fd = tun.open_queue(a.kernel_name)  # another holder keeps the device alive
    try:
        assert a._backend.attached_queues() == 1
        a.close()
        assert link("Held") is None
    finally:
        os.close(fd)


def test_adapter_disappears_when_creating_process_is_killed(netns):
    code = (
        "import sys, time, wiretun\n"
        "a = wiretun.Adapter.create('Killed', 'Example')\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 20)
        assert ready and child.stdout.readline().strip() == "ready"
        assert link("Killed") is not None
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert wait_until(lambda: link("Killed") is None), "adapter outlived its SIGKILLed creator"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()


def test_persistent_adapter_owned_by_nobody_then_delete_driver(netns):
    owned = Adapter.create("NobodyNet", "Example", GUID, persistent=True, owner=NOBODY, group=NOBODY)
    assert owned.persistent
    owned.close()
    seen = link("NobodyNet")
    assert seen is not None, "persistent adapter vanished on close"
    assert seen["linkinfo"]["info_data"]["persist"] is True
    assert seen["linkinfo"]["info_data"]["user"] == "nobody"
    # No owner given: the creator (root) owns it, so nobody may not attach. (A TUN device with
    # neither owner nor group would let any user attach a queue and receive packets.)
    rooted = Adapter.create("RootNet", "Example", persistent=True)
    rooted.close()
    assert link("RootNet")["linkinfo"]["info_data"]["user"] == "root"

    # The kernel's default /dev/net/tun is 0666; a container's is often 0600, which would refuse nobody
    # before the TUN driver's owner check this test is about: nobody gets a private 0666 node.
    unavailable = private_tun_node_unavailable()
    if unavailable:
        pytest.skip(unavailable)

    def as_nobody(name):
        def body():
            use_private_tun_node(0o666)
            drop_to_nobody()
            with Adapter.open(name) as x:
                fd = tun.open_queue(x.kernel_name)  # the real permission check
                os.close(fd)
                return f"{os.getuid()}|{x.guid}|{x.tunnel_type}"

        return body

    status, text = in_child(as_nobody("NobodyNet"))
    assert status == 0, text
    assert text == f"{NOBODY}|{GUID}|Example"
    status, text = in_child(as_nobody("RootNet"))
    assert status != 0 and "PermissionError" in text, text

    # delete_driver leaves alone: an adapter in use, a non-persistent one, a TUN not made by wiretun.
    busy = Adapter.create("BusyNet", "Example", persistent=True)
    busy.close()
    busy_fd = tun.open_queue("BusyNet")
    live = Adapter.create("LiveNet", "Example")
    foreign = tun.open_queue("foreign0", create=True)
    tun.set_persist(foreign, True)
    os.close(foreign)
    try:
        assert delete_driver() == 2
        names = link_names()
        assert "NobodyNet" not in names and "RootNet" not in names
        assert {"BusyNet", "LiveNet", "foreign0"} <= names
        assert delete_driver() == 0
    finally:
        os.close(busy_fd)
        live.close()
    assert delete_driver() == 1  # BusyNet, now that its queue is closed
    assert "BusyNet" not in link_names()


def test_unprivileged_open_of_a_0600_node_names_the_mode_and_the_fix(netns):
    """The driver would let the adapter's owner attach, but a 0600 device node refuses the open first:
    the error says so (the node's mode and the chmod), not that the user lacks ownership."""
    unavailable = private_tun_node_unavailable()
    if unavailable:
        pytest.skip(unavailable)
    owned = Adapter.create("ModeNet", "Example", GUID, persistent=True, owner=NOBODY, group=NOBODY)
    owned.close()

    def body():
        import wiretun.session  # noqa: F401  (imported as root: nobody may not read this Python's tree)

        use_private_tun_node(0o600)
        drop_to_nobody()
        with Adapter.open("ModeNet") as x:
            try:
                x.start_session(0x20000)
            except AccessDenied as exc:
                return f"denied: {exc}"
        return "started"

    try:
        status, text = in_child(body)
    finally:
        assert delete_driver() == 1
    assert status == 0 and text.startswith("denied: "), text
    assert "/dev/net/tun" in text and "mode 0600 owned by root:root" in text, text
    assert "chmod 0666 /dev/net/tun" in text, text
    assert "owner" not in text.split("mode 0600", 1)[0], text  # the cause named first is the mode


def test_unprivileged_create_is_access_denied(netns):
    def body():
        drop_to_nobody()
        try:
            Adapter.create("NoRights", "Example")
        except AccessDenied as exc:
            return f"denied: {exc}"
        return "created"

    status, text = in_child(body)
    assert status == 0 and text.startswith("denied"), text
    assert link("NoRights") is None


# --- driver version and logging --------------------------------------------------------------------


def test_driver_version_matches_ethtool(netns, adapters):
    before = link_names()
    version = get_running_driver_version()  # no adapter yet: a short-lived probe device
    assert link_names() == before
    a = Adapter.create("Ver", "Example")
    adapters.append(a)
    driver, text = tun.driver_info(a.kernel_name)
    assert driver == "tun"
    assert version == parse_driver_version(text) == get_running_driver_version()
    major, minor = map(int, text.split(".")[:2])
    assert version == (major << 16) | minor and version >= 0x10000
    if shutil.which("ethtool"):
        out = subprocess.run(["ethtool", "-i", a.kernel_name], capture_output=True, text=True, timeout=10)
        reported = re.search(r"^version:\s*(\S+)", out.stdout, re.M)
        assert reported is not None, out.stdout
        assert parse_driver_version(reported.group(1)) == version


def test_logger_receives_adapter_messages(netns, log_records):
    before = time.time()
    with Adapter.create("LogDemo", "Example"):
        pass
    after = time.time()
    messages = [m for _, _, m in log_records]
    assert any(m.startswith("Created adapter LogDemo (tunnel type Example") for m in messages), messages
    assert "Removed adapter LogDemo" in messages
    for level, stamp, _ in log_records:
        assert level == wiretun.LogLevel.INFO
        assert before - 2 <= log.filetime_to_unix(stamp) <= after + 2


# --- configuration ---------------------------------------------------------------------------------


def ip_addresses(name: str) -> set[str]:
    out = set()
    for entry in ip_json("addr", "show", "dev", name):
        for info in entry.get("addr_info", []):
            out.add(f"{info['local']}/{info['prefixlen']}")
    return out


def test_addresses_v4_and_v6(netns, adapters):
    a = Adapter.create("Addr", "Example")
    adapters.append(a)
    a.add_address("10.6.7.7/24")
    a.add_address("fd00:6:7::7/64")
    a.add_address("192.0.2.1")  # no prefix: a host address
    got = {str(x) for x in a.addresses()}
    assert {"10.6.7.7/24", "fd00:6:7::7/64", "192.0.2.1/32"} <= got
    assert {"10.6.7.7/24", "fd00:6:7::7/64", "192.0.2.1/32"} <= ip_addresses("Addr")
    with pytest.raises(AlreadyExists):
        a.add_address("10.6.7.7/24")
    with pytest.raises(InvalidParameter, match="10.6.7.300/24"):
        a.add_address("10.6.7.300/24")
    a.remove_address("10.6.7.7/24")
    a.remove_address("fd00:6:7::7/64")
    got = {str(x) for x in a.addresses()}
    assert "10.6.7.7/24" not in got and "fd00:6:7::7/64" not in got and "192.0.2.1/32" in got
    assert "10.6.7.7/24" not in ip_addresses("Addr")
    with pytest.raises(NotFound):
        a.remove_address("10.6.7.7/24")


def test_routes_v4_and_v6(netns, adapters):
    a = Adapter.create("Rt", "Example")
    adapters.append(a)
    with pytest.raises(InvalidParameter, match="down"):
        a.add_route("10.0.0.0/8")
    a.up()
    a.add_route("10.0.0.0/8")
    a.add_route("172.16.0.0/12", metric=50)
    a.add_route("fd01::/64", 7)
    with pytest.raises(AlreadyExists):
        a.add_route("10.0.0.0/8")
    with pytest.raises(InvalidParameter, match="host bits"):
        a.add_route("10.0.0.1/8")
    got = {(str(r.destination), r.metric) for r in a.routes()}
    assert {("10.0.0.0/8", 0), ("172.16.0.0/12", 50), ("fd01::/64", 7)} <= got
    shown = {(r["dst"], r.get("metric", 0)) for r in ip_json("route", "show", "dev", "Rt")}
    assert {("10.0.0.0/8", 0), ("172.16.0.0/12", 50)} <= shown
    shown6 = {(r["dst"], r.get("metric")) for r in ip_json("-6", "route", "show", "dev", "Rt")}
    assert ("fd01::/64", 7) in shown6
    a.add_address("10.6.7.7/24")
    a.add_route("10.20.0.0/16", gateway="10.6.7.8")
    assert any(
        str(r.destination) == "10.20.0.0/16" and str(r.gateway) == "10.6.7.8" for r in a.routes()
    ), a.routes()
    shown = ip_json("route", "show", "dev", "Rt")
    assert any(r["dst"] == "10.20.0.0/16" and r.get("gateway") == "10.6.7.8" for r in shown)
    with pytest.raises(InvalidParameter, match="IPv6 but the destination is IPv4"):
        a.add_route("10.30.0.0/16", gateway="fd00::1")
    a.remove_route("10.20.0.0/16", gateway="10.6.7.8")
    a.remove_route("10.0.0.0/8")
    a.remove_route("172.16.0.0/12", metric=50)
    a.remove_route("fd01::/64")
    got = {str(r.destination) for r in a.routes()}
    assert not got & {"10.0.0.0/8", "172.16.0.0/12", "fd01::/64", "10.20.0.0/16"}
    with pytest.raises(NotFound):
        a.remove_route("10.0.0.0/8")


def test_mtu(netns, adapters):
    a = Adapter.create("Mtu", "Example")
    adapters.append(a)
    assert a.get_mtu() == link("Mtu")["mtu"]
    a.set_mtu(1280)
    assert a.get_mtu() == 1280 == link("Mtu")["mtu"]
    a.set_mtu(65535)
    assert link("Mtu")["mtu"] == 65535
    for bad in (67, 65536, 0, "1400"):
        with pytest.raises(InvalidParameter, match="MTU"):
            a.set_mtu(bad)
    assert a.get_mtu() == 65535


def test_old_property_spellings_warn_and_still_work(netns, adapters):
    """mtu, is_up and assigning name did kernel I/O behind a property: they moved to methods; the old
    spellings keep working with a DeprecationWarning. Reading name is cheap and does not warn."""
    a = Adapter.create("Old", "Example")
    adapters.append(a)
    with pytest.warns(DeprecationWarning, match="get_mtu"):
        assert a.mtu == link("Old")["mtu"]
    with pytest.warns(DeprecationWarning, match="set_mtu"):
        a.mtu = 1300
    assert link("Old")["mtu"] == 1300
    a.up()
    with pytest.warns(DeprecationWarning, match="is_up_now"):
        assert a.is_up is True
    with pytest.warns(DeprecationWarning, match="rename"):
        a.name = "Older"
    assert link("Older") is not None and a.get_name() == "Older"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert a.name == "Older" and a.get_mtu() == 1300 and a.is_up_now()


def test_up_and_down(netns, adapters):
    a = Adapter.create("Updown", "Example")
    adapters.append(a)
    assert not a.is_up_now() and "UP" not in link("Updown")["flags"]
    a.up()
    assert a.is_up_now() and "UP" in link("Updown")["flags"]
    a.down()
    assert not a.is_up_now() and "UP" not in link("Updown")["flags"]


def test_rename(netns, adapters):
    a = Adapter.create("Ren1", "Example", GUID)
    adapters.append(a)
    index = a.luid
    a.up()
    a.rename("Ren2")
    assert a.name == "Ren2" and a.kernel_name == "Ren2" and a.is_up_now()
    with pytest.raises(NotFound):
        Adapter.open("Ren1")
    long = "Renamed-to-a-long-name-" + "q" * 30
    a.rename(long)
    assert a.name == long and re.fullmatch(r"wt[0-9a-f]{13}", a.kernel_name) and a.is_up_now()
    assert link(a.kernel_name)["altnames"] == [long]
    longer = "Renamed-again-to-another-long-name-" + "r" * 30
    a.rename(longer)
    assert link(a.kernel_name)["altnames"] == [longer]
    with pytest.raises(NotFound):
        Adapter.open(long)
    a.rename("Ren3")
    assert a.name == "Ren3" and a.kernel_name == "Ren3" and "altnames" not in link("Ren3")
    assert a.luid == index and a.is_up_now()
    out = run_python("import wiretun; x = wiretun.Adapter.open('Ren3'); print(x.guid, x.luid)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(GUID), str(index)]
    other = Adapter.create("Taken", "Example")
    adapters.append(other)
    with pytest.raises(AlreadyExists, match="Taken"):
        a.rename("Taken")
    with pytest.raises(InvalidParameter, match="whitespace"):
        a.rename("has\ttab")
    assert a.name == "Ren3"
    a.rename("Ren 4")  # a space: an altname, as Wintun's "Data Center"
    assert a.name == a.get_name() == "Ren 4" and re.fullmatch(r"wt[0-9a-f]{13}", a.kernel_name)


def test_opening_what_wiretun_did_not_create_raises_not_found(netns):
    with IPRoute(groups=0) as ip:
        ip.link("add", ifname="veth-a", kind="veth", peer="veth-b")
    plain = tun.open_queue("plaintun1", create=True)
    with IPRoute(groups=0) as ip:
        ip.link("set", index=ip.link_lookup(ifname="plaintun1")[0], ifalias="an administrator's note")
    try:
        for name in ("veth-a", "plaintun1", "lo"):
            with pytest.raises(NotFound, match="not a wiretun adapter"):
                Adapter.open(name)
        with pytest.raises(NotFound, match="no adapter named 'Missing'"):
            Adapter.open("Missing")
        with pytest.raises(NotFound, match="no adapter named"):
            Adapter.open("A-long-name-that-nobody-has-created-" + "m" * 20)
    finally:
        os.close(plain)


# --- namespaces, threads, sessions -------------------------------------------------------------------


def test_adapter_keeps_working_in_its_namespace_from_elsewhere(netns, make_netns):
    far = make_netns()
    with _netns.entered(far):
        a = Adapter.create("Far", "Example")
    try:
        # This thread is back in the fixture's namespace; the adapter still acts in `far`.
        assert link("Far") is None and link("Far", ns=far) is not None
        with pytest.raises(NotFound):
            Adapter.open("Far")
        a.set_mtu(1400)
        a.add_address("10.9.9.9/24")
        assert link("Far", ns=far)["mtu"] == 1400
        fd = a._backend.open_queue()
        try:
            assert tun.attached_name(fd) == "Far"
            assert a._backend.attached_queues() == 1
        finally:
            os.close(fd)
        assert a._backend.attached_queues() == 0

        async def inside_event_loop():  # pyroute2's sync API cannot run in a running loop
            return a.get_mtu(), a.is_up_now()

        assert asyncio.run(inside_event_loop()) == (1400, False)
    finally:
        a.close()
    assert link("Far", ns=far) is None


class _StubSession:
    """Stands in for wiretun.session.Session to test the adapter's bookkeeping only."""

    def __init__(self, adapter: Adapter, multi_queue: bool = False) -> None:
        self.adapter = adapter
        self.multi_queue = multi_queue
        self.ended = False
        adapter._register_session(self, multi_queue)

    def end(self) -> None:
        self.ended = True
        self.adapter._unregister_session(self)


def test_session_bookkeeping_and_close_ends_sessions(netns):
    a = Adapter.create("Sess", "Example")
    first = _StubSession(a)
    with pytest.raises(Busy):
        _StubSession(a)
    with pytest.raises(Busy):
        _StubSession(a, multi_queue=True)  # the first one wants the adapter to itself
    first.end()
    m1, m2 = _StubSession(a, True), _StubSession(a, True)
    with pytest.raises(Busy):
        _StubSession(a)
    a.close()
    assert m1.ended and m2.ended
    with pytest.raises(InvalidParameter, match="closed"):
        _StubSession(a, True)


def test_attached_queues_and_vanished_adapter(netns):
    a = Adapter.create("Queues", "Example")
    try:
        assert a._backend.attached_queues() == 0
        fds = [a._backend.open_queue() for _ in range(2)]
        assert a._backend.attached_queues() == 2
        for fd in fds:
            os.close(fd)
        assert a._backend.attached_queues() == 0
        subprocess.run(["ip", "link", "del", "Queues"], check=True)
        with pytest.raises(EndOfFile, match="no longer exists"):
            a.get_mtu()
    finally:
        a.close()


def test_percent_name_is_kept_verbatim(netns):
    # The kernel expands "%d" in a requested name; wiretun must give the adapter the name asked for.
    with Adapter.create("wt%d", "Pct") as adapter:
        assert adapter.name == "wt%d"
        assert adapter.kernel_name != "wt%d" and "%" not in adapter.kernel_name
        with Adapter.open("wt%d") as again:
            assert again.luid == adapter.luid


def test_gateway_must_be_an_address(netns):
    with Adapter.create("gwtype", "Gw") as adapter:
        adapter.up()
        with pytest.raises(InvalidParameter, match="gateway"):
            adapter.add_route("10.99.0.0/16", gateway=5)
