import os
import shutil

import pytest
from hypothesis import settings

from tests import netns as _netns

# No per-example deadline: on a loaded 2-core machine one example can take hundreds of ms (a GC pause,
# another engineer's test run), and Hypothesis would call that a flaky failure. Example counts stay as set.
settings.register_profile("wiretun", deadline=None)
settings.load_profile("wiretun")


def _system_ready() -> str | None:
    if os.geteuid() != 0:
        return "system tests need root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is missing"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _system_ready()
    for item in items:
        path = str(item.fspath).replace(os.sep, "/")
        if "tests/system" in path or "tests/windows/" in path:  # tests/windows: the wintun.dll stand-in
            item.add_marker(pytest.mark.system)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def netns():
    """A fresh network namespace, entered by the test's thread for the whole test, then removed."""
    with _netns.temporary("wtt") as name:
        yield name


@pytest.fixture
def make_netns():
    """Factory for extra namespaces (not entered); all removed at the end of the test."""
    made: list[str] = []

    def make(prefix: str = "wtx") -> str:
        name = _netns.create(prefix)
        made.append(name)
        _netns.run(name, "ip", "link", "set", "lo", "up", check=True)
        return name

    yield make
    for name in made:
        _netns.remove(name)
